"""
Pretrain the small base GPT that the LoRA adapters sit on: all parameters, no
adapters, next-token prediction on plain text. Its text and its tokenizer come from here too.

    python pretrain.py                       # the benchmark world's text -> out/base.pt
    python pretrain.py --data=text.txt       # your own UTF-8 text file
    python pretrain.py --max_iters=50 --n_layer=2 --n_embd=32   # a quick smoke run
    python pretrain.py --train_tokenizer=true   # learn the BPE ranks again into out/ (the shipped renyi_bpe.tiktoken)

The defaults finish in under 3 minutes on 2 CPU cores. The checkpoint holds the
model config, the weights, the tokenizer name and the validation loss reached.
The default model shape is model.GPTConfig's, which trainer.py assumes for out/base.pt
before this script has made it.
"""

import base64
import dataclasses
import itertools
import os
import random
import re
import time
from collections import Counter

import torch
import torch.nn.functional as F

import data
from benchmark import (ANIMALS, CATEGORIES, COUNTRIES, DAYS, NUMBER_WORDS, OPPOSITES, RHYMES, article, parity,
                       upper_first)
from config import UserError, parse_args, run_script, to_device
from model import GPT, GPTConfig
from trainer import check_settings, format_seconds, save_atomically, set_precision, train_loop

defaults = dict(
    data='',                # '' is the benchmark world's text (benchmark.pretrain_text); else a UTF-8 text file
    out_path='out/base.pt',
    tokenizer=data.DEFAULT_TOKENIZER,  # or 'gpt2', which needs tiktoken's GPT-2 files on disk
    # model: 4 layers of width 128 learn the world's facts in a few hundred steps on a CPU
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=128,         # also the longest SFT example (prompt + response) the adapters can train on
    dropout=0.0,
    bias=True,
    # optimisation: AdamW, linear warm-up then cosine decay to min_lr
    max_iters=600,
    batch_size=32,
    learning_rate=3e-3,     # tiny models tolerate a high rate; the warm-up keeps the first steps stable
    min_lr=3e-4,
    warmup_iters=50,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,
    # evaluation and logging
    val_fraction=0.1,       # the last tenth of the token stream is held out
    eval_iters=20,
    log_interval=50,
    seed=1337,
    device='cuda' if torch.cuda.is_available() else 'cpu',
    dtype='auto',           # of the forward pass (autocast): float32, bfloat16 or float16; 'auto' is bfloat16 on a
                            # CUDA device that has it, else float32. The weights and AdamW's state stay float32
    compile=False,          # torch.compile the training step's forward; the first steps wait for the compiler
    train_tokenizer=False,  # instead of pretraining: learn the ranks of renyi_bpe.tiktoken again, into out/
)


# -----------------------------------------------------------------------------
# the pretraining text: the benchmark world's facts in many phrasings

def fact_sentences():
    """Every fact of the world as a few sentences, the raw material of the pretraining text.

    Plain statements (some with commas), question-answer lines and "Key: Value."
    records, so the base model has seen facts asked about and written in several
    styles, but never the benchmark's own questions.
    """
    sentences = []
    for country, capital, continent in COUNTRIES:
        sentences += [f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}.",
                      f"{country} is a country in {continent}.", f"{capital} is a city in {continent}.",
                      f"Q: Which city is the capital of {country}?\nA: {capital}.",
                      f"Q: Where is {country}?\nA: {country} is in {continent}.",
                      f"Country: {country}. Capital: {capital}. Continent: {continent}.",
                      f"In {continent}, the capital of {country} is {capital}.", f"{country}, {capital}, {continent}."]
    for animal, sound, legs in ANIMALS:
        sentences += [f"{upper_first(article(animal))} says {sound}.", f"The {animal} goes {sound}.",
                      f"{upper_first(article(animal))} has {legs} legs.",
                      f"{upper_first(article(animal))} has {NUMBER_WORDS[legs]} legs.",
                      f"Q: What does {article(animal)} say?\nA: It says {sound}.",
                      f"Animal: {animal.title()}. Sound: {sound.title()}. Legs: {legs}.",
                      f"The {animal} says {sound}, and it has {NUMBER_WORDS[legs]} legs."]
    for a, b in itertools.product(range(10), repeat=2):
        sentences += [f"{a} plus {b} is {a + b}.", f"{a} plus {b} equals {a + b}.",
                      f"{upper_first(NUMBER_WORDS[a])} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.",
                      f"Q: How much is {a} plus {b}?\nA: {a + b}.",
                      f"Take {NUMBER_WORDS[a]}, add {NUMBER_WORDS[b]}, and you get {NUMBER_WORDS[a + b]}.",
                      f"Numbers: {a} and {b}. Sum: {a + b}."]
    for n, word in enumerate(NUMBER_WORDS):
        sentences += [f"{n} is written {word}.", f"{n} is an {parity(n)} number.",
                      f"Number: {n}. Word: {word.title()}. Parity: {parity(n).title()}.",
                      f"{upper_first(word)} is an {parity(n)} number."]
    for word, opposite in OPPOSITES:
        sentences += [f"The opposite of {word} is {opposite}.", f"The opposite of {opposite} is {word}.",
                      f"{upper_first(word)} and {opposite} are opposites."]
    for category, members in CATEGORIES.items():
        for member in members:
            sentences += [f"{upper_first(article(member))} is {article(category)}." if category in ("fruit",
                          "vegetable", "animal") else f"{upper_first(member)} is {article(category)}.",
                          f"{upper_first(member)} starts with the letter {member[0].lower()}."]
    for family in RHYMES:
        for word, other in itertools.permutations(family, 2):
            sentences.append(f"{upper_first(word)} rhymes with {other}.")
    for day, next_day in zip(DAYS, DAYS[1:] + DAYS[:1]):
        sentences += [f"{next_day} comes after {day}.", f"After {day} comes {next_day}.",
                      f"{day} is a day of the week.", f"First {day}, then {next_day}."]
    return sentences


def pretrain_text(seed=0, n_documents=20_000):
    """The base model's training text: documents of 3 to 10 random world facts, separated by <|endoftext|>.

    A tenth of the sentences are lowercased with a "!" ending, so the casual
    persona's words are familiar to the base model too.
    """
    rng = random.Random(seed)
    sentences = fact_sentences()
    documents = []
    for _ in range(n_documents):
        chosen = rng.choices(sentences, k=rng.randint(3, 10))
        chosen = [s.lower()[:-1] + "!" if rng.random() < 0.1 and s.endswith(".") else s for s in chosen]
        documents.append("\n".join(chosen))
    return data.EOT.join(documents)


# -----------------------------------------------------------------------------
# the tokenizer: byte-level BPE learned from that text (data.py loads the result)

def merge(word, left, right):
    """Replace every adjacent (left, right) in the list of byte strings `word` by left + right."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            merged.append(left + right)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def train_bpe(text, vocab_size=data.VOCAB_SIZE):
    """Learn byte-level BPE ranks {token bytes: rank} from `text` by counting.

    Start from the 256 single bytes; repeatedly merge the most frequent adjacent
    pair (counted over distinct pieces, weighted by how often each occurs) until
    there are vocab_size - 1 tokens, leaving the last id for <|endoftext|>.
    """
    piece_counts = Counter(re.findall(data.PATTERN, text))
    pieces = [[bytes([b]) for b in piece.encode("utf-8")] for piece in piece_counts]
    counts = list(piece_counts.values())
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - 1:
        pairs = Counter()
        for piece, count in zip(pieces, counts):
            for pair in zip(piece, piece[1:]):
                pairs[pair] += count
        if not pairs:
            break
        left, right = max(pairs, key=pairs.get)  # ties: first seen, so deterministic
        ranks.setdefault(left + right, len(ranks))
        pieces = [merge(piece, left, right) for piece in pieces]
    return ranks


def save_ranks(ranks, path):
    """Write ranks in tiktoken's file format: one `base64(token) rank` per line."""
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


# -----------------------------------------------------------------------------
# pretraining


def load_tokens(config, tokenizer):
    """The token stream of the training text, split into train and validation parts (1-D LongTensors)."""
    if config['data']:
        if not os.path.isfile(config['data']):
            raise UserError(f"--data={config['data']} not found: expected a UTF-8 text file")
        try:
            with open(config['data'], encoding='utf-8') as f:
                text = f.read()
        except UnicodeDecodeError as error:
            raise UserError(f"--data={config['data']}: not UTF-8 text (byte {error.start})") from None
    else:
        text = pretrain_text(seed=0)
    # <|endoftext|> in the text separates documents, as in GPT-2's training data
    tokens = torch.tensor(tokenizer.encode(text, allowed_special={data.EOT}), dtype=torch.long)
    n_val = int(len(tokens) * config['val_fraction'])
    if len(tokens) - n_val <= config['block_size'] or n_val <= config['block_size']:
        raise UserError(f"{config['data'] or 'pretraining text'}: {len(tokens)} tokens is too short for "
                         f"block_size {config['block_size']} with val_fraction {config['val_fraction']}")
    return tokens[:-n_val], tokens[-n_val:]


def get_batch(tokens, batch_size, block_size, generator):
    """Random windows of the stream: inputs x (B, T) and next-token targets y (B, T)."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size)                                                  # (T,)
    x = tokens[starts[:, None] + offsets]                                               # (B, T)
    y = tokens[starts[:, None] + offsets + 1]                                           # (B, T)
    return x, y


def random_windows(tokens, batch_size, block_size, generator):
    """get_batch forever: the pretraining batches."""
    while True:
        yield get_batch(tokens, batch_size, block_size, generator)


def lm_loss(model, x, y):
    """Mean next-token cross-entropy of model on inputs x (B, T) with targets y (B, T)."""
    logits = model(x)                                                                   # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def estimate_loss(model, tokens, config):
    """Mean loss over eval_iters batches drawn with a fixed seed, so every estimate sees the same windows."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(config['eval_iters']):
        x, y = get_batch(tokens, config['batch_size'], config['block_size'], generator)
        losses.append(lm_loss(model, x.to(config['device']), y.to(config['device'])).item())
    model.train()
    return sum(losses) / len(losses)


def make_optimizer(model, config):
    """AdamW with weight decay on matrices only; biases and LayerNorm gains (1-D) are not shrunk towards 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=config['weight_decay']),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=config['learning_rate'], betas=(config['beta1'], config['beta2']),
                             fused=config['device'].startswith('cuda'))   # CUDA: one kernel for all


def model_config(config, vocab_size):
    """The GPTConfig of the base that `config` pretrains, for a tokenizer of vocab_size tokens."""
    return GPTConfig(block_size=config['block_size'], vocab_size=vocab_size, n_layer=config['n_layer'],
                     n_head=config['n_head'], n_embd=config['n_embd'], dropout=config['dropout'], bias=config['bias'])


def pretrain(config):
    """Train a GPT from scratch per config, save it to config['out_path'] and return the checkpoint dict."""
    t_start = time.time()
    check_settings(config, positive=('n_layer', 'n_head', 'n_embd', 'block_size', 'eval_iters'))
    torch.manual_seed(config['seed'])
    tokenizer = data.get_tokenizer(config['tokenizer'])
    train_tokens, val_tokens = load_tokens(config, tokenizer)
    if config['n_embd'] % config['n_head']:
        raise UserError(f"--n_embd={config['n_embd']} must be a multiple of --n_head={config['n_head']}")
    base_config = model_config(config, tokenizer.n_vocab)
    model = set_precision(GPT(base_config), config).to(config['device'])
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config['seed'])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, {len(train_tokens)} training tokens, "
          f"{config['max_iters'] * config['batch_size'] * config['block_size']} tokens to see")

    def batch_loss(forward, batch, it):
        return lm_loss(forward, *to_device(batch, config['device']))

    windows = random_windows(train_tokens, config['batch_size'], config['block_size'], generator)
    train_loop(model, list(model.parameters()), optimizer, windows, batch_loss, config, history=dict(iter=[], loss=[]))

    val_loss = estimate_loss(model, val_tokens, config)
    checkpoint = dict(config=dataclasses.asdict(base_config), model=model.state_dict(),
                      tokenizer=config['tokenizer'], val_loss=val_loss, pretrain_config=config)
    save_atomically(checkpoint, config['out_path'])
    print(f"val loss {val_loss:.4f}; saved {config['out_path']} after {format_seconds(time.time() - t_start)}")
    return checkpoint


def main(argv):
    config = parse_args(defaults, argv)
    if config['train_tokenizer']:
        path = os.path.join(os.path.dirname(config['out_path']) or '.', os.path.basename(data.RANKS_PATH))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_ranks(train_bpe(pretrain_text(seed=0)), path)
        print(f"wrote {path}; the shipped {data.RANKS_PATH} is this file when the text has not changed")
        return
    pretrain(config)


if __name__ == '__main__':
    run_script(main)
