"""The ``energy`` parameterization of the Gaussian-diffusion layer (issue 23, item 1): the net returns
one number per sample, the denoiser follows from its gradient by autograd.

Ground truth: a Gaussian mixture's exact energy ``-log p_t`` at every noise level
(:meth:`GaussianMixture.energy`), given to the model as its net, must give the exact denoiser of the
eps oracle and the exact score; training lowers the loss; every sampler runs on an energy model.
"""

import pytest
import torch

from lightning_diffusion import DDPM, MLP, EnergyHead, ScoreSDE
from lightning_diffusion.diffusion import samplers
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle
from lightning_diffusion.diffusion.schedules import NoiseSchedule
from lightning_diffusion.diffusion.sde import VESDE, VPSDE, DiscreteVP
from tiny import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

MIXTURE = GaussianMixture.random(3, 2, seed=3)


def _oracle_models(kind: str) -> tuple:
    """(the energy model, the eps model) on the exact mixture oracle, and the times to test at."""
    if kind == "ddpm":
        process = DiscreteVP(NoiseSchedule("linear", 100))
        make = lambda p: DDPM(MixtureOracle(MIXTURE, process, p), timesteps=100, parameterization=p, data_shape=(2,))
        return make("energy"), make("eps"), torch.tensor([0, 3, 30, 70, 99])
    sde = VESDE() if kind == "ve" else VPSDE()
    make = lambda p: ScoreSDE(MixtureOracle(MIXTURE, sde, p), sde=sde, parameterization=p, data_shape=(2,))
    return make("energy"), make("eps"), torch.tensor([1e-3, 0.05, 0.3, 0.7, 1.0])


@pytest.mark.parametrize("kind", ["ddpm", "vp", "ve"])
def test_exact_energy_gives_the_exact_denoiser_and_score(kind):
    """With the mixture's exact energy as the net, the energy row's denoiser ``(x_t - sigma grad E_net)
    / alpha`` equals Tweedie's exact x0_hat (and the eps oracle model's) to float tolerance, with and
    without gradients; ``energy()`` is ``-log p_t`` and ``-grad energy()`` the exact score."""
    energy_model, eps_model, times = _oracle_models(kind)
    x = 2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for t in times:
        tb = t.expand(64)
        alpha, sigma = energy_model.process.alpha(tb), energy_model.process.sigma(tb)
        exact = MIXTURE.denoise(x, alpha, sigma).float()
        with torch.no_grad():
            denoised = energy_model.denoise(x, tb)
            assert not denoised.requires_grad  # sampling keeps no graph
            eps_denoised = eps_model.denoise(x, tb)
        scale = exact.abs().max().item() + 1
        assert torch.allclose(denoised, exact, atol=2e-4 * scale, rtol=1e-4), (kind, float(t))
        assert torch.allclose(denoised, eps_denoised, atol=2e-4 * scale, rtol=1e-4), (kind, float(t))
        # the energy in nats and its score
        xg = x.clone().requires_grad_(True)
        energy = energy_model.energy(xg, tb)
        assert energy.shape == (64,)
        assert torch.allclose(energy.double(), MIXTURE.energy(x, alpha, sigma), rtol=1e-5, atol=1e-4)
        (grad,) = torch.autograd.grad(energy.sum(), xg)
        score = MIXTURE.score(x, alpha, sigma).float()
        assert torch.allclose(-grad, score, rtol=1e-3, atol=1e-3 * (score.abs().max().item() + 1))


@pytest.mark.parametrize("kind", ["ddpm", "vp"])
def test_exact_energy_gives_the_eps_oracle_likelihood(kind):
    """bits/dim runs unchanged on the energy row: the DDPM bound and ScoreSDE's probability-flow ODE
    NLL (exact divergence: a double backward through grad_x E) of the exact energy equal the eps
    oracle's to 1e-4 bits/dim."""
    energy_model, eps_model, _ = _oracle_models(kind)
    x = MIXTURE.sample(16, torch.Generator().manual_seed(0))[0].float()
    energy_bpd, eps_bpd = energy_model.bits_per_dim(x), eps_model.bits_per_dim(x)
    assert torch.isfinite(energy_bpd).all() and torch.allclose(energy_bpd, eps_bpd, atol=1e-4)


def test_training_keeps_the_graph_of_the_energy_gradient():
    """In training the loss reaches the net's weights through grad_x E (create_graph): a one-layer
    energy ``0.5 ||x - W x||^2`` has eps = (I - W)^T (I - W) x, and the loss's gradient by W is the
    finite difference of the loss."""
    linear = torch.nn.Linear(2, 2, bias=False)

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            return 0.5 * (x - linear(x)).pow(2).sum(1)

    model = DDPM(Net(), timesteps=20, parameterization="energy", data_shape=(2,))
    model.linear = linear
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    loss = model.loss({"x": x}, torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad(loss, linear.weight)
    with torch.no_grad():
        step = 1e-3
        linear.weight[0, 1] += step
        up = model.loss({"x": x}, torch.Generator().manual_seed(2))
        linear.weight[0, 1] -= 2 * step
        down = model.loss({"x": x}, torch.Generator().manual_seed(2))
    assert float(grad[0, 1]) != 0 and float(grad[0, 1]) == pytest.approx(float(up - down) / (2 * step), rel=1e-2)


def _toy_points(n: int, seed: int) -> torch.Tensor:
    return GaussianMixture.circle(8, 2.0, 0.1).sample(n, torch.Generator().manual_seed(seed))[0].float()


@pytest.mark.parametrize("family", ["ddpm", "score_sde"])
def test_training_lowers_the_loss_on_toy_points(family):
    """80 Adam steps of an EnergyHead(MLP) on the 8-Gaussian circle lower the fixed-seed loss by a
    third, every loss finite, for DDPM (min-SNR weighting) and ScoreSDE (sigma^2 weighting)."""
    torch.manual_seed(0)
    net = EnergyHead(MLP(in_channels=2, hidden=64, num_layers=2, time_scale=1000 if family == "score_sde" else 1))
    if family == "ddpm":
        model = DDPM(net, timesteps=100, parameterization="energy", min_snr_gamma=5.0, data_shape=(2,))
    else:
        model = ScoreSDE(net, parameterization="energy", data_shape=(2,))
    held_out = {"x": _toy_points(2048, 99)}

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(model.loss(held_out, torch.Generator().manual_seed(5)))

    before = fixed_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(80):
        # the loss's draws (t, eps) from a stream of their own: seeded like the data, eps would copy the data's noise
        loss = model.loss({"x": _toy_points(256, step)}, torch.Generator().manual_seed(10_000 + step))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_loss()
    assert after < 0.67 * before, (before, after)


def _energy_model(family: str, image: bool = False):
    torch.manual_seed(0)
    if image:
        net = EnergyHead(tiny_unet(model_channels=8, channel_mult=(1,), time_scale=1000 if family == "score_sde" else 1))
        shape = (1, 8, 8)
    else:
        net = EnergyHead(MLP(in_channels=2, hidden=16, num_layers=1, time_scale=1000 if family == "score_sde" else 1))
        shape = (2,)
    if family == "ddpm":
        return DDPM(net, timesteps=20, parameterization="energy", data_shape=shape)
    return ScoreSDE(net, parameterization="energy", data_shape=shape)


@pytest.mark.parametrize("family", ["ddpm", "score_sde"])
def test_every_sampler_runs_on_an_energy_model(family):
    """Every Gaussian sampler of the registry, by name through ``sample``, returns finite samples of
    the data's shape, and its network evaluations in ``last_sample_nfe``."""
    model = _energy_model(family)
    for name in samplers.SAMPLERS:
        steps = None if name == "ode" else 4
        x = model.sample(5, sampler=name, steps=steps, generator=torch.Generator().manual_seed(0))
        assert x.shape == (5, 2) and torch.isfinite(x).all(), name
        assert model.last_sample_nfe and model.last_sample_nfe > 0, name
    # the MCMC-corrected sampler runs on the model's own energy: one acceptance rate per level
    model.sample(5, sampler="annealed_mcmc", steps=4, generator=torch.Generator().manual_seed(0))
    acceptance = model.last_sample_acceptance
    assert acceptance is not None and len(acceptance) >= 3 and all(0.0 <= a <= 1.0 for a in acceptance)


def test_an_eps_model_refuses_the_energy_sampler():
    """annealed_mcmc needs an energy: a model of another parameterization refuses it by name."""
    from lightning_diffusion.errors import OptionError

    model = DDPM(MLP(in_channels=2, hidden=8, num_layers=1), timesteps=10, data_shape=(2,))
    with pytest.raises(OptionError, match="annealed_mcmc.*parameterization: energy"):
        model.sample(3, sampler="annealed_mcmc")


@pytest.mark.parametrize("family", ["ddpm", "score_sde"])
def test_bf16_sampling_of_an_energy_model(family):
    """``sample(precision='bf16')`` differentiates the bf16 copy of the net (UNet), or the float32 net
    under autocast where no copy can be made (FSDP2): finite images within a bf16 rounding of the
    float32 samples of the same seed."""
    model = _energy_model(family, image=True)
    with torch.no_grad():  # a sampling caller's context: the gradient is taken under enable_grad
        full = model.sample(3, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0))
        half = model.sample(3, sampler="ddim", steps=4, precision="bf16", generator=torch.Generator().manual_seed(0))
    assert half.shape == full.shape == (3, 1, 8, 8) and torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.1
    assert model.net.net.conv_out.weight.dtype == torch.float32  # the model's own net stays float32
    model._bf16_copy_of_net = lambda: None  # a sharded model's path: autocast around the float32 net
    with torch.no_grad():
        autocast = model.sample(3, sampler="ddim", steps=4, precision="bf16", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(autocast).all() and (autocast - full).abs().max() < 0.1


def test_energy_refusals_name_the_fix():
    """A net with the shape of x under parameterization energy, energy() of an eps model, and a
    hybrid DDPM with an energy net are refused with what to do."""
    model = DDPM(MLP(in_channels=2, hidden=8, num_layers=1), timesteps=10, parameterization="energy", data_shape=(2,))
    with pytest.raises(ValueError, match="one energy per sample.*EnergyHead"):
        model.loss({"x": torch.randn(4, 2)})
    eps = DDPM(MLP(in_channels=2, hidden=8, num_layers=1), timesteps=10, data_shape=(2,))
    with pytest.raises(ValueError, match="has no energy.*parameterization: energy"):
        eps.energy(torch.randn(4, 2), torch.tensor(3))
    with pytest.raises(ValueError, match="loss_type: simple"):
        DDPM(EnergyHead(MLP(in_channels=2, hidden=8, num_layers=1)), timesteps=10, parameterization="energy",
             loss_type="hybrid", data_shape=(2,))
    with pytest.raises(ValueError, match="shape of x"):
        EnergyHead(MLP(in_channels=2, out_channels=4, hidden=8, num_layers=1))(torch.randn(3, 2), torch.zeros(3))


def test_energy_head_forms():
    """``residual``: 0.5 ||x - f||^2, whose gradient at a zero-initialised UNet is x (eps of pure
    noise) and trains; ``norm``: 0.5 ||f||^2, zero with no gradient there (why residual is the default)."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 5.0)
    residual, norm = EnergyHead(tiny_unet()), EnergyHead(tiny_unet(), form="norm")
    assert residual.form == "residual" and residual.data_kind == "images"
    assert torch.allclose(residual(x, t), 0.5 * x.pow(2).flatten(1).sum(1))
    assert torch.equal(norm(x, t), torch.zeros(2))
    model = DDPM(norm, timesteps=20, parameterization="energy", data_shape=(1, 8, 8))
    model.loss({"x": x}).backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in norm.parameters())
    model = DDPM(residual, timesteps=20, parameterization="energy", data_shape=(1, 8, 8))
    model.loss({"x": x}).backward()
    assert residual.net.conv_out.weight.grad.abs().max() > 0


def test_energy_model_fits_through_the_cli(tmp_path):
    """``fit --config`` with ``net: {class_path: EnergyHead, init_args: {net: {class_path: MLP}}}``
    and ``parameterization: energy`` trains, writes its checkpoint and samples the final scatter plot."""
    from conftest import fit_run

    net = {"class_path": "EnergyHead",
           "init_args": {"form": "residual", "net": {"class_path": "lightning_diffusion.MLP",
                                                       "init_args": {"hidden": 16, "num_layers": 1}}}}
    import json

    run = fit_run(tmp_path, "ddpm_toy2d", "--trainer.max_steps=3", "--model.init_args.timesteps=10",
                  "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1",
                  "--data.init_args.batches_per_epoch=3", "--data.init_args.batch_size=64",
                  "--model.init_args.parameterization=energy", f"--model.init_args.net={json.dumps(net)}")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["parameterization"] == "energy"
    assert any(k.startswith("net.net.") for k in ckpt["state_dict"])
    assert (run / "samples" / "final.png").is_file()
    assert "val/loss" in (run / "metrics.csv").read_text()  # validated (under inference_mode) after the epoch


def test_validation_under_inference_mode():
    """Lightning validates under ``torch.inference_mode``, where autograd records nothing: the energy
    row still takes its gradient there (on copies), so ``validate`` logs a finite val/loss and the
    denoiser under inference mode equals the one under ``no_grad``."""
    from tiny import tiny_trainer

    model = _energy_model("ddpm")
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"x": row} for row in x], batch_size=4)
    (metrics,) = tiny_trainer().validate(model, loader, verbose=False)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    t = torch.full((8,), 7)
    with torch.no_grad():
        reference = model.denoise(x, t)
    with torch.inference_mode():
        assert torch.equal(model.denoise(x.clone(), t.clone()), reference)
