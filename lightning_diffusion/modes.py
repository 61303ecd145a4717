"""One way to run code as evaluation runs: :func:`evaluating`.

Used by the models (``sample``, ``bits_per_dim``, ``reconstruct``) and the callbacks
(:func:`~lightning_diffusion.callbacks.ema.evaluation_weights`) alike, so it imports nothing of
ours and no Lightning.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def evaluating(module: nn.Module, *, no_grad: bool = True) -> Iterator[nn.Module]:
    """Run the body with ``module`` in eval mode (dropout off, batch-norm statistics frozen) and,
    with ``no_grad``, under ``torch.no_grad()``; the module's training flag comes back after, also
    when the body raises. ``torch.no_grad`` rather than ``inference_mode``: a likelihood that needs
    gradients (an ODE divergence) enables them inside with ``torch.enable_grad()``.

    Args:
        module: the module to evaluate.
        no_grad: also turn off gradient recording (False leaves it as the caller set it).
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield module
    finally:
        module.train(was_training)
