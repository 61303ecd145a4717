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
energy  ``grad_x E`` (eps)      1 / alpha              -sigma / alpha       1
======  ======================  =======================  ===================  ===========================

(v: Salimans & Ho 2022, n = 1 on a VP process; score: Tweedie, ``x_0 = (x_t + sigma^2 score) / alpha``;
edm: EDM's preconditioning on the VE-equivalent ``x_t / alpha`` at noise level ``s``.) Every row's
``c_noise`` is the process's own time t (the net contract ``net(x, t, y)``; EDM's ``ln(s) / 4`` is a
monotone function of it). ``edm`` has ``fixed_weight``: its c_out makes F's target unit-variance, and
a family trains it with weight 1 on F instead of its own weighting.

``energy`` (Salimans & Ho 2021, "Should EBMs model the energy or the score?"; Du et al. 2023,
"Reduce, Reuse, Recycle"): the net returns one number per sample, ``E_net(x_t, t) -> [B]``, and F is
its gradient ``grad_x E_net`` by autograd (the row's :attr:`Row.output`, :func:`energy_gradient`:
with a graph (``create_graph``) where gradients are on, so the loss trains the energy; without
one inside ``no_grad``, as in sampling). ``E_net`` is measured in sigma-nats, R3's units, in which
its gradient is the noise: ``grad_x E_net = eps_hat``, so the row has eps's coefficients and the
loss target and weights of eps. In nats ``-log p_t(x_t) = E_net / sigma + const`` (the row's
:attr:`Row.energy_scale`, ``1 / sigma``), so ``score = -grad_x (E_net / sigma)`` and the denoiser is
Tweedie's ``x0_hat = (x_t + sigma^2 score) / alpha = (x_t - sigma grad_x E_net) / alpha``. sigma-nats
keep the net's gradients of unit scale at every noise level (in nats they grow as 1 / sigma).
``c_in`` is 1: the gradient is taken with respect to the net's input, which is x_t itself.
Every sampler serves it unchanged, since it sees only the denoiser; ``GaussianDiffusionModel.energy``
gives the energy itself in nats (an MCMC correction's target ``exp(-E)``).

Adding a parameterization: write its ``c_skip`` and ``c_out`` (and ``c_in``, ``c_noise`` where
they are not 1 and t) as functions of ``(alpha, sigma, sigma_data)`` (and ``output`` where F is
not the net's output itself, ``energy_scale`` where the net outputs an energy, as ``energy`` does),
add a :class:`Row` to :data:`TABLE`, and add its name to the ``Literal`` of each family that
offers it (:data:`DDPMParameterization`, :data:`SDEParameterization`); the denoiser, the loss
target and weight, and the families' checks then serve it unchanged. Nothing else in the package
names a parameterization.
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


def call_net(net: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    """F of every row but ``energy``: the net's output ``net(x, t, y)`` itself."""
    return net(x, t, y)


def check_energy(energy: Tensor, x: Tensor) -> Tensor:
    """``energy`` as ``[B]`` (a ``[B, 1]`` output squeezed); ValueError unless the net returned one
    number per sample of ``x``."""
    if energy.ndim == 2 and energy.shape[1] == 1:
        energy = energy[:, 0]
    if energy.shape != x.shape[:1]:
        raise ValueError(f"parameterization 'energy': the net must return one energy per sample, shape "
                         f"[{x.shape[0]}], but returned shape {list(energy.shape)} for x of shape {list(x.shape)}; "
                         "wrap a UNet or MLP in lightning_diffusion.EnergyHead (net: {class_path: EnergyHead, "
                         "init_args: {net: ...}})")
    return energy


def energy_gradient(net: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    """F of the ``energy`` row: ``grad_x E_net(x, t, y)`` by autograd, in x's dtype.

    Where gradients are on (training, the ODE likelihood's divergence) the gradient keeps its graph
    (``create_graph``), so a loss on it trains the energy (a double backward) and an ``x`` that
    requires grad stays in the graph; inside ``no_grad`` or ``inference_mode`` (sampling, Lightning's
    validation loop) it is computed under ``enable_grad`` (on copies of inference tensors, which
    autograd cannot record) and returned without a graph."""
    keep_graph = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.enable_grad():
        if keep_graph and x.requires_grad:
            inputs = x
        else:
            inputs = _outside_inference(x.detach()).requires_grad_(True)
        energy = check_energy(net(inputs, _outside_inference(t), _outside_inference(y)), x)
        (gradient,) = torch.autograd.grad(energy.sum(), inputs, create_graph=keep_graph)
    return gradient.to(x.dtype)


def _outside_inference(tensor: Tensor | None) -> Tensor | None:
    """``tensor``, or a copy of it where it was made under ``inference_mode`` (autograd refuses those)."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor


@dataclass(frozen=True)
class Row:
    """One parameterization: its coefficients as functions of ``(alpha, sigma, sigma_data)``.

    ``c_noise(t)`` maps the process time to the net's time input; ``fixed_weight``: trained with
    weight 1 on F whatever the family's weighting (EDM); ``output(net, x, t, y)``: F from the net
    (default the net's output; ``energy``: the gradient of its scalar); ``energy_scale``: where the
    net outputs an energy, the nats ``-log p_t`` per unit of it (None: the net outputs no energy)."""

    c_skip: Coefficient
    c_out: Coefficient
    c_in: Coefficient = _one
    c_noise: Callable[[Tensor], Tensor] = _time
    fixed_weight: bool = False
    output: Callable[..., Tensor] = call_net
    energy_scale: Coefficient | None = None

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
def _eps_skip(alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    return 1 / alpha


def _eps_out(alpha: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    return -sigma / alpha


TABLE: dict[str, Row] = {
    "eps": Row(c_skip=_eps_skip, c_out=_eps_out),
    "x0": Row(c_skip=_zero, c_out=_one),
    "v": Row(c_skip=lambda a, s, sd: a / (a**2 + s**2), c_out=lambda a, s, sd: -s / (a**2 + s**2)),
    "score": Row(c_skip=lambda a, s, sd: 1 / a, c_out=lambda a, s, sd: s**2 / a),
    "edm": Row(c_skip=lambda a, s, sd: sd**2 / _edm_norm(a, s, sd)[1] ** 2 / a,
               c_out=lambda a, s, sd: _edm_norm(a, s, sd)[0] * sd / _edm_norm(a, s, sd)[1],
               c_in=lambda a, s, sd: 1 / (a * _edm_norm(a, s, sd)[1]), fixed_weight=True),
    "energy": Row(c_skip=_eps_skip, c_out=_eps_out, output=energy_gradient, energy_scale=lambda a, s, sd: 1 / s),
}

#: what a DDPM's net may predict (the type of ``DDPM(parameterization=...)``)
DDPMParameterization = Literal["eps", "x0", "v", "energy"]
#: what a ScoreSDE's net may output (the type of ``ScoreSDE(parameterization=...)``)
SDEParameterization = Literal["eps", "score", "edm", "energy"]


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
