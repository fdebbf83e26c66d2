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
