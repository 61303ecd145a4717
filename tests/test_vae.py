"""The VAE against ground truth: a linear-Gaussian model with a known marginal likelihood (the ELBO in
closed form; the IWAE bound rising with K towards log p(x)), chunked IWAE with bounded memory, every
decoder likelihood, the KL schedule and free bits, training on digits, and the CLI."""

import math

import pytest
import torch
from torch import nn

from conftest import fit_run
from tiny import tiny_trainer
from lightning_diffusion import VAE, ConvVAENet, MLPVAENet, ShardDataModule

LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- a linear-Gaussian model with a known marginal ----------------------------------------------
class LinearGaussianNet(nn.Module):
    """``q(z | x) = N(A x + c, diag exp(logvar))``; ``decode(z) = z`` (the model's Linear head is then
    ``W z + b``). Records the rows of every decoder call."""

    def __init__(self, A, c, logvar):
        super().__init__()
        self.A, self.c, self.logvar = nn.Parameter(A), nn.Parameter(c), nn.Parameter(logvar)
        self.latent_dim = self.out_features = A.shape[0]
        self.rows = []

    def encode(self, x):
        return torch.cat([x @ self.A.T + self.c, self.logvar.expand(x.shape[0], -1)], 1)

    def decode(self, z):
        self.rows.append(z.shape[0])
        return z


@pytest.fixture(scope="module")
def linear_gaussian():
    """p(z) = N(0, I_2), p(x | z) = N(W z + b, s^2 I_3): the marginal is N(b, W W^T + s^2 I). The encoder
    is the exact posterior's mean shifted and its variance doubled, so the ELBO is visibly loose."""
    torch.manual_seed(0)
    D, d, s = 3, 2, 0.5
    W = torch.tensor([[1.0, 0.3], [-0.5, 0.8], [0.2, -1.1]], dtype=torch.float64)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    post_cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + W.T @ W / s**2)
    A = post_cov @ W.T / s**2  # exact posterior mean: A (x - b)
    # the model in float32, as it runs (bits_per_dim computes in float32); the ground truth in float64
    net = LinearGaussianNet((1.2 * A).float(), (-A @ b + 0.3).float(), (2 * post_cov.diagonal()).log().float())
    model = VAE(net, likelihood="gaussian", decoder_std=s, data_shape=(D,))
    with torch.no_grad():
        model.head.weight.copy_(W)
        model.head.bias.copy_(b)
    marginal = torch.distributions.MultivariateNormal(b, W @ W.T + s**2 * torch.eye(D, dtype=torch.float64))
    x = marginal.sample((1500,))
    q_mean, q_logvar = (t.detach().double() for t in model._encode(x.float()))
    q = torch.distributions.MultivariateNormal(q_mean, torch.diag_embed(q_logvar.exp()))
    exact_post = torch.distributions.MultivariateNormal((x - b) @ A.T, post_cov)
    log_px = marginal.log_prob(x)
    elbo = log_px - torch.distributions.kl_divergence(q, exact_post)  # ELBO = log p(x) - KL(q || p(z | x))
    return {"model": model, "x": x, "log_px": log_px, "elbo": elbo, "D": D}


def bound_nats(model, x, k, seed):
    bits = model.bits_per_dim(x.float(), num_importance_samples=k, generator=torch.Generator().manual_seed(seed))
    return -bits.double() * x.shape[1] * LN2  # a lower bound on log p(x), nats


def test_elbo_matches_its_closed_form(linear_gaussian):
    lg = linear_gaussian
    mc = bound_nats(lg["model"], lg["x"], 1, seed=1)
    diff = mc - lg["elbo"]
    se = diff.std().item() / math.sqrt(len(diff))
    assert abs(diff.mean().item()) < 4 * se, (diff.mean().item(), se)
    gap = (lg["log_px"] - lg["elbo"]).mean().item()
    assert gap > 0.2  # the encoder is far enough from the posterior for the IWAE test to mean something
    assert lg["model"].bpd_estimator(1) == "elbo" and lg["model"].bpd_estimator(1000) == "iwae-1000"


def test_iwae_rises_with_k_and_approaches_log_px(linear_gaussian):
    """E[L_K] is non-decreasing in K and tends to log p(x) (Burda et al. 2016, Theorem 1). Averaged over
    300 points: observed gaps log p(x) - L_K of about 0.33, 0.08, 0.02 and 0.003 nats at K = 1, 10, 100
    and 1000, each step up many standard errors."""
    lg = linear_gaussian
    model, x, log_px = lg["model"], lg["x"], lg["log_px"]
    bounds = {k: bound_nats(model, x, k, seed=2) for k in (1, 10, 100, 1000)}
    gaps = {k: (log_px - v).mean().item() for k, v in bounds.items()}
    for lo, hi in ((1, 10), (10, 100), (100, 1000)):
        step = bounds[hi] - bounds[lo]
        se = step.std().item() / math.sqrt(len(step))
        assert step.mean().item() > 3 * se, (lo, hi, gaps)
    final = log_px - bounds[1000]
    se = final.std().item() / math.sqrt(len(final))
    assert -3 * se < final.mean().item() < 0.01, gaps  # within 0.01 nats (0.005 bits/dim) of log p(x)
    assert gaps[1] > 10 * gaps[1000]


def test_iwae_in_chunks_keeps_rows_bounded(linear_gaussian):
    model, x = linear_gaussian["model"], linear_gaussian["x"][:20].float()
    net = model.net
    net.rows.clear()
    model.bits_per_dim(x, 1)
    assert net.rows == [20]
    net.rows.clear()
    model.bits_per_dim(x, 1000)  # default: no more rows per pass than the batch (K = 1)
    assert max(net.rows) == 20 and sum(net.rows) == 20 * 1000
    net.rows.clear()
    model.bits_per_dim(x, 1000, chunk_rows=8)  # fewer rows than data: the data are split too
    assert max(net.rows) <= 8 and sum(net.rows) == 20 * 1000
    net.rows.clear()
    out = model.bits_per_dim(x, 1000, chunk_rows=4000)
    assert max(net.rows) == 4000 and out.shape == (20,)
    with pytest.raises(ValueError, match="num_importance_samples"):
        model.bits_per_dim(x, 0)


# -- likelihoods, the KL schedule, errors --------------------------------------------------------
DIGITS = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 127.5 - 1


def small_net(in_channels=1, image_size=8):
    return ConvVAENet(in_channels=in_channels, image_size=image_size, latent_dim=4, channels=(8, 16), num_blocks=1)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "discretized_logistic", "dmol"])
def test_every_likelihood_scores_samples_and_reconstructs(likelihood):
    model = VAE(small_net(), likelihood=likelihood, data_shape=(1, 8, 8), num_mixtures=3)
    loss = model.loss({"x": DIGITS})
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    bits = model.bits_per_dim(DIGITS, 5)
    assert bits.shape == (6,) and torch.isfinite(bits).all() and (bits > 0).all()  # discrete data: NLL >= 0
    samples = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, 1, 8, 8) and samples.abs().max() <= 1
    # every decoder samples on the 8-bit grid (bernoulli: -1 or 1)
    assert torch.allclose(samples, torch.round((samples + 1) * 127.5) / 127.5 - 1, atol=1e-6)
    assert model.reconstruct(DIGITS).shape == DIGITS.shape


def test_rgb_dmol_and_points():
    rgb = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(1)) / 127.5 - 1
    model = VAE(small_net(in_channels=3), likelihood="dmol", data_shape=(3, 8, 8))
    assert model.head.out_channels == 100
    assert torch.isfinite(model.bits_per_dim(rgb, 3)).all() and model.sample(2).shape == (2, 3, 8, 8)
    points = VAE(MLPVAENet(hidden=16, num_layers=1), likelihood="gaussian", data_shape=(2,))
    bits = points.bits_per_dim(torch.randn(4, 2), 10)
    assert bits.shape == (4,) and torch.isfinite(bits).all()
    assert points.sample(3).shape == (3, 2)


def test_errors_name_the_option():
    with pytest.raises(ValueError, match="'dmol' scores 8-bit images"):
        VAE(MLPVAENet(), likelihood="dmol", data_shape=(2,))
    with pytest.raises(ValueError, match="unknown likelihood 'mse'"):
        VAE(small_net(), likelihood="mse", data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="data_shape"):
        VAE(small_net())
    with pytest.raises(ValueError, match="has no `encode`"):
        VAE(nn.Linear(2, 2), data_shape=(2,))
    with pytest.raises(ValueError, match="image_size 10 is not divisible"):
        ConvVAENet(image_size=10, channels=(8, 16, 32))
    model = VAE(small_net(), data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, y=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="decoder='mode': must be 'sample'"):
        model.sample(2, decoder="mode")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.bits_per_dim(2 * DIGITS)


def test_kl_warmup_beta_and_free_bits():
    model = VAE(small_net(), data_shape=(1, 8, 8), beta=0.5, kl_warmup_steps=100)
    assert model.kl_weight() == 0.0
    model.beta = 2.0
    model.kl_warmup_steps = 0
    assert model.kl_weight() == 2.0
    # free bits: sum_d max(lambda, batch-mean KL_d), per latent dimension
    kl = torch.tensor([[0.1, 2.0, 0.0, 0.4], [0.3, 1.0, 0.0, 0.6]])
    model.free_bits = 0.25
    assert model._free_bits_kl([kl]).item() == pytest.approx(0.25 + 1.5 + 0.25 + 0.5)
    model.free_bits = 0.0
    assert model._free_bits_kl([kl]).item() == pytest.approx(kl.mean(0).sum().item())
    # the objective in training vs the plain negative ELBO in eval mode, both in bits/dim
    model = VAE(small_net(), data_shape=(1, 8, 8), beta=0.0)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    model.train()
    terms = model._terms({"x": DIGITS}, g())
    assert terms["loss"].item() == pytest.approx(terms["recon"].item(), rel=1e-6)  # beta 0: reconstruction only
    assert terms["nelbo"].item() == pytest.approx(terms["recon"].item() + terms["kl"].item(), rel=1e-6)
    model.eval()
    assert model.loss({"x": DIGITS}, g()).item() == pytest.approx(terms["nelbo"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="free_bits"):
        VAE(small_net(), data_shape=(1, 8, 8), free_bits=-1.0)


# -- training -------------------------------------------------------------------------------------
def val_batch(dm):
    return next(iter(dm.val_dataloader()))["x"]


def test_training_on_digits_lowers_val_bits_per_dim():
    torch.manual_seed(0)
    dm = ShardDataModule("digits", batch_size=128, batches_per_epoch=40)
    model = VAE(ConvVAENet(latent_dim=8, channels=(16, 32), num_blocks=1), data_shape=dm.data_shape, lr=2e-3,
                warmup_steps=20, kl_warmup_steps=50)
    x = val_batch(dm)
    before = model.bits_per_dim(x).mean().item()
    trainer = tiny_trainer(max_steps=120, check_val_every_n_epoch=3)
    trainer.fit(model, datamodule=dm)
    after = model.bits_per_dim(x).mean().item()
    iwae = model.bits_per_dim(x, 20).mean().item()
    # observed: 5.01 -> 3.93 bits/dim (ELBO), IWAE-20 a little lower
    assert after < before - 0.5 and after < 4.5, (before, after)
    assert iwae < after
    assert {"train/loss", "train/kl", "train/recon", "val/loss", "val/active_units"} <= set(trainer.callback_metrics)
    assert 0 < trainer.callback_metrics["val/active_units"] <= 8


def test_cli_fit_and_reload(tmp_path):
    run = fit_run(tmp_path, "vae_digits", "--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3",
                  "--data.init_args.num_workers=0", "--trainer.check_val_every_n_epoch=1")
    model = VAE.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, ConvVAENet) and model.data_shape == (1, 8, 8)
    assert model.sample(4).shape == (4, 1, 8, 8)
    assert (run / "samples" / "final.png").is_file()
    metrics = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/loss" in metrics and "val/active_units" in metrics
