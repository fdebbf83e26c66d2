"""The command-line scripts: notebook runner helpers and the results collector."""

import json
import os
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


def test_appendices_are_found_after_the_chapters():
    everything = run_notebooks.find_notebooks(None, None)
    appendix = [p for p in everything if p.name.startswith("APP")]
    assert {p.stem for p in appendix} >= {"APPB_NB01_lm_eval", "APPC_NB01_energy"}
    assert everything[-len(appendix):] == appendix  # chapters first, then the appendices
    assert run_notebooks.find_notebooks("appb", None) == [p for p in appendix if p.name.startswith("APPB_")]
    assert run_notebooks.find_notebooks(None, "APPC_NB01")[0].stem == "APPC_NB01_energy"
    assert {"APPB_NB01_lm_eval", "APPC_NB01_energy"} <= set(run_notebooks.read_expected_times())
    assert collect_results.CHAPTER_TITLES["APPB"].startswith("Appendix B")


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


def test_collector_shows_paired_differences_with_their_intervals(tmp_path):
    run_dir = tmp_path / "runs" / "cpu"
    run_dir.mkdir(parents=True)
    env = {"profile": "cpu", "date": "2026-01-01 00:00 UTC", "device": "CPU", "cpu_threads": 2, "python": "3.11",
           "torch": "2", "transformers": "5", "optipfair": "0.4.2"}
    differences = {"pruned": {"s_dis": {"value": 0.0202, "ci": [-0.0312, 0.0754]},
                              "s_amb": {"value": None, "ci": None}, "acc": {"value": -0.5, "ci": None}}}
    payload = {"notebook": "CH11_NB03_x", "environment": env,
               "results": {"summary": {"v": 1.0}, "differences_vs_base": differences}}
    (run_dir / "CH11_NB03_x.json").write_text(json.dumps(payload))
    text = collect_results.collect("cpu", root=tmp_path).read_text()
    assert "Paired differences from the base model (95 % interval):" in text
    assert "- pruned, s_dis: +0.020 [-0.031, +0.075]" in text
    assert "- pruned, s_amb: undefined" in text and "- pruned, acc: -0.500\n" in text


def test_collector_puts_appendices_after_the_chapters(tmp_path):
    run_dir = tmp_path / "runs" / "cpu"
    run_dir.mkdir(parents=True)
    env = {"profile": "cpu", "date": "2026-01-01 00:00 UTC", "device": "CPU", "cpu_threads": 2, "python": "3.11",
           "torch": "2", "transformers": "5", "optipfair": "0.4.2"}
    for name in ("APPB_NB01_x", "CH11_NB01_y", "BENCH_z"):
        payload = {"notebook": name, "environment": env, "results": {"summary": {"value": 1.0}}}
        (run_dir / f"{name}.json").write_text(json.dumps(payload))
    text = collect_results.collect("cpu", root=tmp_path).read_text()
    assert text.index("## CH11") < text.index("## Appendix B") < text.index("## Benchmark")


def test_collector_keeps_sections_of_notebooks_not_rerun(tmp_path):
    run_dir = tmp_path / "runs" / "cpu"
    run_dir.mkdir(parents=True)
    env = {"profile": "cpu", "date": "2026-01-02 00:00 UTC", "device": "CPU", "cpu_threads": 2, "python": "3.11",
           "torch": "2", "transformers": "5", "optipfair": "0.4.2"}

    def write(notebook, value):
        payload = {"notebook": notebook, "environment": env, "results": {"summary": {"value": value}}}
        (run_dir / f"{notebook}.json").write_text(json.dumps(payload))

    write("CH04_NB01_x", 1.5)
    write("CH05_NB01_y", 2.5)
    (run_dir / "timings.json").write_text(json.dumps({"CH04_NB01_x": 12.0, "CH05_NB01_y": 30.0}))
    collect_results.collect("cpu", root=tmp_path)
    for path in run_dir.iterdir():  # a later session re-runs CH05 only
        path.unlink()
    write("CH05_NB01_y", 3.5)
    (run_dir / "timings.json").write_text(json.dumps({"CH05_NB01_y": 31.0}))
    text = collect_results.collect("cpu", root=tmp_path).read_text()
    assert "### CH04_NB01_x" in text and "- value: 1.500" in text  # kept, with its numbers
    assert text.count(collect_results.KEPT_NOTE) == 1 and "1 notebook(s) kept" in text
    assert "- value: 3.500" in text and "- value: 2.500" not in text  # the re-run replaces its section
    assert "| CH04_NB01_x | 12.00 |" in text and "| CH05_NB01_y | 31.00 |" in text
    again = collect_results.collect("cpu", root=tmp_path).read_text()
    assert again == text  # stable: the kept note is not stacked
    fresh = collect_results.collect("cpu", root=tmp_path, keep_previous=False).read_text()
    assert "CH04_NB01_x" not in fresh


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


def test_recovery_transfer_runs_in_tiny_and_reports_the_worst_other_domain():
    import recovery_transfer

    results = recovery_transfer.run(["default"], "validation")
    assert results["split"] == "validation"
    assert [r["variant"] for r in results["runs"]][:3] == ["base (teacher)", "cut, no recovery", "default"]
    row = results["runs"][2]
    assert row["worst_x_base"] == max(row[f"x_base_{d}"] for d in recovery_transfer.OTHER_DOMAINS)
    summary = {r["variant"]: r for r in results["table"]}
    assert summary["base (teacher)"]["worst_x_base"] == 1.0 and summary["default"]["worst_x_base_spread"] >= 0
    with pytest.raises(SystemExit, match="Available: default"):
        recovery_transfer.run(["no-such-variant"], "validation")


def test_recovery_transfer_trains_the_set_steps_and_only_the_seams_when_asked(tokenizer):
    import copy

    import recovery_transfer
    from tiny_families import _tiny

    from utils.depth import remove_blocks
    from utils.structure import decoder_blocks

    # run() asserts that every variant trained exactly STEPS optimizer steps (more than one pass over the texts)
    results = recovery_transfer.run(["neighbours"], "validation", seeds=(1,))
    assert results["seeds"] == [1] and [r["variant"] for r in results["runs"]][2:] == ["neighbours"]
    student = remove_blocks(copy.deepcopy(_tiny("llama", tokenizer)), [2, 3, 6])  # kept originals 0 1 4 5 7 ...
    seams = recovery_transfer._freeze_all_but_neighbours(student)
    assert seams == [1, 2, 3, 4]  # originals 1 and 4 border the run 2-3, originals 5 and 7 border block 6
    for i, block in enumerate(decoder_blocks(student)):
        assert all(p.requires_grad == (i in seams) for p in block.parameters())
    assert not any(p.requires_grad for p in student.get_input_embeddings().parameters())


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
        # tiny is always measured (the test suite runs every notebook); cpu may be "?" until a make run measures it
        assert times["tiny"] is not None and times["tiny"] > 0, f"{path.stem}: measure its tiny time"
        assert times["cpu"] is None or times["cpu"] > 0, (path.stem, times)
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
    appendix = text.replace("CH09_NB01_experts", "APPD_NB01_extra")
    assert "APPD_NB01_extra" in run_notebooks.parse_runtime_table(appendix)
    with pytest.raises(ValueError, match="APPx_NByy_name"):
        run_notebooks.parse_runtime_table(text.replace("CH09_NB01_experts", "notes"))
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
    known = [expected[p.stem][profile] for p in paths if expected[p.stem][profile] is not None]
    total = sum(known)
    assert lines[-1].startswith(f"  Expected total: ~{total:.0f} s")
    assert ("not measured" in lines[-1]) == (len(known) < len(paths))


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


# --- scripts/t4_budget.py: peak memory of the full profile's heaviest steps ---------------------

def test_t4_budget_tiny_end_to_end(tmp_path, capsys):
    import t4_budget

    out = tmp_path / "budget.json"
    status = t4_budget.main(["--tiny", "--in-process", "--max-batches", "1", "--markdown", "--json", str(out),
                             "--only", "CH02_NB02:distill", "CH05_NB02:repair"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "| notebook | step | model | dtype | settings | peak GB | peak phase | measure | fits |" in printed
    assert "TINY MODE" in printed and "cpu-rss" in printed and "ESTIMATE" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows] == ["CH02_NB02:distill", "CH05_NB02:repair"]
    distill, repair = rows
    assert distill["dtype"] == "float32" and repair["dtype"] == "float16"  # Gemma 3 stays float32 on a T4
    assert "utils.distill" in [name for name, _ in distill["phases"]]
    # `noisy` is deleted in the cell that makes it (inside an `if`): not held any more
    assert "notebook still holds t_logits, s_logits (" in distill["settings"]
    assert "prune_glu with Gram repair" in [name for name, _ in repair["phases"]]
    assert all(r["fits"] and r["measure"] == "cpu-rss" for r in rows)

    again = tmp_path / "again.json"
    assert t4_budget.main(["--tiny", "--in-process", "--max-batches", "1", "--count-held", "--json", str(again),
                           "--only", "CH02_NB02:distill"]) == 0
    counted = json.loads(again.read_text())["rows"][0]
    assert "counted, not allocated" in counted["settings"]

    capsys.readouterr()
    assert t4_budget.main(["--from-json", str(out), str(again), "--markdown"]) == 0  # merged: the later file wins
    merged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| CH0")]
    assert len(merged) == 2 and "counted, not allocated" in merged[0] and merged[1].startswith("| CH05_NB02")
    with pytest.raises(SystemExit, match="not a file written by --json"):
        t4_budget.main(["--from-json", str(tmp_path / "missing.json")])


NEW_STEPS = ["CH06_NB03:challenge",
             "CH07_NB01:quantization", "CH07_NB02:lora", "CH07_NB03:adapters", "CH07_NB04:ranks", "CH08_NB01:kv",
             "CH08_NB02:cuts", "CH08_NB03:bypass", "CH08_NB04:decode", "CH09_NB01:moe", "CH09_NB02:upcycle",
             "CH09_NB03:experts", "CH10_NB01:glu",
             "CH10_NB02:ablations", "CH11_NB01:scale", "CH11_NB02:copies", "CH11_NB03:benchmark",
             "CH12_NB01:capstone", "CH12_NB02:lab",
             "APPB_NB01:recovery", "APPC_NB01:costs"]


def test_t4_budget_every_notebook_has_a_step():
    import t4_budget

    covered = {s.notebook for s in t4_budget.STEPS}
    notebooks = {p.name[:9] for p in t4_budget.NOTEBOOKS.glob("*/*.ipynb")}
    assert notebooks <= covered, f"no t4_budget step for {sorted(notebooks - covered)}"
    assert [s.id for s in t4_budget.STEPS if s.id in NEW_STEPS] == NEW_STEPS


def test_t4_budget_new_steps_run_in_tiny_mode(tmp_path):
    import t4_budget

    out = tmp_path / "new.json"
    status = t4_budget.main(["--tiny", "--in-process", "--max-batches", "1", "--json", str(out), "--only", *NEW_STEPS])
    rows = {r["step"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == NEW_STEPS
    failed = {step: r["error"] for step, r in rows.items() if "error" in r}
    assert not failed and status == 0
    assert rows["CH07_NB01:quantization"]["dtype"] == "float32"  # the notebook loads it in float32 on purpose
    moe = rows["CH09_NB01:moe"]
    assert "last 8 blocks trained" in moe["settings"]  # the tiny profile's RECOVERY_LAST_BLOCKS
    assert [name for name, _ in moe["phases"]][-1] == "export: save, utils.load_model, compare"
    capstone = rows["CH12_NB01:capstone"]
    assert "notebook still holds" not in capstone["settings"]  # it deletes each `alt` at once
    assert "second distillation of the merged specialist" in capstone["settings"]  # POST_DISTILL_STEPS > 0


def test_t4_budget_fresh_process_and_exit_status_over_budget(capsys):
    import t4_budget

    status = t4_budget.main(["--tiny", "--only", "CH03_NB01", "--budget-gb", "1e-6"])
    printed = capsys.readouterr().out
    assert status == 1  # a step that does not fit makes the exit status non-zero
    line = next(line for line in printed.splitlines() if line.startswith("CH03_NB01"))
    assert line.rstrip().endswith("no") and "Qwen/Qwen3-0.6B" in line and "meta only" in line


def test_t4_budget_meter_resets_between_phases():
    import t4_budget
    import torch

    meter = t4_budget.Meter("cpu")
    with meter.phase("big"):
        big = torch.empty(50_000_000, dtype=torch.float32).fill_(1.0)  # 200 MB, touched
    del big
    with meter.phase("small"):
        small = torch.ones(10)
    assert small.sum() == 10
    meter.counted = 10**9  # --count-held: tensors counted by size are part of every later peak
    with meter.phase("counted"):
        pass
    (_, big_peak), (_, small_peak), (_, counted_peak) = meter.phases
    assert big_peak >= 190e6
    assert counted_peak >= 10**9
    if meter.can_reset:
        assert small_peak < 100e6 and counted_peak < 10**9 + 100e6


def test_t4_budget_dtypes_match_load_model_on_a_t4():
    import t4_budget
    import torch

    assert t4_budget.t4_dtype("gemma3_text") == torch.float32
    assert t4_budget.t4_dtype("llama") == torch.float16
    assert t4_budget.t4_dtype("qwen3") == torch.float16


def test_t4_budget_reads_what_the_notebook_still_holds(tmp_path, monkeypatch):
    import t4_budget

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%matplotlib inline\nx = 1\ny, _ = 2, 3"),
                nbformat.v4.new_code_cell("del x\nif y:\n    z = 4"),
                # assigned and deleted in one cell, the `del` nested in a loop: gone (a breadth-first walk of the
                # cell saw the `del` before the assignment and kept the name alive)
                nbformat.v4.new_code_cell("v = 6\nfor k in range(2):\n    t = k\n    del t\ndel v"),
                nbformat.v4.new_code_cell("def helper(a):\n    return a + 1\n\nrun(y)"),
                nbformat.v4.new_code_cell("w = 5\nutils.distill(a, b, c, max_steps=STEPS, alpha=0.5 * X, **extra)")]
    nb.cells[0].metadata["tags"] = ["parameters"]
    (tmp_path / "CH99_x").mkdir()
    nbformat.write(nb, tmp_path / "CH99_x" / "CH99_NB01_demo.ipynb")
    monkeypatch.setattr(t4_budget, "NOTEBOOKS", tmp_path)
    assert t4_budget.alive_names("CH99_NB01", ["x", "y", "z", "_", "w", "v", "t", "k"], "run(") == ["y", "z", "_", "k"]
    assert t4_budget.notebook_functions("CH99_NB01", ["helper"], {})["helper"](1) == 2
    assert t4_budget.notebook_parameters("CH99_NB01") == {}
    assert t4_budget.notebook_kwargs("CH99_NB01", "utils.distill", {"X": 3}, skip=("max_steps",)) == {"alpha": 1.5}
    with pytest.raises(SystemExit, match="uses 'X'"):
        t4_budget.notebook_kwargs("CH99_NB01", "utils.distill", {}, skip=("max_steps",))
    with pytest.raises(SystemExit, match="no longer calls utils.prune_glu"):
        t4_budget.notebook_kwargs("CH99_NB01", "utils.prune_glu", {})
    with pytest.raises(SystemExit, match="no code cell contains"):
        t4_budget.alive_names("CH99_NB01", ["y"], "never_called(")
    with pytest.raises(SystemExit, match="no longer defines"):
        t4_budget.notebook_functions("CH99_NB01", ["gone"], {})
    with pytest.raises(SystemExit, match="Expected one notebook"):
        t4_budget.notebook_path("CH98_NB01")


def test_t4_budget_every_step_finds_its_notebook_and_parameters():
    import t4_budget

    for step in t4_budget.STEPS:
        for profile in ("full", "tiny"):
            params = t4_budget.notebook_parameters(step.notebook, profile)
            assert "MODEL_ID" in params or "LIVE_MODEL_ID" in params, step.id
    before = os.environ.get("RLLM_PROFILE")
    full, tiny = (t4_budget.notebook_parameters("CH02_NB02", p) for p in ("full", "tiny"))
    assert full["DISTILL_STEPS"] > tiny["DISTILL_STEPS"]  # utils.budget answered for the full profile
    assert os.environ.get("RLLM_PROFILE") == before  # and the profile of this process is left as it was


def test_t4_budget_bad_inputs():
    import t4_budget
    import torch

    assert [s.id for s in t4_budget.select(["ch05_nb02"])] == ["CH05_NB02:scores", "CH05_NB02:repair"]
    with pytest.raises(SystemExit, match="Steps: CH02_NB01:copies"):
        t4_budget.select(["CH99"])
    bad_inputs = [["--max-batches", "0"], ["--budget-gb", "-1"], ["--threads", "0"]]
    if not torch.cuda.is_available():
        bad_inputs.append(["--device", "cuda"])
    for bad in bad_inputs:
        with pytest.raises(SystemExit):
            t4_budget.parse_args(bad)


def test_t4_budget_out_of_memory_is_a_result(tmp_path):
    import t4_budget
    import torch

    def runs_out(ctx):
        with ctx.meter.phase("allocate"):
            block = torch.empty(25_000_000).fill_(1.0)  # 100 MB reached before the failure
            raise RuntimeError(f"DefaultCPUAllocator: can't allocate memory (after {block.numel()} floats)")

    step = t4_budget.Step("CH02_NB02:fake", "fails", runs_out)
    row = t4_budget.run_step(step, tiny=True, device="cpu", max_batches=1)
    assert row["lower_bound"] and row["peak_phase"] == "allocate" and row["peak_bytes"] >= 90e6
    assert "out of memory" in row["error"] and "'allocate'" in row["error"]
    assert t4_budget.verdict(row, budget_gb=0.05) is False  # over the budget before it failed: does not fit
    assert t4_budget.verdict(row, budget_gb=15) is None  # failed below the budget: unknown

    def broken(ctx):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        t4_budget.run_step(t4_budget.Step("CH02_NB02:bug", "bug", broken), tiny=True, device="cpu", max_batches=1)

    # A child killed by the kernel: its progress file holds the phases so far and the running peak.
    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps({"step": "CH02_NB02:scratch", "notebook": "CH02_NB02", "title": "loop",
                                    "model": "m", "dtype": "float32", "settings": "s", "measure": "cpu-rss",
                                    "phases": [["load", 1e9], ["train", 16.5e9]], "current": "train"}))
    killed = t4_budget.failed_row(step, -9, "", progress)
    assert killed["peak_bytes"] == 16.5e9 and killed["lower_bound"] and "in phase 'train'" in killed["error"]
    assert "out of memory" in killed["error"] and t4_budget.verdict(killed, 15) is False
    text = t4_budget.render([{**killed, "fits": False}], markdown=True)
    assert "≥ 16.50" in text and "| no |" in text
    crashed = t4_budget.failed_row(step, 1, "Traceback ...\nKeyError: 'MODEL_ID'", None)
    assert crashed["error"] == "KeyError: 'MODEL_ID'" and t4_budget.verdict(crashed, 15) is None


def test_benchmark_domain_rows_on_the_tiny_model(tiny):
    """The multi-domain pruning table runs end to end (tiny model, one domain, one calibration size)."""
    import benchmark

    from utils import load_model

    model, tok = load_model(benchmark.MODEL_ID)
    rows = benchmark.domain_rows(model, tok, domains=("sms_spam",), sizes=(8,), held_out_texts=8, progress=False)
    assert [r["pruning"] for r in rows] == ["width", "depth"]
    for row in rows:
        assert row["domain"] == "sms_spam" and row["calibration_texts"] == 8
        assert 0 < row["padding_share"] < 1 and row["calibration_tokens"] > 0
        assert row["ours_vs_optipfair"] == pytest.approx(row["ours_ppl"] / row["optipfair_ppl"])
        assert row["meets_target"] == (row["ours_vs_optipfair"] <= float(row["target"].split()[-1]))
    assert "uniform_ppl" in rows[0] and "plain_cut_ppl" in rows[1]
    # the columns the notebooks display from this table (CH05_NB02 section 3, CH04_NB01's benchmark cell): a
    # renamed column broke CH05_NB02 in `cpu` once, where a benchmark run exists and `tiny` never looked
    assert {"domain", "calibration_texts", "padding_share", "uniform_ppl", "ours_ppl", "optipfair_ppl",
            "ours_vs_optipfair"} <= rows[0].keys()
    assert {"domain", "calibration_texts", "base_ppl", "plain_cut_ppl", "ours_ppl", "optipfair_ppl",
            "ours_vs_optipfair"} <= rows[1].keys()


def test_benchmark_merges_runs_that_split_the_domains(tiny, monkeypatch, tmp_path):
    import benchmark

    import utils.profiles
    import utils.results

    monkeypatch.setattr(utils.profiles, "REPO_ROOT", tmp_path)  # runs/ under a temporary folder
    row = {"pruning": "width", "calibration_texts": 16, "ours_ppl": 9.0, "optipfair_ppl": 10.0,
           "ours_vs_optipfair": 0.9, "target": "<= 0.95", "meets_target": True}
    utils.save_results("BENCH_part_b", {"model": "m", "table": [{**row, "domain": "course_code"}]})
    utils.save_results("BENCH_part_a", {"model": "m", "table": [{**row, "domain": "wikitext"},
                                                               {**row, "domain": "sms_spam", "pruning": "depth"}]})
    benchmark.merge_domain_runs(["BENCH_part_b", "BENCH_part_a"])
    merged = utils.load_results("BENCH_pruning_domains")
    assert [r["domain"] for r in merged["table"]] == ["wikitext", "sms_spam", "course_code"]  # DOMAINS order
    assert merged["summary"]["width_rows_meeting_target"] == "2 of 2"
    with pytest.raises(SystemExit, match="missing run"):
        benchmark.merge_domain_runs(["BENCH_part_a", "BENCH_nowhere"])


def test_width_search_variants_prune_the_same_total(tiny):
    """Every variant of the width search removes at least the uniform cut's neurons (never fewer: a fair budget),
    and the non-uniform ones really give the layers different widths."""
    import copy

    import width_search

    from utils import load_model, load_texts, make_dataloader
    from utils.structure import glu_mlps

    model, tok = load_model(width_search.MODEL_ID)
    calib = make_dataloader(load_texts("wikitext", n=8), tok, batch_size=4, max_length=32)
    n = len(glu_mlps(model))
    uniform = n * width_search.uniform_keep(model)
    for name in width_search.ALL_VARIANTS:
        if name == "optipfair":
            continue
        widths = [m.gate_proj.out_features for m in glu_mlps(width_search.prune_variant(copy.deepcopy(model), calib,
                                                                                           name))]
        assert sum(widths) <= uniform, name
        assert (len(set(widths)) > 1) == (name in ("global", "allocate")), name
    with pytest.raises(ValueError):
        width_search.prune_variant(copy.deepcopy(model), calib, "no-such-variant")


def test_held_out_domains_rebuild_from_their_pinned_sources():
    import subprocess
    import sys

    import build_heldout_domains as build

    known = subprocess.run(["git", "cat-file", "-e", f"{build.PROSE_COMMIT}^{{commit}}"], cwd=build.ROOT,
                           capture_output=True)
    if known.returncode:
        pytest.skip("shallow clone: the pinned commit of the course prose is not available")
    on_disk = [json.loads(line) for line in build.PROSE_OUTPUT.read_text(encoding="utf-8").splitlines()]
    assert build.build_course_prose() == on_disk and len(on_disk) == build.MAX_RECORDS
    if f"{sys.version_info.major}.{sys.version_info.minor}" == build.PYTHON_VERSION:
        on_disk = [json.loads(line) for line in build.REFERENCE_OUTPUT.read_text(encoding="utf-8").splitlines()]
        assert build.build_python_reference() == on_disk
    else:
        with pytest.raises(SystemExit, match=f"Python {build.PYTHON_VERSION}"):
            build.build_python_reference()
    assert build.paragraphs("| a | table |\n\n# A heading\n\n```\ncode\n```") == []


def test_code_sample_rebuilds_from_its_pinned_commit():
    import subprocess

    import build_code_sample

    root = Path(build_code_sample.ROOT)
    known = subprocess.run(["git", "cat-file", "-e", f"{build_code_sample.SOURCE_COMMIT}^{{commit}}"], cwd=root,
                           capture_output=True)
    if known.returncode:
        pytest.skip("shallow clone: the pinned source commit is not available")
    records = build_code_sample.build()
    on_disk = [json.loads(line) for line in build_code_sample.OUTPUT.read_text(encoding="utf-8").splitlines()]
    assert records == on_disk
    assert all(build_code_sample.MIN_CHARS <= len(r["text"]) <= build_code_sample.MAX_CHARS for r in records)


def test_bypass_router_runs_end_to_end_on_validation_texts_only(tiny, monkeypatch, tmp_path):
    """The learned-router experiment (issue 27) in tiny: fitted on training texts, every comparison on validation
    texts that CH08_NB03 never reports on, results saved under runs/<profile>/."""
    import bypass_router

    import utils.profiles
    from utils import load_results
    from utils.models import _tiny_tokenizer

    monkeypatch.setattr(utils.profiles, "REPO_ROOT", tmp_path)  # runs/ under a temporary folder
    fit, val, _ = bypass_router.split_texts(_tiny_tokenizer(), 4, 3)
    held_out = {t for d in bypass_router.DOMAINS for t in bypass_router.nb03_held_out(d)}
    assert len(fit) == 8 and all(len(v) == 3 for v in val.values())
    assert not set(fit) & {t for v in val.values() for t in v} and not held_out & {t for v in val.values() for t in v}
    assert bypass_router.main(["--quiet"]) == 0
    results = load_results("SWEEP_bypass_router_validation")
    assert results["split"] == "validation" and results["settings"]["budgets"] == [4, 8, 12]
    comparisons = results["comparisons"]
    assert len(comparisons) == 3 * len(bypass_router.DOMAINS) * len(bypass_router.COMPARISONS)
    assert all(c["low"] <= c["diff"] <= c["high"] or c["low"] == c["high"] for c in comparisons)
    assert all(any(f" {word} " in c["verdict"] for word in ("beats", "ties with", "loses to")) for c in comparisons)
    same = [c for c in comparisons if c["comparison"] == "router_vs_threshold_same_counts"]
    assert all(c["skipped_per_token_a"] == c["skipped_per_token_b"] for c in same)  # only *which* differs
    for k, spent in ((int(k), t["training_skipped_per_token"]) for k, t in results["training"].items()):
        assert abs(spent["threshold"] - k) < 1 and abs(spent["router"] - k) < 1  # calibrated on these prompts
    assert not set(results["protected"]) & set(results["router_blocks"])
    assert all(s["cells"] == 9 and s["beats"] + s["ties"] + s["loses"] == 9 for s in results["summary"].values())


def test_fair_ranking_search_fits_apart_from_what_judges(tiny):
    """The search never judges on a probe it fitted on, and every ranking is a non-negative neuron score; the
    awareness-guarded rankings keep (score 0) the neurons that carry pronoun agreement most."""
    import fair_ranking_search as search

    from utils import load_model

    model, tok = load_model(search.MODEL_ID)
    fit_stereo, fit_aware, judge = search.splits(tok)
    fitted = {p["template"] for p in fit_stereo + fit_aware}
    assert fitted and judge["stereotype"] and judge["awareness"] and judge["neutral"]
    assert not fitted & {p["template"] for kind in judge.values() for p in kind}
    ranks = search.rankings(model, tok, fit_stereo[:4], fit_aware[:4])
    shape = ranks["relative"].shape
    assert set(ranks) == {"relative", "relative-aw", "attribution", "targeted", "targeted-aw", "attr-minus-aw"}
    for name, scores in ranks.items():
        assert scores.shape == shape and (scores >= 0).all(), name
    guarded = (ranks["targeted-aw"] == 0) & (ranks["targeted"] > 0)
    assert guarded.any() and (ranks["targeted-aw"][~guarded] == ranks["targeted"][~guarded]).all()


def test_capstone_search_runs_the_stages_reuses_them_and_counts_failed_targets(tiny, tmp_path, monkeypatch, capsys):
    import capstone_search

    from utils import profiles

    monkeypatch.setattr(profiles, "REPO_ROOT", tmp_path)  # results under tmp_path/runs/tiny, not the repository's
    cache = ["--cache", str(tmp_path / "cache")]
    assert capstone_search.main(["--baseline", "--tag", "b", *cache]) == 0
    assert capstone_search.main(["--variant", "calib=mix,alloc=global,lora=replay", "--tag", "v", *cache]) == 0
    out = tmp_path / "runs" / "tiny"
    rows = json.loads((out / "SWEEP_capstone_validation_v.json").read_text())["results"]["rows"]
    assert [r["stage"] for r in rows] == ["cut", "distill", "lora"] and not rows[0]["cached"]
    assert rows[-1]["key"] == "calib=mix,alloc=global,dlr=5e-4,lora=replay,seed=0"
    assert capstone_search.main(["--variant", "calib=mix,alloc=global,dlr=5e-4", "--stage", "distill", "--tag", "w",
                                 *cache]) == 0
    reused = json.loads((out / "SWEEP_capstone_validation_w.json").read_text())["results"]["rows"]
    assert [r["cached"] for r in reused] == [True, True]  # the same cut and distillation, read back
    assert reused[1]["ppl_wikitext"] == pytest.approx(rows[1]["ppl_wikitext"])
    capsys.readouterr()
    assert capstone_search.main(["--table"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| lora |"))
    assert line.split("|")[-3].strip() == str(int(rows[-1]["x_base_wikitext"] > 1.6))  # tiny scores 0 = the baseline
    with pytest.raises(SystemExit, match="not one of"):
        capstone_search.parse_variant("calib=nope")
    with pytest.raises(SystemExit, match="key=value"):
        capstone_search.parse_variant("clib=mix")
    with pytest.raises(SystemExit, match="above 0"):
        capstone_search.parse_variant("rank=0")
    with pytest.raises(SystemExit, match="whole number"):
        capstone_search.parse_variant("lsteps=many")
    # a longer, wider LoRA: its own row name, the cut and distillation reused, compared with its own baseline
    spec = capstone_search.parse_variant("lora=replay2,lsteps=3,rank=4")
    assert capstone_search.baseline_key(spec) == "lora=replay2,lsteps=3,rank=4,seed=0"
    assert capstone_search.main(["--baseline", "--baseline-lora", "replay2", "--baseline-steps", "3",
                                 "--baseline-rank", "4", "--tag", "b2", *cache]) == 0
    assert capstone_search.main(["--variant", "calib=mix,alloc=global,lora=replay2,lsteps=3,rank=4", "--tag", "x",
                                 *cache]) == 0
    wide = json.loads((out / "SWEEP_capstone_validation_x.json").read_text())["results"]["rows"]
    assert wide[0]["cached"]
    assert wide[-1]["key"] == "calib=mix,alloc=global,dlr=5e-4,lora=replay2,lsteps=3,rank=4,seed=0"
    capsys.readouterr()
    assert capstone_search.main(["--table"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| lora |") and "rank=4" in x)
    assert line.split("|")[-3].strip() == str(int(wide[-1]["x_base_wikitext"] > 1.6))  # found its own baseline
    # replay distilled from the base model, then a second distillation after the merge: both reuse the cut
    assert capstone_search.main(["--variant", "calib=mix,alloc=global,lora=kdreplay,lsteps=3,rank=4,post=2",
                                 "--tag", "k", *cache]) == 0
    assert capstone_search.main(["--baseline", "--baseline-steps", "3", "--baseline-rank", "4", "--tag", "b3",
                                 *cache]) == 0
    kd = json.loads((out / "SWEEP_capstone_validation_k.json").read_text())["results"]["rows"]
    assert kd[0]["cached"] and kd[-1]["key"].endswith("lora=kdreplay,lsteps=3,rank=4,post=2,seed=0")
    assert kd[-1]["ppl_wikitext"] != pytest.approx(wide[-1]["ppl_wikitext"])
    capsys.readouterr()
    assert capstone_search.main(["--table"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| lora |") and "post=2" in x)
    assert line.split("|")[-3].strip() != ""  # compared with the plain baseline of the same steps and rank
    with pytest.raises(SystemExit, match="whole number"):
        capstone_search.parse_variant("post=-1")
