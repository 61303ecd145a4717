"""DDPM: the schedule against published constants and closed forms, the ancestral sampler against an
exact Gaussian oracle, and training on toy 2-D data."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tiny import tiny_trainer
from lightning_diffusion import DDPM, MLP, ShardDataModule
from lightning_diffusion.diffusion import NoiseSchedule, make_betas


def test_linear_schedule_published_values():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-12) and betas[-1] == pytest.approx(0.02, abs=1e-12)
    abar = NoiseSchedule("linear", 1000).alphas_cumprod
    assert abar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)  # Ho et al.'s abar_T
    short = make_betas("linear", 10)  # scaled by 1000 / T, clipped to stay a valid variance
    assert short[0] == pytest.approx(0.01) and short.max() == 0.999 and (short > 0).all()


def test_cosine_schedule_matches_its_definition():
    s, T = 0.008, 1000
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    abar = NoiseSchedule("cosine", T).alphas_cumprod.numpy()
    t = np.arange(1, T + 1)
    unclipped = make_betas("cosine", T).numpy() < 0.999
    assert unclipped[: T - 5].all() and not unclipped[-1]
    assert np.allclose(abar[unclipped], (f(t) / f(0))[unclipped], rtol=1e-10)
    assert make_betas("cosine", T).max().item() == pytest.approx(0.999)


def test_posterior_is_bayes_rule():
    sch = NoiseSchedule("linear", 1000)
    t = torch.tensor([1, 10, 500, 999])
    x0, x_t = torch.tensor([0.3, -1.0, 0.7, 0.1], dtype=torch.float64), torch.tensor([0.5, 0.2, -0.4, 1.3], dtype=torch.float64)
    abar_prev, beta = sch.alphas_cumprod_prev[t], sch.betas[t]
    # x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev), x_t | x_{t-1} ~ N(sqrt(1 - beta) x_{t-1}, beta)
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    mean = (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - beta).sqrt() * x_t / beta) / precision
    assert torch.allclose(sch.q_posterior_mean(x0, x_t, t), mean, rtol=1e-10)
    assert torch.allclose(sch.posterior_variance[t], 1 / precision, rtol=1e-10)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_parameterizations_invert(parameterization):
    sch = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = sch.q_sample(x0, t, noise)
    out = sch.target(parameterization, x0, noise, t)
    assert torch.allclose(sch.predict_x0(parameterization, out, x_t, t), x0, atol=1e-3 if parameterization == "eps" else 1e-5)


def test_q_sample_marginal_moments():
    sch = NoiseSchedule("linear", 1000)
    x0 = torch.full((200_000, 1), 0.8)
    t = torch.full((200_000,), 300)
    x_t = sch.q_sample(x0, t, torch.randn_like(x0))
    abar = sch.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.8, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.02)


class GaussianOracle(nn.Module):
    """The exact minimiser of the DDPM loss when the data is N(mu, s^2 I), in any parameterization.

    x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar), so E[x0 | x_t] = mu + sqrt(abar) s^2 (x_t - sqrt(abar) mu) / var_t.
    """

    def __init__(self, schedule, mu, s, parameterization):
        super().__init__()
        self.schedule, self.mu, self.s, self.parameterization = schedule, mu, s, parameterization
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        abar = self.schedule.alphas_cumprod[t.long()].to(x.dtype)[:, None]
        var_t = abar * self.s**2 + 1 - abar
        x0 = self.mu + abar.sqrt() * self.s**2 * (x - abar.sqrt() * self.mu) / var_t
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return {"x0": x0, "eps": eps, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[self.parameterization]


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_ancestral_sampling_with_oracle_recovers_the_gaussian(parameterization, variance):
    mu, s = torch.tensor([1.5, -0.5]), 0.3
    model = DDPM(nn.Identity(), timesteps=1000, parameterization=parameterization, variance=variance, data_shape=(2,))
    model.net = GaussianOracle(model.schedule, mu, s, parameterization)
    x = model.sample(4000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), mu, atol=0.03)
    assert torch.allclose(x.std(0), torch.full((2,), s), rtol=0.06)


def test_oracle_loss_is_the_analytic_minimum():
    # eps-MSE of the exact posterior mean = E_t[Var(eps | x_t)] = E_t[abar s^2 / (abar s^2 + 1 - abar)]
    mu, s = torch.tensor([0.0, 0.0]), 0.5
    model = DDPM(nn.Identity(), timesteps=1000, data_shape=(2,))
    model.net = GaussianOracle(model.schedule, mu, s, "eps")
    x0 = mu + s * torch.randn(100_000, 2, generator=torch.Generator().manual_seed(1))
    loss = model.loss({"x": x0}, generator=torch.Generator().manual_seed(2)).item()
    abar = model.schedule.alphas_cumprod
    expected = (abar * s**2 / (abar * s**2 + 1 - abar)).mean().item()
    assert loss == pytest.approx(expected, rel=0.02)


def test_ddpm_trains_on_toy2d():
    torch.manual_seed(0)
    dm = ShardDataModule("gaussians8", batch_size=256, batches_per_epoch=50)
    model = DDPM(MLP(in_channels=2, hidden=128, num_layers=3), data_shape=dm.data_shape, lr=2e-3, warmup_steps=20)
    trainer = tiny_trainer(max_steps=250, check_val_every_n_epoch=100)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    assert before > 0.8  # an untrained eps-predictor: loss ~ E||eps||^2 / d = 1
    assert after < 0.5 * before
    samples = model.sample(2000, generator=torch.Generator().manual_seed(0))
    radius = samples.norm(dim=1)
    assert ((radius > 1.5) & (radius < 2.5)).float().mean() > 0.8  # the modes lie on the circle of radius 2


class NaNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, t, y=None):
        return x * self.w * float("nan")


def test_nan_loss_is_a_clear_error():
    model = DDPM(NaNNet(), data_shape=(2,))
    dm = ShardDataModule("gaussians8", batch_size=16, batches_per_epoch=2)
    trainer = tiny_trainer(max_steps=2)
    with pytest.raises(FloatingPointError, match=r"train/loss is nan at global step 0"):
        trainer.fit(model, datamodule=dm)
    assert model.net.w.item() == 1.0  # no step was taken with the bad loss


def test_label_dropout_and_conditioning_checks():
    with pytest.raises(ValueError, match="num_classes"):
        DDPM(MLP(), class_conditional=True, data_shape=(2,))
    seen = {}

    class Spy(nn.Module):
        def forward(self, x, t, y=None):
            seen["y"] = y
            return torch.zeros_like(x)

    model = DDPM(Spy(), class_conditional=True, label_dropout=0.25, num_classes=8, data_shape=(2,))
    model.train()
    model.loss({"x": torch.zeros(20_000, 2), "y": torch.full((20_000,), 3)})
    assert set(seen["y"].unique().tolist()) == {-1, 3}
    assert (seen["y"] == -1).float().mean().item() == pytest.approx(0.25, abs=0.015)
    with pytest.raises(KeyError, match="'y'"):
        model.loss({"x": torch.zeros(4, 2)})


def test_checkpoint_round_trip_in_python(tmp_path):
    model = DDPM(MLP(hidden=32, num_layers=1), timesteps=50, data_shape=(2,))
    assert "net" not in model.hparams and model.hparams.timesteps == 50
    trainer = tiny_trainer(max_steps=1, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(model, datamodule=ShardDataModule("gaussians8", batch_size=8, batches_per_epoch=1))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = DDPM.load_from_checkpoint(tmp_path / "m.ckpt", net=MLP(hidden=32, num_layers=1))
    assert loaded.schedule.timesteps == 50 and loaded.data_shape == (2,)
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
