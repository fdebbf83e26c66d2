"""Draw images/pipeline.png: the rearchitecting pipeline the course follows.

Run from the repository root:  python scripts/draw_pipeline.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "images" / "pipeline.png"

STAGES = [
    ("Pre-trained\nmodel", "from the Hub\n(or SmolLM2 offline)", "0.95"),
    ("Understand", "anatomy, activations\nCH03 · CH10", "0.85"),
    ("Prune", "blocks CH04 · neurons CH05\nattention CH08 · fair CH11", "0.75"),
    ("Recover", "knowledge distillation\nCH02 · CH06", "0.85"),
    ("Specialise", "LoRA · DoRA · QLoRA\nCH07", "0.75"),
    ("Small, fast,\nspecialised", "measured: size, perplexity,\nspeed, benchmarks, energy", "0.95"),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 3.2))
    width, gap = 1.8, 0.45
    for i, (name, detail, shade) in enumerate(STAGES):
        x = i * (width + gap)
        ax.add_patch(FancyBboxPatch((x, 0.9), width, 1.2, boxstyle="round,pad=0.05,rounding_size=0.12",
                                    facecolor=shade, edgecolor="black", linewidth=1.2))
        ax.text(x + width / 2, 1.5, name, ha="center", va="center", fontsize=11, fontweight="bold")
        ax.text(x + width / 2, 0.45, detail, ha="center", va="center", fontsize=8.5)
        if i < len(STAGES) - 1:
            ax.add_patch(FancyArrowPatch((x + width + 0.05, 1.5), (x + width + gap - 0.05, 1.5),
                                         arrowstyle="-|>", mutation_scale=16, linewidth=1.4, color="black"))
    # the loop back: measure after every step, prune again if there is room
    total = len(STAGES) * (width + gap) - gap
    ax.add_patch(FancyArrowPatch((3 * (width + gap) + width / 2, 2.15), (2 * (width + gap) + width / 2, 2.15),
                                 connectionstyle="arc3,rad=0.5", arrowstyle="-|>", mutation_scale=14,
                                 linestyle="--", color="black"))
    ax.text(2.5 * (width + gap) + width / 2, 2.75, "measure, then prune again if quality allows",
            ha="center", fontsize=8.5, style="italic")
    ax.set_xlim(-0.2, total + 0.2)
    ax.set_ylim(-0.1, 3.0)
    ax.axis("off")
    ax.set_title("The rearchitecting pipeline: from a big general model to a small specialised one", fontsize=12)
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT, dpi=130, bbox_inches="tight")
    print(f"Wrote {OUT}")


if __name__ == "__main__":
    main()
