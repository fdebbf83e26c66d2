"""Sweep: which `utils.distill` settings recover a depth-pruned model best in a fixed, short budget?

    RLLM_PROFILE=cpu python scripts/sweep_distill.py                 (about 5 minutes a variant on 2 CPU cores)
    RLLM_PROFILE=cpu python scripts/sweep_distill.py --only default alpha0.9

The setting of CH02_NB02: remove 20 % of the blocks with the default
choice (`choose_blocks_to_remove` on 16 wikitext validation texts), then run `utils.distill` for
STEPS optimizer steps of 8 x 128 tokens of wikitext train text. Each variant changes settings of
`utils.distill` from its defaults; every variant starts from the same pruned student, sees the same
batches in the same order, and is evaluated on held-out wikitext (the training domain) and on held-out
cosmopedia (another domain: what the recovery costs or gains elsewhere).

Writes runs/<profile>/SWEEP_distill_settings.json; scripts/collect_results.py puts it in RESULTS.md.
This is the evidence behind the defaults documented in utils/distillation.py.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import utils  # noqa: E402

MODEL_ID = "google/gemma-3-270m"  # the book's CH02 model; the cpu profile maps it to SmolLM2-135M
STEPS = utils.budget(full=250, cpu=30, tiny=2)
TRAIN_TEXTS = utils.budget(full=4000, cpu=336, tiny=8)
EVAL_TEXTS = utils.budget(full=400, cpu=48, tiny=4)
BATCH, MAX_LENGTH = utils.budget(full=8, cpu=8, tiny=4), 128

#: key -> (label, keyword arguments of utils.distill that differ from its defaults).
VARIANTS: dict[str, tuple[str, dict]] = {
    "default": ("defaults of utils.distill", {}),
    "alpha0.9": ("alpha=0.9 (mostly soft targets)", {"alpha": 0.9}),
    "alpha0.3": ("alpha=0.3 (more cross-entropy)", {"alpha": 0.3}),
    "ce-only": ("alpha=0 (cross-entropy only: no teacher)", {"alpha": 0.0}),
    "T1": ("temperature=1", {"temperature": 1.0}),
    "features": ("+ features through the kept-block map (beta=1)", {"layer_map": "kept", "beta": 1.0}),
    "skew0.1": ("skew KL, skew=0.1 (DistiLLM's setting)", {"skew": 0.1}),
    "compound": ("compound: skew KL 0.1 + features + feature dynamics (kept map, beta=gamma=1)",
                 {"skew": 0.1, "layer_map": "kept", "beta": 1.0, "gamma": 1.0}),
}


def run(names: list[str]) -> dict:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"Unknown variant(s) {unknown}. Available: {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    teacher, tokenizer = utils.load_model(MODEL_ID)
    wiki_train = utils.load_texts("wikitext", split="train")
    train_texts = (wiki_train * math.ceil(TRAIN_TEXTS / len(wiki_train)))[:TRAIN_TEXTS]
    evals = {d: utils.make_dataloader(utils.load_texts(d, split="test", n=EVAL_TEXTS), tokenizer, batch_size=8,
                                      max_length=MAX_LENGTH) for d in ("wikitext", "cosmopedia")}
    calib = utils.make_dataloader(utils.load_texts("wikitext", split="validation", n=16), tokenizer, batch_size=8,
                                  max_length=MAX_LENGTH)
    n_blocks = teacher.config.num_hidden_layers
    removed = utils.choose_blocks_to_remove(teacher, calib, max(1, round(0.2 * n_blocks)))
    pruned = utils.remove_blocks(copy.deepcopy(teacher), removed)
    base = {d: utils.perplexity(teacher, dl, progress=False) for d, dl in evals.items()}
    before = {d: utils.perplexity(pruned, dl, progress=False) for d, dl in evals.items()}
    rows = [{"variant": "base (teacher)", **{f"ppl_{d}": v for d, v in base.items()}},
            {"variant": "pruned, no recovery", **{f"ppl_{d}": v for d, v in before.items()}}]
    for name in names:
        label, settings = VARIANTS[name][0], dict(VARIANTS[name][1])
        torch.manual_seed(0)
        train_dl = utils.make_dataloader(train_texts, tokenizer, batch_size=BATCH, max_length=MAX_LENGTH,
                                         shuffle=True, seed=0)
        student = copy.deepcopy(pruned)
        history = utils.distill(student, teacher, train_dl, max_steps=STEPS, progress=False, **settings)
        ppl = {d: utils.perplexity(student, dl, progress=False) for d, dl in evals.items()}
        rows.append({"variant": label, **{f"ppl_{d}": v for d, v in ppl.items()},
                     **{f"x_base_{d}": ppl[d] / base[d] for d in ppl}, "seconds": history["seconds"]})
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
        del student
    defaults = {"lr": utils.distillation.DEFAULT_LR, "alpha": utils.distillation.DEFAULT_ALPHA,
                "temperature": utils.distillation.DEFAULT_TEMPERATURE, "skew": utils.distillation.DEFAULT_SKEW,
                "warmup_steps": utils.distillation.DEFAULT_WARMUP_STEPS}
    return {"model": teacher.name_or_path, "removed_blocks": sorted(removed), "steps": STEPS,
            "batch": f"{BATCH}x{MAX_LENGTH} tokens", "defaults": defaults, "table": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help=f"variants to run (default: all): {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    results = run(args.only or list(VARIANTS))
    path = utils.save_results("SWEEP_distill_settings", results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
