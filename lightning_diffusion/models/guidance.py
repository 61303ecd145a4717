"""Classifier-free guidance (Ho & Salimans 2022), once for every family that conditions on labels.

``out(x_t | null) + w (out(x_t | y) - out(x_t | null))``: in x0 space for the Gaussian-diffusion
families (their denoiser's ``x0_hat``), in log space for discrete diffusion (the x0 log-probabilities).
``w = 1`` is the conditional model, ``w = 0`` the unconditional one; -1 is the contract's null label.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def guided(fn: Callable[[Tensor, Tensor, Tensor | None], Tensor], y: Tensor | None, guidance_scale: float,
           space: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(x_t, t)``: ``fn(x_t, t, y)`` guided with scale ``guidance_scale`` = w, both terms from one
    call on the 2B batch ``(y, -1)``, combined in ``space`` (e.g. ``log_softmax``; None: as ``fn``
    returns them). ``w = 1`` or no labels: ``fn(x_t, t, y)`` itself. ``t`` is [B] or a scalar."""
    if guidance_scale == 1.0 or y is None:
        return lambda x_t, t: fn(x_t, t, y)
    null = torch.full_like(y, -1)

    def guided_fn(x_t: Tensor, t: Tensor) -> Tensor:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        both = fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        conditional, unconditional = (both if space is None else space(both)).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return guided_fn
