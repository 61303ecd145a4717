"""One writer per run directory, and nothing of an earlier launch lost.

A fit launched by the ``lightning-diffusion`` command holds its run directory (the logger's
``log_dir``, e.g. ``runs/ddpm_digits/version_0``) for as long as it runs, through
:class:`RunDirectoryLock`: a POSIX record lock on ``<run>/.lock``, which the kernel releases when the
process ends in any way (kill -9 included), so a crashed run never leaves it stuck. A second fit into
the same directory is refused before it writes anything, naming the directory and the process that
holds it.

Resuming into the same directory (same logger ``version``) keeps what the earlier launches wrote:
their ``config.yaml`` (each launch writes its own: ``config.yaml``, then ``config-2.yaml``, ...) and
the rows of ``metrics.csv`` (Lightning's CSV logger deletes the file when a logger starts in a
non-empty directory; :func:`keep_csv_history` puts the rows back and appends after them).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

from lightning_diffusion.errors import RunDirectoryBusyError

LOCK_NAME = ".lock"

# Directories this process holds: a POSIX lock is per process, so a second fit into the same
# directory from this same process (a notebook, an in-process test) would otherwise get it again.
_HELD: dict[str, "RunDirectoryLock"] = {}


class RunDirectoryLock:
    """Exclusive ownership of a run directory by this process.

    ``fcntl.lockf`` (POSIX record locks), not ``flock``: a DataLoader worker forked from the fit does
    not inherit a record lock, so a killed fit's directory is free at once, not when its last worker
    notices. The lock file holds the owner (host, pid, start time, command) for the error message.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the directory, or raise :class:`RunDirectoryBusyError` naming it and its owner."""
        self.directory.mkdir(parents=True, exist_ok=True)
        key = str(self.directory.resolve())
        if key in _HELD:
            raise RunDirectoryBusyError(self._busy_message(_HELD[key].owner() or {"pid": os.getpid()}))
        path = self.directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirectoryBusyError(self._busy_message(owner)) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd, self._info = fd, info
        _HELD[key] = self

    def owner(self) -> dict[str, Any] | None:
        return getattr(self, "_info", None) if self._fd is not None else None

    def release(self) -> None:
        """Give the directory up (the lock file stays: removing it would race with a new owner)."""
        if self._fd is None:
            return
        _HELD.pop(str(self.directory.resolve()), None)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def _busy_message(self, owner: dict[str, Any]) -> str:
        who = f"process {owner.get('pid', '?')}"
        if owner.get("host"):
            who += f" on {owner['host']}"
        if owner.get("started"):
            who += f", started {owner['started']}"
        if owner.get("command"):
            who += f" ({owner['command']})"
        return (f"run directory {self.directory} is in use by another fit: {who}. Wait for it to end, or give this "
                "fit its own directory (--trainer.logger.init_args.version=NAME, or another name/save_dir)")


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def run_directory(trainer: L.Trainer) -> Path | None:
    """The directory a fit's checkpoints and logs go to, as Lightning resolves it: a CSV or
    TensorBoard logger's ``log_dir``; ``save_dir/name/version`` of another logger (ModelCheckpoint's
    rule), None while its version is unknown (a W&B run whose id is drawn when it starts: a
    directory of its own); ``default_root_dir`` without a logger."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return Path(logger.log_dir)
    version = logger.version
    if version is None:
        return None
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / \
        (version if isinstance(version, str) else f"version_{version}")


def launch_config_path(log_dir: str | os.PathLike, filename: str = "config.yaml") -> Path:
    """The file this launch's config goes to: ``config.yaml`` for the first launch into ``log_dir``,
    ``config-2.yaml``, ``config-3.yaml``, ... for the resumes after it (none is overwritten)."""
    first = Path(log_dir) / filename
    if not first.exists():
        return first
    stem, suffix = first.stem, first.suffix
    n = 2
    while (first.parent / f"{stem}-{n}{suffix}").exists():
        n += 1
    return first.parent / f"{stem}-{n}{suffix}"


def keep_csv_history(trainer: L.Trainer) -> None:
    """Keep the rows an earlier launch wrote to ``metrics.csv`` of a CSVLogger resuming in its
    directory: Lightning's CSV writer deletes the file when it starts in a non-empty directory. The
    writer is started here (rank zero, before anything is logged), the old rows are put back and
    its header is seeded with their columns, so new rows are appended after them."""
    import csv

    from lightning.fabric.loggers.csv_logs import CSVLogger as FabricCSVLogger

    for logger in trainer.loggers:
        if not isinstance(logger, FabricCSVLogger) or getattr(logger, "_experiment", None) is not None:
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        old = path.read_bytes() if path.is_file() else None
        with warnings.catch_warnings():  # "... will be deleted": not any more
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = logger.experiment
        if old:
            path.write_bytes(old)
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            writer.metrics_keys = sorted(set(header))


class RunConfig(SaveConfigCallback):
    """LightningCLI's config saving, with the run directory held and nothing overwritten.

    :meth:`hold` (the CLI calls it once the Trainer is built, before ``fit`` starts the loggers,
    whose start deletes an existing ``metrics.csv``) takes the :class:`RunDirectoryLock` on rank zero
    and keeps the CSV history (:func:`keep_csv_history`). At ``setup`` every rank learns whether
    rank zero holds the directory and fails together if not (processes that SLURM or torchrun
    started are already waiting for rank zero: they must not hang); then rank zero writes this
    launch's config to :func:`launch_config_path`. The lock is released at ``teardown``, by
    :meth:`release`, and by the process's exit.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.pop("overwrite", None)  # never: each launch gets its own file
        super().__init__(*args, overwrite=False, **kwargs)
        self.lock: RunDirectoryLock | None = None
        self.config_path: Path | None = None
        self._busy: str | None = None

    def hold(self, trainer: L.Trainer) -> None:
        """Take the run directory on rank zero, before anything is written into it."""
        directory = run_directory(trainer)
        if not trainer.is_global_zero or directory is None:
            return
        lock = RunDirectoryLock(directory)
        try:
            lock.acquire()
        except RunDirectoryBusyError as e:
            environment = getattr(trainer.strategy, "cluster_environment", None)
            if environment is None or not environment.creates_processes_externally:
                raise  # no other rank has started yet
            self._busy = str(e)
            trainer.loggers = []  # they would start (and delete the owner's metrics.csv) before setup
            return
        self.lock = lock
        keep_csv_history(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        busy = trainer.strategy.broadcast(self._busy)
        if busy is not None:
            raise RunDirectoryBusyError(busy)
        log_dir = trainer.log_dir  # a broadcast: every rank takes part
        if trainer.is_global_zero:
            self.config_path = launch_config_path(log_dir, self.config_filename)
            # written whole or not at all: a reader (or a kill) never sees half a config
            if self.multifile:  # several files: jsonargparse writes them beside the config
                self.parser.save(self.config, str(self.config_path), skip_none=False, overwrite=False, multifile=True)
            else:
                partial = self.config_path.with_name(f"{self.config_path.name}.partial-{os.getpid()}")
                self.parser.save(self.config, str(partial), skip_none=False, overwrite=True)
                os.replace(partial, self.config_path)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.release()
