"""Adaptive Attention Bypass: does a router learned from skip costs beat the threshold rule? (issue 27, item 4)

    RLLM_PROFILE=cpu python scripts/bypass_router.py      # writes runs/cpu/SWEEP_bypass_router_validation.json

The setting of CH08_NB03 (notebooks/CH08_attention): its model (SmolLM2-135M-Instruct in ``cpu``), texts cut to
``MAX_LENGTH`` tokens, the first half of each text the prompt (its last token fed as the first decoding step),
the rest scored; a budget counted in attention sublayers skipped **per decoded token**.

Texts. None is one of the held-out texts NB03 reports on (its section 2 takes them from the test split, then the
validation split, then the end of the train split); the script leaves all of those out and checks it.

* training: the first ``N_FIT`` texts of the train split of wikitext and sms_spam (the first of NB03's own
  calibration texts). Both rules are fitted on them: the threshold (``bypass.calibrate_threshold``), the router
  (``bypass_router.skip_costs`` gives its labels, one pass per attention sublayer: the expensive part) and the
  static ranking (``attention.attention_importance``, as in NB03's section 1).
* validation: ``N_VAL`` texts per domain, NB03's own validation texts (its section 5): the train split after
  NB03's calibration texts for wikitext and sms_spam, and the start of course_code's train split (course_code is
  never fitted on). Not ``split="validation"``: the offline samples hold 42-52 test texts per domain, so NB03's 64
  held-out texts take most of their validation split (all of course_code's).

Methods, at each budget of ``BUDGETS`` (calibrated on the training prompts), scored with
``bypass.perplexity_with_skips``:

* ``threshold``: NB03's late rule, skip the attentions whose score on this prompt is below a threshold;
* ``router``: ``bypass_router.CostRouter``, skip the attentions predicted to cost less than a cut;
* ``router, threshold's counts``: each prompt skips as many attentions as the threshold rule did on it, the
  router's cheapest: the two differ only in *which* attentions;
* static removal at the budget a rule realised on the domain (``bypass.matched_counts``, as in NB03's section 8),
  by NB03's ranking, and by the training prompts' mean skip cost (the router's labels without the prompt).

The adaptive rules decide after the prefill (skipped from the prompt's last token on); static removal skips from
the first token, as in NB03. Each comparison is a paired bootstrap over the texts of the difference in
log-perplexity (``evaluation.paired_log_perplexity``); its interval gives the verdict ("beats": below 0).

Cost in ``cpu``: about 205,000 tokens through SmolLM2-135M (padding included), half of them the skip costs (31
passes over the 48 training texts), the rest 19 scoring passes over the 72 validation texts. One thread of the
course's 2-core machine ran a batch of 8 x 96 tokens in 6.2 s (124 tokens/s) while three other jobs shared the two
cores (so about two thirds of a core): about 28 minutes at that rate, about 18 on a core of its own (estimated).
``--fit-texts`` and ``--val-texts`` resize it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import utils  # noqa: E402
from utils import attention, bypass, evaluation  # noqa: E402
from utils.bypass_router import CostRouter, skip_costs  # noqa: E402

MODEL_ID = "meta-llama/Llama-3.2-3B"  # NB03's; cpu substitutes SmolLM2-135M-Instruct, tiny a random 28-block twin
CALIB_DOMAINS = ("wikitext", "sms_spam")
DOMAINS = ("wikitext", "sms_spam", "course_code")
BUDGETS = (4, 8, 12)
N_FIT = utils.budget(full=32, cpu=24, tiny=4)  # training texts per calibration domain
NB03_FIT = utils.budget(full=64, cpu=48, tiny=4)  # NB03's training texts per domain: its validation texts follow
NB03_HELD_OUT = 64  # the most held-out texts per domain NB03 reads (test, validation, then the end of train)
N_VAL = utils.budget(full=64, cpu=24, tiny=3)  # validation texts per domain (cpu: NB03's own 24)
MAX_LENGTH = utils.budget(full=160, cpu=96, tiny=32)
PROMPT_SHARE = 0.5
RIDGE = 1.0
N_BOOTSTRAP = 2000
SEED = 0

STATIC_T, STATIC_R, STATIC_COST = ("static at threshold's budget", "static at router's budget",
                                   "static by cost at router's budget")
SAME_COUNTS = "router, threshold's counts"
#: name, (subject, method or (method, its static control)), (object, ...): "net" compares each rule with
#: the static removal of its own realised budget, text by text, and then the two differences.
COMPARISONS = (
    ("router_vs_threshold_same_counts", ("router", SAME_COUNTS), ("threshold", "threshold")),
    ("router_vs_threshold_net_of_static", ("router", ("router", STATIC_R)), ("threshold", ("threshold", STATIC_T))),
    ("router_vs_threshold_unmatched", ("router", "router"), ("threshold", "threshold")),
    ("router_vs_static", ("router", "router"), ("static removal", STATIC_R)),
    ("router_vs_static_by_cost", ("router", "router"), ("static by cost", STATIC_COST)),
    ("threshold_vs_static", ("threshold", "threshold"), ("static removal", STATIC_T)),
)
VERDICTS = {"a lower": "beats", "within noise": "ties with", "a higher": "loses to"}


def nb03_held_out(domain: str) -> set[str]:
    """Every text NB03 could report on for ``domain``, in any profile: its test and validation splits and the
    last ``NB03_HELD_OUT`` texts of its train split."""
    train = utils.load_texts(domain, split="train")
    return {*utils.load_texts(domain, split="test"), *utils.load_texts(domain, split="validation"),
            *train[::-1][:NB03_HELD_OUT]}


def split_texts(tokenizer, n_fit: int, n_val: int) -> tuple[list[str], dict[str, list[str]], dict[str, int]]:
    """Training texts, validation texts per domain (each list sorted by length: less padding, same pairs) and, per
    domain, how many candidates were left out: texts NB03 may report on or training texts, met again as
    duplicates (sms_spam repeats some messages across its splits)."""
    fit = [t for d in CALIB_DOMAINS for t in utils.load_texts(d, split="train", n=n_fit)]
    val, dropped = {}, {}
    for d in DOMAINS:
        start = max(NB03_FIT, n_fit) if d in CALIB_DOMAINS else 0
        held, chosen, skipped = nb03_held_out(d), [], 0
        for text in utils.load_texts(d, split="train")[start:]:
            if len(chosen) == n_val:
                break
            if text in held or text in fit:
                skipped += 1
            else:
                chosen.append(text)
        if len(chosen) < n_val:
            raise SystemExit(f"{d}: only {len(chosen)} validation texts outside NB03's held-out texts: "
                             "lower --val-texts.")
        val[d], dropped[d] = chosen, skipped
    assert not {t for texts in val.values() for t in texts} & {t for d in DOMAINS for t in nb03_held_out(d)}

    def length(text: str) -> int:
        return min(len(tokenizer(text)["input_ids"]), MAX_LENGTH)
    return sorted(fit, key=length), {d: sorted(v, key=length) for d, v in val.items()}, dropped


@dataclass
class Fitted:
    """Everything fitted on the training prompts."""
    rows: list[dict]
    costs: np.ndarray
    weights: list[int]
    protected: list[int]
    router: CostRouter
    ranking: list[int]  # NB03's static ranking, least important first
    cost_ranking: list[int]  # by mean skip cost on the training prompts, cheapest first


def fit(model, tokenizer, texts: list[str], ridge: float, progress: bool) -> Fitted:
    """Signals, skip costs, the router and both static rankings, from the training texts."""
    dl = utils.make_dataloader(texts, tokenizer, batch_size=8, max_length=MAX_LENGTH)
    protected = bypass.default_protected(model)
    rows = bypass.prompt_attention_scores(model, dl, prefix_tokens=PROMPT_SHARE, decode_first=True, progress=progress)
    costs = np.array(skip_costs(model, dl, prefix_tokens=PROMPT_SHARE, protect=protected, progress=progress))
    weights = [r["scored_tokens"] for r in rows]
    router = CostRouter(protected, ridge=ridge).fit(rows, costs.tolist(), weights=weights)
    static = attention.attention_importance(model, dl, progress=False)
    ranking = [int(i) for i in np.argsort(static) if i not in protected]
    mean_cost = np.average(costs[:, router.blocks], axis=0, weights=weights)
    cost_ranking = [router.blocks[i] for i in np.argsort(mean_cost)]
    return Fitted(rows, costs, weights, protected, router, ranking, cost_ranking)


def training_fit_quality(fitted: Fitted) -> dict:
    """Weighted R² of the router's predictions on its own training rows, next to that of each block's mean cost
    (what a static ranking knows): in-sample, so an upper bound of what the router learned."""
    blocks = fitted.router.blocks
    measured = fitted.costs[:, blocks]
    predicted = np.array([[fitted.router.predict(bypass.as_signal(r))[i] for i in blocks] for r in fitted.rows])
    w = np.repeat(np.asarray(fitted.weights, dtype=float)[:, None], len(blocks), axis=1)
    total = np.sum(w * (measured - np.average(measured, weights=w)) ** 2)
    block_means = np.average(measured, axis=0, weights=fitted.weights)
    return {"r2_router": float(1 - np.sum(w * (measured - predicted) ** 2) / total),
            "r2_block_means": float(1 - np.sum(w * (measured - block_means) ** 2) / total)}


def per_token(skips: list[list[int]], weights: list[int]) -> float:
    return float(np.average([len(s) for s in skips], weights=weights))


def calibrate(fitted: Fitted, k: float) -> dict:
    """Both rules' knobs at budget ``k``, and what they realise on the training prompts themselves."""
    threshold = bypass.calibrate_threshold(fitted.rows, k, protect=fitted.protected, weights=fitted.weights)
    cut = fitted.router.calibrate(fitted.rows, k, weights=fitted.weights)
    rules = {"threshold": bypass.threshold_rule(threshold), "router": fitted.router.rule(cut)}
    spent = {name: per_token(bypass.decisions(fitted.rows, rule, protect=fitted.protected), fitted.weights)
             for name, rule in rules.items()}
    return {"threshold": threshold, "router_cut": cut, "rules": rules, "training_skipped_per_token": spent}


def score(model, tokenizer, texts: list[str], skips: list[list[int]], skip_from: str) -> dict:
    """Per-text nll and tokens of ``texts`` under their skips, with the skips per decoded token."""
    out = bypass.perplexity_with_skips(model, utils.make_dataloader(texts, tokenizer, batch_size=8,
                                                                    max_length=MAX_LENGTH),
                                       prefix_tokens=PROMPT_SHARE, skips=skips, skip_from=skip_from, progress=False)
    out["skipped"] = [len(s) for s in skips]
    out["per_token_skipped"] = per_token(skips, out["tokens"])
    return out


def evaluate_cell(model, tokenizer, texts: list[str], rows: list[dict], fitted: Fitted, knobs: dict) -> dict:
    """Every method on one domain's validation texts at one budget."""
    rules, protect = knobs["rules"], fitted.protected
    threshold_skips = bypass.decisions(rows, rules["threshold"], protect=protect)
    skips = {"threshold": threshold_skips, "router": bypass.decisions(rows, rules["router"], protect=protect),
             SAME_COUNTS: [sorted(fitted.router.ranking(bypass.as_signal(r))[:len(s)])
                           for r, s in zip(rows, threshold_skips)]}
    for name, s in skips.items():
        assert all(not set(blocks) & set(protect) for blocks in s), name
    runs = {name: score(model, tokenizer, texts, s, "decode") for name, s in skips.items()}
    tokens = runs["threshold"]["tokens"]
    for name, rule, ranking in ((STATIC_T, "threshold", fitted.ranking), (STATIC_R, "router", fitted.ranking),
                                (STATIC_COST, "router", fitted.cost_ranking)):
        counts = bypass.matched_counts(tokens, runs[rule]["per_token_skipped"], limit=len(ranking), seed=SEED)
        runs[name] = score(model, tokenizer, texts, [sorted(ranking[:c]) for c in counts], "all")
    return runs


def _side(runs: dict, method) -> dict:
    """A method's per-text result, or (method, control): its nll minus the control's, text by text."""
    if isinstance(method, str):
        return runs[method]
    a, b = (runs[m] for m in method)
    return {"nll": [x - y for x, y in zip(a["nll"], b["nll"])], "tokens": a["tokens"]}


def compare(runs: dict, k: float, domain: str) -> list[dict]:
    """Every comparison of ``COMPARISONS`` on one cell, each with its verdict."""
    out = []
    for name, (subject, a), (other, b) in COMPARISONS:
        c = evaluation.paired_log_perplexity(_side(runs, a), _side(runs, b), n_boot=N_BOOTSTRAP, seed=SEED)
        spent = [runs[m if isinstance(m, str) else m[0]]["per_token_skipped"] for m in (a, b)]
        out.append({"budget": k, "domain": domain, "comparison": name, "diff": c["diff"], "low": c["low"],
                    "high": c["high"], "verdict": f"{subject} {VERDICTS[c['verdict']]} {other}",
                    "skipped_per_token_a": spent[0], "skipped_per_token_b": spent[1]})
    return out


def summarise(comparisons: list[dict]) -> dict:
    """Per comparison, on how many (budget, domain) cells the subject beats, ties with or loses to the other."""
    summary = {}
    for name, *_ in COMPARISONS:
        verdicts = [c["verdict"] for c in comparisons if c["comparison"] == name]
        summary[name] = {word.split()[0]: sum(f" {word} " in v for v in verdicts) for word in VERDICTS.values()}
        summary[name]["cells"] = len(verdicts)
    return summary


def run(budgets=BUDGETS, *, n_fit: int = N_FIT, n_val: int = N_VAL, ridge: float = RIDGE,
        progress: bool = True) -> dict:
    """The whole experiment; returns the results that :func:`main` saves."""
    start = time.perf_counter()
    model, tokenizer = utils.load_model(MODEL_ID)
    fit_texts, val_texts, dropped = split_texts(tokenizer, n_fit, n_val)
    fitted = fit(model, tokenizer, fit_texts, ridge, progress)
    fitted_s = time.perf_counter() - start
    quality = training_fit_quality(fitted)
    print(f"{len(fit_texts)} training texts, {n_val} validation texts per domain; fitted in {fitted_s:.0f} s; "
          f"training R² router {quality['r2_router']:.3f}, block means {quality['r2_block_means']:.3f}")
    val_rows = {d: bypass.prompt_attention_scores(model, utils.make_dataloader(t, tokenizer, max_length=MAX_LENGTH),
                                                  prefix_tokens=PROMPT_SHARE, decode_first=True, progress=False)
                for d, t in val_texts.items()}
    base = {d: score(model, tokenizer, t, [[]] * len(val_rows[d]), "decode") for d, t in val_texts.items()}
    table, comparisons, training = [], [], {}
    for k in tqdm(budgets, desc="budgets", disable=not progress):
        knobs = calibrate(fitted, k)
        training[str(k)] = {key: knobs[key] for key in ("threshold", "router_cut", "training_skipped_per_token")}
        for d in DOMAINS:
            runs = evaluate_cell(model, tokenizer, val_texts[d], val_rows[d], fitted, knobs)
            for name, r in runs.items():
                table.append({"budget": k, "domain": d, "method": name, "ppl": r["perplexity"],
                              "x_base": r["perplexity"] / base[d]["perplexity"],
                              "skipped_per_token": r["per_token_skipped"]})
            for c in compare(runs, k, d):
                comparisons.append(c)
                tqdm.write(f"k={k:>2} {d:>11} {c['comparison']:<34} {c['diff']:+.4f} [{c['low']:+.4f}, "
                           f"{c['high']:+.4f}] -> {c['verdict']}  (skipped/token {c['skipped_per_token_a']:.2f} vs "
                           f"{c['skipped_per_token_b']:.2f})")
    return {"model": model.name_or_path, "split": "validation",
            "settings": {"budgets": list(budgets), "calibration_domains": list(CALIB_DOMAINS), "domains": list(DOMAINS),
                         "fit_texts": len(fit_texts), "val_texts_per_domain": n_val, "max_length": MAX_LENGTH,
                         "prompt_share": PROMPT_SHARE, "ridge": ridge, "bootstrap": N_BOOTSTRAP, "seed": SEED,
                         "nb03_fit_texts_per_domain": NB03_FIT, "validation_candidates_left_out": dropped},
            "protected": fitted.protected, "router_blocks": fitted.router.blocks, "static_ranking": fitted.ranking,
            "cost_ranking": fitted.cost_ranking, "training_fit": quality, "training": training,
            "base_ppl": {d: b["perplexity"] for d, b in base.items()}, "table": table, "comparisons": comparisons,
            "summary": summarise(comparisons), "seconds": {"fit": fitted_s, "total": time.perf_counter() - start}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS),
                        help="attention sublayers skipped per decoded token on the training prompts")
    parser.add_argument("--fit-texts", type=int, default=N_FIT, help="training texts per calibration domain")
    parser.add_argument("--val-texts", type=int, default=N_VAL, help="validation texts per domain")
    parser.add_argument("--ridge", type=float, default=RIDGE, help="the router's penalty on its slopes")
    parser.add_argument("--save-as", default=None, help="results name (default: SWEEP_bypass_router_validation)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    budgets = [int(b) if float(b).is_integer() else b for b in args.budgets]
    results = run(budgets, n_fit=args.fit_texts, n_val=args.val_texts, ridge=args.ridge, progress=not args.quiet)
    for name, counts in results["summary"].items():
        print(f"{name}: {counts['beats']} beats, {counts['ties']} ties, {counts['loses']} losses "
              f"of {counts['cells']} (budget, domain) cells")
    utils.save_results(args.save_as or "SWEEP_bypass_router_validation", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
