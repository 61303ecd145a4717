"""The VAE math against ground truth: the Gaussian KL against Monte Carlo, bin probabilities that sum
to one over the 256 levels (discretized logistic, Gaussian, DMoL with RGB coupling), likelihoods
against torch.distributions, log-mean-exp in chunks, and bits/dim conversions by hand."""

import math

import pytest
import torch

from lightning_diffusion import likelihoods as dist
from lightning_diffusion.likelihoods import decoders

LN2 = math.log(2)
PIXELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 8-bit grid in [-1, 1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_diagonal_gaussian_kl_against_monte_carlo():
    """KL(q || p) of 5-D diagonal Gaussians, closed form (dist.normal_kl summed) vs the Monte Carlo mean of
    log q(z) - log p(z), z ~ q, within 4 standard errors (400k draws: SE ~ 0.003 nats)."""
    g = torch.Generator().manual_seed(0)
    mq, lq = torch.randn(5, generator=g, dtype=torch.float64), 0.5 * torch.randn(5, generator=g, dtype=torch.float64)
    mp, lp = torch.randn(5, generator=g, dtype=torch.float64), 0.5 * torch.randn(5, generator=g, dtype=torch.float64)
    exact = dist.normal_kl(mq, lq, mp, lp).sum().item()
    z = dist.diagonal_gaussian_sample(mq.expand(400_000, 5), lq.expand(400_000, 5), g)
    log_ratio = dist.diagonal_gaussian_log_prob(z, mq, lq) - dist.diagonal_gaussian_log_prob(z, mp, lp)
    se = log_ratio.std().item() / math.sqrt(len(log_ratio))
    assert abs(log_ratio.mean().item() - exact) < 4 * se, (log_ratio.mean().item(), exact, se)
    assert exact > 0.5  # a KL far from 0, so the test can fail
    # the density against torch.distributions, and the standard-normal special case by hand
    ref = torch.distributions.Normal(mq, (0.5 * lq).exp()).log_prob(z[:10]).sum(1)
    assert torch.allclose(dist.diagonal_gaussian_log_prob(z[:10], mq, lq), ref, atol=1e-10)
    zero = torch.zeros((), dtype=torch.float64)
    by_hand = 0.5 * (mq.pow(2) + lq.exp() - lq - 1).sum()
    assert dist.normal_kl(mq, lq, zero, zero).sum().item() == pytest.approx(by_hand.item(), rel=1e-12)


@pytest.mark.parametrize("mean", [-1.5, -1.0, -0.3, 0.0, 0.77, 1.0, 2.0])
@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.0, 10.0])
def test_discretized_logistic_bins_sum_to_one(mean, scale):
    logp = dist.discretized_logistic_log_prob(PIXELS, torch.tensor(mean, dtype=torch.float64),
                                              torch.tensor(math.log(scale), dtype=torch.float64))
    assert torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    logp32 = dist.discretized_logistic_log_prob(PIXELS.float(), torch.tensor(mean), torch.tensor(math.log(scale)))
    assert logp32.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_discretized_logistic_matches_cdf_differences_and_tails():
    mean, scale = torch.tensor(0.1, dtype=torch.float64), 0.2
    logp = dist.discretized_logistic_log_prob(PIXELS, mean, torch.tensor(math.log(scale), dtype=torch.float64))
    cdf = lambda v: torch.sigmoid((v - mean) / scale)  # noqa: E731
    direct = cdf(PIXELS + 1 / 255) - cdf(PIXELS - 1 / 255)
    direct[0], direct[-1] = cdf(PIXELS[0] + 1 / 255), 1 - cdf(PIXELS[-1] - 1 / 255)
    assert torch.allclose(logp.exp(), direct, rtol=1e-9, atol=1e-15)
    # far tails in float32 (as in training): finite values and finite gradients
    mean32 = torch.tensor([1.0, -1.0, 0.0], requires_grad=True)
    log_scale = torch.full((3,), math.log(1e-3), requires_grad=True)
    logp = dist.discretized_logistic_log_prob(torch.tensor([-1.0, 1.0, 0.5]), mean32, log_scale)
    logp.sum().backward()
    assert torch.isfinite(logp).all() and (logp < -100).all()
    assert torch.isfinite(mean32.grad).all() and torch.isfinite(log_scale.grad).all()


def random_dmol_params(channels, num_mixtures, generator, pixels=1):
    p = dist.dmol_param_channels(channels, num_mixtures)
    params = torch.randn(1, p, pixels, generator=generator, dtype=torch.float64)
    params[:, num_mixtures + channels * num_mixtures:num_mixtures + 2 * channels * num_mixtures] -= 2  # scales ~ 0.1
    return params


def test_dmol_grey_sums_to_one_over_256_bins():
    g = torch.Generator().manual_seed(0)
    params = random_dmol_params(1, 5, g).expand(256, -1, -1)
    logp = dist.dmol_log_prob(PIXELS.view(256, 1, 1), params, 5)
    assert logp.shape == (256, 1) and torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def dmol_total_probability(params, levels, block):
    """Sum of the RGB mixture's probabilities over all levels^3 colours of one pixel, ``block`` reds at a time."""
    grid = torch.arange(levels, dtype=torch.float64) / ((levels - 1) / 2) - 1
    total = 0.0
    for r in range(0, levels, block):
        colours = torch.cartesian_prod(grid[r:r + block], grid, grid)  # [n, 3]: every (r, g, b)
        x = colours.unsqueeze(-1)
        total += dist.dmol_log_prob(x, params.expand(x.shape[0], -1, -1), 3, levels).exp().sum().item()
    return total


def test_dmol_rgb_sums_to_one_over_all_colours():
    """Every colour of one pixel under the mixture with coupled channels: the probabilities sum to 1, at
    32 levels exhaustively (32768 colours), and at 256 levels for the blue channel given each of 256
    (red, green) pairs."""
    g = torch.Generator().manual_seed(1)
    params = random_dmol_params(3, 3, g)
    assert dmol_total_probability(params, 32, 32) == pytest.approx(1.0, abs=1e-9)
    pairs = torch.rand(256, 2, generator=g, dtype=torch.float64) * 2 - 1
    pairs = torch.round((pairs + 1) * 127.5) / 127.5 - 1
    x = torch.cat([pairs.repeat_interleave(256, 0), PIXELS.repeat(256)[:, None]], 1).unsqueeze(-1)
    joint = dist.dmol_log_prob(x, params.expand(x.shape[0], -1, -1), 3).exp().view(256, 256)
    # sum over blue leaves P(r, g) = sum_m pi_m P_m(r) P_m(g | r): compare with the 2-channel marginal
    marginal = torch.zeros(256, dtype=torch.float64)
    logits, means, log_scales, coeffs = decoders._split_dmol(params, 3, 3)
    for m, w in enumerate(torch.softmax(logits, 1)[0, :, 0]):
        mu_g = means[0, 1, m, 0] + coeffs[0, 0, m, 0] * pairs[:, 0]
        marginal += w * (dist.discretized_logistic_log_prob(pairs[:, 0], means[0, 0, m, 0], log_scales[0, 0, m, 0])
                         + dist.discretized_logistic_log_prob(pairs[:, 1], mu_g, log_scales[0, 1, m, 0])).exp()
    assert torch.allclose(joint.sum(1), marginal, rtol=1e-9)


@pytest.mark.slow
def test_dmol_rgb_sums_to_one_over_all_256_cubed_colours():
    """All 16.8M colours of one pixel at 8 bits (about a minute on 2 cores)."""
    params = random_dmol_params(3, 3, torch.Generator().manual_seed(1))
    assert dmol_total_probability(params, 256, 16) == pytest.approx(1.0, abs=1e-5)


def test_dmol_rgb_coupling_is_pixelcnnpp():
    """One component: green's logistic is centred at mu_g + tanh(a_0) r, blue's at mu_b + tanh(a_1) r + tanh(a_2) g."""
    m, c = 1, 3
    mu, log_s, a = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([-2.0, -1.5, -2.5]), torch.tensor([0.4, -0.7, 1.2])
    params = torch.cat([torch.zeros(m), mu, log_s, a]).view(1, -1, 1).double()
    x = torch.tensor([[0.2, -0.4, 0.6]], dtype=torch.float64).view(1, 3, 1)
    t = torch.tanh(a.double())
    centres = torch.stack([mu[0].double(), mu[1] + t[0] * x[0, 0, 0], mu[2] + t[1] * x[0, 0, 0] + t[2] * x[0, 1, 0]])
    expected = dist.discretized_logistic_log_prob(x[0, :, 0], centres, log_s.double()).sum()
    assert dist.dmol_log_prob(x, params, m).item() == pytest.approx(expected.item(), rel=1e-12)
    # samples lie on the grid and follow the mixture's mean roughly
    g = torch.Generator().manual_seed(0)
    many = params.expand(4000, -1, -1)
    s = dist.dmol_sample(many, c, m, generator=g)
    assert torch.allclose(s, torch.round((s + 1) * 127.5) / 127.5 - 1)
    assert abs(s[:, 0].mean().item() - 0.1) < 0.02
    with pytest.raises(ValueError, match="num_mixtures=2"):
        dist.dmol_log_prob(x, params, 2)


def test_discretized_gaussian_and_bernoulli_against_references():
    x = PIXELS[torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0))]
    logits = torch.randn(50, dtype=torch.float64)
    ref = torch.distributions.Bernoulli(logits=logits).log_prob((x > 0).double())
    assert torch.allclose(dist.bernoulli_log_prob(x, logits), ref)
    lik = dist.DecoderLikelihood("gaussian", 1, discrete=True)
    params = torch.cat([torch.full((256, 1), 0.2), torch.full((256, 1), math.log(0.3))], 1).double()
    assert lik.log_prob(PIXELS.view(256, 1), params).exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_decoder_likelihood_shapes_and_errors():
    assert dist.DecoderLikelihood("dmol", 3, discrete=True).param_channels == 100  # PixelCNN++'s 10 x 10
    assert dist.DecoderLikelihood("dmol", 1, discrete=True, num_mixtures=4).param_channels == 12
    assert dist.DecoderLikelihood("gaussian", 2, discrete=False, fixed_std=0.1).param_channels == 2
    assert dist.DecoderLikelihood("discretized_logistic", 3, discrete=True).param_channels == 6
    with pytest.raises(ValueError, match="unknown likelihood 'laplace'"):
        dist.DecoderLikelihood("laplace", 1, discrete=True)
    with pytest.raises(ValueError, match="'dmol' scores 8-bit images"):
        dist.DecoderLikelihood("dmol", 2, discrete=False)
    lik = dist.DecoderLikelihood("discretized_logistic", 1, discrete=True)
    with pytest.raises(ValueError, match=r"expected \[B, 2"):
        lik.log_prob(torch.zeros(2, 1, 4, 4), torch.zeros(2, 3, 4, 4))


def test_log_mean_exp_in_chunks_equals_all_at_once():
    x = 50 * torch.randn(1000, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    naive = torch.log(torch.exp(x - x.max(0).values).mean(0)) + x.max(0).values
    assert torch.allclose(dist.log_mean_exp(x), naive, atol=1e-10)
    running = dist.RunningLogMeanExp()
    for chunk in x.split(64):
        running.update(chunk)
    assert running.count == 1000 and torch.allclose(running.value(), naive, atol=1e-10)


def test_bits_per_dim_conversions_by_hand():
    # nats -> bits/dim: 3072 dims (CIFAR-10) at 3.5 bits/dim is 3072 * 3.5 * ln 2 nats
    assert dist.nats_to_bits_per_dim(torch.tensor([3072 * 3.5 * LN2]), 3072).item() == pytest.approx(3.5)
    # a uniform distribution over the 256 levels costs exactly 8 bits/dim
    assert dist.nats_to_bits_per_dim(torch.tensor([64 * math.log(256)]), 64).item() == pytest.approx(8.0)
    # the discrete offset: a broad, smooth density on [-1, 1] gives each bin p(x) * 2/255, so discrete
    # bits/dim = continuous bits/dim on [-1, 1] + log2(127.5) = + 6.994
    assert -dist.log_bin_width(256) / LN2 == pytest.approx(math.log2(127.5)) == pytest.approx(6.99435, abs=1e-5)
    mean, log_scale = torch.tensor(0.05, dtype=torch.float64), torch.tensor(math.log(0.4), dtype=torch.float64)
    x = PIXELS[100:150]
    discrete = -dist.discretized_gaussian_log_likelihood(x, mean, log_scale) / LN2
    continuous = -dist.gaussian_log_likelihood(x, mean, log_scale) / LN2
    assert torch.allclose(discrete, continuous + math.log2(127.5), atol=1e-4)


def test_soft_clamp():
    x = torch.linspace(-100, 100, 2001)
    y = dist.soft_clamp(x, 5.0)
    assert y.abs().max() <= 5.0 and (y.diff() >= 0).all()
    assert torch.allclose(dist.soft_clamp(torch.tensor([1e-3]), 5.0), torch.tensor([1e-3]), rtol=1e-6)
    assert dist.soft_clamp(x, None) is x
