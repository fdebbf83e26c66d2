"""Solutions of CH12_NB02's exercises."""


def choose_run(distances, n):
    """The n consecutive blocks whose run has the smallest distance, never the first or last block."""
    # distances[s] is the run of blocks s .. s + n - 1. The first run holds block 0, the last run the last block.
    starts = range(1, len(distances) - 1)
    best = min(starts, key=lambda s: distances[s])
    return list(range(best, best + n))


def parameter_reduction(model, blocks):
    """Share of the model's parameters held by the decoder blocks `blocks`."""
    layers = model.model.layers
    removed = sum(p.numel() for i in blocks for p in layers[i].parameters())
    return removed / sum(p.numel() for p in model.parameters())


def stage_checks(stages):
    """{"cut": ..., "recovered": ..., "specialist": ...}: whether each stage met its contract."""
    return {
        "cut": stages["cut"]["parameters"] < stages["base"]["parameters"],
        "recovered": stages["recovered"]["ppl_general"] < stages["cut"]["ppl_general"],
        "specialist": stages["specialist"]["ppl_task"] < stages["recovered"]["ppl_task"],
    }
