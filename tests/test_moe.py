"""Mixture of experts from a dense model (utils.moe): exact split, clustering, routing, loss, export, bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import utils
from utils import moe

MODEL_ID = "meta-llama/Llama-3.2-1B"  # tiny profile: 16 blocks, hidden 64, 256 neurons
LAYERS = [2, 9]  # split two blocks only: fast, and the export must keep the others dense


@pytest.fixture(scope="module")
def base():
    return utils.load_model(MODEL_ID)


@pytest.fixture(scope="module")
def calib(base):
    texts = utils.load_texts("wikitext", split="train", n=6)
    return utils.make_dataloader(texts, base[1], batch_size=3, max_length=32)


@pytest.fixture(scope="module")
def batch(calib):
    return next(iter(calib))


@pytest.fixture(scope="module")
def split(base, calib):
    """A copy split into 4 experts (2 active) with 32 shared neurons in blocks 2 and 9."""
    model = copy.deepcopy(base[0])
    info = moe.moefy(model, 4, 2, dataloader=calib, layers=LAYERS, shared=32, progress=False)
    return model, info


def batch_loader(batch):
    return [batch]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_all_experts_active_equals_the_dense_model(base, split, batch):
    model, _ = split
    moe.set_top_k(model, 4)
    try:
        diff = (_logits(model, batch) - _logits(base[0], batch)).abs().max()
    finally:
        moe.set_top_k(model, 2)
    assert diff < 1e-4
    assert (_logits(model, batch) - _logits(base[0], batch)).abs().max() > 1e-3  # k < E does change the model


def test_partition_is_balanced_disjoint_and_seeded(split):
    _, info = split
    experts, shared = info["partitions"][2], info["shared"][2]
    assert experts.shape == (4, (256 - 32) // 4)
    everything = torch.cat([experts.flatten(), shared]).sort().values
    assert torch.equal(everything, torch.arange(256))
    again, _ = moe.partition_neurons(info["grams"][2], 4, shared=32, seed=2)
    assert torch.equal(again, experts)  # moefy seeds block i with seed + i


def test_coactivation_clustering_recovers_planted_groups():
    torch.manual_seed(0)
    groups, per_group, tokens = 4, 8, 400
    kind = torch.randint(0, groups, (tokens,))  # each token "belongs" to one group of neurons
    owner = torch.randperm(groups * per_group) % groups  # neuron -> planted group, shuffled
    acts = torch.randn(tokens, groups * per_group) * 0.05
    acts += (kind[:, None] == owner[None, :]).float() * torch.randn(tokens, groups * per_group).abs()
    gram = acts.T @ acts
    experts, _ = moe.partition_neurons(gram, groups, method="coactivation", seed=1)
    for members in experts:
        assert owner[members].unique().numel() == 1  # every expert is one planted group
    random_split, _ = moe.partition_neurons(gram, groups, method="random", seed=1)
    assert moe.within_expert_coactivation(gram, experts) > moe.within_expert_coactivation(gram, random_split)


def test_softmax_rule_selects_the_same_experts_and_approaches_the_sum_rule(split, calib, batch):
    model, _ = split
    layer = moe.moe_layers(model)[9]
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, args: captured.update(x=args[0].reshape(-1, args[0].shape[-1])))
    _logits(model, batch)
    handle.remove()
    x = captured["x"][batch["attention_mask"].reshape(-1).bool()]
    _, sel_sum, _ = layer.route(x)
    moe.set_routing(model, combine="softmax")
    try:
        temps = moe.calibrate_temperature(model, calib, deviation=0.01)
        _, sel_soft, weights = layer.route(x)
        soft = _logits(model, batch)
    finally:
        moe.set_routing(model, combine="sum", temperature=1.0)
    assert set(temps) == set(LAYERS) and all(t > 0 for t in temps.values())
    agree = (sel_sum.sort(1).values == sel_soft.sort(1).values).all(1).float().mean()
    assert agree >= 0.99
    assert (weights - 1).abs().mean() < 0.02
    assert (soft - _logits(model, batch)).abs().max() < 0.1 * _logits(model, batch).abs().max()


def test_export_reloads_with_plain_transformers(split, batch, base, tmp_path):
    model, _ = split
    moe.set_routing(model, combine="softmax")
    try:
        moe.calibrate_temperature(model, batch_loader(batch))
        expected = _logits(model, batch)
        moe.save_moe(model, base[1], tmp_path)
        eager = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
        check = moe.compare_logits(model, eager, [batch])
    finally:
        moe.set_routing(model, combine="sum", temperature=1.0)
    assert check["max_abs_diff"] < 1e-5 and check["argmax_agreement"] == 1.0  # a loop over experts, like GLUMoE
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # default experts kernel: rounding may differ
    assert reloaded.config.model_type == "qwen2_moe"
    assert reloaded.config.mlp_only_layers == [i for i in range(16) if i not in LAYERS]
    assert (_logits(reloaded, batch) - expected).abs().max() < 1e-5
    ids = batch["input_ids"][:1, :6]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": base[1].pad_token_id}
    with_cache = reloaded.generate(ids, use_cache=True, **kw)
    without = reloaded.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_export_without_shared_expert_and_top1(base, calib, batch, tmp_path):
    model = copy.deepcopy(base[0])
    moe.moefy(model, 8, 1, dataloader=calib, layers=[5], method="random", progress=False)
    moe.set_routing(model, combine="softmax", temperature=5.0)
    expected = _logits(model, batch)
    exported = moe.to_qwen2_moe(model)
    assert (_logits(exported, batch) - expected).abs().max() < 1e-5
    moe.save_moe(model, base[1], tmp_path)
    reloaded, _ = utils.load_model(tmp_path)  # the course loader reads the folder as it is
    assert (_logits(reloaded, batch) - expected).abs().max() < 1e-5


def test_load_balancing_loss_matches_transformers():
    torch.manual_seed(0)
    logits = tuple(torch.randn(2 * 7, 4) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    for k in (1, 2):
        ours = moe.load_balancing_loss(list(logits), k)
        theirs = load_balancing_loss_func(logits, 4, k)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(moe.load_balancing_loss(list(logits), k, mask),
                                   load_balancing_loss_func(logits, 4, k, mask))
    uniform = moe.load_balancing_loss([torch.zeros(12, 4)], 1)  # ties: all picks go to expert 0
    assert torch.isclose(uniform, torch.tensor(1.0))


def test_upcycled_identical_experts_equal_dense_and_router_training_moves_only_routers(base, calib, batch):
    dense = base[0]
    model = copy.deepcopy(dense)
    moe.upcycle(model, [14, 15], [dense, dense], top_k=2, noise_std=0.1)
    assert (_logits(model, batch) - _logits(dense, batch)).abs().max() < 1e-5
    routers = moe.router_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in routers:
        p.requires_grad_(True)

    def loss_fn(m, b):
        with moe.keep_router_logits(m) as layers:
            lm = utils.causal_lm_loss(m, b)
            aux = moe.load_balancing_loss([layer.last_router_logits for layer in layers], 1, b["attention_mask"])
        return lm + 0.1 * aux, {"aux": float(aux.detach())}

    history = utils.train(model, calib, loss_fn, max_steps=2, lr=1e-2, params=routers, progress=False)
    assert history["settings"]["trainable_parameters"] == sum(p.numel() for p in routers)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if any(p is r for r in routers)}


def test_routing_stats_and_active_parameters(split, calib):
    model, _ = split
    stats = moe.routing_stats(model, calib)
    assert stats["layers"] == LAYERS and stats["load"].shape == (2, 4)
    torch.testing.assert_close(stats["load"].sum(1), torch.ones(2))
    assert bool((stats["entropy"] <= stats["max_entropy"] + 1e-6).all())
    counts = moe.active_parameters(model)
    per_expert = 3 * 64 * (256 - 32) // 4
    assert counts["experts"] == 2 * 4 * per_expert
    assert counts["total"] - counts["active"] == 2 * (4 - 2) * per_expert


def test_top1_routing_restores_top_k_and_capacity_factor(split, calib):
    model, _ = split  # runs 2 experts per token
    first = moe.top1_routing(model, calib)
    assert all(layer.top_k == 2 for layer in moe.moe_layers(model).values())
    moe.set_top_k(model, 1)
    try:
        by_hand = moe.routing_stats(model, calib)
    finally:
        moe.set_top_k(model, 2)
    torch.testing.assert_close(first["load"], by_hand["load"])
    factor = moe.capacity_factor(first["load"])
    torch.testing.assert_close(factor, 4 * first["load"].max(dim=1).values)
    assert bool((factor >= 1 - 1e-6).all()) and bool((factor <= 4 + 1e-6).all())
    even, one_expert = torch.full((2, 4), 0.25), torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(moe.capacity_factor(even), torch.ones(2))
    torch.testing.assert_close(moe.capacity_factor(one_expert), torch.tensor([4.0]))
    with pytest.raises(ValueError, match="layers, experts"):
        moe.capacity_factor(torch.ones(4))


def test_router_loss_fn_adds_the_weighted_balance_term(base, batch):
    dense = base[0]
    model = moe.upcycle(copy.deepcopy(dense), [14, 15], [dense, dense], top_k=2)
    with torch.no_grad():
        for layer in moe.moe_layers(model).values():
            torch.nn.init.normal_(layer.router.weight, std=0.5)
        loss, parts = moe.router_loss_fn(0.5)(model, batch)
        lm = utils.causal_lm_loss(model, batch)
        with moe.keep_router_logits(model) as layers:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = [layer.last_router_logits for layer in layers]
            balance = moe.load_balancing_loss(logits, 1, batch["attention_mask"])
    torch.testing.assert_close(loss, lm + 0.5 * balance)
    assert math.isclose(parts["lm"], float(lm), rel_tol=1e-5)
    assert math.isclose(parts["balance"], float(balance), rel_tol=1e-5)
    assert all(layer.last_router_logits is None for layer in moe.moe_layers(model).values())  # nothing kept after
    for weight in (-1, True, "0.1"):
        with pytest.raises(ValueError, match="balance_weight"):
            moe.router_loss_fn(weight)


def test_oracle_picks_the_largest_experts(split):
    model, _ = split
    layer = moe.moe_layers(model)[2]
    x = torch.randn(10, layer.hidden_size)
    moe.set_routing(model, selection="oracle")
    try:
        _, selected, _ = layer.route(x)
    finally:
        moe.set_routing(model, selection="router")
    norms = layer.expert_outputs(x).norm(dim=-1)
    assert torch.equal(selected.sort(1).values, torch.topk(norms, 2).indices.sort(1).values)


def test_bad_inputs_say_what_to_do(base, calib, split):
    model, _ = split
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        moe.set_top_k(model, 5)
    with pytest.raises(ValueError, match="equal experts"):
        moe.moefy(copy.deepcopy(base[0]), 3, 1, dataloader=calib, layers=[0], progress=False)
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        moe.moefy(copy.deepcopy(base[0]), 4, 5, method="random", router="zeros", progress=False)
    with pytest.raises(ValueError, match="dataloader="):
        moe.moefy(copy.deepcopy(base[0]), 4, 2, progress=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="gate_proj"):
        moe.moefy(gpt2, 2, 1, method="random", router="zeros")
    with pytest.raises(ValueError, match="combine='softmax'"):
        moe.to_qwen2_moe(model)  # the exact 'sum' rule has no transformers equivalent
    with pytest.raises(ValueError, match="no GLUMoE layer"):
        moe.set_top_k(base[0], 1)
    with pytest.raises(ValueError, match="temperature"):
        moe.set_routing(model, temperature=0)
    with pytest.raises(ValueError, match="list of models"):
        moe.upcycle(copy.deepcopy(base[0]), [1], base[0])
    unrouted = copy.deepcopy(base[0])
    assert moe.moefy(unrouted, 4, 4, layers=[0], method="random", router="zeros", progress=False)["router_r2"] == {}
    assert not moe.moe_layers(unrouted)[0].router.weight.any()
    qwen3, _ = utils.load_model("Qwen/Qwen3-0.6B")
    moe.moefy(qwen3, 2, 1, layers=[0], method="random", router="zeros", progress=False)
    moe.set_routing(qwen3, combine="softmax")
    with pytest.raises(ValueError, match="Export supports llama"):
        moe.to_qwen2_moe(qwen3)


def test_flops_ideal_counts_the_active_experts_only(base, split):
    model, _ = split
    idle = moe.active_parameters(model)["total"] - moe.active_parameters(model)["active"]
    routers = sum(p.numel() for p in moe.router_parameters(model))
    assert utils.matmul_parameters(model) == utils.matmul_parameters(base[0]) - idle + routers


def test_random_split_measures_no_gram_and_compare_logits_skips_padding(base, batch):
    model = copy.deepcopy(base[0])
    info = moe.moefy(model, 4, 4, layers=LAYERS, method="random", router="zeros", progress=False)
    assert info["grams"] == {}  # no identity stand-ins returned (16 x 268 MB on the CPU for Llama-3.2-1B)
    assert all(p.shape == (4, 64) for p in info["partitions"].values())
    padded = {"input_ids": batch["input_ids"].clone(), "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][-1] = 0  # a row of padding only: skipped, not a NaN or an empty max
    check = moe.compare_logits(model, base[0], [padded])  # k = E: the split equals the dense model
    assert check["tokens"] == int(padded["attention_mask"].sum())
    assert check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
