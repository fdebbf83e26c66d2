"""Width pruning of GLU MLPs (utils.width): selection, surgery round trips, optipfair agreement, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import utils
from utils.width import DATA_METHODS, STATIC_METHODS

FAMILIES = ["meta-llama/Llama-3.2-1B", "google/gemma-3-270m", "Qwen/Qwen3-0.6B"]


@pytest.fixture(scope="module")
def tiny(request):
    cache = {}

    def get(model_id):
        if model_id not in cache:
            cache[model_id] = utils.load_model(model_id)
        model, tok = cache[model_id]
        return copy.deepcopy(model), tok

    return get


@pytest.fixture(scope="module")
def calib(tiny):
    _, tok = tiny(FAMILIES[0])
    texts = utils.load_texts("wikitext", split="train", n=6)
    return utils.make_dataloader(texts, tok, batch_size=3, max_length=32)


def _ids(tok):
    return tok(["The river flows through the old town and"], return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("model_id", FAMILIES)
def test_prune_save_reload_same_logits(tiny, calib, model_id, tmp_path):
    model, tok = tiny(model_id)
    before, original = utils.count_parameters(model), model.config.intermediate_size
    utils.prune_glu(model, 0.25, dataloader=calib, allocation="uniform", progress=False)  # one width: plain reload
    width = model.config.intermediate_size
    assert width == original - int(0.25 * original)
    for mlp in utils.glu_mlps(model):
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == width
        assert mlp.gate_proj.weight.dtype == torch.float32
    assert utils.count_parameters(model) < before
    ids = _ids(tok)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == width
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_id", FAMILIES)
def test_generation_with_cache_equals_without(tiny, model_id):
    model, tok = tiny(model_id)
    utils.prune_glu(model, expansion_ratio=2.0, divisor=32, progress=False)
    assert model.config.intermediate_size == 128
    ids = _ids(tok)
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **common)
        plain = model.generate(ids, use_cache=False, **common)
    assert torch.equal(cached, plain)


def test_pruned_equals_masking_neurons(tiny):
    """Removing neurons gives exactly the output of the full MLP with those neurons zeroed."""
    model, _ = tiny(FAMILIES[0])
    mlp = copy.deepcopy(utils.glu_mlps(model)[0])
    x = torch.randn(2, 5, mlp.gate_proj.in_features)
    scores = utils.width.static_scores(mlp.gate_proj.weight, mlp.up_proj.weight, "pon")
    keep = utils.width.kept_indices([scores], 100)[0]
    drop = torch.ones(mlp.gate_proj.out_features, dtype=torch.bool)
    drop[keep] = False
    with torch.no_grad():
        acts = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        acts[..., drop] = 0
        expected = mlp.down_proj(acts)
    pruned = copy.deepcopy(model)
    utils.prune_glu(pruned, 1 - 100 / 256, scores=[scores] + [torch.ones(256)] * (len(utils.glu_mlps(model)) - 1))
    with torch.no_grad():
        torch.testing.assert_close(utils.glu_mlps(pruned)[0](x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["MAW", "VOW", "PON", "L2"])
def test_static_selection_equals_optipfair(tiny, method):
    import optipfair

    model, _ = tiny(FAMILIES[0])
    ours = utils.prune_glu(copy.deepcopy(model), 0.3, method=method.lower(), progress=False)
    theirs = optipfair.prune_model(copy.deepcopy(model), pruning_type="MLP_GLU", neuron_selection_method=method,
                                   pruning_percentage=30, show_progress=False)
    assert ours.config.intermediate_size == theirs.config.intermediate_size
    for a, b in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert a[0] == b[0]
        assert torch.equal(a[1], b[1]), a[0]


def test_divisor_and_expansion_match_optipfair(tiny):
    import optipfair

    model, _ = tiny(FAMILIES[2])
    ours = utils.prune_glu(copy.deepcopy(model), 0.3, divisor=32, progress=False)
    theirs = optipfair.prune_model(copy.deepcopy(model), pruning_type="MLP_GLU", neuron_selection_method="MAW",
                                   pruning_percentage=30, expansion_divisor=32, show_progress=False)
    assert ours.config.intermediate_size == theirs.config.intermediate_size == 128
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name


def test_scores_shapes_and_data_methods(tiny, calib):
    model, _ = tiny(FAMILIES[0])
    n_layers = model.config.num_hidden_layers
    for method in STATIC_METHODS + DATA_METHODS:
        scores = utils.neuron_importance(model, method=method,
                                         dataloader=calib if method in DATA_METHODS else None, progress=False)
        assert len(scores) == n_layers
        assert all(s.shape == (256,) and torch.isfinite(s).all() for s in scores)
    norms = utils.activation_norms(model, calib, progress=False)
    contribution = utils.neuron_importance(model, method="contribution", dataloader=calib, progress=False)
    down = utils.glu_mlps(model)[3].down_proj.weight
    torch.testing.assert_close(contribution[3], norms[3] * down.norm(dim=0))


def test_activation_norms_exclude_padding(tiny):
    """Padding must not count: a padded batch gives the same norms as the texts one by one."""
    model, tok = tiny(FAMILIES[0])
    texts = ["A short one.", "A much longer sentence about rivers, towns and the people who live there."]
    padded = utils.make_dataloader(texts, tok, batch_size=2)
    single = utils.make_dataloader(texts, tok, batch_size=1)
    a = utils.activation_norms(model, padded, progress=False)
    b = utils.activation_norms(model, single, progress=False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_padded_norms_equal_optipfair_on_one_batch(tiny):
    """With padding counted, one batch gives exactly optipfair's per-batch activation norms, so the
    default hybrid scores choose optipfair's neurons; prune_glu's one-pass statistic is the same."""
    from optipfair.pruning import mlp_glu

    model, tok = tiny(FAMILIES[0])
    texts = ["A short one.", "A much longer sentence about rivers, towns and the people who live there."]
    batch = utils.make_dataloader(texts, tok, batch_size=2)
    ours = utils.activation_norms(model, batch, padding=True, progress=False)
    real_only = utils.activation_norms(model, batch, progress=False)
    handles = mlp_glu.setup_mlp_hooks_for_importance(model, torch.device("cpu"))
    try:
        mlp_glu.run_calibration_forward_passes(model, batch, torch.device("cpu"), show_progress=False)
    finally:
        for handle in handles:
            handle.remove()
    theirs = mlp_glu.get_activation_norms()
    for i, n in enumerate(ours):
        torch.testing.assert_close(n, theirs[i].float(), atol=1e-5, rtol=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(ours, real_only))  # the padding did count
    padded = {}
    utils.activation_grams(model, batch, progress=False, padded_norms=padded)
    for i, n in enumerate(ours):
        torch.testing.assert_close(padded[i], n, atol=1e-5, rtol=1e-5)
    # both prune_glu paths (plain cut, and repair with its one-pass statistic) keep the default scores' top neurons
    scores = utils.neuron_importance(model, method="hybrid", dataloader=batch, progress=False)
    keep = utils.target_width(256, model.config.hidden_size, 0.25)
    kept = utils.width.kept_indices(scores, keep)
    for reconstruct in (False, True):
        pruned = utils.prune_glu(copy.deepcopy(model), 0.25, dataloader=batch, reconstruct=reconstruct,
                                 allocation="uniform", progress=False)
        for layer, (mlp, index) in enumerate(zip(utils.glu_mlps(pruned), kept)):
            torch.testing.assert_close(mlp.up_proj.weight, utils.glu_mlps(model)[layer].up_proj.weight[index])


def test_target_width():
    assert utils.target_width(1536, 576, 0.2) == 1536 - 307
    assert utils.target_width(1536, 576, 0.2, divisor=64) == 1216
    assert utils.target_width(8192, 2048, expansion_ratio=2.0) == 4096


def test_bad_inputs(tiny, calib):
    model, _ = tiny(FAMILIES[0])
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="between 0 and 1"):
            utils.prune_glu(model, bad)
    with pytest.raises(ValueError, match="exactly one of"):
        utils.prune_glu(model)
    with pytest.raises(ValueError, match="exactly one of"):
        utils.prune_glu(model, 0.2, expansion_ratio=2.0)
    with pytest.raises(ValueError, match="not fewer than"):
        utils.prune_glu(model, expansion_ratio=8.0)
    with pytest.raises(ValueError, match="rounds the width down to 0"):
        utils.prune_glu(model, 0.2, divisor=512)
    with pytest.raises(ValueError, match="divisor must be a positive integer"):
        utils.prune_glu(model, 0.2, divisor=0)
    with pytest.raises(ValueError, match="Valid methods: .*maw.*contribution"):
        utils.prune_glu(model, 0.2, method="magnitude")
    with pytest.raises(ValueError, match="pass dataloader="):
        utils.prune_glu(model, 0.2, method="hybrid")
    with pytest.raises(ValueError, match="pass dataloader="):
        utils.neuron_importance(model, method="contribution")
    with pytest.raises(ValueError, match="drop dataloader="):
        utils.neuron_importance(model, method="maw", dataloader=calib)
    with pytest.raises(ValueError, match="one per layer"):
        utils.prune_glu(model, 0.2, scores=[torch.ones(3)])
    with pytest.raises(ValueError, match="needs a data-driven method"):
        utils.scores_from_activations(model, [torch.ones(256)], "maw")
    with pytest.raises(ValueError, match="one vector per layer"):
        utils.scores_from_activations(model, [torch.ones(256)], "contribution")
    assert model.config.intermediate_size == 256  # nothing was changed by the failed calls
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="has no gate_proj; width pruning of GLU MLPs needs"):
        utils.prune_glu(gpt2, 0.2)
    with pytest.raises(ValueError, match="has no gate_proj"):
        utils.neuron_importance(gpt2)


# --- least-squares repair of down_proj ------------------------------------------------------

def test_grams_match_activation_norms_and_stop_early(tiny, calib):
    model, _ = tiny(FAMILIES[0])
    norms = utils.activation_norms(model, calib, progress=False)
    grams = utils.activation_grams(model, calib, progress=False)
    assert sorted(grams) == list(range(model.config.num_hidden_layers))
    for i, g in grams.items():
        assert g.shape == (256, 256) and g.dtype == torch.float32
        torch.testing.assert_close(g, g.T)
        torch.testing.assert_close(g.diagonal().sqrt(), norms[i], rtol=1e-4, atol=1e-5)
    partial = utils.activation_grams(model, calib, layers=[1, 3], progress=False)  # stops after layer 3
    assert sorted(partial) == [1, 3]
    for i in (1, 3):
        torch.testing.assert_close(partial[i], grams[i])


def test_compensation_lowers_the_reconstruction_error():
    torch.manual_seed(0)
    hidden, width, tokens = 8, 24, 400
    mixing = torch.randn(width, 12)
    acts = torch.randn(tokens, 12) @ mixing.T + 0.05 * torch.randn(tokens, width)  # correlated neurons
    weight = torch.randn(hidden, width)
    gram = acts.T.double() @ acts.double()
    kept = torch.arange(0, width, 2)
    target = acts @ weight.T

    def error(w):
        return (target - acts[:, kept] @ w.T).pow(2).sum().item()

    repaired = utils.compensate_down_proj(weight, gram, kept, damping=1e-4)
    assert repaired.shape == (hidden, len(kept)) and repaired.dtype == weight.dtype
    assert error(repaired) < 0.05 * error(weight[:, kept])
    heavy = utils.compensate_down_proj(weight, gram, kept, damping=1e6)  # huge ridge: back to the plain cut
    torch.testing.assert_close(heavy, weight[:, kept], atol=1e-3, rtol=1e-3)
    # with nothing removed there is nothing to repair
    torch.testing.assert_close(utils.compensate_down_proj(weight, gram, torch.arange(width)), weight)


def test_prune_glu_repair_changes_only_down_proj_values(tiny, calib):
    model, _ = tiny(FAMILIES[1])
    plain = utils.prune_glu(copy.deepcopy(model), 0.25, dataloader=calib, reconstruct=False, progress=False)
    repaired = utils.prune_glu(copy.deepcopy(model), 0.25, dataloader=calib, progress=False)  # default: repair
    changed = 0
    for a, b in zip(utils.glu_mlps(plain), utils.glu_mlps(repaired)):
        assert torch.equal(a.gate_proj.weight, b.gate_proj.weight)  # same neurons kept
        assert torch.equal(a.up_proj.weight, b.up_proj.weight)
        assert a.down_proj.weight.shape == b.down_proj.weight.shape
        changed += not torch.equal(a.down_proj.weight, b.down_proj.weight)
    assert changed == len(utils.glu_mlps(plain))


def test_repair_lowers_mlp_output_error_on_calibration_text(tiny, calib):
    model, _ = tiny(FAMILIES[0])
    first = utils.glu_mlps(model)[0]
    inputs = []
    handle = first.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        for batch in calib:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
    with torch.no_grad():
        reference = first(x)
        errors = {}
        for flag in (False, True):
            pruned = utils.prune_glu(copy.deepcopy(model), 0.5, dataloader=calib, reconstruct=flag, progress=False)
            errors[flag] = (utils.glu_mlps(pruned)[0](x) - reference).pow(2).sum().item()
    assert errors[True] < errors[False]


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_layer_groups_give_the_same_result(tiny, calib, monkeypatch, allocation):
    """One calibration pass (global: scores and Gram matrices together) or one per group of layers: same model."""
    model, _ = tiny(FAMILIES[2])
    one_pass = utils.prune_glu(copy.deepcopy(model), 0.3, dataloader=calib, allocation=allocation, progress=False)
    monkeypatch.setattr(utils.width, "GRAM_BUDGET_BYTES", 256 * 256 * 4 * 2)  # two layers per pass
    assert len(utils.width.layer_groups(utils.glu_mlps(model), utils.width.GRAM_BUDGET_BYTES)) > 1
    grouped = utils.prune_glu(copy.deepcopy(model), 0.3, dataloader=calib, allocation=allocation, progress=False)
    for (name, a), (_, b) in zip(one_pass.state_dict().items(), grouped.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_static_selection_with_repair_keeps_static_neurons(tiny, calib):
    model, _ = tiny(FAMILIES[0])
    static = utils.prune_glu(copy.deepcopy(model), 0.2, method="maw", progress=False)
    repaired = utils.prune_glu(copy.deepcopy(model), 0.2, method="maw", dataloader=calib, allocation="uniform",
                               progress=False)
    for a, b in zip(utils.glu_mlps(static), utils.glu_mlps(repaired)):
        assert torch.equal(a.gate_proj.weight, b.gate_proj.weight)
        assert not torch.equal(a.down_proj.weight, b.down_proj.weight)


def test_repair_bad_inputs(tiny, calib):
    model, _ = tiny(FAMILIES[0])
    with pytest.raises(ValueError, match="reconstruct=True .* pass dataloader="):
        utils.prune_glu(model, 0.2, reconstruct=True)
    for bad in (0, -1.0, True, "0.1"):
        with pytest.raises(ValueError, match="damping must be a positive number"):
            utils.prune_glu(model, 0.2, dataloader=calib, damping=bad)
    with pytest.raises(ValueError, match="layers must be indices"):
        utils.activation_grams(model, calib, layers=[99])
    with pytest.raises(ValueError, match="dataloader is empty"):
        utils.activation_grams(model, [])
    weight, gram = torch.randn(4, 6), torch.eye(6)
    with pytest.raises(ValueError, match="gram must be \\[6, 6\\]"):
        utils.compensate_down_proj(weight, torch.eye(5), [0, 1])
    for kept in ([], [0, 0], [6], [-1]):
        with pytest.raises(ValueError, match="distinct neuron indices"):
            utils.compensate_down_proj(weight, gram, kept)
    with pytest.raises(ValueError, match="damping must be"):
        utils.compensate_down_proj(weight, gram, [0, 1], damping=0.0)
    assert model.config.intermediate_size == 256


# --- comparing two pruners' selections (CH05_NB01: ours vs optipfair, on a GPU in float16) ---------

def test_kept_neurons_are_read_back_from_the_weights(tiny):
    model, _ = tiny(FAMILIES[0])
    scores = utils.neuron_importance(model, method="maw")
    pruned = utils.prune_glu(copy.deepcopy(model), 0.25, method="maw")
    expected = utils.width.kept_indices(scores, pruned.config.intermediate_size)
    found = utils.width.kept_neurons(model, pruned)
    assert len(found) == len(expected) and all(torch.equal(a, b) for a, b in zip(found, expected))
    assert pruned.config.intermediate_size < model.config.intermediate_size
    with pytest.raises(ValueError, match="not a neuron of the original"):
        utils.width.kept_neurons(_shifted(model), pruned)
    with pytest.raises(ValueError, match="GLU MLPs"):
        short = copy.deepcopy(pruned)
        short.model.layers = short.model.layers[:1]
        utils.width.kept_neurons(model, short)


def _shifted(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for m in utils.glu_mlps(other):
            m.gate_proj.weight.add_(1.0)
    return other


def test_selections_may_differ_only_in_ties():
    scores = [torch.tensor([5.0, 1.0, 3.0, 3.0005, 0.5])]
    a, b = [torch.tensor([0, 2, 3])], [torch.tensor([0, 2, 3])]
    assert utils.width.same_selection_up_to_ties(scores, a, b, rtol=1e-3) == []
    tie = [torch.tensor([0, 1, 3])]  # neuron 1 (1.0) for 2 (3.0): not a tie
    with pytest.raises(ValueError, match="Block 0: neurons \\[1\\] are kept by one selection only"):
        utils.width.same_selection_up_to_ties(scores, a, tie, rtol=1e-3)
    scores = [torch.tensor([5.0, 3.0001, 3.0, 3.0005, 0.5])]  # 1 and 2 tie at the cut-off
    assert utils.width.same_selection_up_to_ties(scores, [torch.tensor([0, 2, 3])], [torch.tensor([0, 1, 3])],
                                                 rtol=1e-3) == [0]
    with pytest.raises(ValueError, match="keep 3 and 2"):
        utils.width.same_selection_up_to_ties(scores, a, [torch.tensor([0, 2])], rtol=1e-3)
    with pytest.raises(ValueError, match="One score vector"):
        utils.width.same_selection_up_to_ties(scores, a, [], rtol=1e-3)


def test_layer_groups_split_by_the_gram_budget():
    mlps = [torch.nn.Module() for _ in range(3)]
    for m in mlps:
        m.down_proj = torch.nn.Linear(8, 4)  # an 8 x 8 float32 Gram matrix: 256 bytes
    assert utils.width.layer_groups(mlps, 512) == [[0, 1], [2]]
    assert utils.width.layer_groups(mlps, 100) == [[0], [1], [2]]  # too big alone: a group each
    assert utils.width.layer_groups(mlps, 10_000) == [[0, 1, 2]]


def test_allocate_widths_takes_the_cheapest_steps_within_bounds():
    torch.manual_seed(0)
    flat = torch.ones(64)
    cheap = torch.cat([torch.full((32,), 0.01), torch.ones(32)])  # half its neurons look useless
    scores = [flat.clone(), flat.clone(), cheap, flat.clone(), flat.clone()]
    removed = utils.width.allocate_widths(scores, 40, step=4, protect=1)
    assert sum(removed) == 40 and all(r % 4 == 0 for r in removed)
    share = 40 / (5 * 64)
    assert removed[2] == int(2 * share * 64) // 4 * 4  # the cheap layer gives all it may (twice the share)
    assert removed[0] <= 0.5 * share * 64 and removed[4] <= 0.5 * share * 64  # the ends are protected
    # scale does not matter: each layer is divided by its median
    scaled = [s * k for s, k in zip(scores, (1, 100, 1, 0.01, 1))]
    assert utils.width.allocate_widths(scaled, 40, step=4) == removed
    # a total that is not a whole number of steps is rounded up, never down
    assert sum(utils.width.allocate_widths(scores, 41, step=4)) == 44


def test_allocate_widths_bad_inputs():
    scores = [torch.rand(16) for _ in range(4)]
    with pytest.raises(ValueError, match="one non-empty 1-D"):
        utils.width.allocate_widths([], 4)
    with pytest.raises(ValueError, match="step must be a positive integer"):
        utils.width.allocate_widths(scores, 4, step=0)
    with pytest.raises(ValueError, match="remove must be a whole number"):
        utils.width.allocate_widths(scores, 0)
    with pytest.raises(ValueError, match="remove must be a whole number"):
        utils.width.allocate_widths(scores, 64)
    with pytest.raises(ValueError, match="within the bounds"):
        utils.width.allocate_widths(scores, 12, step=8)


def test_global_allocation_keeps_the_total_and_round_trips(tiny, calib, tmp_path):
    model, tok = utils.load_model("meta-llama/Llama-3.2-1B")
    before = model.config.intermediate_size
    n = len(utils.width.glu_mlps(model))
    keep = utils.width.target_width(before, model.config.hidden_size, 0.2)
    pruned = utils.prune_glu(copy.deepcopy(model), 0.2, dataloader=calib, progress=False)  # global: the default
    widths = [m.gate_proj.out_features for m in utils.width.glu_mlps(pruned)]
    assert sum(widths) <= n * keep and len(set(widths)) > 1  # never more neurons than the uniform cut
    assert pruned.config.mlp_intermediate_sizes == widths and pruned.config.intermediate_size == max(widths)
    scores = utils.neuron_importance(model, method="hybrid", dataloader=calib, progress=False)
    removed = utils.width.allocate_widths(scores, n * (before - keep), step=1)
    assert widths == [before - r for r in removed]  # a narrow tiny MLP moves neurons one by one
    pruned.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded, _ = utils.load_model(str(tmp_path))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, reloaded(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="allocation must be one of"):
        utils.prune_glu(copy.deepcopy(model), 0.2, allocation="layerwise")
    # the defaults: global with calibration data, uniform without; a static score may drive a global cut too
    assert getattr(utils.prune_glu(copy.deepcopy(model), 0.2, progress=False).config, "mlp_intermediate_sizes",
                   None) is None
    static_global = utils.prune_glu(copy.deepcopy(model), 0.2, method="maw", dataloader=calib, progress=False)
    assert len(set(static_global.config.mlp_intermediate_sizes)) > 1
