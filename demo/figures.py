"""The demo report's pictures: accuracy-against-steps curves per arm, the side-by-side sample
grid (one row per arm), and the class-cond DiT's own samples titled by the class asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def figures(out: Path, t2i: dict[str, Any]) -> dict[str, Path]:
    """The curves (accuracy against steps per arm) and the side-by-side sample grid, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from demo.arms import ATTRS

    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), sharey=True)
    for ax, attr in zip(axes, ATTRS):
        for arm, run in t2i["arms"].items():
            pts = run["curve"]
            if arm == "d" and t2i["arms"]["c"]["curve"]:
                pts = [t2i["arms"]["c"]["curve"][-1], *pts]
            ax.plot([p["step"] for p in pts], [p[attr] for p in pts], marker="o", ms=3, label=f"({arm}) {run['label']}")
        chance = {"color": 1 / 6, "shape": 1 / 4, "position": 1 / 5, "all": 1 / 120}[attr]
        ax.axhline(chance, color="grey", ls="--", lw=0.8)  # chance
        ax.set_title({"all": "all three right"}.get(attr, attr))
        ax.set_xlabel("training step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("held-out accuracy (judged)")
    axes[-1].legend(fontsize=7, loc="upper left")  # all-three stays low: the top is free
    fig.tight_layout()
    curves = fig_dir / "curves.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)
    return {"curves": curves, **sample_grid(fig_dir, t2i), **prior_grid(fig_dir, t2i)}


def sample_grid(fig_dir: Path, t2i: dict[str, Any], cols: int = 10, scale: int = 3) -> dict[str, Path]:
    """One row of final samples per arm, the same held-out prompts in each column."""
    from PIL import Image

    arms = [a for a in ("a", "b", "c", "d") if t2i["arms"].get(a, {}).get("images")]
    if not arms:
        return {}
    side = t2i["arms"][arms[0]]["images"][0].size[0] * scale
    n = min(cols, len(t2i["arms"][arms[0]]["images"]))
    grid = Image.new("RGB", (n * (side + 2), len(arms) * (side + 2)), "white")
    for r, arm in enumerate(arms):
        for c, im in enumerate(t2i["arms"][arm]["images"][:n]):
            grid.paste(im.resize((side, side), Image.NEAREST), (c * (side + 2), r * (side + 2)))
    path = fig_dir / "samples.png"
    grid.save(path)
    return {"samples": path}


def prior_grid(fig_dir: Path, t2i: dict[str, Any], cols: int = 10) -> dict[str, Path]:
    """The class-cond DiT's samples, each titled with the label it was asked for."""
    import matplotlib.pyplot as plt

    images = t2i.get("prior_images") or []
    if not images:
        return {}
    n = min(cols, len(images))
    fig, axes = plt.subplots(1, n, figsize=(1.3 * n, 1.6), squeeze=False)
    for ax, im, label in zip(axes[0], images, t2i["prior"]["labels"]):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = fig_dir / "prior.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"prior": path}
