"""Write two more held-out text domains for the pruning and recovery benchmarks (issue 33), offline.

    python scripts/build_heldout_domains.py            # writes both files in data/
    python scripts/build_heldout_domains.py --check    # fails if a file on disk differs from a fresh build

* ``data/course_prose_sample.jsonl``: paragraphs of the course's own explanations (the markdown cells of its
  notebooks and the chapter READMEs), read with ``git show`` at one pinned commit (``PROSE_COMMIT``), so later
  edits do not change the sample. Technical English prose, written for this course.
* ``data/python_reference_sample.jsonl``: paragraphs of the Python Language Reference as CPython ships it in
  ``pydoc_data.topics`` (the text ``help("if")`` prints), from Python ``PYTHON_VERSION``. Python's documentation
  is distributed under the PSF License Agreement, which allows copying it with its notice (data/README.md).

Both were chosen as held-out domains before any default was tuned on them (commit history shows the order).
A paragraph is a block of text between blank lines, whitespace-normalised; tables, code, headings, images and
lists of links are left out. Paragraphs of ``MIN_CHARS`` to ``MAX_CHARS`` characters are kept, duplicates
dropped, in source order, thinned evenly to at most ``MAX_RECORDS``; ``utils.load_texts`` then splits them by
position like the other samples (20 % test, 10 % validation).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jsonl_outputs import write_or_check  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROSE_OUTPUT = ROOT / "data" / "course_prose_sample.jsonl"
REFERENCE_OUTPUT = ROOT / "data" / "python_reference_sample.jsonl"
PROSE_COMMIT = "dfa20a1"
PYTHON_VERSION = "3.11"
MIN_CHARS, MAX_CHARS, MAX_RECORDS = 300, 1200, 240


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _is_prose(block: str) -> bool:
    """Whether a paragraph is running text: no table, code, heading, image, list of links or HTML."""
    first = block.lstrip()
    if first.startswith(("|", "#", "```", "<", "!", "    ", ">")):
        return False
    if "::=" in block or re.search(r"^\s*(>>>|\$ )", block, re.M):  # grammar rules, interpreter sessions
        return False
    letters = sum(c.isalpha() for c in block)
    return letters > 0.6 * len(block) and block.count(". ") + block.endswith(".") >= 2


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of ``text`` (blocks between blank lines), whitespace-normalised."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        if _is_prose(block):
            flat = " ".join(block.split())
            if MIN_CHARS <= len(flat) <= MAX_CHARS:
                out.append(flat)
    return out


def _thin(records: list[dict]) -> list[dict]:
    """Unique texts in order, thinned evenly to at most MAX_RECORDS (every k-th, so every source stays in)."""
    seen, unique = set(), []
    for record in records:
        if record["text"] not in seen:
            seen.add(record["text"])
            unique.append(record)
    if len(unique) <= MAX_RECORDS:
        return unique
    step = len(unique) / MAX_RECORDS
    return [unique[int(i * step)] for i in range(MAX_RECORDS)]


def build_course_prose() -> list[dict]:
    files = sorted(p for p in _git("ls-tree", "-r", "--name-only", PROSE_COMMIT, "notebooks/").split()
                   if p.endswith((".ipynb", "README.md")))
    records = []
    for path in files:
        source = _git("show", f"{PROSE_COMMIT}:{path}")
        if path.endswith(".ipynb"):
            cells = json.loads(source)["cells"]
            source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        records += [{"text": text, "source": path} for text in paragraphs(source)]
    return _thin(records)


def build_python_reference() -> list[dict]:
    if f"{sys.version_info.major}.{sys.version_info.minor}" != PYTHON_VERSION:
        raise SystemExit(f"python_reference_sample.jsonl is built from Python {PYTHON_VERSION}'s pydoc_data; this "
                         f"is Python {sys.version.split()[0]}. Run the script with Python {PYTHON_VERSION}.")
    from pydoc_data.topics import topics

    records = []
    for topic in sorted(topics):
        records += [{"text": text, "source": f"pydoc_data.topics[{topic!r}]"} for text in paragraphs(topics[topic])]
    return _thin(records)


def main(argv: list[str] | None = None) -> int:
    outputs = [(PROSE_OUTPUT, build_course_prose), (REFERENCE_OUTPUT, build_python_reference)]
    return write_or_check(outputs, argv, script="build_heldout_domains.py",
                          what="both held-out domain files are", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
