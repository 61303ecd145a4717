"""A noise-conditional energy from a net that outputs the shape of x (our UNet or MLP): the net of
the ``energy`` parameterization of DDPM and ScoreSDE (``E_net(x_t, t, y) -> [B]``)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

#: how the head turns ``f(x, t, y)`` (the shape of x) into one number per sample
EnergyForm = Literal["residual", "norm"]


class EnergyHead(nn.Module):
    """``E(x, t, y) = 0.5 ||x - f(x, t, y)||^2`` (``residual``) or ``0.5 ||f(x, t, y)||^2`` (``norm``),
    summed over every non-batch dimension: ``[B]``.

    The energy is in the ``energy`` row's units, sigma-nats, where ``grad_x E`` is the predicted noise
    eps (:mod:`~lightning_diffusion.diffusion.parameterization`).

    - ``norm`` is R3's (Du et al. 2023, yilundu/reduce_reuse_recycle): ``E = 0.5 ||f||^2``,
      ``grad_x E = J_f^T f``.
    - ``residual`` is the form of Salimans & Ho 2021 ("Should EBMs model the energy or the score?"),
      ``0.5 ||x - f||^2 / sigma^2`` in nats, here in sigma-nats without the 1 / sigma^2 (the
      row's ``energy_scale`` measures it in nats; the net is time-conditioned and learns the scale):
      ``grad_x E = (x - f) - J_f^T (x - f)``, so a net whose ``f`` and Jacobian start small starts at
      ``grad_x E = x``, the exact eps of the pure-noise end of a VP process, the score of N(0, I).

    ``residual`` is the default because it starts near the right score and it trains from our nets'
    initialisation: the UNet's output convolution starts at zero, where ``f = 0`` and ``J_f = 0``, so
    ``norm``'s gradient ``J_f^T f`` and its derivative by every weight are zero there (R3 trains
    from a net with a non-zero output layer, such as the MLP or a UNet whose ``conv_out`` is not
    zero-initialised); ``residual``'s gradient ``x - f`` still depends on ``f``'s weights.

    Args:
        net: the net ``f(x, t, y=None)`` with the shape of x (a :class:`~lightning_diffusion.UNet` or
            :class:`~lightning_diffusion.MLP` with ``out_channels`` = in_channels).
        form: ``residual`` (default; Salimans & Ho) or ``norm`` (R3).
    """

    def __init__(self, net: nn.Module, form: EnergyForm = "residual"):
        super().__init__()
        if form not in ("residual", "norm"):
            raise ValueError(f"EnergyHead: unknown form {form!r}; choose 'residual' (Salimans & Ho 2021) or 'norm' (R3)")
        self.net, self.form = net, form
        data_kind = getattr(net, "data_kind", None)
        if data_kind is not None:
            self.data_kind = data_kind  # the models check it against their data

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The energies ``[B]`` of ``x`` ``[B, ...]`` at the net's times ``t`` [B] (labels ``y``)."""
        f = self.net(x, t, y)
        if f.shape != x.shape:
            raise ValueError(f"EnergyHead: the wrapped net returned shape {list(f.shape)} for x of shape "
                             f"{list(x.shape)}; it must return the shape of x (out_channels = in_channels)")
        residual = x - f if self.form == "residual" else f
        return 0.5 * residual.float().pow(2).flatten(1).sum(1)
