"""A callback that SIGKILLs its own process at a chosen step: the "killed" run of tests/test_resume.py.

Killing from inside is deterministic: the process dies at the start of the batch after step
``step``, i.e. right after the checkpoint that LastCheckpoint wrote at the end of that step (a
watcher polling the checkpoint from outside raced the run and sometimes killed it past the steps the
test resumes to).
"""

from __future__ import annotations

import os
import signal

import lightning as L


class SigkillAt(L.Callback):
    """SIGKILL this process at the start of the first batch with ``global_step >= step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(L.Callback):
    """Send ``signal`` (a name: ``SIGTERM``, ``SIGINT``) to this process once, at the start of the first
    batch with ``global_step >= step``, on rank ``rank`` only (every rank when None): a signal from
    outside arriving mid-step, at a step the test knows."""

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int | None = None):
        self.step, self.signal, self.rank, self.sent = step, signal, rank, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self.sent and trainer.global_step >= self.step and self.rank in (None, trainer.global_rank):
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))


class EvalSignalAt(L.Callback):
    """Send ``signal`` to this process once, at the start of evaluation batch ``batch`` (validation, test
    or predict; the sanity check's batches do not count): a signal arriving in the middle of a
    ``validate`` / ``test`` / ``predict`` command."""

    def __init__(self, batch: int, signal: str = "SIGTERM"):
        self.batch, self.signal, self.sent = batch, signal, False

    def _start(self, trainer: L.Trainer, batch_idx: int) -> None:
        if not self.sent and not trainer.sanity_checking and batch_idx >= self.batch:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start(trainer, batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start(trainer, batch_idx)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start(trainer, batch_idx)
