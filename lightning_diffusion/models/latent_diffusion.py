"""Latent diffusion (Rombach et al. 2022) over a frozen first stage, with a bound on the data's likelihood.

A trained first stage (:class:`~lightning_diffusion.models.first_stage.FirstStage`: ``VAE``, ``HierarchicalVAE``, ``VQVAE``) is
loaded strictly from its checkpoint and frozen; a prior of any family (``DDPM`` or ``ScoreSDE`` over
continuous latents) models its latents, scaled by ``1 / std`` of the first training batch's latents
(Rombach et al.'s ``scale_by_std``). ``bits_per_dim`` is LSGM's bound (Vahdat et al. 2021)

    -log p(x) <= E_q[-log p(x | z) + log q(z | x)] - log p(z),   -log p(z) = -log p_prior(s z) - d log s,

one draw of z, the prior's own estimator for ``-log p_prior`` (DDPM: VLB; ScoreSDE: ODE), in bits per
DATA dimension. The prior's bound over the latents alone is no bound on the data's NLL: it misses the
decoder's ``-log p(x | z)``, the encoder's entropy and the scale's log-Jacobian.

The checkpoint is self-contained: the first stage's weights are part of this model's state dict
(``first_stage.*``) and its class and hyperparameters are saved as ``first_stage_hparams``, so
``lightning-diffusion sample`` / ``evaluate`` and a resume need no first-stage file. The copy costs the
first stage's size once more on disk; a checkpoint that needed the first stage's file would break
when that file moved or was retrained.
"""

from __future__ import annotations

import copy
import json
import io
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusion.likelihoods import nats_to_bits_per_dim
from lightning_diffusion.models.base import GenerativeModel, full_precision
from lightning_diffusion.models.first_stage import FirstStage
from lightning_diffusion.modes import evaluating


class LatentDiffusion(GenerativeModel):
    """A prior of any family over the latents of a frozen first stage (latent diffusion, LSGM's bound).

    Training: ``z ~ q(z | x)`` without gradients, then the prior's loss on ``latent_scale * z``.
    ``sample`` draws the prior's samples (every sampler and option of the prior), divides by the scale
    and decodes them (:meth:`FirstStage.decode_latents`: a VAE gives its decoder's mean).
    """

    #: options whose change makes the checkpoint's weights mean something else: a resume refuses them (the
    #: first stage's file and hyperparameters too: its weights are this checkpoint's, so another file given on
    #: resume would be silently ignored); the prior's own are refused by its rules (:attr:`resume_nested_models`)
    resume_fixed_hparams = ("data_shape", "scale_by_std", "first_stage_ckpt", "first_stage_hparams")

    def __init__(self, first_stage_ckpt: str, prior: dict, scale_by_std: bool | None = None,
                 first_stage_hparams: str | None = None, **kwargs: Any):
        """
        Args:
            first_stage_ckpt: path of the first stage's checkpoint (a ``VAE``, ``HierarchicalVAE`` (its top
                group is the latent) or ``VQVAE`` run's ``.ckpt``), loaded strictly: every key of the model, or an error naming the missing and unexpected
                keys and the file. Its class and hyperparameters come from the checkpoint; its
                ``data_shape`` must be the data's. It is frozen (eval mode, no gradients, not in the
                optimizer, not averaged by EMA).
            prior: the model of the latents, any family (``DDPM`` / ``ScoreSDE`` over continuous
                latents; ``DiscreteDiffusion`` with ``num_categories = K`` and a sequence net over the
                codes of a VQ first stage, flattened to a sequence), given as a nested ``class_path``
                config. Its ``data_shape`` is set to the first stage's ``latent_shape`` (codes: its
                number of positions; a given one must equal it); its net must take that shape (an
                ``MLP`` with ``in_channels = latent_dim`` for a VAE's vector latents). A
                class-conditional prior takes the data's labels (its ``num_classes`` must be the data's).
            scale_by_std: multiply the latents by ``1 / std`` of the first training batch's latents
                (all ranks; Rombach et al.), kept in the checkpoint (buffer ``latent_scale``) and fixed
                on resume; False: scale 1. None (default): True for continuous latents, False for
                codes (which are not scaled; True is refused there).
            first_stage_hparams: the first stage's class and hyperparameters as JSON; filled in from
                ``first_stage_ckpt`` and saved, so this model's checkpoint rebuilds the first stage
                without that file (its weights are in this checkpoint). Leave it unset. (A string, not a
                dict: jsonargparse would build the nested net configs of a dict into objects.)
            **kwargs: data facts and optimizer settings of :class:`GenerativeModel` (the optimizer
                sees the prior's parameters only).
        """
        super().__init__(**kwargs)
        self.save_hyperparameters_except("prior")
        if first_stage_hparams is None:
            self.first_stage, stage_hparams = load_first_stage(first_stage_ckpt)
            first_stage_hparams = json.dumps(stage_hparams)
        else:  # rebuilt from this model's own checkpoint: the weights come with its state dict
            self.first_stage = build_first_stage(json.loads(first_stage_hparams), first_stage_ckpt)
        prior_config = _with_overrides(prior) if isinstance(prior, dict) else None
        for hparams in (self.hparams, getattr(self, "_hparams_initial", None)):
            if hparams is not None:
                hparams["first_stage_hparams"] = first_stage_hparams
                if prior_config is not None and "prior" in hparams:  # the command line's overrides in place
                    hparams["prior"] = copy.deepcopy(prior_config)
        self.first_stage.eval().requires_grad_(False)
        stage_shape = getattr(self.first_stage, "data_shape", None)
        if self.data_shape is not None and stage_shape is not None and tuple(stage_shape) != tuple(self.data_shape):
            raise ValueError(f"LatentDiffusion: the first stage of {first_stage_ckpt} was trained on data of shape "
                             f"{list(stage_shape)} (channels, height, width), but the data are {list(self.data_shape)}; "
                             "train the first stage on this dataset, or choose the data it was trained on")
        if self.data_shape is None and stage_shape is not None:
            self.data_shape = tuple(stage_shape)
        categories = getattr(self.first_stage, "latent_categories", None)
        self.latent_categories = None if categories is None else int(categories)
        if self.latent_categories is not None and scale_by_std:
            raise ValueError(f"LatentDiffusion: scale_by_std=True, but the first stage of {first_stage_ckpt} has "
                             f"discrete codes ({self.latent_categories} categories), which are not scaled; leave "
                             "scale_by_std out")
        scale_by_std = self.latent_categories is None if scale_by_std is None else scale_by_std
        self.latent_shape = tuple(int(n) for n in self.first_stage.latent_shape)
        #: the prior's data: the latents, or the codes as one sequence
        self.prior_shape = self.latent_shape if self.latent_categories is None else (math.prod(self.latent_shape),)
        self.prior = build_prior(prior_config, self.prior_shape) if prior_config is not None else prior
        self._fit_prior(self.prior)
        self.scale_by_std = scale_by_std
        # NaN: not estimated yet (the first training batch estimates it); a buffer, so it is in the checkpoint
        self.register_buffer("latent_scale", torch.tensor(math.nan if scale_by_std else 1.0, dtype=torch.float64))

    def _fit_prior(self, prior: nn.Module) -> None:
        """Give the prior the latents' shape and the data's classes; refuse a prior made for others."""
        if not isinstance(prior, GenerativeModel):
            raise ValueError(f"LatentDiffusion: prior must be a model family (DDPM, ScoreSDE, ...), got "
                             f"{type(prior).__name__}")
        given = getattr(prior, "data_shape", None)
        if given is not None and tuple(given) != self.prior_shape:
            raise ValueError(f"LatentDiffusion: the prior's data_shape {list(given)} is not the first stage's "
                             f"latent_shape {list(self.prior_shape)}; leave the prior's data_shape out")
        prior.data_shape = self.prior_shape
        prior_categories = getattr(prior, "num_categories", None)
        if prior_categories != self.latent_categories:
            what = "continuous latents" if self.latent_categories is None else f"{self.latent_categories} codes"
            raise ValueError(f"LatentDiffusion: the first stage has {what}, but the prior takes "
                             f"{'floats' if prior_categories is None else f'{prior_categories} categories'}; use "
                             + ("a DDPM or ScoreSDE prior" if self.latent_categories is None else
                                f"a DiscreteDiffusion prior with num_categories: {self.latent_categories}"))
        classes = getattr(prior, "num_classes", None)
        if getattr(prior, "class_conditional", False) and classes != self.num_classes:
            raise ValueError(f"LatentDiffusion: the class-conditional prior has num_classes={classes}, but the data "
                             f"have {self.num_classes}; set the prior's num_classes to {self.num_classes}")
        in_channels = getattr(getattr(prior, "net", None), "in_channels", None)
        if len(self.latent_shape) == 1 and isinstance(in_channels, int) and in_channels != self.latent_shape[0]:
            raise ValueError(f"LatentDiffusion: the prior's net takes in_channels={in_channels}, but the latents have "
                             f"{self.latent_shape[0]} dimensions; build it with in_channels: {self.latent_shape[0]}")

    @property
    def resume_nested_models(self) -> dict[str, nn.Module]:
        """The option holding the prior's config, whose changes on resume the prior's own rules judge
        (:func:`~lightning_diffusion.resume.is_fixed`: its class, its ``resume_fixed_hparams``, its net)."""
        return {"prior": self.prior}

    # -- the first stage stays frozen -------------------------------------------------------------
    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Lightning's ``train()``/``eval()``, with the first stage kept in eval mode."""
        super().train(mode)
        self.first_stage.eval()
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.prior.check_net(getattr(self.prior, "net", None))

    # -- facts read by the callbacks (class conditioning is the prior's) ----------------------------
    @property
    def class_conditional(self) -> bool:
        """The prior's: whether it takes the labels (guidance needs it)."""
        return bool(getattr(self.prior, "class_conditional", False))

    def scale(self) -> float:
        """The latents' scale s: the estimated one, or 1 before the first training batch estimated it
        (a validation sanity check, sampling an untrained model)."""
        value = float(self.latent_scale)
        return 1.0 if math.isnan(value) else value

    def estimate_scale(self, x: Tensor) -> float:
        """Set ``latent_scale`` to ``1 / std`` of the latents of ``x`` over every rank (Rombach et al.'s
        ``scale_by_std``: one batch), where it is not set yet; return the scale used."""
        if not math.isnan(float(self.latent_scale)) or self.latent_categories is not None:
            return self.scale()
        with torch.no_grad():
            z = self.first_stage.sample_latents(x).double()
            stats = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), dtype=torch.float64,
                                                                       device=z.device)])
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        mean = stats[0] / stats[2]
        std = (stats[1] / stats[2] - mean.pow(2)).clamp_min(0).sqrt()
        if not bool(std > 0):
            raise FloatingPointError(f"LatentDiffusion: the first batch's latents have standard deviation {float(std)}; "
                                     "the first stage has collapsed (check its checkpoint), or set scale_by_std: false")
        self.latent_scale.fill_(float(1 / std))
        return self.scale()

    def to_prior(self, z: Tensor, dtype: torch.dtype) -> Tensor:
        """The prior's data from the first stage's latents: ``s z`` in ``dtype``, or the codes as int64
        sequences [B, positions]."""
        if self.latent_categories is not None:
            return z.reshape(z.shape[0], -1).long()
        return (z * self.scale()).to(dtype)

    def from_prior(self, z: Tensor) -> Tensor:
        """The first stage's latents from the prior's samples (the inverse of :meth:`to_prior`)."""
        if self.latent_categories is not None:
            return z.long().reshape(z.shape[0], *self.latent_shape)
        return z / self.scale()

    # -- training -----------------------------------------------------------------------------------
    def _latent_batch(self, batch: dict[str, Tensor], generator: torch.Generator | None) -> dict[str, Tensor]:
        with torch.no_grad():
            z = self.first_stage.sample_latents(batch["x"], generator)
        latent = {"x": self.to_prior(z, batch["x"].dtype)}
        if "y" in batch:
            latent["y"] = batch["y"]
        return latent

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The prior's loss on the scaled latents ``s z``, ``z ~ q(z | x)`` drawn without gradients; what the
        prior logs of its terms (a DiscreteDiffusion's ``train/elbo``, ...) is logged in this model's hook."""
        latent = self._latent_batch(batch, generator)
        # Lightning's log() takes the hook's name from the module that logs: the prior runs inside this one's
        saved, self.prior._current_fx_name = self.prior._current_fx_name, self._current_fx_name
        try:
            return self.prior.loss(latent, generator)
        finally:
            self.prior._current_fx_name = saved

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.scale_by_std:
            self.estimate_scale(batch["x"])
        return super().training_step(batch, batch_idx)

    # -- the contract: options are the prior's ------------------------------------------------------
    def check_sample_options(self, **options: Any) -> None:
        """The prior's :meth:`check_sample_options` (every sampler of the prior, guidance, ...)."""
        self.prior.check_sample_options(**options)

    def check_bpd_options(self, **options: Any) -> None:
        """The prior's :meth:`check_bpd_options`: the options of its estimator of ``-log p(z)``."""
        self.prior.check_bpd_options(**options)

    def preview_sample_options(self) -> dict[str, Any]:
        """The prior's fast sampler."""
        return self.prior.preview_sample_options()

    @property
    def last_sample_nfe(self) -> int | None:
        """The prior's network evaluations of the last :meth:`sample` (the decoder's one pass not counted)."""
        return getattr(self.prior, "last_sample_nfe", None)

    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               **options: Any) -> Tensor:
        """``num_samples`` samples in data space (images in [-1, 1]): the prior's samples ``s z`` (its
        sampler, steps, ``guidance_scale`` and other options, checked by the prior) divided by the scale s
        and decoded by the first stage (a VAE: the decoder's mean)."""
        self.check_sample_options(**options)
        with evaluating(self):
            z = self.prior.sample(num_samples, y=y, generator=generator, **options).to(self.device)
            return self.first_stage.decode_latents(self.from_prior(z), generator)

    def bpd_estimator(self, **options: Any) -> str:
        """``<first stage>+<prior>``: the first stage's part (``elbo``: ``-log p(x | z) + log q(z | x)`` of
        one draw, the ELBO's terms with the prior in place of ``N(0, I)``; ``vq``: ``-log p(x | codes)`` of
        a deterministic encoder) and the prior's estimator of ``-log p(z)`` with these options (``vlb``,
        ``ode-exact``, ...)."""
        first = "elbo" if self.latent_categories is None else "vq"
        return f"{first}+{self.prior.bpd_estimator(**options)}"

    @full_precision
    def bits_per_dim(self, x: Tensor, *, y: Tensor | None = None, generator: torch.Generator | None = None,
                     **options: Any) -> Tensor:
        """LSGM's bound on ``-log p(x)`` of each sample, in bits per data dimension [B]:
        ``(first_stage_nats - log p_prior(s z) - d log s) / (D ln 2)`` for one draw ``z ~ q(z | x)``, with
        ``first_stage_nats = -log p(x | z) + log q(z | x)`` (8-bit images scored as discrete data by the
        first stage), ``-log p_prior`` the prior's own estimate of its latents' NLL as points (DDPM: the VLB
        with a Gaussian decoder; ScoreSDE: the ODE), d the latent's and D the data's dimensions.

        Args:
            x: data [B, ...] (images in [-1, 1] on the 8-bit grid).
            y: labels [B], for a class-conditional prior: the bound on ``-log p(x | y)`` (-1 or None: the
                unconditional prior's, ``-log p(x)``); an unconditional prior ignores them.
            generator: the noise of the draw of z and of the prior's estimator; None: seeded with ``val_seed``.
            **options: the prior's ``bits_per_dim`` options (DDPM: ``steps``, ``batch_t``; ScoreSDE:
                ``divergence``, ``steps``, ...).
        """
        self.check_bpd_options(**options)
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.val_seed)
        s = self.scale()
        with evaluating(self):
            z, first_nats = self.first_stage.encode_latents(x, generator)
            if y is not None and self.class_conditional:  # the bound of p(x | y); an unconditional prior's of p(x)
                options["y"] = y
            prior_bpd = self.prior.bits_per_dim(self.to_prior(z, x.dtype), generator=generator, **options)
        latent_dims = math.prod(self.latent_shape)
        prior_nats = prior_bpd.double() * latent_dims * math.log(2) - latent_dims * math.log(s)
        return nats_to_bits_per_dim(first_nats.double() + prior_nats, x[0].numel()).to(x.dtype)


def build_prior(config: dict[str, Any], data_shape: tuple[int, ...] | None = None) -> nn.Module:
    """The prior of a ``{class_path, init_args}`` config (its ``data_shape`` ``data_shape`` where the config
    leaves it out: a family that needs it at construction, ``DiscreteDiffusion``, gets the latents' or
    codes' shape) (full class paths: ``lightning_diffusion.DDPM``, whose
    nested dict jsonargparse leaves as it is; a short name there is refused by the CLI's parser), built by
    jsonargparse as LightningCLI builds a model. Why not a ``GenerativeModel``-typed argument that
    LightningCLI builds itself: LightningCLI hands every LightningModule it builds the top model's
    hyperparameters and data links (``model.init_args.net...``), which a nested model does not have."""
    from jsonargparse import ArgumentParser

    if "class_path" not in config:
        raise ValueError(f"LatentDiffusion: prior must be a config with a class_path (DDPM, ScoreSDE, ...) and "
                         f"init_args, got the keys {sorted(config)}")
    config = _with_overrides(config)
    if data_shape is not None and config["init_args"].get("data_shape") is None:
        config["init_args"]["data_shape"] = list(data_shape)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--prior", type=GenerativeModel)
    try:
        return parser.instantiate_classes(parser.parse_object({"prior": config})).prior
    except Exception as error:  # noqa: BLE001 - jsonargparse's message, named with the option
        raise ValueError(f"LatentDiffusion: model.init_args.prior: {error}") from None


def _with_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the command line's dotted overrides put where they belong. jsonargparse leaves a
    ``dict`` option's nested keys to its owner: ``--model.init_args.prior.init_args.timesteps=50`` arrives
    as the key ``timesteps`` (a string) next to ``class_path``, and would be dropped (or refused) by the
    prior's parser. Each such key (dotted for deeper ones, ``init_args`` parts skipped) goes into
    ``init_args``, its string value read as YAML (``50`` an int, ``[1, 2]`` a list)."""
    import yaml

    def arguments(node: dict[str, Any]) -> dict[str, Any]:
        return node.setdefault("init_args", {}) if "class_path" in node else node

    def put(node: dict[str, Any], key: str, value: Any) -> None:
        *parents, last = [part for part in key.split(".") if part != "init_args"]
        for part in parents:
            node = arguments(node.setdefault(part, {}))
        if isinstance(value, dict):  # a deeper override arrives as {'init_args.hidden': '32'} under 'net'
            target = arguments(node.setdefault(last, {}))
            for inner, inner_value in value.items():
                put(target, inner, inner_value)
        else:
            node[last] = yaml.safe_load(value) if isinstance(value, str) else value

    config = copy.deepcopy(config)
    init_args = config.setdefault("init_args", {})
    for key in [k for k in config if k not in ("class_path", "init_args", "dict_kwargs")]:
        put(init_args, key, config.pop(key))
    return config


def load_first_stage(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """The first stage of the checkpoint ``path`` and its hyperparameters, every key of the state dict
    loaded (strictly), or an error naming the file and the missing and unexpected keys."""
    from lightning_diffusion.checkpoints import load_checkpoint
    from lightning_diffusion.errors import CheckpointError

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.init_args.first_stage_ckpt: {path} does not exist; train the first stage first "
                                "(e.g. configs/vae_colour_digits.yaml) and give its <run>/checkpoints/last.ckpt")
    ckpt = load_checkpoint(path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    stage = build_first_stage(copy.deepcopy(hparams), path)  # Lightning's rebuild turns nested configs into Namespaces
    state = ckpt["state_dict"]
    expected = stage.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: the first stage's checkpoint does not match its class "
                              f"{type(stage).__name__}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}; "
                              "give a complete checkpoint written by `lightning-diffusion fit` of that model")
    stage.load_state_dict(state, strict=True)
    return stage, hparams


def build_first_stage(hparams: dict[str, Any], path: str) -> nn.Module:
    """The first stage of class ``hparams["_class_path"]`` built from ``hparams`` (as
    ``load_from_checkpoint`` builds it), with its initial weights; refused unless it is a
    :class:`FirstStage`."""
    import importlib

    import lightning as L

    from lightning_diffusion.checkpoints import check_class_paths
    from lightning_diffusion.errors import CheckpointError

    class_path = str(hparams.get("_class_path", ""))
    if not class_path:
        raise CheckpointError(f"{path}: no hyper_parameters._class_path: the first stage's checkpoint must be written "
                              "by `lightning-diffusion fit` (or saved with its class path), to be rebuilt")
    check_class_paths(hparams, path, "model.init_args.first_stage_ckpt")
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    # Lightning's own rebuild from hyperparameters (nested class_path configs included), on an empty
    # state dict: the weights are loaded by the caller
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": hparams, "state_dict": {}, "pytorch-lightning_version": L.__version__}, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = cls.load_from_checkpoint(buffer, map_location="cpu", strict=False, weights_only=True)
    if not isinstance(stage, FirstStage):
        raise CheckpointError(f"{path}: the model {class_path} is not a first stage (it has no latent_shape, "
                              "latent_categories, encode_latents, sample_latents and decode_latents); use a VAE, HierarchicalVAE or VQVAE checkpoint")
    return stage
