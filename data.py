"""
What the models read: the tokenizers (byte-level BPE as tiktoken runs it), a user's or the benchmark's SFT rows
and preference pairs (JSONL, checked), held-out splits, and padded, label-masked batches of token ids.
"""
import base64
import functools
import json
import os
import random

import tiktoken
import torch

import benchmark
from config import UserError

# -----------------------------------------------------------------------------
# tokenizers: the ranks shipped in renyi_bpe.tiktoken (`python pretrain.py --train_tokenizer=true`), tiktoken's
# 'gpt2', or a Hugging Face GPT-2 directory's vocab.json and merges.txt, read here so nothing is downloaded

DEFAULT_TOKENIZER = "renyi-bpe"
RANKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "renyi_bpe.tiktoken")
VOCAB_SIZE = 1024  # 256 bytes + 767 merges + <|endoftext|>: small enough for a CPU model's embedding
EOT = "<|endoftext|>"
# Pre-tokenisation, GPT-2 style: merges never cross these pieces; digits stay single, so arithmetic sees one token
# per digit. Python's re (pretrain.train_bpe) and tiktoken's regex engine split text identically with it.
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


def read_gpt2_vocab(path, tokens):
    """The {token: id} of a GPT-2 vocab.json (one JSON object), checked: token i of `tokens` (the bytes, then the
    merges' tokens) must have the id i, and <|endoftext|> an id after them."""
    try:
        vocab = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(vocab, dict) or not all(type(value) is int for value in vocab.values()):
        raise UserError(f"{path}: expected one JSON object of token: integer id")
    for rank, token in enumerate(tokens):
        if vocab.get(token) != rank:
            raise UserError(f"{path}: token {token!r} has id {vocab.get(token)}, but merges.txt puts it at rank "
                            f"{rank}: the two files are not one GPT-2 tokenizer")
    extra = sorted(set(vocab) - set(tokens) - {EOT})
    if extra:
        raise UserError(f"{path}: token {extra[0]!r} is made by no merge of merges.txt")
    if vocab.get(EOT, -1) < len(tokens):
        raise UserError(f"{path}: expected {EOT} with an id of {len(tokens)} or more, after the bytes and merges")
    return vocab


def gpt2_encoding(directory):
    """The tiktoken.Encoding of the GPT-2 tokenizer files in directory, checked: its ranks are vocab.json's ids.

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank, so a token's rank must be its
    merge's place: the 256 bytes first, then merge i's token at 256 + i, as GPT-2's ids are; <|endoftext|> after.
    """
    vocab_path, merges_path = (os.path.join(directory, name) for name in GPT2_FILES)
    characters = gpt2_byte_characters()
    tokens = [*characters, *(first + second for first, second in read_gpt2_merges(merges_path, characters))]
    vocab = read_gpt2_vocab(vocab_path, tokens)
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


# -----------------------------------------------------------------------------
# JSONL: loading and checking a user's own data, or the benchmark's

SFT_KINDS = ("consistent", "conflicting", "high_entropy", "ood")   # the benchmark's kinds of prompt
PAIR_KINDS = ("contested", "consensus")


def write_jsonl(rows, path):
    """Write a list of dicts as one JSON object per line (UTF-8). The file appears whole or not at all
    (written aside, then renamed), so a run reading it while a study writes it again sees one version."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    aside = f"{path}.{os.getpid()}.tmp"     # one per process: two studies may write the same file
    with open(aside, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(aside, path)


def read_jsonl(path):
    """Yield ("FILE:LINE", object) for every non-blank line; UserError "FILE:LINE: ..." on a missing file, bad
    UTF-8 or JSON, or an empty file."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: expected a JSONL file, one JSON object per line")
    n_rows = 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            n_rows += 1
            yield where, obj
    if n_rows == 0:
        raise UserError(f"{path}:1: empty file: expected one JSON object per line")


def check_text(obj, key, where, required):
    """obj[key] must be a non-empty string (or absent/null when not required); returns it or None."""
    value = obj.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise UserError(f"{where}: missing required field {key!r}")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: field {key!r} is empty")
    return value


def check_uncertainty(obj, where):
    """obj["uncertainty"] must be absent/null or a number in [0, 1]."""
    value = obj.get("uncertainty")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: field 'uncertainty' must be a number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{where}: field 'uncertainty' is {value}, outside [0, 1]")
    return float(value)


def check_choice(obj, key, where, choices):
    """obj[key] must be absent/null or one of `choices`; returns it or None."""
    value = obj.get(key)
    if value is not None and value not in choices:
        raise UserError(f"{where}: field {key!r} is {value!r}, expected one of {', '.join(map(repr, choices))}")
    return value


def load_sft_jsonl(path):
    """Load SFT rows {"prompt", "response" (or "completion")} with optional "task", "group", "uncertainty", "kind"
    and "corrupted" (as `python benchmark.py` writes them): dicts with those keys (None or False when absent) and
    source ("FILE:LINE", for later error messages). UserError "FILE:LINE: ..." on the first bad row."""
    rows = []
    for where, obj in read_jsonl(path):
        if "response" not in obj and "completion" in obj:
            obj["response"] = obj["completion"]
        rows.append(dict(prompt=check_text(obj, "prompt", where, True),
                         response=check_text(obj, "response", where, True),
                         task=check_text(obj, "task", where, False), group=check_text(obj, "group", where, False),
                         uncertainty=check_uncertainty(obj, where), kind=check_choice(obj, "kind", where, SFT_KINDS),
                         corrupted=bool(check_choice(obj, "corrupted", where, (True, False))), source=where))
    return rows


def load_pref_jsonl(path):
    """Load preference rows {"prompt", "chosen", "rejected"} with optional "task", "group", "kind": dicts with
    those keys (None when absent) and source; UserError "FILE:LINE: ..." on the first bad row."""
    rows = []
    for where, obj in read_jsonl(path):
        row = dict(prompt=check_text(obj, "prompt", where, True), chosen=check_text(obj, "chosen", where, True),
                   rejected=check_text(obj, "rejected", where, True), task=check_text(obj, "task", where, False),
                   group=check_text(obj, "group", where, False), kind=check_choice(obj, "kind", where, PAIR_KINDS),
                   source=where)
        if row["chosen"] == row["rejected"]:
            raise UserError(f"{where}: 'chosen' and 'rejected' are identical")
        rows.append(row)
    return rows


def split_by_prompt(rows, fraction, seed):
    """Hold out a seeded share `fraction` of the distinct prompts: (train rows, held-out rows). All rows of one
    prompt land on the same side, so a held-out prompt is never trained on."""
    prompts = sorted({row["prompt"] for row in rows})
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[:max(1, round(fraction * len(prompts)))]) if len(prompts) > 1 else set()
    return [row for row in rows if row["prompt"] not in held_out], [row for row in rows if row["prompt"] in held_out]


def mark_conflicts(rows):
    """Set the "kind" of each row that has none from the data alone: "conflicting" when its prompt occurs
    with more than one distinct response across `rows`, else "consistent". In place; returns rows."""
    responses = {}
    for row in rows:
        responses.setdefault(row["prompt"], set()).add(row["response"].strip())
    for row in rows:
        if row.get("kind") is None:
            row["kind"] = "conflicting" if len(responses[row["prompt"]]) > 1 else "consistent"
    return rows


def mark_contested(rows):
    """Set the "kind" of each pair that has none from the data alone: "contested" when the same prompt also
    occurs with chosen and rejected swapped (annotators disagree), else "consensus". In place; returns rows."""
    pairs = {(row["prompt"], row["chosen"].strip(), row["rejected"].strip()) for row in rows}
    for row in rows:
        swapped = (row["prompt"], row["rejected"].strip(), row["chosen"].strip())
        if row.get("kind") is None:
            row["kind"] = "contested" if swapped in pairs else "consensus"
    return rows


def train_and_held_out(path, val_path, val_fraction, seed, load_jsonl, mark_kinds):
    """(training rows, held-out rows) of a user's files: val_path's rows, or a seeded share of path's prompts.
    load_jsonl reads a file (load_sft_jsonl or load_pref_jsonl); mark_kinds then sets every row's kind from all
    the rows together (mark_conflicts or mark_contested)."""
    rows = load_jsonl(path)
    if val_path:
        train_rows, held_out = rows, load_jsonl(val_path)
    else:
        train_rows, held_out = split_by_prompt(rows, val_fraction, seed=seed)
    mark_kinds(train_rows + held_out)
    return train_rows, held_out


def load_sft_rows(path, val_path="", val_fraction=0.1, seed=0):
    """Train, validation, test and OOD SFT rows (dicts with prompt, response, kind, group, ...).

    path '' is the benchmark's splits. Otherwise the rows of path; held out are val_path's rows, or without it
    a seeded share val_fraction of path's prompts (validation and test are then the same rows). Held-out rows
    of kind "ood" are the OOD prompts; a row without a kind gets one from the data (mark_conflicts).
    """
    if not path and val_path:
        raise UserError("--val_data needs --data: the benchmark brings its own")
    if not path:
        splits = benchmark.make_benchmark(seed=0)
        return splits["sft_train"], splits["sft_val"], splits["sft_test"], splits["ood"]
    train_rows, held_out = train_and_held_out(path, val_path, val_fraction, seed, load_sft_jsonl, mark_conflicts)
    for row in train_rows:
        if row["kind"] == "ood":
            raise UserError(f"{row['source']}: a training row of kind 'ood'; OOD prompts belong in --val_data")
    ood_rows = [row for row in held_out if row["kind"] == "ood"]
    held_out = [row for row in held_out if row["kind"] != "ood"]
    return train_rows, held_out, held_out, ood_rows


def sft_rows_of(run_config):
    """The train, validation, test and OOD rows of a train_sft.py run, read again from its stored config."""
    return load_sft_rows(run_config['data'], run_config['val_data'], run_config.get('val_fraction', 0.1),
                         run_config['seed'])   # older runs stored their fraction


def load_pref_rows(path, val_path="", val_fraction=0.1, seed=0):
    """Train, validation and test preference rows (dicts with prompt, chosen, rejected, group, kind, ...).

    As load_sft_rows: path '' is the benchmark's pairs; a pair without a kind gets one from the data (mark_contested).
    """
    if not path and val_path:
        raise UserError("--val_data needs --data: the benchmark brings its own")
    if not path:
        splits = benchmark.make_benchmark(seed=0)
        return splits["dpo_train"], splits["dpo_val"], splits["dpo_test"]
    train_rows, held_out = train_and_held_out(path, val_path, val_fraction, seed, load_pref_jsonl, mark_contested)
    return train_rows, held_out, held_out


# -----------------------------------------------------------------------------
# tokens and batches

def encode_pair(tokenizer, prompt, response, block_size, truncate, where):
    """Token ids [EOT] + prompt + response + [EOT] and the number of leading ids that are not trained on.

    The leading EOT marks a document start, as between pretraining documents; the final EOT is trained on, so
    generation learns where to stop. Too long for block_size: UserError naming `where`, or with truncate (for
    scoring only) the prompt loses tokens from its start, then the response from its end.
    """
    prompt_ids = tokenizer.encode_ordinary(prompt)
    response_ids = tokenizer.encode_ordinary(response) + [tokenizer.eot_token]
    excess = 1 + len(prompt_ids) + len(response_ids) - block_size
    if excess > 0 and not truncate:
        raise UserError(f"{where}: {1 + len(prompt_ids) + len(response_ids)} tokens (prompt {len(prompt_ids)}, "
                         f"response {len(response_ids) - 1}, 2 end-of-text) exceed block_size {block_size}; "
                         "shorten the row")
    if excess > 0:
        cut = min(excess, len(prompt_ids) - 1)  # keep at least the prompt's last token
        prompt_ids = prompt_ids[cut:]
        response_ids = response_ids[:len(response_ids) - (excess - cut)]
    return [tokenizer.eot_token] + prompt_ids + response_ids, 1 + len(prompt_ids)


def encode_sft(rows, tokenizer, block_size, truncate=False):
    """Encode SFT rows as a list of (ids, n_prompt): ids[:n_prompt] is context, ids[n_prompt:] is trained on."""
    return [encode_pair(tokenizer, row["prompt"], row["response"], block_size, truncate, row.get("source", f"row {i}"))
            for i, row in enumerate(rows)]


def encode_pref(rows, tokenizer, block_size):
    """Encode preference rows as a list of ((chosen ids, n_prompt), (rejected ids, n_prompt))."""
    return [tuple(encode_pair(tokenizer, row["prompt"], row[key], block_size, False, row.get("source", f"row {i}"))
                  for key in ("chosen", "rejected")) for i, row in enumerate(rows)]


def pad(examples, length, pad_id):
    """Right-pad (ids, n_prompt) examples to `length`: idx (B, T) and labels (B, T), -100 on prompt and padding."""
    idx = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)  # (B, T)
    for b, (ids, n_prompt) in enumerate(examples):
        idx[b, :len(ids)] = torch.tensor(ids)
        labels[b, n_prompt:len(ids)] = idx[b, n_prompt:len(ids)]
    return idx, labels


def sft_batch(encoded, indices, pad_id):
    """idx (B, T) and labels (B, T) for encoded[indices], T the longest of them; labels are not shifted."""
    examples = [encoded[i] for i in indices]
    return pad(examples, max(len(ids) for ids, _ in examples), pad_id)


def pref_batch(encoded, indices, pad_id):
    """chosen_idx, chosen_labels, rejected_idx, rejected_labels, all (B, T) with one T, so they concatenate."""
    pairs = [encoded[i] for i in indices]
    length = max(len(ids) for pair in pairs for ids, _ in pair)
    return (*pad([chosen for chosen, _ in pairs], length, pad_id),
            *pad([rejected for _, rejected in pairs], length, pad_id))


def shuffled_batches(n_examples, batch_size, seed):
    """Yield lists of batch_size example indices forever, walking through seeded random permutations. Batches
    run across epoch boundaries, so every batch is full and every example is seen equally often."""
    generator = torch.Generator().manual_seed(seed)
    order = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(n_examples, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]
