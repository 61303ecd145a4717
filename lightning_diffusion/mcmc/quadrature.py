"""log Z of a 2-D energy by quadrature on a grid, and the normalised log density on that grid.

``Z = ∫∫ exp(-E(x, y)) dx dy`` over a box that covers the mass, by the composite Simpson (or
trapezoid) rule in each axis, summed in log space: ``log Z = logsumexp_ij(-E_ij + log w_i + log w_j)``.
For a smooth density whose mass lies well inside the box the error is far below 1e-3 nats at the
default 401 x 401 nodes; ``edge_mass`` says whether the box was large enough.
"""

# No `from __future__ import annotations`: the NamedTuple's fields must be evaluated types (pdoc).
import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_diffusion.mcmc.kernels import Energy

Box = tuple[tuple[float, float], tuple[float, float]]
"""``((x_min, x_max), (y_min, y_max))``."""
Rule = Literal["simpson", "trapezoid"]


class DensityGrid(NamedTuple):
    """What :func:`log_density_grid` returns; ``log_density[i, j]`` is at ``(xs[j], ys[i])`` (rows are y,
    as ``imshow(..., origin="lower", extent=(*bounds[0], *bounds[1]))`` draws it)."""

    log_z: float  # log ∫∫ exp(-E) over the box (nats)
    log_density: Tensor  # [ny, nx] float64: the normalised log p = -E - log Z at the nodes (nats)
    xs: Tensor  # [nx] float64 node abscissae
    ys: Tensor  # [ny] float64 node ordinates
    edge_mass: float  # fraction of the mass within 5% of the box's width from its edges: keep it << 1e-3


def quadrature_weights(lo: float, hi: float, num: int, rule: Rule = "simpson") -> tuple[Tensor, Tensor]:
    """Nodes and weights (float64, [num]) of the composite ``rule`` on [lo, hi]:
    Simpson ``h/3 (1, 4, 2, 4, ..., 2, 4, 1)`` (num odd), trapezoid ``h (1/2, 1, ..., 1, 1/2)``."""
    if not hi > lo:
        raise ValueError(f"a quadrature interval needs lo < hi, got ({lo}, {hi})")
    if rule == "simpson":
        if num < 3 or num % 2 == 0:
            raise ValueError(f"Simpson's rule needs an odd number of nodes >= 3, got num={num}")
    elif rule == "trapezoid":
        if num < 2:
            raise ValueError(f"the trapezoid rule needs num >= 2 nodes, got num={num}")
    else:
        raise ValueError(f"rule must be 'simpson' or 'trapezoid', got {rule!r}")
    nodes = torch.linspace(lo, hi, num, dtype=torch.float64)
    h = (hi - lo) / (num - 1)
    if rule == "simpson":
        weights = torch.full((num,), 2.0, dtype=torch.float64)
        weights[1::2] = 4.0
        weights[0] = weights[-1] = 1.0
        return nodes, weights * h / 3
    weights = torch.full((num,), h, dtype=torch.float64)
    weights[0] = weights[-1] = h / 2
    return nodes, weights


def box_around(points: Tensor, pad: float = 0.5) -> Box:
    """A box around 2-D ``points`` [N, 2]: each axis' range widened by ``pad`` times its length on both sides."""
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"box_around needs 2-D points [N, 2], got shape {list(points.shape)}")
    lo, hi = points.detach().min(0).values.double(), points.detach().max(0).values.double()
    span = (hi - lo).clamp_min(1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


@torch.no_grad()
def log_density_grid(energy: Energy, bounds: Box, *, num: int = 401, rule: Rule = "simpson",
                     batch_size: int = 65536, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> DensityGrid:
    """``E`` of a 2-D density on a ``num`` x ``num`` grid over ``bounds``, its ``log Z`` by ``rule`` and the
    normalised log density ``-E - log Z`` at the nodes. ``energy`` gets [batch_size, 2] points in
    ``dtype`` (default: torch's default) on ``device``; sums are in float64. Returns :class:`DensityGrid`.
    """
    (x_lo, x_hi), (y_lo, y_hi) = bounds
    xs, wx = quadrature_weights(x_lo, x_hi, num, rule)
    ys, wy = quadrature_weights(y_lo, y_hi, num, rule)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # row-major in y, then x
    dtype = dtype or torch.get_default_dtype()
    energies = torch.cat([energy(chunk.to(device=device, dtype=dtype)).to(torch.float64).cpu()
                          for chunk in grid.split(batch_size)])
    if energies.shape != (grid.shape[0],):
        raise ValueError(f"energy(x) must return one energy per point; got shape {list(energies.shape)} "
                         f"for {grid.shape[0]} points")
    neg_e = -energies.reshape(num, num)
    log_mass = neg_e + wy.log()[:, None] + wx.log()[None, :]
    log_z = torch.logsumexp(log_mass.reshape(-1), 0)
    band = max(1, math.ceil(0.05 * (num - 1)))
    inner = torch.zeros(num, num, dtype=torch.bool)
    inner[band:-band, band:-band] = True
    edge_mass = float((log_mass[~inner] - log_z).exp().sum())
    return DensityGrid(float(log_z), neg_e - log_z, xs, ys, edge_mass)


def grid_log_z(energy: Energy, bounds: Box, *, num: int = 401, rule: Rule = "simpson", batch_size: int = 65536,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> float:
    """``log ∫∫ exp(-E(x, y)) dx dy`` (nats) over ``bounds`` by quadrature (:func:`log_density_grid`)."""
    return log_density_grid(energy, bounds, num=num, rule=rule, batch_size=batch_size, device=device,
                            dtype=dtype).log_z


__all__ = ["Box", "DensityGrid", "Rule", "box_around", "grid_log_z", "log_density_grid", "quadrature_weights"]
