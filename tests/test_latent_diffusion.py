"""LatentDiffusion against ground truth and through the CLI: with an exact first stage (probabilistic
PCA's linear-Gaussian encoder and decoder) and an exact prior, the two-stage bound is the data's exact
NLL; a first-stage checkpoint with a missing key is refused naming it and the file before training; the
latent scale is in the checkpoint and unchanged by a resume; the first stage stays frozen."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import Tensor, nn

from lightning_diffusion import LatentDiffusion, ScoreSDE, VPSDE
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle
from lightning_diffusion.errors import CheckpointError
from lightning_diffusion.models.first_stage import FirstStage

ROOT = Path(__file__).resolve().parents[1]


class LinearGaussianStage(L.LightningModule):
    """A test-only exact first stage of probabilistic-PCA data ``x = W z + mu + sigma eps``, ``z ~ N(0, I)``:
    the latent is ``z' = c z``, the encoder the exact posterior ``q(z' | x)`` (full covariance) and the
    decoder ``p(x | z') = N(W z' / c + mu, sigma^2 I)``, so ``log p(x) = log p(x | z') + log p(z') - log q(z' | x)``
    for every z' with ``p(z') = N(0, c^2 I)``."""

    latent_categories = None

    def __init__(self, weight: list, mu: list, sigma: float, c: float, data_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("w", torch.tensor(weight, dtype=torch.float64))
        self.register_buffer("mu", torch.tensor(mu, dtype=torch.float64))
        self.sigma, self.c = sigma, c
        self.data_shape = (self.w.shape[0],)
        self.latent_shape = (self.w.shape[1],)

    def posterior(self, x: Tensor) -> torch.distributions.MultivariateNormal:
        w, d = self.w, self.w.shape[1]
        m = w.T @ w + self.sigma ** 2 * torch.eye(d, dtype=w.dtype)
        m_inv = torch.linalg.inv(m)
        mean = (x.double() - self.mu) @ w @ m_inv.T
        return torch.distributions.MultivariateNormal(self.c * mean, self.c ** 2 * self.sigma ** 2 * m_inv)

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        q = self.posterior(x)
        eps = torch.randn(q.mean.shape, generator=generator, dtype=torch.float64)
        z = q.mean + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        decoder = torch.distributions.Normal(z / self.c @ self.w.T + self.mu, self.sigma)
        return z, -decoder.log_prob(x.double()).sum(1) + q.log_prob(z)

    def decode_latents(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return z.double() / self.c @ self.w.T + self.mu

    def data_log_prob(self, x: Tensor) -> Tensor:
        cov = self.w @ self.w.T + self.sigma ** 2 * torch.eye(self.w.shape[0], dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.mu, cov).log_prob(x.double())


def save_stage(stage: L.LightningModule, path: Path, drop: str | None = None) -> Path:
    """A checkpoint of ``stage`` as ``lightning-diffusion fit`` writes one (its class path in the
    hyperparameters), without the key ``drop``."""
    state = {k: v for k, v in stage.state_dict().items() if k != drop}
    hparams = {**stage.hparams, "_class_path": f"{type(stage).__module__}.{type(stage).__qualname__}"}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__}, path)
    return path


def ppca_stage() -> LinearGaussianStage:
    g = torch.Generator().manual_seed(0)
    return LinearGaussianStage(weight=torch.randn(4, 2, generator=g).tolist(), mu=[0.5, -1.0, 0.0, 2.0],
                               sigma=0.3, c=3.0)


def exact_prior(dim: int) -> ScoreSDE:
    """A ScoreSDE whose score is N(0, I)'s exactly (the one-component mixture's oracle)."""
    mix = GaussianMixture(torch.zeros(1, dim, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    prior = ScoreSDE(nn.Identity(), sde=VPSDE(), parameterization="score", data_shape=(dim,))
    prior.net = MixtureOracle(mix, prior.sde, "score")
    return prior


def test_a_linear_gaussian_stage_is_a_first_stage():
    assert isinstance(ppca_stage(), FirstStage)


def test_two_stage_bound_equals_the_exact_nll_with_an_exact_first_stage_and_prior(tmp_path):
    stage = ppca_stage()
    model = LatentDiffusion(str(save_stage(stage, tmp_path / "stage.ckpt")), exact_prior(2), data_shape=(4,))
    model.latent_scale.fill_(1 / stage.c)  # the latents' exact scale: s z' ~ N(0, I), which the prior is
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200, 2, generator=g, dtype=torch.float64)
    x = (z @ stage.w.T + stage.mu + stage.sigma * torch.randn(200, 4, generator=g, dtype=torch.float64)).float()
    bpd = model.bits_per_dim(x, divergence="exact", generator=torch.Generator().manual_seed(2)).double()
    exact = -stage.data_log_prob(x) / (4 * math.log(2))
    # every draw of z gives the exact NLL (the encoder is the exact posterior): only the ODE's error remains
    assert abs(bpd.mean().item() - exact.mean().item()) < 0.005
    assert (bpd - exact).abs().max().item() < 0.03
    assert model.bpd_estimator(divergence="exact") == "first-stage+ode-exact"
    # the prior's number alone (bits per latent dimension of s z) is not the data's NLL
    prior_only = model.prior.bits_per_dim((stage.encode_latents(x, torch.Generator().manual_seed(2))[0] / stage.c).float(),
                                          divergence="exact")
    assert abs(prior_only.mean().item() - exact.mean().item()) > 0.3


def test_a_first_stage_checkpoint_with_a_missing_key_is_refused_naming_the_key_and_the_file(tmp_path):
    path = save_stage(ppca_stage(), tmp_path / "stage.ckpt", drop="mu")
    with pytest.raises(CheckpointError) as error:
        LatentDiffusion(str(path), exact_prior(2), data_shape=(4,))
    assert "missing keys ['mu']" in str(error.value) and str(path) in str(error.value)


def test_a_first_stage_of_other_data_is_refused(tmp_path):
    path = save_stage(ppca_stage(), tmp_path / "stage.ckpt")
    with pytest.raises(ValueError, match=r"trained on data of shape \[4\].*the data are \[3\]"):
        LatentDiffusion(str(path), exact_prior(2), data_shape=(3,))
    with pytest.raises(ValueError, match=r"prior's data_shape \[3\] is not the first stage's latent_shape \[2\]"):
        LatentDiffusion(str(path), exact_prior(3), data_shape=(4,))
