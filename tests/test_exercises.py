"""Tests of utils.exercises: every check passes on its solution (solutions/), fails helpfully on the starter and
on a wrong answer, and every exercise is wired into its notebook."""

from __future__ import annotations

import copy
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_families import _tiny

from utils import architectures, bias, bypass, exercises, lora, moe, width
from utils.attention import remove_attention
from utils.benchmarks import local_task
from utils.data import load_bias_benchmark, load_bias_pairs, load_bias_probes, load_records, load_texts, make_dataloader
from utils.depth import angular_distances, block_importance, remove_blocks
from utils.evaluation import perplexity
from utils.lora import lora_parameter_count

ROOT = Path(__file__).resolve().parent.parent


def _starter(*args, **kwargs):
    raise NotImplementedError


def _lab_contexts(llama, tokenizer, padded):
    """The objects of the two labs (CH07_NB04, CH09_NB03): trained-looking adapters (B != 0) of rank 1 and 8 on a
    tiny Llama, and a three-expert upcycled copy with a random router."""
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    g = torch.Generator().manual_seed(0)
    adapters = {}
    for rank in (1, 8):
        adapters[rank] = lora.apply_lora(copy.deepcopy(llama), projections, r=rank, alpha=2 * rank)
        with torch.no_grad():
            for layer in adapters[rank].values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    sharp = copy.deepcopy(llama)  # a peaked output distribution: a random tiny model predicts every token alike
    with torch.no_grad():
        sharp.model.norm.weight.mul_(40.0)
    three = moe.upcycle(copy.deepcopy(sharp), [5, 6, 7], [sharp, sharp, sharp], top_k=3)
    with torch.no_grad():
        for layer in moe.moe_layers(three).values():
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
    moe.set_top_k(three, 1)
    short = make_dataloader(load_texts("sms_spam", n=5), tokenizer, batch_size=2, max_length=40)  # 3 batches
    long = make_dataloader(load_texts("wikitext", n=3), tokenizer, batch_size=2, max_length=24)
    return {
        "CH07_NB04.adapter_params": {"model": llama},
        "CH07_NB04.merged_weight": {"layer": adapters[1]["model.layers.0.self_attn.q_proj"]},
        "CH07_NB04.update_energy": {"adapters": adapters[8]},
        "CH09_NB03.expert_share": {"moe_model": three, "dataloader": padded, "expert": 1},
        "CH09_NB03.capacity_factor": {"moe_model": three, "dataloader": padded},
        "CH09_NB03.perplexity_table": {"models": {"dense": sharp, "three experts": three},
                                       "loaders": {"sms_spam": short, "wikitext": long}},
    }


@pytest.fixture(scope="module")
def contexts(tokenizer, loader):
    """The objects each exercise's check gets in its notebook, built from tiny models."""
    llama = _tiny("llama", tokenizer)
    qwen = _tiny("qwen3", tokenizer)
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads  # GQA: the hint can tell
    moe_model = copy.deepcopy(llama)
    moe.moefy(moe_model, 4, 2, dataloader=loader, progress=False)
    gram = moe.gram_matrices(llama, loader, layers=[1], progress=False)[1]
    llama_cut = remove_attention(copy.deepcopy(llama), [2, 5])
    mc_items = local_task("wikitext_cloze", n=12)
    qwen_student = remove_blocks(copy.deepcopy(qwen), [3, 4, 5])
    padded = make_dataloader(load_texts("sms_spam", n=4), tokenizer, batch_size=4, max_length=40)  # short texts
    skeletons = {m: architectures.build_on_meta(m) for m in ("distilbert/distilgpt2", "google/gemma-3-270m",
                                                             "Qwen/Qwen3-0.6B")}
    challenge = _recovery_challenge(tokenizer)
    gemma = _tiny("gemma3", tokenizer)
    dora_model = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                 target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a little training's worth of update
        for name, p in dora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    protected = bypass.default_protected(llama)
    rows = bypass.prompt_attention_scores(llama, loader, prefix_tokens=0.5, decode_first=True, progress=False)
    bypass_context = {"rows": rows, "protected": protected, "threshold": bypass.calibrate_threshold(
        rows, 2, protect=protected, weights=[r["scored_tokens"] for r in rows])}
    pairs = load_bias_pairs("calibration", tokenizer=tokenizer)[:4]
    signed, typical = bias.signed_bias_scores(llama, tokenizer, pairs), bias.typical_magnitudes(llama, tokenizer, pairs)
    bbq = load_bias_benchmark()  # all 384 items: 12 variants per scenario, so the clusters matter
    labs = _lab_contexts(llama, tokenizer, padded)
    return {
        **labs,
        "CH04_NB01.mlp_importance": {"model": qwen, "dataloader": loader},
        # the ends score lowest, as they often do under one-shot cosine: the protection has to act
        "CH04_NB01.choose_protected": {"scores": [0.01, *block_importance(qwen, loader, progress=False)[1:-1], 0.0],
                                       "n": 2},
        "CH08_NB01.kv_bytes": {"model": llama},
        "CH08_NB01.tokens_that_fit": {"model": llama},
        "CH12_NB01.symptom_f1": {"records": load_records("clinical_notes", split="test", n=30)},
        "CH12_NB01.hallucination_rate": {"records": load_records("clinical_notes", split="test", n=30)},
        "CH12_NB02.choose_run": {"distances": angular_distances(qwen, loader, 3, progress=False), "n": 3},
        "CH12_NB02.parameter_reduction": {"model": qwen, "student": qwen_student},
        "CH12_NB02.stage_checks": {"stages": {  # a ledger shaped like the notebook's, extra keys included
            "base": {"blocks": 6, "parameters": 1000, "ppl_general": 14.1, "ppl_task": 30.2, "task_accuracy": 0.77},
            "cut": {"blocks": 4, "parameters": 800, "ppl_general": 31.3, "ppl_task": 55.0, "task_accuracy": 0.5},
            "recovered": {"blocks": 4, "parameters": 800, "ppl_general": 20.2, "ppl_task": 50.1, "task_accuracy": 0.6},
            "specialist": {"blocks": 4, "parameters": 800, "ppl_general": 24.0, "ppl_task": 9.5, "task_accuracy": 0.9},
            "base + LoRA": {"blocks": 6, "parameters": 1000, "ppl_general": 15.0, "ppl_task": 8.1,
                            "task_accuracy": 0.94}}},
        "APPB_NB01.accuracy_stderr": {"items": mc_items, "predictions": [i % 2 for i in range(len(mc_items))]},
        "APPB_NB01.mcnemar": {},
        "APPC_NB01.decode_cost_per_token": {},
        "APPC_NB01.kwh_per_million_tokens": {},
        "CH02_NB01.perplexity_by_hand": {"model": llama, "dataloader": padded},
        "CH02_NB01.drop_blocks": {"model": _tiny("gemma3", tokenizer), "dataloader": loader},
        "CH02_NB02.teacher_entropy": {"teacher": llama, "dataloader": padded},
        "CH02_NB02.top1_agreement": {"student": qwen_student, "teacher": qwen, "dataloader": padded},
        "CH03_NB01.mlp_params": {"skeletons": skeletons},
        "CH03_NB01.attention_params": {"skeletons": skeletons},
        "CH05_NB01.params_removed": {"model": llama, "pruned": width.prune_glu(copy.deepcopy(llama), 0.25,
                                                                                progress=False)},
        "CH05_NB01.width_for_expansion": {"model": llama},
        "CH05_NB02.padded_norms": {"model": llama, "dataloader": padded},
        "CH05_NB02.kept_overlap": {"scores_a": width.neuron_importance(llama, method="maw"),
                                   "scores_b": width.neuron_importance(llama, method="l2"), "keep": 40},
        "CH06_NB01.uniform_map": {"n_teacher": 18},
        "CH06_NB01.recovered": {},
        "CH06_NB04.retention": {},
        "CH06_NB04.texts_needed": {"sizes": [8, 8, 16, 16, 32, 32], "retentions": [0.61, 0.63, 0.64, 0.66, 0.7, 0.69]},
        "CH06_NB03.recovery_recipe": challenge,
        "CH06_NB03.write_card": {"model": challenge["pruned"], "tokenizer": tokenizer,
                                 "numbers": {"perplexity, wikitext test": 1004.25, "target": 1005.5, "steps": 4},
                                 "base_model": "tiny-random/Qwen/Qwen3-0.6B", "removed": [3, 4, 5]},
        "CH07_NB01.int_quantize_blocks": {"weight": llama.model.layers[0].mlp.up_proj.weight},
        "CH07_NB01.bits_per_weight": {},
        "CH07_NB02.lora_params": {"config": llama.config},
        "CH07_NB02.rank1_forward": {"config": llama.config},
        "CH08_NB02.attention_params_removed": {"model": llama, "cut": llama_cut},
        "CH08_NB02.cut_cache_bytes": {"cut": llama_cut},
        "CH09_NB01.within_coactivation": {"gram": gram, "experts": moe.partition_neurons(gram, 4)[0]},
        "CH09_NB01.active_share": {"moe_model": moe_model},
        "CH08_NB04.decode_flops": {"model": llama},
        "CH08_NB04.realised_share": {},
        "CH09_NB02.routing_entropy": {"moe_model": moe_model, "dataloader": padded},
        "CH09_NB02.balance_loss": {},
        "CH10_NB01.negative_gate_share": {"model": llama, "dataloader": padded},
        "CH10_NB01.loudest_neurons": {"model": llama, "tokenizer": tokenizer, "prompt": "The river rose fast.",
                                      "layer": 1},
        "CH10_NB02.largest_entry": {"model": llama, "tokenizer": tokenizer, "prompt": "The river rose fast."},
        "CH10_NB02.peak_ratios": {"model": llama, "tokenizer": tokenizer, "prompt": "The river rose fast."},
        "CH06_NB02.window_distances": {"model": gemma, "dataloader": loader, "n": 4},
        "CH06_NB02.width_ratio": {"model": gemma, "blocks": [3, 7, 9, 12]},
        "CH07_NB03.dora_weight": {"dora_model": dora_model},
        "CH07_NB03.qlora_bytes": {"model": llama},
        "CH08_NB03.skipped_per_token": bypass_context,
        "CH08_NB03.expected_cache_ratio": bypass_context,
        "CH11_NB01.signed_scores": {"model": llama, "tokenizer": tokenizer, "pairs": pairs, "layer": 1},
        "CH11_NB01.relative_scores": {"signed": signed, "typical": typical},
        "CH11_NB02.removed_per_layer": {"scores": bias.relative_scores_from(signed, typical),
                                        "protect_layers": [0, 1, 2]},
        "CH11_NB02.stereotype_score": {"model": llama, "tokenizer": tokenizer,
                                       "probes": load_bias_probes("stereotype", split="test")[:3]},
        "CH11_NB03.bbq_bias": {"items": bbq[:48], "predictions": [k % 3 for k in range(48)]},
        "CH11_NB03.scenario_interval": {"items": bbq, "predictions": [k % 3 for k in range(len(bbq))],
                                        "clusters": [(i["axis"], i["scenario"]) for i in bbq]},
    }


def _recovery_challenge(tokenizer, slack: float = 1e-3) -> dict:
    """CH06_NB03's challenge on a tiny Qwen 3 with blocks 3-5 removed: 4 steps of cosmopedia, wikitext held out.

    The target is the perplexity the default recipe reaches, plus ``slack``: on random tiny models every recipe is
    within noise of the others (about 3e-5 apart), so the tests give the target 0.1 % of room: they test the
    check's logic (budget, training the right model, the comparison), not which recipe wins.
    """
    import utils
    from utils import distillation, evaluation

    teacher, _ = utils.load_model("Qwen/Qwen3-0.6B")  # name_or_path tiny-random/Qwen/Qwen3-0.6B, as in a notebook
    pruned = remove_blocks(copy.deepcopy(teacher), [3, 4, 5])
    batches = make_dataloader(load_texts("cosmopedia", split="train", n=8), tokenizer, batch_size=2, max_length=48)
    held_out = make_dataloader(load_texts("wikitext", split="test", n=4), tokenizer, batch_size=4, max_length=48)
    reference = copy.deepcopy(pruned)
    distillation.distill(reference, teacher, batches, progress=False)
    target = evaluation.perplexity(reference, held_out, progress=False) * (1 + slack)
    return {"pruned": pruned, "teacher": teacher, "batches": batches, "held_out": held_out, "target": target,
            "steps": len(batches)}


#: A plausible wrong answer per exercise: the check must say what is wrong, not crash.
WRONG = {
    "CH04_NB01.mlp_importance": lambda model, dataloader: [0.5] * model.config.num_hidden_layers,
    "CH04_NB01.choose_protected": lambda scores, n: sorted(range(len(scores)), key=lambda i: scores[i])[:n] or [0],
    "CH08_NB01.kv_bytes": lambda config, tokens, b: (2 * config.num_hidden_layers * config.num_attention_heads
                                                     * (config.hidden_size // config.num_attention_heads) * b * tokens),
    "CH08_NB01.tokens_that_fit": lambda model, gigabytes: 1.5,
    # the population standard deviation (n, not n - 1); a one-sided p-value
    "APPB_NB01.accuracy_stderr": lambda items, preds: _population_stderr(items, preds),
    "APPB_NB01.mcnemar": lambda only_a, only_b: _solution("APPB_NB01.mcnemar")(only_a, only_b) / 2
    if only_a + only_b else 1.0,
    # F1 averaged per note; invented values counted against all fields
    "CH12_NB01.symptom_f1": lambda predictions, records: sum(
        _solution("CH12_NB01.symptom_f1")([p], [r]) for p, r in zip(predictions, records)) / len(records),
    "CH12_NB01.hallucination_rate": lambda predictions, records: _solution("CH12_NB01.hallucination_rate")(
        predictions, records) / 2,
    # the first and last runs not excluded; the share of blocks for the share of parameters; recovery compared
    # with the base model instead of the cut one
    "CH12_NB02.choose_run": lambda distances, n: list(range(min(range(len(distances)), key=distances.__getitem__),
                                                            min(range(len(distances)), key=distances.__getitem__) + n)),
    "CH12_NB02.parameter_reduction": lambda model, blocks: len(blocks) / model.config.num_hidden_layers,
    "CH12_NB02.stage_checks": lambda stages: {
        "cut": stages["cut"]["parameters"] < stages["base"]["parameters"],
        "recovered": stages["recovered"]["ppl_general"] < stages["base"]["ppl_general"],
        "specialist": stages["specialist"]["ppl_task"] < stages["recovered"]["ppl_task"]},
    # the batch forgotten; kilowatts for kilowatt-hours
    "APPC_NB01.decode_cost_per_token": lambda first, second, n, batch: (second - first) / (n - 1),
    "APPC_NB01.kwh_per_million_tokens": lambda joules: joules * 1e6 / 1000,
    # padding counted as targets; the blocks removed without renumbering the cache slots
    "CH02_NB01.perplexity_by_hand": lambda model, dataloader: _ppl_with_padding(model, dataloader),
    "CH02_NB01.drop_blocks": lambda model, indices: _drop_without_renumbering(model, indices),
    # the temperature forgotten; padding counted
    "CH02_NB02.teacher_entropy": lambda teacher, dataloader, temperature: _entropy_at_t1(teacher, dataloader),
    "CH02_NB02.top1_agreement": lambda student, teacher, dataloader: _agreement_with_padding(student, teacher,
                                                                                             dataloader),
    # two matrices instead of three; query heads for the key/value projections too
    "CH03_NB01.mlp_params": lambda spec: 2 * spec.hidden_size * spec.intermediate_size * spec.num_layers,
    "CH03_NB01.attention_params": lambda spec: 4 * spec.hidden_size * spec.num_heads * spec.head_dim * spec.num_layers,
    # the gate and up rows counted, the down column forgotten
    "CH05_NB01.params_removed": lambda model, keep: 2 * model.config.hidden_size * model.config.num_hidden_layers
    * (model.config.intermediate_size - keep),
    # rounded to the nearest multiple instead of down
    "CH05_NB01.width_for_expansion": lambda hidden, expansion, divisor: round(expansion * hidden / divisor) * divisor
    + divisor,
    # padding left out; the overlap counted against all neurons instead of the kept ones
    "CH05_NB02.padded_norms": lambda model, dataloader: width.activation_norms(model, dataloader, progress=False),
    "CH05_NB02.kept_overlap": lambda a, b, keep: _solution("CH05_NB02.kept_overlap")(a, b, keep) * keep
    / a[0].numel(),
    # rounded down instead of to the nearest; the share of raw perplexity
    "CH06_NB01.uniform_map": lambda n_student, n_teacher: [(i + 1) * n_teacher // n_student - 1
                                                           for i in range(n_student)],
    "CH06_NB01.recovered": lambda base, pruned, recovered_ppl: (pruned - recovered_ppl) / (pruned - base)
    if pruned > base else float("nan"),
    # always student / teacher; a line fitted on the size itself, not its logarithm
    "CH06_NB04.retention": lambda teacher, student, lower_is_better: student / teacher,
    "CH06_NB04.texts_needed": lambda sizes, retentions, target: _linear_size_fit(sizes, retentions, target),
    # two passes over the batches (twice the budget); a card that does not say which blocks went
    "CH06_NB03.recovery_recipe": lambda student, teacher, batches: _distill(student, teacher, batches, epochs=2,
                                                                            temperature=1.0, progress=False),
    "CH06_NB03.write_card": lambda model, tokenizer, folder, numbers: _publish().save_with_card(
        model, tokenizer, folder, base_model=model.name_or_path, changes=["pruned, then distilled"], results=numbers),
    # one absmax for the whole tensor; the constants forgotten
    "CH07_NB01.int_quantize_blocks": lambda w, bits, block: _solution("CH07_NB01.int_quantize_blocks")(w, bits,
                                                                                                         w.numel()),
    "CH07_NB01.bits_per_weight": lambda bits, block, double: float(bits),
    # attention projections all counted as hidden -> hidden (wrong under grouped-query attention)
    "CH07_NB02.lora_params": lambda config, rank, targets: (rank * 2 * config.hidden_size * len(targets)
                                                            * config.num_hidden_layers),
    # the update without alpha
    "CH07_NB02.rank1_forward": lambda x, weight, bias, a, b, alpha: x @ weight.T + bias + (x @ a)[..., None] * b,
    # only the query and output projections; every layer still counted
    "CH08_NB02.attention_params_removed": lambda model, blocks: len(blocks) * 2 * model.config.hidden_size ** 2,
    "CH08_NB02.cut_cache_bytes": lambda config, removed, tokens, b: _solution("CH08_NB01.kv_bytes")(config, tokens, b),
    # the diagonal kept in; every expert counted as idle
    "CH09_NB01.within_coactivation": lambda gram, experts: float(sum(
        (gram.abs() / gram.diagonal().sqrt()[:, None] / gram.diagonal().sqrt()[None, :])[m][:, m].mean()
        for m in experts) / len(experts)),
    "CH09_NB01.active_share": lambda moe_model: 0.5,
    # the attention term forgotten; the plain ratio
    "CH08_NB04.decode_flops": lambda model, context: _solution("CH08_NB04.decode_flops")(model, 0),
    "CH08_NB04.realised_share": lambda measured, ideal: measured / ideal,
    # natural logarithm instead of bits; padding counted
    "CH09_NB02.routing_entropy": lambda load: [float(-(p[p > 0] * p[p > 0].log()).sum()) for p in load],
    "CH09_NB02.balance_loss": lambda logits, top_k, mask: _solution("CH09_NB02.balance_loss")(
        logits, top_k, torch.ones_like(mask)),
    # padding counted; the quietest neurons
    "CH10_NB01.negative_gate_share": lambda model, dataloader: [0.5] * model.config.num_hidden_layers,
    "CH10_NB01.loudest_neurons": lambda model, tokenizer, prompt, layer, k: list(range(k)),
    # the smallest magnitude instead of the largest; the mean instead of the median
    "CH10_NB02.largest_entry": lambda stream: _unravel(int((-stream.abs()).argmax()), stream.shape),
    "CH10_NB02.peak_ratios": lambda stream: (stream.abs().flatten(1).max(1).values
                                             / stream.abs().flatten(1).mean(1)).tolist(),
    # the arccos not divided by pi; the share of blocks instead of the share of MLP parameters
    "CH06_NB02.window_distances": lambda model, dataloader, n: [
        d * math.pi for d in _solution("CH06_NB02.window_distances")(model, dataloader, n)],
    "CH06_NB02.width_ratio": lambda model, blocks: len(blocks) / model.config.num_hidden_layers,
    # norms per column instead of per row; AdamW's state forgotten
    "CH07_NB03.dora_weight": lambda w, a, b, m, s: _dora_per_column(w, a, b, m, s),
    "CH07_NB03.qlora_bytes": lambda model, rank, targets, dora: _solution("CH07_NB03.qlora_bytes")(
        model, rank, targets, dora) - 8 * lora_parameter_count(model, rank, targets, dora=dora),
    # the plain mean over prompts, for the budget and for the cache
    "CH08_NB03.skipped_per_token": lambda skipped, decoded: sum(skipped) / len(skipped),
    "CH08_NB03.expected_cache_ratio": lambda skipped, tokens, n_blocks: 1 - sum(skipped) / len(skipped) / n_blocks,
    # optipfair's unsigned mean |difference|; no floor under the typical magnitude
    "CH11_NB01.signed_scores": lambda model, tokenizer, pairs, layer: bias.pair_differences(
        model, tokenizer, pairs)[:, layer].abs().mean(0),
    "CH11_NB01.relative_scores": lambda signed, typical: signed.abs() / typical,
    # the protected layers forgotten; the target prompt's preference alone
    "CH11_NB02.removed_per_layer": lambda scores, ratio, protect_layers, per_layer: _solution(
        "CH11_NB02.removed_per_layer")(scores, ratio, [], per_layer),
    "CH11_NB02.stereotype_score": lambda model, tokenizer, probe: _target_preference(model, tokenizer, probe),
    # every answer naming the target group counted as biased, whatever the question's polarity; items resampled
    # one by one
    "CH11_NB03.bbq_bias": lambda items, predictions: _solution("CH11_NB03.bbq_bias")(
        [{**i, "question_polarity": "neg"} for i in items], predictions),
    "CH11_NB03.scenario_interval": lambda items, predictions, clusters, n_boot, seed: _solution(
        "CH11_NB03.scenario_interval")(items, predictions, list(range(len(items))), n_boot, seed),
    # the labs. The frozen weights counted (in x out); alpha not divided by r (right at rank 1 only); the singular
    # values not squared
    "CH07_NB04.adapter_params": lambda model, rank, targets: sum(
        m.in_features * m.out_features for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets),
    "CH07_NB04.merged_weight": lambda weight, A, B, alpha: weight.float() + alpha * (B.float() @ A.float()),
    "CH07_NB04.update_energy": lambda delta, k: float(torch.linalg.svdvals(delta)[:k].sum()
                                                      / torch.linalg.svdvals(delta).sum()),
    # padding counted; the largest share not compared with the even share 1/E; the mean of per-batch perplexities
    "CH09_NB03.expert_share": lambda moe_model, dataloader, expert: _share_with_padding(moe_model, dataloader, expert),
    "CH09_NB03.capacity_factor": lambda load: load.max(dim=1).values.tolist(),
    "CH09_NB03.perplexity_table": lambda models, loaders: {
        name: {d: sum(perplexity(m, [b], progress=False) for b in dl) / len(dl) for d, dl in loaders.items()}
        for name, m in models.items()},
}


def _distill(*args, **kwargs):
    from utils.distillation import distill
    return distill(*args, **kwargs)


def _publish():
    from utils import publish
    return publish
def _dora_per_column(weight, a, b, m, scaling):
    adapted = weight.float() + scaling * (b.float() @ a.float())
    return m.float()[:, None] * adapted / adapted.norm(dim=0, keepdim=True)


@torch.no_grad()
def _share_with_padding(moe_model, dataloader, expert):
    hits, tokens = None, 0
    with moe.keep_router_logits(moe_model) as layers:
        for batch in dataloader:
            moe_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            counts = [int((layer.last_router_logits.argmax(-1) == expert).sum()) for layer in layers]
            hits = counts if hits is None else [h + c for h, c in zip(hits, counts)]
            tokens += batch["input_ids"].numel()
    return [h / tokens for h in hits]


@torch.no_grad()
def _ppl_with_padding(model, dataloader):
    import math

    import torch.nn.functional as F
    total, count = 0.0, 0
    for batch in dataloader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["input_ids"][:, 1:].reshape(-1)
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets, reduction="sum"))
        count += batch["input_ids"][:, 1:].numel()
    return math.exp(total / count)


def _drop_without_renumbering(model, indices):
    import torch
    model.model.layers = torch.nn.ModuleList([b for i, b in enumerate(model.model.layers) if i not in indices])
    model.config.num_hidden_layers = len(model.model.layers)
    return model


@torch.no_grad()
def _entropy_at_t1(teacher, dataloader):
    from solutions.CH02_NB02 import teacher_entropy
    return teacher_entropy(teacher, dataloader, 1.0)


@torch.no_grad()
def _agreement_with_padding(student, teacher, dataloader):
    same, count = 0, 0
    for batch in dataloader:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        agree = student(**inputs).logits.argmax(-1) == teacher(**inputs).logits.argmax(-1)
        same, count = same + int(agree.sum()), count + agree.numel()
    return same / count


def _linear_size_fit(sizes, retentions, target):
    mx, my = sum(sizes) / len(sizes), sum(retentions) / len(retentions)
    b = sum((x - mx) * (r - my) for x, r in zip(sizes, retentions)) / sum((x - mx) ** 2 for x in sizes)
    return math.inf if b <= 0 else mx + (target - my) / b


def _population_stderr(items, predictions):
    correct = [float(p == item["label"]) for item, p in zip(items, predictions)]
    mean = sum(correct) / len(correct)
    return mean, (sum((c - mean) ** 2 for c in correct) / len(correct)) ** 0.5 / len(correct) ** 0.5


def _target_preference(model, tokenizer, probe):
    from solutions.CH11_NB02 import _continuation_logprob
    prompt = probe["target_prompt"]
    return (_continuation_logprob(model, tokenizer, prompt, probe["stereo"])
            - _continuation_logprob(model, tokenizer, prompt, probe["anti"]))


def _unravel(flat, shape):
    rows, tokens, hidden = shape
    row, rest = divmod(flat, tokens * hidden)
    return (row, *divmod(rest, hidden))


def _solution(exercise_id):
    ex = exercises.EXERCISES[exercise_id]
    module = importlib.import_module(f"solutions.{ex.notebook}")
    return getattr(module, ex.name)


def test_every_exercise_has_a_test_context_and_a_wrong_answer(contexts):
    assert set(contexts) == set(exercises.EXERCISES) == set(WRONG)


@pytest.mark.parametrize("exercise_id", sorted(exercises.EXERCISES))
def test_solution_passes_starter_and_wrong_answer_fail_with_a_hint(exercise_id, contexts, capsys):
    context = contexts[exercise_id]
    good = exercises.check(exercise_id, _solution(exercise_id), **context)
    assert good.passed, str(good)
    assert "Correct" in capsys.readouterr().out
    starter = exercises.check(exercise_id, _starter, **context)
    assert not starter.passed and "Not started" in starter.message and starter.hint
    assert "Hint:" in str(starter)
    wrong = exercises.check(exercise_id, WRONG[exercise_id], quiet=True, **context)
    assert not wrong.passed and wrong.message and "Hint:" in str(wrong)


def test_the_wrong_kv_answer_is_told_about_query_heads(contexts):
    wrong = exercises.check("CH08_NB01.kv_bytes", WRONG["CH08_NB01.kv_bytes"], quiet=True,
                            **contexts["CH08_NB01.kv_bytes"])
    assert "key/value heads" in wrong.message


@pytest.mark.parametrize("exercise_id, told", [
    ("CH06_NB02.window_distances", "divide the arccos by pi"),
    ("CH06_NB04.retention", "wrong way round"),
    ("CH06_NB04.texts_needed", "not on the size itself"),
    ("CH06_NB02.width_ratio", "share of the blocks removed"),
    ("CH07_NB03.dora_weight", "norms per column"),
    ("CH07_NB03.qlora_bytes", "AdamW's two moments"),
    ("CH08_NB03.skipped_per_token", "plain mean over prompts"),
    ("CH08_NB03.expected_cache_ratio", "plain mean over prompts"),
])
def test_the_wrong_answer_is_told_its_mistake(exercise_id, told, contexts):
    wrong = exercises.check(exercise_id, WRONG[exercise_id], quiet=True, **contexts[exercise_id])
    assert not wrong.passed and told in wrong.message, wrong.message


def test_an_error_in_the_answer_is_reported_not_raised(contexts):
    def broken(model, gigabytes):
        return model.no_such_attribute
    feedback = exercises.check("CH08_NB01.tokens_that_fit", broken, quiet=True, **contexts["CH08_NB01.tokens_that_fit"])
    assert not feedback.passed and "AttributeError" in feedback.message


def test_check_rejects_unknown_ids_and_missing_context():
    with pytest.raises(ValueError, match="Unknown exercise"):
        exercises.check("CH99_NB01.nothing", _starter)
    with pytest.raises(ValueError, match="model="):
        exercises.check("CH08_NB01.kv_bytes", _starter)
    with pytest.raises(ValueError, match="<notebook>.<name>"):
        exercises.exercise("no-dot", "t", "h")


def _notebook(notebook: str) -> str:
    found = list((ROOT / "notebooks").glob(f"*/{notebook}_*.ipynb"))
    assert len(found) == 1, (notebook, found)
    cells = json.loads(found[0].read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("exercise_id", sorted(exercises.EXERCISES))
def test_every_exercise_is_in_its_notebook_with_a_starter_and_a_check(exercise_id):
    ex = exercises.EXERCISES[exercise_id]
    source = _notebook(ex.notebook)
    assert f'exercises.check("{exercise_id}"' in source
    assert f"def {ex.name}(" in source and "raise NotImplementedError" in source


def test_notebooks_check_only_known_exercises():
    import re
    for path in sorted((ROOT / "notebooks").glob("*/*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells)
        for exercise_id in re.findall(r'exercises\.check\("([^"]+)"', source):
            assert exercise_id in exercises.EXERCISES, (path.name, exercise_id)
            assert path.name.startswith(exercise_id.split(".")[0]), (path.name, exercise_id)


def test_list_exercises():
    assert {e.id for e in exercises.list_exercises("CH08_NB01")} == {"CH08_NB01.kv_bytes", "CH08_NB01.tokens_that_fit"}
    assert len(exercises.list_exercises()) == len(exercises.EXERCISES)


def test_the_challenge_tells_the_default_recipe_a_copy_and_a_card_without_numbers_apart(contexts, tokenizer):
    from utils import distillation
    exact = _recovery_challenge(tokenizer, slack=0.0)  # the target is the default recipe's own perplexity
    default = exercises.check("CH06_NB03.recovery_recipe",
                              lambda s, t, b: distillation.distill(s, t, b, progress=False), quiet=True, **exact)
    assert not default.passed and "default settings" in default.message, default.message
    assert default.details["perplexity"] == pytest.approx(exact["target"], rel=1e-9)  # same batches: a tie

    def trains_a_copy(student, teacher, batches):
        return distillation.distill(copy.deepcopy(student), teacher, batches, progress=False)
    copied = exercises.check("CH06_NB03.recovery_recipe", trains_a_copy, quiet=True, **exact)
    assert not copied.passed and "not a copy" in copied.message
    solved = exercises.check("CH06_NB03.recovery_recipe", _solution("CH06_NB03.recovery_recipe"), quiet=True,
                             **contexts["CH06_NB03.recovery_recipe"])
    assert solved.passed and solved.details["steps"] == 4 and solved.details["tokens"] > 0
    assert solved.details["perplexity"] < contexts["CH06_NB03.recovery_recipe"]["target"]
    assert solved.details["model"] is not contexts["CH06_NB03.recovery_recipe"]["pruned"]  # a trained copy
    card = contexts["CH06_NB03.write_card"]
    thin = exercises.check("CH06_NB03.write_card", lambda m, t, f, n: _publish().save_with_card(
        m, t, f, base_model=m.name_or_path, changes=["removed blocks 3-5, then distilled"], results=n), quiet=True,
        **card)
    assert not thin.passed and "parameters of the published model" in thin.message
    assert exercises._mentioned_numbers(["blocks 12-14 and 20", "x 3 to 5"]) == {3, 4, 5, 12, 13, 14, 20}


def test_every_notebook_has_at_least_two_checked_exercises():
    """Issue 30: every notebook of the course, labs included, ends with at least two checked exercises."""
    for path in sorted((ROOT / "notebooks").glob("*/*.ipynb")):
        notebook = path.name.split("_")[0] + "_" + path.name.split("_")[1]
        assert len(exercises.list_exercises(notebook)) >= 2, f"{path.name} has fewer than two exercises"
def test_the_lab_checks_name_the_likely_mistake(contexts):
    wrong = exercises.check("CH12_NB02.parameter_reduction", WRONG["CH12_NB02.parameter_reduction"], quiet=True,
                            **contexts["CH12_NB02.parameter_reduction"])
    assert "share of the blocks" in wrong.message
    wrong = exercises.check("CH12_NB02.stage_checks", WRONG["CH12_NB02.stage_checks"], quiet=True,
                            **contexts["CH12_NB02.stage_checks"])
    assert "'recovered'" in wrong.message and "cut model" in wrong.message
    wrong = exercises.check("CH12_NB02.choose_run", WRONG["CH12_NB02.choose_run"], quiet=True,
                            **contexts["CH12_NB02.choose_run"])
    assert "block 0 or the last block" in wrong.message
