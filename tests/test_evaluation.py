import math

import pytest
import torch

from utils import (
    count_parameters,
    load_texts,
    make_dataloader,
    measure_forward,
    measure_generation,
    perplexity,
    speed_ratios,
)


def test_count_parameters_counts_tied_once(tiny_llama):
    model, _ = tiny_llama
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    model.model.layers[0].mlp.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) < count_parameters(model)


def test_count_parameters_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        count_parameters("model")


def test_perplexity_matches_manual_token_weighted_nll(tiny_llama):
    model, tokenizer = tiny_llama
    texts = load_texts("sms_spam", n=6)
    loader = make_dataloader(texts, tokenizer, batch_size=4, max_length=32)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # one text at a time: no padding at all
            ids = tokenizer(text, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total, count = total + nll.item(), count + ids.shape[1] - 1
    assert perplexity(model, loader, progress=False) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_perplexity_ignores_padding(tiny_llama):
    model, tokenizer = tiny_llama
    texts = load_texts("wikitext", n=3)
    alone = perplexity(model, make_dataloader(texts[:1], tokenizer, max_length=24), progress=False)
    mixed = make_dataloader([texts[0], "hi"], tokenizer, batch_size=2, max_length=24)
    batch = next(iter(mixed))
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    short = perplexity(model, make_dataloader(["hi"], tokenizer), progress=False)
    # token-weighted: the combined value lies between the two single-text values
    both = perplexity(model, mixed, progress=False)
    assert min(alone, short) - 1e-6 <= both <= max(alone, short) + 1e-6


def test_perplexity_of_empty_loader_is_an_error(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="no token"):
        perplexity(model, [], progress=False)


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
