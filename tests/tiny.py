"""The tests' shared scaffolding (Lightning's ``BoringModel`` idea): a tiny model of every family, a tiny
Trainer, a config shrinker and a user's own minimal LightningModule.

``tiny_model(family, net=..., **overrides)`` builds one of :data:`FAMILIES` on its tiny net (8 x 8
one-channel images, or 2-D points for the EBM); ``net`` is a dict of overrides of the tiny net's
arguments or a net of your own, ``overrides`` go to the model. ``tiny_latent_model()`` is latent
diffusion: a tiny DDPM prior over a tiny VAE first stage written to a checkpoint. ``tiny_trainer(**overrides)`` is a CPU
Trainer without logger, checkpointing, progress bar, model summary or sanity check. ``shrink_config``
writes a packaged config with a few settings replaced. Only the public API (``lightning_diffusion``
and its documented module paths) is used here, so refactors inside the package do not break it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import yaml
from torch import Tensor, nn

from lightning_diffusion import (DDPM, EBM, MLP, VAE, VQVAE, CategoricalUNet, ConvVAENet, ConvVQNet, DiscreteDiffusion,
                                 EnergyMLP, HierarchicalVAE, LadderVAENet, LatentDiffusion, ScoreSDE,
                                 SequenceTransformer, UNet)

ROOT = Path(__file__).resolve().parents[1]

#: the tiny image UNet: 8 x 8 one-channel images, 16 channels at 8 x 8 and 32 at 4 x 4, no attention
UNET = dict(in_channels=1, image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(), dropout=0.0)


def tiny_unet(**overrides: Any) -> UNet:
    """:data:`UNET` with ``overrides`` (e.g. ``model_channels=8, channel_mult=(1,)``: the smallest)."""
    return UNet(**{**UNET, **overrides})


def _vae_net(**o: Any) -> ConvVAENet:
    return ConvVAENet(**{**dict(in_channels=1, image_size=8, latent_dim=8, channels=[16, 32], num_blocks=1), **o})


def _ladder_net(**o: Any) -> LadderVAENet:
    return LadderVAENet(**{**dict(in_channels=1, image_size=8, width=16, latent_channels=4, latent_resolutions=[1, 4, 8],
                                  groups_per_resolution=[1, 1, 1], encoder_blocks=1, output_blocks=1), **o})


def _categorical_net(**o: Any) -> nn.Module:
    if o.pop("sequence", False):  # int64 sequences [L] of num_categories symbols
        args = dict(num_categories=5, max_length=6, dim=16, depth=1, heads=2, dropout=0.0)
        return SequenceTransformer(**{**args, **o})
    args = dict(num_categories=256, in_channels=1, image_size=8, embed_dim=8, model_channels=16, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(), dropout=0.0, head_channels=16)
    return CategoricalUNet(**{**args, **o})


#: family -> (its tiny net from overrides, its model class, the model's tiny arguments)
FAMILIES: dict[str, tuple[Callable[..., nn.Module], type, dict[str, Any]]] = {
    "ddpm": (tiny_unet, DDPM, dict(data_shape=(1, 8, 8), timesteps=100)),
    "score_sde": (tiny_unet, ScoreSDE, dict(data_shape=(1, 8, 8))),
    "vae": (_vae_net, VAE, dict(data_shape=(1, 8, 8), likelihood="discretized_logistic")),
    "hvae": (_ladder_net, HierarchicalVAE, dict(data_shape=(1, 8, 8), likelihood="discretized_logistic")),
    "vqvae": (lambda **o: ConvVQNet(**{**dict(in_channels=1, image_size=8, code_dim=4, channels=[16, 32]), **o}), VQVAE,
              dict(data_shape=(1, 8, 8), num_codes=16)),
    "ebm": (lambda **o: EnergyMLP(**{**dict(in_channels=2, hidden=32, num_layers=2), **o}), EBM,
            dict(data_shape=(2,), step_size=0.05, mcmc_steps=3, buffer_size=64, sample_steps=4, quadrature_points=51)),
    "discrete": (_categorical_net, DiscreteDiffusion,
                 dict(num_categories=256, data_shape=(1, 8, 8), corruption="absorbing", timesteps=20, loss="hybrid",
                      bpd_chunk=8, sample_steps=4)),
}


#: the tiny first stage of latent diffusion: a VAE of 8 x 8 one-channel images with 4 latent dimensions
TINY_STAGE = dict(in_channels=1, image_size=8, latent_dim=4, channels=[8, 16], num_blocks=1)


def tiny_first_stage(path: Path, seed: int = 0) -> Path:
    """Write a tiny VAE first stage (:data:`TINY_STAGE`, its initial weights drawn with ``seed``) to ``path`` as
    ``lightning-diffusion fit`` writes a checkpoint: its class path and its net's config in the
    hyperparameters (LightningCLI's instantiator rebuilds the net), the weights in the state dict."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = VAE(ConvVAENet(**TINY_STAGE), data_shape=(1, 8, 8), likelihood="discretized_logistic")
    hparams = {**vae.hparams, "_class_path": "lightning_diffusion.VAE",
               "_instantiator": "lightning.pytorch.cli.instantiate_module",
               "net": {"class_path": "lightning_diffusion.ConvVAENet", "init_args": dict(TINY_STAGE)}}
    torch.save({"state_dict": vae.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__}, path)
    return path


def tiny_latent_model(directory: Path | None = None, **overrides: Any) -> LatentDiffusion:
    """A tiny LatentDiffusion: a DDPM prior (an MLP, T = 20) over the 4 latents of :func:`tiny_first_stage`,
    written into ``directory`` (None: a temporary one, removed once the model is built: the model holds
    the first stage's weights); ``overrides`` go to the prior (``class_conditional=True``, ...)."""
    import tempfile

    with tempfile.TemporaryDirectory() as temporary:
        path = tiny_first_stage(Path(directory or temporary) / "first_stage.ckpt")
        classes = overrides.get("num_classes")
        net = MLP(in_channels=4, hidden=16, num_layers=1, time_embed_dim=16, num_classes=classes)
        prior = DDPM(net, **{**dict(data_shape=(4,), timesteps=20), **overrides})
        return LatentDiffusion(str(path), prior, data_shape=(1, 8, 8), num_classes=classes)


def tiny_net(family: str, **overrides: Any) -> nn.Module:
    """The tiny net of ``family`` with ``overrides`` of its arguments."""
    return FAMILIES[family][0](**overrides)


def tiny_model(family: str, net: nn.Module | dict[str, Any] | None = None, **overrides: Any) -> L.LightningModule:
    """A tiny model of ``family`` (a key of :data:`FAMILIES`): ``net`` a net, or overrides of the tiny
    net's arguments; ``overrides`` replace the model's tiny arguments. The EBM's base is fitted to 256
    points of the ``gaussians8`` toy data (its sampler and quadrature log Z start from it)."""
    make_net, cls, args = FAMILIES[family]
    net = net if isinstance(net, nn.Module) else make_net(**(net or {}))
    model = cls(net=net, **{**args, **overrides})
    if family == "ebm":
        import numpy as np

        from lightning_diffusion.data.sources import toy2d_points

        model.fit_base(torch.from_numpy(toy2d_points("gaussians8", 256, np.random.default_rng(1))[0]))
    return model


TRAINER = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0)


def tiny_trainer(**overrides: Any) -> L.Trainer:
    """``L.Trainer`` on the CPU without logger, checkpointing, progress bar, model summary or sanity
    check (:data:`TRAINER`), with ``overrides`` (``max_steps``, ``callbacks``, ``default_root_dir``...)."""
    return L.Trainer(**{**TRAINER, **overrides})


class UserModule(L.LightningModule):
    """A user's own LightningModule with only the contract's two methods (``sample``, ``bits_per_dim``):
    a diagonal Gaussian over ``data_shape``, no option checks, no estimator name, no fixed hparams."""

    def __init__(self, data_shape: tuple[int, ...] = (1, 8, 8)):
        super().__init__()
        self.save_hyperparameters()
        self.data_shape = tuple(data_shape)
        self.mean = nn.Parameter(torch.zeros(self.data_shape))

    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               **options: Any) -> Tensor:
        noise = torch.randn(num_samples, *self.data_shape, generator=generator)
        return (self.mean.detach() + 0.3 * noise).clamp(-1, 1)

    def bits_per_dim(self, x: Tensor, **options: Any) -> Tensor:
        nats = torch.distributions.Normal(self.mean, 0.3).log_prob(x).flatten(1).mean(1).neg()
        return nats / torch.log(torch.tensor(2.0))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.bits_per_dim(batch["x"]).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def shrink_config(name: str, path: Path, settings: dict[str, Any] | None = None,
                  callbacks: dict[str, dict[str, Any]] | None = None, add_callbacks: list[dict] = ()) -> Path:
    """Write ``configs/NAME.yaml`` to ``path`` with ``settings`` (``{"dotted.key": value}``, e.g.
    ``"model.init_args.timesteps": 20``; a dict value updates the dict there) applied, each callback
    whose class_path is a key of ``callbacks`` given those init_args, and ``add_callbacks`` appended;
    return ``path``."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    for key, value in (settings or {}).items():
        *head, last = key.split(".")
        parent = config
        for part in head:
            parent = parent.setdefault(part, {})
        if isinstance(value, dict) and isinstance(parent.get(last), dict):
            parent[last].update(value)
        else:
            parent[last] = value
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"] in (callbacks or {}):
            callback.setdefault("init_args", {}).update(callbacks[callback["class_path"]])
    config["trainer"]["callbacks"] = [*config["trainer"].get("callbacks", []), *add_callbacks]
    path.write_text(yaml.safe_dump(config))
    return path
