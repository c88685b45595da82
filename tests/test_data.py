"""Tests for data.py: tokenizer round-trips, prompt splits and conflict marking, label masking against
hand-written tensors, and every JSONL loader error with its FILE:LINE (benchmark.py's: test_benchmark.py)."""
import random
from collections import Counter

import pytest
import tiktoken
import torch

import data
from config import UserError


class CharTokenizer:
    """One id per character (its code point) and EOT = 0, so expected ids can be written by hand."""
    eot_token = 0

    def encode_ordinary(self, text):
        return [ord(c) for c in text]


def write_lines(tmp_path, lines, name="rows.jsonl"):
    path = str(tmp_path / name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------
# tokenizer

UNICODE_TEXTS = [
    "Hello, world!",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "CJK 漢字かなカナ 한국어",
    "combining marks: e\u0301 a\u0308 n\u0303, Zalgo Z\u0351\u034b\u0352a\u0346",
    "line one\nline two\r\n\ttabbed   spaced  \n\n",
    "<|endoftext|> is just text here <|endoftext",
    "digits 0123456789 and _under_scores_ and 'quotes' it's",
    "",
]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tokenizer_round_trips_unicode(text):
    tokenizer = data.get_tokenizer()
    ids = tokenizer.encode_ordinary(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eot_token not in ids  # encode_ordinary never produces the special token


def test_tokenizer_round_trips_random_code_points():
    rng = random.Random(0)
    code_points = [rng.randrange(0x110000) for _ in range(2000)]
    text = "".join(chr(c) for c in code_points if not 0xD800 <= c <= 0xDFFF)  # no lone surrogates in UTF-8
    tokenizer = data.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text


def test_tokenizer_is_a_tiktoken_encoding_with_eot_last():
    tokenizer = data.get_tokenizer()
    assert isinstance(tokenizer, tiktoken.Encoding)
    assert tokenizer.n_vocab == data.VOCAB_SIZE
    assert tokenizer.eot_token == data.VOCAB_SIZE - 1
    assert tokenizer.encode(data.EOT, allowed_special={data.EOT}) == [tokenizer.eot_token]
    assert tokenizer.decode([tokenizer.eot_token]) == data.EOT


def test_gpt2_tokenizer_loads_or_fails_with_one_line():
    try:
        tokenizer = data.get_tokenizer("gpt2")
    except UserError as error:
        message = str(error)
        assert "\n" not in message
        assert "gpt2" in message and "offline" in message and "TIKTOKEN_CACHE_DIR" in message
    else:
        assert isinstance(tokenizer, tiktoken.Encoding) and tokenizer.n_vocab == 50257


def test_gpt2_tokenizer_offline_error_is_one_line(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\nmore detail")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError) as excinfo:
        data.get_tokenizer.__wrapped__("gpt2")  # bypass the cache, which may hold a loaded gpt2
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("tokenizer gpt2: tiktoken could not load its GPT-2 files (ConnectionError)")


def test_unknown_tokenizer_name_is_rejected():
    with pytest.raises(UserError, match="tokenizer gpt-2: unknown"):
        data.get_tokenizer("gpt-2")


# ---------------------------------------------------------------------------
# split_by_prompt and mark_conflicts on a user's rows

def user_rows():
    """Hand-built rows: prompt p0 has two distinct responses, p1 one (twice, up to whitespace), p2..p9 one each."""
    rows = [dict(prompt="p0", response=" yes"), dict(prompt="p0", response=" no"),
            dict(prompt="p1", response=" same"), dict(prompt="p1", response="same ")]
    return rows + [dict(prompt=f"p{i}", response=f" r{i}") for i in range(2, 10)]


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    rows = user_rows()
    train, held_out = data.split_by_prompt(rows, fraction=0.3, seed=0)
    train_prompts, held_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in held_out}
    assert not train_prompts & held_prompts
    assert len(held_prompts) == 3  # round(0.3 * 10 distinct prompts)
    assert sorted(map(id, train + held_out)) == sorted(map(id, rows))  # every row exactly once
    for row in rows:  # all rows of a held-out prompt are held out
        assert (row in held_out) == (row["prompt"] in held_prompts)


def test_split_by_prompt_is_seeded():
    first = data.split_by_prompt(user_rows(), fraction=0.3, seed=0)
    assert data.split_by_prompt(user_rows(), fraction=0.3, seed=0) == first
    assert data.split_by_prompt(list(reversed(user_rows())), fraction=0.3, seed=0)[1] == list(reversed(first[1]))
    held = lambda seed: {r["prompt"] for r in data.split_by_prompt(user_rows(), 0.3, seed)[1]}
    assert len({frozenset(held(seed)) for seed in range(5)}) > 1


def test_split_by_prompt_never_holds_out_the_only_prompt():
    rows = [dict(prompt="only", response=" a"), dict(prompt="only", response=" b")]
    assert data.split_by_prompt(rows, fraction=0.5, seed=0) == (rows, [])


def test_mark_conflicts_iff_more_than_one_distinct_response():
    rows = data.mark_conflicts(user_rows())
    assert [row["kind"] for row in rows] == ["conflicting"] * 2 + ["consistent"] * 10


def test_mark_conflicts_keeps_a_kind_the_row_already_has():
    rows = user_rows()
    rows[0]["kind"] = rows[1]["kind"] = "high_entropy"            # two answers, both acceptable: not a conflict
    assert [row["kind"] for row in data.mark_conflicts(rows)] == ["high_entropy"] * 2 + ["consistent"] * 10


def test_mark_contested_iff_the_swapped_pair_occurs_unless_the_pair_has_a_kind():
    pairs = [dict(prompt="p", chosen=" a", rejected=" b"), dict(prompt="p", chosen="b ", rejected=" a"),
             dict(prompt="q", chosen=" a", rejected=" b"), dict(prompt="r", chosen=" a", rejected=" b", kind="contested")]
    assert [row["kind"] for row in data.mark_contested(pairs)] == ["contested", "contested", "consensus", "contested"]


def test_mark_conflicts_recovers_the_benchmarks_conflicts(bench):
    rows = data.mark_conflicts([dict(row, kind=None) for row in bench["sft_train"]])     # kinds from the data alone
    for row, original in zip(rows, bench["sft_train"]):
        # a high-entropy prompt's sampled answers differ too, so from the data alone it looks conflicting
        expected = "consistent" if original["kind"] == "consistent" else "conflicting"
        assert row["kind"] == expected


# ---------------------------------------------------------------------------
# label masking: hand-built batches against hand-written tensors

def test_sft_batch_masks_prompt_and_padding_and_trains_on_final_eot():
    rows = [dict(prompt="ab", response="c"), dict(prompt="a", response="xyz")]
    encoded = data.encode_sft(rows, CharTokenizer(), block_size=8)
    assert encoded == [([0, 97, 98, 99, 0], 3), ([0, 97, 120, 121, 122, 0], 2)]
    idx, labels = data.sft_batch(encoded, [1, 0], pad_id=0)
    assert torch.equal(idx, torch.tensor([[0, 97, 120, 121, 122, 0],
                                          [0, 97, 98, 99, 0, 0]]))
    assert torch.equal(labels, torch.tensor([[-100, -100, 120, 121, 122, 0],
                                             [-100, -100, -100, 99, 0, -100]]))


def test_pref_batch_pads_chosen_and_rejected_to_one_length():
    rows = [dict(prompt="ab", chosen="c", rejected="de"), dict(prompt="a", chosen="wxyz", rejected="v")]
    encoded = data.encode_pref(rows, CharTokenizer(), block_size=8)
    chosen_idx, chosen_labels, rejected_idx, rejected_labels = data.pref_batch(encoded, [0, 1], pad_id=0)
    assert torch.equal(chosen_idx, torch.tensor([[0, 97, 98, 99, 0, 0, 0],
                                                 [0, 97, 119, 120, 121, 122, 0]]))
    assert torch.equal(chosen_labels, torch.tensor([[-100, -100, -100, 99, 0, -100, -100],
                                                    [-100, -100, 119, 120, 121, 122, 0]]))
    assert torch.equal(rejected_idx, torch.tensor([[0, 97, 98, 100, 101, 0, 0],
                                                   [0, 97, 118, 0, 0, 0, 0]]))
    assert torch.equal(rejected_labels, torch.tensor([[-100, -100, -100, 100, 101, 0, -100],
                                                      [-100, -100, 118, 0, -100, -100, -100]]))


def test_real_tokenizer_labels_decode_to_response_and_eot(bench):
    tokenizer = data.get_tokenizer()
    rows = bench["sft_train"][:4]
    encoded = data.encode_sft(rows, tokenizer, block_size=128)
    idx, labels = data.sft_batch(encoded, range(4), tokenizer.eot_token)
    for row, ids, targets in zip(rows, idx.tolist(), labels.tolist()):
        n_prompt = next(t for t, label in enumerate(targets) if label != -100)
        n_ids = len(targets) - next(t for t, label in enumerate(reversed(targets)) if label != -100)
        assert tokenizer.decode(ids[:n_prompt]) == data.EOT + row["prompt"]
        assert tokenizer.decode(targets[n_prompt:n_ids]) == row["response"] + data.EOT
        assert all(label == -100 for label in targets[n_ids:]) and all(i == tokenizer.eot_token for i in ids[n_ids:])


def test_too_long_row_names_its_line_and_lengths_or_is_truncated(tmp_path):
    path = write_lines(tmp_path, ['{"prompt": "ab", "response": "c"}', '{"prompt": "abcd", "response": "ef"}'])
    rows = data.load_sft_jsonl(path)
    with pytest.raises(ValueError) as excinfo:
        data.encode_sft(rows, CharTokenizer(), block_size=6)
    assert str(excinfo.value).startswith(f"{path}:2: 8 tokens (prompt 4, response 2, 2 end-of-text) "
                                         "exceed block_size 6")
    # truncate: the prompt loses tokens from its start first ...
    assert data.encode_sft(rows, CharTokenizer(), block_size=6, truncate=True)[1] == ([0, 99, 100, 101, 102, 0], 3)
    # ... keeping its last token, then the response loses tokens from its end
    long_response = [dict(prompt="ab", response="cdefgh")]
    assert data.encode_sft(long_response, CharTokenizer(), block_size=5, truncate=True) == [([0, 98, 99, 100, 101], 2)]


# ---------------------------------------------------------------------------
# JSONL loaders: every error names FILE:LINE

GOOD_SFT = '{"prompt": "Q: hi\\nA:", "response": " hello"}'
GOOD_PREF = '{"prompt": "Q: hi\\nA:", "chosen": " hello", "rejected": " bye"}'

SFT_ERRORS = [  # (lines, line number of the error, message after "FILE:LINE: ")
    ([GOOD_SFT, "", '{"prompt": "a", "response": }'], 3, "invalid JSON"),
    ([GOOD_SFT, '["a", "b"]'], 2, "expected a JSON object, got list"),
    ([GOOD_SFT, GOOD_SFT, '{"prompt": "a"}'], 3, "missing required field 'response'"),
    (['{"response": "b"}'], 1, "missing required field 'prompt'"),
    ([GOOD_SFT, '{"prompt": "  ", "response": "b"}'], 2, "field 'prompt' is empty"),
    (['{"prompt": "a", "response": ""}'], 1, "field 'response' is empty"),
    ([GOOD_SFT, '{"prompt": "a", "response": 3}'], 2, "field 'response' must be a string, got int"),
    (['{"prompt": "a", "response": "b", "group": ["x"]}'], 1, "field 'group' must be a string, got list"),
    ([GOOD_SFT, '{"prompt": "a", "response": "b", "uncertainty": 1.5}'], 2,
     "field 'uncertainty' is 1.5, outside [0, 1]"),
    (['{"prompt": "a", "response": "b", "uncertainty": -0.1}'], 1, "field 'uncertainty' is -0.1, outside [0, 1]"),
    (['{"prompt": "a", "response": "b", "uncertainty": "low"}'], 1, "field 'uncertainty' must be a number, got str"),
    (['{"prompt": "a", "response": "b", "uncertainty": true}'], 1, "field 'uncertainty' must be a number, got bool"),
    ([GOOD_SFT, '{"prompt": "a", "response": "b", "kind": "contested"}'], 2,
     "field 'kind' is 'contested', expected one of 'consistent', 'conflicting', 'high_entropy', 'ood'"),
    (['{"prompt": "a", "response": "b", "corrupted": "yes"}'], 1, "field 'corrupted' is 'yes', expected one of True, False"),
    ([], 1, "empty file"),
    (["", "  "], 1, "empty file"),
]

PREF_ERRORS = [
    ([GOOD_PREF, '{"prompt": "a", "chosen": " x", "rejected": " x"}'], 2, "'chosen' and 'rejected' are identical"),
    ([GOOD_PREF, '{"prompt": "a", "chosen": " x"}'], 2, "missing required field 'rejected'"),
    (['{"prompt": "a", "chosen": "", "rejected": " x"}'], 1, "field 'chosen' is empty"),
    (['{"prompt": "a", "chosen": 1, "rejected": " x"}'], 1, "field 'chosen' must be a string, got int"),
    (["", GOOD_PREF, "{not json"], 3, "invalid JSON"),
    ([GOOD_PREF, '{"prompt": "a", "chosen": " x", "rejected": " y", "kind": "conflicting"}'], 2,
     "field 'kind' is 'conflicting', expected one of 'contested', 'consensus'"),
    ([], 1, "empty file"),
]


@pytest.mark.parametrize("loader, lines, line_number, message",
                         [(data.load_sft_jsonl, *case) for case in SFT_ERRORS]
                         + [(data.load_pref_jsonl, *case) for case in PREF_ERRORS])
def test_loader_errors_name_file_and_line(tmp_path, loader, lines, line_number, message):
    path = write_lines(tmp_path, lines)
    with pytest.raises(ValueError) as excinfo:
        loader(path)
    assert str(excinfo.value).startswith(f"{path}:{line_number}: {message}")
    assert "\n" not in str(excinfo.value)


def test_sft_loader_reads_rows_and_accepts_completion(tmp_path):
    path = write_lines(tmp_path, [GOOD_SFT, "",
                                  '{"prompt": "Q", "completion": " A", "task": "t", "group": "g", "uncertainty": 1}'])
    assert data.load_sft_jsonl(path) == [
        dict(prompt="Q: hi\nA:", response=" hello", task=None, group=None, uncertainty=None, kind=None, corrupted=False,
             source=f"{path}:1"),
        dict(prompt="Q", response=" A", task="t", group="g", uncertainty=1.0, kind=None, corrupted=False,
             source=f"{path}:3"),
    ]


def test_pref_loader_reads_rows(tmp_path):
    path = write_lines(tmp_path, [GOOD_PREF])
    assert data.load_pref_jsonl(path) == [
        dict(prompt="Q: hi\nA:", chosen=" hello", rejected=" bye", task=None, group=None, kind=None, source=f"{path}:1")]


def test_benchmark_rows_survive_write_and_load(tmp_path, bench):
    path = str(tmp_path / "sft_train.jsonl")
    data.write_jsonl(bench["sft_train"], path)
    loaded = data.load_sft_jsonl(path)
    assert [(r["prompt"], r["response"], r["group"], r["uncertainty"]) for r in loaded] == \
        [(r["prompt"], r["response"], r["group"], r["uncertainty"]) for r in bench["sft_train"]]


# ---------------------------------------------------------------------------
# shuffled_batches

def test_shuffled_batches_are_full_seeded_and_balanced():
    n_examples, batch_size = 10, 4
    batches = data.shuffled_batches(n_examples, batch_size, seed=0)
    first = [next(batches) for _ in range(5)]  # 20 indices = exactly two epochs
    assert all(len(batch) == batch_size for batch in first)
    assert Counter(i for batch in first for i in batch) == Counter({i: 2 for i in range(n_examples)})
    generator = torch.Generator().manual_seed(0)
    reference = torch.randperm(n_examples, generator=generator).tolist()
    reference += torch.randperm(n_examples, generator=generator).tolist()
    assert sum(first, []) == reference  # two seeded permutations, read in order across the epoch boundary
    again = data.shuffled_batches(n_examples, batch_size, seed=0)
    assert [next(again) for _ in range(5)] == first
    other = data.shuffled_batches(n_examples, batch_size, seed=1)
    assert [next(other) for _ in range(5)] != first


def test_shuffled_batches_larger_than_the_data_are_still_full():
    batches = data.shuffled_batches(3, 4, seed=0)
    first = [next(batches) for _ in range(3)]  # 12 indices = four epochs of 3
    assert all(len(batch) == 4 for batch in first)
    assert Counter(i for batch in first for i in batch) == Counter({0: 4, 1: 4, 2: 4})
