"""The speed harness (utils.speed): one alternating timing loop, ratios, spreads, verdicts and their wording."""

import pytest
import torch

from utils import load_texts, make_dataloader, measure_forward, measure_generation, speed_ratios


def test_measure_generation_reports_latency_ttft_throughput(tiny_llama):
    model, tokenizer = tiny_llama
    stats = measure_generation(model, tokenizer, ["hello there", "a longer prompt than that"], max_new_tokens=4,
                               runs=2)
    assert {"latency_s", "ttft_s", "tokens_per_s", "decode_tokens_per_s"} <= set(stats)
    assert 0 < stats["ttft_s"] <= stats["latency_s"] * 1.5
    assert stats["tokens_per_s"] == pytest.approx(2 * 4 / stats["latency_s"])
    assert tokenizer.padding_side == "right"  # restored


@pytest.mark.parametrize("prompts", [[], "", [""]])
def test_measure_generation_bad_prompts(tiny_llama, prompts):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="prompts"):
        measure_generation(model, tokenizer, prompts)


def test_measure_generation_bad_counts(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="max_new_tokens"):
        measure_generation(model, tokenizer, "hi", max_new_tokens=1)


def test_measure_forward_and_ratios(tiny_llama):
    model, tokenizer = tiny_llama
    loader = make_dataloader(load_texts("wikitext", n=4), tokenizer, batch_size=2, max_length=32)
    stats = measure_forward(model, loader, runs=1)
    assert stats["tokens"] == sum(int(b["attention_mask"].sum()) for b in loader)
    assert stats["tokens_per_s"] > 0
    ratios = speed_ratios({"tokens_per_s": 20.0, "latency_s": 1.0}, {"tokens_per_s": 10.0, "latency_s": 2.0})
    assert ratios == {"tokens_per_s": 2.0, "latency_s": 2.0}
    with pytest.raises(ValueError, match="empty"):
        measure_forward(model, [])


def test_matmul_parameters_and_ideal_speedup(tiny):
    from utils import ideal_speedup, load_model, matmul_parameters, prune_glu

    model, _ = load_model("meta-llama/Llama-3.2-1B")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameters(model) == linear  # the tied LM head is a Linear and is counted
    assert ideal_speedup(model, model) == 1.0
    import copy

    pruned = prune_glu(copy.deepcopy(model), 0.5)
    assert ideal_speedup(model, pruned) > 1.0
    gpt2, _ = load_model("distilbert/distilgpt2")
    assert matmul_parameters(gpt2) > gpt2.lm_head.weight.numel()  # Conv1D projections count too
    with pytest.raises(ValueError, match="no Linear"):
        ideal_speedup(model, torch.nn.Sequential(torch.nn.ReLU()))


def test_compare_forward_times_models_alternately(tiny_llama):
    from utils import compare_forward

    model, tokenizer = tiny_llama
    loader = make_dataloader(load_texts("wikitext", n=4), tokenizer, batch_size=2, max_length=16)
    calls = []
    original = model.forward

    def counting_forward(*args, **kwargs):
        calls.append("a")
        return original(*args, **kwargs)

    model.forward = counting_forward
    stats = compare_forward({"a": model, "b": model}, loader, runs=2, warmup=0)
    assert set(stats) == {"a", "b"} and stats["a"]["tokens"] == stats["b"]["tokens"]
    assert stats["a"]["tokens_per_s"] > 0 and len(calls) == 2 * 2 * 2  # 2 models x 2 runs x 2 batches
    with pytest.raises(ValueError, match="models is empty"):
        compare_forward({}, loader)
    with pytest.raises(ValueError, match="empty"):
        compare_forward({"a": model}, [])


# --- compare_speed: one alternating loop for forward and generation --------------------------------

class FakeClock:
    """Stands in for the `time` module inside utils.speed: fake models advance it by known costs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def process_time(self):  # the fake models keep one core busy: CPU time = wall time
        return self.now


class FakeLM(torch.nn.Module):
    """Records every call and costs a fixed time per forward pass and per generated token; ``jitter`` scales
    the cost of successive multi-token generate calls."""

    def __init__(self, name, log, clock, *, width, forward_s=1.0, token_s=0.1, jitter=None, prefill_s=0.0):
        super().__init__()
        self.prefill_s, self.kwargs_seen = prefill_s, []
        self.proj = torch.nn.Linear(8, width, bias=False)  # its weights are the model's "matmul parameters"
        self.name, self.log, self.clock = name, log, clock
        self.forward_s, self.token_s, self.jitter = forward_s, token_s, list(jitter or [])

    def forward(self, input_ids=None, attention_mask=None, use_cache=None):
        self.log.append((self.name, "forward"))
        self.clock.now += self.forward_s

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, **kwargs):
        self.log.append((self.name, f"generate {max_new_tokens}"))
        self.kwargs_seen.append(kwargs)
        scale = self.jitter.pop(0) if self.jitter and max_new_tokens > 1 else 1.0
        self.clock.now += self.prefill_s + self.token_s * max_new_tokens * scale
        return torch.zeros(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, dtype=torch.long)


class FakeTokenizer:
    padding_side = "right"
    pad_token_id = 0

    def __call__(self, prompts, return_tensors=None, padding=None):
        assert self.padding_side == "left"
        return {"input_ids": torch.ones(len(prompts), 3, dtype=torch.long),
                "attention_mask": torch.ones(len(prompts), 3, dtype=torch.long)}


def fake_setup(monkeypatch, **costs):
    from utils import speed

    clock, log = FakeClock(), []
    monkeypatch.setattr(speed, "time", clock)
    models = {name: FakeLM(name, log, clock, **kwargs) for name, kwargs in costs.items()}
    batches = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}]
    return models, batches, log


def test_compare_speed_alternates_models_forward_then_generation(monkeypatch):
    from utils import compare_speed

    models, batches, log = fake_setup(monkeypatch, a={"width": 8}, b={"width": 8}, c={"width": 8})
    compare_speed(models, batches, tokenizer=FakeTokenizer(), prompts=["x", "y"], max_new_tokens=3, runs=2, warmup=1)
    one_round = [(n, call) for call in ("forward", "generate 1", "generate 3") for n in "abc"]
    assert log == one_round * 3  # 1 warm-up round + 2 timed rounds, each A, B, C in turn


def test_compare_speed_ratios_spreads_and_verdicts(monkeypatch):
    from utils import compare_speed, speed_conclusion

    # ideal x2 (half the matmul weights); forward exactly x1.6 in every run; generation per-token cost the same
    # for all but noisy; 'odd' is three times faster than its FLOPs allow; 'slow' is slower than the base.
    models, batches, _ = fake_setup(
        monkeypatch,
        base={"width": 8, "forward_s": 1.6, "token_s": 0.1},
        half={"width": 4, "forward_s": 1.0, "token_s": 0.1, "jitter": [1.1, 0.9, 1.0]},
        odd={"width": 4, "forward_s": 0.25, "token_s": 0.025},
        slow={"width": 4, "forward_s": 2.0, "token_s": 0.2},
    )
    result = compare_speed(models, batches, tokenizer=FakeTokenizer(), prompts="x", max_new_tokens=4, runs=3,
                           warmup=0)
    import json

    json.dumps(result)  # plain, JSON-friendly
    half = result["models"]["half"]
    assert half["ideal_speedup"] == pytest.approx(2.0)
    assert half["forward"]["seconds"] == pytest.approx(1.0) and half["forward"]["tokens"] == 8
    fwd = half["speedup"]["forward"]
    assert fwd["ratio"] == pytest.approx(1.6) and fwd["min"] == pytest.approx(1.6) and fwd["max"] == pytest.approx(1.6)
    assert fwd["share_of_ideal_gain"] == pytest.approx(0.6) and fwd["verdict"] == "plausible" and not fwd["flag"]
    assert half["speedup"]["generation"]["verdict"] == "within_noise"  # x1/1.1 .. x1/0.9 includes 1
    assert half["generation_lags_forward"] is True
    assert result["models"]["odd"]["speedup"]["forward"]["verdict"] == "too_fast"
    assert result["models"]["odd"]["speedup"]["forward"]["flag"] is True
    assert result["models"]["slow"]["speedup"]["generation"]["verdict"] == "too_slow"
    assert "speedup" not in result["models"]["base"]
    text = speed_conclusion(result, "half")
    assert text.startswith("half vs base (median of 3 runs [lowest, highest]; FLOPs ideal x2.00):")
    assert "forward      x1.60 [x1.60, x1.60]: 60% of the ideal gain" in text
    assert "generation   x1.00 [x0.91, x1.11]: within noise of x1.00" in text
    assert "gains less than the forward" in text
    assert result["models"]["base"]["generation"]["step_vs_forward"] == pytest.approx(0.5)  # 0.1 s vs 0.2 s/token
    assert "dominate" not in text  # a step costs less than the forward pass's tokens: no overhead story
    assert "faster than the FLOPs ideal" in speed_conclusion(result, "odd")
    assert "slower than x1.00 beyond the spread" in speed_conclusion(result, "slow")
    assert sum(line.endswith(":") for line in speed_conclusion(result).splitlines()) == 3  # one header per model


def test_compare_speed_decode_without_prefill_and_its_own_ideal(monkeypatch):
    from utils import compare_speed, speed_conclusion

    # The same prefill for both; a decoding step 1.5x faster: the whole generate call gains less than decoding.
    models, _, _ = fake_setup(monkeypatch, base={"width": 8, "prefill_s": 2.0, "token_s": 0.3},
                              cut={"width": 4, "prefill_s": 2.0, "token_s": 0.2, "jitter": [1.0, 1.0, 1.05, 0.95]})
    result = compare_speed(models, tokenizer=FakeTokenizer(), prompts=["a", "b"], max_new_tokens=11, runs=3,
                           warmup=1, generate_kwargs={"cache_implementation": "static"}, decode_ideal={"cut": 1.6})
    seen = models["cut"].kwargs_seen
    assert all(kw["cache_implementation"] == "static" and kw["eos_token_id"] is None for kw in seen)
    base_gen, cut = result["models"]["base"]["generation"], result["models"]["cut"]
    assert base_gen["decode_step_runs_s"] == pytest.approx([0.3] * 3)
    assert base_gen["decode_step_cpu_s"] == pytest.approx(0.3)  # CPU time recorded with the wall time
    decode = cut["speedup"]["decode"]
    assert decode["ratio"] == pytest.approx(1.5) and decode["ideal"] == pytest.approx(1.6)
    assert decode["share_of_ideal_gain"] == pytest.approx(0.5 / 0.6)
    assert cut["speedup"]["decode_cpu"]["ratio"] == pytest.approx(1.5)
    assert cut["speedup"]["generation"]["ratio"] < 1.5  # the shared prefill dilutes the gain of the whole call
    assert cut["speedup"]["generation"]["ideal"] == pytest.approx(2.0)  # other kinds keep the matmul ideal
    text = speed_conclusion(result)
    assert ("decode       x1.50 [x1.42, x1.59] (ideal x1.600 with attention's context term): "
            "83% of the ideal gain") in text
    with pytest.raises(ValueError, match=r"may not set \['max_new_tokens'\]"):
        compare_speed(models, tokenizer=FakeTokenizer(), prompts="a", generate_kwargs={"max_new_tokens": 3})
    with pytest.raises(ValueError, match=r"decode_ideal names \['other'\]"):
        compare_speed(models, tokenizer=FakeTokenizer(), prompts="a", decode_ideal={"other": 1.2})


def test_compare_speed_single_run_and_other_base(monkeypatch):
    from utils import compare_speed, speed_conclusion

    models, batches, _ = fake_setup(monkeypatch, big={"width": 8, "forward_s": 2.0}, small={"width": 4})
    result = compare_speed(models, batches, base="small", runs=1, warmup=0)
    big = result["models"]["big"]
    assert result["base"] == "small" and big["ideal_speedup"] == pytest.approx(0.5)
    assert big["speedup"]["forward"]["ratio"] == pytest.approx(0.5)
    assert big["speedup"]["forward"]["verdict"] == "single_run" and "generation" not in big
    assert "forward      x0.50 [x0.50, x0.50]: one run, noise unknown" in speed_conclusion(result)


def test_compare_speed_bad_inputs(monkeypatch):
    from utils import compare_speed, speed_conclusion

    models, batches, _ = fake_setup(monkeypatch, a={"width": 8}, b={"width": 4})
    with pytest.raises(ValueError, match="models is empty"):
        compare_speed({}, batches)
    with pytest.raises(ValueError, match="runs >= 1"):
        compare_speed(models, batches, runs=0)
    with pytest.raises(ValueError, match="base='c' is not one of the models"):
        compare_speed(models, batches, base="c")
    with pytest.raises(ValueError, match="prompts need a tokenizer"):
        compare_speed(models, prompts=["hi"])
    with pytest.raises(ValueError, match="without prompts"):
        compare_speed(models, batches, tokenizer=FakeTokenizer())
    with pytest.raises(ValueError, match="Nothing to time"):
        compare_speed(models)
    with pytest.raises(ValueError, match="dataloader is empty"):
        compare_speed(models, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        compare_speed(models, tokenizer=FakeTokenizer(), prompts="hi", max_new_tokens=1)
    with pytest.raises(TypeError, match="not a torch model"):
        compare_speed({"a": "model"}, batches)
    with pytest.raises(ValueError, match="compare_speed"):
        speed_conclusion({"a": 1})
    with pytest.raises(ValueError, match="not a compared model"):
        speed_conclusion(compare_speed(models, batches, runs=1), "a")


def test_time_alternately(monkeypatch):
    from utils import speed, time_alternately

    clock, calls = FakeClock(), []
    monkeypatch.setattr(speed, "time", clock)

    def job(name, cost):
        def run():
            calls.append(name)
            clock.now += cost
        return run

    stats = time_alternately({"a": job("a", 2.0), "b": job("b", 1.0)}, runs=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert stats["a"]["median_s"] == pytest.approx(2.0) and stats["b"]["runs_s"] == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match="jobs is empty"):
        time_alternately({})
    with pytest.raises(TypeError, match="lambda"):
        time_alternately({"a": 3})
    with pytest.raises(ValueError, match="warmup >= 0"):
        time_alternately({"a": job("a", 1.0)}, warmup=-1)


def test_measure_generation_needs_a_tokenizer(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="tokenizer"):
        measure_generation(model, None, "hi")


def test_speed_conclusion_explains_per_step_overhead_only_when_measured(monkeypatch):
    from utils import compare_speed, speed_conclusion

    # a decoding step (1 s) costs 10x the forward pass's time per token (0.8 s / 8 tokens)
    models, batches, _ = fake_setup(monkeypatch, base={"width": 8, "forward_s": 0.8, "token_s": 1.0},
                                    small={"width": 4, "forward_s": 0.5, "token_s": 1.0, "jitter": [1.05, 0.95, 1]})
    result = compare_speed(models, batches, tokenizer=FakeTokenizer(), prompts="x", max_new_tokens=3, runs=3)
    assert result["models"]["base"]["generation"]["step_vs_forward"] == pytest.approx(10.0)
    assert "10.0x the forward pass's time" in speed_conclusion(result)
    models, batches, _ = fake_setup(monkeypatch, base={"width": 8, "forward_s": 0.8, "token_s": 1.0},
                                    small={"width": 4, "forward_s": 0.5, "token_s": 0.625})
    result = compare_speed(models, batches, tokenizer=FakeTokenizer(), prompts="x", max_new_tokens=3, runs=3)
    assert result["models"]["small"]["generation_lags_forward"] is False  # both x1.6: no lag, no story
    assert "per step" not in speed_conclusion(result)


def test_speed_conclusion_words_a_median_beyond_the_ideal_carefully():
    from utils import speed_conclusion
    from utils.speed import speedup as _speedup

    def result(speedup):
        return {"base": "b", "runs": 3, "models": {"b": {}, "p": {"ideal_speedup": 1.2, "speedup": speedup}}}

    wide = _speedup([1.0, 1.0, 1.0], [1 / 1.1, 1 / 1.4, 1 / 1.6], 1.2, 0.05)  # x1.1 .. x1.6 reaches x1.2
    assert wide["verdict"] == "plausible" and wide["ratio"] == pytest.approx(1.4)
    assert "above the ideal, but the range of the runs reaches it" in speed_conclusion(result({"forward": wide}))
    assert wide["median_outside_band"] == "above"
    slight = _speedup([1.0, 1.0], [1 / 0.97, 1 / 0.98], 1.2, 0.05)  # a little slower, within the tolerance
    assert slight["verdict"] == "plausible" and slight["median_outside_band"] is None
    assert "slower than x1.00, by less than the tolerance" in speed_conclusion(result({"forward": slight}))
    inside = _speedup([1.0, 1.0], [1 / 1.1, 1 / 1.1], 1.2, 0.05)
    assert "50% of the ideal gain" in speed_conclusion(result({"forward": inside}))
    at_ideal = _speedup([1.0, 1.0], [1 / 1.22, 1 / 1.24], 1.2, 0.05)  # a hair above x1.20: inside the tolerance
    assert "115% of the ideal gain" in speed_conclusion(result({"forward": at_ideal}))  # x1.23
