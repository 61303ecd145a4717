"""Discrete diffusion math (lightning_diffusion/discrete/) against exact ground truth on spaces small enough
to enumerate: forward marginals vs simulation, the posterior vs Bayes' rule, the variational bound and the
masked ELBO with the exact Bayes-optimal denoiser vs the data's exact NLL, ancestral sampling vs the data
distribution, and the log-space claim in float32 at K = 256."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_diffusion.discrete.bound import (TimestepSampler, kl_term, masked_elbo, masked_elbo_exact, prior_kl,
                                                variational_bound, x0_cross_entropy)
from lightning_diffusion.discrete.processes import (NEG, AbsorbingDiffusion, UniformDiffusion, log_onehot,
                                                    sample_categorical)
from lightning_diffusion.discrete.samplers import ancestral, sundae, time_grid, unroll

F64 = torch.float64


# -- ground truth by enumeration ----------------------------------------------------------------------
def all_states(num: int, length: int) -> torch.Tensor:
    """Every sequence of ``length`` values in [0, num): [num**length, length]."""
    return torch.cartesian_prod(*[torch.arange(num)] * length).view(-1, length)


def random_data(K: int, L: int, seed: int, concentration: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Every x in [0, K)^L and a random log p(x) over the K^L states (p ∝ Exp(1)^(1/concentration))."""
    gen = torch.Generator().manual_seed(seed)
    p = (-torch.log(torch.rand(K**L, generator=gen, dtype=F64))) ** (1 / concentration)  # Exp(1)^(1/c): peaked
    return all_states(K, L), (p / p.sum()).log()


def markov_data(K: int, L: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every x in [0, K)^L and log p(x) of a random Markov chain (initial and transition probabilities)."""
    gen = torch.Generator().manual_seed(seed)
    init = torch.log_softmax(2 * torch.randn(K, generator=gen, dtype=F64), 0)
    trans = torch.log_softmax(2 * torch.randn(K, K, generator=gen, dtype=F64), 1)
    X = all_states(K, L)
    return X, init[X[:, 0]] + trans[X[:, :-1], X[:, 1:]].sum(1)


def exact_denoiser(process, X: torch.Tensor, log_p: torch.Tensor):
    """The Bayes-optimal per-position denoiser ``log p(x0_i | x_t)`` of the data (X, log_p), float64: computed
    for every x_t state at each distinct time of the call, then looked up."""
    K, S, (M, L) = process.num_categories, process.num_states, X.shape
    onehot, Y = F.one_hot(X, K).to(F64), all_states(S, L)  # [M, L, K], [S^L, L]

    def marginals(t) -> torch.Tensor:  # [S^L, L, K]
        table = process.log_q_xt_given_x0(torch.arange(K).view(1, K), t, dtype=F64)[0]  # [K, S]
        joint = log_p + table.T[Y][:, torch.arange(L), X].sum(-1)  # [S^L, M]: log p(x0) q(x_t | x0)
        return torch.einsum("nm,mlk->nlk", torch.softmax(joint, -1), onehot).clamp_min(1e-300).log()

    def denoise(x_t: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        code = (x_t * S ** torch.arange(L - 1, -1, -1)).sum(1)
        out = torch.empty(len(x_t), L, K, dtype=F64)
        for f in frac.to(F64).unique():
            rows = frac == f
            out[rows] = marginals(f if process.continuous else int(round(float(f) * process.timesteps)))[code[rows]]
        return out

    return denoise


def forward_tables(process, ts: torch.Tensor) -> torch.Tensor:
    """``log q(x_t = j | x0 = k)`` [len(ts), K, S] in float64."""
    K = process.num_categories
    return process.log_q_xt_given_x0(torch.arange(K).expand(len(ts), K), ts, dtype=F64)


def exact_bound(process, X: torch.Tensor, log_p: torch.Tensor, chunk: int = 50) -> torch.Tensor:
    """The bound's exact expectation over every x_t, per data state [M] in nats (prior + all KL_t + decoder)."""
    M, L = X.shape
    Y = all_states(process.num_states, L)
    denoise, total = exact_denoiser(process, X, log_p), prior_kl(process, X).to(F64)
    for ts in torch.arange(1, process.timesteps + 1).split(chunk):
        c = len(ts)
        logits = denoise(Y.repeat(c, 1), process.fraction(ts.repeat_interleave(len(Y)))).view(c, 1, len(Y), L, -1)
        tab = forward_tables(process, ts)
        log_w = tab[torch.arange(c)[:, None, None, None], X[None, :, None, :], Y[None, None, :, :]].sum(-1)  # [c,M,Y]
        shape = (c, M, len(Y), L)
        kl = kl_term(process, X[None, :, None].expand(shape).reshape(-1, L), Y.expand(shape).reshape(-1, L),
                     ts[:, None, None].expand(shape[:3]).reshape(-1),
                     logits.expand(*shape, logits.shape[-1]).reshape(-1, L, logits.shape[-1])).view(shape[:3])
        total = total + (log_w.exp() * kl.masked_fill(log_w < NEG / 2, 0)).sum((0, 2))
    return total


def chi2_z(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's chi-squared over the cells with expected > 0, its degrees of freedom and the Wilson-Hilferty
    z-score (a standard normal under the null: z < 3.5 is p > 2e-4)."""
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a draw in a cell of probability zero"
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    if df == 0:
        return stat, df, -math.inf
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return stat, df, z


PROCESSES = {
    "uniform": lambda T: UniformDiffusion(4, T),
    "absorbing": lambda T: AbsorbingDiffusion(4, T),
    "uniform-continuous": lambda T: UniformDiffusion(4, None),
    "absorbing-continuous": lambda T: AbsorbingDiffusion(4, None),
}


def _t(process, fraction: float):
    return fraction if process.continuous else round(fraction * process.timesteps)


# -- the forward process ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROCESSES)
def test_forward_marginal_equals_simulation_and_composition_and_reaches_the_prior(name):
    process = PROCESSES[name](20)
    S, N = process.num_states, 40_000
    # multi-step composition: Q(0, t) = Q(0, s) Q(s, t) for every pair on a grid, to 1e-12 (float64)
    fracs = [0.0, 0.05, 0.3, 0.55, 0.8, 1.0]
    Q = {(a, b): process.log_q_xt_given_xs(torch.arange(S).view(S, 1), _t(process, a), _t(process, b), F64)[:, 0].exp()
         for a in fracs for b in fracs if a <= b}
    for a in fracs:
        for b in fracs:
            for c in fracs:
                if a <= b <= c:
                    torch.testing.assert_close(Q[a, b] @ Q[b, c], Q[a, c], rtol=0, atol=1e-12)
    # Monte Carlo: N chains stepped through the 20-step grid (one-step kernels) vs the one-shot marginal
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 4, (N, 1), generator=gen)
    x, grid = x0, [_t(process, f) for f in torch.linspace(0, 1, 21).tolist()]
    for s, t in zip(grid[:-1], grid[1:]):
        x = sample_categorical(process.log_q_xt_given_xs(x, s, t, F64), gen)
        if t in (grid[5], grid[10], grid[20]):
            marginal = process.log_q_xt_given_x0(x0, t, F64)[:, 0].exp()  # [N, S]
            for k in range(4):
                rows = x0[:, 0] == k
                stat, df, z = chi2_z(torch.bincount(x[rows, 0], minlength=S).to(F64), marginal[rows].sum(0))
                assert z < 3.5, f"{name} t={t} x0={k}: chi2={stat:.1f} on {df} dof (z={z:.2f})"
    # q(x_T | x0) is the prior: uniform 1/K up to cosine's alpha_bar(1) ~ 4e-33, absorbing exactly the mask
    torch.testing.assert_close(Q[0.0, 1.0], process.log_stationary().exp().expand(S, S), rtol=0, atol=1e-15)


def test_float32_marginals_keep_small_steps_at_k256():
    """One step of 1000 at K = 256: the float32 log-probabilities equal float64's to 1e-5 relative (a linear-space
    1 - alpha_bar would lose them) and sum to one."""
    for process in (UniformDiffusion(256, 1000), AbsorbingDiffusion(256, 1000)):
        x0 = torch.arange(256).view(2, 128)
        for t in (1, 2, 500, 999, 1000):
            lq32, lq64 = process.log_q_xt_given_x0(x0, t), process.log_q_xt_given_x0(x0, t, F64)
            live = lq64 > NEG / 2
            torch.testing.assert_close(lq32[live].double(), lq64[live], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lq32.exp().sum(-1), torch.ones(2, 128), rtol=0, atol=1e-5)
        # the off-diagonal of the first step: (1 - alpha_bar(1)) / K, alpha_bar(1) = 1 - 3.9e-5 (cosine) / 1 - 1e-3
        off = process.log_q_xt_given_x0(x0, 1)[0, 0, 1].exp().item()
        assert off == pytest.approx(-math.expm1(float(process.log_alpha_bar(1))) / process.num_states
                                    if isinstance(process, UniformDiffusion) else 0.0, rel=1e-5, abs=1e-30)


# -- the posterior ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROCESSES)
def test_posterior_equals_bayes_rule_and_sums_to_one(name):
    process = PROCESSES[name](20)
    K, S = process.num_categories, process.num_states
    gen = torch.Generator().manual_seed(1)
    for a, b in [(0.0, 0.05), (0.3, 0.35), (0.1, 0.9), (0.0, 1.0), (0.95, 1.0)]:  # respaced pairs too
        s, t = _t(process, a), _t(process, b)
        q0s = process.log_q_xt_given_x0(torch.arange(K).view(K, 1), s, F64)[:, 0].exp()  # [K, S]
        qst = process.log_q_xt_given_xs(torch.arange(S).view(S, 1), s, t, F64)[:, 0].exp()  # [S, S]
        q0t = q0s @ qst  # [K, S]
        bayes = q0s[:, :, None] * qst[None] / q0t[:, None, :]  # [x0, x_s, x_t]
        x0, x_t = torch.cartesian_prod(torch.arange(K), torch.arange(S)).unbind(1)
        possible = q0t[x0, x_t] > 0
        post = process.log_posterior(x_t.view(-1, 1), t, s, log_onehot(x0.view(-1, 1), K, F64))[:, 0].exp()
        torch.testing.assert_close(post[possible], bayes[x0, :, x_t][possible], rtol=0, atol=1e-12)
        torch.testing.assert_close(post.sum(-1), torch.ones(len(x0), dtype=F64), rtol=0, atol=1e-12)
        # a soft p(x0): sum over the x0 consistent with x_t of q(x_s | x_t, x0) p(x0), renormalised
        logits = torch.randn(len(x0), 1, K, generator=gen, dtype=F64)
        p0 = torch.softmax(logits[:, 0], -1) * (q0t[:, x_t].T > 0)
        mixture = torch.einsum("nk,nks->ns", p0 / p0.sum(1, keepdim=True), bayes[:, :, x_t].permute(2, 0, 1).nan_to_num())
        soft = process.log_posterior(x_t.view(-1, 1), t, s, logits)[:, 0].exp()
        reachable = p0.sum(1) > 0  # x_t that some x0 reaches at t
        torch.testing.assert_close(soft[reachable], mixture[reachable], rtol=0, atol=1e-12)


# -- the variational bound with the exact denoiser ----------------------------------------------------
BOUND_EXPECTED = {}  # filled in by the test, printed with -s


@pytest.mark.parametrize("corruption", ["uniform", "absorbing"])
def test_bound_with_the_exact_denoiser_is_above_the_nll_and_approaches_it(corruption):
    """K = 3, L = 3 (27 data states; 27 or 64 x_t states), a random categorical data distribution. The exact
    expectation of the bound over x_t, per data state, is >= -log p(x0) for every x0 and its mean decreases
    towards the entropy H as T grows (numbers in the assertion messages). (Per x0 the bound is on the model's
    -log p_model(x0), not the data's, so only the mean over the data is compared with H.)"""
    X, log_p = random_data(3, 3, seed=2)
    entropy = float(-(log_p.exp() * log_p).sum())
    make = UniformDiffusion if corruption == "uniform" else AbsorbingDiffusion
    means = {}
    for T in (1, 10, 100, 1000):
        means[T] = float((log_p.exp() * exact_bound(make(3, T), X, log_p)).sum())
    gaps = {T: m - entropy for T, m in means.items()}
    BOUND_EXPECTED[corruption] = (entropy, gaps)
    assert all(gaps[a] > gaps[b] > 0 for a, b in [(1, 10), (10, 100), (100, 1000)]), f"H={entropy:.4f}, gaps {gaps}"
    # measured (T = 1 / 10 / 100 / 1000): H = 2.3363 nats; uniform gaps 0.452 / 0.0831 / 0.00875 / 0.00088,
    # absorbing 0.452 / 0.0506 / 0.00511 / 0.00051 (the gap falls as 1/T)
    assert gaps[1000] < 0.003 and gaps[1000] < gaps[10] / 30, f"H={entropy:.4f}, gaps {gaps}"


def test_monte_carlo_bound_matches_its_exact_expectation():
    """variational_bound (one x_t draw per t) averaged over 400 draws per data state equals exact_bound within
    4 standard errors, for T = 10; its terms add up."""
    X, log_p = random_data(3, 3, seed=2)
    for process in (UniformDiffusion(3, 10), AbsorbingDiffusion(3, 10)):
        exact = exact_bound(process, X, log_p)
        x0 = X.repeat(400, 1)
        out = variational_bound(process, exact_denoiser(process, X, log_p), x0,
                                generator=torch.Generator().manual_seed(3), chunk=4)
        torch.testing.assert_close(out["total"], out["prior"] + out["diffusion"] + out["decoder"])
        assert out["steps"].shape == (len(x0), 10)
        draws = out["total"].view(400, len(X))
        mean, se = draws.mean(0), draws.std(0) / 20
        z = ((mean - exact) / se.clamp_min(1e-12)).abs()
        assert (z < 4.5).all(), f"{process}: worst z={z.max():.2f}"


def test_masked_elbo_with_the_exact_conditionals_is_minus_log_p():
    """Continuous-time absorbing, K = 3, L = 4 (81 states), a random Markov chain: the masked ELBO integrated
    exactly (2^4 masks) equals -log p(x0) for every x0 to 1e-6, for the linear and the cosine schedule; the
    one-draw estimator averages to it within 4 standard errors."""
    X, log_p = markov_data(3, 4, seed=4)
    for schedule in ("linear", "cosine"):
        process = AbsorbingDiffusion(3, None, schedule=schedule)
        denoise = exact_denoiser(process, X, log_p)
        exact = masked_elbo_exact(process, denoise, X)
        torch.testing.assert_close(exact, -log_p, rtol=0, atol=1e-6)
        assert torch.equal(denoise(X, torch.full((len(X),), 0.1, dtype=F64)), denoise(X, torch.full((len(X),), 0.9, dtype=F64)))
        at_half = lambda x, t: denoise(x, torch.full_like(t, 0.5))  # noqa: E731 - exact conditionals ignore t
        draws = masked_elbo(process, at_half, X.repeat(500, 1), generator=torch.Generator().manual_seed(5))
        draws = draws.view(500, len(X)).double()
        z = ((draws.mean(0) - (-log_p)) / (draws.std(0) / math.sqrt(500))).abs()
        assert (z < 4.5).all(), f"{schedule}: worst z={z.max():.2f}"


# -- sampling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["uniform", "absorbing-continuous"])
def test_ancestral_sampling_with_the_exact_denoiser_reproduces_the_data(name):
    """10,000 samples of 27 states (K = 3, L = 3, a peaked random p(x)) at 1000 steps, float32 logits: Pearson
    chi-squared against p(x) passes (measured z = 0.4 uniform, 1.4 absorbing on 26 dof); at 2 steps the
    factorised reverse is far off (z > 300: the test has power). Discrete absorbing with T = 1000 is the same
    computation as continuous time at 1000 steps (the grids and alpha_bar coincide)."""
    X, log_p = random_data(3, 3, seed=6)
    process = UniformDiffusion(3, 1000) if name == "uniform" else AbsorbingDiffusion(3, None)
    exact, N = exact_denoiser(process, X, log_p), 10_000
    index = lambda x: (x * torch.tensor([9, 3, 1])).sum(1)  # noqa: E731
    for steps, should_pass in ((1000, True), (2, False)):
        out = ancestral(lambda x, t: exact(x, t).float(), process, (N, 3), steps=steps,
                        generator=torch.Generator().manual_seed(7))
        assert out.nfe == steps and out.x.dtype == torch.long and int(out.x.max()) < 3
        stat, df, z = chi2_z(torch.bincount(index(out.x), minlength=27).to(F64), N * log_p.exp())
        assert (z < 3.5) == should_pass, f"{name}, {steps} steps: chi2={stat:.1f} on {df} dof (z={z:.2f})"


def test_time_grid_respacing_and_options():
    assert time_grid(UniformDiffusion(3, 10), 3) == [10, 7, 3, 0]
    assert time_grid(UniformDiffusion(3, 10), 10) == list(range(10, -1, -1))
    assert time_grid(AbsorbingDiffusion(3, None), 4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="steps=11: must be a positive integer and at most timesteps=10"):
        time_grid(UniformDiffusion(3, 10), 11)


def test_sundae_and_unroll():
    """SUNDAE from the prior with the exact denoiser: data in range, NFE = steps; absorbing leaves no mask.
    unroll: the earlier calls run without gradient, the last with it."""
    X, log_p = random_data(3, 3, seed=8)
    for process in (UniformDiffusion(3, 100), AbsorbingDiffusion(3, 100)):
        out = sundae(exact_denoiser(process, X, log_p), process, (500, 3), steps=4, generator=torch.Generator().manual_seed(9))
        assert out.nfe == 4 and out.x.shape == (500, 3) and 0 <= int(out.x.min()) and int(out.x.max()) < 3
    grads, table = [], torch.randn(4, 3, requires_grad=True)

    def net(x, t):
        grads.append(torch.is_grad_enabled())
        return table[x] * t[:, None, None]

    logits = unroll(net, torch.full((5, 3), 3), torch.full((5,), 0.5), steps=3, generator=torch.Generator().manual_seed(0))
    assert grads == [False, False, True] and logits.shape == (5, 3, 3) and logits.requires_grad


def test_absorbing_sundae_fills_only_masked_positions_and_one_at_a_time_is_exact():
    """Absorbing SUNDAE keeps what it has unmasked, so with one position filled at a time (a small
    update_fraction, many steps) it is random-order decoding with the exact conditionals: 5000 samples
    pass Pearson's chi-squared against the data (K = 3, L = 3); filling everything at once (one step)
    draws the positions independently and fails it."""
    X, log_p = random_data(3, 3, seed=2)
    process = AbsorbingDiffusion(3, None)
    denoise = exact_denoiser(process, X, log_p)
    expected = log_p.exp() * 5000
    zs = {}
    for steps, fraction in ((1000, 0.005), (1, 1.0)):
        out = sundae(denoise, process, (5000, 3), steps=steps, temperature=1.0, update_fraction=fraction,
                     generator=torch.Generator().manual_seed(4))
        counts = torch.bincount((out.x * torch.tensor([9, 3, 1])).sum(1), minlength=27).double()
        zs[steps] = chi2_z(counts, expected)[2]
    assert zs[1000] < 3.5 and zs[1] > 10, zs


# -- the log-space claim ------------------------------------------------------------------------------
@pytest.mark.parametrize("corruption", ["uniform", "absorbing"])
def test_float32_bound_at_k256_is_finite_and_equals_float64(corruption):
    """K = 256, T = 1000, a random denoiser (fixed logits per input state): the full bound in float32 equals the
    float64 one (same x_t draws) to 1e-5 relative, every term finite; the training loss (one kl_term + hybrid
    cross-entropy) and its gradient are finite at t = 1, 2, 500, 1000."""
    K, T = 256, 1000
    process = UniformDiffusion(K, T) if corruption == "uniform" else AbsorbingDiffusion(K, T)
    table64 = 3 * torch.randn(process.num_states, K, generator=torch.Generator().manual_seed(10), dtype=F64)
    x0 = torch.randint(0, K, (2, 8), generator=torch.Generator().manual_seed(11))
    totals = {}
    for dtype in (torch.float32, F64):
        table = table64.to(dtype)
        out = variational_bound(process, lambda x, t: table[x] * (1 + t[:, None, None]), x0,
                                generator=torch.Generator().manual_seed(12), chunk=100)
        assert all(torch.isfinite(v).all() for v in out.values())
        totals[dtype] = out
    for term in ("prior", "diffusion", "decoder", "total"):
        torch.testing.assert_close(totals[torch.float32][term].double(), totals[F64][term], rtol=1e-5, atol=1e-4)
    table = table64.float().requires_grad_()
    t = torch.tensor([1, 2, 500, 1000])
    x0 = x0.repeat(2, 1)
    x_t = process.sample_xt(x0, t, torch.Generator().manual_seed(13))
    logits = table[x_t]
    loss = kl_term(process, x0, x_t, t, logits) + 1e-3 * x0_cross_entropy(x0, logits)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(table.grad).all() and table.grad.abs().sum() > 0


def test_masked_elbo_at_k256_in_float32_is_finite_with_finite_gradient():
    process = AbsorbingDiffusion(256, None)
    table = torch.randn(257, 256, requires_grad=True)
    x0 = torch.randint(0, 256, (64, 16), generator=torch.Generator().manual_seed(14))
    loss = masked_elbo(process, lambda x, t: table[x], x0, generator=torch.Generator().manual_seed(15))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(table.grad).all()


# -- importance sampling of t -------------------------------------------------------------------------
def test_timestep_sampler_is_uniform_until_full_then_proportional_to_rms_loss_and_checkpointed():
    sampler = TimestepSampler(4, history=2)
    gen = torch.Generator().manual_seed(16)
    t, p = sampler.sample(1000, gen)
    assert int(t.min()) == 1 and int(t.max()) == 4 and torch.all(p == 0.25)
    sampler.update(torch.tensor([1, 2, 3, 4, 1, 2, 3]), torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0]))
    assert torch.all(sampler.probabilities() == 0.25)  # step 4 has one value of two
    sampler.update(torch.tensor([4]), torch.tensor([4.0]))
    expected = (1 - 1e-4) * torch.tensor([1.0, 2, 3, 4], dtype=F64) / 10 + 1e-4 / 4
    torch.testing.assert_close(sampler.probabilities(), expected)
    restored = TimestepSampler(4, history=2)
    restored.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(restored.probabilities(), expected)
    t, p = restored.sample(20_000, gen)
    torch.testing.assert_close(torch.bincount(t - 1, minlength=4).double() / 20_000, expected, rtol=0, atol=0.01)
