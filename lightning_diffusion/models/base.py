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

import math
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_diffusion.encodings import attribute_labels
from lightning_diffusion.models.rng_state import RngStateInCheckpoint, gather_per_rank  # noqa: F401 - importable from here as before
from lightning_diffusion.models.sharding import Sharded
from lightning_diffusion.nets.embedding import ClassEmbedding
from lightning_diffusion.options import check_call, check_number
from lightning_diffusion.seeds import derived_seed

#: the contract's arguments of ``sample`` and ``bits_per_dim``: every family takes them, none is an option
SAMPLE_ARGUMENTS = ("num_samples", "y", "generator")
BPD_ARGUMENTS = ("x", "y", "generator")


class GenerativeModel(RngStateInCheckpoint, Sharded):
    """Base LightningModule of the model families.

    Subclasses implement ``loss(batch, generator=None) -> Tensor`` (a scalar), ``sample`` and
    ``bits_per_dim`` (and, to check options before training, ``check_sample_options`` /
    ``check_bpd_options``); the base logs the losses, refuses non-finite ones with a clear error,
    configures AdamW with linear warm-up and gradient-norm clipping, keeps the RNG states in the
    checkpoint (:class:`~lightning_diffusion.models.rng_state.RngStateInCheckpoint`) and shards the
    model with FSDP2 under ``ModelParallelStrategy`` (:class:`~lightning_diffusion.models.sharding.Sharded`).
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
        self._check_label_embedding(net)
        kind, data = getattr(net, "data_kind", None), _data_kind(self.data_shape)
        if kind is None or data is None or kind == data or data not in self.data_nets:
            return
        takes = "points [D]" if kind == "points" else "images [C, H, W]"
        shape = "x".join(map(str, self.data_shape))
        described = f"{shape} images" if data == "images" else f"points of dimension {shape}"
        name, class_path = self.data_nets[data]
        raise ValueError(f"{type(self).__name__}: the net {type(net).__name__} takes {takes}, but the data are "
                         f"{described}: use {name} (class_path: {class_path})")

    def _check_label_embedding(self, net: Any) -> None:
        """Refuse a net whose label embedding (a
        :class:`~lightning_diffusion.nets.embedding.ClassEmbedding` anywhere in it, e.g. inside an
        EnergyHead) does not take the labels this model feeds it: per attribute with
        ``label_attributes`` (its ``num_classes`` the same list), one label otherwise."""
        attributes = getattr(self, "label_attributes", None)
        for module in net.modules() if isinstance(net, torch.nn.Module) else ():
            if isinstance(module, ClassEmbedding) and isinstance(module.num_classes, list) != (attributes is not None) \
                    or isinstance(module, ClassEmbedding) and attributes is not None and module.num_classes != attributes:
                raise ValueError(f"{type(self).__name__}: label_attributes={attributes} but the net's label embedding "
                                 f"has num_classes={module.num_classes}; give the net num_classes: "
                                 f"{attributes if attributes is not None else self.num_classes} (one count per attribute "
                                 "with label_attributes, the number of classes without)")

    # -- checking sampling and likelihood options before they are used ------------------------
    def check_sample_options(self, **options: Any) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless
        ``sample(n, **options)`` accepts ``options``, read from :meth:`sample`'s signature
        (:func:`~lightning_diffusion.options.check_call`: its names, ``Literal`` choices and bounds),
        then :meth:`check_option_rules`. :meth:`sample` calls it first; the callbacks call it on their
        ``sample_options`` before training, so a bad option stops the run then."""
        check_call(self.sample, options, f"{type(self).__name__}.sample", skip=SAMPLE_ARGUMENTS)
        self.check_option_rules(options)

    def check_bpd_options(self, **options: Any) -> None:
        """Raise :class:`~lightning_diffusion.errors.OptionError` unless
        ``bits_per_dim(x, **options)`` accepts ``options``, read from :meth:`bits_per_dim`'s signature
        (its first check; Likelihood's before training)."""
        check_call(self.bits_per_dim, options, f"{type(self).__name__}.bits_per_dim", skip=BPD_ARGUMENTS)

    def check_option_rules(self, options: dict[str, Any]) -> None:
        """What a signature cannot say about ``sample``'s options (guidance needs a class-conditional
        model, ...): a family with such a rule overrides this. Here: ``guidance_scale``, where given."""
        if "guidance_scale" in options:
            self.check_guidance(options["guidance_scale"])

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

    def set_conditioning(self, class_conditional: bool, label_dropout: float,
                         label_attributes: list[int] | None = None) -> None:
        """Check and set ``class_conditional`` (feed the batch's labels to the net: needs
        ``num_classes``), ``label_dropout`` (a probability) and ``label_attributes`` (per-attribute
        labels: :meth:`condition_labels`), the attributes that :meth:`training_labels` and
        :meth:`check_guidance` read; every class-conditional family's ``__init__`` calls it."""
        name = type(self).__name__
        if class_conditional and self.num_classes is None:
            raise ValueError(f"{name}: class_conditional=True needs num_classes (labelled data)")
        if isinstance(label_dropout, bool) or not isinstance(label_dropout, (int, float)) \
                or not 0 <= label_dropout <= 1:
            raise ValueError(f"{name}: label_dropout={label_dropout!r} must be a probability in [0, 1] "
                             "(Ho & Salimans use 0.1 or 0.2)")
        if label_attributes is not None:
            sizes = list(label_attributes)
            if not class_conditional:
                raise ValueError(f"{name}: label_attributes={sizes} splits the labels the net is conditioned on, but "
                                 "class_conditional is false; set class_conditional: true (or drop label_attributes)")
            if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
                raise ValueError(f"{name}: label_attributes={sizes} must list one class count >= 1 per attribute "
                                 "(colour_digits: [10, 8], digit and colour)")
            if self.num_classes is not None and math.prod(sizes) != self.num_classes:
                raise ValueError(f"{name}: label_attributes={sizes} has {math.prod(sizes)} joint classes, but the data "
                                 f"have num_classes={self.num_classes}; the product of the counts must be the number "
                                 "of classes (colour_digits: [10, 8] for 80)")
            label_attributes = sizes
        self.class_conditional, self.label_dropout = class_conditional, label_dropout
        self.label_attributes = label_attributes

    def condition_labels(self, y: Tensor | None, check: bool = True) -> Tensor | None:
        """The labels the net takes: ``y`` itself, or with ``label_attributes`` ``[n_0, n_1, ...]`` the
        per-attribute labels ``[B, k]`` of joint labels ``[B]`` (mixed radix, the first attribute
        most significant: ``colour_digits``' ``digit * 8 + colour`` with ``[10, 8]`` is
        ``[digit, colour]``; :func:`~lightning_diffusion.encodings.attribute_labels`); ``[B, k]``
        labels pass as they are, -1 in a column is that attribute dropped. ``check``: range-check
        the labels (a device synchronisation)."""
        if y is None or getattr(self, "label_attributes", None) is None:
            return y
        return attribute_labels(y, self.label_attributes, check=check)

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
        y = self.condition_labels(batch["y"], check=False)  # per attribute: each column dropped on its own
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

    def eval_generator(self, batch: dict[str, Tensor], batch_idx: int) -> torch.Generator:
        """The generator of a validation/test step's noise: seeded from ``val_seed``, the batch and
        the rank (:func:`~lightning_diffusion.seeds.derived_seed`), the same in every epoch and run."""
        return torch.Generator(device=batch["x"].device).manual_seed(
            derived_seed(self.val_seed, batch_idx, self.global_rank))

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, split: str) -> Tensor:
        generator = self.eval_generator(batch, batch_idx)
        loss = self._checked(self.loss(batch, generator=generator), split, batch_idx)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True, batch_size=batch["x"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "test")

    def configure_optimizers(self):
        """AdamW with linear warm-up over ``warmup_steps``, then a constant learning rate."""
        # only the trained parameters: a frozen part (LatentDiffusion's first stage) stays out of the optimizer
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, betas=self.adam_betas,
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


def _data_kind(data_shape: tuple[int, ...] | None) -> str | None:
    """``"points"`` for ``[D]``, ``"images"`` for ``[C, H, W]``, None otherwise (or unknown)."""
    if data_shape is None:
        return None
    return {1: "points", 3: "images"}.get(len(data_shape))


def data_noise(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` on ``like``'s device/dtype, from ``generator`` if given."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)

