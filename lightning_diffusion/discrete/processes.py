"""Forward processes over K categories and their posteriors, in log space throughout.

Both corruptions are D3PM's (Austin et al. 2021) transition ``Q_t = alpha_t I + (1 - alpha_t) 1 m^T``
towards a stationary distribution ``m`` over the ``S`` states: ``m`` uniform over ``S = K`` states for
:class:`UniformDiffusion` (multinomial diffusion, Hoogeboom et al. 2021, eq. 2), a point mass on the
mask state ``K`` of ``S = K + 1`` states for :class:`AbsorbingDiffusion` (D3PM-absorbing; MDLM, Sahoo
et al. 2024; MD4, Shi et al. 2024). Matrices of this form compose in closed form, so every marginal is

    q(x_t | x_s) = a_{s,t} onehot(x_s) + (1 - a_{s,t}) m,   a_{s,t} = alpha_bar(t) / alpha_bar(s)

(Hoogeboom eq. 3, D3PM eq. 3 for s = 0), for any s < t: respaced grids need nothing else. We keep
``log alpha_bar`` (float64) and ``log(1 - a) = log1mexp(log a)`` so that a step of size 1/1000 at
K = 256 keeps its digits (``1 - alpha`` is never formed by subtraction), and ``log 0`` is the finite
:data:`NEG` so that gradients stay finite where a probability is exactly zero.

Time: a discrete process (``timesteps = T``) takes integer steps ``t`` in 0..T; a continuous one
(``timesteps`` None or 0) takes ``t`` in [0, 1]. :meth:`CategoricalProcess.fraction` maps either to the
time fraction in [0, 1] that a denoiser receives. ``t`` is a number or a tensor [B] (one per sample);
data ``x`` are int64 tensors [B, *dims]; log-probabilities come back as [B, *dims, S].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_diffusion.errors import OptionError

NEG = -1e4  # log 0: exp(NEG) is exactly 0 in float32 and float64, and sums of a few NEG stay finite
SCHEDULES = ("cosine", "linear")
COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal (2021), as in Hoogeboom et al. (2021)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012), floored at NEG."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))).clamp(min=NEG)


def log_onehot(x: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``log onehot(x)``: 0 at index x, NEG elsewhere; [*x.shape, num_classes]."""
    return F.one_hot(x, num_classes).to(dtype).sub(1).mul(-NEG)


def sample_categorical(log_probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of ``log_probs`` [..., S] by the Gumbel-max trick: ``argmax(log p + G)``, int64 [...]."""
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=log_probs.dtype)
    tiny = torch.finfo(u.dtype).tiny
    return (log_probs - torch.log(-torch.log(u.clamp(tiny, 1 - torch.finfo(u.dtype).eps)))).argmax(-1)


class CategoricalProcess:
    """``q(x_t | x_s) = a_{s,t} onehot(x_s) + (1 - a_{s,t}) m`` over ``num_states`` states (see the module).

    ``schedule`` is alpha_bar as a function of the time fraction u in [0, 1]: ``"cosine"``
    (``f(u) / f(0)``, ``f(u) = cos((u + s) / (1 + s) pi / 2)^2``, s = 0.008: Hoogeboom et al. 2021 sec. 4,
    Nichol & Dhariwal 2021 eq. 17) or ``"linear"`` (``1 - u``: D3PM-absorbing's ``beta_t = 1 / (T - t + 1)``,
    and the log-linear noise of MDLM/MD4 in continuous time). Subclasses fix ``m``.
    """

    num_states: int
    mask_index: int | None = None

    def __init__(self, num_categories: int, timesteps: int | None = 1000, schedule: str = "cosine"):
        if not isinstance(num_categories, int) or num_categories < 2:
            raise OptionError("num_categories", num_categories, "must be an integer >= 2")
        if timesteps is not None and (not isinstance(timesteps, int) or timesteps < 0):
            raise OptionError("timesteps", timesteps, "must be a positive integer", "or None / 0 for continuous time")
        if schedule not in SCHEDULES:
            raise OptionError("schedule", schedule, f"must be one of {', '.join(SCHEDULES)}")
        self.num_categories, self.timesteps, self.schedule = num_categories, timesteps or None, schedule

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_categories}, timesteps={self.timesteps}, schedule={self.schedule!r})"

    @property
    def continuous(self) -> bool:
        """True in continuous time (t in [0, 1]); False for integer steps 0..T."""
        return self.timesteps is None

    def log_stationary(self) -> Tensor:
        """``log m`` [S], float64: where every transition leads (and the prior)."""
        raise NotImplementedError

    def fraction(self, t: Tensor | float) -> Tensor:
        """The time fraction in [0, 1] of the process time ``t`` (``t / T``, or ``t`` itself), float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return t if self.continuous else t / self.timesteps

    def log_alpha_bar(self, t: Tensor | float) -> Tensor:
        """``log alpha_bar(t)``, float64, floored at NEG (alpha_bar(T) = 0 for ``"linear"``)."""
        return self._log_alpha_bar(self.fraction(t))

    def _log_alpha_bar(self, u: Tensor) -> Tensor:
        u = u.clamp(0, 1)
        if self.schedule == "linear":
            return torch.log1p(-u).clamp(min=NEG)
        angle = lambda v: (v + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2  # noqa: E731
        return (2 * (torch.log(torch.cos(angle(u))) - math.log(math.cos(angle(0.0))))).clamp(NEG, 0)

    def alpha_bar_rate(self, t: Tensor | float) -> Tensor:
        """``-alpha_bar'(u) / (1 - alpha_bar(u))`` in the time fraction u of ``t``, float64: the weight of the
        continuous-time masked ELBO (MD4 eq. 5, MDLM eq. 10); ``1 / u`` for ``"linear"``."""
        with torch.enable_grad():
            u = self.fraction(t).detach().requires_grad_()
            log_ab = self._log_alpha_bar(u)
            (slope,) = torch.autograd.grad(log_ab.sum(), u)
        return (-slope * torch.exp(log_ab - log1mexp(log_ab))).detach()

    def log_prior(self) -> Tensor:
        """``log p(x_T)`` per position [S] (float32): the stationary distribution m."""
        return self.log_stationary().float()

    # -- the marginals -----------------------------------------------------------------------------
    def _coefficients(self, x: Tensor, s: Tensor | float, t: Tensor | float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(log a_{s,t}, log(1 - a_{s,t}))`` per sample, shaped [B, 1, ..., 1] to broadcast over [B, *dims, S]."""
        shape = (x.shape[0],) + (1,) * x.dim()
        log_a = (self.log_alpha_bar(t) - self.log_alpha_bar(s)).clamp(NEG, 0).expand(x.shape[0]).reshape(shape)
        return log_a.to(x.device, dtype), log1mexp(log_a).to(x.device, dtype)

    def _log_mix(self, log_a: Tensor, log_1ma: Tensor, log_delta: Tensor, log_m: Tensor) -> Tensor:
        """``log(a delta + (1 - a) m)`` from the log of each part."""
        return torch.logaddexp(log_a + log_delta, log_1ma + log_m)

    def log_q_xt_given_xs(self, x_s: Tensor, s: Tensor | float, t: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
        """``log q(x_t | x_s)`` for states ``x_s`` in [0, S), any s <= t: [B, *dims, S]."""
        log_a, log_1ma = self._coefficients(x_s, s, t, dtype)
        log_m = self.log_stationary().to(x_s.device, dtype)
        return self._log_mix(log_a, log_1ma, log_onehot(x_s, self.num_states, dtype), log_m)

    def log_q_xt_given_x0(self, x0: Tensor, t: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
        """``log q(x_t | x_0)`` [B, *dims, S] for data ``x0`` in [0, K) (Hoogeboom eq. 3)."""
        return self.log_q_xt_given_xs(x0, 0, t, dtype)

    def sample_xt(self, x0: Tensor, t: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """``x_t ~ q(x_t | x_0)``: int64 states [B, *dims] in [0, S)."""
        return sample_categorical(self.log_q_xt_given_x0(x0, t), generator)

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        """``x_T ~ m`` per position: int64 states of ``shape`` [B, *dims]."""
        return sample_categorical(self.log_prior().to(device).expand(*shape, self.num_states), generator)

    def log_posterior(self, x_t: Tensor, t: Tensor | float, s: Tensor | float, log_x0_probs: Tensor) -> Tensor:
        """``log p(x_s | x_t) = log sum_x0 q(x_s | x_t, x0) p(x0)`` for any s < t: [B, *dims, S].

        ``log_x0_probs`` [B, *dims, K] are (unnormalised) log-probabilities of x0 per position: a one-hot
        gives the exact posterior ``q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0)`` (D3PM eq. 3),
        a model's logits the reverse step of D3PM eq. 4, ``sum_x0 q(x_s | x_t, x0) p(x0 | x_t)``: with the
        exact ``p(x0_i | x_t)`` it is the exact per-position reverse marginal ``q(x_s,i | x_t)``. With
        ``q(x_s | x0) = a_s delta + (1 - a_s) m`` the sum over x0 is closed-form, in O(S) per position:

            p(x_s | x_t) = q(x_t | x_s) [a_s r(x_s) + (1 - a_s) m(x_s) sum_x0 r(x0)],  r(x0) = p(x0) / q(x_t | x0).

        x0 with ``q(x_t | x0) = 0`` (an unmasked x_t differing from x0) are dropped and p renormalised.
        Computed in float32 or the logits' dtype if wider; schedule coefficients in float64.
        """
        dtype = torch.promote_types(log_x0_probs.dtype, torch.float32)
        log_p0 = torch.log_softmax(log_x0_probs.to(dtype), dim=-1)
        K, S = self.num_categories, self.num_states
        log_m = self.log_stationary().to(x_t.device, dtype)
        lm_xt = log_m[x_t].unsqueeze(-1)  # log m(x_t) per position
        at_xt = log_onehot(x_t, S, dtype)  # log delta(x_t, .) over S
        log_a_s, log_1ma_s = self._coefficients(x_t, 0, s, dtype)
        log_v = self._log_mix(*self._coefficients(x_t, s, t, dtype), at_xt, lm_xt)  # q(x_t | x_s) over x_s
        log_d = self._log_mix(*self._coefficients(x_t, 0, t, dtype), at_xt[..., :K], lm_xt)  # q(x_t | x0) over x0
        log_r = torch.where(log_d > NEG / 2, log_p0 - log_d, NEG)
        log_r_states = F.pad(log_r, (0, S - K), value=NEG)
        total = torch.logsumexp(log_r, dim=-1, keepdim=True)
        out = log_v + torch.logaddexp(log_a_s + log_r_states, log_1ma_s + log_m + total)
        return torch.log_softmax(out, dim=-1)


class UniformDiffusion(CategoricalProcess):
    """Multinomial diffusion / D3PM-uniform: ``m = 1/K`` over S = K states (Hoogeboom et al. 2021), cosine
    alpha_bar by default. ``timesteps`` T steps, or None / 0 for continuous time."""

    def __init__(self, num_categories: int, timesteps: int | None = 1000, schedule: str = "cosine"):
        super().__init__(num_categories, timesteps, schedule)
        self.num_states = num_categories

    def log_stationary(self) -> Tensor:
        return torch.full((self.num_states,), -math.log(self.num_states), dtype=torch.float64)


class AbsorbingDiffusion(CategoricalProcess):
    """D3PM-absorbing / masked diffusion: every position jumps to the mask state ``K`` (S = K + 1 states).

    Linear alpha_bar by default: with T steps ``beta_t = 1 / (T - t + 1)`` (D3PM sec. 3), in continuous time
    (``timesteps`` None / 0) MDLM's log-linear schedule / MD4's linear one, ``alpha(t) = 1 - t``.
    """

    def __init__(self, num_categories: int, timesteps: int | None = 1000, schedule: str = "linear"):
        super().__init__(num_categories, timesteps, schedule)
        self.num_states, self.mask_index = num_categories + 1, num_categories

    def log_stationary(self) -> Tensor:
        return log_onehot(torch.tensor(self.mask_index), self.num_states, torch.float64)
