"""Fair Pruning: which neuron ranking removes the stereotype and keeps awareness? A search on validation only.

    RLLM_PROFILE=cpu python scripts/fair_ranking_search.py      # about 25 minutes on one thread

Issue 28. CH11_NB02's validation sweep found that the relative ranking removes awareness of the group word
rather than bias, and that the stereotype attribution costs x2.9 or more in perplexity. This script compares
rankings built from three first-order attributions, all fitted on data the judging never sees:

  * ``S``: :func:`utils.bias.stereotype_attribution` on :func:`utils.bias.attribution_probes` (half of the
    validation stereotype templates, calibration group words);
  * ``A``: the same with the awareness probes' answers (" she" / " he") as the two continuations, fitted on half
    of the validation awareness templates (:func:`utils.bias.split_templates`); the other half judges;
  * ``T``: :func:`utils.bias.text_loss_attribution` on 32 wikitext train texts.

Rankings: ``relative`` (the CH11 default), ``relative-aw`` (its neurons with the top 5 % of ``A`` kept),
``attribution`` (``S`` clamped at 0), ``targeted`` (:func:`utils.bias.targeted_scores`, ``S`` per unit of
``T``), ``targeted-aw`` and ``attr-minus-aw`` (``(S - A)`` per unit of ``T``). Each removes 0.1, 0.25 and
0.5 % of the MLP neurons (first blocks protected) from a fresh copy of the model; judged on the other half of
the validation templates (stereotype, awareness, neutral swaps; intervals resample templates) and on 24
validation texts of wikitext and cosmopedia. Writes runs/<profile>/SWEEP_fair_rankings_validation.json.
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

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import utils  # noqa: E402
from utils import bias, evaluation  # noqa: E402

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
RATIOS = utils.budget(full=(0.001, 0.0025, 0.005), cpu=(0.001, 0.0025, 0.005), tiny=(0.005,))
N_TEXTS = utils.budget(full=24, cpu=24, tiny=4)
MAX_LENGTH = utils.budget(full=192, cpu=192, tiny=48)
N_BOOT = utils.budget(full=1000, cpu=1000, tiny=100)
AWARE_GUARD = 0.95  # the "-aw" rankings keep the neurons above this quantile of positive awareness attribution


def splits(tokenizer) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """Stereotype fit probes, awareness fit probes, and the judging probes (none of them fitted on)."""
    fit_stereo = bias.attribution_probes()
    fitted = {p["template"] for p in fit_stereo}
    judge = {k: [p for p in utils.load_bias_probes(k, split="validation") if p["template"] not in fitted]
             for k in ("stereotype", "awareness", "neutral")}
    fit_aware, judge["awareness"] = bias.split_templates(judge["awareness"])
    return fit_stereo, fit_aware, judge


def rankings(model, tokenizer, fit_stereo: list[dict], fit_aware: list[dict]) -> dict[str, torch.Tensor]:
    """Every candidate ranking (high = remove first), from the three attributions of the module docstring."""
    pairs = utils.load_bias_pairs("calibration", tokenizer=tokenizer)
    relative = bias.relative_bias_scores(model, tokenizer, pairs)
    stereo = bias.stereotype_attribution(model, tokenizer, fit_stereo)
    aware = bias.stereotype_attribution(model, tokenizer, [dict(p, stereo=p["target_answer"], anti=p["other_answer"])
                                                           for p in fit_aware])
    text = bias.text_loss_attribution(model, bias.general_text_loader(tokenizer, max_length=MAX_LENGTH))

    def guard(scores: torch.Tensor) -> torch.Tensor:
        cut = torch.quantile(aware.clamp(min=0).flatten(), AWARE_GUARD)
        return scores.masked_fill(aware > cut, 0.0)

    targeted = bias.targeted_scores(stereo, text)
    return {"relative": relative, "relative-aw": guard(relative), "attribution": stereo.clamp(min=0),
            "targeted": targeted, "targeted-aw": guard(targeted),
            "attr-minus-aw": bias.targeted_scores(stereo - aware, text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-as", default="SWEEP_fair_rankings_validation", help="results name")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = utils.load_model(MODEL_ID)
    fit_stereo, fit_aware, judge = splits(tokenizer)
    texts = {d: utils.make_dataloader(utils.load_texts(d, split="validation", n=N_TEXTS), tokenizer, batch_size=8,
                                      max_length=MAX_LENGTH) for d in ("wikitext", "cosmopedia")}
    start = time.perf_counter()
    candidates = rankings(model, tokenizer, fit_stereo, fit_aware)
    print(f"rankings in {time.perf_counter() - start:.0f} s; judging probes {({k: len(v) for k, v in judge.items()})}")

    def measure(m) -> dict:
        out = {d: evaluation.perplexity(m, loader, progress=False) for d, loader in texts.items()}
        out["behaviour"] = bias.measure_behaviour(m, tokenizer, judge,
                                                  measures=["stereotype", "awareness", "neutral_swap"])
        return out

    base, rows = measure(model), []
    protect = list(range(bias.DEFAULT_PROTECTED_BLOCKS))
    for (name, scores), ratio in tqdm([(c, r) for c in candidates.items() for r in RATIOS], desc="rankings x shares"):
        pruned = copy.deepcopy(model)
        removed = bias.fair_prune(pruned, scores, ratio, protect_layers=protect)
        new = measure(pruned)
        changes = bias.behaviour_changes(base["behaviour"], new["behaviour"], judge, n_boot=N_BOOT, seed=0)
        rows.append({"ranking": name, "ratio": ratio, "neurons": bias.count_neurons(removed),
                     **{f"ppl_x_{d}": new[d] / base[d] for d in texts},
                     **{k: {"value": v["value"], "ci": [v["low"], v["high"]]} for k, v in changes.items()}})
        r = rows[-1]
        print(f"{name:14s} {ratio:.2%} ppl x {r['ppl_x_wikitext']:.3f}/{r['ppl_x_cosmopedia']:.3f}  "
              + "  ".join(f"{k} {v['value']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for k, v in r.items()
                          if k in ("stereotype", "awareness", "neutral_swap")))
        del pruned
    utils.save_results(args.save_as, {"model": MODEL_ID, "split": "validation", "rows": rows,
                                      "judging_probes": {k: len(v) for k, v in judge.items()}})


if __name__ == "__main__":
    main()
