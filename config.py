"""
Command-line overrides for the scripts' defaults: `--key=value`.

Every script keeps its settings in one commented dict of defaults, and
parse_args overrides them from argv. Each value is checked against the type of
its default, so a typo in a key or a value fails at once with a one-line error
instead of silently training the wrong model.
"""

import sys

TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")


def convert(key, text, default):
    """Turn the string `text` into the type of `default` (bool, int, float, str or None)."""
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise ValueError(f"--{key}={text}: expected true/false/1/0")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"--{key}={text}: expected {type(default).__name__}") from None
    if default is None or isinstance(default, str):
        return text
    raise TypeError(f"default of {key} has unsupported type {type(default).__name__}")


def parse_args(defaults, argv=None):
    """Return a copy of `defaults` overridden by `--key=value` items of argv (default sys.argv[1:])."""
    config = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(defaults)}")
        config[key] = convert(key, text, defaults[key])
    return config
