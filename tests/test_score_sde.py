"""ScoreSDE against exact ground truth: ODE likelihood of a Gaussian mixture, the oracle's
denoising loss, importance sampling, EDM preconditioning; and training on toy 2-D data."""

import math
import re

import lightning as L
import pytest
import torch
from torch import nn

from tiny import tiny_trainer
from lightning_diffusion import MLP, ScoreSDE, ShardDataModule
from lightning_diffusion.diffusion.likelihood import bits_per_dim_discrete, dequantize
from lightning_diffusion.diffusion.parameterization import scalings
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle
from lightning_diffusion.diffusion.sde import VESDE, VPSDE, SubVPSDE
from lightning_diffusion.errors import OptionError

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}  # the papers' defaults


def oracle_model(mix, sde_name, parameterization="eps", **kwargs):
    model = ScoreSDE(nn.Identity(), sde=SDES[sde_name](), parameterization=parameterization,
                     data_shape=(mix.dim,), **kwargs)
    model.net = MixtureOracle(mix, model.sde, parameterization)
    return model


@pytest.mark.parametrize("sde_name", list(SDES))
def test_ode_bits_per_dim_equals_the_analytic_nll_in_2d(sde_name):
    mix = GaussianMixture.circle()
    model = oracle_model(mix, sde_name, "score")
    x, _ = mix.sample(300, torch.Generator().manual_seed(0))
    bpd = model.bits_per_dim(x.float(), divergence="exact")
    true = -mix.log_prob(x) / (2 * math.log(2))
    assert abs(bpd.mean().item() - true.mean().item()) < 0.01
    assert (bpd.double() - true).abs().max().item() < 0.05
    assert model.last_likelihood_nfe > 10


def test_hutchinson_estimate_is_unbiased_in_16d():
    mix = GaussianMixture.random(4, 16, seed=3)
    model = oracle_model(mix, "vp", "eps")
    x, _ = mix.sample(400, torch.Generator().manual_seed(1))
    true = -mix.log_prob(x) / (16 * math.log(2))
    exact = model.bits_per_dim(x[:100].float(), divergence="exact")
    assert abs(exact.mean().item() - true[:100].mean().item()) < 0.005
    for divergence in ("rademacher", "gaussian"):
        bpd = model.bits_per_dim(x.float(), divergence=divergence, generator=torch.Generator().manual_seed(2))
        error = bpd.double() - true  # one probe per sample: unbiased, with this spread
        standard_error = error.std().item() / math.sqrt(len(error))
        assert standard_error < 0.05 and abs(error.mean().item()) < 4 * standard_error, divergence
    fixed = model.bits_per_dim(x[:50].float(), divergence="exact", steps=100)  # fixed rk4 grid
    assert model.last_likelihood_nfe == 400  # 4 evaluations per rk4 step
    assert abs(fixed.mean().item() - (-mix.log_prob(x[:50]) / (16 * math.log(2))).mean().item()) < 0.02


def test_default_divergence_is_exact_in_2d_within_0p01_of_the_analytic_nll_on_512_points():
    # the issue-15 complaint: the default (then Hutchinson) was 0.07-0.08 bits/dim off on 512 points
    mix = GaussianMixture.circle()
    model = oracle_model(mix, "vp", "score")
    assert model.likelihood_divergence == "auto"
    x, _ = mix.sample(512, torch.Generator().manual_seed(0))
    true = -mix.log_prob(x) / (2 * math.log(2))
    default = model.bits_per_dim(x.float(), generator=torch.Generator().manual_seed(0))
    assert model.last_likelihood_divergence == "exact"
    default_error = abs(default.mean().item() - true.mean().item())
    assert default_error < 0.01
    # forcing Hutchinson with the same probe seed: one probe per point leaves 0.74 bits/dim of noise each,
    # 0.03 on the mean here; were the default still Hutchinson, it would be this number and fail above
    hutchinson = model.bits_per_dim(x.float(), divergence="rademacher", generator=torch.Generator().manual_seed(0))
    assert model.last_likelihood_divergence == "rademacher"
    hutchinson_error = abs(hutchinson.mean().item() - true.mean().item())
    assert hutchinson_error > 0.01 and hutchinson_error > 10 * default_error
    assert (hutchinson.double() - true).std().item() > 0.3 > 10 * (default.double() - true).std().item()


class _Shrink(nn.Module):
    def forward(self, x, t, y=None):
        return 0.5 * x


def test_bpd_estimator_names_the_divergence_auto_resolves_to():
    from lightning_diffusion.diffusion.likelihood import EXACT_DIVERGENCE_MAX_DIMS, resolve_divergence

    points = oracle_model(GaussianMixture.circle(), "vp")
    assert points.bpd_estimator() == "ode-exact"  # D = 2
    assert points.bpd_estimator(divergence="rademacher", steps=3) == "ode-hutchinson-rademacher"
    assert points.bpd_estimator(divergence="gaussian") == "ode-hutchinson-gaussian"
    digits = ScoreSDE(_Shrink(), data_shape=(1, 8, 8))  # D = 64
    assert digits.bpd_estimator() == digits.bpd_estimator(divergence="auto") == "ode-hutchinson-rademacher"
    assert digits.bpd_estimator(divergence="exact") == "ode-exact"
    assert ScoreSDE(_Shrink(), data_shape=(2,), likelihood_divergence="rademacher").bpd_estimator() \
        == "ode-hutchinson-rademacher"
    digits.bits_per_dim(torch.zeros(2, 1, 8, 8), steps=2, generator=torch.Generator().manual_seed(0))
    assert digits.last_likelihood_divergence == "rademacher" and digits.last_likelihood_nfe == 8
    assert EXACT_DIVERGENCE_MAX_DIMS == 16
    assert [resolve_divergence("auto", d) for d in (1, 16, 17)] == ["exact", "exact", "rademacher"]
    assert resolve_divergence("gaussian", 2) == "gaussian"
    unknown = ScoreSDE(_Shrink())  # no data_shape: named after the last call's D
    assert unknown.bpd_estimator() == "ode" and unknown.bpd_estimator(divergence="exact") == "ode-exact"
    unknown.bits_per_dim(torch.randn(3, 4), steps=2)
    assert unknown.bpd_estimator() == "ode-exact" and unknown.last_likelihood_divergence == "exact"
    with pytest.raises(OptionError, match="divergence"):
        points.check_bpd_options(divergence="hutchinson")
    with pytest.raises(ValueError, match="likelihood_divergence"):
        ScoreSDE(_Shrink(), data_shape=(2,), likelihood_divergence="hutchinson")


def test_likelihood_callback_logs_the_resolved_estimator(tmp_path):
    import json

    from lightning_diffusion import Likelihood

    torch.manual_seed(0)
    dm = ShardDataModule("gaussians8", batch_size=64, num_workers=0, batches_per_epoch=2)
    model = ScoreSDE(MLP(in_channels=2, hidden=32, num_layers=2, time_embed_dim=16, time_scale=1000.0),
                     data_shape=dm.data_shape, warmup_steps=0)
    trainer = tiny_trainer(max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="lk"),
                           callbacks=[Likelihood(num_batches=1, bpd_options={"steps": 4})], limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    run = tmp_path / "lk" / "version_0"
    records = [json.loads(line) for line in (run / "metrics" / "likelihood.jsonl").read_text().splitlines()]
    assert [r["estimator"] for r in records] == ["ode-exact"] and records[0]["num_samples"] == 64
    assert "val/bpd_ode-exact" in (run / "metrics.csv").read_text().splitlines()[0].split(",")


def test_dequantized_bits_per_dim_of_uniform_8bit_data_is_8():
    # 8-bit data uniform over 256 values has entropy 8 bits/dim; the dequantized density of the uniform
    # continuous distribution on [-1, 1) is 1/2 per dim: nll = D ln 2, bits/dim = 1 + 7 = 8
    k = torch.randint(0, 256, (1000, 3))
    y = dequantize(k / 127.5 - 1, torch.Generator().manual_seed(0))
    assert ((y + 1) * 128).floor().long().equal(k)
    assert bits_per_dim_discrete(torch.full((1000,), 3 * math.log(2)), 3).mean().item() == pytest.approx(8.0)


def _integrate_over_t(fn, t_eps, n=200_001):
    """Mean of fn over U(t_eps, 1), by the trapezoid rule on a geometric grid (fn may grow like 1/t)."""
    t = torch.logspace(math.log10(t_eps), 0.0, n, dtype=torch.float64)
    return torch.trapezoid(fn(t), t).item() / (1.0 - t_eps)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_oracle_denoising_loss_is_the_analytic_minimum(sde_name):
    # data N(0, s^2 I): E[eps | x_t] is linear and Var(eps | x_t) = alpha^2 s^2 / (alpha^2 s^2 + sigma^2) per dim
    s = 0.5
    mix = GaussianMixture(torch.zeros(1, 2), torch.tensor([s]))
    model = oracle_model(mix, sde_name, "eps")
    x0, _ = mix.sample(200_000, torch.Generator().manual_seed(0))
    loss = model.loss({"x": x0.float()}, generator=torch.Generator().manual_seed(1)).item()
    sde = model.sde
    expected = _integrate_over_t(lambda t: sde.alpha(t) ** 2 * s**2 / (sde.alpha(t) ** 2 * s**2 + sde.sigma(t) ** 2),
                                 model.t_eps)
    assert loss == pytest.approx(expected, rel=0.01)
    # likelihood weighting with importance sampling of t: the same expectation as uniform t (whose
    # estimate has a heavy tail from g^2/sigma^2 ~ 1/t near t_eps; see the variance test below)
    lik_is = oracle_model(mix, sde_name, "eps", weighting="likelihood", importance_sampling=True)
    expected_lik = _integrate_over_t(lambda t: sde.g2(t) / sde.sigma(t) ** 2 * sde.alpha(t) ** 2 * s**2
                                     / (sde.alpha(t) ** 2 * s**2 + sde.sigma(t) ** 2), model.t_eps)
    weighted = lik_is.loss({"x": x0.float()}, generator=torch.Generator().manual_seed(3)).item()
    assert weighted == pytest.approx(expected_lik, rel=0.02)


def test_importance_sampling_reduces_the_variance_of_the_likelihood_weighted_loss():
    mix = GaussianMixture(torch.zeros(1, 2), torch.tensor([0.5]))
    x0, _ = mix.sample(64, torch.Generator().manual_seed(0))

    def spread(**kw):
        model = oracle_model(mix, "vp", "eps", weighting="likelihood", **kw)
        return torch.tensor([model.loss({"x": x0.float()}, generator=torch.Generator().manual_seed(i)).item()
                             for i in range(200)]).std().item()

    assert spread(importance_sampling=True) < 0.2 * spread()


class EDMOracle(nn.Module):
    """The F of EDM preconditioning that makes D(x~; s) the exact denoiser of the mixture."""

    def __init__(self, mix, model):
        super().__init__()
        self.mix, self.model = mix, model

    def forward(self, x_in, t, y=None):
        sde = self.model.sde
        alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
        c_skip, c_out, c_in = scalings("edm", torch.ones_like(alpha), sigma / alpha, self.model.sigma_data)
        x_tilde = x_in.double() / c_in
        d = self.mix.denoise(alpha * x_tilde, alpha[:, 0], sigma[:, 0])
        return ((d - c_skip * x_tilde) / c_out).float()


def test_edm_preconditioning_recovers_the_exact_denoiser():
    mix = GaussianMixture.circle()
    model = ScoreSDE(nn.Identity(), sde=VPSDE(), parameterization="edm", data_shape=(2,))
    model.net = EDMOracle(mix, model)
    x, t = torch.randn(16, 2), torch.rand(16) * 0.9 + 0.05
    expected = mix.denoise(x, model.sde.alpha(t), model.sde.sigma(t)).float()
    assert torch.allclose(model.denoise(x, t), expected, atol=1e-4)
    s = torch.tensor([0.0, 0.5, 1e3], dtype=torch.float64)  # EDM's coefficients on the VE-equivalent data
    c_skip, c_out, c_in = scalings("edm", torch.ones_like(s), s, model.sigma_data)
    assert c_skip.tolist() == pytest.approx([1.0, 0.5, 0.25e-6], rel=1e-3)
    assert c_out[0].item() == 0.0 and c_in[1].item() == pytest.approx(1 / math.sqrt(0.5))


def test_score_sde_trains_on_toy2d():
    torch.manual_seed(0)
    dm = ShardDataModule("gaussians8", batch_size=256, batches_per_epoch=50)
    model = ScoreSDE(MLP(in_channels=2, hidden=128, num_layers=3, time_scale=1000.0), data_shape=dm.data_shape,
                     lr=2e-3, warmup_steps=20)
    trainer = tiny_trainer(max_steps=200, check_val_every_n_epoch=100)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < 0.6 * before


@pytest.mark.parametrize("sampler,steps", [("pc", 200), ("heun", 18), ("ode", None)])
def test_score_sde_samples_through_the_model_contract(sampler, steps):
    mix = GaussianMixture.circle()
    model = oracle_model(mix, "vp", "eps")
    x = model.sample(1000, generator=torch.Generator().manual_seed(0), sampler=sampler, steps=steps)
    assert x.shape == (1000, 2) and model.last_sample_nfe > 0
    # every sample lies on one of the modes: within 5 std of its nearest centre
    nearest = torch.cdist(x.double(), mix.means).min(1)
    assert (nearest.values < 0.5).float().mean() > 0.97
    counts = torch.bincount(nearest.indices, minlength=8).double() / 1000
    assert (counts - 0.125).abs().max() < 0.05


def test_score_sde_classifier_free_guidance_combines_cond_and_uncond(monkeypatch):
    from lightning_diffusion.diffusion import samplers

    class LabelNet(nn.Module):
        def forward(self, x, t, y=None):
            return torch.zeros_like(x) if y is None else (y.float() + 1)[:, None].expand_as(x) * 0.01

    model = ScoreSDE(LabelNet(), class_conditional=True, num_classes=3, data_shape=(2,))
    x, t, y = torch.randn(4, 2), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 2])
    cond, uncond = model.denoise(x, t, y), model.denoise(x, t, torch.full_like(y, -1))
    seen = {}

    def spy(name, denoise_fn, process, shape, **kw):
        seen["x0"] = denoise_fn(x, t)
        return samplers.SamplerOutput(x, 1)

    monkeypatch.setattr(samplers, "sample", spy)
    model.sample(4, y=y, guidance_scale=3.0)
    assert torch.allclose(seen["x0"], uncond + 3.0 * (cond - uncond), atol=1e-6)
    with pytest.raises(ValueError, match="guidance_scale=3.0: classifier-free guidance needs a class_conditional ScoreSDE"):
        ScoreSDE(LabelNet(), data_shape=(2,)).sample(4, guidance_scale=3.0)


def test_the_given_sde_is_not_changed_by_building_and_training():
    sde = VESDE(sigma_min=0.02, sigma_max=5.0, t_min=0.0)
    before = dict(vars(sde))
    model = ScoreSDE(MLP(in_channels=2, hidden=16, num_layers=1, time_scale=1000.0), sde=sde, t_eps=1e-3,
                     sample_steps=10, data_shape=(2,), warmup_steps=0)
    assert model.sde is not sde and model.sde.t_min == 1e-3 and model.sde.sigma_max == 5.0
    points = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"x": p} for p in points], batch_size=32)
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, loader)
    model.sample(4, generator=torch.Generator().manual_seed(0))
    assert vars(sde) == before


@pytest.mark.parametrize("option,value,names", [
    ("t_eps", 0.0, "t_eps=0.0"), ("t_eps", 1.5, "t_eps=1.5"), ("sigma_data", -1.0, "sigma_data=-1.0"),
    ("label_dropout", 1.5, "label_dropout=1.5"), ("importance_sampling", True, "importance_sampling=True"),
    ("sde", "vp", "sde='vp'"), ("parameterization", "x0", "unknown parameterization 'x0'"),
])
def test_a_bad_option_is_refused_naming_it(option, value, names):
    with pytest.raises(ValueError, match="^ScoreSDE: " + re.escape(names)):
        ScoreSDE(nn.Identity(), data_shape=(2,), **{option: value})
