"""SlurmRequeue: Lightning's SLURM auto-requeue, run where every rank is at the same step.

Lightning's SLURMEnvironment(auto_requeue=True) saves ``hpc_ckpt_N.ckpt`` and calls ``scontrol
requeue`` from inside the SIGUSR1 handler. Saving a checkpoint is collective under DDP (a barrier,
and gathers in callbacks' and models' ``on_save_checkpoint``: EMA, RNG states), while a signal
handler runs wherever the main thread is: one rank inside it waits in a barrier while another waits
in the step's gradient all-reduce, and the job hangs until SLURM kills it without a checkpoint.
SLURM delivers the signal to every task, but not at the same step.

This callback takes SIGUSR1 (the environment's ``requeue_signal``) before Lightning registers its
handler (Lightning then registers none), only notes its arrival, and at the end of every
``every_n_steps``-th training batch all ranks agree (one all-reduce of a flag) whether any received
it. If so, every rank runs Lightning's own requeue routine there, together: the hpc checkpoint in
``trainer.default_root_dir`` and ``scontrol requeue`` from rank zero, once per run: the signal
reaches the tasks of different nodes at different steps, and a copy arriving after the ranks acted
on the first (or while SLURM ends the requeued job) is the same event, not a second one to save
and requeue for. The requeued job restores the checkpoint
(``Trainer.fit`` with ``ckpt_path=None`` under SLURM). The ``lightning-diffusion`` CLI adds this
callback itself in a SLURM job; add it to your own Trainer's callbacks when you use the library there.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info


class SlurmRequeue(L.Callback):
    """Defer Lightning's SLURM auto-requeue (SIGUSR1: hpc checkpoint + ``scontrol requeue``) to the end
    of a training batch, run by all ranks at the same step. Does nothing outside a SLURM job or with
    ``SLURMEnvironment(auto_requeue=False)``.

    ``every_n_steps``: how often the ranks compare notes (one all-reduce of a single number). The
    signal is handled within that many steps of its arrival: keep it well inside the warning time of
    ``--signal=SIGUSR1@SECONDS``.
    """

    def __init__(self, every_n_steps: int = 1):
        if every_n_steps < 1:
            raise ValueError(f"SlurmRequeue: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._signum: signal.Signals | None = None
        self._previous: Any = None
        self.received = False
        self.requeued = False  # this run's requeue was done: later arrivals of the signal are ignored

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True

    @staticmethod
    def requeue_environment(trainer: L.Trainer) -> SLURMEnvironment | None:
        """The trainer's SLURMEnvironment if it auto-requeues on a signal, else None."""
        env = trainer._accelerator_connector.cluster_environment  # where Lightning's signal connector looks
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            return env
        return None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = self.requeue_environment(trainer)
        if stage != "fit" or env is None or self._signum is not None:
            return
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
            return
        # before Trainer registers its signal handlers (after on_fit_start): it then leaves this one
        self._signum = env.requeue_signal
        self.received = self.requeued = False
        self._previous = signal.signal(self._signum, self._note)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._signum is None or self.requeued or (batch_idx + 1) % self.every_n_steps:
            return  # (every rank sets `requeued` at the same step: none is left in the all-reduce alone)
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        self.requeued = True
        rank_zero_info(f"SlurmRequeue: requeue signal received; hpc checkpoint and requeue at step {trainer.global_step}")
        # Lightning's handler, now at a point where every rank runs it: finalizes the loggers, saves
        # hpc_ckpt_N.ckpt (collective) and, on rank zero, calls `scontrol requeue`.
        trainer._signal_connector._slurm_sigusr_handler_fn(self._signum, None)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signum is not None:
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._signum = None
