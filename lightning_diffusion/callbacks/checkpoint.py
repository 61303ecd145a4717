"""LastCheckpoint: Lightning's ModelCheckpoint with a ``last.ckpt`` that is never behind."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two saves.

    Lightning's ModelCheckpoint with ``every_n_train_steps`` leaves ``last.ckpt`` at the last
    multiple of N when training stops otherwise (``max_time``, ``max_steps`` not a multiple of N,
    early stopping), so the final steps are lost. Here ``on_train_end`` saves the final state too.
    Every argument is ModelCheckpoint's; ``save_last`` defaults to True.
    """

    def __init__(self, *args, save_last: bool = True, **kwargs):
        super().__init__(*args, save_last=save_last, **kwargs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
