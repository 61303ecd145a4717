"""Conditioning inputs of the denoising networks: diffusion time and class label."""

from __future__ import annotations

import math
from collections.abc import Sequence

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

    With a list of class counts ``[n_0, n_1, ...]`` (per-attribute labels, e.g. ``[10, 8]`` for the
    digit and the colour of ``colour_digits``), ``y`` is ``[B, k]``: column i is attribute i's label
    in ``0 .. n_i - 1`` or -1 (that attribute dropped), and the embedding is the sum of one table
    per attribute, each with its own null row ``n_i``. So dropping one attribute keeps the other's
    embedding: the net learns ``E(x | digit)``, ``E(x | colour)`` and ``E(x)`` besides the joint one.

    Args:
        num_classes: number of real classes (labels ``0 .. num_classes - 1``); or one count per
            attribute (labels ``[B, len(num_classes)]``).
        dim: size of the embedding.
    """

    def __init__(self, num_classes: int | Sequence[int], dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes if isinstance(num_classes, int) else [int(n) for n in num_classes]
        if isinstance(self.num_classes, int):
            self.table = nn.Embedding(num_classes + 1, dim)  # the single-label path: unchanged state dict
        else:
            if not self.num_classes or min(self.num_classes) < 1:
                raise ValueError(f"ClassEmbedding: num_classes as a list needs one count >= 1 per attribute, "
                                 f"got {num_classes}")
            self.tables = nn.ModuleList(nn.Embedding(n + 1, dim) for n in self.num_classes)

    def forward(self, y: Tensor | None, batch_size: int) -> Tensor:
        """Embed integer labels ``y`` of shape ``[batch_size]`` (``[batch_size, k]`` with a list of
        ``k`` class counts), or None (all null), to ``[batch_size, dim]``."""
        if isinstance(self.num_classes, int):
            if y is None:
                labels = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
            else:
                labels = torch.where(y == -1, self.num_classes, y).long()
            return self.table(labels)
        device = self.tables[0].weight.device
        if y is None:
            y = torch.full((batch_size, len(self.tables)), -1, dtype=torch.long, device=device)
        if y.ndim != 2 or y.shape[1] != len(self.tables):
            raise ValueError(f"ClassEmbedding(num_classes={self.num_classes}): labels y must be [B, {len(self.tables)}] "
                             f"(one column per attribute, -1 = dropped), got shape {tuple(y.shape)}; a model with "
                             "label_attributes converts joint labels")
        return sum(table(torch.where(y[:, i] == -1, n, y[:, i]).long())
                   for i, (table, n) in enumerate(zip(self.tables, self.num_classes)))


def check_unconditional(y: Tensor | None) -> None:
    """Raise unless ``y`` carries no labels (None or all -1), for nets built without ``num_classes``."""
    if y is not None and bool((y != -1).any()):
        raise ValueError(
            "class labels y were given, but the net was built without num_classes; "
            "pass num_classes to condition on labels (or y=None / all -1 for unconditional)"
        )
