"""lightning_diffusion: VAEs, hierarchical VAEs, DDPMs, score SDEs, energy-based models and discrete
diffusion for PyTorch Lightning.

The public API is exactly the names in ``__all__``, importable from the top level::

    from lightning_diffusion import DDPM, ScoreSDE, VPSDE, EMA, SampleQuality, ShardDataModule

- Models (LightningModules): `DDPM`, `ScoreSDE`, `VAE`, `HierarchicalVAE`, `VQVAE`, the energy-based
  `EBM`, `DiscreteDiffusion` (categorical data: uniform or absorbing corruption) and their base
  `GenerativeModel`.
- Processes and schedules (pure math, no Lightning): the SDEs `VPSDE`, `SubVPSDE`, `VESDE`, their
  base `GaussianProcess`, `DiscreteVP` (a DDPM schedule as a process), `NoiseSchedule` and
  `make_betas`; `GaussianMixture` (exact scores and densities at every noise level, for tests).
- Samplers and likelihood: `sample` runs a sampler by name on any denoiser
  ``denoise_fn(x_t, t) -> x0_hat`` and process, returning a `SamplerOutput`; `sampler_options`
  lists a sampler's options; `ode_nll` is the probability-flow ODE likelihood.
- MCMC on an energy ``energy(x) -> E [B]`` (pure math, no Lightning): `langevin` (ULA) and `mala`
  return an `MCMCResult`; `ais` estimates log Z from a `gaussian_base` (an `AISResult`). The rest
  (HMC, annealing, parallel tempering, reverse AIS, 2-D quadrature) is in ``lightning_diffusion.mcmc``.
- Data: `ShardDataModule` (WebDataset shards as batch dicts ``{"x", "y"}``), `write_shards` and
  `Source` (write your own arrays as shards), `ShardError`.
- Callbacks: `EMA`, `SampleQuality`, `Likelihood`, `WandbSamples`, `SampleGrid`, `LastCheckpoint`,
  `SlurmRequeue`, `StopOnSignal` (SIGTERM/SIGINT: `last.ckpt` at the step, then `FitStopped`, exit
  143/130), and `evaluation_weights` / `load_ema_weights` for the EMA weights outside a
  callback.
- Metrics as ``torchmetrics.Metric``s, on features an extractor computed (their states reduce over
  ranks in ``compute()``; a LightningModule can ``self.log`` them): `FID` (constant-size float64
  statistics), `KID`, `PrecisionRecall`, `InceptionScoreFromLogits`, and `BitsPerDim`, the mean
  bits/dim over every sample. SampleQuality and Likelihood use them.
- The callbacks' contract as `typing.Protocol`s: `GenerativeModule` (``sample`` and
  ``bits_per_dim``, required), `Reconstructs`, `HasTrajectory`, `HasDensity`, `NamesEstimator`
  (optional).
  A LightningModule of your own that has these methods gets every callback; it need not subclass
  ours.
- Multi-process runs: `end_process_group`, the orderly end of a DDP / FSDP2 / SLURM run (every rank
  leaves the process group together; the ``lightning-diffusion`` command calls it).
- Networks (plain ``nn.Module``s with ``net(x, t, y=None) -> Tensor`` shaped like ``x``): `UNet`,
  `MLP`, and the VAE nets `ConvVAENet`, `MLPVAENet`, `LadderVAENet`, `ConvVQNet` (VQ-VAE); energy nets
  (``net(x) -> E [B]``) `EnergyMLP`, `EnergyConvNet` and the wrapper `ScalarEnergy`; `EnergyHead`, the
  noise-conditional energy ``net(x, t, y=None) -> E [B]`` of a UNet or MLP (parameterization ``energy``); categorical
  nets (``net(x_t, t, y=None) -> logits [B, *x_t.shape[1:], K]``) `CategoricalUNet` and
  `SequenceTransformer`.

Everything else, including every name that is reachable only through a submodule
(``lightning_diffusion.models.ddpm...``), is private by convention: it may change in any release
without notice. The public names are imported on first use (PEP 562), so that
``import lightning_diffusion`` and spawned DataLoader workers do not pay for Lightning until they
need it.
"""

from importlib import import_module

__version__ = "0.1.0"
"""The package version (semantic versioning; see CHANGELOG.md)."""

_PUBLIC = {
    # models
    "DDPM": "lightning_diffusion.models",
    "DiscreteDiffusion": "lightning_diffusion.models",
    "EBM": "lightning_diffusion.models",
    "GenerativeModel": "lightning_diffusion.models",
    "HierarchicalVAE": "lightning_diffusion.models",
    "FirstStage": "lightning_diffusion.models",
    "LatentDiffusion": "lightning_diffusion.models",
    "ScoreSDE": "lightning_diffusion.models",
    "VAE": "lightning_diffusion.models",
    "VQVAE": "lightning_diffusion.models",
    # composition of Gaussian-diffusion models by their energies
    "Composition": "lightning_diffusion.models",
    "Term": "lightning_diffusion.models",
    "compose": "lightning_diffusion.models",
    "conditional_product": "lightning_diffusion.models",
    # processes and schedules
    "DiscreteVP": "lightning_diffusion.diffusion.sde",
    "GaussianProcess": "lightning_diffusion.diffusion.sde",
    "SubVPSDE": "lightning_diffusion.diffusion.sde",
    "VESDE": "lightning_diffusion.diffusion.sde",
    "VPSDE": "lightning_diffusion.diffusion.sde",
    "NoiseSchedule": "lightning_diffusion.diffusion.schedules",
    "make_betas": "lightning_diffusion.diffusion.schedules",
    "GaussianMixture": "lightning_diffusion.diffusion.mixture",
    # samplers and likelihood
    "SamplerOutput": "lightning_diffusion.sampling",
    "sample": "lightning_diffusion.diffusion.samplers",
    "sampler_options": "lightning_diffusion.diffusion.samplers",
    "ode_nll": "lightning_diffusion.diffusion.likelihood",
    # MCMC on an energy
    "AISResult": "lightning_diffusion.mcmc",
    "MCMCResult": "lightning_diffusion.mcmc",
    "ais": "lightning_diffusion.mcmc",
    "gaussian_base": "lightning_diffusion.mcmc",
    "langevin": "lightning_diffusion.mcmc",
    "mala": "lightning_diffusion.mcmc",
    # data
    "ShardDataModule": "lightning_diffusion.data",
    "ShardError": "lightning_diffusion.data",
    "Source": "lightning_diffusion.data.sources",
    "write_shards": "lightning_diffusion.data",
    # callbacks
    "EMA": "lightning_diffusion.callbacks",
    "LastCheckpoint": "lightning_diffusion.callbacks",
    "Likelihood": "lightning_diffusion.callbacks",
    "SampleGrid": "lightning_diffusion.callbacks",
    "SampleQuality": "lightning_diffusion.callbacks",
    "SlurmRequeue": "lightning_diffusion.callbacks",
    "StopOnSignal": "lightning_diffusion.callbacks",
    "FitStopped": "lightning_diffusion.callbacks",
    "WandbSamples": "lightning_diffusion.callbacks",
    "evaluation_weights": "lightning_diffusion.callbacks",
    "load_ema_weights": "lightning_diffusion.callbacks",
    # metrics (torchmetrics)
    "BitsPerDim": "lightning_diffusion.metrics",
    "FID": "lightning_diffusion.metrics",
    "InceptionScoreFromLogits": "lightning_diffusion.metrics",
    "KID": "lightning_diffusion.metrics",
    "PrecisionRecall": "lightning_diffusion.metrics",
    # multi-process runs
    "end_process_group": "lightning_diffusion.distributed",
    # the callbacks' contract
    "GenerativeModule": "lightning_diffusion.callbacks.protocol",
    "HasDensity": "lightning_diffusion.callbacks.protocol",
    "HasTrajectory": "lightning_diffusion.callbacks.protocol",
    "NamesEstimator": "lightning_diffusion.callbacks.protocol",
    "Reconstructs": "lightning_diffusion.callbacks.protocol",
    # networks
    "CategoricalUNet": "lightning_diffusion.nets",
    "ConvVAENet": "lightning_diffusion.nets",
    "ConvVQNet": "lightning_diffusion.nets",
    "EnergyConvNet": "lightning_diffusion.nets",
    "EnergyHead": "lightning_diffusion.nets",
    "EnergyMLP": "lightning_diffusion.nets",
    "LadderVAENet": "lightning_diffusion.nets",
    "MLP": "lightning_diffusion.nets",
    "MLPVAENet": "lightning_diffusion.nets",
    "ScalarEnergy": "lightning_diffusion.nets",
    "SequenceTransformer": "lightning_diffusion.nets",
    "UNet": "lightning_diffusion.nets",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
