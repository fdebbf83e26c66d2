"""The bar charts every chapter needs. Figures have titles, labelled axes, and use hatching so
that they stay readable in black and white."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt

HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")


def _new_axes(ax, size=(9, 4)):
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def plot_layer_scores(scores: Sequence[float], *, removed: Sequence[int] | None = None,
                      title: str = "Importance of each decoder block", ylabel: str = "importance",
                      xlabel: str = "block index", ax=None):
    """Bar chart of one score per layer; ``removed`` layers are drawn hatched and dark.

    Returns the matplotlib ``Axes``.
    """
    scores = [float(s) for s in scores]
    if not scores:
        raise ValueError("scores is empty: pass one value per layer.")
    removed_set = set(removed or [])
    bad = [i for i in removed_set if not 0 <= i < len(scores)]
    if bad:
        raise ValueError(f"removed holds indices outside 0..{len(scores) - 1}: {sorted(bad)}.")
    ax = _new_axes(ax)
    for i, value in enumerate(scores):
        gone = i in removed_set
        ax.bar(i, value, color="0.25" if gone else "0.7", hatch="//" if gone else "", edgecolor="black",
               linewidth=0.5, label=None)
    if removed_set:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(facecolor="0.7", edgecolor="black", label="kept"),
                           Patch(facecolor="0.25", edgecolor="black", hatch="//", label="removed")])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(scores)))
    ax.tick_params(axis="x", labelsize=8)
    return ax


def plot_comparison(values: Mapping[str, float], *, title: str, ylabel: str, baseline: float | None = None,
                    baseline_label: str = "base model", log: bool = False, fmt: str = "{:.2f}", ax=None):
    """Bar chart comparing one number across variants, e.g. ``{"base": 17.3, "pruned": 23.1}``.

    Each bar is labelled with its value; ``baseline`` adds a dashed reference line.
    Returns the matplotlib ``Axes``.
    """
    if not values:
        raise ValueError("values is empty: pass a mapping such as {'base': 1.0, 'pruned': 1.3}.")
    labels = [str(k) for k in values]
    numbers = [float(v) for v in values.values()]
    ax = _new_axes(ax, size=(max(5, 1.2 * len(labels) + 2), 4))
    bars = ax.bar(labels, numbers, color="0.7", edgecolor="black", linewidth=0.6)
    for bar, hatch in zip(bars, HATCHES * (len(bars) // len(HATCHES) + 1)):
        bar.set_hatch(hatch)
    ax.bar_label(bars, labels=[fmt.format(v) for v in numbers], padding=2, fontsize=8)
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="black", linewidth=1, label=baseline_label)
        ax.legend(loc="upper right")
    if log:
        ax.set_yscale("log")
    # headroom above the tallest bar for the value labels and the legend
    top = max(numbers + ([baseline] if baseline is not None else []))
    if top > 0:
        ax.set_ylim(top=top * (3.0 if log else 1.25))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=20 if len(labels) > 4 else 0)
    return ax


def plot_stacked(parts: Mapping[str, Mapping[str, float]], *, title: str, ylabel: str,
                 normalise: bool = False, ax=None):
    """Stacked bars: one bar per key of ``parts``, one segment per inner key.

    ``normalise=True`` turns each bar into shares (0-100 %). Returns the matplotlib ``Axes``.
    """
    if not parts:
        raise ValueError("parts is empty.")
    groups = list(parts)
    segments: list[str] = []
    for inner in parts.values():
        segments.extend(k for k in inner if k not in segments)
    ax = _new_axes(ax, size=(max(6, 1.4 * len(groups) + 2), 4.5))
    bottoms = [0.0] * len(groups)
    totals = [sum(parts[g].values()) or 1.0 for g in groups]
    for seg, hatch in zip(segments, HATCHES * (len(segments) // len(HATCHES) + 1)):
        heights = [parts[g].get(seg, 0.0) / (totals[i] / 100 if normalise else 1) for i, g in enumerate(groups)]
        ax.bar(groups, heights, bottom=bottoms, label=seg, hatch=hatch, edgecolor="black", linewidth=0.5)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    return ax


# --- CH10: heatmaps, the logit lens, an explorer that degrades to a static figure -----------------

def plot_heatmap(values, *, title: str, xlabel: str, ylabel: str, colorbar: str = "", log: bool = False,
                 xticklabels: Sequence[str] | None = None, yticklabels: Sequence[str] | None = None,
                 cmap: str = "viridis", ax=None):
    """A 2-D array as an image, rows top to bottom, with a labelled colour bar.

    ``log=True`` uses a logarithmic colour scale (magnitudes spanning orders, e.g. activations; values
    must be positive). The default colour map (viridis) grows steadily lighter, so the figure stays
    readable in black and white. Returns the matplotlib ``Axes``.
    """
    import numpy as np
    from matplotlib.colors import LogNorm

    array = np.asarray(values.detach().cpu().float() if hasattr(values, "detach") else values, dtype=float)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"values must be a non-empty 2-D array (rows x columns), got shape {array.shape}.")
    norm = None
    if log:
        positive = array[array > 0]
        if positive.size == 0:
            raise ValueError("log=True needs positive values; plot magnitudes (abs) or use log=False.")
        norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-6), vmax=positive.max())
        array = np.where(array > 0, array, np.nan)
    ax = _new_axes(ax, size=(10, max(3.0, min(8.0, 0.3 * array.shape[0] + 1.5))))
    image = ax.imshow(array, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    ax.figure.colorbar(image, ax=ax, label=colorbar)
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), list(xticklabels), rotation=70, fontsize=8)
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), list(yticklabels), fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def plot_logit_lens(words: Sequence[Sequence[str]], probs, *, input_tokens: Sequence[str],
                    layers: Sequence[int] | None = None, title: str = "Logit lens: each layer's top next token",
                    ax=None):
    """The logit lens as a table: one row per stream index, one column per input position; each cell
    shows the top next token, shaded by its probability. ``words``/``probs`` come from
    :func:`utils.lens_top_tokens`; ``layers`` picks rows (default: all). Returns the ``Axes``."""
    import numpy as np

    rows = list(range(len(words))) if layers is None else list(layers)
    if not rows or any(not 0 <= r < len(words) for r in rows):
        raise ValueError(f"layers must be indices in 0..{len(words) - 1}.")
    grid = np.asarray(probs.detach().cpu().float() if hasattr(probs, "detach") else probs, dtype=float)[rows]
    if grid.shape[1] != len(input_tokens):
        raise ValueError(f"{grid.shape[1]} positions in probs but {len(input_tokens)} input tokens.")
    ax = _new_axes(ax, size=(max(6.0, 1.1 * len(input_tokens) + 2), 0.32 * len(rows) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    for r, row in enumerate(rows):
        for c in range(grid.shape[1]):
            text = repr(words[row][c])[1:-1][:10]
            text = text if text.strip() else "\u2423" * max(1, len(text))  # show a blank token as visible spaces
            ax.text(c, r, text, ha="center", va="center", fontsize=7,
                    color="white" if grid[r, c] > 0.5 else "black")
    ax.figure.colorbar(image, ax=ax, label="probability of the top token")
    ax.set_xticks(range(len(input_tokens)), [repr(t)[1:-1][:12] for t in input_tokens], rotation=60, fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    ax.set_xlabel("input token (the prediction is for the token after it)")
    ax.set_ylabel("stream index (0 = embeddings)")
    ax.set_title(title)
    return ax


def widgets_available() -> bool:
    """Whether an ipywidgets control can be drawn: ipywidgets installed, running in a Jupyter kernel, and
    not a headless run (``RLLM_HEADLESS`` set, as ``scripts/run_notebooks.py`` does, or a non-interactive
    matplotlib backend such as Agg, as in the tests)."""
    import importlib.util
    import os

    if os.environ.get("RLLM_HEADLESS") or importlib.util.find_spec("ipywidgets") is None:
        return False
    import matplotlib

    if matplotlib.get_backend().lower() in ("agg", "pdf", "ps", "svg", "cairo", "template"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def explore(draw, **controls) -> bool:
    """Run ``draw(**values)`` behind ipywidgets controls when a notebook front end can show them, and
    once, as a static figure, otherwise (headless runs, no ipywidgets).

    Each keyword is a control: a string gives a text box (``prompt="The cat"``), a tuple
    ``(value, low, high)`` of integers an integer slider (``layer=(12, 0, 30)``). Returns True when the
    interactive version was shown.
    """
    values = {}
    for name, spec in controls.items():
        if isinstance(spec, str):
            values[name] = spec
        elif isinstance(spec, tuple) and len(spec) == 3 and all(isinstance(v, int) for v in spec) \
                and spec[1] <= spec[0] <= spec[2]:
            values[name] = spec[0]
        else:
            raise ValueError(f"control {name}={spec!r}: use a string (text box) or (value, low, high) integers "
                             "with low <= value <= high (slider).")
    if widgets_available():
        import ipywidgets as widgets

        made = {name: widgets.Text(value=spec, description=name, continuous_update=False,
                                   layout=widgets.Layout(width="80%"))
                if isinstance(spec, str) else widgets.IntSlider(value=spec[0], min=spec[1], max=spec[2],
                                                                description=name, continuous_update=False)
                for name, spec in controls.items()}
        widgets.interact(draw, **made)
        return True
    print("(static figure: no interactive front end here; in Jupyter the same cell shows controls for "
          f"{', '.join(controls)})")
    draw(**values)
    return False
