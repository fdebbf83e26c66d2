import math

import pytest
import torch

from utils import count_parameters, load_texts, make_dataloader, perplexity


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


def test_calibration_pass_feeds_masks_stops_early_and_restores_mode(tiny_llama):
    from utils import make_dataloader
    from utils.depth import decoder_blocks
    from utils.evaluation import StopForward, calibration_pass

    model, tok = tiny_llama
    model.train()
    loader = make_dataloader(["one short text", "a second, somewhat longer text to pad the first"], tok,
                             batch_size=2, max_length=32)
    masks, reached = [], []
    hooks = [decoder_blocks(model)[0].register_forward_hook(lambda *a: reached.append(0)),
             decoder_blocks(model)[1].register_forward_hook(lambda *a: (_ for _ in ()).throw(StopForward())),
             decoder_blocks(model)[2].register_forward_hook(lambda *a: reached.append(2))]
    try:
        assert calibration_pass(model, loader, masks.append, progress=False) == 1
    finally:
        for h in hooks:
            h.remove()
    assert reached == [0]  # block 1 stopped the pass before block 2
    assert masks[0].shape == next(iter(loader))["attention_mask"].shape and masks[0].sum() < masks[0].numel()
    assert model.training  # the mode the model came in with
    with pytest.raises(ValueError, match="dataloader is empty"):
        calibration_pass(model, [], masks.append, progress=False)


def test_paired_log_perplexity_interval_and_bad_inputs():
    import numpy as np

    from utils.evaluation import paired_log_perplexity

    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 30, size=80).tolist()
    nll_b = [t * 3.0 for t in tokens]
    better = {"nll": [n - 0.2 * t + rng.normal(0, 0.5) for n, t in zip(nll_b, tokens)], "tokens": tokens}
    noisy = {"nll": [n + rng.normal(0, 5) for n in nll_b], "tokens": tokens}
    base = {"nll": nll_b, "tokens": tokens}
    out = paired_log_perplexity(better, base)
    assert out["verdict"] == "a lower" and out["low"] <= out["diff"] <= out["high"] < 0
    assert out["diff"] == pytest.approx(-0.2, abs=0.02) and out["texts"] == 80
    assert paired_log_perplexity(noisy, base)["verdict"] == "within noise"
    assert paired_log_perplexity(base, better)["verdict"] == "a higher"
    with pytest.raises(ValueError, match="same"):
        paired_log_perplexity(better, {"nll": nll_b[:5], "tokens": tokens[:5]})
    with pytest.raises(ValueError, match="n_boot"):
        paired_log_perplexity(better, base, n_boot=10)
