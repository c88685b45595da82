"""
A family of SFT conflict sets built differently from the benchmark, for testing
that a default (alpha, n_members, ...) survives data it was not tuned on.

Every set has two tasks, both in the template "Question: ...\\nAnswer:":
- "fact" (consistent): one right answer per prompt from benchmark.py's world
  (capitals, continents, animal sounds and legs, sums of two digits), so a base
  pretrained on the world's text can answer held-out prompts;
- "record" (conflicting): every prompt is answered by every annotator group
  g0, g1, ..., one row per group, each in its own convention. A response is
  fields " Key: value." and each group has its own keys, the first one
  distinct across groups, so two groups' responses differ from their first word.

The knobs of make_conflict_set:
- n_rows: training rows, met exactly: the prompts it needs at the shares below
  (at most the world's 218 consistent and 159 conflicting prompts), then
  repeated rows to make up the rest, so large sets repeat rows (large_2000: each
  of its 372 distinct rows about 5 times);
- response_words: fields per record response, each a key and one value word
  (about 6 tokens: 2 fields make about 12 tokens, 10 fields about 60, 16 at most);
- n_groups: annotator groups answering each conflicting prompt;
- imbalance: the share of conflicting training rows from the largest group, g0,
  made by duplicating g0's rows (the others keep one row per prompt); it runs
  from 1/n_groups (balanced) to below 1. Held-out rows have one row per group;
- conflict_share: the share of distinct training prompts that are record prompts;
- convention: "global", each group gives one fixed response to every prompt;
  "per_prompt", each group writes the prompt's three facts with its own keys
  and in its own order (cycling through them for more than three fields), so a
  held-out prompt tests whether a member learned the group's convention;
  "shared", the control: every group writes g0's per_prompt response, so the
  rows keep their groups but nothing conflicts (their kind is "consistent").
About 22 % of each task's prompts are held out (never trained on), topped up to 40 prompts of
each task from the world's prompts that no training row uses, where there are enough, so that an
accuracy on the held-out file moves by at most 0.025 per prompt.

    python -m experiments.conflict_sets --name=user_160            # out/conflict_sets/user_160/{train,test}.jsonl
    python -m experiments.conflict_sets --name=all --seed=1        # every set of FAMILY
    python train_sft.py --data=out/conflict_sets/user_160/train.jsonl --val_data=out/conflict_sets/user_160/test.jsonl
"""
import itertools
import math
import os
import random

import data
from benchmark import ALL, ANIMALS, COUNTRIES, MAX_ANSWERS, NUMBER_WORDS, parity
from config import UserError, parse_args, run_script

CONVENTIONS = ("global", "per_prompt", "shared")
TEST_FRACTION = 0.22   # share of each task's distinct prompts held out
MIN_TEST_PROMPTS = 3   # ... but at least this many of each task
TEST_PROMPTS = 40      # ... topped up to this many from the world's unused prompts: one prompt moves an accuracy by 0.025
MAX_GROUPS = 8
MAX_RESPONSE_WORDS = 16  # 16 fields stay under the base's block_size of 128 tokens
# Field names and global values: short English words the shipped tokenizer splits into at most 2 tokens, so a
# field " Key: value." costs about 6 tokens; the values are words of the world (benchmark.OPPOSITES).
KEYS = ("View", "Line", "Term", "Way", "Tone", "Path", "Part", "Event", "Map", "Top", "Set", "End", "Aim", "Link",
        "Key", "Law", "Era", "Fit", "Gap", "Net")
VALUE_WORDS = ("yes", "no", "high", "low", "hot", "cold", "fast", "slow", "big", "wet", "dry", "day", "night",
               "light", "first", "last", "open", "rich", "sad", "short", "down", "in")

# Named sets for a robustness study: the user's case, then one knob changed at a time.
USER_CASE = dict(n_rows=160, response_words=2, n_groups=2, imbalance=0.5, conflict_share=0.5, convention="global")
FAMILY = {
    "user_160": USER_CASE,
    "long": USER_CASE | dict(response_words=10),
    "four_groups": USER_CASE | dict(n_groups=4, imbalance=0.25),
    "imbalanced_80_20": USER_CASE | dict(imbalance=0.8),        # 160 rows: 26 prompts of each task, not 53
    "imbalanced_80_20_320": USER_CASE | dict(imbalance=0.8, n_rows=320),   # user_160's very prompts, g0's rows x 4
    "rare_conflict_10": USER_CASE | dict(conflict_share=0.1),
    "per_prompt": USER_CASE | dict(convention="per_prompt"),
    "large_2000": USER_CASE | dict(n_rows=2000),
    "no_conflict": USER_CASE | dict(convention="shared"),
}

# -----------------------------------------------------------------------------
# prompts and responses


def prompt(question):
    """This family's prompt template (the benchmark's is 'Q: ...\\nA:')."""
    return f"Question: {question}\nAnswer:"


def fact_questions():
    """(question kind, prompt, response) of every consistent prompt, in a fixed order."""
    items = []
    for country, capital, continent in COUNTRIES:
        items += [("capital", prompt(f"What is the capital city of {country}?"), f" {capital}"),
                  ("continent", prompt(f"On which continent is {country}?"), f" {continent}")]
    for animal, sound, legs in ANIMALS:
        items += [("sound", prompt(f"Which sound does the {animal} make?"), f" {sound}"),
                  ("legs", prompt(f"How many legs does the {animal} have?"), f" {legs}")]
    for a, b in itertools.product(range(10), repeat=2):
        items.append(("sum", prompt(f"What do {a} and {b} add up to?"), f" {a + b}"))
    return items


def fact_items():
    """(prompt, response) of every consistent prompt, in a fixed order."""
    return [(prompt_text, response) for _, prompt_text, response in fact_questions()]


def record_items():
    """(prompt, three facts) of every conflicting prompt, in a fixed order; per_prompt responses write the facts."""
    items = [(prompt(f"Write the record for {country}."), (country, capital, continent))
             for country, capital, continent in COUNTRIES]
    items += [(prompt(f"Write the record for the {animal}."), (animal, sound, str(legs)))
              for animal, sound, legs in ANIMALS]
    items += [(prompt(f"Write the record for {a} and {b}."), (str(a + b), parity(a + b), NUMBER_WORDS[a + b]))
              for a, b in itertools.product(range(10), repeat=2)]
    return items


def draw_styles(n_groups, response_words, rng):
    """Each group's style: its keys, a value per key (global) and an order of the three facts (per_prompt)."""
    styles = []
    for first in rng.sample(KEYS, n_groups):  # distinct first keys: the groups differ from the first word
        keys = [first] + rng.sample([key for key in KEYS if key != first], response_words - 1)
        values = [rng.choice(VALUE_WORDS) for _ in keys]
        styles.append(dict(keys=keys, values=values, order=rng.sample(range(3), 3)))
    return styles


def record_response(convention, style, facts):
    """' Key: value. Key: value.': fixed values (global), or the facts in the group's order, cycling (per_prompt)."""
    if convention == "global":
        values = style["values"]
    else:
        values = [facts[style["order"][i % 3]] for i in range(len(style["keys"]))]
    return "".join(f" {key}: {value}." for key, value in zip(style["keys"], values))


def record_rows(prompt_text, facts, styles, convention, copies_of_g0):
    """The rows of one record prompt: one per group, g0's repeated copies_of_g0 times."""
    if convention == "shared":
        responses = [record_response("per_prompt", styles[0], facts)] * len(styles)
    else:
        responses = [record_response(convention, style, facts) for style in styles]
    kind = "consistent" if convention == "shared" else "conflicting"
    uncertainty = 0.0 if convention == "shared" else math.log(len(styles)) / math.log(MAX_ANSWERS)
    rows = [dict(prompt=prompt_text, response=response, task="record", group=f"g{g}",
                 uncertainty=round(uncertainty, 4), kind=kind) for g, response in enumerate(responses)]
    return rows[:1] * copies_of_g0 + rows[1:]


def fact_row(prompt_text, response):
    return dict(prompt=prompt_text, response=response, task="fact", group=ALL, uncertainty=0.0, kind="consistent")


# -----------------------------------------------------------------------------
# the set


def check_knobs(n_rows, response_words, n_groups, imbalance, conflict_share, convention):
    """ValueError naming the first knob outside its range."""
    if not 2 <= n_groups <= MAX_GROUPS:
        raise ValueError(f"n_groups={n_groups}: must be in [2, {MAX_GROUPS}]")
    if not 1 / n_groups <= imbalance < 1:
        raise ValueError(f"imbalance={imbalance}: must be in [1/n_groups, 1) = [{1 / n_groups:.3g}, 1)")
    if not 0 < conflict_share < 1:
        raise ValueError(f"conflict_share={conflict_share}: must be in (0, 1)")
    if not 1 <= response_words <= MAX_RESPONSE_WORDS:
        raise ValueError(f"response_words={response_words}: must be in [1, {MAX_RESPONSE_WORDS}]")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: must be one of {', '.join(CONVENTIONS)}")
    if n_rows < 20:
        raise ValueError(f"n_rows={n_rows}: must be at least 20")


def n_training_prompts(n_rows, rows_per_record, conflict_share, n_facts, n_records):
    """(fact, record) training prompts whose rows come to at most n_rows, held-out prompts left aside.

    A fact prompt makes one row, a record prompt rows_per_record; the world's n_facts and
    n_records prompts cap the counts, and repeated rows make up the rest (repeat_to).
    """
    n_prompts = n_rows / (1 - conflict_share + conflict_share * rows_per_record)
    keep = 1 - TEST_FRACTION
    n_prompts = min(n_prompts, keep * n_facts / (1 - conflict_share), keep * n_records / conflict_share)
    return math.floor((1 - conflict_share) * n_prompts), math.floor(conflict_share * n_prompts)


def g0_rows_per_prompt(g0_copies, n_prompts, rng):
    """g0's rows on each of n_prompts prompts: floor(g0_copies), one more on a seeded share; on average g0_copies."""
    whole = math.floor(g0_copies + 1e-9)  # 1e-9: 0.8 / (1 - 0.8) must give 4, not 3.999...
    extra = set(rng.sample(range(n_prompts), math.floor(g0_copies * n_prompts + 1e-9) - whole * n_prompts))
    return [whole + (i in extra) for i in range(n_prompts)]


def split_prompts(items, n_test, n_train):
    """(training, held-out) items: n_test held out, the next n_train trained on, then the held-out
    ones topped up to TEST_PROMPTS from the items after those (none of them trained on)."""
    train = items[n_test:n_test + n_train]
    return train, (items[:n_test] + items[n_test + n_train:])[:max(n_test, TEST_PROMPTS)]


def repeat_to(rows, n_rows, rng):
    """Exactly n_rows rows: whole copies of rows, then a seeded sample of them without repeats."""
    repeated = rows * (n_rows // len(rows))
    return repeated + rng.sample(rows, n_rows - len(repeated))


def make_conflict_set(n_rows=160, response_words=2, n_groups=2, imbalance=0.5, conflict_share=0.5,
                      convention="global", seed=0):
    """dict(train=[...], test=[...]) of SFT rows (prompt, response, task, group, uncertainty, kind); the knobs
    are described at the top of this file. Deterministic in seed: the groups' styles and the split."""
    check_knobs(n_rows, response_words, n_groups, imbalance, conflict_share, convention)
    rng = random.Random(seed)
    styles = draw_styles(n_groups, response_words, rng)
    g0_copies = imbalance * (n_groups - 1) / (1 - imbalance)  # g0 rows per prompt that give g0 the share `imbalance`
    facts, records = fact_items(), record_items()
    rng.shuffle(facts)
    rng.shuffle(records)
    n_train = n_training_prompts(n_rows, n_groups - 1 + g0_copies, conflict_share, len(facts), len(records))
    if min(n_train) < 2:
        raise ValueError(f"conflict_share={conflict_share}: fewer than 2 training prompts of a task at n_rows={n_rows}")
    n_test = [max(MIN_TEST_PROMPTS, round(n * TEST_FRACTION / (1 - TEST_FRACTION))) for n in n_train]
    train_facts, test_facts = split_prompts(facts, n_test[0], n_train[0])
    train_records, test_records = split_prompts(records, n_test[1], n_train[1])
    test = [fact_row(*item) for item in test_facts]
    test += [row for item in test_records for row in record_rows(*item, styles, convention, 1)]
    train = [fact_row(*item) for item in train_facts]
    for item, copies in zip(train_records, g0_rows_per_prompt(g0_copies, len(train_records), rng)):
        train += record_rows(*item, styles, convention, copies)
    train = repeat_to(train, n_rows, rng)
    rng.shuffle(train)
    rng.shuffle(test)
    return dict(train=train, test=test)


def make_pair_set(seed=0, **knobs):
    """dict(train=[...], test=[...]) of preference pairs (prompt, chosen, rejected, task, group) made from
    make_conflict_set(**knobs, seed=seed), row for row:

    - a record row of group g gives one pair for every other group h: g's response chosen over h's
      (contested: h's rows give the same pair swapped), so imbalance carries over as g0's repeated pairs;
    - a fact row gives one consensus pair: its right answer chosen over the right answer of another
      prompt of the same question kind (a wrong capital, a wrong sum, ...), drawn with the seed.
    The control set (convention "shared") has no record pairs: every group gives the same response.
    """
    rows = make_conflict_set(**knobs, seed=seed)
    rng = random.Random(seed)
    kind_of = {prompt_text: kind for kind, prompt_text, _ in fact_questions()}
    answers = {}                               # question kind -> its distinct right answers, in a fixed order
    for kind, _, response in fact_questions():
        if response not in answers.setdefault(kind, []):
            answers[kind].append(response)

    def pairs(split):
        responses = {}                         # record prompt -> {group: its response}
        for row in split:
            if row["task"] == "record":
                responses.setdefault(row["prompt"], {})[row["group"]] = row["response"]
        out = []
        for row in split:
            if row["task"] == "fact":
                wrong = rng.choice([a for a in answers[kind_of[row["prompt"]]] if a != row["response"]])
                out.append(dict(prompt=row["prompt"], chosen=row["response"], rejected=wrong, task="fact", group=ALL))
            else:
                out += [dict(prompt=row["prompt"], chosen=row["response"], rejected=other, task="record",
                             group=row["group"])
                        for group, other in responses[row["prompt"]].items()
                        if group != row["group"] and other != row["response"]]
        return out
    return dict(train=pairs(rows["train"]), test=pairs(rows["test"]))


# -----------------------------------------------------------------------------

DEFAULTS = dict(
    name="user_160",              # a set of FAMILY, or "all" for every one
    seed=0,                       # the groups' styles and the split are deterministic in it
    out_dir="out/conflict_sets",  # each set goes to <out_dir>/<name>/train.jsonl and test.jsonl
)


def main(argv):
    config = parse_args(DEFAULTS, argv)
    names = list(FAMILY) if config["name"] == "all" else [config["name"]]
    if names[0] not in FAMILY:
        raise UserError(f"name={config['name']!r}: must be 'all' or one of {', '.join(FAMILY)}")
    for name in names:
        rows = make_conflict_set(**FAMILY[name], seed=config["seed"])
        for split in ("train", "test"):
            data.write_jsonl(rows[split], os.path.join(config["out_dir"], name, f"{split}.jsonl"))
        print(f"{name}: {len(rows['train'])} train rows, {len(rows['test'])} test rows -> {config['out_dir']}/{name}/")


if __name__ == "__main__":
    run_script(main)
