"""Conditioning inputs of the denoising networks: diffusion time and class label."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    r"""Sinusoidal embedding of (diffusion) time, as in Transformers and DDPM (Ho et al. 2020).

    With ``half = dim // 2`` and frequencies
    :math:`f_i = \exp(-\log(\text{max\_period}) \, i / \text{half})`, :math:`i = 0, \dots, \text{half} - 1`,

    .. math::

        \mathrm{emb}(t) = [\cos(t f_0), \dots, \cos(t f_{\text{half}-1}),
                           \sin(t f_0), \dots, \sin(t f_{\text{half}-1})],

    followed by a single zero when ``dim`` is odd.

    Args:
        t: times, shape ``[B]``; any real values (integer steps or scaled continuous times).
        dim: size of the embedding.
        max_period: longest period of the sinusoids, in units of ``t``.

    Returns:
        float32 tensor of shape ``[B, dim]``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class ClassEmbedding(nn.Module):
    """Learned class-label embedding with an extra "null" label for classifier-free guidance.

    Row ``num_classes`` of the table is the null label. It is used for every sample when
    ``y`` is None and for the entries of ``y`` equal to -1 (label dropout).

    Args:
        num_classes: number of real classes; labels are ``0 .. num_classes - 1``.
        dim: size of the embedding.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch_size: int) -> Tensor:
        """Embed integer labels ``y`` of shape ``[batch_size]`` (or None) to ``[batch_size, dim]``."""
        if y is None:
            labels = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
        else:
            labels = torch.where(y == -1, self.num_classes, y).long()
        return self.table(labels)


def check_unconditional(y: Tensor | None) -> None:
    """Raise unless ``y`` carries no labels (None or all -1), for nets built without ``num_classes``."""
    if y is not None and bool((y != -1).any()):
        raise ValueError(
            "class labels y were given, but the net was built without num_classes; "
            "pass num_classes to condition on labels (or y=None / all -1 for unconditional)"
        )
