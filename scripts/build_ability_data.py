"""Write the two offline proxies of CH05's benchmark section (instruction following vs reasoning), offline.

    python scripts/build_ability_data.py            # writes both files in data/
    python scripts/build_ability_data.py --check    # fails if a file on disk differs from a fresh build

The book measures width pruning with IFEval (does the model obey a verifiable instruction?) and GSM8K (does it
solve a grade-school word problem?). Neither is available offline, so the ``cpu`` and ``tiny`` profiles use two
small stand-ins written for this course from templates:

* ``data/instruction_prompts.jsonl``: a short writing request about an everyday subject plus ONE constraint a
  program can verify (``utils.abilities.follows_constraint``): only capital letters, only lowercase letters,
  exactly N words, start with a given word, use a given word, avoid a given word, or a JSON object with given
  keys. Every subject is asked with every kind of constraint (``SUBJECTS`` x ``KINDS``); the parameters (N, the
  word, the keys) are drawn with a seeded ``random.Random``. Fields: ``id``, ``prompt``, ``constraint`` (a dict
  with ``type`` and its parameters), ``subject``.
* ``data/arithmetic_problems.jsonl``: one- and two-step word problems with whole-number answers (add, take away,
  groups of, share equally, add then take away), names, things and numbers drawn with a seeded
  ``random.Random``. Fields: ``id``, ``question``, ``answer`` (an integer), ``kind``.

Running the script twice writes identical bytes; ``--check`` is what the tests run.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jsonl_outputs import write_or_check  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTIONS_OUTPUT = ROOT / "data" / "instruction_prompts.jsonl"
ARITHMETIC_OUTPUT = ROOT / "data" / "arithmetic_problems.jsonl"
SEED = 31

#: (subject, a word that comes naturally when writing about it: the word an ``avoid_word`` prompt forbids)
SUBJECTS: tuple[tuple[str, str], ...] = (
    ("the sea", "water"), ("a bicycle", "wheels"), ("autumn", "leaves"), ("a public library", "books"),
    ("a thunderstorm", "rain"), ("breakfast", "eggs"), ("a mountain village", "snow"), ("the moon", "night"),
    ("a railway station", "trains"), ("a vegetable garden", "soil"), ("a birthday party", "cake"),
    ("a city park", "trees"), ("a pet cat", "fur"), ("a kitchen", "cooking"), ("a football match", "goal"),
    ("a desert", "sand"), ("a school classroom", "teacher"), ("a winter morning", "cold"),
    ("a fishing boat", "nets"), ("a busy market", "stalls"),
)
KINDS: tuple[str, ...] = ("uppercase", "lowercase", "word_count", "starts_with", "include_word", "avoid_word",
                          "json_keys")
START_WORDS = ("Today", "Yes", "Honestly", "Look", "Sometimes", "Remember")
INCLUDE_WORDS = ("purple", "quietly", "seven", "ancient", "whistle", "golden", "lucky")
KEY_SETS = (("name", "colour"), ("place", "season"), ("title", "mood"), ("size", "sound"), ("name", "age"))


def instruction_prompt(subject: str, kind: str, rng: random.Random) -> tuple[str, dict]:
    """The request and its constraint for one (subject, kind)."""
    if kind == "uppercase":
        return f"Write one sentence about {subject}. Write it in capital letters only.", {"type": kind}
    if kind == "lowercase":
        return (f"Write one sentence about {subject}. Use lowercase letters only, with no capital letter at all.",
                {"type": kind})
    if kind == "word_count":
        n = rng.randint(3, 7)
        return f"Describe {subject} in exactly {n} words.", {"type": kind, "n": n}
    if kind == "starts_with":
        word = rng.choice(START_WORDS)
        return f"Write one sentence about {subject}. Its first word must be \"{word}\".", {"type": kind, "word": word}
    if kind == "include_word":
        word = rng.choice(INCLUDE_WORDS)
        return f"Write one sentence about {subject} that uses the word \"{word}\".", {"type": kind, "word": word}
    if kind == "avoid_word":
        word = dict(SUBJECTS)[subject]
        return (f"Write one sentence about {subject} without using the word \"{word}\".",
                {"type": kind, "word": word})
    if kind == "json_keys":
        keys = list(rng.choice(KEY_SETS))
        listed = " and ".join(f"\"{k}\"" for k in keys)
        return (f"Reply with a JSON object about {subject} that has exactly the keys {listed}, and nothing else.",
                {"type": kind, "keys": keys})
    raise ValueError(f"unknown kind {kind!r}")


def build_instructions() -> list[dict]:
    """Every subject with every kind of constraint, in a seeded order."""
    rng = random.Random(SEED)
    records = []
    for subject, _ in SUBJECTS:
        for kind in KINDS:
            prompt, constraint = instruction_prompt(subject, kind, rng)
            records.append({"prompt": prompt, "constraint": constraint, "subject": subject})
    rng.shuffle(records)
    out = [{"id": f"if{k:03d}", **r} for k, r in enumerate(records)]
    prompts = [r["prompt"] for r in out]
    assert len(set(prompts)) == len(prompts), "two instruction prompts are identical"
    return out


NAMES = ("Ana", "Ben", "Carla", "Dev", "Elif", "Femi", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Luca", "Mei",
         "Nadia", "Omar", "Priya")
#: (plural thing, a container of several of them, its plural)
THINGS = (("apples", "bag", "bags"), ("pencils", "box", "boxes"), ("stickers", "sheet", "sheets"),
          ("marbles", "jar", "jars"), ("eggs", "carton", "cartons"), ("stamps", "album page", "album pages"),
          ("cards", "pack", "packs"), ("biscuits", "tin", "tins"), ("shells", "bucket", "buckets"),
          ("books", "shelf", "shelves"))
ARITHMETIC_KINDS = ("add", "take_away", "groups_of", "share", "add_then_take_away")
PROBLEMS_PER_KIND = 24


def arithmetic_problem(kind: str, rng: random.Random) -> tuple[str, int]:
    """A word problem of ``kind`` and its whole-number answer."""
    name, other = rng.sample(NAMES, 2)
    thing, box, boxes = rng.choice(THINGS)
    if kind == "add":
        a, b = rng.randint(3, 40), rng.randint(2, 30)
        return f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?", a + b
    if kind == "take_away":
        a = rng.randint(12, 60)
        b = rng.randint(2, a - 3)
        return f"{name} had {a} {thing} and gave {b} of them to {other}. How many {thing} does {name} have left?", a - b
    if kind == "groups_of":
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        return f"{name} buys {a} {boxes} of {thing}. Each {box} holds {b} {thing}. How many {thing} is that?", a * b
    if kind == "share":
        b, a = rng.randint(2, 6), rng.randint(2, 9)
        return (f"{name} shares {a * b} {thing} equally among {b} friends. How many {thing} does each friend get?",
                a)
    if kind == "add_then_take_away":
        a, b = rng.randint(5, 30), rng.randint(3, 20)
        c = rng.randint(1, a + b - 2)
        return (f"{name} has {a} {thing}, finds {b} more, then gives {c} to {other}. How many {thing} does {name} "
                f"have now?", a + b - c)
    raise ValueError(f"unknown kind {kind!r}")


def build_arithmetic() -> list[dict]:
    """``PROBLEMS_PER_KIND`` problems of every kind, in a seeded order, no question twice."""
    rng = random.Random(SEED)
    records, seen = [], set()
    for kind in ARITHMETIC_KINDS:
        made = 0
        while made < PROBLEMS_PER_KIND:
            question, answer = arithmetic_problem(kind, rng)
            if question in seen:
                continue
            seen.add(question)
            assert answer > 0 and isinstance(answer, int)
            records.append({"question": question, "answer": answer, "kind": kind})
            made += 1
    rng.shuffle(records)
    return [{"id": f"ar{k:03d}", **r} for k, r in enumerate(records)]


def main(argv: list[str] | None = None) -> int:
    outputs = [(INSTRUCTIONS_OUTPUT, build_instructions), (ARITHMETIC_OUTPUT, build_arithmetic)]
    return write_or_check(outputs, argv, script="build_ability_data.py",
                          what="both ability files are", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
