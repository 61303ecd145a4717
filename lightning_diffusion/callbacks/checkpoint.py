"""LastCheckpoint: Lightning's ModelCheckpoint with a ``last.ckpt`` that is never behind and never torn."""

from __future__ import annotations

import errno
import glob
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO


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
        # a full disk: rank zero alone writes a checkpoint file, and the other ranks wait in the save's
        # barrier, so the error is caught where the file is written and every rank learns of it
        # after the barrier (a sharded save's error reaches every rank through torch's own gather)
        strategy, io = trainer.strategy, _DiskFullCatcher(trainer.strategy.checkpoint_io)
        previous_step = self._last_global_step_saved
        strategy.checkpoint_io = io
        try:
            super()._save_checkpoint(trainer, partial)
        except BaseException as error:  # noqa: BLE001 - torch.distributed.checkpoint's error is a BaseException
            if not _disk_full(error):
                raise
            io.error = error
        finally:
            strategy.checkpoint_io = io.inner
        if trainer.strategy.reduce_boolean_decision(io.error is not None, all=False):
            self._disk_full(trainer, filepath, partial, previous_step, io.error)
        if trainer.is_global_zero:
            _replace(partial, filepath)
        trainer.strategy.barrier("LastCheckpoint.replace")
        self._last_checkpoint_saved = filepath

    def _disk_full(self, trainer: L.Trainer, filepath: str, partial: str, previous_step: int,
                   error: BaseException | None) -> None:
        """Remove the partial file or folder and raise one line: the directory, the space needed and
        free, the last good checkpoint."""
        written = _size(partial) if trainer.is_global_zero else 0
        trainer.strategy.barrier("LastCheckpoint.disk_full")
        if trainer.is_global_zero:
            _remove(partial)
        directory = os.path.dirname(os.path.abspath(filepath))
        free = shutil.disk_usage(directory).free
        last = self.last_model_path if self.last_model_path and os.path.exists(self.last_model_path) else ""
        if not last and os.path.exists(filepath):
            last = filepath
        previous = _size(last) if last else 0
        needed = (f"about {_megabytes(previous)} (the size of {os.path.basename(last)})" if previous
                  else f"more than the {_megabytes(written)} written before the disk filled")
        if last:
            step = previous_step if previous_step > 0 else None
            good = f"the last good checkpoint, {last}{f' (step {step})' if step else ''}, is intact"
        else:
            good = "no checkpoint of this run is on disk yet"
        trainer.strategy.barrier("LastCheckpoint.disk_full_removed")
        message = (f"no space left on device for checkpoint {os.path.basename(filepath)} in {directory}: it needs "
                   f"{needed}, {_megabytes(free)} are free; {good}; the partial file was removed. Free space there "
                   "or give the checkpoint callback another dirpath")
        full = OSError(message)
        full.errno = errno.ENOSPC
        raise full from error

    def save_last_now(self, trainer: L.Trainer) -> str | None:
        """Write ``last.ckpt`` at the current step, unless it was written at this step already; call
        it on every rank, at the end of a training batch (where this callback saves too, so a resume
        from it is exact). Returns its path, or None when ``save_last`` is off.

        Args:
            trainer: the trainer whose state is saved.
        """
        if not self.save_last:
            return None
        if self._last_global_step_saved != trainer.global_step or not os.path.exists(self.last_model_path or ""):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path or None

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


class _DiskFullCatcher(CheckpointIO):
    """The strategy's CheckpointIO, keeping a full disk's error of a save (``error``) instead of raising
    it there; everything else is passed through."""

    def __init__(self, inner: CheckpointIO):
        self.inner, self.error = inner, None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        try:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        except OSError as error:
            if not _disk_full(error):
                raise
            self.error = error

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it wraps: its cause, its context, a distributed checkpoint's
    per-rank failures) is a full disk or an exceeded quota."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        todo += [error.__cause__, error.__context__]
        for failure in (getattr(error, "failures", None) or {}).values():  # torch's CheckpointException
            todo.append(failure[0] if isinstance(failure, tuple) else getattr(failure, "exception", None))
    return False


def _size(path: str) -> int:
    """Bytes in a file, or in the files of a folder."""
    if os.path.isdir(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
