"""Execute the course notebooks headlessly, one after another, into runs/<profile>/.

    python scripts/run_notebooks.py                      # every notebook, cpu profile
    python scripts/run_notebooks.py --chapter CH04       # one chapter (comma-separated; APPB, APPC: appendices)
    python scripts/run_notebooks.py --notebook CH03_NB01 -p MAX_CONTEXT 8192
    python scripts/run_notebooks.py --plan               # only print what would run and how long it takes

Before starting, the runner prints its plan: each notebook with its expected time in the chosen profile
(measured, read from the "Run time" table of each chapter README; "?" where nobody has measured it yet)
and the total; then one progress line per notebook. Each notebook runs with papermill in its own
folder (so relative paths work as in Jupyter); the executed copy, with all outputs, is written to
runs/<profile>/<notebook>.ipynb. The notebooks save their key figures as JSON next to it; at the end
RESULTS.md is rebuilt from those files.
On the first failure the run stops and names the notebook and the cell that failed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PROFILES = ("tiny", "cpu", "full")
#: Chapters are CHxx (CH02, ...) and appendices APPx (APPB, ...): a notebook is <chapter>_NBnn_<what>.ipynb.
CHAPTER = r"(?:CH\d+|APP[A-Z])"
NOTEBOOK_NAME = re.compile(CHAPTER + r"_NB\d+\w*")
#: The header of the run-time table in every chapter README (one row per notebook, times in seconds).
RUNTIME_HEADER = ("notebook",) + PROFILES


def chapter_order(path: Path) -> tuple[bool, str]:
    """Chapters first (CH02, CH03, ...), then the appendices (APPB, APPC, ...)."""
    return (path.name.startswith("APP"), path.name)


def find_notebooks(chapters: str | None, names: str | None) -> list[Path]:
    paths = sorted((p for p in NOTEBOOKS.rglob("*_NB*.ipynb")
                    if ".ipynb_checkpoints" not in p.parts and NOTEBOOK_NAME.fullmatch(p.stem)),
                   key=chapter_order)
    if chapters:
        wanted = [c.strip().upper() for c in chapters.split(",") if c.strip()]
        paths = [p for p in paths if any(p.name.upper().startswith(c + "_") for c in wanted)]
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        paths = [p for p in paths if any(p.stem.startswith(n) for n in wanted)]
    return paths


def parse_seconds(cell: str) -> float | None:
    """``"143 s"`` -> 143.0, ``"2 min"`` -> 120.0, ``"?"`` (not measured yet) -> None."""
    cell = cell.strip()
    if cell == "?":
        return None
    match = re.fullmatch(r"~?\s*(\d+(?:\.\d+)?)\s*(s|min)", cell)
    if not match:
        raise ValueError(f"{cell!r} is not a run time: write it as '143 s', '2 min' or '?' (not measured)")
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def parse_runtime_table(text: str, source: str = "README.md") -> dict[str, dict[str, float | None]]:
    """Read the run-time table of a chapter README: ``{notebook: {"tiny": s, "cpu": s, "full": s}}``.

    The table is the one whose header is ``| notebook | tiny | cpu | full |``; each row names a
    notebook (its file name without ``.ipynb``) and gives a time per profile ('95 s', '2 min' or '?').
    """
    lines = [line.strip() for line in text.splitlines()]
    cells = [[c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else None for line in lines]
    try:
        start = next(i for i, row in enumerate(cells) if row and tuple(c.lower() for c in row) == RUNTIME_HEADER)
    except StopIteration:
        raise ValueError(f"{source}: no run-time table; add one with the header "
                         f"| {' | '.join(RUNTIME_HEADER)} | and a row per notebook") from None
    times: dict[str, dict[str, float | None]] = {}
    for row in cells[start + 2:]:
        if row is None:
            break
        name = re.sub(r"[`\[\]]|\(.*\)", "", row[0]).strip()
        if len(row) != len(RUNTIME_HEADER) or not NOTEBOOK_NAME.fullmatch(name):
            raise ValueError(f"{source}: run-time row {row} should be | CHxx_NByy_name | tiny | cpu | full | "
                             "(or APPx_NByy_name for an appendix)")
        try:
            times[name] = {profile: parse_seconds(cell) for profile, cell in zip(PROFILES, row[1:])}
        except ValueError as error:
            raise ValueError(f"{source}, row {name}: {error}") from None
    return times


def read_expected_times(notebooks_dir: Path = NOTEBOOKS, strict: bool = True) -> dict[str, dict[str, float | None]]:
    """The measured run time of every notebook per profile, from the chapter READMEs' run-time tables.

    ``strict=False`` prints a malformed README's problem and skips it instead of raising ValueError.
    """
    times: dict[str, dict[str, float | None]] = {}
    for readme in sorted(p for p in notebooks_dir.glob("*/README.md") if re.match(CHAPTER + "_", p.parent.name)):
        try:
            times.update(parse_runtime_table(readme.read_text(encoding="utf-8"), str(readme.relative_to(ROOT))))
        except ValueError as error:
            if strict:
                raise
            print(f"(no expected times from {error})", file=sys.stderr)
    return times


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def plan_lines(paths: list[Path], profile: str, expected: dict[str, dict[str, float | None]],
               benchmark: bool = False) -> list[str]:
    """What a run will do, with each notebook's expected time in ``profile`` and the total."""
    known = [expected.get(p.stem, {}).get(profile) for p in paths]
    width = max(len(p.stem) for p in paths)
    lines = [f"Plan: {len(paths)} notebook(s) in the '{profile}' profile. Expected times were measured "
             "(chapter READMEs, 'Run time'); '?' = not measured yet."]
    for number, (path, seconds) in enumerate(zip(paths, known), 1):
        lines.append(f"  [{number}/{len(paths)}] {path.stem:<{width}}  ~{format_seconds(seconds)}")
    if benchmark:
        lines.append("  then scripts/benchmark.py (our utilities next to optipfair)  ~?")
    measured = [s for s in known if s is not None]
    missing = len(known) - len(measured)
    if not measured:
        lines.append("  Expected total: unknown (no notebook has a measured time in this profile yet).")
    else:
        total = sum(measured)
        total_text = f"{total:.0f} s" if total < 120 else f"{total:.0f} s, about {total / 60:.0f} min"
        unknown = [f"{missing} notebook(s) not measured yet"] * bool(missing) + ["the benchmark"] * benchmark
        lines.append(f"  Expected total: ~{total_text}" + (f", plus {' and '.join(unknown)}" if unknown else "") + ".")
    return lines


def progress_line(number: int, count: int, name: str, seconds: float, expected: float | None) -> str:
    """``[3/8] CH04_NB01_block_importance done in 95 s (expected ~100 s)``."""
    return f"[{number}/{count}] {name} done in {seconds:.0f} s (expected ~{format_seconds(expected)})"


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain string


def failing_cell(output: Path) -> str:
    """Describe the first cell with an error output in an executed notebook."""
    import nbformat

    try:
        nb = nbformat.read(output, as_version=4)
    except Exception:  # noqa: BLE001 - best effort only
        return "unknown cell"
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                return f"cell {index} (starts with: {first_line[:70]!r}): {out.get('ename')}: {out.get('evalue')}"
    return "unknown cell"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", choices=["cpu", "tiny", "full"])
    parser.add_argument("--chapter", help="e.g. CH04, APPB (an appendix) or CH02,CH04")
    parser.add_argument("--notebook", help="notebook name prefix, e.g. CH04_NB01")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                        help="override a value of the notebooks' parameters cell (Python literal)")
    parser.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    parser.add_argument("--no-collect", action="store_true", help="do not rebuild RESULTS.md at the end")
    parser.add_argument("--benchmark", action=argparse.BooleanOptionalAction, default=None,
                        help="also run scripts/benchmark.py (default: only when running every notebook)")
    parser.add_argument("--plan", action="store_true", help="only print the plan (notebooks, expected times)")
    args = parser.parse_args(argv)

    paths = find_notebooks(args.chapter, args.notebook)
    if not paths:
        print(f"No notebook matches chapter={args.chapter!r} notebook={args.notebook!r}.", file=sys.stderr)
        print("Available: " + ", ".join(p.stem for p in find_notebooks(None, None)), file=sys.stderr)
        return 2
    expected = read_expected_times(strict=False)  # a malformed README must not stop a run
    benchmark = bool(args.benchmark or (args.benchmark is None and not args.chapter and not args.notebook))
    out_dir = ROOT / "runs" / args.profile
    print("\n".join(plan_lines(paths, args.profile, expected, benchmark)))
    print(f"Executed notebooks and results go to {out_dir.relative_to(ROOT)}/.", flush=True)
    if args.plan:
        return 0

    os.environ["RLLM_PROFILE"] = args.profile
    if args.profile != "full":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.pop("MPLBACKEND", None)  # let the kernel use its inline backend, so figures are saved
    os.environ["RLLM_HEADLESS"] = "1"  # no one sees widgets here: utils.explore draws static figures instead
    sys.path.insert(0, str(ROOT))

    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {name: parse_value(value) for name, value in args.parameter}
    timings_path = out_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    failures, succeeded = [], 0
    run_start = time.perf_counter()
    for number, path in enumerate(paths, 1):
        output = out_dir / path.name
        guess = expected.get(path.stem, {}).get(args.profile)
        print(f"\n[{number}/{len(paths)}] {path.stem} ... (expected ~{format_seconds(guess)})", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(path), str(output), parameters=parameters or None, cwd=str(path.parent),
                                       kernel_name="python3", progress_bar=True, report_mode=False)
        except Exception as error:  # noqa: BLE001 - papermill raises several types
            where = failing_cell(output) if output.exists() else str(error).splitlines()[0]
            print(f"\nFAILED: {path.relative_to(ROOT)} — {where}", file=sys.stderr)
            print(f"The executed copy with the error is at {output.relative_to(ROOT)}", file=sys.stderr)
            failures.append(path.stem)
            if not args.keep_going:
                break
            continue
        seconds = time.perf_counter() - start
        succeeded += 1
        timings[path.stem] = round(seconds, 1)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        print(progress_line(number, len(paths), path.stem, seconds, guess) + f" -> {output.relative_to(ROOT)}",
              flush=True)
    print(f"\n{succeeded} of {len(paths)} notebook(s) done in {format_seconds(time.perf_counter() - run_start)}.")

    if benchmark and (args.benchmark or not failures):
        import subprocess

        print("\n[benchmark] scripts/benchmark.py: our utilities next to optipfair", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(ROOT / "scripts" / "benchmark.py")], cwd=ROOT)
        if code:
            print("FAILED: scripts/benchmark.py (see the traceback above)", file=sys.stderr)
            failures.append("benchmark")
        else:
            timings["BENCH_utils_vs_optipfair"] = round(time.perf_counter() - start, 1)
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")

    if not args.no_collect:
        from collect_results import collect

        written = collect(args.profile)
        print(f"\nResults table: {written.relative_to(ROOT)}")
    print(f"Executed notebooks and JSON results: {out_dir.relative_to(ROOT)}/")
    if failures:
        print(f"{len(failures)} notebook(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
