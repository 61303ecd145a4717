"""Time-conditioned residual MLP for low-dimensional data (e.g. 2-D toy distributions)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from lightning_diffusion.nets.embedding import ClassEmbedding, check_unconditional, timestep_embedding


class ResidualBlock(nn.Module):
    """``h + Linear(dropout(SiLU(LayerNorm(h) + Linear(SiLU(emb)))))``: a pre-norm residual layer
    conditioned on the time(+class) embedding ``emb``.

    Args:
        hidden: width of the residual stream and of the embedding.
        dropout: dropout probability before the output Linear.
    """

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """``h``, ``emb``: ``[B, hidden]``. Returns ``[B, hidden]``."""
        return h + self.linear(self.dropout(F.silu(self.norm(h) + self.emb_proj(F.silu(emb)))))


class MLP(nn.Module):
    """Residual MLP denoiser for points ``[B, D]``, conditioned on time and optionally a class.

    Args:
        in_channels: dimension ``D`` of the input points.
        hidden: width of the hidden layers.
        num_layers: number of residual blocks.
        time_embed_dim: size of the sinusoidal time embedding, mapped by a 2-layer MLP to ``hidden``.
        num_classes: number of classes for class conditioning; None builds an unconditional
            net. With classes, an extra "null" label (used for ``y=None`` and ``y == -1``)
            supports classifier-free guidance. A list of class counts (e.g. ``[10, 8]``) takes
            per-attribute labels ``y [B, k]``, one embedding per attribute summed
            (:class:`~lightning_diffusion.nets.embedding.ClassEmbedding`).
        time_scale: factor applied to ``t`` before the sinusoidal embedding, e.g. 1000 for
            continuous times in [0, 1]; 1 for integer DDPM steps.
        dropout: dropout probability inside the residual blocks.
        out_channels: size of the output; None means ``in_channels``. ``2 * in_channels`` for a
            DDPM that learns its variance (``loss_type="hybrid"``).
    """

    data_kind = "points"  #: what the net takes: points [B, D] (the models check it against their data)

    def __init__(
        self,
        in_channels: int = 2,
        hidden: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 128,
        num_classes: int | list[int] | None = None,
        time_scale: float = 1.0,
        dropout: float = 0.0,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.time_embed_dim = time_embed_dim
        self.time_scale = time_scale
        self.time_embed = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = ClassEmbedding(num_classes, hidden) if num_classes is not None else None
        self.input = nn.Linear(in_channels, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, dropout) for _ in range(num_layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, self.out_channels))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Apply the net.

        Args:
            x: points, ``[B, in_channels]``.
            t: float times, ``[B]`` or a scalar (0-dim) shared by the batch.
            y: integer class labels ``[B]``; -1 (or ``y=None`` for all) means the null label.

        Returns:
            ``[B, out_channels]``.
        """
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape [B, {self.in_channels}] (in_channels={self.in_channels}), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        if t.ndim == 0:
            t = t.expand(batch)
        emb = self.time_embed(timestep_embedding(t * self.time_scale, self.time_embed_dim).to(x.dtype))
        if self.class_embed is not None:
            emb = emb + self.class_embed(y, batch)
        else:
            check_unconditional(y)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
