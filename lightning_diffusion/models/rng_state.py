"""Exact resume: the global RNG states of every rank travel in the checkpoint.

:class:`RngStateInCheckpoint` is a mixin of :class:`~lightning_diffusion.models.base.GenerativeModel`:
dropout and the training noise draw from the global RNGs (torch, CUDA, numpy, Python), so a resumed
run continues the same random sequence only if their states come back. The checkpoint key is
``rng_states``: one entry per rank (:func:`gather_per_rank`), each loadable with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class RngStateInCheckpoint(L.LightningModule):
    """Saves every rank's global RNG states in the checkpoint and puts them back just before the
    first training step after a resume."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every rank's global RNG states (torch, CUDA, numpy, Python): dropout and the
        training noise draw from them, so a resumed run continues the same random sequence.
        Lightning builds the checkpoint on every rank, so the gather runs on every rank."""
        checkpoint["rng_states"] = gather_per_rank(_rng_states())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng_states = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Put the saved RNG states back just before the first step after a resume (not at load:
        starting the DataLoader workers in between draws from the torch RNG)."""
        states = getattr(self, "_pending_rng_states", None)
        if states:
            _set_rng_states(states[self.global_rank if self.global_rank < len(states) else 0])
        self._pending_rng_states = None


def gather_per_rank(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` (``all_gather_object``; ``[value]`` without a
    process group): per-rank state for a checkpoint, which Lightning builds on every rank."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, value)
        return gathered
    return [value]


def _rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain lists (loadable with ``weights_only=True``,
    which LightningCLI uses to read a checkpoint's hyperparameters)."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(state), gauss]}


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
