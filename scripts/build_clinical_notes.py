"""Write data/clinical_notes_sample.jsonl: synthetic clinical notes with their gold JSON labels.

    python scripts/build_clinical_notes.py            # writes data/clinical_notes_sample.jsonl
    python scripts/build_clinical_notes.py --check    # fails if the file on disk differs from a fresh build

Every record is made in two steps: first the **label** is sampled (age, symptoms, vital signs,
medications, duration, each possibly absent), then a **note** is rendered from it with templates
written for this course. The label is therefore right by construction. Five categories, in the
proportions of the book's Hub dataset (oopere/clinical-ner-qdora): ``clean`` (100), ``abbreviations``
(80), ``implicit`` (lay wording, numbers in words; 80), ``typos`` (70) and ``irrelevant`` (numbers,
ages and medicines that are not the patient's; 70).

Splits are stratified by category (70 % train, 10 % validation, 20 % test) and decided *before*
rendering: train and validation notes only use the "seen" phrasings, while test notes also draw
phrasings and distractors kept out of training (``TEST_ONLY_MARKERS`` lists a literal piece of
each). A record's ``novel`` field lists the test-only pieces its note contains, so a notebook can
score seen and unseen phrasings apart. Nothing is random beyond one seeded ``random.Random``:
running the script twice writes identical bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.extraction import check_schema, format_answer  # noqa: E402

OUTPUT = ROOT / "data" / "clinical_notes_sample.jsonl"
SEED = 7
CATEGORY_SIZES = {"clean": 100, "abbreviations": 80, "implicit": 80, "typos": 70, "irrelevant": 70}
SPLIT_SHARES = {"test": 0.2, "validation": 0.1}  # the rest is train
NOVEL_PROBABILITY = 0.4  # in test notes, chance that each choice point takes a test-only phrasing

# A choice is a list of (text, marker): marker is None for phrasings every split may use, and a
# literal substring of the rendered note for test-only phrasings.
SEEN = None

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English words for 0 <= n < 100 ("forty-five")."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("-" + _ONES[ones] if ones else "")


# --- what a label can contain ---------------------------------------------------------------------
# symptom -> {style: [(phrase, marker), ...]}. "lay" phrases are predicates that follow the subject
# ("she ... , ... and ...").
SYMPTOMS: dict[str, dict[str, list]] = {
    "fever": {"clean": [("fever", SEEN)], "abbr": [("fever", SEEN), ("febrile", SEEN)],
              "lay": [("has been burning up", SEEN), ("feels hot and shivery", SEEN),
                      ("has felt feverish every evening", "felt feverish every evening")]},
    "cough": {"clean": [("cough", SEEN)], "abbr": [("cough", SEEN)],
              "lay": [("can't stop coughing", SEEN), ("keeps coughing at night", SEEN),
                      ("has a barking chest", "barking chest")]},
    "headache": {"clean": [("headache", SEEN)], "abbr": [("HA", SEEN), ("h/a", "h/a")],
                 "lay": [("has a pounding head", SEEN), ("says the head hurts", SEEN),
                         ("describes a skull that throbs", "skull that throbs")]},
    "nausea": {"clean": [("nausea", SEEN)], "abbr": [("nausea", SEEN)],
               "lay": [("feels queasy", SEEN), ("feels sick to the stomach", SEEN),
                       ("says the stomach keeps turning", "stomach keeps turning")]},
    "vomiting": {"clean": [("vomiting", SEEN)], "abbr": [("emesis", SEEN)],
                 "lay": [("keeps throwing up", SEEN), ("can't keep food down", SEEN),
                         ("brings everything back up", "brings everything back up")]},
    "fatigue": {"clean": [("fatigue", SEEN)], "abbr": [("fatigue", SEEN), ("malaise", "malaise")],
                "lay": [("is tired all the time", SEEN), ("feels wiped out", SEEN),
                        ("has no energy left", "no energy left")]},
    "shortness of breath": {"clean": [("shortness of breath", SEEN)], "abbr": [("SOB", SEEN), ("DOE", "DOE")],
                            "lay": [("can't catch a breath", SEEN), ("gets winded easily", SEEN),
                                    ("is out of puff on the stairs", "out of puff")]},
    "chest pain": {"clean": [("chest pain", SEEN)], "abbr": [("CP", SEEN)],
                   "lay": [("feels tightness in the chest", SEEN), ("has pressure on the chest", SEEN),
                           ("has an ache behind the breastbone", "behind the breastbone")]},
    "abdominal pain": {"clean": [("abdominal pain", SEEN)], "abbr": [("abd pain", SEEN)],
                       "lay": [("has a tummy ache", SEEN), ("says the belly hurts", SEEN),
                               ("has cramps in the gut", "cramps in the gut")]},
    "dizziness": {"clean": [("dizziness", SEEN)], "abbr": [("dizziness", SEEN)],
                  "lay": [("feels like the room is spinning", SEEN), ("feels lightheaded", SEEN),
                          ("is wobbly on the feet", "wobbly on the feet")]},
    "sore throat": {"clean": [("sore throat", SEEN)], "abbr": [("sore throat", SEEN)],
                    "lay": [("says it hurts to swallow", SEEN), ("has a scratchy throat", SEEN),
                            ("says the throat feels like sandpaper", "like sandpaper")]},
    "diarrhea": {"clean": [("diarrhea", SEEN)], "abbr": [("diarrhea", SEEN), ("loose stools", SEEN)],
                 "lay": [("keeps running to the toilet", SEEN), ("has an upset bowel", SEEN),
                         ("has watery stools", "watery stools")]},
    "rash": {"clean": [("rash", SEEN)], "abbr": [("rash", SEEN)],
             "lay": [("has red spots on the skin", SEEN), ("has itchy blotches", SEEN),
                     ("has bumpy red patches", "bumpy red patches")]},
    "back pain": {"clean": [("back pain", SEEN)], "abbr": [("back pain", SEEN)],
                  "lay": [("says the back is agony", SEEN), ("has a sore back", SEEN),
                          ("has an aching lower back", "aching lower back")]},
    "joint pain": {"clean": [("joint pain", SEEN)], "abbr": [("arthralgia", SEEN)],
                   "lay": [("has aching knees and wrists", SEEN), ("has sore joints", SEEN),
                           ("says the joints feel stiff and sore", "stiff and sore")]},
    "runny nose": {"clean": [("runny nose", SEEN)], "abbr": [("rhinorrhea", SEEN)],
                   "lay": [("has a nose that won't stop running", SEEN), ("has a drippy nose", SEEN),
                           ("keeps reaching for tissues", "reaching for tissues")]},
}

# name -> possible doses in mg (a "puffs" entry is a count of inhaler puffs)
MEDICATIONS: dict[str, list] = {
    "ibuprofen": [200, 400, 600], "acetaminophen": [500, 650, 1000], "amoxicillin": [250, 500, 875],
    "omeprazole": [20, 40], "metformin": [500, 850, 1000], "lisinopril": [5, 10, 20],
    "albuterol": ["2 puffs"], "cetirizine": [10], "prednisone": [10, 20, 40], "azithromycin": [250, 500],
    "ondansetron": [4, 8], "loratadine": [10],
}
# canonical frequency -> {style: [(phrase, marker), ...]}
FREQUENCIES: dict[str, dict[str, list]] = {
    "once daily": {"clean": [("once daily", SEEN)], "abbr": [("qd", SEEN), ("daily", SEEN)],
                   "lay": [("once a day", SEEN), ("every morning", SEEN), ("one time per day", "one time per day")]},
    "twice daily": {"clean": [("twice daily", SEEN)], "abbr": [("BID", SEEN), ("b.i.d.", "b.i.d.")],
                    "lay": [("morning and night", SEEN), ("two times a day", "two times a day")]},
    "three times daily": {"clean": [("three times daily", SEEN)], "abbr": [("TID", SEEN), ("t.i.d.", "t.i.d.")],
                          "lay": [("with each meal", SEEN), ("three times a day", SEEN)]},
    "every 6 hours": {"clean": [("every 6 hours", SEEN)], "abbr": [("q6h", SEEN), ("Q6H", "Q6H")],
                      "lay": [("every six hours", SEEN), ("four times a day, six hours apart", "six hours apart")]},
    "every 8 hours": {"clean": [("every 8 hours", SEEN)], "abbr": [("q8h", SEEN)],
                      "lay": [("every eight hours", SEEN), ("three times a day, eight hours apart",
                                                            "eight hours apart")]},
    "as needed": {"clean": [("as needed", SEEN)], "abbr": [("PRN", SEEN), ("p.r.n.", "p.r.n.")],
                  "lay": [("whenever needed", SEEN), ("only when it gets bad", "only when it gets bad")]},
    "at bedtime": {"clean": [("at bedtime", SEEN)], "abbr": [("qhs", SEEN)],
                   "lay": [("before going to sleep", SEEN), ("last thing at night", "last thing at night")]},
}
DURATION_WORDS = {1: ["since yesterday", "for a day"], 7: ["for a week"], 14: ["for two weeks"]}


#: Every test-only marker a choice point has offered (filled while building; see test_only_markers()).
_MARKERS: set[str] = set()


def choose(rng: random.Random, options: list, novel_ok: bool, novel: list[str]):
    """Pick one (text, marker) option; test-only options only when ``novel_ok``, with NOVEL_PROBABILITY."""
    seen = [o for o in options if o[1] is None]
    unseen = [o for o in options if o[1] is not None]
    _MARKERS.update(marker for _, marker in unseen)
    if novel_ok and unseen and rng.random() < NOVEL_PROBABILITY:
        text, marker = rng.choice(unseen)
        novel.append(marker)
        return text
    return rng.choice(seen)[0]


# --- step 1: the label ------------------------------------------------------------------------------

def sample_label(rng: random.Random) -> dict:
    """A random gold label; each part may be absent (null or an empty list)."""
    n_symptoms = rng.choice([1, 2, 2, 3, 3])
    symptoms = rng.sample(list(SYMPTOMS), n_symptoms)
    temperature = round(rng.uniform(97.0, 104.0), 1) if rng.random() < 0.6 else None
    heart_rate = rng.randint(52, 132) if rng.random() < 0.6 else None
    blood_pressure = f"{rng.randint(95, 175)}/{rng.randint(55, 105)}" if rng.random() < 0.6 else None
    meds = []
    for name in rng.sample(list(MEDICATIONS), rng.choice([0, 0, 1, 1, 1, 2])):
        dose = rng.choice(MEDICATIONS[name])
        meds.append({"name": name, "dose": dose if isinstance(dose, str) else f"{dose} mg",
                     "frequency": rng.choice(list(FREQUENCIES))})
    return {
        "patient_age": rng.randint(18, 92) if rng.random() < 0.85 else None,
        "symptoms": symptoms,
        "vital_signs": {"temperature": temperature, "heart_rate": heart_rate, "blood_pressure": blood_pressure},
        "medications": meds,
        "duration_days": rng.choice([1, 2, 3, 4, 5, 6, 7, 10, 14]) if rng.random() < 0.8 else None,
    }


# --- step 2: the note ------------------------------------------------------------------------------

def _a(number: int) -> str:
    """The article before a number said aloud: "an 80-year-old", "an 18-year-old", "a 45-year-old"."""
    return "An" if str(number).startswith("8") or number in (11, 18) else "A"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Renderer:
    """Renders one label in one style; ``novel_ok`` lets it use test-only phrasings."""

    def __init__(self, rng: random.Random, label: dict, style: str, novel_ok: bool):
        self.rng, self.label, self.style, self.novel_ok = rng, label, style, novel_ok
        self.novel: list[str] = []
        self.sex = rng.choice(["M", "F"])
        self.subj = {"M": "he", "F": "she"}[self.sex]
        self.noun = {"M": rng.choice(["man", "male"]), "F": rng.choice(["woman", "female"])}[self.sex]

    def pick(self, options: list) -> str:
        return choose(self.rng, options, self.novel_ok, self.novel)

    # each part returns a phrase; None when the label has nothing to say
    def intro(self) -> str:
        age, rng = self.label["patient_age"], self.rng
        if self.style == "abbr":
            if age is None:
                return self.pick([(f"Pt {self.sex}", SEEN), (f"{self.sex} pt", SEEN)])
            return self.pick([(f"{age} yo {self.sex}", SEEN), (f"{age}{self.sex}", SEEN),
                              (f"{age} y/o {self.sex}", SEEN), (f"Pt ({age} yrs, {self.sex})", "yrs,")])
        if self.style == "lay":
            if age is None:
                return self.pick([(f"A {self.noun} who did not give an age", SEEN),
                                  (f"A {self.noun} of unrecorded age", SEEN)])
            words = number_words(age) if age < 100 else str(age)
            return self.pick([(f"A {self.noun} aged {words}", SEEN), (f"{_a(age)} {words}-year-old {self.noun}", SEEN),
                              (f"A {self.noun} who turned {words} this year", "who turned")])
        if age is None:
            return rng.choice([f"An adult {self.noun}", f"A {self.noun} (age not recorded)"])
        return self.pick([(f"{_a(age)} {age}-year-old {self.noun}", SEEN),
                          (f"{self.noun.capitalize()}, {age} years old,", SEEN),
                          (f"Patient, a {self.noun} of {age} years,", "Patient, a")])

    def symptoms(self) -> str:
        style = self.style if self.style in ("abbr", "lay") else "clean"
        phrases = [self.pick(SYMPTOMS[s][style]) for s in self.label["symptoms"]]
        return ", ".join(phrases) if style == "abbr" else _join(phrases)

    def duration(self) -> str | None:
        days, rng = self.label["duration_days"], self.rng
        if days is None:
            return None
        if self.style == "abbr":
            return self.pick([(f"x{days}d", SEEN), (f"x {days} days", SEEN), (f"D{days} of illness", "of illness")])
        if self.style == "lay":
            options = [(w, SEEN) for w in DURATION_WORDS.get(days, [])]
            options += [(f"for {number_words(days)} days", SEEN) if days > 1 else ("for one day", SEEN)]
            if days <= 4:
                options.append((f"for the last {24 * days} hours", "for the last"))
            return self.pick(options)
        return rng.choice([f"for {days} days" if days > 1 else "for 1 day",
                           f"over the past {days} days" if days > 1 else "over the past day"])

    def vitals(self) -> str | None:
        v = self.label["vital_signs"]
        parts = []
        if self.style == "abbr":
            if v["temperature"] is not None:
                parts.append(self.pick([(f"T {v['temperature']}", SEEN), (f"Temp {v['temperature']}F", SEEN),
                                        (f"Tmax {v['temperature']}", "Tmax")]))
            if v["heart_rate"] is not None:
                parts.append(self.pick([(f"HR {v['heart_rate']}", SEEN),
                                        (f"pulse rate {v['heart_rate']}/min", "/min")]))
            if v["blood_pressure"] is not None:
                parts.append(self.pick([(f"BP {v['blood_pressure']}", SEEN)]))
            return ", ".join(parts) if parts else None
        if self.style == "lay":
            if v["temperature"] is not None:
                parts.append(self.pick([(f"{v['temperature']} F on the thermometer", SEEN),
                                        (f"a temperature of {v['temperature']} degrees", SEEN),
                                        (f"{v['temperature']} on the home thermometer", "home thermometer")]))
            if v["heart_rate"] is not None:
                parts.append(self.pick([(f"a pulse of {v['heart_rate']}", SEEN),
                                        (f"a heart beating {v['heart_rate']} times a minute", "times a minute")]))
            if v["blood_pressure"] is not None:
                sys_, dia = v["blood_pressure"].split("/")
                parts.append(self.pick([(f"a blood pressure of {sys_} over {dia}", SEEN),
                                        (f"a pressure reading of {sys_} on {dia}", "reading of")]))
            return _join(parts) if parts else None
        if v["temperature"] is not None:
            parts.append(self.pick([(f"temperature {v['temperature']} °F", SEEN),
                                    (f"temp {v['temperature']} F", SEEN)]))
        if v["heart_rate"] is not None:
            parts.append(self.pick([(f"heart rate {v['heart_rate']} bpm", SEEN), (f"pulse {v['heart_rate']}", SEEN)]))
        if v["blood_pressure"] is not None:
            parts.append(self.pick([(f"blood pressure {v['blood_pressure']} mmHg", SEEN),
                                    (f"BP of {v['blood_pressure']}", SEEN)]))
        return ", ".join(parts) if parts else None

    def medication(self, med: dict) -> str:
        style = self.style if self.style in ("abbr", "lay") else "clean"
        freq = self.pick(FREQUENCIES[med["frequency"]][style])
        dose = med["dose"]
        if style == "abbr":
            dose = dose.replace(" mg", "mg")
            return self.pick([(f"{med['name']} {dose} PO {freq}", SEEN), (f"{med['name']} {dose} {freq}", SEEN)])
        if style == "lay" and dose.endswith(" mg"):
            dose = self.pick([(dose, SEEN), (dose.replace(" mg", " milligrams"), "milligrams")])
        return f"{med['name']} {dose} {freq}"

    def meds(self) -> str | None:
        meds = self.label["medications"]
        if not meds:
            if self.style == "abbr":
                return self.pick([("NKDA, no meds", SEEN), ("meds: none", SEEN)])
            return self.pick([("takes no regular medication", SEEN), ("is on no medication", SEEN),
                              ("denies taking any medicines", "denies taking")])
        return _join([self.medication(m) for m in meds])


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def render_note(rng: random.Random, label: dict, category: str, novel_ok: bool) -> tuple[str, list[str]]:
    """The note for ``label`` in ``category``, and the test-only markers it uses."""
    base_style = {"clean": "clean", "abbreviations": "abbr", "implicit": "lay",
                  "typos": rng.choice(["clean", "clean", "lay"]),
                  "irrelevant": rng.choice(["clean", "abbr"])}[category]
    r = Renderer(rng, label, base_style, novel_ok)
    intro, symptoms, duration, vitals, meds = r.intro(), r.symptoms(), r.duration(), r.vitals(), r.meds()
    has_meds = bool(label["medications"])
    if base_style == "abbr":
        first = f"{intro} c/o {symptoms}" + (f" {duration}" if duration else "")
        med = f"Meds: {meds}" if has_meds else meds
        if r.pick([("plain", SEEN), ("soap", "Subj:")]) == "soap":
            sentences = [f"Subj: {first}", f"Obj: {vitals or 'vitals not taken'}", med]
        else:
            sentences = [first] + ([vitals] if vitals else []) + [med]
    elif base_style == "lay":
        pron = r.subj.capitalize()
        sentences = [f"{intro} {symptoms}"]
        if duration:
            sentences.append(f"It has been going on {duration}")
        if vitals:
            sentences.append(f"At the visit we measured {vitals}")
        sentences.append(f"{pron} is taking {meds}" if has_meds else f"{pron} {meds}")
        if r.pick([("", SEEN), ("call", "Phone call")]) == "call":
            sentences[0] = "Phone call from the family: " + sentences[0][0].lower() + sentences[0][1:]
    else:
        sentences = [f"{intro} presents with {symptoms}" + (f" {duration}" if duration else ""),
                     f"On examination: {vitals}" if vitals else "Vital signs were not recorded"]
        if has_meds:
            sentences.append(r.pick([(f"Current medications: {meds}", SEEN),
                                     (f"{r.subj.capitalize()} takes {meds}", SEEN)]))
        else:
            sentences.append(f"{r.subj.capitalize()} {meds}")
        if r.pick([("", SEEN), ("header", "Triage note")]) == "header":
            sentences.insert(0, "Triage note")
    novel = list(r.novel)
    if category == "irrelevant":
        for extra in distractors(rng, label, novel_ok, novel):
            sentences.insert(rng.randint(1, len(sentences)), extra)
    note = " ".join(_sentence(s) for s in sentences)
    if category == "typos":
        note = add_typos(rng, note)
    return " ".join(note.split()), novel


def distractors(rng: random.Random, label: dict, novel_ok: bool, novel: list[str]) -> list[str]:
    """One to three sentences with numbers, ages or medicines that are not the patient's."""
    other_med = rng.choice([m for m in MEDICATIONS if m not in {x["name"] for x in label["medications"]}])
    dose = rng.choice(MEDICATIONS[other_med])
    dose = dose if isinstance(dose, str) else f"{dose} mg"
    relation = rng.choice(["mother", "father", "brother", "sister", "son", "daughter"])
    pool = [
        (f"Seen in room {rng.randint(101, 450)}.", SEEN),
        (f"Weight {rng.randint(48, 120)} kg, height {rng.randint(150, 198)} cm.", SEEN),
        (f"Callback extension {rng.randint(2000, 8999)}.", SEEN),
        (f"The patient's {relation}, aged {rng.randint(8, 90)}, had similar symptoms last month.", SEEN),
        (f"O2 sat {rng.randint(92, 100)}%, RR {rng.randint(12, 24)}.", SEEN),
        (f"Spouse takes {other_med} {dose}.", SEEN),
        (f"Family history: {relation} had a stroke at {rng.randint(45, 85)}.", SEEN),
        (f"Glucose {rng.randint(70, 180)} mg/dL.", "Glucose"),
        (f"Previous admission {rng.randint(2, 9)} years ago.", "Previous admission"),
        (f"Follow-up booked for {rng.randint(8, 17)}:{rng.choice(['00', '15', '30', '45'])}.", "Follow-up booked"),
        (f"Roommate was prescribed {other_med} {dose} twice daily.", "Roommate"),
    ]
    chosen = []
    for _ in range(rng.randint(1, 3)):
        text = choose(rng, [p for p in pool if p[0] not in chosen], novel_ok, novel)
        chosen.append(text)
    return chosen


def add_typos(rng: random.Random, note: str, rate: float = 0.3) -> str:
    """Drop, double or swap a letter in about ``rate`` of the alphabetic words of 4+ letters; digits untouched."""
    words = note.split(" ")
    for i, word in enumerate(words):
        core = word.rstrip(".,:;")
        if len(core) < 4 or not core.isalpha() or rng.random() >= rate:
            continue
        j = rng.randint(1, len(core) - 2)
        kind = rng.choice(["drop", "double", "swap"])
        if kind == "drop":
            core2 = core[:j] + core[j + 1:]
        elif kind == "double":
            core2 = core[:j] + core[j] + core[j:]
        else:
            core2 = core[:j] + core[j + 1] + core[j] + core[j + 2:]
        words[i] = core2 + word[len(core):]
    return " ".join(words)


# --- the whole file ----------------------------------------------------------------------------------

def build(seed: int = SEED) -> list[dict]:
    """Every record, in file order (categories interleaved by a seeded shuffle)."""
    rng = random.Random(seed)
    records, texts = [], set()
    for category, size in CATEGORY_SIZES.items():
        n_test = round(size * SPLIT_SHARES["test"])
        n_val = round(size * SPLIT_SHARES["validation"])
        splits = ["test"] * n_test + ["validation"] * n_val + ["train"] * (size - n_test - n_val)
        rng.shuffle(splits)
        for split in splits:
            label = sample_label(rng)
            for _ in range(100):
                text, novel = render_note(rng, label, category, novel_ok=split == "test")
                if text not in texts:
                    break
                label = sample_label(rng)
            else:
                raise RuntimeError("could not render a unique note")
            problems = check_schema(label)
            if problems:
                raise AssertionError(f"generated an invalid label {label}: {problems}")
            format_answer(label)
            texts.add(text)
            records.append({"category": category, "split": split, "text": text, "label": label,
                            "novel": sorted(set(novel))})
    rng.shuffle(records)
    return [{"id": f"note-{i:03d}", **r} for i, r in enumerate(records)]


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def test_only_markers() -> list[str]:
    """A literal piece of every phrasing and distractor that only test notes may use."""
    if not _MARKERS:
        build()
    return sorted(_MARKERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="compare with the file on disk instead of writing")
    args = parser.parse_args(argv)
    text = to_jsonl(build())
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{args.out} differs from a fresh build: run this script again")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    counts = {}
    for r in records:
        counts.setdefault(r["category"], {}).setdefault(r["split"], 0)
        counts[r["category"]][r["split"]] += 1
    print(f"wrote {len(records)} notes to {args.out}")
    for category, splits in counts.items():
        print(f"  {category:14s} " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    print(f"  test notes with a test-only phrasing: {sum(bool(r['novel']) for r in records if r['split'] == 'test')}"
          f" of {sum(r['split'] == 'test' for r in records)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
