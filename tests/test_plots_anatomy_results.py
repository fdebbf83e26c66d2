import json

import matplotlib
import pytest

from utils import (
    build_on_meta,
    count_parameters,
    get_spec,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    parameter_breakdown,
    plot_comparison,
    plot_layer_scores,
    plot_stacked,
    save_results,
)

matplotlib.use("Agg")


def test_plot_layer_scores_marks_removed():
    ax = plot_layer_scores([0.1, 0.5, 0.2], removed=[1], title="t")
    assert ax.get_title() == "t" and ax.get_xlabel() and ax.get_ylabel()
    assert [p.get_hatch() for p in ax.patches][:3] == [None, "//", None] or ax.patches[1].get_hatch() == "//"


def test_plot_layer_scores_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        plot_layer_scores([])
    with pytest.raises(ValueError, match="outside"):
        plot_layer_scores([1, 2], removed=[5])


def test_plot_comparison_and_stacked():
    ax = plot_comparison({"base": 1.0, "pruned": 2.0}, title="ppl", ylabel="perplexity", baseline=1.0)
    assert len(ax.patches) == 2 and ax.get_ylabel() == "perplexity"
    ax = plot_stacked({"a": {"x": 1, "y": 3}, "b": {"x": 2}}, title="s", ylabel="%", normalise=True)
    assert ax.get_title() == "s"
    with pytest.raises(ValueError):
        plot_comparison({}, title="", ylabel="")
    with pytest.raises(ValueError):
        plot_stacked({}, title="", ylabel="")


def test_parameter_breakdown_sums_to_total():
    model = build_on_meta("google/gemma-3-270m")
    parts = parameter_breakdown(model)
    assert sum(parts.values()) == count_parameters(model)
    assert parts["embeddings"] == 262144 * 640 and parts["lm_head"] == 0  # tied


def test_kv_cache_arithmetic():
    llama = get_spec("meta-llama/Llama-3.2-1B")
    assert kv_cache_bytes_per_token(llama) == 2 * 16 * 8 * 64 * 2
    assert kv_cache_bytes(llama, 1000, batch_size=2) == 2000 * kv_cache_bytes_per_token(llama)
    with pytest.raises(ValueError):
        kv_cache_bytes_per_token(llama, bytes_per_value=0)
    with pytest.raises(ValueError):
        kv_cache_bytes(llama, -1)


def test_save_results_writes_json_with_environment(tiny):
    path = save_results("unit_test_results", {"ppl": 1.23456789, "nested": {"x": [1, 2]}})
    payload = json.loads(path.read_text())
    assert payload["results"]["ppl"] == 1.234568 and payload["environment"]["profile"] == "tiny"
    path.unlink()
    with pytest.raises(ValueError):
        save_results("a/b", {})
    with pytest.raises(TypeError):
        save_results("x", [1])


def test_load_results_round_trip_and_missing(tiny):
    from utils import load_results

    path = save_results("unit_test_load", {"ppl": 2.5, "rows": [{"a": 1}]})
    try:
        assert load_results("unit_test_load") == {"ppl": 2.5, "rows": [{"a": 1}]}
        assert load_results("unit_test_load", profile="tiny") == load_results("unit_test_load")
    finally:
        path.unlink()
    assert load_results("unit_test_load") is None  # not run yet: None, not an exception
    with pytest.raises(ValueError, match="plain name"):
        load_results("a/b")
    with pytest.raises(ValueError, match="'full', 'cpu' or 'tiny'"):
        load_results("x", profile="gpu")
