"""Width pruning: which statistic, which repair, which widths? A search on the validation split (issue 33).

    RLLM_PROFILE=cpu python scripts/width_search.py                           # validation split: choose
    RLLM_PROFILE=cpu python scripts/width_search.py --split test --only ...   # report once, chosen variants

The setting of ``scripts/benchmark.py``'s domain table: SmolLM2-135M, 20 % of the MLP neurons (the same total
in every variant), calibration on 16 or 64 texts of a domain's train split (batches of 8, at most 128 tokens),
perplexity on another split of the same domain (at most 256 tokens a text). Every variant prunes a fresh copy
of the same model with the same calibration batches, so the differences are paired.

Variants (each changes one thing against ``uniform``):
  * ``uniform``: ``utils.prune_glu(model, 0.2, dataloader=calib, allocation="uniform")``, the default before
    issue 33 (hybrid score, one norm over every position counting padding, least-squares repair with damping 1.0,
    the same share of every layer);
  * ``optipfair``: optipfair's hybrid (``MAW`` with the dataloader), the reference of the target;
  * ``batch_sum``: the hybrid score with optipfair's statistic, the sum over batches of each batch's norm;
  * ``obs``: choose with the repair's own objective: the output error that removing a neuron leaves once the
    other columns are re-fitted (optimal brain surgeon's saliency ``||W_down[:, i]||^2 / [H^-1]_ii`` with
    ``H`` the damped Gram matrix), removed in rounds with the saliencies recomputed;
  * ``sequential``: each layer's statistics (scores and Gram matrix) measured on the model whose earlier layers
    are already pruned and repaired (one calibration pass per layer);
  * ``global``: non-uniform widths at the same total (``allocation="global"``, :func:`utils.width.allocate_widths`):
    one ranking over all layers of the hybrid scores, each layer's scores divided by their median; the first and
    last blocks lose at most half the uniform share, no layer more than twice it; steps of 32 neurons;
  * ``allocate``: non-uniform widths from each layer's sensitivity: chunks of ``ALLOCATE_CHUNK`` neurons are taken,
    one at a time, from the layer whose relative output error (after the repair, on the calibration tokens)
    grows least; same bounds as ``global``.
Writes runs/<profile>/SWEEP_width_<split>.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import optipfair  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import utils  # noqa: E402
from utils import width as W  # noqa: E402
from utils.structure import glu_mlps  # noqa: E402

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEEN_DOMAINS = ("wikitext", "cosmopedia", "sms_spam", "clinical_notes", "course_code")
RATIO = 0.2
SIZES = utils.budget(full=(16, 64), cpu=(16, 64), tiny=(8,))
EVAL_TEXTS = utils.budget(full=48, cpu=48, tiny=4)
OBS_ROUNDS = 8
ALLOCATE_CHUNK = 64  # neurons per step of the sensitivity allocation
PROTECT = 1  # blocks at each end that lose at most half the uniform share


def _statistics(model, calib, layers, *, batch_sum=False):
    """Gram matrices (real tokens) and padded activation norms (or per-batch sums of norms) of ``layers``."""
    mlps = glu_mlps(model)
    grams = {i: torch.zeros(mlps[i].down_proj.in_features, mlps[i].down_proj.in_features) for i in layers}
    norms = {i: torch.zeros(mlps[i].down_proj.in_features, dtype=torch.float64) for i in layers}

    def consume(index, real, every):
        grams[index].addmm_(real.T, real)
        squares = every.pow(2).sum(dim=0).double()
        norms[index] += squares.sqrt() if batch_sum else squares

    W._run_calibration(model, calib, list(layers), consume, desc="stats", progress=False)
    norms = {i: (n if batch_sum else n.sqrt()).float() for i, n in norms.items()}
    return grams, norms


def obs_keep(down: torch.Tensor, gram: torch.Tensor, keep: int, damping: float = W.DEFAULT_DAMPING,
             rounds: int = OBS_ROUNDS) -> torch.Tensor:
    """Indices kept by optimal-brain-surgeon saliency with the repair's damping, removed in ``rounds`` rounds."""
    weight = down.detach().double()
    width = weight.shape[1]
    alive = torch.arange(width)
    to_remove = width - keep
    col_energy = weight.pow(2).sum(dim=0)
    for r in range(rounds):
        n = to_remove * (r + 1) // rounds - to_remove * r // rounds
        if n == 0:
            continue
        g = gram.double()[alive][:, alive]
        h = g + damping * g.diagonal().mean().clamp_min(1e-12) * torch.eye(len(alive), dtype=g.dtype)
        hinv_diag = torch.linalg.inv(h).diagonal()
        saliency = col_energy[alive] / hinv_diag
        drop = torch.topk(saliency, n, largest=False).indices
        mask = torch.ones(len(alive), dtype=torch.bool)
        mask[drop] = False
        alive = alive[mask]
    return alive.sort().values


def repaired_error(down: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> float:
    """Relative output error ``tr(E G E^T) / tr(W G W^T)`` after the repair keeps ``kept``."""
    weight = down.detach().double()
    g = gram.double()
    new = W.compensate_down_proj(down.detach().float(), gram, kept).double()
    full = torch.zeros_like(weight)
    full[:, kept] = new
    err = weight - full
    return float(torch.trace(err @ g @ err.T) / torch.trace(weight @ g @ weight.T).clamp_min(1e-12))


def _apply(model, kept: dict[int, torch.Tensor], new_down: dict[int, torch.Tensor]):
    mlps = glu_mlps(model)
    removed = {}
    for i, k in kept.items():
        mask = torch.ones(mlps[i].gate_proj.out_features, dtype=torch.bool)
        mask[k] = False
        removed[i] = mask.nonzero().flatten()
    W.remove_neurons(model, removed)
    with torch.no_grad():
        for i, d in new_down.items():
            mlps[i].down_proj.weight.copy_(d)
    return model


def uniform_keep(model) -> int:
    mlp = glu_mlps(model)[0]
    return W.target_width(mlp.gate_proj.out_features, mlp.gate_proj.in_features, RATIO)


def prune_variant(model, calib, name: str):
    mlps = glu_mlps(model)
    n = len(mlps)
    width = mlps[0].gate_proj.out_features
    keep = uniform_keep(model)
    if name == "uniform":  # the default before issue 33
        return utils.prune_glu(model, RATIO, dataloader=calib, allocation="uniform", progress=False)
    if name == "global":  # the default since issue 33 (utils.width.allocate_widths)
        return utils.prune_glu(model, RATIO, dataloader=calib, allocation="global", progress=False)
    if name == "optipfair":
        return optipfair.prune_model(model, pruning_type="MLP_GLU", neuron_selection_method="MAW",
                                     pruning_percentage=100 * RATIO, dataloader=calib, show_progress=False)
    if name == "sequential":
        for i in range(n):
            grams, norms = _statistics(model, calib, [i])
            k = W.kept_indices([W._data_scores(mlps[i], norms[i], "hybrid")], keep)[0]
            _apply(model, {i: k}, {i: W.compensate_down_proj(mlps[i].down_proj.weight, grams[i], k)})
        return model
    grams, norms = _statistics(model, calib, range(n), batch_sum=(name == "batch_sum"))
    scores = {i: W._data_scores(mlps[i], norms[i], "hybrid") for i in range(n)}
    if name in ("batch_sum",):
        kept = {i: W.kept_indices([scores[i]], keep)[0] for i in range(n)}
    elif name == "obs":
        kept = {i: obs_keep(mlps[i].down_proj.weight, grams[i], keep) for i in range(n)}
    elif name == "allocate":
        total_remove = n * (width - keep)
        low = [0] * n
        step = ALLOCATE_CHUNK
        high = [min(width - step, int(2 * RATIO * width) // step * step)] * n
        for i in list(range(PROTECT)) + list(range(n - PROTECT, n)):
            high[i] = int(0.5 * RATIO * width) // step * step
        removed = _allocate(mlps, scores, grams, total_remove, low, high)
        kept = {i: W.kept_indices([scores[i]], width - removed[i])[0] for i in range(n)}
    else:
        raise ValueError(name)
    new_down = {i: W.compensate_down_proj(mlps[i].down_proj.weight, grams[i], kept[i]) for i in range(n)}
    return _apply(model, kept, new_down)


def _allocate(mlps, scores, grams, total_remove, low, high) -> list[int]:
    """Neurons removed per layer, in chunks of ALLOCATE_CHUNK, from each layer's repaired-error curve."""
    n = len(mlps)
    width = mlps[0].gate_proj.out_features
    # allocate: error curve per layer at each chunk count (chunks of ALLOCATE_CHUNK neurons: cheaper curves)
    chunks = -(-total_remove // ALLOCATE_CHUNK)
    curves = []
    for i in range(n):
        order = torch.argsort(scores[i], descending=True)
        curve = [0.0]
        for c in range(1, high[i] // ALLOCATE_CHUNK + 1):
            kept = order[: width - c * ALLOCATE_CHUNK].sort().values
            curve.append(repaired_error(mlps[i].down_proj.weight, grams[i], kept))
        curves.append(curve)
    counts = [0] * n
    for _ in range(chunks):
        best = min((curves[i][counts[i] + 1] - curves[i][counts[i]], i) for i in range(n)
                   if counts[i] + 1 < len(curves[i]))
        counts[best[1]] += 1
    return [c * ALLOCATE_CHUNK for c in counts]


#: The search ran these four on the validation split of the five domains at 16 and 64 texts. Measured on its first
#: row only (wikitext, 16 texts, validation; uniform 23.74, global 21.91) and then dropped: ``obs`` 33.75;
#: ``allocate`` 23.13, at about 4 minutes a row for its error curves; ``sequential`` is measured on the test split
#: by scripts/benchmark.py instead (an ablation column), where it costs one calibration pass per layer.
VARIANTS = ("uniform", "optipfair", "global", "batch_sum")
ALL_VARIANTS = (*VARIANTS, "sequential", "allocate", "obs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=ALL_VARIANTS)
    parser.add_argument("--domains", nargs="*", default=list(SEEN_DOMAINS))
    parser.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    parser.add_argument("--save-as", default=None, help="results name (default: SWEEP_width_<split>)")
    args = parser.parse_args()
    base, tokenizer = utils.load_model(MODEL_ID)
    base_params = utils.count_parameters(base)
    rows = []
    cells = [(d, s, v) for d in args.domains for s in args.sizes for v in args.only]
    bar = tqdm(total=len(cells), desc="domain x size x variant")
    for domain in args.domains:
        held = utils.make_dataloader(utils.load_texts(domain, split=args.split, n=EVAL_TEXTS), tokenizer,
                                     batch_size=8, max_length=256)
        base_ppl = utils.perplexity(base, held, progress=False)
        for size in args.sizes:
            calib = utils.make_dataloader(utils.load_texts(domain, split="train", n=size), tokenizer,
                                          batch_size=8, max_length=128)
            for name in args.only:
                start = time.perf_counter()
                model = prune_variant(copy.deepcopy(base), calib, name)
                seconds = time.perf_counter() - start
                ppl = utils.perplexity(model, held, progress=False)
                widths = [m.gate_proj.out_features for m in glu_mlps(model)]
                rows.append({"domain": domain, "calibration_texts": size, "variant": name, "ppl": ppl,
                             "base_ppl": base_ppl, "prune_s": seconds, "parameters": utils.count_parameters(model),
                             "base_parameters": base_params, "widths": widths})
                tqdm.write(f"{domain:15s} n={size:2d} {name:10s} ppl {ppl:8.2f}  ({seconds:5.1f} s)  "
                           f"params {rows[-1]['parameters']:,}")
                bar.update(1)
                del model
    bar.close()
    # ratios to optipfair, per row, when it ran
    for r in rows:
        ref = [o for o in rows if o["variant"] == "optipfair" and o["domain"] == r["domain"]
               and o["calibration_texts"] == r["calibration_texts"]]
        r["vs_optipfair"] = r["ppl"] / ref[0]["ppl"] if ref else None
    summary = {}
    for name in args.only:
        ratios = [r["vs_optipfair"] for r in rows if r["variant"] == name and r["vs_optipfair"]]
        if ratios:
            summary[name] = {"worst_vs_optipfair": max(ratios), "geomean_vs_optipfair":
                             float(np.exp(np.mean(np.log(ratios))))}
    print(summary)
    utils.save_results(args.save_as or f"SWEEP_width_{args.split}",
                       {"model": MODEL_ID, "split": args.split, "ratio": RATIO, "table": flat_table(rows), "rows": rows,
                        "summary": summary})


def flat_table(rows: list[dict]) -> list[dict]:
    """The rows for RESULTS.md: one flat dict each, the per-block widths reduced to their range."""
    keys = ("domain", "calibration_texts", "variant", "ppl", "vs_optipfair", "base_ppl", "parameters", "prune_s")
    return [{**{k: r[k] for k in keys}, "narrowest_block": min(r["widths"]), "widest_block": max(r["widths"])}
            for r in rows]


if __name__ == "__main__":
    main()
