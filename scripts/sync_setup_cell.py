"""Copy notebooks/setup_cell.py into cell 1 (the first code cell) of every course notebook.

    python scripts/sync_setup_cell.py           # rewrite the notebooks whose setup cell differs
    python scripts/sync_setup_cell.py --check   # only report them; exit status 1 if any differs

The setup cell, and the repository URL in it, live in one place: notebooks/setup_cell.py. Edit that
file, then run this script. A notebook whose cell 1 is not a setup cell (it does not start with
"# Setup") gets one inserted there. Outputs are not touched (notebooks are stored without them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SETUP_FILE = ROOT / "notebooks" / "setup_cell.py"
SETUP_INDEX = 1  # cell 0 is the title markdown


def setup_source(path: Path = SETUP_FILE) -> str:
    """The setup cell's code, as notebooks store it (no trailing newline)."""
    return path.read_text(encoding="utf-8").strip()


def course_notebooks(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def sync(path: Path, source: str, write: bool = True) -> bool:
    """Make cell 1 of ``path`` the setup cell; return True if the notebook was (or would be) changed."""
    nb = nbformat.read(path, as_version=4)
    cell = nb.cells[SETUP_INDEX] if len(nb.cells) > SETUP_INDEX else None
    if cell is not None and cell.cell_type == "code" and cell.source.startswith("# Setup"):
        if cell.source == source:
            return False
        cell.source = source
    else:
        nb.cells.insert(SETUP_INDEX, nbformat.v4.new_code_cell(source))
    if write:
        nbformat.write(nb, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a notebook is out of date")
    args = parser.parse_args(argv)
    source = setup_source()
    changed = [p for p in course_notebooks() if sync(p, source, write=not args.check)]
    for path in changed:
        print(f"{'out of date' if args.check else 'updated'}: {path.relative_to(ROOT)}")
    if not changed:
        print("Every notebook's setup cell matches notebooks/setup_cell.py.")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
