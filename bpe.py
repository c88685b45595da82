"""
The tokenizers, byte-level BPE as tiktoken runs it: the ranks this project ships (renyi_bpe.tiktoken, learned
by `python pretrain.py --train_tokenizer=true`), tiktoken's own 'gpt2', or the tokenizer files a Hugging Face
GPT-2 directory holds (vocab.json and merges.txt), read and checked here so that no download is needed.
"""
import base64
import functools
import json
import os

import tiktoken

from config import UserError

DEFAULT_TOKENIZER = "renyi-bpe"
RANKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "renyi_bpe.tiktoken")
VOCAB_SIZE = 1024  # 256 bytes + 767 merges + <|endoftext|>: small enough for a CPU model's embedding
EOT = "<|endoftext|>"
# Pre-tokenisation, GPT-2 style: merges never cross these pieces. Digits stay
# single so that arithmetic sees one token per digit. Written so that Python's
# re (pretrain.train_bpe) and tiktoken's regex engine (encoding) split text identically.
PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d| ?[^\s\w]+|_+|\s+(?!\S)|\s+"""


def load_ranks(path):
    """Read a ranks file (pretrain.save_ranks's format, tiktoken's) back into {token bytes: rank}."""
    with open(path) as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


# A Hugging Face GPT-2 directory brings its tokenizer in these two files: vocab.json maps each token, spelt in
# gpt2_byte_characters, to its id; merges.txt lists the merges in the order they were learned.
GPT2_FILES = ("vocab.json", "merges.txt")
# GPT-2's pre-tokenisation, as tiktoken's 'gpt2' encoding splits text (tests compare it with tiktoken's own).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_byte_characters():
    """{character: byte} of the 256 characters by which GPT-2's files spell bytes, in the bytes' rank order.

    The 188 printable bytes stand for themselves ('!' is rank 0); the other 68 (controls, space, ...) shift
    to chr(256), chr(257), ... in byte order, so a token never holds whitespace and a file line splits on ' '.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + n): byte for n, byte in enumerate(others)}


def read_text(path):
    """The UTF-8 text of a tokenizer file the user's directory holds; UserError naming it otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path} not found: expected GPT-2's tokenizer files {' and '.join(GPT2_FILES)}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def read_gpt2_merges(path, characters):
    """The merges of a GPT-2 merges.txt in rank order, as (first, second) strings: after an optional
    '#version' line, one pair a line, separated by one space; every character one of `characters`."""
    merges, allowed = [], set(characters) | {" "}
    for line_number, line in enumerate(read_text(path).split("\n"), 1):
        if not line or (line_number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair) or not set(line) <= allowed:
            raise UserError(f"{path}:{line_number}: expected two GPT-2 tokens separated by one space, got {line!r}")
        merges.append(tuple(pair))
    return merges


def read_gpt2_vocab(path):
    """The {token: id} of a GPT-2 vocab.json (one JSON object)."""
    try:
        vocab = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(vocab, dict) or not all(type(value) is int for value in vocab.values()):
        raise UserError(f"{path}: expected one JSON object of token: integer id")
    return vocab


def check_gpt2_vocab(vocab, tokens, path):
    """vocab (vocab.json at path) must give token i of `tokens` the id i, and <|endoftext|> an id after them."""
    for rank, token in enumerate(tokens):
        if vocab.get(token) != rank:
            raise UserError(f"{path}: token {token!r} has id {vocab.get(token)}, but merges.txt puts it at rank "
                            f"{rank}: the two files are not one GPT-2 tokenizer")
    extra = sorted(set(vocab) - set(tokens) - {EOT})
    if extra:
        raise UserError(f"{path}: token {extra[0]!r} is made by no merge of merges.txt")
    if vocab.get(EOT, -1) < len(tokens):
        raise UserError(f"{path}: expected {EOT} with an id of {len(tokens)} or more, after the bytes and merges")


def gpt2_encoding(directory):
    """The tiktoken.Encoding of the GPT-2 tokenizer files in directory, checked: its ranks are vocab.json's ids.

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank, so a token's rank must be its
    merge's place: the 256 bytes first, then merge i's token at 256 + i, as GPT-2's ids are; <|endoftext|> after.
    """
    vocab_path, merges_path = (os.path.join(directory, name) for name in GPT2_FILES)
    characters = gpt2_byte_characters()
    tokens = [*characters, *(first + second for first, second in read_gpt2_merges(merges_path, characters))]
    vocab = read_gpt2_vocab(vocab_path)
    check_gpt2_vocab(vocab, tokens, vocab_path)
    ranks = {bytes(characters[c] for c in token): rank for rank, token in enumerate(tokens)}  # GPT-2's spelling undone
    return tiktoken.Encoding(name=directory, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: vocab[EOT]})


@functools.lru_cache(maxsize=None)
def get_tokenizer(name=DEFAULT_TOKENIZER):
    """Return the tiktoken.Encoding called `name`: the shipped 'renyi-bpe', tiktoken's 'gpt2', or the GPT-2
    tokenizer whose vocab.json and merges.txt are in the directory `name` (a Hugging Face GPT-2 directory)."""
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as error:  # tiktoken downloads the GPT-2 files on first use
            raise UserError(f"tokenizer gpt2: tiktoken could not load its GPT-2 files ({type(error).__name__}); it "
                            "downloads them on first use, so offline set TIKTOKEN_CACHE_DIR to a directory filled by "
                            "tiktoken.get_encoding('gpt2') on a machine online, under the same variable") from None
    if name == DEFAULT_TOKENIZER:
        ranks = load_ranks(RANKS_PATH)
        return tiktoken.Encoding(name=name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    if os.path.isdir(name):
        return gpt2_encoding(name)
    raise UserError(f"tokenizer {name}: unknown; expected {DEFAULT_TOKENIZER}, gpt2 or a directory holding "
                    f"{' and '.join(GPT2_FILES)}")
