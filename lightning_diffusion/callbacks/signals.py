"""StopOnSignal: SIGTERM and SIGINT end a fit with a checkpoint at the current step and a non-zero exit.

SIGTERM is what SLURM sends at the time limit (then SIGKILL after ``KillWait``, 30 s by default) or
on preemption, and what Kubernetes and ``kill`` send by default; SIGINT is Ctrl-C. Lightning's own
handling (``_SignalConnector``, Lightning 2.6) sets a flag that makes the loops raise
``SIGTERMException``, a ``SystemExit`` with code 0: the process ends with exit status 0 and no
checkpoint at the stop, and its handler broadcasts a tensor from inside the signal handler, a
collective that a DDP rank in the middle of the step's all-reduce cannot match. SIGINT raises
``KeyboardInterrupt`` wherever the main thread is, and Lightning exits 1 without a checkpoint.

This callback takes both signals (before Lightning registers its SIGTERM handler and again when the
sanity check or training starts, so its handler, not Lightning's, is the one installed), only notes
their arrival in the handler, and at the end of every ``every_n_steps``-th training batch all ranks
agree (one all-reduce of the signal number) whether any rank received one: the signal reaches the
ranks at different steps, the all-reduce makes them all stop at the same one. There every rank takes
part in writing ``last.ckpt`` of the trainer's :class:`~lightning_diffusion.callbacks.LastCheckpoint`
(atomically, the file a resume takes) and raises :class:`FitStopped`, a ``SystemExit`` with code
128 + the signal number (143 for SIGTERM, 130 for SIGINT, as a shell reports a process the signal
killed): a script that does not catch it ends with that status, and the ``lightning-diffusion``
command prints one line naming the checkpoint.

A main thread blocked in a data read never reaches the end of a batch. The handler therefore starts a
timer of ``grace_seconds``; when it runs out and the main thread is waiting in a DataLoader (a
worker's queue, or a read in the main process), the handler raises :class:`FitStopped` there
("stopped while waiting for data", naming the last checkpoint that exists: a save from the middle of
a fetch would hold a stream position that no resume can reproduce). Elsewhere (a long step,
validation, an epoch-end hook) the timer is re-armed: those end by themselves, and SLURM's SIGKILL
bounds the wait. A second signal more than a second after the first (SLURM delivers one signal to a
task both directly and through ``srun``: copies within a second are the same event) ends the fit at
once in the same way.

The ``validate``, ``test`` and ``predict`` commands take the signals too (Lightning's own handler would
end them with ``SIGTERMException``, exit status 0, as if they had finished): at the end of the
current batch the command stops with the same exit status and says that its metrics are incomplete
and were not logged (there is nothing to save: run it again). No ranks' agreement there (a rank's
evaluation batches may differ in number, so a collective at every batch could wait forever): each
rank stops at its own next batch, and sends the signal on to the ranks it started.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

#: the signals the callback takes, and the exit status of a fit they stopped (128 + the number)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: copies of a signal within this many seconds of the first are the same event (SLURM sends a task
#: the time limit's SIGTERM directly and through srun)
REPEAT_SECONDS = 1.0


class FitStopped(SystemExit):
    """A fit stopped by SIGTERM or SIGINT. ``code`` (the exit status) is 128 + the signal number:
    143 for SIGTERM, 130 for SIGINT; ``str(error)`` is the one line the command prints.

    Attributes: ``signum`` (the signal), ``step`` (the global step the fit stopped at),
    ``checkpoint`` (the path of the checkpoint written at the stop or, when none could be, the last
    one that exists; None without one), ``saved`` (whether ``checkpoint`` is at ``step``),
    ``agreed`` (all ranks stopped together at ``step``), ``global_rank``."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: str | None, saved: bool,
                 agreed: bool, global_rank: int):
        """
        Args:
            message: the one line that describes the stop.
            signum: the signal's number.
            step: the global step (optimizer steps done) at the stop.
            checkpoint: the checkpoint a resume takes, or None.
            saved: whether ``checkpoint`` was written at ``step``.
            agreed: whether every rank stopped at ``step`` together (then it may leave the process group in order).
            global_rank: this process's rank.
        """
        super().__init__(128 + int(signum))
        self.message, self.signum, self.step, self.checkpoint = message, int(signum), step, checkpoint
        self.saved, self.agreed, self.global_rank = saved, agreed, global_rank

    def __str__(self) -> str:
        return self.message


_ENDED_BY_ERROR: FitStopped | None = None  # a fit that received a signal and then ended with an error


def signal_stop(error: BaseException) -> FitStopped | None:
    """The :class:`FitStopped` that ``error`` (what ended ``Trainer.fit``) stands for: ``error``
    itself, or, when a fit of this process received SIGTERM/SIGINT and then ended with another
    error (a DataLoader worker or a ``pipe:`` command killed by the same signal), a FitStopped
    describing that stop; None otherwise."""
    global _ENDED_BY_ERROR
    found, _ENDED_BY_ERROR = _ENDED_BY_ERROR, None
    return error if isinstance(error, FitStopped) else found


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopOnSignal(L.Callback):
    """On SIGTERM or SIGINT, stop the fit at the end of the current training batch on every rank,
    write ``last.ckpt`` (the trainer's :class:`~lightning_diffusion.callbacks.LastCheckpoint`) and
    raise :class:`FitStopped` (exit status 143 for SIGTERM, 130 for SIGINT). The
    ``lightning-diffusion`` command adds it to every fit; in your own Trainer, list it after your
    other callbacks (Lightning runs checkpoint callbacks after every other one anyway), so that
    their end-of-batch work (EMA) is in the checkpoint.
    """

    def __init__(self, grace_seconds: float = 5.0, every_n_steps: int = 1):
        """
        Args:
            grace_seconds: seconds after a signal that a main thread waiting for data (a DataLoader
                that yields no batch: a stalled read) may take before the fit stops there, without a
                checkpoint at the current step. Keep it well inside SLURM's ``KillWait`` (30 s by default).
            every_n_steps: how often the ranks compare notes (one all-reduce of a single number per
                ``every_n_steps`` training batches); a signal is acted on within that many steps.
        """
        if every_n_steps < 1:
            raise ValueError(f"StopOnSignal: every_n_steps must be >= 1, got {every_n_steps}")
        if not grace_seconds > 0:
            raise ValueError(f"StopOnSignal: grace_seconds must be > 0, got {grace_seconds}")
        self.grace_seconds, self.every_n_steps = float(grace_seconds), every_n_steps
        self.signum: int | None = None  # the first signal received in this fit
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}
        self._active = False
        self._pid = 0
        self._timer: threading.Timer | None = None
        self._woken = False  # the timer, not a second signal, sent the last one
        self._trainer: L.Trainer | None = None
        self._stage = "fit"  # the trainer's command: fit, validate, test or predict
        self._batches = 0  # batches of an evaluation command done

    # -- the handler ------------------------------------------------------------------------------
    def _install(self) -> None:
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process decides and ends it
            return
        if not self._active:  # after the fit (Lightning restores our handler on an error): as before
            self._pass_on(signum, frame)
            return
        if self.signum is None:
            self.signum, self._received_at = signum, time.monotonic()
            self._arm()
            return
        if self._woken:  # the grace timer
            self._woken = False
            if _waiting_for_data(frame):
                _end_data_workers()  # blocked in a read: the DataLoader's shutdown would wait 5 s for each
                self._forward()
                raise self._stop_now(f"while waiting for data (no batch within {self.grace_seconds:g} s of the signal)")
            self._arm()  # a step, validation or a hook: it ends by itself
            return
        if time.monotonic() - self._received_at > REPEAT_SECONDS:
            if _waiting_for_data(frame):
                _end_data_workers()
            self._forward()
            raise self._stop_now("before the end of its step", who=f"a second {_signal_name(signum)}")

    def _pass_on(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous) and previous is not self._handle:
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _forward(self) -> None:
        """Before this rank stops alone: send the signal on to the ranks that Lightning's launcher
        started from this process (``launcher.kill``, as Lightning's own SIGTERM handler does), which
        would otherwise wait for this one in their next collective."""
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        if launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(self.signum)

    def _arm(self) -> None:
        # a thread that sends the signal to the main thread again: a real signal interrupts a blocked
        # read (EINTR) so the handler can raise there; signal.alarm would take SIGALRM from the user
        self._cancel()
        main = threading.main_thread().ident

        def wake() -> None:
            if self._active and self.signum is not None:
                self._woken = True
                signal.pthread_kill(main, self.signum)

        self._timer = threading.Timer(self.grace_seconds, wake)
        self._timer.daemon = True
        self._timer.start()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end(self) -> None:
        self._active = False
        self._cancel()
        self._restore()

    # -- the stop ---------------------------------------------------------------------------------
    def _last_checkpoint(self):
        from lightning_diffusion.callbacks.checkpoint import LastCheckpoint

        trainer = self._trainer
        return next((cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None) if trainer else None

    def _existing_checkpoint(self) -> tuple[str | None, str]:
        """The checkpoint that exists now and how to describe it."""
        trainer = self._trainer
        last = self._last_checkpoint()
        path = getattr(last, "last_model_path", "") if last is not None else ""
        if path and os.path.exists(path):
            step = getattr(last, "_last_global_step_saved", None)
            return path, f"the last checkpoint is {path}" + (f" (step {step})" if step else "")
        resumed = getattr(trainer, "ckpt_path", None)
        if resumed and os.path.exists(resumed):
            return resumed, f"no checkpoint was written in this run; it resumed from {resumed}"
        if last is None:
            return None, "no checkpoint was written (the trainer has no LastCheckpoint callback)"
        return None, "no checkpoint has been written yet in this run"

    def _stop_now(self, detail: str, who: str | None = None) -> FitStopped:
        """The FitStopped of a stop outside a step's end (this rank alone; nothing saved)."""
        self._end()
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        if self._stage != "fit":
            return self._stop_evaluation(detail, who, rank)
        path, note = self._existing_checkpoint()
        message = f"stopped by {who or _signal_name(self.signum)} at step {step} {detail}; {note}"
        if path:
            message += f"; resume with --ckpt_path {path}"
        global _ENDED_BY_ERROR
        # kept for the command too: a worker's death (torch's SIGCHLD handler) may replace it on the way out
        _ENDED_BY_ERROR = FitStopped(message, self.signum, step, path, saved=False, agreed=False, global_rank=rank)
        return _ENDED_BY_ERROR

    def _stop_evaluation(self, detail: str, who: str | None, rank: int) -> FitStopped:
        """The FitStopped of a validate / test / predict command (this rank; nothing to save)."""
        global _ENDED_BY_ERROR
        outputs = "predictions are incomplete and were not returned" if self._stage == "predict" else \
            "metrics are incomplete and were not logged"
        message = (f"stopped by {who or _signal_name(self.signum)} in {self._stage} after {self._batches} "
                   f"batch{'es' if self._batches != 1 else ''}{' ' + detail if detail else ''}; its {outputs}: "
                   "run the command again")
        _ENDED_BY_ERROR = FitStopped(message, self.signum, self._batches, None, saved=False, agreed=False, global_rank=rank)
        return _ENDED_BY_ERROR

    # -- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn (a str enum)
        if stage not in ("fit", "validate", "test", "predict") or threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        self._stage, self._batches = stage, 0
        # what the user had: not the handler of an ended fit's StopOnSignal (this one's included) that
        # Lightning put back after it (see _handler_before_stop), else each fit would chain to the last
        self._previous = {signum: _handler_before_stop(signum, signal.getsignal(signum)) for signum in STOP_SIGNALS}
        self.signum, self._trainer, self._pid, self._active = None, trainer, os.getpid(), True
        self._install()  # before Lightning's SIGTERM handler: it then calls ours after its own
        later = trainer.callbacks[trainer.callbacks.index(self) + 1:] if self in trainer.callbacks else []
        from lightning.pytorch.callbacks import Checkpoint

        if any(not isinstance(cb, Checkpoint) for cb in later):
            rank_zero_warn(f"StopOnSignal: {', '.join(type(cb).__name__ for cb in later if not isinstance(cb, Checkpoint))} "
                           "come after it in trainer.callbacks; a checkpoint written on a signal would miss their "
                           "work of that step (EMA): list StopOnSignal after them")

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            self._install()  # over Lightning's SIGTERM handler (registered after setup)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            self._install()

    # an evaluation command: over Lightning's SIGTERM handler (registered after setup), then a stop at a batch's end
    def _evaluation_start(self) -> None:
        if self._active and self._stage != "fit":
            self._install()

    def _evaluation_batch_end(self) -> None:
        if not self._active or self._stage == "fit":
            return  # in a fit, validation ends by itself and the next training batch stops
        self._batches += 1
        if self.signum is not None:
            self._forward()
            raise self._stop_now("")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_start()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_start()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluation_start()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_batch_end()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_batch_end()

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_batch_end()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active or (batch_idx + 1) % self.every_n_steps:
            return  # (every rank stops at the same step: none is left in the all-reduce alone)
        if trainer.world_size == 1:  # no one to agree with: no tensor, no device sync on a GPU
            signum = self.signum or 0
        else:
            import torch

            mine = torch.tensor(float(self.signum or 0), device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(mine, reduce_op="max").item())  # a signal on any rank
        if not signum:
            return
        self._cancel()
        name, step, last = _signal_name(signum), trainer.global_step, self._last_checkpoint()
        path, saved, note = None, False, ""
        if last is not None:
            try:
                path = last.save_last_now(trainer)  # every rank: the save is collective
                saved = path is not None
            except OSError as error:  # a full disk: the save failed on every rank alike
                note = f"the checkpoint at the stop was not written ({error})"
        hpc = _as_hpc_checkpoint(trainer, path) if saved else None
        self._end()
        if saved:
            message = f"stopped by {name} at step {step}; saved {path}"
            message += f" (and as {hpc}, which a requeued job resumes)" if hpc else ""
            message += f"; resume with --ckpt_path {path}"
        else:
            path, existing = self._existing_checkpoint()
            message = f"stopped by {name} at step {step}; {note + '; ' if note else ''}{existing}"
            if path:
                message += f"; resume with --ckpt_path {path}"
        raise FitStopped(message, signum, step, path, saved=saved, agreed=True, global_rank=trainer.global_rank)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._active and self.signum is not None and not isinstance(exception, FitStopped):
            # a worker or a pipe: command killed by the same signal ended the fit first
            first = str(exception).splitlines()[0] if str(exception) else ""
            self._stop_now(f"(the fit then ended with {type(exception).__name__}: {first})")
        self._end()
        self._trainer = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._end()
        self._trainer = None


def _handler_before_stop(signum: int, handler: Any) -> Any:
    """``handler``, or, where it is the handler of a :class:`StopOnSignal` whose fit has ended, the one
    that callback found (followed down to a handler of the user's). Lightning's signal connector saves
    every signal's handler when a fit starts, ours among them, and puts them all back at its teardown,
    after our own restore on an error (:meth:`StopOnSignal.on_exception`): the ended fit's handler
    stays installed. It passes signals on as before, but the next fit must not take it for the user's."""
    seen: set[int] = set()
    while (getattr(handler, "__func__", None) is StopOnSignal._handle and not handler.__self__._active
           and id(handler.__self__) not in seen):
        seen.add(id(handler.__self__))
        handler = handler.__self__._previous.get(signum, signal.SIG_DFL)
    return handler


def restore_signal_handlers() -> None:
    """Put back the SIGTERM / SIGINT handlers that were installed before any ended fit's
    :class:`StopOnSignal` (see :func:`_handler_before_stop`: Lightning's teardown re-installs ours after
    an error). The CLI calls it when a command ends, so that in a Python process that runs it (a
    notebook, a test) a signal afterwards does what it did before: SIGINT raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        before = _handler_before_stop(signum, current)
        if before is not current:
            signal.signal(signum, before if before is not None else signal.SIG_DFL)


def _dataloader_files() -> tuple[str, ...]:
    import torch.utils.data.dataloader as dataloader

    return (os.path.realpath(dataloader.__file__),)


def _waiting_for_data(frame: Any) -> bool:
    """Whether the main thread, at ``frame``, is inside a DataLoader's ``__next__`` (waiting for a
    worker's batch, or reading one in the main process)."""
    files = _dataloader_files()
    while frame is not None:
        if os.path.realpath(frame.f_code.co_filename) in files:
            return True
        frame = frame.f_back
    return False


def _end_data_workers() -> None:
    """SIGKILL this process's multiprocessing children: in a fit, the DataLoader's workers (Lightning's
    DDP launcher starts ranks with ``subprocess``, not these). Used only when the fit stops while its
    main thread waits for them: a worker blocked in a read holds nothing to save, and the
    DataLoader's own shutdown would wait ``MP_STATUS_CHECK_INTERVAL`` (5 s) for each in turn."""
    import multiprocessing

    children = multiprocessing.active_children()
    if children:
        # torch's SIGCHLD handler would raise "DataLoader worker ... is killed by signal" on the way out
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # what a worker started (a `pipe:` command, curl: in sessions of their own, so no process group
    # reaches them) would outlive it, still blocked: found before the worker dies, ended with it
    started = [p for child in children for p in _descendants(child.pid)]
    for child in children:
        child.kill()
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # already gone
            pass


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (Linux ``/proc/PID/task/TID/children``; none elsewhere)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def _as_hpc_checkpoint(trainer: L.Trainer, path: str) -> str | None:
    """In a SLURM job with auto-requeue, also make the checkpoint ``path`` the newest
    ``hpc_ckpt_N.ckpt`` in ``trainer.default_root_dir``: the one a requeued job (or the next job of the
    same run directory) restores. A hard link (a copy across file systems, a sharded folder copied)
    under a temporary name, renamed into place: it is whole or absent. Every rank calls it; returns its
    path, None outside such a job."""
    from lightning_diffusion.callbacks.requeue import SlurmRequeue

    if SlurmRequeue.requeue_environment(trainer) is None:
        return None
    import shutil

    # Lightning's own choice of name: the largest N in default_root_dir, plus one
    hpc = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
    done = True
    if trainer.is_global_zero:
        partial = f"{hpc}.partial-{os.getpid()}"
        try:
            if os.path.isdir(path):
                shutil.copytree(path, partial)
            else:
                try:
                    os.link(path, partial)
                except OSError:  # another file system, or no hard links there
                    shutil.copy2(path, partial)
            os.replace(partial, hpc)
        except OSError:  # a full disk: last.ckpt is saved all the same, and named
            shutil.rmtree(partial, ignore_errors=True) if os.path.isdir(partial) else None
            if os.path.isfile(partial):
                os.remove(partial)
            done = False
    return hpc if trainer.strategy.reduce_boolean_decision(done, all=True) else None
