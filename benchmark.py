"""
The benchmark: a small synthetic world whose post-training data is partly
contradictory, so that what the method claims becomes measurable.

Its tasks come in four kinds:
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

    python benchmark.py                              # the splits as JSONL, in out/data/
    python benchmark.py --corrupt=0.2 --out_dir=out/data_noise0.2   # 20 % of the consistent training responses wrong
"""

import functools
import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass

from config import UserError, parse_args, run_script

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
    and DPO does not carry it over to held-out prompts.
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


def corrupt_responses(rows, share, seed):
    """Label noise: round(share * n) of the n consistent rows get a wrong response, tagged `corrupted: True`.

    The wrong response is another prompt's answer to the same task (" Lima" for the capital
    of France), so it is plausible but never acceptable (is_correct is False). Returns new
    rows in the same order; the others are unchanged. share in [0, 1); seeded by seed alone.
    """
    if not 0 <= share < 1:
        raise UserError(f"corrupt must be in [0, 1), got {share}")
    rng = random.Random(seed)
    answers = {}
    for item in world_items():
        answers.setdefault(item.task, set()).update(response for _, response in item.answers)
    consistent = [i for i, row in enumerate(rows) if row["kind"] == "consistent"]
    rows = list(rows)
    for i in sorted(rng.sample(consistent, round(share * len(consistent)))):
        wrong = [answer for answer in sorted(answers[rows[i]["task"]]) if not is_correct(rows[i], answer)]
        rows[i] = rows[i] | dict(response=rng.choice(wrong), corrupted=True)
    return rows


def make_benchmark(seed=0, consensus_rejected="parrot", corrupt=0.0):
    """The benchmark's splits, deterministic for a given seed.

    Returns {"sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test", "ood"}, each a list of
    dicts. SFT and ood rows: prompt, response, task, group, uncertainty, kind. Preference rows: prompt,
    chosen, rejected, task, group, kind (consensus or contested). SFT and DPO share one split of prompts.
    consensus_rejected ("parrot" or "wrong_answer") picks the rejected answer of consensus pairs, see
    preference_rows; it changes nothing else. corrupt: the share of consistent sft_train rows
    given a wrong response (corrupt_responses); every other split stays as it is.
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
    splits["sft_train"] = corrupt_responses(splits["sft_train"], corrupt, seed)
    return splits


# -----------------------------------------------------------------------------

DEFAULTS = dict(
    seed=0,                 # the benchmark's splits are deterministic in it
    out_dir="out/data",     # where the JSONL splits go
    consensus_rejected="parrot",  # consensus pairs' rejected answer: "parrot" or "wrong_answer" (preference_rows)
    corrupt=0.0,            # share of consistent training responses replaced by wrong ones (corrupt_responses)
)


def main(argv):
    config = parse_args(DEFAULTS, argv)
    splits = make_benchmark(config["seed"], config["consensus_rejected"], config["corrupt"])   # checks corrupt
    os.makedirs(config["out_dir"], exist_ok=True)
    splits["sft_held_out"] = splits["sft_test"] + splits["ood"]    # as --val_data: test rows, then kind "ood"
    for name, rows in splits.items():
        with open(os.path.join(config["out_dir"], f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{name}: {len(rows)} rows")
    print(f"wrote {config['out_dir']}/; train on them with python train_sft.py --data={config['out_dir']}/sft_train.jsonl "
          f"--val_data={config['out_dir']}/sft_held_out.jsonl")


if __name__ == "__main__":
    run_script(main)
