"""The training's loss record: every step's six numbers, kept on the device (no host sync per
step), averaged over ranks when read, and written as ``losses.csv`` at a resolution that depends
only on ``train.iterations`` -- never on ``train_run.log_every`` -- so the table is a pure function of
the trajectory: an interrupted-and-resumed run writes the same bytes as an uninterrupted one,
and changing how often the console/MLflow log does not make the trained outputs stale.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ctsynth.core.io import write_csv
from ctsynth.train.distributed import Dist

log = logging.getLogger("ctsynth.train.train")

LOSS_NAMES = ("g_adv", "g_l1", "g_fm", "g_spec", "d_real", "d_fake", "d_acc_real", "d_acc_fake")
TABLE_ROWS = 200          # losses.csv holds at most this many rows (bins of equal width)


def table_every(iterations: int) -> int:
    """Width in steps of one losses.csv row: ceil(iterations / TABLE_ROWS)."""
    return max(1, math.ceil(iterations / TABLE_ROWS))


class LossHistory:
    """Per-step losses ``(iterations, len(LOSS_NAMES))`` on the device. ``record`` is a device write; ``sync``
    averages the steps since the last sync over the ranks (call it on every rank at once)."""

    def __init__(self, iterations: int, d: Dist, done: torch.Tensor | None = None):
        self.d = d
        self.buf = torch.zeros(iterations, len(LOSS_NAMES), device=d.device)
        self.synced = 0                               # steps [0, synced) hold rank means
        if done is not None and len(done):
            self.buf[:len(done)] = done.to(d.device, self.buf.dtype)
            self.synced = len(done)

    def record(self, step: int, losses: torch.Tensor) -> None:
        """Store the losses of ``step`` (1-based, as counted after the step)."""
        self.buf[step - 1] = losses

    def sync(self, step: int) -> None:
        if self.d.ddp and step > self.synced:
            part = self.buf[self.synced:step].contiguous()
            self.d.reduce(part)
            self.buf[self.synced:step] = part / self.d.world
        self.synced = max(self.synced, step)

    def mean(self, start: int, stop: int) -> dict[str, float]:
        """Mean of steps (start, stop] (1-based), synced."""
        return dict(zip(LOSS_NAMES, self.buf[start:stop].mean(0).tolist()))

    def log_window(self, last: int, step: int, t_last: float, batch_size: int, iterations: int,
                   lrs: tuple[float, float], *, tracker) -> float:
        """Log the means of steps (last, step] to the console and ``tracker``; returns the time."""
        now = time.perf_counter()
        means, n = self.mean(last, step), max(1, step - last)
        rate = n * batch_size / max(now - t_last, 1e-9)
        m = means
        fm = "".join(f" {k} {m[k]:.4f}" for k in ("g_fm", "g_spec") if m[k])   # feature matching, spectral: when on
        log.info("step %d/%d | g_adv %.4f g_l1 %.4f%s | d_real %.4f d_fake %.4f | acc real %.2f fake %.2f | "
                 "%.3f s/step %.1f img/s", step, iterations, m["g_adv"], m["g_l1"], fm, m["d_real"], m["d_fake"],
                 m["d_acc_real"], m["d_acc_fake"], (now - t_last) / n, rate)
        tracker.log_metrics({**means, "lr_g": lrs[0], "s_per_step": (now - t_last) / n, "img_per_s": rate}, step)
        return now

    def done(self, step: int) -> torch.Tensor:
        """The first ``step`` rows on the CPU (for checkpoints)."""
        return self.buf[:step].detach().to("cpu", torch.float32).clone()

    def table_rows(self, step: int, iterations: int, lr_at: Callable[[int], tuple[float, float]]) -> list:
        """Rows ``[end_step, *means, lr_g, lr_d]`` of the complete bins up to ``step`` (the last,
        shorter bin once ``step == iterations``)."""
        width, rows = table_every(iterations), []
        host = self.buf[:step].to("cpu", torch.float64)            # one device read
        for start in range(0, step, width):
            end = min(start + width, iterations)
            if end > step:
                break
            rows.append([end, *host[start:end].mean(0).tolist(), *lr_at(end - 1)])
        return rows

    def write(self, path: Path, step: int, iterations: int, lr_at: Callable[[int], tuple[float, float]]) -> None:
        import pandas as pd

        frame = pd.DataFrame(self.table_rows(step, iterations, lr_at),
                             columns=["step", *LOSS_NAMES, "lr_g", "lr_d"])
        frame["step"] = frame["step"].astype(int)
        write_csv(path, frame)
