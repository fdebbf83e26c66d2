"""The capstone's recipe (CH12_NB01): which calibration, width allocation, distillation and LoRA keep general ability?

    RLLM_PROFILE=cpu python scripts/capstone_search.py --variant calib=mix,alloc=global --stage cut
    RLLM_PROFILE=cpu python scripts/capstone_search.py --variant calib=mix,alloc=global,dlr=1e-4,lora=plain,seed=0
    RLLM_PROFILE=cpu python scripts/capstone_search.py --baseline --seed 0
    RLLM_PROFILE=cpu python scripts/capstone_search.py --table                 # the rows saved so far

Issue 29 asks the capstone to keep its general abilities: wikitext perplexity at most 1.6x the base model's,
and each of the four task metrics (schema compliance, field exact match, symptom F1, medication F1) at most 5
points below the baseline (the unpruned model with the same LoRA budget), at <= 75 % of the parameters and a
pipeline under 20 minutes. This script runs CH12_NB01's pipeline with the notebook's `cpu` settings (the same
model, cut sizes, step counts, batch sizes and learning rates) and changes one stage at a time:

* ``calib``: the text that chooses and repairs both cuts: ``clinical`` (the notebook before this search: 64
  clinical notes), ``general`` (64 wikitext train texts), ``mix`` (32 of each);
* ``alloc``: the width cut's allocation: ``uniform`` (the same share of every block) or ``global`` (one ranking
  over all blocks, CH05's default);
* ``dlr``: the distillation's learning rate (``5e-4``, `utils.distill`'s default, or ``1e-4``);
* ``lora``: ``plain`` (CH12's adapter), ``lr1e-3`` (half the learning rate), ``replay`` (every batch of 4
  notes carries one more row: a wikitext train text of at most 128 tokens, with the loss on all its tokens),
  ``replay2`` (two such rows) or ``kdreplay`` (one such row whose targets are the base model's next-token
  distributions, `utils.extraction.replay_distill_loss`, instead of the text's own tokens);
* ``post``: optimizer steps of a second distillation after the adapter is merged (0 unless given): the merged
  specialist is the student, the base model the teacher, on the same wikitext batches as the first
  distillation, at lr 1e-4;
* ``lsteps``: the LoRA's optimizer steps (96 unless given: the notebook's ``cpu`` budget in the first round);
* ``rank``: the LoRA's rank (8 unless given), with alpha = 2 x rank so the adapter's scale stays 2. The second
  round picked ``lsteps=192,rank=32``, which the notebook now uses; the defaults stay the first round's, so the
  rows saved then keep their names;
* ``seed``: the LoRA seed (adapter initialisation and order of the notes).

Everything is measured on VALIDATION data: the 40 validation notes of ``clinical_notes`` (answers generated and
scored as the notebook scores its test notes) and the 24 validation texts of wikitext and of cosmopedia; the
notebook reports on the test split once, with the recipe chosen here.

The rule, fixed before the runs: a recipe qualifies when, on validation, its wikitext ratio is at most 1.6 and
no task metric is more than 5 points below the baseline of the same seed (trained with the same LoRA recipe when
that baseline was run, else the plain one with the same steps and rank and no second distillation); among those
that qualify, the lowest wikitext ratio wins. When none qualifies, the recipe with the fewest failed targets wins,
ties broken by the wikitext ratio. Stages are cached under ``--cache`` (one file per stage prefix), so variants
that share a cut or a distillation reuse it. Rows go to runs/<profile>/SWEEP_capstone_<split>_<tag>.json (one
file per process).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import utils  # noqa: E402
from utils import depth, distillation, lora, width  # noqa: E402
from utils import extraction as ex  # noqa: E402

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TASK, GENERAL, SECOND = "clinical_notes", "wikitext", "cosmopedia"
CUT_BLOCKS, WIDTH_RATIO = 6, 0.22
N_CALIB = utils.budget(full=128, cpu=64, tiny=8)
DISTILL_STEPS = utils.budget(full=300, cpu=42, tiny=2)
LORA_STEPS = utils.budget(full=120, cpu=96, tiny=2)
LORA_BATCH = utils.budget(full=8, cpu=4, tiny=4)
LORA_LR, RANK, ALPHA = 2e-3, 8, 16
MAX_NEW_TOKENS = utils.budget(full=200, cpu=150, tiny=8)
GEN_BATCH = utils.budget(full=32, cpu=40, tiny=4)
N_EVAL = utils.budget(full=None, cpu=None, tiny=4)  # every validation text / note
DEFAULTS = {"calib": "clinical", "alloc": "uniform", "dlr": "5e-4", "lora": "plain", "lsteps": str(LORA_STEPS),
            "rank": str(RANK), "post": "0", "seed": "0"}
CHOICES = {"calib": ("clinical", "general", "mix"), "alloc": ("uniform", "global"), "dlr": ("5e-4", "1e-4"),
           "lora": ("plain", "lr1e-3", "replay", "replay2", "kdreplay")}
POSITIVE_INTS = ("lsteps", "rank", "post", "seed")  # the fields that take a number rather than a choice
STAGES = ("cut", "distill", "lora")
REPLAY_TOKENS = 128


def parse_variant(text: str) -> dict[str, str]:
    """``"calib=mix,dlr=1e-4"`` -> every field, the defaults filled in; a clear error for a typo."""
    spec = dict(DEFAULTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in DEFAULTS:
            raise SystemExit(f"Bad variant field {part!r}: use key=value with keys {', '.join(DEFAULTS)}.")
        if key in CHOICES and value not in CHOICES[key]:
            raise SystemExit(f"{key}={value!r} is not one of {', '.join(CHOICES[key])}.")
        if key in POSITIVE_INTS and not (value.isdigit() and (int(value) > 0 or key in ("seed", "post"))):
            raise SystemExit(f"{key}={value!r} must be a whole number"
                             f"{'' if key in ('seed', 'post') else ' above 0'}.")
        spec[key] = value
    return spec


def key_of(spec: dict[str, str], stage: str) -> str:
    """The cache key and row name of ``spec``'s ``stage``: the fields it depends on (LoRA steps and rank only when
    they differ from the defaults, so the rows saved before those fields existed keep their names)."""
    fields = ("calib", "alloc") if stage == "cut" else ("calib", "alloc", "dlr")
    head = ",".join(f"{f}={spec[f]}" for f in fields)
    return head if stage != "lora" else f"{head},lora={spec['lora']},{lora_extras(spec)}seed={spec['seed']}"


def lora_extras(spec: dict[str, str]) -> str:
    """``"lsteps=192,rank=32,"`` for the LoRA fields that differ from the defaults; ``""`` when none does."""
    return "".join(f"{f}={spec[f]}," for f in ("lsteps", "rank", "post") if spec[f] != DEFAULTS[f])


def baseline_key(spec: dict[str, str]) -> str:
    """The name of the baseline row trained with ``spec``'s LoRA recipe (``"seed=0"`` for the plain default)."""
    recipe = "" if spec["lora"] == "plain" else f"lora={spec['lora']},"
    return f"{recipe}{lora_extras(spec)}seed={spec['seed']}"


class Setup:
    """The model, tokenizer and every loader a run reads (validation data for measuring)."""

    def __init__(self, split: str):
        torch.manual_seed(0)
        self.model, self.tokenizer = utils.load_model(MODEL_ID)
        tok = self.tokenizer
        self.train_records = utils.load_records(TASK, split="train")
        self.records = utils.load_records(TASK, split=split, n=N_EVAL)
        notes = [r["text"] for r in self.train_records[:N_CALIB]]
        general = utils.load_texts(GENERAL, split="train", n=N_CALIB)
        half = N_CALIB // 2
        self.calib = {"clinical": notes, "general": general, "mix": notes[:half] + general[:N_CALIB - half]}
        self.general_train = utils.load_texts(GENERAL, split="train")
        self.evals = {d: utils.make_dataloader(utils.load_texts(d, split=split, n=N_EVAL), tok, batch_size=8,
                                               max_length=256) for d in (GENERAL, SECOND)}
        self.evals["task"] = utils.make_dataloader(
            [ex.chat_prompt(tok, r["text"]) + ex.format_answer(r["label"]) for r in self.records], tok,
            batch_size=8, max_length=384)

    def general_loader(self):
        """The distillation's batches: wikitext train texts, 8 x at most 128 tokens, shuffled with seed 0."""
        return utils.make_dataloader(self.general_train, self.tokenizer, batch_size=8, max_length=128, shuffle=True,
                                     seed=0)

    def calib_loader(self, name: str):
        return utils.make_dataloader(self.calib[name], self.tokenizer, batch_size=8, max_length=256)

    def perplexities(self, m) -> dict[str, float]:
        return {f"ppl_{d}": utils.perplexity(m, dl, progress=False) for d, dl in self.evals.items()}

    def ratios(self, m) -> dict[str, float]:
        """The perplexities of ``m`` and their ratios to the base model's on the two general domains."""
        if not hasattr(self, "base_ppl"):
            self.base_ppl = self.perplexities(self.model)
        ppl = self.perplexities(m)
        return {**ppl, **{f"x_base_{d}": ppl[f"ppl_{d}"] / self.base_ppl[f"ppl_{d}"] for d in (GENERAL, SECOND)}}


def cached(cache: Path, key: str, build):
    path = cache / (key.replace(",", "__").replace("=", "-") + ".pt")
    if path.exists():
        return torch.load(path, weights_only=False), 0.0, True
    start = time.perf_counter()
    model = build()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return model, seconds, False


def _record(s: Setup, rows: list[dict], stage: str, key: str, m, seconds: float, **extra) -> None:
    """One row: ``m``'s perplexities and ratios to the base, its size and the stage's time; kept and printed."""
    r = {"stage": stage, "key": key, **s.ratios(m), "parameters": utils.count_parameters(m), "seconds": seconds,
         **extra}
    rows.append(r)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)


def run_variant(s: Setup, spec: dict[str, str], stage: str, cache: Path, rows: list[dict]) -> None:
    def row(name: str, m, seconds: float, **extra) -> None:
        _record(s, rows, name, key_of(spec, name), m, seconds, **extra)

    def build_cut():
        loader = s.calib_loader(spec["calib"])
        student = depth.prune_depth(copy.deepcopy(s.model), CUT_BLOCKS, loader, progress=False)
        width.prune_glu(student, ratio=WIDTH_RATIO, dataloader=loader, allocation=spec["alloc"], progress=False)
        return student

    student, seconds, hit = cached(cache, key_of(spec, "cut"), build_cut)
    row("cut", student, seconds, cached=hit, removed_blocks=list(student.config.removed_layers))
    if stage == "cut":
        return

    def build_distilled():
        distillation.distill(student, s.model, s.general_loader(), max_steps=DISTILL_STEPS, lr=float(spec["dlr"]),
                             progress=False)
        return student.eval()

    student, seconds, hit = cached(cache, key_of(spec, "distill"), build_distilled)
    row("distill", student, seconds, cached=hit)
    if stage == "distill":
        return
    lora_row(s, spec, student, row)


def lora_row(s: Setup, spec: dict[str, str], start_model, row, name: str = "lora") -> None:
    """Train spec's LoRA on ``start_model`` (changed in place), merge, answer and score the notes; ``row`` records."""
    seed = int(spec["seed"])
    sft = ex.make_sft_dataloader(s.train_records, s.tokenizer, batch_size=LORA_BATCH, max_length=320, seed=seed)
    lr = 1e-3 if spec["lora"] == "lr1e-3" else LORA_LR
    steps, rank = int(spec["lsteps"]), int(spec["rank"])
    alpha = ALPHA * rank / RANK  # the adapter's scale alpha / rank stays ALPHA / RANK = 2
    replay_rows = {"replay": 1, "replay2": 2, "kdreplay": 1}.get(spec["lora"], 0)
    data = (ex.with_replay(sft, s.general_train, s.tokenizer, steps=steps, rows=replay_rows,
                           max_tokens=REPLAY_TOKENS) if replay_rows else sft)
    loss_fn = ex.replay_distill_loss(s.model) if spec["lora"] == "kdreplay" else ex.answer_loss
    peft_model, history = lora.train_lora_adapter(start_model, data, steps=steps, rank=rank, alpha=alpha, lr=lr,
                                                  loss_fn=loss_fn, seed=seed, progress=False)
    merged = peft_model.merge_and_unload().eval()
    seconds = history["seconds"]
    if int(spec["post"]):
        merged.train().requires_grad_(True)  # peft froze the base weights; the second distillation trains them all
        seconds += distillation.distill(merged, s.model, s.general_loader(), max_steps=int(spec["post"]), lr=1e-4,
                                        progress=False)["seconds"]
        merged.eval()
    start = time.perf_counter()
    answers = ex.generate_answers(merged, s.tokenizer, [r["text"] for r in s.records], max_new_tokens=MAX_NEW_TOKENS,
                                  batch_size=GEN_BATCH, progress=False)
    scores = ex.score_extraction(answers, s.records)
    row(name, merged, seconds, generation_seconds=time.perf_counter() - start,
        **{m: scores[m] for m in ex.HEADLINE_METRICS})


def table(paths: list[Path]) -> str:
    rows = [r for p in paths for r in json.loads(p.read_text())["results"]["rows"]]
    baselines = {r["key"]: r for r in rows if r["stage"] == "baseline"}
    metrics = ("schema_compliance", "field_exact_match", "symptom_f1", "medication_f1")
    lines = ["| stage | recipe | wikitext x | cosmopedia x | task ppl | " + " | ".join(metrics)
             + " | targets failed | seconds |", "|" + " --- |" * (7 + len(metrics))]
    for r in rows:
        cells = [r["stage"], r["key"], f"{r['x_base_wikitext']:.3f}", f"{r['x_base_cosmopedia']:.3f}",
                 f"{r['ppl_task']:.2f}"]
        failed = ""
        if "schema_compliance" in r:
            spec = {**DEFAULTS, **dict(p.split("=", 1) for p in r["key"].split(","))}
            plain = {**spec, "lora": "plain", "post": "0"}
            base = baselines.get(baseline_key(spec)) or baselines.get(baseline_key(plain))
            gaps = {m: (r[m] - base[m]) * 100 if base else None for m in metrics}
            cells += [f"{r[m]:.3f}" + ("" if gaps[m] is None else f" ({gaps[m]:+.1f})") for m in metrics]
            if base and r["stage"] != "baseline":
                failed = str(int(r["x_base_wikitext"] > 1.6) + sum(round(g, 6) < -5 for g in gaps.values()))
        else:
            cells += [""] * len(metrics)
        lines.append("| " + " | ".join(cells + [failed, f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", nargs="*", default=[], help="recipes, e.g. calib=mix,alloc=global,dlr=1e-4")
    parser.add_argument("--stage", choices=STAGES, default="lora", help="the last stage to run")
    parser.add_argument("--baseline", action="store_true", help="the unpruned model with the same LoRA")
    parser.add_argument("--seed", type=int, default=0, help="the baseline's LoRA seed")
    parser.add_argument("--baseline-lora", choices=CHOICES["lora"], default="plain",
                        help="the baseline's LoRA recipe (the same as the specialist's, for a fair comparison)")
    parser.add_argument("--baseline-steps", type=int, default=LORA_STEPS, help="the baseline's LoRA steps")
    parser.add_argument("--baseline-rank", type=int, default=RANK, help="the baseline's LoRA rank")
    parser.add_argument("--split", choices=["validation", "test"], default="validation")
    parser.add_argument("--tag", default="a", help="names this process's output file")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/capstone_cache"))
    parser.add_argument("--table", action="store_true", help="print the saved rows as a table and stop")
    args = parser.parse_args(argv)
    out_dir = utils.runs_dir()
    if args.table:
        print(table(sorted(out_dir.glob(f"SWEEP_capstone_{args.split}_*.json"))))
        return 0
    s = Setup(args.split)
    rows: list[dict] = []
    name = f"SWEEP_capstone_{args.split}_{args.tag}"
    if args.baseline:
        spec = parse_variant(f"lora={args.baseline_lora},lsteps={args.baseline_steps},rank={args.baseline_rank},"
                             f"seed={args.seed}")
        key = baseline_key(spec)

        def row(stage, m, seconds, **extra) -> None:
            _record(s, rows, "baseline", key, m, seconds, **extra)

        lora_row(s, spec, copy.deepcopy(s.model), row, name="baseline")
        utils.save_results(name, {"split": args.split, "rows": rows})
    for text in args.variant:
        run_variant(s, parse_variant(text), args.stage, args.cache / args.split, rows)
        utils.save_results(name, {"split": args.split, "rows": rows})  # after every variant: a crash keeps the rest
    return 0


if __name__ == "__main__":
    sys.exit(main())
