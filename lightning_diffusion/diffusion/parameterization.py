"""What a Gaussian-diffusion net predicts, as one table of coefficients.

For ``x_t = alpha x_0 + sigma eps`` (any :class:`~lightning_diffusion.diffusion.sde.GaussianProcess`),
every parameterization turns the raw net ``F`` into a denoiser with four coefficients of alpha and
sigma (Karras et al. 2022, "EDM", Table 1 and sec. 5; k-diffusion's ``Denoiser.get_scalings``):

    D(x_t, t) = c_skip x_t + c_out F(c_in x_t, c_noise(t), y)

The rest follows from the same coefficients, so it is written once:

- the regression target of F, ``F* = (x_0 - c_skip x_t) / c_out``; with ``x_t = alpha x_0 + sigma eps``
  that is ``a x_0 + b eps``, ``a = (1 - c_skip alpha) / c_out``, ``b = -c_skip sigma / c_out``
  (:func:`target`). a and b are computed in float64 from the coefficients, so the float32 data
  never go through the cancellation ``x_t - alpha x_0``;
- ``||F - F*||^2 = ||D - x_0||^2 / c_out^2``: a weight ``lambda(t)`` on the x0-space error is the
  weight ``lambda c_out^2`` on F's error (:func:`output_weight`); the plain MSE of F (DDPM's
  ``L_simple``, EDM's loss) is ``lambda = 1 / c_out^2``; min-SNR-gamma (Hang et al. 2023) is
  ``lambda = min(SNR, gamma)`` (:func:`min_snr_weight`).

The rows (``s = sigma / alpha``, ``n = alpha^2 + sigma^2``, ``sd`` = sigma_data):

======  ======================  =======================  ===================  ===========================
name    F predicts              c_skip                   c_out                c_in
======  ======================  =======================  ===================  ===========================
eps     the noise eps           1 / alpha                -sigma / alpha       1
x0      the clean data x_0      0                        1                    1
v       ``alpha eps - sigma x0``  alpha / n              -sigma / n           1
score   ``grad log p(x_t|x_0)``   1 / alpha              sigma^2 / alpha      1
edm     EDM's F                 sd^2 / (s^2+sd^2) / alpha  s sd / sqrt(s^2+sd^2)  1 / (alpha sqrt(s^2+sd^2))
======  ======================  =======================  ===================  ===========================

(v: Salimans & Ho 2022, n = 1 on a VP process; score: Tweedie, ``x_0 = (x_t + sigma^2 score) / alpha``;
edm: EDM's preconditioning on the VE-equivalent ``x_t / alpha`` at noise level ``s``.) Every row's
``c_noise`` is the process's own time t (the net contract ``net(x, t, y)``; EDM's ``ln(s) / 4`` is a
monotone function of it). ``edm`` has ``fixed_weight``: its c_out makes F's target unit-variance, and
a family trains it with weight 1 on F instead of its own weighting.

Adding a parameterization (the energy-based-diffusion issue adds ``energy``): write its
``c_skip`` and ``c_out`` (and ``c_in``, ``c_noise`` where they are not 1 and t) as functions of
``(alpha, sigma, sigma_data)``, add a :class:`Row` to :data:`TABLE`, and add its name to the
``Literal`` of each family that offers it (:data:`DDPMParameterization`, :data:`SDEParameterization`);
the denoiser, the loss target and weight, and the families' checks then serve it unchanged.
Nothing else in the package names a parameterization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

#: a coefficient as a function of (alpha, sigma, sigma_data); float64 tensors in, float64 out
Coefficient = Callable[[Tensor, Tensor, float], Tensor]


class Scalings(NamedTuple):
    """The coefficients of one row at given alpha, sigma (float64, shaped like them)."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor


def _one(alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    return torch.ones_like(alpha)


def _zero(alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    return torch.zeros_like(alpha)


def _time(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Row:
    """One parameterization: its coefficients as functions of ``(alpha, sigma, sigma_data)``.

    ``c_noise(t)`` maps the process time to the net's time input; ``fixed_weight``: trained with
    weight 1 on F whatever the family's weighting (EDM)."""

    c_skip: Coefficient
    c_out: Coefficient
    c_in: Coefficient = _one
    c_noise: Callable[[Tensor], Tensor] = _time
    fixed_weight: bool = False

    def scalings(self, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Scalings:
        """``(c_skip, c_out, c_in)`` at ``alpha``, ``sigma`` (float64 tensors of any shape)."""
        return Scalings(self.c_skip(alpha, sigma, sigma_data), self.c_out(alpha, sigma, sigma_data),
                        self.c_in(alpha, sigma, sigma_data))

    def target_coefficients(self, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with F's regression target ``F* = a x_0 + b eps`` (module docstring)."""
        c = self.scalings(alpha, sigma, sigma_data)
        return (1 - c.c_skip * alpha) / c.c_out, -c.c_skip * sigma / c.c_out


def _edm_norm(alpha: Tensor, sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """EDM's noise level ``s = sigma / alpha`` and ``sqrt(s^2 + sd^2)``."""
    s = sigma / alpha
    return s, (s**2 + sigma_data**2).sqrt()


#: the table: every parameterization of a Gaussian-diffusion net, by name
TABLE: dict[str, Row] = {
    "eps": Row(c_skip=lambda a, s, sd: 1 / a, c_out=lambda a, s, sd: -s / a),
    "x0": Row(c_skip=_zero, c_out=_one),
    "v": Row(c_skip=lambda a, s, sd: a / (a**2 + s**2), c_out=lambda a, s, sd: -s / (a**2 + s**2)),
    "score": Row(c_skip=lambda a, s, sd: 1 / a, c_out=lambda a, s, sd: s**2 / a),
    "edm": Row(c_skip=lambda a, s, sd: sd**2 / _edm_norm(a, s, sd)[1] ** 2 / a,
               c_out=lambda a, s, sd: _edm_norm(a, s, sd)[0] * sd / _edm_norm(a, s, sd)[1],
               c_in=lambda a, s, sd: 1 / (a * _edm_norm(a, s, sd)[1]), fixed_weight=True),
}

#: what a DDPM's net may predict (the type of ``DDPM(parameterization=...)``)
DDPMParameterization = Literal["eps", "x0", "v"]
#: what a ScoreSDE's net may output (the type of ``ScoreSDE(parameterization=...)``)
SDEParameterization = Literal["eps", "score", "edm"]


def row(name: str) -> Row:
    """The row of parameterization ``name``; ValueError naming the known ones otherwise."""
    if name not in TABLE:
        raise ValueError(f"unknown parameterization {name!r}; choose one of {', '.join(map(repr, TABLE))}")
    return TABLE[name]


def scalings(name: str, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Scalings:
    """``(c_skip, c_out, c_in)`` of parameterization ``name`` at ``alpha``, ``sigma``."""
    return row(name).scalings(alpha, sigma, sigma_data)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or the widest floating dtype of ``tensors`` if wider (float64 bounds)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def x0_from_output(name: str, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor,
                   sigma_data: float = 0.5) -> Tensor:
    """The denoiser ``D = c_skip x_t + c_out output`` of a net's ``output`` at ``x_t`` (alpha and sigma
    broadcast against x_t; coefficients in float64, applied in float32 or wider)."""
    c = scalings(name, alpha.double(), sigma.double(), sigma_data)
    dtype = _compute_dtype(output, x_t)
    return c.c_skip.to(dtype) * x_t.to(dtype) + c.c_out.to(dtype) * output.to(dtype)


def target(name: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """What a net in parameterization ``name`` regresses at ``x_t = alpha x0 + sigma noise``:
    ``F* = a x0 + b noise`` (:meth:`Row.target_coefficients`), in x0's dtype."""
    a, b = row(name).target_coefficients(alpha.double(), sigma.double(), sigma_data)
    return a.to(x0.dtype) * x0 + b.to(x0.dtype) * noise


def output_weight(name: str, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """``c_out^2``: the factor that turns a weight of the x0-space error into a weight of F's error."""
    return row(name).c_out(alpha, sigma, sigma_data) ** 2


def min_snr_weight(snr: Tensor, gamma: float, name: str) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023; the paper's gamma = 5) of F's MSE: the x0-space
    weight ``min(SNR, gamma)`` times ``c_out^2`` on the VP process of that SNR
    (``alpha^2 = SNR / (1 + SNR)``, ``sigma^2 = 1 / (1 + SNR)``): eps ``min(SNR, gamma) / SNR``,
    x0 ``min(SNR, gamma)``, v ``min(SNR, gamma) / (SNR + 1)``."""
    snr = snr.double()
    alpha, sigma = (snr / (1 + snr)).sqrt(), (1 / (1 + snr)).sqrt()
    return snr.clamp(max=gamma) * output_weight(name, alpha, sigma)
