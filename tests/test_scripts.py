"""The command-line scripts: notebook runner helpers and the results collector."""

import json
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import collect_results  # noqa: E402
import run_notebooks  # noqa: E402


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
