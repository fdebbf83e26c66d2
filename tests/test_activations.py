"""Looking inside a model (utils.activations, CH10): captures equal to optipfair's, the residual stream and its
relation to transformers' hidden states, the logit lens identity, massive activations on planted data, the
writers' bookkeeping, ablations that leave the model as it was, attention to the first token, GLU statistics,
neuron binning, the CH10 plots, and bad inputs."""

from __future__ import annotations

import copy

import matplotlib
import pytest
import torch

import utils
from utils.structure import decoder_blocks

matplotlib.use("Agg")

FAMILIES = ["meta-llama/Llama-3.2-1B", "google/gemma-3-270m", "Qwen/Qwen3-0.6B"]
PROMPTS = ["The river flows past the old mill", "A cat"]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(model_id=FAMILIES[0]):
        if model_id not in cache:
            cache[model_id] = utils.load_model(model_id)
        model, tok = cache[model_id]
        return copy.deepcopy(model), tok

    return get


def _logits(model, tok, prompt):
    with torch.no_grad():
        return model(**tok(prompt, return_tensors="pt")).logits[0].float()


# --- captures --------------------------------------------------------------------------------

@pytest.mark.parametrize("model_id", FAMILIES)
def test_captures_equal_optipfair(models, model_id):
    pytest.importorskip("sklearn", reason="optipfair.bias imports scikit-learn: pip install scikit-learn")
    model, tok = models(model_id)
    points = list(utils.activations.OPTIPFAIR_POINTS)
    alone = utils.capture_activations(model, tok, PROMPTS, points, batch_size=1)
    batched = utils.capture_activations(model, tok, PROMPTS, points, batch_size=2)
    for prompt, ours, padded in zip(PROMPTS, alone, batched):
        theirs = utils.optipfair_captures(model, tok, prompt, points)
        for point in points:
            assert torch.equal(ours[point], theirs[point]), (model_id, point)  # one at a time: bit for bit
            torch.testing.assert_close(padded[point], theirs[point], **utils.tolerances(theirs[point]))
    n_tokens = len(tok(PROMPTS[0])["input_ids"])
    config = model.config
    assert alone[0]["down_proj_input"].shape == (config.num_hidden_layers, n_tokens, config.intermediate_size)
    assert alone[0]["attention"].shape == (config.num_hidden_layers, n_tokens, config.hidden_size)


def test_capture_points_are_consistent(models):
    model, tok = models()
    caps = utils.capture_activations(model, tok, PROMPTS[0], list(utils.CAPTURE_POINTS))
    assert set(caps) == set(utils.CAPTURE_POINTS)
    torch.testing.assert_close(caps["block_output"][:-1], caps["block_input"][1:], atol=0, rtol=0)
    for i, block in enumerate(decoder_blocks(model)):
        mlp = block.mlp
        with torch.no_grad():
            torch.testing.assert_close(caps["gate_act"][i], mlp.act_fn(caps["gate_proj"][i]))
            torch.testing.assert_close(caps["down_proj_input"][i], caps["gate_act"][i] * caps["up_proj"][i])
            torch.testing.assert_close(caps["down_proj"][i], mlp.down_proj(caps["down_proj_input"][i]))
            torch.testing.assert_close(caps["input_norm"][i], block.input_layernorm(caps["block_input"][i]))
        # Llama blocks: the stream adds the attention, then the MLP
        torch.testing.assert_close(caps["residual_mid"][i], caps["block_input"][i] + caps["attention"][i])
        torch.testing.assert_close(caps["block_output"][i], caps["residual_mid"][i] + caps["mlp_output"][i])
    some = utils.capture_activations(model, tok, [PROMPTS[0]], "gate_proj", layers=[3, 1])[0]
    torch.testing.assert_close(some["gate_proj"], caps["gate_proj"][[3, 1]])


def test_capture_bad_inputs(models):
    model, tok = models()
    n = model.config.num_hidden_layers
    with pytest.raises(ValueError, match="Known points: block_input"):
        utils.capture_activations(model, tok, "hi", ["down_proj_inputs"])
    with pytest.raises(ValueError, match=rf"valid layers are 0..{n - 1}"):
        utils.capture_activations(model, tok, "hi", layers=[n])
    with pytest.raises(ValueError, match="valid layers"):
        utils.capture_activations(model, tok, "hi", layers=-1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        utils.capture_activations(model, tok, ["hi", "  "])
    with pytest.raises(ValueError, match="No prompt"):
        utils.capture_activations(model, tok, [])
    with pytest.raises(ValueError, match="empty"):
        utils.residual_stream(model, tok, "")
    with pytest.raises(ValueError, match="optipfair does not capture"):
        utils.optipfair_captures(model, tok, "hi", ["block_input"])
    with pytest.raises(ValueError, match="No capture point"):
        utils.capture_activations(model, tok, "hi", [])


# --- residual stream and logit lens ------------------------------------------------------------

@pytest.mark.parametrize("model_id", FAMILIES)
def test_logit_lens_last_row_is_the_models_logits(models, model_id):
    model, tok = models(model_id)
    final_norm = utils.activations._final_norm(model)
    with torch.no_grad():  # a random model's norm has unit weights, and an RMS norm of unit weight is idempotent
        final_norm.weight.add_(torch.rand_like(final_norm.weight))
    prompt = PROMPTS[0]
    stream = utils.residual_stream(model, tok, prompt)
    with torch.no_grad():
        out = model(**tok(prompt, return_tensors="pt"), output_hidden_states=True)
    hidden = torch.stack([h[0].float() for h in out.hidden_states])
    assert stream.shape == hidden.shape
    torch.testing.assert_close(stream[:-1], hidden[:-1])  # hidden_states[i] = input of block i
    with torch.no_grad():
        torch.testing.assert_close(final_norm(stream[-1]), hidden[-1])  # ...but [-1] is already normalised
    lens = utils.logit_lens(model, tok, prompt)
    assert lens.shape == (stream.shape[0], stream.shape[1], out.logits.shape[-1])
    assert (lens[-1] - out.logits[0].float()).abs().max() <= 1e-4
    with torch.no_grad():
        twice = model.get_output_embeddings()(final_norm(hidden[-1]))
    assert (twice - out.logits[0]).abs().max() > 1e-3  # normalising [-1] again is a different function
    words, probs = utils.lens_top_tokens(lens, tok)
    assert len(words) == lens.shape[0] and len(words[0]) == lens.shape[1] and probs.shape == lens.shape[:2]
    assert bool(((probs > 0) & (probs <= 1)).all())


def test_logit_lens_bad_inputs(models):
    model, tok = models()
    with pytest.raises(ValueError, match="rows"):
        utils.logit_lens(model, tok, "hi", stream=torch.zeros(3, 2, model.config.hidden_size))
    with pytest.raises(ValueError, match="stream must be"):
        utils.logit_lens(model, tok, "hi", stream=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="one prompt"):
        utils.logit_lens(model, tok, ["a", "b"])
    with pytest.raises(ValueError, match="lens must be"):
        utils.lens_top_tokens(torch.zeros(2, 3), tok)


def test_find_massive_on_a_planted_value():
    stream = torch.randn(6, 5, 32, generator=torch.Generator().manual_seed(0))
    stream[3:5, 0, 7] = -5000.0  # written after block 2, erased after block 4
    found = utils.find_massive(stream)
    assert (found["layer"], found["token"], found["dimension"], found["value"]) == (3, 0, 7, -5000.0)
    assert found["massive"] and found["appears"] == 3 and found["ratio"] > 1000
    assert found["per_layer"]["dimension"][4] == 7 and len(found["per_layer"]["max"]) == 6
    plain = utils.find_massive(torch.randn(6, 5, 32))
    assert not plain["massive"] and plain["appears"] is None
    with pytest.raises(ValueError, match="residual stream"):
        utils.find_massive(torch.zeros(5, 32))
    with pytest.raises(ValueError, match="empty"):
        utils.find_massive(torch.zeros(3, 0, 4))


def test_trace_writers_bookkeeping(models):
    model, tok = models()
    trace = utils.trace_writers(model, tok, PROMPTS[0], 5, token=2, top=3)
    stream = torch.tensor(trace["stream"])
    steps = torch.tensor(trace["attention"]) + torch.tensor(trace["mlp"])
    torch.testing.assert_close(stream[0] + steps.cumsum(0), stream[1:], atol=1e-5, rtol=1e-5)
    assert trace["neurons_exact"] and trace["token"] == 2
    assert len(trace["writer_neurons"]) == len(trace["eraser_neurons"]) == 3
    sign = 1 if stream[trace["peak_layer"]] >= 0 else -1
    assert all(sign * r["contribution"] > 0 for r in trace["writer_neurons"])
    # with every neuron listed, the neurons' contributions add up to what each MLP adds
    full = utils.trace_writers(model, tok, PROMPTS[0], 5, token=2, top=10**6)
    per_layer = torch.zeros(model.config.num_hidden_layers)
    for record in full["writer_neurons"] + full["eraser_neurons"]:
        per_layer[record["layer"]] += record["contribution"]
    torch.testing.assert_close(per_layer, torch.tensor(trace["mlp"]), atol=1e-5, rtol=1e-4)
    hidden = model.config.hidden_size
    with pytest.raises(ValueError, match=rf"0..{hidden - 1}"):
        utils.trace_writers(model, tok, PROMPTS[0], hidden)
    with pytest.raises(ValueError, match="token 99 out of range"):
        utils.trace_writers(model, tok, PROMPTS[0], 0, token=99)
    with pytest.raises(ValueError, match="empty"):
        utils.trace_writers(model, tok, "", 0)


# --- ablations -------------------------------------------------------------------------------

def test_patch_residual_patches_then_restores(models):
    model, tok = models()
    prompt, layer, dims = PROMPTS[0], 2, [3, 9]
    before = _logits(model, tok, prompt)
    with utils.patch_residual(model, layer, dims, value=[7.0, -7.0]):
        stream = utils.residual_stream(model, tok, prompt)
        inside = _logits(model, tok, prompt)
    assert stream[layer + 1, 0, 3] == 7.0 and stream[layer + 1, 0, 9] == -7.0
    assert stream[layer + 1, 1, 3] != 7.0  # other positions untouched
    assert not torch.equal(inside, before)
    assert torch.equal(_logits(model, tok, prompt), before)
    with pytest.raises(RuntimeError, match="boom"):
        with utils.patch_residual(model, layer, dims, value=0.0):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, tok, prompt), before)
    assert all(not b._forward_hooks for b in decoder_blocks(model))


def test_patch_residual_follows_absolute_positions_in_cached_generation(models):
    model, tok = models()
    ids = tok(PROMPTS[0], return_tensors="pt")
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    n = ids["input_ids"].shape[1]
    with utils.patch_residual(model, 1, [0, 1, 2], positions=[0, n + 1], value=3.0):
        cached = model.generate(**ids, **common)
        uncached = model.generate(**ids, use_cache=False, **common)
    assert torch.equal(cached, uncached)


def test_patch_residual_bad_inputs(models):
    model, tok = models()
    n, hidden = model.config.num_hidden_layers, model.config.hidden_size
    with pytest.raises(ValueError, match=rf"valid layers are 0..{n - 1}"):
        with utils.patch_residual(model, n, [0]):
            pass
    with pytest.raises(ValueError, match=rf"0..{hidden - 1}"):
        with utils.patch_residual(model, 0, [hidden]):
            pass
    with pytest.raises(ValueError, match="one per dimension"):
        with utils.patch_residual(model, 0, [0, 1], value=[1.0, 2.0, 3.0]):
            pass
    with pytest.raises(ValueError, match="positions"):
        with utils.patch_residual(model, 0, [0], positions=[-1]):
            pass


# --- attention sinks, GLU statistics, binning ---------------------------------------------------

@pytest.mark.parametrize("model_id", [FAMILIES[0], FAMILIES[1]])
def test_attention_to_first_token_matches_eager_weights_and_restores(models, model_id):
    model, tok = models(model_id)
    loader = utils.make_dataloader(PROMPTS, tok, batch_size=2)
    before = model.config._attn_implementation
    shares = utils.attention_to_first_token(model, loader, progress=False)
    assert model.config._attn_implementation == before == "sdpa"
    assert len(shares) == model.config.num_hidden_layers and all(0 <= s <= 1 for s in shares)
    # by hand, one prompt at a time, queries 1.. of each prompt
    model.set_attn_implementation("eager")
    sums, count = torch.zeros(len(shares)), 0
    for prompt in PROMPTS:
        with torch.no_grad():
            att = model(**tok(prompt, return_tensors="pt"), output_attentions=True).attentions
        for layer, weights in enumerate(att):
            sums[layer] += weights[0, :, 1:, 0].mean(0).sum()
        count += att[0].shape[2] - 1
    model.set_attn_implementation(before)
    torch.testing.assert_close(torch.tensor(shares, dtype=torch.float32), sums / count, atol=1e-5, rtol=1e-4)

    def broken():
        yield {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1]])}

    with pytest.raises(Exception):  # noqa: B017 - any error from the model
        utils.attention_to_first_token(model, broken(), progress=False)
    assert model.config._attn_implementation == before  # restored after the error
    with pytest.raises(ValueError, match="at least two tokens"):
        utils.attention_to_first_token(model, [{"input_ids": torch.tensor([[5]])}], progress=False)


def test_glu_statistics_by_hand(models):
    model, tok = models()
    loader = utils.make_dataloader(PROMPTS, tok, batch_size=2)
    stats = utils.glu_statistics(model, loader, progress=False)
    caps = utils.capture_activations(model, tok, PROMPTS, ["gate_proj"])
    gates = torch.cat([c["gate_proj"] for c in caps], dim=1)  # [layers, all real tokens, neurons]
    torch.testing.assert_close(torch.tensor(stats["negative_gate"], dtype=torch.float64),
                               (gates < 0).double().mean((1, 2)))
    for key in ("near_zero_act", "near_zero_output"):
        assert len(stats[key]) == model.config.num_hidden_layers and all(0 <= v <= 1 for v in stats[key])
    with pytest.raises(ValueError, match="eps"):
        utils.glu_statistics(model, loader, eps=0)


def test_bin_neurons():
    values = torch.zeros(2, 10)
    values[0, 3] = 100.0
    values[1, 0], values[1, 1] = 5.0, -5.0
    mean_abs = utils.bin_neurons(values, 2, "mean_abs")
    max_abs = utils.bin_neurons(values, 2, "max_abs")
    assert mean_abs.shape == max_abs.shape == (2, 2)
    assert max_abs[0, 0] == 100.0 and mean_abs[0, 0] == 20.0  # the outlier is diluted by the mean
    assert utils.bin_neurons(values, 2, "mean")[1, 0] == 0.0  # opposite signs cancel
    assert bool((max_abs >= mean_abs).all())
    assert utils.bin_neurons(torch.arange(7.0), 3, "max_abs").tolist() == [2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="1..10"):
        utils.bin_neurons(values, 11)
    with pytest.raises(ValueError, match="Unknown binning"):
        utils.bin_neurons(values, 2, "median")


# --- plots -------------------------------------------------------------------------------------

def test_ch10_plots_and_static_explorer(capsys):
    ax = utils.plot_heatmap(torch.rand(3, 5) + 0.1, title="t", xlabel="x", ylabel="y", log=True)
    assert ax.get_title() == "t" and ax.get_xlabel() == "x"
    with pytest.raises(ValueError, match="2-D"):
        utils.plot_heatmap(torch.rand(3), title="t", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="positive"):
        utils.plot_heatmap(-torch.rand(2, 2), title="t", xlabel="x", ylabel="y", log=True)
    words = [["a", "b"], ["c", "d"], ["e", "f"]]
    ax = utils.plot_logit_lens(words, torch.rand(3, 2), input_tokens=["x", "y"], layers=[0, 2])
    assert len(ax.texts) == 4
    with pytest.raises(ValueError, match="input tokens"):
        utils.plot_logit_lens(words, torch.rand(3, 2), input_tokens=["x"])
    seen = {}
    assert not utils.widgets_available()  # the tests run headless (Agg)
    assert utils.explore(lambda prompt, layer: seen.update(prompt=prompt, layer=layer), prompt="hi",
                         layer=(2, 0, 5)) is False
    assert seen == {"prompt": "hi", "layer": 2} and "static figure" in capsys.readouterr().out
    with pytest.raises(ValueError, match="low <= value <= high"):
        utils.explore(lambda layer: None, layer=(9, 0, 5))
