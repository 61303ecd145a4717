"""The orderly end of a multi-process run (DDP, FSDP2's ModelParallelStrategy, SLURM): every rank
leaves the process group together, before the interpreter exits.

Why it is needed: Lightning's strategies leave a gloo process group to the interpreter's exit (they
destroy only an NCCL one, in an ``atexit`` handler). A gloo worker thread that still holds the last
finished collective (in the CLI: the final broadcast of ``trainer.log_dir``) may drop it only once
the interpreter is finalizing; freeing its tensors takes the GIL, CPython ends such a thread with
``pthread_exit``, and the forced unwind through a ``noexcept`` destructor calls ``std::terminate``:
the rank dies with SIGABRT, ``terminate called without an active exception``, after a run that
finished (more often on a loaded machine, where the worker thread runs late). A rank that closes its
sockets while a peer still waits in a collective, or a store host that exits while a client still
talks to it, fails a finished run in the same way.

:func:`end_process_group` orders the end: a barrier over the process group (every rank has issued
and finished its last collective), a store barrier (every rank has returned from it), then each
rank destroys its process groups (the gloo threads are joined while the interpreter is whole) and
reports to the store, and the store's host (rank 0) returns only when every rank has reported, so
the store outlives its last client.

:func:`rank_world` says which rank this process is and how many there are, with or without a
Trainer (the datamodule splits shards by it, the callbacks split samples and cached statistics).
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the annotation only: this module runs without Lightning
    import lightning as L

log = logging.getLogger(__name__)

_calls = itertools.count()  # the n-th end of this process uses its own keys (a store can outlive a group)


def rank_world(trainer: L.Trainer | None) -> tuple[int, int]:
    """(global rank, world size): the trainer's, else the default process group's, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def end_process_group(timeout: float = 300.0) -> None:
    """End this rank's part in the default process group, in step with every other rank.

    Call it on every rank after the last collective (after ``trainer.fit`` / ``validate`` / ``test``
    and anything that broadcasts afterwards, such as ``trainer.log_dir``), on the normal path only:
    a rank that failed should exit, not wait for its peers. Without an initialized process group it
    does nothing; the ``lightning-diffusion`` command calls it when a trainer subcommand succeeds.

    Args:
        timeout: seconds to wait for the other ranks at each of the three steps (a rank that never
            arrives is named in the error).

    Raises:
        RuntimeError: a rank did not arrive within ``timeout``.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        dist.destroy_process_group()
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()  # held here: it must outlive the process group's destruction
    key = f"lightning_diffusion/end/{next(_calls)}"
    wait = timedelta(seconds=timeout)
    backend = dist.get_backend()
    try:
        if backend == "gloo":  # the barrier with a timeout, which names a missing rank
            dist.monitored_barrier(timeout=wait, wait_all_ranks=True)
        elif backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
    except RuntimeError as error:
        raise RuntimeError(f"end_process_group: rank {rank} of {world}: the final barrier failed ({error}); did a "
                           "rank fail or hang before its end?") from error
    _store_barrier(store, f"{key}/returned", rank, world, wait, "returned from the final barrier")
    dist.destroy_process_group()
    store.set(f"{key}/left/{rank}", "1")
    if rank == 0:  # the store's host (env:// init): stay until every client is done with it
        _store_barrier(store, f"{key}/left", rank, world, wait, "destroyed its process group")
    log.debug(f"rank {rank}: process group ended in order")


def _store_barrier(store, key: str, rank: int, world: int, wait: timedelta, what: str) -> None:
    """Wait until every rank has set ``key/<rank>`` (this one sets its own first, unless it has)."""
    keys = [f"{key}/{r}" for r in range(world)]
    if not store.check([f"{key}/{rank}"]):
        store.set(f"{key}/{rank}", "1")
    try:
        store.wait(keys, wait)
    except Exception as error:  # DistStoreError (a timeout) or a lost store host
        missing = [r for r in range(world) if not _has(store, f"{key}/{r}")]
        raise RuntimeError(f"end_process_group: rank {rank} of {world} waited {wait.total_seconds():.0f} s, but "
                           f"rank(s) {missing or '?'} never {what} ({error}); did a rank fail or hang before its "
                           f"end?") from error


def _has(store, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:  # the store itself is gone
        return False
