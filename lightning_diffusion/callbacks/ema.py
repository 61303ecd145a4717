"""EMA: an exponential moving average of the parameters, used for every evaluation.

Why our own callback rather than Lightning's ``WeightAveraging``/``EMAWeightAveraging``: that one
keeps a deep copy of the whole LightningModule (an ``AveragedModel``), which FSDP cannot shard,
swaps only around validation (not test, predict, or sampling from other callbacks), writes the
*average* into the checkpoint's ``state_dict`` and copies it over the trained weights when
training ends. Here the average is one shadow tensor per parameter, made with ``detach().clone()``:
under DDP each rank holds the same full copy; under ``ModelParallelStrategy`` (FSDP2) a parameter
is a DTensor shard and so is its shadow, sharded exactly like the parameter. The checkpoint keeps
the raw weights in ``state_dict`` (what the optimizer state belongs to) and the averages in this
callback's state, so both come back bit for bit on resume.

Other callbacks and commands get the evaluation weights through :func:`evaluation_weights`, which
swaps the averages in (unless they already are) and says which weights were used.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import lightning as L
import torch
from torch import Tensor, nn

from lightning_diffusion.modes import evaluating


def ema_decay(step: int, decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """EMA decay after ``step`` optimizer steps, with warm-up:
    ``min(decay, 1 - (1 + step / inv_gamma) ** -power)``, 0 at step 0 (the average starts as a copy).

    ``power = 2/3`` suits runs of ~1M steps, ``3/4`` shorter ones (at ``inv_gamma = 1`` the
    decay reaches 0.999 at ~31.6K steps for 2/3 and ~10K for 3/4).
    """
    if step <= 0:
        return 0.0
    return min(decay, 1.0 - (1.0 + step / inv_gamma) ** -power)


def averaged_parameters(module: nn.Module) -> dict[str, Tensor]:
    """The parameters the EMA averages: every trained (``requires_grad``; not LatentDiffusion's frozen first
    stage) floating-point parameter, by its qualified name
    (buffers, e.g. a schedule's constants, are not trained and are left alone).

    Under FSDP2 these are the sharded parameters: FSDP2 leaves the root unit's parameters
    unsharded after a forward without backward (sampling, evaluation), so that is undone first."""
    reshard(module)
    return {name: p for name, p in module.named_parameters() if p.dtype.is_floating_point and p.requires_grad}


def reshard(module: nn.Module) -> None:
    """Register the sharded parameters of every FSDP2 unit in ``module`` again (no-op otherwise)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class EMA(L.Callback):
    """Exponential moving average of the model's parameters (Polyak averaging).

    Every ``update_every`` optimizer steps: ``ema <- d ema + (1 - d) theta`` with
    ``d = min(decay, 1 - (1 + step / inv_gamma) ** -power)``. Validation, test and predict run on
    the averages (``evaluate_with="ema"``), as do the sample-quality, likelihood and sample-logging
    callbacks through :func:`evaluation_weights`. ``val/ema`` (1 or 0) logs which weights
    validation used.

    Defaults: ``decay = 0.9999`` (Ho et al. 2020; Song et al. 2021), warm-up power 2/3.
    """

    def __init__(self, decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 2 / 3,
                 update_every: int = 1, evaluate_with: str = "ema"):
        """
        Args:
            decay: the largest decay per update (0.9999: an average over ~10K updates).
            inv_gamma: warm-up time scale in optimizer steps (see :func:`ema_decay`).
            power: warm-up exponent (2/3 for long runs, 3/4 for short ones).
            update_every: update the average every this many optimizer steps (the decay is then
                applied once per update, as computed at the current step).
            evaluate_with: ``"ema"`` (default) or ``"raw"``: the weights validation, test, predict
                and the evaluation callbacks use.
        """
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA: update_every must be >= 1, got {update_every}")
        if evaluate_with not in ("ema", "raw"):
            raise ValueError(f"EMA: evaluate_with must be 'ema' or 'raw', got {evaluate_with!r}")
        self.decay, self.inv_gamma, self.power = decay, inv_gamma, power
        self.update_every, self.evaluate_with = update_every, evaluate_with
        self.shadow: dict[str, Tensor] | None = None
        self.num_updates = 0  # updates applied so far
        self.last_step = -1  # global step of the last update
        self._raw: dict[str, Tensor] | None = None  # the trained weights while the averages are swapped in
        self._pending: dict[str, Tensor] | None = None  # loaded from a checkpoint, placed on first use

    # -- the average ----------------------------------------------------------------------------
    def _ensure(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        params = averaged_parameters(pl_module)
        if self.shadow is None:
            if self._pending is not None:
                missing = sorted(set(params) - set(self._pending))
                if missing:
                    raise KeyError(f"EMA: the checkpoint's averages lack parameters {missing[:5]}; was it written for "
                                   "another model?")
                self.shadow = {n: _like(self._pending[n], p) for n, p in params.items()}
                self._pending = None
            else:
                self.shadow = {n: p.detach().clone() for n, p in params.items()}
        return self.shadow

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule, step: int) -> None:
        """Fold the current parameters into the average at optimizer step ``step``."""
        shadow = self._ensure(pl_module)
        d = ema_decay(step, self.decay, self.inv_gamma, self.power)
        params = averaged_parameters(pl_module)
        names = list(shadow)
        torch._foreach_lerp_([shadow[n] for n in names], [params[n].detach() for n in names], 1.0 - d)
        self.num_updates += 1
        self.last_step = step

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError("EMA does not support FSDPStrategy (FSDP1: its flat parameters are saved from rank zero "
                             "only); use ModelParallelStrategy (FSDP2), where the averages are sharded like the "
                             "parameters")
        self._ensure(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps taken; unchanged on gradient-accumulation batches
        if step != self.last_step and step % self.update_every == 0:
            self.update(pl_module, step)

    # -- swapping ---------------------------------------------------------------------------------
    @property
    def swapped(self) -> bool:
        """True while the averages are in the model."""
        return self._raw is not None

    @torch.no_grad()
    def swap_in(self, pl_module: L.LightningModule) -> None:
        """Put the averages into the model, keeping the trained weights aside."""
        if self.swapped:
            return
        shadow = self._ensure(pl_module)
        params = averaged_parameters(pl_module)
        self._raw = {n: p.detach().clone() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(shadow[n])

    @torch.no_grad()
    def swap_out(self, pl_module: L.LightningModule) -> None:
        """Put the trained weights back."""
        if not self.swapped:
            return
        for n, p in averaged_parameters(pl_module).items():
            p.copy_(self._raw[n])
        self._raw = None

    def _evaluation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluate_with == "ema":
            self.swap_in(pl_module)

    def _evaluation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out(pl_module)

    on_validation_start = on_test_start = on_predict_start = _evaluation_start
    on_validation_end = on_test_end = on_predict_end = _evaluation_end

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("val/ema", float(self.swapped), sync_dist=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.swap_out(pl_module)  # never leave the averages in place of the trained weights

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Full tensors: under FSDP2 only rank zero writes this state (into the checkpoint's
        # meta.pt), so each shard is all-gathered first. Lightning builds the checkpoint dict on
        # every rank, so this collective runs everywhere. Memory: one full copy, transiently.
        shadow = self.shadow if self.shadow is not None else self._pending
        return {"shadow": None if shadow is None else {n: _full(t) for n, t in shadow.items()},
                "num_updates": self.num_updates, "last_step": self.last_step,
                "decay": self.decay, "inv_gamma": self.inv_gamma, "power": self.power,
                "update_every": self.update_every}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates, self.last_step = state_dict["num_updates"], state_dict["last_step"]
        if state_dict.get("shadow") is not None:
            self._pending, self.shadow = dict(state_dict["shadow"]), None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.swapped:  # a checkpoint written mid-evaluation: its state_dict must hold the trained weights
            checkpoint["state_dict"].update({n: t.detach().clone() for n, t in self._raw.items()})


def _full(t: Tensor) -> Tensor:
    """A detached full copy of ``t`` (all-gathered if it is a DTensor shard)."""
    if type(t) is not torch.Tensor and hasattr(t, "full_tensor"):
        return t.detach().full_tensor().clone()
    return t.detach().clone()


def _like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (from a checkpoint) as a tensor laid out like ``param`` (device, dtype; a DTensor
    shard if ``param`` is one)."""
    if type(param) is not torch.Tensor and hasattr(param, "device_mesh"):  # DTensor (FSDP2)
        if type(value) is type(param):
            return value.to(param.device).detach().clone()
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value.detach().to(param.device, param.dtype).clone()


def find_ema(trainer: L.Trainer | None) -> EMA | None:
    """The trainer's EMA callback, if any."""
    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)


@contextlib.contextmanager
def evaluation_weights(trainer: L.Trainer | None, pl_module: nn.Module) -> Iterator[str]:
    """Run the body as evaluation runs and yield the name of the weights, ``"ema"`` or ``"raw"``.

    The module is in eval mode for the body (dropout off, batch-norm statistics frozen, as in
    validation; its training mode comes back after), so a model need not switch modes itself in
    ``sample`` or ``bits_per_dim``. With an :class:`EMA` callback (``evaluate_with="ema"``) the
    averages are swapped in for the body, unless they already are (inside validation); without one
    the raw weights are used. Without a trainer the module is evaluated with the weights it holds,
    named by its ``held_weights`` attribute (``"ema"`` where
    :func:`~lightning_diffusion.commands.load_model` loaded the averages into it; default ``"raw"``). Gradients are left as they are: callers that need none add
    ``torch.no_grad()``.

    Args:
        trainer: the trainer whose :class:`EMA` callback holds the averages; None: raw weights.
        pl_module: the model to evaluate.
    """
    ema = find_ema(trainer)
    with evaluating(pl_module, no_grad=False):
        if trainer is None:
            yield str(getattr(pl_module, "held_weights", "raw"))
        elif ema is None or ema.evaluate_with == "raw":
            yield "raw"
        elif ema.swapped:
            yield "ema"
        else:
            ema.swap_in(pl_module)
            try:
                yield "ema"
            finally:
                ema.swap_out(pl_module)


def ema_state_from_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """The EMA averages stored in a Lightning checkpoint dict, by parameter name (None if the run
    had no :class:`EMA` callback)."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).split("{")[0] == EMA.__qualname__ and isinstance(state, Mapping) and state.get("shadow"):
            return dict(state["shadow"])
    return None


@torch.no_grad()
def load_ema_weights(module: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Copy a checkpoint's EMA averages into ``module``'s parameters; False if it has none."""
    shadow = ema_state_from_checkpoint(checkpoint)
    if shadow is None:
        return False
    params = averaged_parameters(module)
    missing = sorted(set(params) - set(shadow))
    if missing:
        raise KeyError(f"the checkpoint's EMA averages lack parameters {missing[:5]}")
    for n, p in params.items():
        p.copy_(shadow[n].to(p.device, p.dtype))
    return True
