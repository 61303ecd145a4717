"""One writer per run directory, and nothing of an earlier launch lost.

A fit launched by the ``lightning-diffusion`` command holds its run directory (the logger's
``log_dir``, e.g. ``runs/ddpm_digits/version_0``) for as long as it runs, through
:class:`RunDirectoryLock`: a POSIX record lock on ``<run>/.lock``, which the kernel releases when the
process ends in any way (kill -9 included), so a crashed run never leaves it stuck. A second fit into
the same directory is refused before it writes anything, naming the directory and the process that
holds it.

A ``fit`` without ``--ckpt_path`` into a directory that already holds an earlier launch's
checkpoints or metrics is refused the same way (:func:`refuse_earlier_run`): it would start from
step 0 over them. ``--ckpt_path last`` resumes the newest checkpoint of the run directory
(:func:`resolve_last_checkpoint`).

Resuming into the same directory (same logger ``version``) keeps what the earlier launches wrote:
their ``config.yaml`` (each launch writes its own: ``config.yaml``, then ``config-2.yaml``, ...) and
the rows of ``metrics.csv`` (Lightning's CSV logger deletes the file when a logger starts in a
non-empty directory; :func:`keep_csv_history` puts the rows back and appends after them). Rows of
steps the resumed checkpoint had not reached (a resume from an older checkpoint) go to
``metrics-superseded-<n>.csv`` beside it, so ``metrics.csv`` never holds a step twice.
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
from typing import Any, Callable

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from lightning_diffusion.errors import CheckpointError, RunDirectoryBusyError, RunExistsError

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

    def acquire(self, check: Callable[[], None] | None = None) -> None:
        """Take the directory, or raise :class:`RunDirectoryBusyError` naming it and its owner.

        Args:
            check: called once the lock is held and before this process writes itself into the lock
                file; whatever it raises gives the directory up again and propagates (the directory
                is left as it was).
        """
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
        if check is not None:
            try:
                check()
            except BaseException:
                fcntl.lockf(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise
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


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The folders the trainer's ModelCheckpoints write to: each one's ``dirpath``, or (not given)
    ``<run directory>/checkpoints``, Lightning's rule (ModelCheckpoint resolves it only at ``setup``)."""
    directory = run_directory(trainer)
    out: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        folder = Path(dirpath) if dirpath is not None else (directory / "checkpoints" if directory is not None else None)
        if folder is not None and folder not in out:
            out.append(folder)
    return out


def _checkpoints_in(trainer: L.Trainer) -> list[Path]:
    """The checkpoints of this fit's run: ``*.ckpt`` files or sharded folders in its checkpoint
    folders, and Lightning's SLURM ``hpc_ckpt_*.ckpt`` in the run directory itself."""
    found: list[Path] = []
    for folder in checkpoint_dirs(trainer):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.suffix == ".ckpt")
    directory = run_directory(trainer)
    if directory is not None and directory.is_dir():
        found += sorted(p for p in directory.glob("hpc_ckpt_*.ckpt") if p not in found)
    return found


def _metrics_files(trainer: L.Trainer) -> list[Path]:
    """Metrics an earlier launch logged here: a CSV logger's ``metrics.csv`` with at least one row,
    a TensorBoard logger's event files."""
    from lightning.fabric.loggers.csv_logs import CSVLogger as FabricCSVLogger
    from lightning.pytorch.loggers import TensorBoardLogger

    found: list[Path] = []
    for logger in trainer.loggers:
        if isinstance(logger, FabricCSVLogger):
            path = Path(logger.log_dir) / "metrics.csv"
            if path.is_file() and len(path.read_bytes().splitlines()) > 1:
                found.append(path)
        elif isinstance(logger, TensorBoardLogger) and Path(logger.log_dir).is_dir():
            found += sorted(Path(logger.log_dir).glob("events.out.tfevents.*"))
    return found


def _new_directory_hint(trainer: L.Trainer) -> str:
    if trainer.loggers:
        return "--trainer.logger.init_args.version=NAME, or another name/save_dir"
    return "--trainer.default_root_dir=DIR"


def refuse_earlier_run(trainer: L.Trainer) -> None:
    """Raise :class:`RunExistsError` if this fit's run directory (or checkpoint folder) already holds
    checkpoints or metrics of an earlier launch: a fit without ``--ckpt_path`` would start from step 0
    over them (Lightning would truncate ``metrics.csv`` and write ``last-v1.ckpt`` beside
    ``last.ckpt``). The message names the directory and both ways on."""
    checkpoints, metrics = _checkpoints_in(trainer), _metrics_files(trainer)
    if not checkpoints and not metrics:
        return
    directory = run_directory(trainer)
    names = [str(p.relative_to(directory)) if directory in p.parents else str(p) for p in checkpoints + metrics]
    held = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    new = f"give this fit a new directory ({_new_directory_hint(trainer)})"
    if not checkpoints:
        raise RunExistsError(f"run directory {directory} already holds an earlier launch's metrics ({held}) but no "
                             f"checkpoint to resume; {new}, or move those files away")
    last = next((p for p in checkpoints if p.name == "last.ckpt"), checkpoints[-1])
    raise RunExistsError(f"run directory {directory} already holds a run ({held}); a fit without --ckpt_path would "
                         f"start from step 0 over it. Resume it with --ckpt_path {last} (or --ckpt_path last), or {new}")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The ``global_step`` a checkpoint file (or sharded checkpoint folder: its ``meta.pt``) was saved
    at; None if it is none or unreadable. Tensors are memory-mapped, not read."""
    import torch

    from lightning_diffusion.checkpoints import load_checkpoint

    path = Path(path)
    try:
        if path.is_dir():
            checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        elif path.is_file():
            checkpoint = load_checkpoint(path, mmap=True)
        else:
            return None
    except (OSError, ValueError, RuntimeError):
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return int(step) if isinstance(step, int) else None


def slurm_hpc_checkpoint(root_dir: str | os.PathLike) -> str | None:
    """The checkpoint Lightning restores in a SLURM job, as ``Trainer.fit(ckpt_path=None)`` does: the
    ``hpc_ckpt_N.ckpt`` with the largest N in ``root_dir`` (the trainer's ``default_root_dir``),
    which its auto-requeue handler writes on the requeue signal; None when there is none."""
    import re

    found = [(int(m.group(1)), p) for p in Path(root_dir).glob("hpc_ckpt_*.ckpt")
             if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return str(max(found)[1]) if found else None


def resolve_last_checkpoint(trainer: L.Trainer) -> Path:
    """The checkpoint ``--ckpt_path last`` resumes, of this fit's run (:func:`checkpoint_dirs`, and
    ``hpc_ckpt_*.ckpt`` in the run directory): of ``last.ckpt`` (``last-v<n>.ckpt`` of older versions)
    and the newest ``hpc_ckpt_<n>.ckpt``, the one at the highest ``global_step``; where there is none
    of them, the checkpoint at the highest step (the most recently written among equals). Not all
    checkpoints by step: after a resume from an older checkpoint, the periodic checkpoints of the
    abandoned steps are further along than ``last.ckpt``, which LastCheckpoint always writes last.
    Lightning's own ``"last"`` goes by modification time (which a copy resets) and starts from
    scratch with a warning when there is none; this is read early because the CLI needs a real file
    before Lightning does (the resume check and the W&B run id).

    Raises :class:`~lightning_diffusion.errors.CheckpointError` naming the directory when there is none.
    """
    import re

    directory = run_directory(trainer)
    if directory is None:
        raise CheckpointError("--ckpt_path last: this fit's run directory is not known before its W&B run starts (the "
                              "run id is drawn then); give the run's id (--trainer.logger.init_args.id=ID) or the "
                              "checkpoint itself (--ckpt_path PATH)")
    found = _checkpoints_in(trainer)
    hpc = slurm_hpc_checkpoint(directory)
    last = [p for p in found if re.fullmatch(r"last(-v\d+)?\.ckpt", p.name)] + ([Path(hpc)] if hpc else [])
    candidates = last or found
    readable = [(step, os.stat(p).st_mtime_ns, p) for p in candidates if (step := checkpoint_step(p)) is not None]
    folders = ", ".join(str(f) for f in checkpoint_dirs(trainer)) or str(directory)
    if not readable:
        unreadable = f" ({len(candidates)} unreadable: {', '.join(p.name for p in candidates[:3])})" if candidates else ""
        raise CheckpointError(f"--ckpt_path last: no checkpoint in {folders}{unreadable}, the checkpoints of run "
                              f"directory {directory}; name the run to resume ({_new_directory_hint(trainer)}) or "
                              "give the checkpoint itself (--ckpt_path PATH)")
    step, _, chosen = max(readable)
    skipped = [p.name for p in candidates if p not in {r[2] for r in readable}]
    rank_zero_info(f"--ckpt_path last: resuming from {chosen} (step {step}"
                   + (f"; unreadable, skipped: {', '.join(skipped)}" if skipped else "") + ")")
    return chosen


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


def keep_csv_history(trainer: L.Trainer, resume_step: int | None = None) -> None:
    """Keep the rows an earlier launch wrote to ``metrics.csv`` of a CSVLogger resuming in its
    directory: Lightning's CSV writer deletes the file when it starts in a non-empty directory. The
    writer is started here (rank zero, before anything is logged), the old rows are put back and
    its header is seeded with their columns, so new rows are appended after them.

    Args:
        resume_step: the ``global_step`` of the checkpoint this fit resumes (None: not resuming).
            Rows at that step or later are logged again by the resumed fit (its first training row is
            that step's): they move to :func:`superseded_path` (``metrics-superseded-<n>.csv``, header
            and rows as they were), with a line saying so, and ``metrics.csv`` keeps the rows before it.
    """
    import csv

    from lightning.fabric.loggers.csv_logs import CSVLogger as FabricCSVLogger

    for logger in trainer.loggers:
        if not isinstance(logger, FabricCSVLogger) or getattr(logger, "_experiment", None) is not None:
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        old = path.read_bytes() if path.is_file() else None
        if old and resume_step is not None:
            old = _move_superseded_rows(path, old, resume_step)
        with warnings.catch_warnings():  # "... will be deleted": not any more
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = logger.experiment
        if old:
            _write_atomically(path, old)
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            writer.metrics_keys = sorted(set(header))


def superseded_path(metrics: Path) -> Path:
    """The first free ``metrics-superseded-<n>.csv`` (n = 1, 2, ...) beside ``metrics``."""
    n = 1
    while (metrics.parent / f"{metrics.stem}-superseded-{n}{metrics.suffix}").exists():
        n += 1
    return metrics.parent / f"{metrics.stem}-superseded-{n}{metrics.suffix}"


def _move_superseded_rows(path: Path, content: bytes, resume_step: int) -> bytes:
    """Write the rows of ``content`` (``path``'s bytes) at step >= ``resume_step`` to
    :func:`superseded_path` (first, so a kill never loses them); return the rows to keep (``content``
    itself when none is superseded)."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(content.decode(), newline="")))
    if not rows or "step" not in rows[0]:
        return content
    column = rows[0].index("step")

    def superseded(row: list[str]) -> bool:
        try:
            return int(float(row[column])) >= resume_step
        except (IndexError, ValueError):
            return False

    later = [row for row in rows[1:] if superseded(row)]
    if not later:
        return content
    kept = [rows[0], *(row for row in rows[1:] if not superseded(row))]

    def text(table: list[list[str]]) -> bytes:
        out = io.StringIO(newline="")
        csv.writer(out, lineterminator="\n").writerows(table)
        return out.getvalue().encode()

    side = superseded_path(path)
    _write_atomically(side, text([rows[0], *later]))
    steps = [int(float(row[column])) for row in later]
    rank_zero_info(f"{path}: {len(later)} rows of steps {min(steps)}-{max(steps)}, logged after the checkpoint this "
                   f"fit resumes (step {resume_step}), moved to {side}; this fit logs those steps again")
    return text(kept)


#: the folder (inside each checkpoint folder) that a resume from an older checkpoint moves the newer
#: ``last.ckpt`` to; not a ``*.ckpt`` name, so ``--ckpt_path last`` and the fresh-fit check never take it
SUPERSEDED_DIR = "superseded"


def keep_newer_last_checkpoints(trainer: L.Trainer, ckpt_path: str | os.PathLike, resume_step: int) -> list[Path]:
    """Move each ``last.ckpt`` of this fit's checkpoint folders that is further along than the
    checkpoint this fit resumes (a resume from an older checkpoint) to
    ``<folder>/superseded/last-step<N>.ckpt``, with a line saying so: the resumed fit's first save
    would replace it, and nothing a run wrote is silently lost. Returns the new paths."""
    moved: list[Path] = []
    for folder in checkpoint_dirs(trainer):
        last = folder / "last.ckpt"
        if not last.exists() or _same_file(last, ckpt_path):
            continue
        step = checkpoint_step(last)
        if step is None or step <= resume_step:
            continue
        target = folder / SUPERSEDED_DIR / f"last-step{step}.ckpt"
        n = 2
        while target.exists():
            target, n = folder / SUPERSEDED_DIR / f"last-step{step}-{n}.ckpt", n + 1
        target.parent.mkdir(exist_ok=True)
        os.replace(last, target)
        moved.append(target)
        rank_zero_info(f"{last} (step {step}) is further along than the checkpoint this fit resumes (step "
                       f"{resume_step}): moved to {target}, so the resumed fit's saves do not replace it")
    return moved


def _same_file(a: Path, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _write_atomically(path: Path, content: bytes) -> None:
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_bytes(content)
    os.replace(partial, path)


class RunConfig(SaveConfigCallback):
    """LightningCLI's config saving, with the run directory held and nothing overwritten.

    :meth:`hold` (the CLI calls it once the Trainer is built, before ``fit`` starts the loggers,
    whose start deletes an existing ``metrics.csv``) takes the :class:`RunDirectoryLock` on rank zero,
    refuses a fresh fit into an earlier run (:func:`refuse_earlier_run`) and keeps the CSV history
    (:func:`keep_csv_history`); a W&B run whose id is drawn when it starts is held at ``setup``,
    once its directory is known. At ``setup`` every rank learns whether rank zero holds the
    directory and fails together if not (processes that SLURM or torchrun
    started are already waiting for rank zero: they must not hang); then rank zero writes this
    launch's config to :func:`launch_config_path`. The lock is released at ``teardown``, by
    :meth:`release`, and by the process's exit.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.pop("overwrite", None)  # never: each launch gets its own file
        super().__init__(*args, overwrite=False, **kwargs)
        self.lock: RunDirectoryLock | None = None
        self.config_path: Path | None = None
        self._refusal: Exception | None = None
        self._held_at_setup: bool | None = None  # hold's fresh_fit, for a directory known only at setup

    def hold(self, trainer: L.Trainer, ckpt_path: str | os.PathLike | None = None, fresh_fit: bool = False) -> None:
        """Take the run directory on rank zero, before anything is written into it.

        Args:
            trainer: the Trainer about to run.
            ckpt_path: the checkpoint this launch resumes (a file or sharded folder), if any: the
                metrics rows at or after its step are superseded (:func:`keep_csv_history`).
            fresh_fit: a ``fit`` without ``--ckpt_path``: refused if the directory holds an earlier
                run (:func:`refuse_earlier_run`; a fit already running there is named instead).
        """
        directory = run_directory(trainer)
        if not trainer.is_global_zero:
            return
        if directory is None:  # a W&B run whose id is drawn when it starts: held at setup, once it is known
            self._held_at_setup = fresh_fit
            return
        refusal = self._take(trainer, directory, fresh_fit)
        if refusal is not None:
            environment = getattr(trainer.strategy, "cluster_environment", None)
            if environment is None or not environment.creates_processes_externally:
                raise refusal  # no other rank has started yet
            self._refusal = refusal
            trainer.loggers = []  # they would start (and delete metrics.csv) before setup
            return
        resume_step = checkpoint_step(ckpt_path) if ckpt_path else None
        keep_csv_history(trainer, resume_step)
        if resume_step is not None:
            keep_newer_last_checkpoints(trainer, ckpt_path, resume_step)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self._held_at_setup is not None and trainer.is_global_zero:
            self._hold_started_run(trainer, self._held_at_setup)
        refusal = trainer.strategy.broadcast(self._refusal)  # every rank fails with rank zero's error
        if refusal is not None:
            raise type(refusal)(str(refusal))
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

    def _hold_started_run(self, trainer: L.Trainer, fresh_fit: bool) -> None:
        """:meth:`hold` for a run whose directory became known when its logger started (a W&B run:
        ``save_dir/<project>/<run id>``, an id W&B drew or resumed), before any checkpoint is written
        there; a refusal goes to every rank with :meth:`setup`'s broadcast."""
        self._held_at_setup = None
        directory = run_directory(trainer)
        if directory is not None:
            self._refusal = self._take(trainer, directory, fresh_fit)

    def _take(self, trainer: L.Trainer, directory: Path, fresh_fit: bool) -> Exception | None:
        """Lock ``directory`` (checking it for an earlier run first if ``fresh_fit``); the error that
        refuses it, or None once it is held."""
        lock = RunDirectoryLock(directory)
        try:
            lock.acquire(check=(lambda: refuse_earlier_run(trainer)) if fresh_fit else None)
        except (RunDirectoryBusyError, RunExistsError) as e:
            return e
        self.lock = lock
        return None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.release()
