"""The thin base every model family shares: the model contract, data facts, logging, optimizer.

Contract (docs/architecture.md): ``sample(num_samples, *, y=None, generator=None, **options)``
returns samples in data space; ``bits_per_dim(x, **options)`` returns the per-sample negative
log-likelihood in bits per dimension; ``train/loss`` and ``val/loss`` are logged. Nothing here knows
how a family samples: the Gaussian-diffusion layer
(:mod:`~lightning_diffusion.models.gaussian_diffusion`) and the latent-variable layer
(:mod:`~lightning_diffusion.models.latent_variable`) sit on it, and so can an energy-based or a
discrete-diffusion family.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor


class GenerativeModel(L.LightningModule):
    """Base LightningModule of the model families.

    Subclasses implement ``loss(batch, generator=None) -> Tensor`` (a scalar), ``sample`` and
    ``bits_per_dim`` (and, to check options before training, ``check_sample_options`` /
    ``check_bpd_options``); the base logs the losses, refuses non-finite ones with a clear error,
    configures AdamW with linear warm-up and gradient-norm clipping, keeps the RNG states in the
    checkpoint and shards the model with FSDP2 under ``ModelParallelStrategy``.
    """

    #: options whose change makes a checkpoint's weights mean something else (a family adds its own:
    #: timesteps, parameterization, ...): a resume with ``--ckpt_path`` refuses them, with every net
    #: argument but ``dropout`` and any change of a parameter's shape (:mod:`lightning_diffusion.resume`)
    resume_fixed_hparams: tuple[str, ...] = ("data_shape",)

    def __init__(
        self,
        data_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 5000,
        grad_clip: float | None = 1.0,
        val_seed: int = 0,
    ):
        """
        Args:
            data_shape: shape of one sample: ``[C, H, W]`` for images, ``[D]`` for points. The CLI
                links it from the DataModule.
            num_classes: number of class labels in the data (None: unlabelled). Linked by the CLI.
            lr: AdamW peak learning rate (Ho et al. 2020: 2e-4 on CIFAR-10).
            weight_decay: AdamW decoupled weight decay.
            adam_betas: AdamW (beta1, beta2).
            warmup_steps: optimizer steps of linear learning-rate warm-up from 0 (Ho et al.: 5000).
            grad_clip: clip the global gradient norm to this value (Ho et al.: 1.0); None disables.
                ``trainer.gradient_clip_val``, when set, takes precedence.
            val_seed: seed of the noise drawn in validation/test, so ``val/loss`` is comparable
                between epochs and runs.
        """
        super().__init__()
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        self.num_classes = num_classes
        self.lr, self.weight_decay, self.adam_betas = lr, weight_decay, tuple(adam_betas)
        self.warmup_steps, self.grad_clip, self.val_seed = warmup_steps, grad_clip, val_seed

    def save_hyperparameters_except(self, *module_args: str) -> None:
        """``save_hyperparameters()`` of the caller's ``__init__``, without ``module_args`` objects.

        Built by LightningCLI, a module argument (the net) arrives as its config
        (``class_path``/``init_args``) and is kept, so ``load_from_checkpoint(path)`` rebuilds it.
        Built in Python, it is an ``nn.Module`` that the state dict already holds: it is left out and
        ``load_from_checkpoint(path, net=...)`` takes it again (Lightning's own advice).
        """
        import inspect

        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

        from_cli = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=None if from_cli else list(module_args),
                                  frame=inspect.currentframe().f_back)

    # -- facts about the data ---------------------------------------------------------------
    @property
    def is_image(self) -> bool:
        """True for image data ``[C, H, W]`` in [-1, 1]; False for points ``[D]``."""
        return self.data_shape is not None and len(self.data_shape) == 3

    def require_data_shape(self) -> tuple[int, ...]:
        if self.data_shape is None:
            raise ValueError(f"{type(self).__name__}: data_shape is not set; pass data_shape=(C, H, W) or (D,), "
                             "or let the CLI link it from the DataModule")
        return self.data_shape

    #: the family's net for each kind of data, ``{"images" | "points": (name, class_path)}``, named
    #: by :meth:`check_net`
    data_nets: dict[str, tuple[str, str]] = {}

    def setup(self, stage: str) -> None:
        """Before the first step (and the sanity check): :meth:`check_net`."""
        super().setup(stage)
        self.check_net(getattr(self, "net", None))

    def check_net(self, net: Any) -> None:
        """Refuse a net made for the other kind of data, naming both and the net to use.

        A net declares what it takes in ``data_kind`` (``"points"``: ``[B, D]``, ``"images"``:
        ``[B, C, H, W]``); nets without it (a user's) are not checked. Run in :meth:`setup`, not
        in ``__init__``: LightningCLI would bury an error of ``__init__`` in its own message."""
        kind, data = getattr(net, "data_kind", None), _data_kind(self.data_shape)
        if kind is None or data is None or kind == data or data not in self.data_nets:
            return
        takes = "points [D]" if kind == "points" else "images [C, H, W]"
        shape = "x".join(map(str, self.data_shape))
        described = f"{shape} images" if data == "images" else f"points of dimension {shape}"
        name, class_path = self.data_nets[data]
        raise ValueError(f"{type(self).__name__}: the net {type(net).__name__} takes {takes}, but the data are "
                         f"{described}: use {name} (class_path: {class_path})")

    # -- checking sampling and likelihood options before they are used ------------------------
    def check_sample_options(self, **options: Any) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless
        ``sample(n, **options)`` accepts ``options``. :meth:`sample` calls it first; the callbacks
        call it on their ``sample_options`` before training, so a bad option stops the run then."""

    def check_bpd_options(self, **options: Any) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless
        ``bits_per_dim(x, **options)`` accepts ``options`` (its first check; Likelihood's before
        training)."""

    def preview_sample_options(self) -> dict[str, Any]:
        """Options of ``sample`` for a quick look during training: the fast sampler of the callbacks'
        preview-sampler rule (docs/architecture.md, Contracts, ``preview_sample_options``). ``sample``'s own default stays the
        paper's sampler. Here ``{}``: the model's own default (a family whose default is slow
        overrides it; VAEs, HVAEs and the EBM keep ``{}``)."""
        return {}

    # -- the contract -----------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Scalar training loss of a batch dict; ``generator`` fixes the noise (validation)."""
        raise NotImplementedError

    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               **options: Any) -> Tensor:
        """``num_samples`` samples in data space (images in [-1, 1])."""
        raise NotImplementedError

    def bits_per_dim(self, x: Tensor, **options: Any) -> Tensor:
        """Negative log-likelihood (or its bound) of each sample of ``x``, in bits per dimension."""
        raise NotImplementedError

    def set_conditioning(self, class_conditional: bool, label_dropout: float) -> None:
        """Check and set ``class_conditional`` (feed the batch's labels to the net: needs
        ``num_classes``) and ``label_dropout`` (a probability), the attributes that
        :meth:`training_labels` and :meth:`check_guidance` read; every class-conditional family's
        ``__init__`` calls it."""
        name = type(self).__name__
        if class_conditional and self.num_classes is None:
            raise ValueError(f"{name}: class_conditional=True needs num_classes (labelled data)")
        if isinstance(label_dropout, bool) or not isinstance(label_dropout, (int, float)) \
                or not 0 <= label_dropout <= 1:
            raise ValueError(f"{name}: label_dropout={label_dropout!r} must be a probability in [0, 1] "
                             "(Ho & Salimans use 0.1 or 0.2)")
        self.class_conditional, self.label_dropout = class_conditional, label_dropout

    def check_guidance(self, guidance_scale: float) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless ``guidance_scale`` is a number,
        and 1 (no guidance) for a model that is not ``class_conditional``."""
        from lightning_diffusion.errors import OptionError

        check_number("guidance_scale", guidance_scale)
        if guidance_scale != 1.0 and not getattr(self, "class_conditional", False):
            raise OptionError("guidance_scale", guidance_scale,
                              f"classifier-free guidance needs a class_conditional {type(self).__name__}",
                              "use guidance_scale 1.0, or train with class_conditional: true")

    def training_labels(self, batch: dict[str, Tensor], generator: torch.Generator | None) -> Tensor | None:
        """The labels a class-conditional family feeds its net: None unless ``class_conditional``;
        in training each label becomes the null label -1 with probability ``label_dropout``
        (classifier-free guidance, Ho & Salimans 2022). Generic to every family with the attributes
        ``class_conditional`` and ``label_dropout``: -1 is the contract's "no label" in ``sample(y=...)``
        too."""
        if not getattr(self, "class_conditional", False):
            return None
        if "y" not in batch:
            raise KeyError(f"{type(self).__name__}: class_conditional=True but the batch has no key 'y'")
        y = batch["y"]
        if self.training and self.label_dropout > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, -1), y)
        return y

    # -- Lightning hooks ----------------------------------------------------------------------
    def _checked(self, loss: Tensor, split: str, batch_idx: int) -> Tensor:
        if not torch.isfinite(loss):
            held = self._checkpoint_note()
            raise FloatingPointError(
                f"{split}/loss is {loss.item()} at global step {self.global_step}, batch {batch_idx}; "
                f"the parameters before this step are intact ({held}). "
                "Lower model.lr, check the data for NaN/Inf, or set trainer.detect_anomaly=true to find the op."
            )
        return loss

    def _checkpoint_note(self) -> str:
        """Where the parameters of an earlier step are, for the message of a run stopped by a guard:
        the last checkpoint written, or that there is none yet (and the one the run resumed from)."""
        checkpoint = self._written_checkpoint()
        if checkpoint:
            return f"the last checkpoint written, {checkpoint}, holds parameters of an earlier step"
        resumed = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return "no checkpoint has been written yet in this run" + (f"; it resumed from {resumed}" if resumed else "")

    def _written_checkpoint(self) -> str | None:
        """The newest checkpoint file the trainer's checkpoint callback has written (last, else best),
        if it exists on disk; None without a trainer, a checkpoint callback or a written file."""
        import os

        trainer = self._trainer
        callback = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
        if callback is None:
            return None
        for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
            if path and os.path.exists(path):
                return str(path)
        return None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._checked(self.loss(batch), "train", batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, split: str) -> Tensor:
        generator = torch.Generator(device=batch["x"].device)
        generator.manual_seed(self.val_seed * 1_000_003 + batch_idx * 7919 + self.global_rank)
        loss = self._checked(self.loss(batch, generator=generator), split, batch_idx)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True, batch_size=batch["x"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "test")

    # -- exact resume: the global RNG states of every rank travel in the checkpoint --------------
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

    # -- sharding: ModelParallelStrategy (FSDP2) calls this on every rank before the optimizer ----
    #: methods of ``self.net`` that the family calls besides ``forward`` (a VAE's encode/decode);
    #: FSDP2 must gather the net's own parameters around them too
    fsdp_forward_methods: tuple[str, ...] = ()

    def is_sharded(self) -> bool:
        """True when FSDP2 has sharded this model over more than one rank: every forward then needs
        all ranks, so adaptive solvers (different step counts per rank) would hang."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:
            return False
        return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1 and \
            any(isinstance(m, FSDPModule) for m in self.modules())

    def require_fixed_steps(self, what: str, instead: str) -> None:
        """Refuse an adaptive solver (``what``) on a sharded model, naming the alternative."""
        if self.is_sharded():
            raise ValueError(f"{type(self).__name__}.{what} is adaptive: its number of network calls differs "
                             f"between ranks, which a sharded (FSDP) model cannot do; use {instead}")

    def configure_model(self) -> None:
        """Shard the model with FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``.

        Units, innermost first: every parameter-holding element of an ``nn.ModuleList`` inside the
        net (UNet and ladder blocks, MLP residual blocks: one all-gather per block, so at most one
        block is unsharded at a time), then each child module of this LightningModule that holds
        parameters (the net; a VAE's likelihood head), with ``fsdp_forward_methods`` registered so
        that calls other than ``forward`` gather their parameters as well. Under DDP or on one
        device (no device mesh) this does nothing. Tensor parallelism is not supported: pass
        ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``.
        """
        mesh = self._device_mesh if hasattr(self, "_device_mesh") else None
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"{type(self).__name__}: tensor parallelism is not supported; use "
                             "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)")
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        if any(isinstance(m, FSDPModule) for m in self.modules()):
            return  # already sharded (configure_model runs again on a resumed or re-fitted model)
        containers = (torch.nn.ModuleList, torch.nn.ModuleDict)  # no forward: never a unit
        roots = [m for m in self.children() if any(True for _ in m.parameters())]
        for root in roots:
            blocks = [m for parent in root.modules() if isinstance(parent, torch.nn.ModuleList) for m in parent
                      if not isinstance(m, containers) and any(True for _ in m.parameters())]
            for block in reversed(blocks):  # pre-order reversed: nested blocks before their parents
                fully_shard(block, mesh=dp_mesh)
            fully_shard(root, mesh=dp_mesh)
        for name in self.fsdp_forward_methods:
            register_fsdp_forward_method(self.net, name)

    def configure_optimizers(self):
        """AdamW with linear warm-up over ``warmup_steps``, then a constant learning rate."""
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=self.adam_betas,
                                      weight_decay=self.weight_decay)
        warmup = max(self.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        self._optimizer_from_options = optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Set the optimizer's ``lr``, ``adam_betas`` and ``weight_decay`` from this model's options.

        On resume Lightning loads the optimizer and scheduler state after ``configure_optimizers``,
        and with it the old run's learning rate: an ``lr`` changed on the command line would be
        dropped. Here (after the restore) the param groups and the warm-up schedule's base rate take
        the current options; the schedule's step count stays the checkpoint's. Without a resume this
        sets the values they already have.
        """
        optimizer = getattr(self, "_optimizer_from_options", None)
        trainer_optimizers = self.trainer.optimizers if self._trainer is not None else []
        if optimizer is None or optimizer not in trainer_optimizers:
            return  # a subclass's own optimizer: its options are its own business
        for group in optimizer.param_groups:
            group.update(initial_lr=self.lr, betas=self.adam_betas, weight_decay=self.weight_decay)
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                scheduler.base_lrs = [self.lr] * len(optimizer.param_groups)
                lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
                for group, lr in zip(optimizer.param_groups, lrs):
                    group["lr"] = lr
                scheduler._last_lr = lrs

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val is None and self.grad_clip is not None:
            gradient_clip_val, gradient_clip_algorithm = self.grad_clip, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)


def full_precision(bits_per_dim: Callable) -> Callable:
    """Decorator: run a likelihood method with autocast off and at least float32 data, whatever the caller's
    precision (``bf16-mixed`` trains in bf16; a log-likelihood summed over thousands of terms or an
    ODE integrated over t needs float32 at least, and the schedule math is float64 already)."""
    import functools

    @functools.wraps(bits_per_dim)
    def wrapper(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            low = x.dtype in (torch.float16, torch.bfloat16)  # float32/float64 data stay as they are
            return bits_per_dim(self, x.float() if low else x, *args, **kwargs)

    return wrapper


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


def _data_kind(data_shape: tuple[int, ...] | None) -> str | None:
    """``"points"`` for ``[D]``, ``"images"`` for ``[C, H, W]``, None otherwise (or unknown)."""
    if data_shape is None:
        return None
    return {1: "points", 3: "images"}.get(len(data_shape))


def check_number(option: str, value: Any, *, least: float | None = None, integer: bool = False,
                 optional: bool = False, above: bool = False) -> None:
    """Raise :class:`~lightning_diffusion.errors.OptionError` unless ``value`` is a
    number (an integer with ``integer``; None with ``optional``) ``>= least`` (``> least`` with
    ``above``)."""
    from lightning_diffusion.errors import OptionError

    if optional and value is None:
        return
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    in_range = is_number and not isinstance(value, bool) and \
        (least is None or (value > least if above else value >= least))
    if not in_range:
        kind = "an integer" if integer else "a number"
        bound = "" if least is None else f" {'>' if above else '>='} {least:g}"
        raise OptionError(option, value, f"must be {kind}{bound}" + (" or None" if optional else ""))


def check_option_names(owner: str, options: dict[str, Any], accepted: tuple[str, ...]) -> None:
    """Raise :class:`~lightning_diffusion.errors.OptionError` for the first option of
    ``options`` that ``owner`` (e.g. ``VAE.sample``) does not take, with the closest accepted name."""
    import difflib

    from lightning_diffusion.errors import OptionError

    for option, value in options.items():
        if option not in accepted:
            close = difflib.get_close_matches(option, accepted, n=1)
            raise OptionError(option, value, f"{owner} has no option {option!r}"
                              + (f" (did you mean {close[0]}?)" if close else ""),
                              f"its options are {', '.join(accepted)}")


def data_noise(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device/dtype, from ``generator`` if given."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)

