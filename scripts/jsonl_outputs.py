"""Write, or check, the JSONL files a data-build script produces (shared by the scripts/build_*.py that make files).

``write_or_check(outputs, argv, script=..., what=...)`` is such a script's ``main``: each ``(path, build)`` pair is
built; without ``--check`` the file is written, with it the file on disk must equal a fresh build (exit status 1
and the command to run when one differs).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path


def jsonl(records: list[dict]) -> str:
    """One JSON object per line, UTF-8 kept as it is."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_or_check(outputs: Sequence[tuple[Path, Callable[[], list[dict]]]], argv: list[str] | None, *,
                   script: str, what: str, description: str) -> int:
    """Build every output; write it, or with ``--check`` compare it with the file on disk. Returns the exit status."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for output, build in outputs:
        text = jsonl(build())
        if args.check:
            if not output.exists() or output.read_text(encoding="utf-8") != text:
                stale.append(output.name)
            continue
        output.write_text(text, encoding="utf-8")
        print(f"wrote {text.count(chr(10))} records to {output}")
    if stale:
        print(f"{', '.join(stale)} differ from a fresh build: run python scripts/{script}")
        return 1
    if args.check:
        print(f"{what} up to date.")
    return 0
