"""Tests for pretrain.py: a tiny seeded run lowers the loss from its ln(vocab) start and saves a loadable checkpoint;
its defaults are the model shape trainer.py assumes for out/base.pt; the tokenizer training (BPE) by hand."""
import math
import os

import dataclasses

import pytest
import tiktoken
import torch

import data
import pretrain
import trainer
from model import GPT, GPTConfig


def tiny_config(tmp_path):
    text_path = tmp_path / "text.txt"
    text_path.write_text(pretrain.pretrain_text(seed=0, n_documents=300), encoding="utf-8")
    return pretrain.defaults | dict(data=str(text_path), out_path=str(tmp_path / "base.pt"), n_layer=1, n_head=2,
                                    n_embd=32, block_size=32, max_iters=30, warmup_iters=5, batch_size=8,
                                    eval_iters=2, log_interval=1000, device="cpu")


def test_tiny_pretrain_lowers_loss_and_saves_a_loadable_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    tokenizer = data.get_tokenizer(config["tokenizer"])
    _, val_tokens = pretrain.load_tokens(config, tokenizer)
    torch.manual_seed(config["seed"])  # the same initial weights pretrain() starts from
    initial = GPT(GPTConfig(block_size=32, vocab_size=tokenizer.n_vocab, n_layer=1, n_head=2, n_embd=32))
    initial_loss = pretrain.estimate_loss(initial, val_tokens, config)
    assert initial_loss == pytest.approx(math.log(data.VOCAB_SIZE), abs=0.1)  # near-uniform at init

    checkpoint = pretrain.pretrain(config)
    assert checkpoint["val_loss"] < initial_loss - 1.0

    saved = torch.load(config["out_path"], map_location="cpu", weights_only=True)
    assert {"config", "model", "tokenizer", "val_loss"} <= saved.keys()
    assert saved["tokenizer"] == data.DEFAULT_TOKENIZER and saved["val_loss"] == checkpoint["val_loss"]
    assert not os.path.exists(config["out_path"] + ".tmp")
    model = GPT(GPTConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    assert pretrain.estimate_loss(model, val_tokens, config) == pytest.approx(saved["val_loss"], abs=1e-5)


def test_text_too_short_for_block_size_is_rejected(tmp_path):
    config = tiny_config(tmp_path)
    (tmp_path / "short.txt").write_text("The capital of France is Paris.", encoding="utf-8")
    config["data"] = str(tmp_path / "short.txt")
    with pytest.raises(ValueError, match="tokens is too short for block_size 32"):
        pretrain.load_tokens(config, data.get_tokenizer())


def test_defaults_are_the_shape_trainer_assumes_before_the_base_exists(tmp_path, monkeypatch):
    """trainer.base_config reads a not-yet-pretrained default base as pretrain.py's defaults will make it."""
    monkeypatch.chdir(tmp_path)                                  # no out/base.pt here
    config, tokenizer = trainer.base_config(trainer.DEFAULT_BASE)
    expected = pretrain.model_config(pretrain.defaults, data.get_tokenizer(pretrain.defaults["tokenizer"]).n_vocab)
    assert dataclasses.asdict(config) == dataclasses.asdict(expected)
    assert tokenizer == pretrain.defaults["tokenizer"] and trainer.DEFAULT_BASE == pretrain.defaults["out_path"]


def test_train_bpe_merges_most_frequent_pairs_first():
    # pieces "ab" x1 and " ab" x2: (a, b) occurs 3 times -> rank 256; then (" ", ab) twice -> rank 257
    ranks = pretrain.train_bpe("ab ab ab", vocab_size=259)
    assert ranks == {bytes([b]): b for b in range(256)} | {b"ab": 256, b" ab": 257}


def test_train_bpe_ranks_round_trip_through_file_and_tiktoken(tmp_path):
    text = "\n".join(pretrain.fact_sentences()[:300])
    ranks = pretrain.train_bpe(text, vocab_size=320)
    assert len(ranks) == 319 and sorted(ranks.values()) == list(range(319))
    path = str(tmp_path / "ranks.tiktoken")
    pretrain.save_ranks(ranks, path)
    assert data.load_ranks(path) == ranks
    tokenizer = tiktoken.Encoding(name="tiny", pat_str=data.PATTERN, mergeable_ranks=ranks,
                                  special_tokens={data.EOT: len(ranks)})
    for sample in [text, "naïve café 😀 — 日本語", "tabs\tand  spaces\n\nnewlines"]:
        ids = tokenizer.encode_ordinary(sample)
        assert tokenizer.decode(ids) == sample
    assert len(tokenizer.encode_ordinary(text)) < 0.6 * len(text.encode("utf-8"))  # 63 merges nearly halve it




def test_train_tokenizer_learns_the_shipped_ranks_again_into_out_dir(tmp_path, capsys):
    """The shipped renyi_bpe.tiktoken is what the world's text trains; the command writes beside --out_path only."""
    pretrain.main(["--train_tokenizer=true", f"--out_path={tmp_path / 'base.pt'}"])
    assert (tmp_path / "renyi_bpe.tiktoken").read_bytes() == open(data.RANKS_PATH, "rb").read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["renyi_bpe.tiktoken"]
