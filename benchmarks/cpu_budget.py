"""Training budgets of the benchmarks: ``trainer.max_time`` of a number of minutes, and a budget in CPU time
rather than wall time, for benchmarks "at equal CPU time" on a machine
that other work shares (the README says when a benchmark was not alone).

``trainer.max_time`` counts wall-clock time: another process on the same cores takes from every run's
budget at random. :class:`CPUBudget` stops a fit when its own process has used ``minutes`` of CPU
time (``time.process_time``: every thread of the process, so with ``OMP_NUM_THREADS=1`` one core's
worth of work). Memory bandwidth and caches are still shared, so it narrows, not removes, the effect
of a busy machine. Lightning has no such limit (its ``Timer`` reads the wall clock), hence this file.
Given to ``lightning-diffusion fit`` as ``--trainer.callbacks+=cpu_budget.CPUBudget`` with this folder
on ``PYTHONPATH`` (see ``bench_ebm_diffusion_digits.start``).
"""

from __future__ import annotations

import sys
import time

import lightning as L


def max_time(minutes: float) -> str:
    """Lightning's ``trainer.max_time`` (DD:HH:MM:SS) of ``minutes``, at least one second."""
    seconds = max(1, round(minutes * 60))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days:02d}:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def fit_limit(minutes: float, budget: str = "wall") -> list[str]:
    """The ``lightning-diffusion fit`` options that stop a run after ``minutes``: of wall time
    (``trainer.max_time``), or with ``budget="cpu"`` of the process's CPU time (:class:`CPUBudget`, this
    folder on the run's ``PYTHONPATH``; the wall clock only as a backstop at 20x)."""
    if budget == "cpu":
        return [f"--trainer.max_time={max_time(minutes * 20)}", "--trainer.callbacks+=cpu_budget.CPUBudget",
                f"--trainer.callbacks.minutes={minutes}"]
    if budget != "wall":
        raise ValueError(f"budget: 'wall' or 'cpu', got {budget!r}")
    return [f"--trainer.max_time={max_time(minutes)}"]


def cpu_seconds(log: str) -> float | None:
    """The training CPU seconds a run's log reports (:meth:`CPUBudget.on_train_end`'s line), or None."""
    lines = [line for line in log.splitlines() if line.startswith("CPUBudget:")]
    return float(lines[-1].split()[-3]) if lines else None


class CPUBudget(L.Callback):
    """Stop the fit after ``minutes`` of this process's CPU time, counted from the start of training
    (less what a subclass excludes: ``bench_latent_vs_pixel.CpuBudget`` leaves its evaluations out)."""

    def __init__(self, minutes: float) -> None:
        """
        Args:
            minutes: the CPU time the fit may use (minutes, all threads of this process together).
        """
        if not minutes > 0:
            raise ValueError(f"CPUBudget: minutes must be > 0, got {minutes}")
        self.seconds = 60.0 * float(minutes)
        self.start, self.excluded = 0.0, 0.0

    def spent(self) -> float:
        """Training CPU seconds of this fit so far (what is excluded left out)."""
        return time.process_time() - self.start - self.excluded

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.excluded = time.process_time(), 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.spent() >= self.seconds:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"CPUBudget: {trainer.global_step} steps in {self.spent():.1f} CPU s", file=sys.stderr, flush=True)
