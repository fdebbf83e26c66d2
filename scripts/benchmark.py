"""Benchmark: the course's utilities side by side with optipfair, in ONE run on the same data.

    RLLM_PROFILE=cpu python scripts/benchmark.py        (or: make bench)

Measures, on the active profile's model (the real SmolLM2-135M in `cpu`):
  * block-importance time, and its ratio to a plain forward pass over the same batches (timed in turns with
    utils.time_alternately, the same loop);
  * pruning time (depth: choose + remove 20 % of the blocks; width: 20 % of the MLP neurons);
  * held-out perplexity at the same size (calibration on wikitext train, evaluation on wikitext test);
  * speed of each pruned model against the base with utils.compare_speed (forward pass and greedy generation,
    timed in turns): median ratios, the verdict on noise, and the ideal ratio predicted from the matmul FLOPs;
  * peak memory of each step (resident set size on CPU, allocated memory on CUDA).
Writes runs/<profile>/BENCH_utils_vs_optipfair.json, which scripts/collect_results.py puts in RESULTS.md.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optipfair  # noqa: E402
import torch  # noqa: E402

import utils  # noqa: E402

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CALIBRATION, EVALUATION = 32, 48  # texts
DEPTH_FRACTION, WIDTH_RATIO = 0.2, 0.2
PROMPTS = ["The history of the city begins", "In mathematics, a prime number is", "The recipe calls for",
           "Scientists recently discovered that"]
GEN_TOKENS = utils.budget(full=32, cpu=16, tiny=4)
SPEED_RUNS = utils.budget(full=5, cpu=3, tiny=2)  # timed rounds after one warm-up round


def _rss_peak_reset() -> bool:
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def timed(fn, *args, **kwargs):
    """Run fn once; return (result, seconds, peak memory in MiB or None)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resettable = not cuda and _rss_peak_reset()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _rss_peak_mib() if resettable else None
    return result, seconds, peak


def plain_forward(model, loader):
    with torch.no_grad():
        for batch in loader:
            input_ids, mask = utils.batch_tensors(batch, model.device)
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)


def main() -> None:
    base, tokenizer = utils.load_model(MODEL_ID)
    calib = utils.make_dataloader(utils.load_texts("wikitext", split="train", n=CALIBRATION), tokenizer,
                                  batch_size=8, max_length=128)
    held_out = utils.make_dataloader(utils.load_texts("wikitext", split="test", n=EVALUATION), tokenizer,
                                     batch_size=8, max_length=128)
    n_blocks = base.config.num_hidden_layers
    n_remove = max(1, round(DEPTH_FRACTION * n_blocks))
    base_ppl = utils.perplexity(base, held_out, progress=False)
    rows, speeds = [], {}

    def add(task, library, seconds, peak, model=None, extra=None):
        row = {"task": task, "library": library, "seconds": seconds, "peak_MiB": peak}
        row.update(extra or {})
        if model is not None:
            ppl = utils.perplexity(model, held_out, progress=False)
            speed = utils.compare_speed({"base": base, "pruned": model}, held_out, tokenizer=tokenizer, prompts=PROMPTS,
                                        max_new_tokens=GEN_TOKENS, runs=SPEED_RUNS)  # timed in turns
            timed_model = speed["models"]["pruned"]
            speedup = timed_model["speedup"]
            row.update({"parameters": utils.count_parameters(model), "ppl_heldout": ppl,
                        "ppl_vs_base": ppl / base_ppl,
                        "forward_speedup": speedup["forward"]["ratio"],
                        "generation_speedup": speedup["generation"]["ratio"],
                        "ideal_speedup": timed_model["ideal_speedup"],
                        "forward_verdict": speedup["forward"]["verdict"],
                        "generation_verdict": speedup["generation"]["verdict"]})
            speeds[f"{task} | {library}"] = speed
            print(utils.speed_conclusion(speed).replace("pruned vs base", f"{task}, {library}: pruned vs base"))
        rows.append(row)

    # peak memory of one run each (this also gives the scores); time: medians of runs taken in turns
    _, _, forward_mem = timed(plain_forward, base, calib)
    ours_scores, _, ours_mem = timed(utils.block_importance, base, calib, progress=False)
    theirs_scores, _, theirs_mem = timed(optipfair.analyze_layer_importance, base, calib, show_progress=False)
    cost = utils.time_alternately({
        "forward": lambda: plain_forward(base, calib),
        "utils": lambda: utils.block_importance(base, calib, progress=False),
        "optipfair": lambda: optipfair.analyze_layer_importance(base, calib, show_progress=False),
    }, runs=SPEED_RUNS)
    forward_s = cost["forward"]["median_s"]
    add("plain forward pass (reference)", "-", forward_s, forward_mem)
    for library, mem in (("utils", ours_mem), ("optipfair", theirs_mem)):
        add("block importance", library, cost[library]["median_s"], mem,
            extra={"x_forward": cost[library]["median_s"] / forward_s})

    def ours_depth():
        model = copy.deepcopy(base)
        return utils.remove_blocks(model, utils.choose_blocks_to_remove(model, calib, n_remove))

    def optipfair_depth():  # optipfair's one-shot choice: the blocks with the lowest importance
        scores = optipfair.analyze_layer_importance(base, calib, show_progress=False)
        lowest = sorted(scores, key=scores.get)[:n_remove]
        return optipfair.prune_model(copy.deepcopy(base), pruning_type="DEPTH", layer_indices=sorted(lowest),
                                     show_progress=False)

    model, s, m = timed(ours_depth)
    add(f"depth: remove {n_remove} of {n_blocks} blocks", "utils (default)", s, m, model)
    model, s, m = timed(optipfair_depth)
    add(f"depth: remove {n_remove} of {n_blocks} blocks", "optipfair (one-shot cosine)", s, m, model)

    def ours_width():
        return utils.prune_glu(copy.deepcopy(base), WIDTH_RATIO, dataloader=calib)

    def optipfair_width():
        return optipfair.prune_model(copy.deepcopy(base), pruning_type="MLP_GLU", neuron_selection_method="MAW",
                                     pruning_percentage=100 * WIDTH_RATIO, dataloader=calib, show_progress=False)

    model, s, m = timed(ours_width)
    add(f"width: {WIDTH_RATIO:.0%} of MLP neurons", "utils (default: hybrid + least-squares repair)", s, m, model)
    model, s, m = timed(optipfair_width)
    add(f"width: {WIDTH_RATIO:.0%} of MLP neurons", "optipfair (hybrid MAW)", s, m, model)
    del model

    agreement = None
    if isinstance(theirs_scores, dict):
        theirs = [theirs_scores[i] for i in sorted(theirs_scores)]
        agreement = max(abs(a - b) for a, b in zip(ours_scores, theirs))
    results = {"model": base.name_or_path, "table": rows, "speed": speeds,
               "quality_bar": {"base_ppl_heldout": base_ppl,
                               "max_abs_difference_block_importance_utils_vs_optipfair": agreement}}
    utils.save_results("BENCH_utils_vs_optipfair", results)
    for row in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})


if __name__ == "__main__":
    main()
