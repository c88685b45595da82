"""
Everything the models read: a byte-level BPE tokenizer, a small synthetic
world whose post-training data is partly contradictory (the benchmark), JSONL
loading for one's own data, and padded, label-masked batches.

The benchmark exists because the method is about data that disagrees with
itself. Its tasks come in four kinds:
- consistent: one right answer per prompt ("What is 3 plus 4?" -> " 7");
- conflicting: two annotator personas answer the same prompt in two different
  styles, each style a joint convention over two fields of the response
  ("Capital: Paris. Continent: Europe." vs "paris, in europe!"); the persona
  is the example's hidden `group`, never shown in the prompt;
- high_entropy: many acceptable answers ("Name a fruit."), the response drawn
  uniformly from them;
- ood: question kinds never used for training, for evaluation only.
Preference pairs for DPO come from the same prompts: on conflicting prompts
each persona prefers its own style ("contested"); on the others a correct
answer beats a non-answer that parrots the question ("consensus", see
preference_rows).
Every example records its `uncertainty`: log(n acceptable responses) /
log(MAX_ANSWERS), i.e. the normalised entropy of the distribution it was drawn
from (0 for consistent tasks), a stand-in for the UAL paper's estimate from a
stronger model.

Run `python data.py` to write the splits as JSONL to out/data/, and
`python data.py --train_tokenizer=true` to retrain the shipped ranks file.
"""

import base64
import functools
import itertools
import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass

import tiktoken
import torch

from config import parse_args

# -----------------------------------------------------------------------------
# tokenizer

DEFAULT_TOKENIZER = "renyi-bpe"
RANKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "renyi_bpe.tiktoken")
VOCAB_SIZE = 1024  # 256 bytes + 767 merges + <|endoftext|>: small enough for a CPU model's embedding
EOT = "<|endoftext|>"
# Pre-tokenisation, GPT-2 style: merges never cross these pieces. Digits stay
# single so that arithmetic sees one token per digit. Written so that Python's
# re (training) and tiktoken's regex engine (encoding) split text identically.
PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d| ?[^\s\w]+|_+|\s+(?!\S)|\s+"""


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


def train_bpe(text, vocab_size=VOCAB_SIZE):
    """Learn byte-level BPE ranks {token bytes: rank} from `text` by counting.

    Start from the 256 single bytes; repeatedly merge the most frequent adjacent
    pair (counted over distinct pieces, weighted by how often each occurs) until
    there are vocab_size - 1 tokens, leaving the last id for <|endoftext|>.
    """
    piece_counts = Counter(re.findall(PATTERN, text))
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


def load_ranks(path):
    """Read a file written by save_ranks back into {token bytes: rank}."""
    with open(path) as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


@functools.lru_cache(maxsize=None)
def get_tokenizer(name=DEFAULT_TOKENIZER):
    """Return the tiktoken.Encoding called `name`: the shipped 'renyi-bpe' or tiktoken's 'gpt2'."""
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as error:  # tiktoken downloads the GPT-2 files on first use
            raise RuntimeError(f"tokenizer=gpt2: tiktoken could not load its GPT-2 files ({type(error).__name__}); "
                               "they are downloaded on first use, so offline put them in TIKTOKEN_CACHE_DIR "
                               f"or use tokenizer={DEFAULT_TOKENIZER}") from None
    if name != DEFAULT_TOKENIZER:
        raise ValueError(f"unknown tokenizer {name!r}: expected {DEFAULT_TOKENIZER!r} or 'gpt2'")
    ranks = load_ranks(RANKS_PATH)
    return tiktoken.Encoding(name=name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


# -----------------------------------------------------------------------------
# the world: fixed facts, shared by the pretraining text and the benchmark

COUNTRIES = [  # (country, capital, continent)
    ("France", "Paris", "Europe"), ("Spain", "Madrid", "Europe"), ("Italy", "Rome", "Europe"),
    ("Germany", "Berlin", "Europe"), ("Portugal", "Lisbon", "Europe"), ("Greece", "Athens", "Europe"),
    ("Poland", "Warsaw", "Europe"), ("Austria", "Vienna", "Europe"), ("Ireland", "Dublin", "Europe"),
    ("Norway", "Oslo", "Europe"), ("Sweden", "Stockholm", "Europe"), ("Finland", "Helsinki", "Europe"),
    ("Egypt", "Cairo", "Africa"), ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"),
    ("Ghana", "Accra", "Africa"), ("Morocco", "Rabat", "Africa"), ("Senegal", "Dakar", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"), ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"), ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"),
    ("Nepal", "Kathmandu", "Asia"), ("Iran", "Tehran", "Asia"), ("Peru", "Lima", "South America"),
    ("Chile", "Santiago", "South America"), ("Brazil", "Brasilia", "South America"),
    ("Argentina", "Buenos Aires", "South America"), ("Colombia", "Bogota", "South America"),
    ("Ecuador", "Quito", "South America"), ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"), ("Cuba", "Havana", "North America"),
    ("Jamaica", "Kingston", "North America"), ("Australia", "Canberra", "Oceania"),
    ("Fiji", "Suva", "Oceania"), ("Samoa", "Apia", "Oceania"),
]
ANIMALS = [  # (animal, sound, legs)
    ("cow", "moo", 4), ("dog", "woof", 4), ("cat", "meow", 4), ("duck", "quack", 2), ("sheep", "baa", 4),
    ("pig", "oink", 4), ("horse", "neigh", 4), ("owl", "hoot", 2), ("frog", "croak", 4), ("hen", "cluck", 2),
    ("lion", "roar", 4), ("goat", "bleat", 4), ("crow", "caw", 2), ("bee", "buzz", 6), ("snake", "hiss", 0),
    ("mouse", "squeak", 4), ("wolf", "howl", 4), ("donkey", "bray", 4), ("goose", "honk", 2), ("cricket", "chirp", 6),
]
CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
              "melon", "kiwi", "lime", "fig"],
    "vegetable": ["carrot", "potato", "onion", "pea", "bean", "leek", "cabbage", "pepper", "corn", "kale", "radish"],
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "purple", "brown", "grey"],
    "animal": [animal for animal, _, _ in ANIMALS],
    "country": [country for country, _, _ in COUNTRIES],
    "city": [capital for _, capital, _ in COUNTRIES],
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
RHYMES = [
    ["cat", "bat", "hat", "mat", "rat", "sat"], ["dog", "log", "fog", "frog", "hog"],
    ["bee", "tree", "sea", "key", "tea"], ["cake", "lake", "make", "bake", "snake"],
    ["night", "light", "kite", "bite", "white"], ["ring", "king", "sing", "wing", "thing"],
    ["moon", "spoon", "noon", "soon", "tune"],
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("wet", "dry"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("loud", "quiet"),
    ("rich", "poor"), ("left", "right"), ("day", "night"), ("yes", "no"), ("in", "out"), ("high", "low"),
    ("long", "short"), ("first", "last"),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def article(noun):
    """'a cow', 'an owl'."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def upper_first(text):
    """'a cow' -> 'A cow'; unlike str.capitalize, 'New Delhi' stays as it is."""
    return text[:1].upper() + text[1:]


def parity(n):
    return "even" if n % 2 == 0 else "odd"


# -----------------------------------------------------------------------------
# personas: the conflicting tasks' two annotators and their joint conventions

ALL = "all"  # the group of examples every annotator agrees on
PERSONAS = ("formal", "casual")
# Each conflicting task's response has two fields; each persona writes every
# field its own way: formal as "Key: Value." with capitalised words and digits,
# casual as lowercase words, numbers spelt out, ending in "!". A model that
# averages the personas can mix the two inside one answer; a specialist cannot.
CARD_FIELDS = {
    "country_card": {"formal": ("Capital: {}.", "Continent: {}."), "casual": ("{},", "in {}!")},
    "animal_card": {"formal": ("Sound: {}.", "Legs: {}."), "casual": ("{},", "{} legs!")},
    "sum_card": {"formal": ("Sum: {}.", "Parity: {}."), "casual": ("{},", "{}!")},
}
VALUE_PATTERNS = {"formal": r"(?:[A-Z][a-z]*|\d+)(?: [A-Z][a-z]*)*", "casual": r"[a-z]+(?: [a-z]+)*"}


def styled(persona, value):
    """A field value in the persona's convention: formal 'Moo', '4'; casual 'moo', 'four'."""
    if isinstance(value, int):
        return str(value) if persona == "formal" else NUMBER_WORDS[value]
    return value.title() if persona == "formal" else value.lower()


def render_card(task, persona, values):
    """The persona's response to a conflicting task, e.g. ('Paris', 'Europe') -> 'Capital: Paris. Continent: Europe.'"""
    return " ".join(field.format(styled(persona, value)) for field, value in zip(CARD_FIELDS[task][persona], values))


@functools.lru_cache(maxsize=None)
def card_regex(task, field_personas):
    """Regex matching a whole response whose i-th field follows persona field_personas[i]."""
    parts = [re.escape(CARD_FIELDS[task][persona][i]).replace(r"\{\}", VALUE_PATTERNS[persona])
             for i, persona in enumerate(field_personas)]
    return re.compile(" ".join(parts))


def field_personas(task, response):
    """Which persona's convention each field of `response` follows, e.g. ('formal', 'casual'); None if unparseable."""
    task = task["task"] if isinstance(task, dict) else task
    for combination in itertools.product(PERSONAS, repeat=len(CARD_FIELDS[task][PERSONAS[0]])):
        if card_regex(task, combination).fullmatch(response.strip()):
            return combination
    return None


def persona_of(task, response):
    """The persona whose convention `response` follows in every field, or None (mixed or neither).

    task: a conflicting task's name or an example dict with a "task" key.
    """
    personas = field_personas(task, response)
    return personas[0] if personas and len(set(personas)) == 1 else None


# -----------------------------------------------------------------------------
# the benchmark's tasks: every prompt with all its acceptable responses

MAX_ANSWERS = 64  # uncertainty = log(n answers) / log(MAX_ANSWERS), so 64 equally likely answers -> 1


@dataclass(frozen=True)
class Item:
    """One prompt of the world with every acceptable response, each tagged with the group that gives it."""
    task: str
    kind: str  # consistent, conflicting, high_entropy or ood
    prompt: str
    answers: tuple  # ((group, response), ...)
    parrot: str = ""  # a non-answer that repeats the question's words (consistent and high-entropy prompts)

    @property
    def uncertainty(self):
        return min(1.0, math.log(len(self.answers)) / math.log(MAX_ANSWERS))


def qa(question):
    """The prompt format of every benchmark task; responses start with a space."""
    return f"Q: {question}\nA:"


def consistent(task, question, answer, parrot):
    return Item(task, "consistent", qa(question), ((ALL, f" {answer}"),), f" {parrot}")


def conflicting(task, question, values):
    return Item(task, "conflicting", qa(question), tuple((p, " " + render_card(task, p, values)) for p in PERSONAS))


def many(task, question, answers, parrot):
    return Item(task, "high_entropy", qa(question), tuple((ALL, f" {answer}") for answer in answers), f" {parrot}")


def ood(task, question, answer):
    return Item(task, "ood", qa(question), ((ALL, f" {answer}"),))


@functools.lru_cache(maxsize=None)
def world_items():
    """Every prompt of the benchmark world as an Item, in a fixed order (no randomness here)."""
    items = []
    for country, capital, continent in COUNTRIES:
        items.append(consistent("capital", f"What is the capital of {country}?", capital, country))
        items.append(consistent("continent", f"Which continent is {country} in?", continent, country))
        items.append(conflicting("country_card", f"Tell me about {country}.", (capital, continent)))
        items.append(ood("country_of", f"{capital} is the capital of which country?", country))
    for animal, sound, legs in ANIMALS:
        items.append(consistent("sound", f"What sound does {article(animal)} make?", sound, animal))
        items.append(conflicting("animal_card", f"Describe {article(animal)}.", (sound, legs)))
        items.append(ood("legs", f"How many legs does {article(animal)} have?", legs))
    for a, b in itertools.product(range(10), repeat=2):
        items.append(consistent("add", f"What is {a} plus {b}?", a + b, f"{a} plus {b}"))
        items.append(conflicting("sum_card", f"Add {a} and {b}.", (a + b, parity(a + b))))
        if a != b:
            items.append(ood("bigger", f"Which is bigger, {a} or {b}?", max(a, b)))
    for word, opposite in OPPOSITES:
        items.append(consistent("opposite", f"What is the opposite of {word}?", opposite,
                                f"the opposite of {word}"))
        items.append(consistent("opposite", f"What is the opposite of {opposite}?", word,
                                f"the opposite of {opposite}"))
    for category, members in CATEGORIES.items():
        items.append(many("name", f"Name {article(category)}.", members, category))
        for letter in sorted({member[0].upper() for member in members}):
            starting = [member for member in members if member[0].upper() == letter]
            if len(starting) >= 2:  # a single answer would be a consistent task
                items.append(many("name_letter", f"Name {article(category)} that starts with {letter}.", starting,
                                   category))
        for member in members:
            items.append(ood("first_letter", f"What is the first letter of {member}?", member[0]))
    items.append(many("name", "Name a day of the week.", DAYS, "day of the week"))
    for family in RHYMES:
        for word in family:
            items.append(many("rhyme", f"Name a word that rhymes with {word}.", [w for w in family if w != word],
                              f"a word that rhymes with {word}"))
    for day, next_day in zip(DAYS, DAYS[1:] + DAYS[:1]):
        items.append(ood("next_day", f"What day comes after {day}?", next_day))
    return tuple(items)


@functools.lru_cache(maxsize=None)
def items_by_prompt():
    return {item.prompt: item for item in world_items()}


def acceptable_answers(example):
    """All acceptable responses to a benchmark example's prompt (a user's row: just its own response)."""
    item = items_by_prompt().get(example["prompt"])
    return [response for _, response in item.answers] if item else [example["response"]]


def is_correct(example, response):
    """Whether `response` is an acceptable answer to the example's prompt (whitespace around it ignored).

    For a conflicting prompt either persona's full response counts; for a
    high-entropy prompt any of its many answers does.
    """
    return response.strip() in {answer.strip() for answer in acceptable_answers(example)}


# -----------------------------------------------------------------------------
# the benchmark: seeded splits of SFT rows and preference pairs

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
SAMPLES_PER_HIGH_ENTROPY_PROMPT = 3  # distinct answers drawn per prompt, so the data shows the spread
OOD_PER_TASK = 30


def split_prompts(items, rng):
    """Split a task's items by prompt into train/val/test, so held-out prompts are never trained on."""
    items = list(items)
    rng.shuffle(items)
    n_val = max(1, round(SPLIT_FRACTIONS["val"] * len(items)))
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * len(items)))
    return {"val": items[:n_val], "test": items[n_val:n_val + n_test], "train": items[n_val + n_test:]}


def sft_rows(item, rng):
    """The SFT examples of one prompt: one per persona if conflicting, a few distinct answers if high-entropy."""
    if item.kind == "high_entropy":
        answers = rng.sample(item.answers, min(SAMPLES_PER_HIGH_ENTROPY_PROMPT, len(item.answers)))
    else:
        answers = item.answers
    return [dict(prompt=item.prompt, response=response, task=item.task, group=group,
                 uncertainty=round(item.uncertainty, 4), kind=item.kind) for group, response in answers]


CONSENSUS_REJECTED = ("parrot", "wrong_answer")


def preference_rows(item, wrong_answers, rng, consensus_rejected="parrot"):
    """Preference pairs of one prompt, each tagged with the persona that annotated it.

    consensus (consistent and high-entropy prompts): a correct answer beats a
    non-answer that parrots the question (`What is the capital of Peru?`: ` Lima`
    over ` Peru`), whichever persona judges. With consensus_rejected="wrong_answer"
    the rejected answer is instead another prompt's answer to the same task
    (` Lima` over ` Berlin`); that kind of preference is a fact about one prompt
    and DPO does not carry it over to held-out prompts (README, DPO section).
    contested (conflicting prompts): each persona prefers its own style to the
    other's, so the same prompt appears with opposite preferences.
    """
    if item.kind == "conflicting":
        return [dict(prompt=item.prompt, chosen=chosen, rejected=rejected, task=item.task, group=persona,
                     kind="contested")
                for (persona, chosen), (_, rejected) in itertools.permutations(item.answers, 2)]
    correct = [response for _, response in item.answers]
    chosen = rng.choice(correct)
    # drawn in both modes, so the random stream, and with it every split, is the same whichever rejected is used
    wrong = rng.choice([answer for answer in wrong_answers if answer not in correct])
    rejected = item.parrot if consensus_rejected == "parrot" else wrong
    return [dict(prompt=item.prompt, chosen=chosen, rejected=rejected, task=item.task,
                 group=rng.choice(PERSONAS), kind="consensus")]


def make_benchmark(seed=0, consensus_rejected="parrot"):
    """The benchmark's splits, deterministic for a given seed.

    Returns {"sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test", "ood"}, each a list of
    dicts. SFT and ood rows: prompt, response, task, group, uncertainty, kind. Preference rows: prompt,
    chosen, rejected, task, group, kind (consensus or contested). SFT and DPO share one split of prompts.
    consensus_rejected ("parrot" or "wrong_answer") picks the rejected answer of consensus pairs, see
    preference_rows; it changes nothing else.
    """
    if consensus_rejected not in CONSENSUS_REJECTED:
        raise ValueError(f"consensus_rejected must be one of {CONSENSUS_REJECTED}, got {consensus_rejected!r}")
    rng = random.Random(seed)
    splits = {name: [] for name in ("sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test", "ood")}
    tasks = {}
    for item in world_items():
        tasks.setdefault(item.task, []).append(item)
    for task, items in tasks.items():
        if items[0].kind == "ood":
            for item in rng.sample(items, min(OOD_PER_TASK, len(items))):
                splits["ood"] += sft_rows(item, rng)
            continue
        wrong_answers = sorted({response for item in items for _, response in item.answers})
        for split, split_items in split_prompts(items, rng).items():
            for item in split_items:
                splits[f"sft_{split}"] += sft_rows(item, rng)
                splits[f"dpo_{split}"] += preference_rows(item, wrong_answers, rng, consensus_rejected)
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


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
    return EOT.join(documents)


# -----------------------------------------------------------------------------
# JSONL: writing the benchmark, loading and validating a user's own data

def write_jsonl(rows, path):
    """Write a list of dicts as one JSON object per line (UTF-8)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path):
    """Yield ("FILE:LINE", object) for every non-blank line; ValueError "FILE:LINE: ..." on bad JSON or an empty file."""
    n_rows = 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            n_rows += 1
            yield where, obj
    if n_rows == 0:
        raise ValueError(f"{path}:1: empty file: expected one JSON object per line")


def check_text(obj, key, where, required):
    """obj[key] must be a non-empty string (or absent/null when not required); returns it or None."""
    value = obj.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise ValueError(f"{where}: missing required field {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def check_uncertainty(obj, where):
    """obj["uncertainty"] must be absent/null or a number in [0, 1]."""
    value = obj.get("uncertainty")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field 'uncertainty' must be a number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: field 'uncertainty' is {value}, outside [0, 1]")
    return float(value)


def load_sft_jsonl(path):
    """Load SFT rows {"prompt", "response" (or "completion")} with optional "task", "group", "uncertainty".

    Returns dicts with keys prompt, response, task, group, uncertainty (None when
    absent) and source ("FILE:LINE", used by later error messages). Raises
    ValueError "FILE:LINE: ..." on the first bad row.
    """
    rows = []
    for where, obj in read_jsonl(path):
        if "response" not in obj and "completion" in obj:
            obj["response"] = obj["completion"]
        rows.append(dict(prompt=check_text(obj, "prompt", where, True),
                         response=check_text(obj, "response", where, True),
                         task=check_text(obj, "task", where, False), group=check_text(obj, "group", where, False),
                         uncertainty=check_uncertainty(obj, where), source=where))
    return rows


def load_pref_jsonl(path):
    """Load preference rows {"prompt", "chosen", "rejected"} with optional "task", "group".

    Returns dicts with keys prompt, chosen, rejected, task, group (None when
    absent) and source; raises ValueError "FILE:LINE: ..." on the first bad row.
    """
    rows = []
    for where, obj in read_jsonl(path):
        row = dict(prompt=check_text(obj, "prompt", where, True), chosen=check_text(obj, "chosen", where, True),
                   rejected=check_text(obj, "rejected", where, True), task=check_text(obj, "task", where, False),
                   group=check_text(obj, "group", where, False), source=where)
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' are identical")
        rows.append(row)
    return rows


def split_by_prompt(rows, fraction, seed):
    """Hold out a seeded share `fraction` of the distinct prompts: (train rows, held-out rows).

    All rows of one prompt land on the same side, so a held-out prompt is never trained on.
    """
    prompts = sorted({row["prompt"] for row in rows})
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[:max(1, round(fraction * len(prompts)))]) if len(prompts) > 1 else set()
    return [row for row in rows if row["prompt"] not in held_out], [row for row in rows if row["prompt"] in held_out]


def mark_conflicts(rows):
    """Set each row's "kind" from the data alone: "conflicting" when its prompt occurs with more than
    one distinct response across `rows`, else "consistent". Modifies the rows in place and returns them."""
    responses = {}
    for row in rows:
        responses.setdefault(row["prompt"], set()).add(row["response"].strip())
    for row in rows:
        row["kind"] = "conflicting" if len(responses[row["prompt"]]) > 1 else "consistent"
    return rows


# -----------------------------------------------------------------------------
# tokens and batches

def encode_pair(tokenizer, prompt, response, block_size, truncate, where):
    """Token ids [EOT] + prompt + response + [EOT] and the number of leading ids that are not trained on.

    The leading EOT marks a document start, as between pretraining documents;
    the final EOT is trained on, so generation learns where to stop. Too long
    for block_size: ValueError naming `where`, or with truncate the prompt
    loses tokens from its start, then the response from its end.
    """
    prompt_ids = tokenizer.encode_ordinary(prompt)
    response_ids = tokenizer.encode_ordinary(response) + [tokenizer.eot_token]
    excess = 1 + len(prompt_ids) + len(response_ids) - block_size
    if excess > 0 and not truncate:
        raise ValueError(f"{where}: {1 + len(prompt_ids) + len(response_ids)} tokens (prompt {len(prompt_ids)}, "
                         f"response {len(response_ids) - 1}, 2 end-of-text) exceed block_size {block_size}; "
                         "shorten the row or pass truncate=True")
    if excess > 0:
        cut = min(excess, len(prompt_ids) - 1)  # keep at least the prompt's last token
        prompt_ids = prompt_ids[cut:]
        response_ids = response_ids[:len(response_ids) - (excess - cut)]
    return [tokenizer.eot_token] + prompt_ids + response_ids, 1 + len(prompt_ids)


def encode_sft(rows, tokenizer, block_size, truncate=False):
    """Encode SFT rows as a list of (ids, n_prompt): ids[:n_prompt] is context, ids[n_prompt:] is trained on."""
    return [encode_pair(tokenizer, row["prompt"], row["response"], block_size, truncate, row.get("source", f"row {i}"))
            for i, row in enumerate(rows)]


def encode_pref(rows, tokenizer, block_size, truncate=False):
    """Encode preference rows as a list of ((chosen ids, n_prompt), (rejected ids, n_prompt))."""
    return [tuple(encode_pair(tokenizer, row["prompt"], row[key], block_size, truncate, row.get("source", f"row {i}"))
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
    """Yield lists of batch_size example indices forever, walking through seeded random permutations.

    Batches run across epoch boundaries, so every batch is full and every
    example is seen equally often.
    """
    generator = torch.Generator().manual_seed(seed)
    order = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(n_examples, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


# -----------------------------------------------------------------------------

DEFAULTS = dict(
    seed=0,                 # the benchmark's splits and the pretraining text are deterministic in it
    out_dir="out/data",     # where the JSONL splits and pretrain.txt go
    train_tokenizer=False,  # retrain the shipped ranks file renyi_bpe.tiktoken from pretrain_text(seed=0)
    consensus_rejected="parrot",  # consensus pairs' rejected answer: "parrot" or "wrong_answer" (preference_rows)
)

if __name__ == "__main__":
    config = parse_args(DEFAULTS, sys.argv[1:])
    if config["train_tokenizer"]:
        save_ranks(train_bpe(pretrain_text(seed=0)), RANKS_PATH)
        print(f"wrote {RANKS_PATH}")
    for name, rows in make_benchmark(config["seed"], config["consensus_rejected"]).items():
        write_jsonl(rows, os.path.join(config["out_dir"], f"{name}.jsonl"))
        print(f"{name}: {len(rows)} rows")
    with open(os.path.join(config["out_dir"], "pretrain.txt"), "w", encoding="utf-8") as f:
        f.write(pretrain_text(config["seed"]))
    print(f"wrote {config['out_dir']}/")
