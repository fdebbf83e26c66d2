"""Execute the course notebooks headlessly, one after another, into runs/<profile>/.

    python scripts/run_notebooks.py                      # every notebook, cpu profile
    python scripts/run_notebooks.py --chapter CH04       # one chapter (comma-separated for several)
    python scripts/run_notebooks.py --notebook CH03_NB01 -p MAX_CONTEXT 8192

Each notebook runs with papermill in its own folder (so relative paths work as in Jupyter); the
executed copy, with all outputs, is written to runs/<profile>/<notebook>.ipynb. The notebooks save
their key figures as JSON next to it; at the end RESULTS.md is rebuilt from those files.
On the first failure the run stops and names the notebook and the cell that failed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def find_notebooks(chapters: str | None, names: str | None) -> list[Path]:
    paths = sorted(p for p in NOTEBOOKS.rglob("CH*_NB*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if chapters:
        wanted = [c.strip().upper() for c in chapters.split(",") if c.strip()]
        paths = [p for p in paths if any(p.name.upper().startswith(c + "_") for c in wanted)]
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        paths = [p for p in paths if any(p.stem.startswith(n) for n in wanted)]
    return paths


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
    parser.add_argument("--chapter", help="e.g. CH04 or CH02,CH04")
    parser.add_argument("--notebook", help="notebook name prefix, e.g. CH04_NB01")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                        help="override a value of the notebooks' parameters cell (Python literal)")
    parser.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    parser.add_argument("--no-collect", action="store_true", help="do not rebuild RESULTS.md at the end")
    parser.add_argument("--benchmark", action=argparse.BooleanOptionalAction, default=None,
                        help="also run scripts/benchmark.py (default: only when running every notebook)")
    args = parser.parse_args(argv)

    os.environ["RLLM_PROFILE"] = args.profile
    if args.profile != "full":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.pop("MPLBACKEND", None)  # let the kernel use its inline backend, so figures are saved
    sys.path.insert(0, str(ROOT))

    import papermill

    paths = find_notebooks(args.chapter, args.notebook)
    if not paths:
        print(f"No notebook matches chapter={args.chapter!r} notebook={args.notebook!r}.", file=sys.stderr)
        print("Available: " + ", ".join(p.stem for p in find_notebooks(None, None)), file=sys.stderr)
        return 2
    out_dir = ROOT / "runs" / args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {name: parse_value(value) for name, value in args.parameter}
    timings_path = out_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    failures = []
    print(f"Running {len(paths)} notebook(s) in the '{args.profile}' profile -> {out_dir.relative_to(ROOT)}/")
    for number, path in enumerate(paths, 1):
        output = out_dir / path.name
        print(f"\n[{number}/{len(paths)}] {path.relative_to(ROOT)}", flush=True)
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
        timings[path.stem] = round(seconds, 1)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        print(f"    done in {seconds:.0f} s -> {output.relative_to(ROOT)}")

    if args.benchmark or (args.benchmark is None and not args.chapter and not args.notebook and not failures):
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
