"""Training progress: a tqdm bar (with ETA) on stderr when it is a terminal; elsewhere (SLURM
logs, Snakemake's log files) one plain line on stdout every ``every_s`` seconds, with the same
figures and an ETA."""
from __future__ import annotations

import sys
import time


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, every_s: float, stream=None):
        """``stream``: where both the bar and the lines go (default: the bar to stderr, the
        lines to stdout, as before tqdm)."""
        self.every_s = every_s
        self.bar_stream = stream or sys.stderr
        self.stream = stream or sys.stdout
        self.tty = self.bar_stream.isatty()
        self.bar = None
        self.epoch = self.total = self.start = 0
        self.t0 = self.last = 0.0

    def start_epoch(self, epoch: int, start: int, total: int) -> None:
        """An epoch of ``total`` steps, resumed at step ``start``."""
        self.close()
        self.epoch, self.total, self.start = epoch, total, start
        self.t0, self.last = time.time(), 0.0
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="it", file=self.bar_stream,
                            dynamic_ncols=True, leave=True)

    def update(self, it: int, loss: float, lr: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(it - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {images_per_s:.1f} img/s", refresh=False)
            return
        now = time.time()
        if now - self.last < self.every_s and it != self.total:
            return
        self.last = now
        done = it - self.start
        eta = (now - self.t0) / done * (self.total - it) if done > 0 else float("nan")
        eta_text = _hms(eta) if eta == eta else "?"
        print(f"epoch {self.epoch} iter {it}/{self.total} loss {loss:.4f} lr {lr:.2e} "
              f"{images_per_s:.1f} img/s eta {eta_text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_epoch(epoch_metrics: dict) -> str:
    """The end-of-epoch line: losses to 4 decimals, the LR in scientific notation (1e-05,
    not 0.0000), seconds to one decimal."""
    parts = []
    for k, v in epoch_metrics.items():
        if k == "lr":
            parts.append(f"lr={v:.2e}")
        elif k.endswith("_seconds"):
            parts.append(f"{k}={v:.1f}")
        elif isinstance(v, float):
            parts.append(f"{k}={v:.4f}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)
