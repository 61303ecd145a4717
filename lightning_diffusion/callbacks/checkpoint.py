"""LastCheckpoint: Lightning's ModelCheckpoint with a ``last.ckpt`` that is never behind and never torn."""

from __future__ import annotations

import glob
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two saves, and
    whose ``last.ckpt`` keeps its name in a resumed fit (no ``last-v1.ckpt``).

    Lightning's ModelCheckpoint with ``every_n_train_steps`` leaves ``last.ckpt`` at the last
    multiple of N when training stops otherwise (``max_time``, ``max_steps`` not a multiple of N,
    early stopping), so the final steps are lost. Here ``on_train_end`` saves the final state too.
    Every argument is ModelCheckpoint's; ``save_last`` defaults to True.

    Every file is written atomically: into ``<name>.partial-<host>-<pid>`` first (a name of this
    process's own: two writers never share one), then renamed over the old one (a sharded
    checkpoint directory too). Lightning's own save truncates the file and then writes
    it, so a kill during the write (preemption, OOM killer, SIGKILL) left a corrupt ``last.ckpt``;
    here the old one stays intact until the new one is complete.
    """

    def __init__(self, *args: Any, save_last: bool = True, **kwargs: Any):
        """
        Args:
            *args: ModelCheckpoint's positional arguments.
            save_last: write ``last.ckpt`` (ModelCheckpoint's default is False).
            **kwargs: ModelCheckpoint's keyword arguments (``dirpath``, ``every_n_train_steps``, ...).
        """
        super().__init__(*args, save_last=save_last, **kwargs)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # this process's own temporary name (rank zero's, the same on every rank: a sharded
        # checkpoint is one folder): two writers never share one
        partial = trainer.strategy.broadcast(f"{filepath}.partial-{socket.gethostname()}-{os.getpid()}")
        if trainer.is_global_zero:
            _remove_stale_partials(filepath)  # left by a killed run
        trainer.strategy.barrier("LastCheckpoint.partial")
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            _replace(partial, filepath)
        trainer.strategy.barrier("LastCheckpoint.replace")
        self._last_checkpoint_saved = filepath

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # A resumed fit continues the run whose last.ckpt is in dirpath: replace it (atomically, see
        # _save_checkpoint), never write last-v1.ckpt beside it. Lightning's version counter keeps
        # last.ckpt only when the restored state names it (same dirpath string): a copied or moved
        # run directory got last-v1.ckpt, last-v2.ckpt, ..., and the next resume from last.ckpt
        # silently went back to the stale one. A fresh fit (no ckpt_path) keeps Lightning's counter:
        # a last.ckpt there is another run's (the CLI refuses such a fit before it starts). Named
        # and top-k checkpoints keep the counter too: they never replace a different checkpoint.
        if trainer.ckpt_path is None:
            super()._save_last_checkpoint(trainer, monitor_candidates)
            return
        counter, self._enable_version_counter = self._enable_version_counter, False
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._enable_version_counter = counter

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # the last step of max_steps: saved here, where the loops' counters still say "mid-epoch,
        # k batches done"; by on_train_end Lightning has already counted the epoch as finished,
        # and a resume from that file would skip the rest of the epoch
        if self.save_last and 0 < trainer.max_steps <= trainer.global_step \
                and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


def _remove_stale_partials(filepath: str) -> None:
    """Remove ``<filepath>.partial-<host>-<pid>`` files or folders of dead processes on this host
    (and this process's own), and the ``<filepath>.partial`` of older versions."""
    host = socket.gethostname()
    for path in glob.glob(glob.escape(filepath) + ".partial*"):
        suffix = path[len(filepath) + len(".partial"):]
        if suffix:
            owner_host, _, pid = suffix[1:].rpartition("-")
            if owner_host != host or not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
                continue  # another host's, or a live process's
        _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _replace(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` atomically (a directory: the old one moves aside first, so a
    kill between the two renames leaves ``dst.old`` complete)."""
    if os.path.isdir(src):
        old = f"{dst}.old"
        _remove(old)
        if os.path.lexists(dst):
            os.replace(dst, old)
        os.replace(src, dst)
        _remove(old)
    else:
        os.replace(src, dst)
        dir_fd = os.open(Path(dst).parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
