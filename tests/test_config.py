import re

import pytest

from config import parse_args

DEFAULTS = dict(max_iters=100, learning_rate=1e-3, compile=False, out_dir="out", init_from=None)


def test_overrides_are_converted_to_the_default_type():
    config = parse_args(DEFAULTS, ["--max_iters=7", "--learning_rate=3e-4", "--compile=true", "--init_from=x.pt"])
    assert config == dict(max_iters=7, learning_rate=3e-4, compile=True, out_dir="out", init_from="x.pt")
    assert type(config["max_iters"]) is int and type(config["learning_rate"]) is float


def test_defaults_are_not_mutated_and_empty_argv_keeps_them():
    assert parse_args(DEFAULTS, []) == DEFAULTS
    parse_args(DEFAULTS, ["--max_iters=1"])
    assert DEFAULTS["max_iters"] == 100


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("false", False), ("0", False)])
def test_bool_words(text, value):
    assert parse_args(DEFAULTS, [f"--compile={text}"])["compile"] is value


def test_value_may_contain_equals_sign():
    assert parse_args(DEFAULTS, ["--out_dir=a=b"])["out_dir"] == "a=b"


@pytest.mark.parametrize("arg, message", [
    ("--max_iter=5", "unknown config key 'max_iter'"),
    ("--max_iters=five", "--max_iters=five: expected int"),
    ("--max_iters=2.5", "--max_iters=2.5: expected int"),
    ("--learning_rate=fast", "--learning_rate=fast: expected float"),
    ("--compile=yes", "--compile=yes: expected true/false/1/0"),
    ("max_iters=5", "expected --key=value"),
    ("--max_iters", "expected --key=value"),
])
def test_errors_name_the_key_or_value(arg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(DEFAULTS, [arg])
