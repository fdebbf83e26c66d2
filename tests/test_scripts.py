"""The command-line scripts: notebook runner helpers and the results collector."""

import json
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import collect_results  # noqa: E402
import run_notebooks  # noqa: E402
import sync_setup_cell  # noqa: E402


def test_find_notebooks_filters_by_chapter_and_name():
    everything = run_notebooks.find_notebooks(None, None)
    assert everything and all(p.suffix == ".ipynb" for p in everything)
    ch03 = run_notebooks.find_notebooks("ch03", None)
    assert ch03 and all(p.name.startswith("CH03_") for p in ch03)
    assert run_notebooks.find_notebooks(None, "CH03_NB01") == [p for p in everything if p.stem.startswith("CH03_NB01")]
    assert run_notebooks.find_notebooks("CH99", None) == []


def test_unknown_chapter_exits_with_a_message(capsys):
    assert run_notebooks.main(["--profile", "tiny", "--chapter", "CH99", "--no-collect"]) == 2
    assert "Available:" in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("3", 3), ("0.5", 0.5), ("[1, 2]", [1, 2]), ("wikitext", "wikitext"),
                                        ("'a b'", "a b")])
def test_parameter_values_are_python_literals(text, value):
    assert run_notebooks.parse_value(text) == value


def test_failing_cell_is_named(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("1 / 0\nmore")]
    nb.cells[1].outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero",
                                                  traceback=[])]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    message = run_notebooks.failing_cell(path)
    assert message.startswith("cell 1") and "ZeroDivisionError" in message and "1 / 0" in message


def test_collector_builds_tables_from_json(tmp_path):
    run_dir = tmp_path / "runs" / "cpu"
    run_dir.mkdir(parents=True)
    env = {"profile": "cpu", "date": "2026-01-01 00:00 UTC", "device": "CPU", "cpu_threads": 2, "python": "3.11",
           "torch": "2", "transformers": "5", "optipfair": "0.4.2"}
    payload = {"notebook": "CH04_NB01_x", "environment": env,
               "results": {"model": "m",
                           "table": [{"variant": "base", "ppl": 17.25}, {"variant": "pruned", "ppl": 20.5}],
                           "summary": {"ratio": 1.19, "nested": {"ok": True}}}}
    (run_dir / "CH04_NB01_x.json").write_text(json.dumps(payload))
    (run_dir / "timings.json").write_text(json.dumps({"CH04_NB01_x": 12.0}))
    out = collect_results.collect("cpu", root=tmp_path)
    text = out.read_text()
    assert out == tmp_path / "RESULTS.md"
    assert "| variant | ppl |" in text and "| pruned | 20.50 |" in text
    assert "- nested.ok: yes" in text and "CH04 · Depth pruning" in text and "optipfair 0.4.2" in text
    assert "Key numbers:" in text


def test_collector_without_results(tmp_path):
    out = collect_results.collect("tiny", root=tmp_path)
    assert "No results yet" in out.read_text()


def test_distillation_sweep_runs_in_tiny():
    import sweep_distill

    results = sweep_distill.run(["default", "ce-only"])
    variants = [row["variant"] for row in results["table"]]
    assert variants[:2] == ["base (teacher)", "pruned, no recovery"] and len(variants) == 4
    assert all(row["ppl_wikitext"] > 0 and row["ppl_cosmopedia"] > 0 for row in results["table"])
    assert results["defaults"]["alpha"] == sweep_distill.utils.distillation.DEFAULT_ALPHA
    with pytest.raises(SystemExit, match="Available: default"):
        sweep_distill.run(["no-such-variant"])


def test_sync_setup_cell_rewrites_cell_1_and_inserts_a_missing_one(tmp_path):
    source = sync_setup_cell.setup_source()
    stale, bare = tmp_path / "stale.ipynb", tmp_path / "bare.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("# Setup: old\nimport sys"),
                nbformat.v4.new_code_cell("x = 1")]
    nb.cells[1].metadata["keep"] = True
    nbformat.write(nb, stale)
    nb.cells = [nb.cells[0], nb.cells[2]]
    nbformat.write(nb, bare)
    assert sync_setup_cell.sync(stale, source, write=False)  # --check: reports, writes nothing
    assert nbformat.read(stale, as_version=4).cells[1].source.startswith("# Setup: old")
    for path in (stale, bare):
        assert sync_setup_cell.sync(path, source)
        cells = nbformat.read(path, as_version=4).cells
        assert [c.source for c in cells] == ["# Title", source, "x = 1"]
        assert not sync_setup_cell.sync(path, source)  # now in sync
    assert nbformat.read(stale, as_version=4).cells[1].metadata["keep"] is True


def test_every_notebook_setup_cell_is_in_sync(capsys):
    assert sync_setup_cell.main(["--check"]) == 0, capsys.readouterr().out


# --- the plan `make run` prints, from the chapter READMEs' run-time tables --------------------------

def test_every_notebook_has_a_measured_tiny_and_cpu_time_in_its_readme():
    expected = run_notebooks.read_expected_times()
    for path in run_notebooks.find_notebooks(None, None):
        assert path.stem in expected, f"{path.parent.name}/README.md: add a run-time row for {path.stem}"
        times = expected[path.stem]
        assert times["tiny"] is not None and times["cpu"] is not None, f"{path.stem}: measure its tiny and cpu time"
        assert times["tiny"] > 0 and times["cpu"] > 0, (path.stem, times)
    notebooks = {p.stem for p in run_notebooks.find_notebooks(None, None)}
    assert set(expected) <= notebooks, f"rows for notebooks that do not exist: {set(expected) - notebooks}"


def test_runtime_table_parser():
    text = """# CH09

| notebook | what it teaches |
| --- | --- |
| x | y |

## Run time

| notebook | tiny | cpu | full |
| --- | --- | --- | --- |
| CH09_NB01_experts | 12 s | 4 min | ? |
| [`CH09_NB02_more`](CH09_NB02_more.ipynb) | ~7.5 s | 300 s | 20 min |

After the table.
"""
    assert run_notebooks.parse_runtime_table(text) == {
        "CH09_NB01_experts": {"tiny": 12.0, "cpu": 240.0, "full": None},
        "CH09_NB02_more": {"tiny": 7.5, "cpu": 300.0, "full": 1200.0},
    }
    with pytest.raises(ValueError, match="no run-time table"):
        run_notebooks.parse_runtime_table("# CH09\n\nnothing here\n", "CH09/README.md")
    with pytest.raises(ValueError, match=r"CH09/README.md, row CH09_NB01_experts: 'a few seconds' is not a run time"):
        run_notebooks.parse_runtime_table(text.replace("12 s", "a few seconds"), "CH09/README.md")
    with pytest.raises(ValueError, match=r"\| CHxx_NByy_name \| tiny \| cpu \| full \|"):
        run_notebooks.parse_runtime_table(text.replace("| 12 s | 4 min | ? |", "| 12 s |"))


@pytest.mark.parametrize("profile", ["tiny", "cpu"])
def test_plan_lists_each_notebook_with_its_time_and_the_total(profile):
    paths = run_notebooks.find_notebooks(None, None)
    expected = run_notebooks.read_expected_times()
    lines = run_notebooks.plan_lines(paths, profile, expected)
    assert lines[0].startswith(f"Plan: {len(paths)} notebook(s) in the '{profile}' profile")
    for number, path in enumerate(paths, 1):
        seconds = expected[path.stem][profile]
        assert lines[number].split()[:2] == [f"[{number}/{len(paths)}]", path.stem]
        assert lines[number].endswith("  ~" + run_notebooks.format_seconds(seconds))
    total = sum(expected[p.stem][profile] for p in paths)
    assert lines[-1].startswith(f"  Expected total: ~{total:.0f} s") and "not measured" not in lines[-1]


def test_plan_says_what_is_not_measured():
    paths = run_notebooks.find_notebooks("CH03", None) + run_notebooks.find_notebooks("CH04", None)
    expected = {paths[0].stem: {"tiny": 5.0, "cpu": 30.0, "full": None}}
    lines = run_notebooks.plan_lines(paths, "cpu", expected, benchmark=True)
    assert lines[1].endswith("~30 s") and lines[2].endswith("~?")
    assert "benchmark" in lines[3]
    assert lines[-1] == "  Expected total: ~30 s, plus 1 notebook(s) not measured yet and the benchmark."
    assert "unknown" in run_notebooks.plan_lines(paths, "full", expected)[-1]


def test_progress_line():
    line = run_notebooks.progress_line(3, 8, "CH04_NB01_block_importance", 95.4, 100.0)
    assert line == "[3/8] CH04_NB01_block_importance done in 95 s (expected ~100 s)"
    assert run_notebooks.progress_line(1, 1, "CH99_NB01_x", 12, None).endswith("(expected ~?)")


def test_plan_only_run_prints_the_plan_and_executes_nothing(capsys, tmp_path):
    assert run_notebooks.main(["--profile", "tiny", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan: ") and "Expected total: ~" in out and "then scripts/benchmark.py" in out
    assert "done in" not in out
