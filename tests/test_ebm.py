"""The energy-based model against exact ground truth: log Z by quadrature and by AIS of known energies,
NCE's normaliser against the quadrature log Z of its own energy, training that lowers the exact NLL,
the divergence guard, and exact resume with the replay buffer through the CLI."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from tiny import shrink_config
from lightning_diffusion.diffusion.mixture import GaussianMixture
from lightning_diffusion.models.ebm import EBM
from lightning_diffusion.nets.energy import EnergyConvNet, EnergyMLP, ScalarEnergy

pytestmark = pytest.mark.usefixtures("one_thread")


class MixtureEnergy(nn.Module):
    """``E(x) = -log p_mix(x) + c``: Z = exp(-c) exactly."""

    data_kind = "points"

    def __init__(self, mixture: GaussianMixture, c: float):
        super().__init__()
        self.mixture, self.c = mixture, c
        self.dummy = nn.Parameter(torch.zeros(1))  # an optimizer needs one

    def forward(self, x):
        return -self.mixture.log_prob(x.double()).to(x.dtype) + self.c + 0 * self.dummy


class GaussianEnergy(nn.Module):
    """``E(x) = ||x - m||^2 / (2 s^2)`` over images: log Z = (D / 2) log(2 pi s^2)."""

    data_kind = "images"

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return (x - self.mean).pow(2).flatten(1).sum(1) / (2 * self.std**2) + 0 * self.dummy


def _points(n: int, seed: int) -> torch.Tensor:
    return GaussianMixture.circle().sample(n, torch.Generator().manual_seed(seed))[0].float()


def test_bits_per_dim_of_points_is_the_exact_nll():
    """With E = -log p + c, bits_per_dim must be -log p / (2 ln 2) whatever c: log Z by quadrature."""
    mixture = GaussianMixture.circle()
    model = EBM(MixtureEnergy(mixture, c=3.7), data_shape=(2,), quadrature_points=801)
    model.fit_base(_points(2000, 0))
    log_z, stderr, method = model.log_partition()
    assert method == "quadrature" and stderr == 0 and log_z == pytest.approx(-3.7, abs=1e-3)
    x = _points(500, 1)
    exact = -mixture.log_prob(x.double()) / (2 * math.log(2))
    assert torch.allclose(model.bits_per_dim(x).double(), exact, atol=1e-3)
    assert model.bpd_estimator() == "exact-quadrature"


def test_ais_log_z_of_a_gaussian_image_energy():
    """Images [1, 4, 4]: AIS from the fitted base recovers the exact log Z within 4 standard errors
    (+ 0.05 nats of bias allowance); the bits/dim of 8-bit data add the 7 bits of the 1/128 bins."""
    torch.manual_seed(0)
    std = 0.3
    model = EBM(GaussianEnergy(0.1, std), data_shape=(1, 4, 4), ais_chains=256, ais_steps=200, step_size=0.1)
    model.fit_base((0.1 + 0.5 * torch.randn(500, 1, 4, 4)).clamp(-1, 1))  # a mismatched base
    log_z, stderr, method = model.log_partition(torch.Generator().manual_seed(0))
    exact = 8 * math.log(2 * math.pi * std**2)
    assert method == "ais" and model.bpd_estimator() == "ais-logZ"
    assert abs(log_z - exact) < 4 * stderr + 0.05, (log_z, exact, stderr)
    x = torch.round((torch.rand(3, 1, 4, 4) * 2 - 1) * 127.5) / 127.5
    bpd = model.bits_per_dim(x, generator=torch.Generator().manual_seed(1))
    assert bpd.shape == (3,) and torch.all(bpd > 7.0)


def test_whitened_chains_serve_spreads_100x_apart():
    """A Gaussian image energy whose pixels' stds run from 0.003 to 0.3 (the digits' black corners
    against their strokes): with ``whiten_chains`` one step size in base units fits every pixel, so
    AIS recovers the exact log Z within 4 standard errors and 200 MALA steps from the (1.3x too wide)
    base give every pixel its variance within 15%. In data units the step that the narrowest pixel
    allows leaves the widest ones where the base put them (variance still 1.3^2 = 1.7x too large)."""
    torch.manual_seed(0)
    std = torch.logspace(math.log10(0.003), math.log10(0.3), 16).reshape(1, 4, 4)

    class Anisotropic(GaussianEnergy):
        def forward(self, x):
            return ((x - self.mean) / std).pow(2).flatten(1).sum(1) / 2 + 0 * self.dummy

    exact = float(torch.log(2 * math.pi * std.double() ** 2).sum() / 2)
    fit = 0.1 + 1.3 * std * torch.randn(2000, 1, 4, 4)  # the base: fitted to data 1.3x wider
    errors = {}
    for whiten in (True, False):
        model = EBM(Anisotropic(0.1, 1.0), data_shape=(1, 4, 4), ais_chains=256, ais_steps=200,
                    step_size=0.5 if whiten else 0.005, whiten_chains=whiten, sampler="mala")
        model.fit_base(fit)
        log_z, stderr, _ = model.log_partition(torch.Generator().manual_seed(0))
        errors[whiten] = (log_z - exact, stderr)
        x = model.sample(4000, sampler="mala", steps=200, generator=torch.Generator().manual_seed(1))
        ratio = (x.double().var(0) / std.double() ** 2).flatten()
        if whiten:
            assert torch.all((ratio - 1).abs() < 0.15), ratio
        else:
            assert torch.all(ratio[-4:] > 1.4), ratio
    assert abs(errors[True][0]) < 4 * errors[True][1] + 0.05, errors


def _train(model: EBM, steps: int, lr: float = 1e-3) -> None:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model.loss({"x": _points(512, torch.randint(0, 2**31, ()).item())})
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_nce_learns_its_own_normaliser():
    """NCE's learned c approaches the log Z of its own energy (quadrature): |c - log Z| < 0.2 nats
    after 800 steps (0.14 measured; 0.11 after 1600), from 6.1 nats off at the start."""
    torch.manual_seed(0)
    model = EBM(EnergyMLP(2, 64, 3), objective="nce", data_shape=(2,))
    model.fit_base(_points(2000, 0))
    start_gap = abs(float(model.normalizer().detach()) - model.log_partition()[0])
    _train(model, 800)
    gap = abs(float(model.normalizer().detach()) - model.log_partition()[0])
    assert start_gap > 5.0 and gap < 0.2, (start_gap, gap)


@pytest.mark.parametrize("objective", ["cd", "dsm"])
def test_training_lowers_the_exact_nll(objective):
    """A few hundred steps lower the exact (quadrature) NLL of held-out points by over 1.5 bits/dim
    (from about 4.3; the mixture's own NLL, the floor, is 0.23)."""
    torch.manual_seed(0)
    model = EBM(EnergyMLP(2, 64, 3), objective=objective, data_shape=(2,), step_size=0.05, mcmc_steps=10,
                buffer_size=2000)
    model.fit_base(_points(2000, 0))
    test = _points(1000, 5)
    before = float(model.bits_per_dim(test).mean())
    _train(model, 200)
    after = float(model.bits_per_dim(test).mean())
    assert before - after > 1.5, (before, after)
    if objective == "cd":
        assert model._replay["age"].float().mean() > 0  # the buffer's chains ran on


def test_divergence_guard_names_the_step():
    model = EBM(MixtureEnergy(GaussianMixture.circle(), c=1e6), data_shape=(2,), objective="nce")
    with pytest.raises(FloatingPointError, match=r"diverged at global step 0 .*no checkpoint has been written"):
        model.loss({"x": _points(64, 0)})


def test_energy_nets():
    x = torch.randn(5, 1, 8, 8)
    assert EnergyConvNet(1, 8, (8, 16), spectral_norm=True)(x).shape == (5,)
    from lightning_diffusion.nets import MLP

    wrapped = ScalarEnergy(MLP(in_channels=2, hidden=16, num_layers=1))
    assert wrapped(torch.randn(5, 2)).shape == (5,) and wrapped.data_kind == "points"
    with pytest.raises(ValueError, match="EnergyConvNet takes images"):
        EnergyConvNet(1, None)


def test_sample_options_are_checked():
    model = EBM(EnergyMLP(2, 16, 1), data_shape=(2,))
    model.fit_base(_points(100, 0))
    with pytest.raises(ValueError, match="stpes"):
        model.sample(4, stpes=3)
    with pytest.raises(ValueError, match="init"):
        model.sample(4, init="noise")
    assert model.sample(4, steps=3, generator=torch.Generator().manual_seed(0)).shape == (4, 2)


def _tiny_config(path: Path) -> Path:
    """configs/ebm_toy2d.yaml, tiny: 6 batches of 64 per epoch, a checkpoint every epoch, validation
    and the Likelihood callback every epoch, with EMA and WandbSamples (PNGs only) added."""
    return shrink_config("ebm_toy2d", path, {
        "trainer": dict(logger=False, enable_progress_bar=False, check_val_every_n_epoch=1),
        "model.init_args": dict(mcmc_steps=5, buffer_size=200, sample_steps=5, quadrature_points=101),
        "model.init_args.net.init_args.hidden": 32, "data.init_args": dict(batch_size=64, batches_per_epoch=6)},
        callbacks={"LastCheckpoint": dict(every_n_train_steps=6), "Likelihood": dict(every_n_epochs=1, num_batches=1),
                   "SampleGrid": dict(num_samples=64)},
        add_callbacks=[{"class_path": "EMA", "init_args": {"decay": 0.9}},
                       {"class_path": "WandbSamples", "init_args": {"every_n_epochs": 1, "num_samples": 16}}])


def test_cli_fit_and_exact_resume_with_the_replay_buffer(tmp_path):
    """12 steps straight, and 6 + resume + 6 (the checkpoint after an epoch's last batch, validation in
    between): the same parameters, Adam moments, base and replay buffer, bitwise."""
    config = _tiny_config(tmp_path / "ebm.yaml")

    def fit(run: Path, steps: int, *extra: str):
        run_cli("fit", "--config", str(config), f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={run}",
                *extra, cwd=tmp_path)
        return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    straight = fit(tmp_path / "a", 12)
    fit(tmp_path / "b", 6)
    resumed = fit(tmp_path / "b", 12, f"--ckpt_path={tmp_path}/b/checkpoints/last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 12
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    (buf_a,), (buf_b,) = straight["ebm_replay_buffers"], resumed["ebm_replay_buffers"]
    assert torch.equal(buf_a["x"], buf_b["x"]) and torch.equal(buf_a["age"], buf_b["age"])
    assert torch.equal(buf_a["rng"], buf_b["rng"])  # the training generator continues where it stopped
    assert int(buf_a["age"].max()) > 0
    assert (tmp_path / "a" / "samples" / "final.png").is_file()
    # EMA and WandbSamples work through the contract: the averages resume exactly, the pictures are there
    ema_a, ema_b = (next(v for k, v in c["callbacks"].items() if k.startswith("EMA"))["shadow"] for c in (straight, resumed))
    assert ema_a and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert len(list((tmp_path / "a" / "samples").glob("*.png"))) >= 3
