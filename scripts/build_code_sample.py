"""Write data/course_code_sample.jsonl: Python functions from the course's own ``utils`` package.

    python scripts/build_code_sample.py            # writes data/course_code_sample.jsonl
    python scripts/build_code_sample.py --check    # fails if the file on disk differs from a fresh build

A text domain unlike the course's prose samples (encyclopedia, textbook, text messages, clinical
notes): source code with docstrings, written for this course. It is the held-out domain of the pruning
benchmark (``scripts/benchmark.py``): no pruning default was tuned on it.

The texts come from one pinned commit (``SOURCE_COMMIT``), read with ``git show``, so later edits of
``utils`` do not change the sample. Every top-level function and every method whose source (with its
decorators and docstring) is 300-1,500 characters long becomes one record, in file and line order;
``load_texts`` then splits the records by position like the other samples (20 % test, 10 %
validation).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "data" / "course_code_sample.jsonl"
SOURCE_COMMIT = "d672f49"
MIN_CHARS, MAX_CHARS, MAX_RECORDS = 300, 1500, 300


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _functions(source: str):
    lines = source.splitlines()
    tree = ast.parse(source)
    nodes = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            nodes += [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nodes.append(node)
    for node in sorted(nodes, key=lambda n: n.lineno):
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        block = lines[start:node.end_lineno]
        indent = min(len(line) - len(line.lstrip()) for line in block if line.strip())
        yield node.name, "\n".join(line[indent:] for line in block).strip()


def build() -> list[dict]:
    files = sorted(p for p in _git("ls-tree", "--name-only", SOURCE_COMMIT, "utils/").split()
                   if p.endswith(".py") and not p.endswith("__init__.py"))
    records, seen = [], set()
    for path in files:
        for name, text in _functions(_git("show", f"{SOURCE_COMMIT}:{path}")):
            if MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
                seen.add(text)
                records.append({"text": text, "source": f"{path}:{name}"})
    return records[:MAX_RECORDS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the file on disk instead of writing")
    args = parser.parse_args()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build())
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            sys.exit(f"{OUTPUT} differs from a fresh build: run python scripts/build_code_sample.py")
        print(f"{OUTPUT} is up to date.")
        return
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} records to {OUTPUT}")


if __name__ == "__main__":
    main()
