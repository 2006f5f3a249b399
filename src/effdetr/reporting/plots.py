"""Figures for reports/ (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict], title: str, out: Path) -> None:
    """One line per train_* loss across epochs, and the val AP where the training validated."""
    keys = sorted({k for h in history for k in h if k.startswith("train_")})
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    epochs = [h["epoch"] for h in history]
    for k in keys:
        ax.plot(epochs, [h.get(k) for h in history], marker="o", ms=3, label=k.removeprefix("train_"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (unweighted components; 'loss' = weighted total)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    val = [(h["epoch"], 100 * h["val_AP"]) for h in history if h.get("val_AP") is not None]
    if val:  # the in-training validation (train.val_every), on its own axis
        ax2 = ax.twinx()
        ax2.plot([e for e, _ in val], [v for _, v in val], marker="s", ms=4, color="black", label="val AP")
        ax2.set_ylabel("val AP (%)")
        ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_prototypes_per_layer(stats: dict[str, dict], out: Path) -> None:
    """ACT's finding, per experiment: prototypes per encoder layer (mean over heads and
    images), as a fraction of the encoder's tokens."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for name, s in stats.items():
        layers = sorted(int(k.removeprefix("prototypes_layer")) for k in s if k.startswith("prototypes_layer"))
        tokens = s.get("encoder_tokens") or 1.0
        ax.plot([i + 1 for i in layers], [s[f"prototypes_layer{i}"] / tokens for i in layers],
                marker="o", ms=3, label=name)
    ax.set_xlabel("encoder layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("prototypes / tokens")
    ax.set_ylim(0, 1.05)
    ax.set_title("ACT prototypes per encoder layer\n(mean over heads and val images)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_tradeoff(series: dict[str, dict[str, tuple[float, float]]], xlabel: str, ylabel: str, title: str,
                  out: Path, baselines: tuple[str, ...] = ()) -> None:
    """One panel per series (paper, reproduced): a labelled line through the swept points;
    ``baselines`` (labels) are drawn as separate stars."""
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8), dpi=100, squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        if points:
            swept = sorted(((k, p) for k, p in points.items() if k not in baselines), key=lambda kv: kv[1][0])
            if swept:
                ax.plot([p[0] for _, p in swept], [p[1] for _, p in swept], marker="o")
            for label, (x, y) in points.items():
                if label in baselines:
                    ax.plot([x], [y], marker="*", ms=11, ls="none", color="tab:red")
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_placeholder(title: str, text: str, out: Path) -> None:
    """A declared figure whose data is not there yet (so the table stage's outputs always exist)."""
    fig, ax = plt.subplots(figsize=(6, 2.4), dpi=100)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.savefig(out)
    plt.close(fig)
