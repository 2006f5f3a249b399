"""Figures for reports/ (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: list[dict], title: str, out: Path) -> None:
    """One line per train_* loss across epochs."""
    keys = sorted({k for h in history for k in h if k.startswith("train_")})
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    epochs = [h["epoch"] for h in history]
    for k in keys:
        ax.plot(epochs, [h.get(k) for h in history], marker="o", ms=3, label=k.removeprefix("train_"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (unweighted components; 'loss' = weighted total)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
