"""A Hugging Face GPT-2 directory's own tokenizer (vocab.json + merges.txt, data.gpt2_encoding): on a tiny
vocabulary written here, tiktoken's encoding of it against a slow reference BPE, its pre-tokenisation against
tiktoken's own 'gpt2' pattern, every malformed file as one line naming it, and a run on such a directory that
never asks tiktoken for its GPT-2 files."""
import json
import math
import os
import random

import pytest
import regex
import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str   # the pattern of tiktoken's 'gpt2', no download needed

import data
import sample
import train_sft
from config import UserError
from lora import export_peft
from model import GPT, GPTConfig
from test_model import write_hf_checkpoint
from trainer import base_config, load_ensemble

# Written as GPT-2 spells tokens: 'Ġ' is the space, 'Ċ' the newline, 'Ã' '©' the two bytes of 'é'.
MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "n"), ("in", "g"), ("Ġ", "a"), ("e", "r"), ("Ã", "©"),
          ("Ċ", "Ċ"), ("1", "2"), ("'", "s"), ("Ġ", "Ġ")]
TEXTS = ["the other thing", "The cat's hat is there", "café éé", "a\n\nb\n\n\nc", "  two  spaces  ",
         "12 123 1212 x12", "the<|endoftext|>", "emoji 🙂 and 漢字", "", "\t\ttabs\n"]
ROWS = [dict(prompt=f"Q: What is {a} plus {b}?\nA:", response=f" {a + b}") for a in range(4) for b in range(3)]


def gpt2_spelling():
    """{byte: character} as GPT-2's files spell bytes: a printable byte other than space as itself, every
    other byte as chr(256 + n), n counting those bytes in order."""
    shifted = [b for b in range(256) if not chr(b).isprintable() or b == ord(" ")]
    return {b: chr(256 + shifted.index(b)) if b in shifted else chr(b) for b in range(256)}


def gpt2_vocab(merges):
    """GPT-2's ids: the printable bytes' characters, then the other bytes', then one token per merge, then EOT."""
    spelling = gpt2_spelling()
    bytes_in_rank_order = sorted(range(256), key=lambda b: ord(spelling[b]) >= 256)   # stable: byte order within
    tokens = [spelling[b] for b in bytes_in_rank_order] + [first + second for first, second in merges]
    return {token: i for i, token in enumerate(tokens)} | {data.EOT: len(tokens)}


def write_tokenizer(directory, merges=MERGES, vocab=None):
    """Write vocab.json and merges.txt as Hugging Face does (a '#version' line first); returns the directory."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(gpt2_vocab(merges) if vocab is None else vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in merges))
    return str(directory)


def reference_bpe(text, merges=MERGES):
    """GPT-2's BPE, slowly: split text with tiktoken's 'gpt2' pattern, spell each piece's bytes as characters,
    merge the leftmost adjacent pair of lowest merge rank until no pair is a merge, and look the pieces up."""
    spelling, vocab = gpt2_spelling(), gpt2_vocab(merges)
    rank = {pair: i for i, pair in enumerate(merges)}
    ids = []
    for piece in regex.findall(r50k_pat_str, text):
        symbols = [spelling[b] for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            best, i = min((rank.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
            if best == math.inf:
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids += [vocab[symbol] for symbol in symbols]
    return ids


def test_bytes_are_spelt_and_ranked_as_in_gpt2():
    """Hand-checked against GPT-2's real ids: '!' is 0, byte 0 is 'Ā' at 188, '\\n' is 'Ċ' at 198, ' ' is 'Ġ' at 220."""
    characters = data.gpt2_byte_characters()
    rank_of = {byte: rank for rank, byte in enumerate(characters.values())}
    assert (rank_of[ord("!")], rank_of[0], rank_of[ord("\n")], rank_of[ord(" ")]) == (0, 188, 198, 220)
    assert (characters["Ā"], characters["Ċ"], characters["Ġ"]) == (0, 10, 32)
    assert characters == {character: byte for byte, character in gpt2_spelling().items()}


def test_gpt2_pattern_splits_as_tiktoken_gpt2():
    rng = random.Random(0)
    alphabet = "ab é1 2\n\t\r'sltvm.,!-_漢🙂\u00a0"
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(40))) for _ in range(300)]
    for text in texts:
        assert regex.findall(data.GPT2_PATTERN, text) == regex.findall(r50k_pat_str, text), text


@pytest.mark.parametrize("text", TEXTS)
def test_directory_encoding_is_the_reference_bpe(tmp_path, text):
    tokenizer = data.get_tokenizer(write_tokenizer(tmp_path))
    ids = tokenizer.encode_ordinary(text)
    assert ids == reference_bpe(text)
    assert tokenizer.decode(ids) == text


def test_directory_encoding_merges_and_keeps_endoftext_at_its_vocab_id(tmp_path):
    tokenizer = data.get_tokenizer(write_tokenizer(tmp_path))
    vocab = gpt2_vocab(MERGES)
    assert tokenizer.encode_ordinary(" the") == [vocab["Ġthe"]]                 # two merges deep
    assert tokenizer.encode_ordinary("é") == [vocab["Ã©"]]
    assert tokenizer.n_vocab == 256 + len(MERGES) + 1 and tokenizer.eot_token == vocab[data.EOT] == 268
    assert tokenizer.encode("a<|endoftext|>", allowed_special={data.EOT}) == [vocab["a"], 268]


def test_base_config_names_the_directory_and_falls_back_without_merges(tmp_path, monkeypatch):
    write_hf_checkpoint(GPT(GPTConfig(block_size=8, vocab_size=data.VOCAB_SIZE, n_layer=1, n_head=1, n_embd=8)),
                        tmp_path / "gpt2")
    write_tokenizer(tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert base_config("gpt2")[1] == str(tmp_path / "gpt2")    # a path, never mistaken for tiktoken's 'gpt2'
    os.remove(tmp_path / "gpt2" / "merges.txt")
    assert base_config("gpt2")[1] == data.DEFAULT_TOKENIZER    # as before: its vocabulary is this project's size


@pytest.mark.parametrize("name, content, message", [
    ("merges.txt", "#version: 0.2\nh e\nh e r\n", "merges.txt:3: expected two GPT-2 tokens separated by one space"),
    ("merges.txt", "#version: 0.2\nh e\na \t\n", "merges.txt:3: expected two GPT-2 tokens"),   # a tab: no byte's spelling
    ("merges.txt", b"h e\n\xff\n", "merges.txt: not UTF-8 text"),
    ("vocab.json", None, "vocab.json not found: expected GPT-2's tokenizer files vocab.json and merges.txt"),
    ("vocab.json", "{\n1", "vocab.json:2: invalid JSON"),
    ("vocab.json", '{"a": "1"}', "vocab.json: expected one JSON object of token: integer id"),
    ("vocab.json", json.dumps(gpt2_vocab(MERGES[::-1])), "vocab.json: token 'he' has id 267, but merges.txt puts it "
                                                         "at rank 256"),
    ("vocab.json", json.dumps(gpt2_vocab(MERGES) | {"xyz": 269}), "vocab.json: token 'xyz' is made by no merge"),
    ("vocab.json", json.dumps(gpt2_vocab(MERGES) | {data.EOT: 3}), "vocab.json: expected <|endoftext|> with an id"),
], ids=["three-tokens", "a-tab", "not-utf8", "no-vocab", "bad-json", "string-id", "ranks-disagree", "extra-token",
        "eot-among-ranks"])
def test_a_malformed_tokenizer_file_is_one_line_naming_it(tmp_path, name, content, message):
    directory = write_tokenizer(tmp_path)
    path = tmp_path / name
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        data.get_tokenizer(directory)
    assert str(excinfo.value).startswith(str(path)) and message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_a_gpt2_directory_trains_samples_and_exports_without_a_download(tmp_path, monkeypatch, capsys):
    def no_download(name):
        raise AssertionError(f"tiktoken.get_encoding({name!r}) called: it would download")
    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    torch.manual_seed(0)
    write_hf_checkpoint(GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32)), tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    data.write_jsonl(ROWS, tmp_path / "sft.jsonl")
    train_sft.train(train_sft.defaults | dict(
        base=str(tmp_path / "hf"), data=str(tmp_path / "sft.jsonl"), out_dir=str(tmp_path / "sft"), n_members=2,
        lora_rank=4, max_iters=2, batch_size=4, eval_interval=2, max_new_tokens=2, device="cpu"))
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path / 'sft'}", "--prompt=Q: What is 1 plus 1?\\nA:", "--json=true",
                 "--max_new_tokens=2", "--device=cpu"])
    assert len(capsys.readouterr().out.splitlines()) == 1
    model, tokenizer_name, _ = load_ensemble(str(tmp_path / "sft" / "ckpt.pt"))
    assert tokenizer_name == str(tmp_path / "hf")
    export_peft(model, 0, str(tmp_path / "peft"), base_model_name_or_path=str(tmp_path / "hf"))
    assert os.path.isfile(tmp_path / "peft" / "adapter_config.json")
