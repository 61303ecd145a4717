"""bits/dim of the ``energy`` parameterization (issue 23, item 4): the probability-flow ODE's NLL of an
energy ScoreSDE, and the second estimator, AIS on the t -> 0 energy (``estimator="ais"``,
``ais-energy-t0``), against the exact NLL of a Gaussian mixture whose exact energy is the model's
energy at every t."""

import math

import lightning as L
import pytest
import torch

from lightning_diffusion import DDPM, MLP, EnergyHead, ScoreSDE
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle
from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.diffusion.sde import VPSDE, DiscreteVP
from lightning_diffusion.errors import OptionError
from tiny import tiny_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

MIXTURE = GaussianMixture.random(3, 2, seed=3)
WIDE = GaussianMixture.random(4, 6, seed=1, spread=1.0, std=0.4)  # 6-D: AIS with a real path to anneal


def _exact_bpd_at_t_min(mixture: GaussianMixture, process, t_min: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log2 of the density of ``x_{t_min} / alpha_min`` at x (the model AIS scores), per dimension."""
    alpha, sigma = process.alpha(t_min.reshape(1)).double(), process.sigma(t_min.reshape(1)).double()
    nats = -mixture.log_prob(alpha * x.double(), alpha, sigma) - x.shape[1] * torch.log(alpha)
    return nats / (x.shape[1] * math.log(2))


def _energy_oracle(kind: str, mixture: GaussianMixture):
    if kind == "ddpm":
        process = DiscreteVP(NoiseSchedule("linear", 100))
        return DDPM(MixtureOracle(mixture, process, "energy"), timesteps=100, parameterization="energy",
                    data_shape=(mixture.dim,))
    sde = VPSDE()
    return ScoreSDE(MixtureOracle(mixture, sde, "energy"), sde=sde, parameterization="energy", data_shape=(mixture.dim,))


def test_probability_flow_nll_of_the_exact_energy_is_the_mixture_nll():
    """An energy ScoreSDE whose energy is the mixture's exact ``-log p_t`` at every t: the ODE's
    bits/dim (score = -grad_x E, exact divergence by a double backward) equals the mixture's exact
    NLL at t_eps per sample to 0.02 bits/dim and on average to 0.005 (measured: 0.012 and 0.0016, the
    same at rtol 1e-7: the model's prior N(0, I) at t = 1, where the mixture's marginal still has
    means alpha(1) mu = 0.0066 mu)."""
    model = _energy_oracle("vp", MIXTURE)
    x = MIXTURE.sample(32, torch.Generator().manual_seed(0))[0].float()
    bpd = model.bits_per_dim(x)
    exact = -MIXTURE.log_prob(x, model.sde.alpha(torch.tensor(1e-5)), model.sde.sigma(torch.tensor(1e-5))) / (2 * math.log(2))
    assert model.bpd_estimator() == "ode-exact"
    assert torch.allclose(bpd.double(), exact, atol=2e-2), (bpd - exact).abs().max()
    assert abs((bpd.double() - exact).mean()) < 5e-3


@pytest.mark.parametrize("kind,mixture", [("vp", MIXTURE), ("ddpm", MIXTURE), ("vp", WIDE)])
def test_ais_on_the_t0_energy_matches_the_exact_nll_within_its_standard_error(kind, mixture):
    """``bits_per_dim(estimator="ais")`` of the exact mixture energy: the energy term is exact, so the
    per-sample error is AIS's ``log Z_0`` (exactly 0: the energy is normalised) over D ln 2, the same
    for every sample; it lies within 4 of AIS's reported standard errors of 0. The estimator is
    named ``ais-energy-t0``; ``last_ais`` holds log Z, its stderr (> 0) and MALA's acceptance."""
    model = _energy_oracle(kind, mixture)
    x = mixture.sample(64, torch.Generator().manual_seed(0))[0].float()
    bpd = model.bits_per_dim(x, estimator="ais", ais_chains=256, ais_steps=200, ais_step_size=0.15,
                             generator=torch.Generator().manual_seed(1))
    exact = _exact_bpd_at_t_min(mixture, model.process, model.ais_time, x)
    ais = model.last_ais
    error = bpd.double() - exact
    assert model.bpd_estimator(estimator="ais") == "ais-energy-t0"
    assert torch.allclose(error, error.mean().expand_as(error), atol=1e-4)  # one log Z for every sample
    assert error.mean().item() == pytest.approx(ais["log_z"] / (mixture.dim * math.log(2)), abs=1e-4)
    assert 0 < ais["stderr"] < 0.2 and 0.5 < ais["acceptance"] <= 1
    assert abs(ais["log_z"]) < 4 * ais["stderr"], ais


def test_ais_options_are_checked_and_never_silently_unused():
    """``estimator="ais"`` on an eps model, an AIS option with the default estimator, and an ODE or
    VLB option with AIS are refused by name (OptionError), as the Likelihood callback's check reads them."""
    eps_model = ScoreSDE(MixtureOracle(MIXTURE, VPSDE(), "eps"), parameterization="eps", data_shape=(2,))
    with pytest.raises(OptionError, match="estimator='ais'.*needs an energy"):
        eps_model.check_bpd_options(estimator="ais")
    energy_sde, energy_ddpm = _energy_oracle("vp", MIXTURE), _energy_oracle("ddpm", MIXTURE)
    with pytest.raises(OptionError, match="ais_chains=8: is an option of estimator='ais', not of estimator='ode'"):
        energy_sde.check_bpd_options(ais_chains=8)
    with pytest.raises(OptionError, match="divergence='exact': is an option of estimator='ode'"):
        energy_sde.check_bpd_options(estimator="ais", divergence="exact")
    with pytest.raises(OptionError, match="steps=10: is an option of estimator='vlb'"):
        energy_ddpm.check_bpd_options(estimator="ais", steps=10)
    with pytest.raises(OptionError, match="ais_transition"):
        energy_ddpm.check_bpd_options(estimator="ais", ais_transition="gibbs")
    with pytest.raises(OptionError, match="ais_chains"):
        energy_ddpm.check_bpd_options(estimator="ais", ais_chains=0)
    energy_ddpm.check_bpd_options(estimator="ais", ais_chains=8, ais_transition="hmc", num_dequantizations=2)


def test_ais_on_8bit_images_is_dequantized_and_the_callback_logs_its_name(tmp_path):
    """An energy DDPM (EnergyHead of an MLP on 2x2 'images') through a Trainer with
    ``Likelihood(bpd_options={estimator: ais, ...})``: ``val/bpd_ais-energy-t0`` is logged, finite,
    and equals the model's own bits_per_dim of the dequantized batch (+7 bits/dim offset)."""
    import json

    from lightning_diffusion import Likelihood

    class Images(L.LightningDataModule):
        data_shape = (1, 2, 2)

        def _loader(self):
            k = torch.randint(0, 256, (32, 1, 2, 2), generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader([{"x": v} for v in (k / 127.5 - 1)], batch_size=16)

        train_dataloader = val_dataloader = _loader

    torch.manual_seed(0)
    net = EnergyHead(_FlatMLP())
    model = DDPM(net, timesteps=20, parameterization="energy", data_shape=(1, 2, 2), warmup_steps=0)
    options = {"estimator": "ais", "ais_chains": 16, "ais_steps": 20, "ais_step_size": 0.01}
    trainer = tiny_trainer(max_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="lk"),
                           callbacks=[Likelihood(num_batches=1, bpd_options=options)], limit_val_batches=1)
    trainer.fit(model, datamodule=Images())
    run = tmp_path / "lk" / "version_0"
    records = [json.loads(line) for line in (run / "metrics" / "likelihood.jsonl").read_text().splitlines()]
    assert records[-1]["estimator"] == "ais-energy-t0"
    assert "val/bpd_ais-energy-t0" in (run / "metrics.csv").read_text().splitlines()[0].split(",")
    bpd = records[-1]["bpd"]
    assert math.isfinite(bpd) and bpd > 7 - 1  # discrete bits/dim: the dequantized density plus log2(128)


class _FlatMLP(torch.nn.Module):
    """An MLP on flattened [B, 1, 2, 2] images, shaped like them (the EnergyHead's f)."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP(in_channels=4, hidden=16, num_layers=1)

    def forward(self, x, t, y=None):
        return self.mlp(x.flatten(1), t, y).reshape(x.shape)
