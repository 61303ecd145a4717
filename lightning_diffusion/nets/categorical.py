"""Networks for discrete (categorical) diffusion: ``net(x_t, t, y=None) -> logits`` over K categories.

The contract of the discrete-diffusion family:

- ``x_t``: int64 categories, images ``[B, C, H, W]`` or sequences ``[B, L]``, with values in
  ``[0, K]``: the K data categories ``0 .. K - 1`` and the mask state ``K`` of absorbing
  diffusion (unused by uniform diffusion). The input embeddings therefore have ``K + 1`` rows.
- ``t``: float ``[B]`` (or a 0-dim tensor shared by the batch), the time *fraction* in ``[0, 1]``
  for discrete (``step / T``) and continuous time alike. It is multiplied by ``time_scale``
  (1000) before the sinusoidal embedding, the scale the DDPM timestep embedding is made for.
- ``y``: optional int64 class labels ``[B]``; ``-1`` (or ``y=None`` for all) is the null label
  of classifier-free guidance.
- Output: float32 logits over the K data categories (never the mask), images
  ``[B, C, H, W, K]``, sequences ``[B, L, K]``.

Both nets start with uniform logits (their last layer is zero at initialisation, as in the DDPM
UNet and DiT), so the first cross-entropy is exactly ``log K`` nats per dimension; those zero
layers also mean that on the very first backward the layers before them get a zero gradient
(they are in the graph, and move from the second step on).

- :class:`CategoricalUNet` for images: the DDPM :class:`~lightning_diffusion.nets.unet.UNet` with
  a categorical input embedding and a low-rank head to K logits per pixel and channel.
- :class:`SequenceTransformer` for sequences: a small bidirectional transformer (DiT-style
  adaLN-Zero conditioning on time and class).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_diffusion.nets.embedding import ClassEmbedding, check_unconditional, timestep_embedding
from lightning_diffusion.nets.unet import UNet


def check_categorical_inputs(net: str, x: Tensor, t: Tensor, y: Tensor | None, num_categories: int,
                             num_classes: int | None) -> Tensor:
    """Check the inputs of a categorical net and return ``t`` as ``[B]``.

    Raises ValueError naming ``net`` and the argument: ``x`` not of an integer dtype or with a
    value outside ``[0, num_categories]`` (``num_categories`` is the mask state), ``t`` not a
    float ``[B]`` (or 0-dim) tensor of time fractions in ``[0, 1]``, ``y`` not integer labels
    ``[B]`` in ``[-1, num_classes)``. The value checks cost one device synchronisation.
    """
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{net}: x must hold integer categories (int64) in [0, {num_categories}] "
                         f"(num_categories={num_categories}, {num_categories} = the mask state), got dtype {x.dtype}; "
                         "pass the category indices, not pixel values or one-hot vectors")
    batch = x.shape[0]
    if not t.dtype.is_floating_point:
        raise ValueError(f"{net}: t must be the float time fraction in [0, 1], got dtype {t.dtype}; "
                         "divide a step index by the number of steps")
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{net}: t must have shape [B] = [{batch}] or be 0-dim, got {tuple(t.shape)}")
    if y is not None:
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.shape != (batch,):
            raise ValueError(f"{net}: y must be integer class labels of shape [B] = [{batch}], "
                             f"got dtype {y.dtype} and shape {tuple(y.shape)}")
        if num_classes is None:
            check_unconditional(y)
    checks = [x.min(), x.max(), t.min(), t.max()] if x.numel() else [t.min(), t.max()]
    if y is not None and num_classes is not None and y.numel():
        checks += [y.min(), y.max()]
    values = torch.stack([v.double() for v in checks]).tolist()
    if x.numel():
        lo, hi = values[:2]
        if lo < 0 or hi > num_categories:
            raise ValueError(f"{net}: x holds categories outside [0, {num_categories}] (min {lo:g}, max {hi:g}): "
                             f"num_categories={num_categories} data categories 0..{num_categories - 1} "
                             f"and the mask state {num_categories}; set num_categories to the data's")
        values = values[2:]
    if values[0] < 0 or values[1] > 1:
        raise ValueError(f"{net}: t must be the time fraction in [0, 1], got values in [{values[0]:g}, {values[1]:g}]; "
                         "divide a step index by the number of steps")
    if len(values) > 2 and (values[2] < -1 or values[3] >= num_classes):
        raise ValueError(f"{net}: y holds labels outside [-1, {num_classes - 1}] (min {values[2]:g}, "
                         f"max {values[3]:g}) for num_classes={num_classes}; -1 is the null label")
    return t


def check_sizes(net: str, **sizes: int | None) -> None:
    """Raise ValueError naming ``net`` and the argument unless each size is an integer >= 1;
    ``num_classes`` and ``head_channels`` may also be None."""
    for name, value in sizes.items():
        if value is None and name in ("num_classes", "head_channels"):
            continue
        if value is None and name == "num_categories":  # what the CLI links from float data
            raise ValueError(f"{net}: num_categories is None: the net takes categorical data (int64 categories), but "
                             "the data are read as floats (data.init_args.categorical: false, or data without "
                             "categories); set data.init_args.categorical: true (the CLI links num_categories from "
                             "the data), or give num_categories")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            optional = " None or" if name in ("num_classes", "head_channels") else ""
            raise ValueError(f"{net}: {name} must be{optional} an integer >= 1, got {value!r}")


class CategoricalUNet(nn.Module):
    r"""The DDPM UNet over categorical images: ``x_t [B, C, H, W]`` (int64 in ``[0, K]``) to logits
    ``[B, C, H, W, K]``.

    Each channel's category is embedded by a table of ``K + 1`` rows (the last is the mask state)
    to ``embed_dim`` numbers (one table shared by the channels); the ``C`` embeddings of a pixel
    are concatenated to ``C * embed_dim`` UNet input channels. The
    :class:`~lightning_diffusion.nets.unet.UNet` (time embedding of ``t * time_scale``, class
    embedding with a null label) outputs ``C * head_channels`` features per pixel, and one
    Linear shared by the channels maps each channel's ``head_channels`` features to its K logits:
    a low-rank head of ``9 * width * C * head_channels + head_channels * K`` weights where the full
    3x3 output conv to ``C * K`` channels has ``9 * width * C * K``
    (``width = model_channels * channel_mult[0]``): for K = 256 at width 32, 17,408 instead of
    73,728 per channel, 5% of the digits net; it matters for wider nets and colour images.
    ``head_channels=None`` uses that full conv instead. No one-hot skip of the input is added to
    the logits: the net sees ``x_t`` only through the embedding.

    The UNet's output conv is zero at initialisation, so the logits start as the head's bias
    (zero): uniform, a cross-entropy of ``log K``.

    The digits defaults (8x8, 1 channel, K = 256) follow ``configs/ddpm_digits.yaml``'s UNet
    (width 32, ``channel_mult=(1, 2)``, two ResBlocks per level, attention at 4x4):
    1,036,288 parameters with ``num_classes=None`` (the DDPM digits UNet has 1,001,729; 8,224 of
    ours are the input embedding), 1,037,696 with 10 classes; the full output conv
    (``head_channels=None``) would make it 1,092,576.

    Args:
        num_categories: K, the number of data categories (256 for 8-bit pixels); the input
            embedding has ``K + 1`` rows, the last the mask state. Linked from the data by the CLI.
        in_channels: channels C of the images (linked from the data by the CLI).
        image_size: side of the images in pixels, which places the attention blocks (linked from
            the data by the CLI); None places them as for 32x32 images.
        num_classes: number of classes for class conditioning (labels ``0 .. num_classes - 1``,
            ``-1`` the null label); None builds an unconditional net.
        embed_dim: size of each channel's category embedding.
        model_channels: base width of the UNet.
        channel_mult: width multiplier per resolution level of the UNet.
        num_res_blocks: ResBlocks per level in the UNet's down path.
        attention_resolutions: feature-map sides at which the UNet uses self-attention.
        dropout: dropout probability inside the UNet's ResBlocks.
        num_heads: attention heads of the UNet's self-attention blocks.
        head_channels: features per channel fed to the shared Linear that gives the K logits
            (the low-rank head); None: the UNet's output conv gives the ``C * K`` logits itself.
        time_scale: factor applied to the time fraction ``t`` before the sinusoidal embedding.
    """

    data_kind = "images"  #: what the net takes: images [B, C, H, W] (the models check it against their data)

    def __init__(
        self,
        num_categories: int = 256,
        in_channels: int = 1,
        image_size: int | None = 8,
        num_classes: int | None = None,
        embed_dim: int = 32,
        model_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (4,),
        dropout: float = 0.1,
        num_heads: int = 1,
        head_channels: int | None = 32,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        check_sizes("CategoricalUNet", num_categories=num_categories, in_channels=in_channels, embed_dim=embed_dim,
                    head_channels=head_channels, num_classes=num_classes)
        self.num_categories = num_categories
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.head_channels = head_channels
        self.embed = nn.Embedding(num_categories + 1, embed_dim)
        features = num_categories if head_channels is None else head_channels
        self.unet = UNet(
            in_channels=in_channels * embed_dim, out_channels=in_channels * features, image_size=image_size,
            model_channels=model_channels, channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions), dropout=dropout, num_heads=num_heads,
            num_classes=num_classes, time_scale=time_scale,
        )
        self.head = nn.Linear(head_channels, num_categories) if head_channels is not None else None
        if self.head is not None:
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits of ``p(x_0 | x_t)`` per pixel and channel.

        Args:
            x: int64 categories ``[B, in_channels, H, W]`` in ``[0, num_categories]``
                (``num_categories`` is the mask state); H and W divisible by
                ``2 ** (len(channel_mult) - 1)``.
            t: float time fractions in ``[0, 1]``, ``[B]`` or 0-dim.
            y: int64 class labels ``[B]``; -1 (or None for all) is the null label.

        Returns:
            float32 logits ``[B, in_channels, H, W, num_categories]``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"CategoricalUNet: expected x of shape [B, {self.in_channels}, H, W] "
                             f"(in_channels={self.in_channels}), got {tuple(x.shape)}")
        t = check_categorical_inputs("CategoricalUNet", x, t, y, self.num_categories, self.num_classes)
        b, c, hgt, wid = x.shape
        h = self.embed(x.long()).permute(0, 1, 4, 2, 3).reshape(b, -1, hgt, wid)  # [B, C * embed_dim, H, W]
        out = self.unet(h, t, y)  # [B, C * features, H, W]
        out = out.reshape(b, c, -1, hgt, wid).permute(0, 1, 3, 4, 2)  # [B, C, H, W, features]
        if self.head is not None:
            out = self.head(out)
        return out.float()


class TransformerBlock(nn.Module):
    r"""Pre-LN transformer block with adaLN-Zero conditioning (DiT, Peebles & Xie 2023).

    From the conditioning vector ``c`` a zero-initialised Linear gives per-block shift, scale and
    gate for the attention and the MLP:
    ``h = h + gate_a * Attn(LN(h) * (1 + scale_a) + shift_a)``, then the same with the MLP
    (``dim -> mlp_ratio * dim -> dim``, GELU). With the gates zero the block starts as the identity.
    Attention is bidirectional (no mask), by ``scaled_dot_product_attention``.

    Args:
        dim: width of the tokens (and of ``c``).
        heads: attention heads; must divide ``dim``.
        mlp_ratio: hidden width of the MLP over ``dim``.
        dropout: dropout probability of the attention weights and after the MLP's hidden layer.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        """``h``: tokens ``[B, L, dim]``; ``c``: conditioning ``[B, dim]``. Returns ``[B, L, dim]``."""
        b, length, dim = h.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)
        a = self.norm1(h) * (1 + scale_a) + shift_a
        q, k, v = self.qkv(a).reshape(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        h = h + gate_a * self.proj(a.transpose(1, 2).reshape(b, length, dim))
        return h + gate_m * self.mlp(self.norm2(h) * (1 + scale_m) + shift_m)


class SequenceTransformer(nn.Module):
    r"""A small bidirectional transformer over categorical sequences: ``x_t [B, L]`` (int64 in
    ``[0, K]``) to logits ``[B, L, K]``, as the DiT backbone of MDLM/SEDD, smaller.

    Tokens are embedded by a table of ``K + 1`` rows (the last is the mask state) plus a learned
    positional embedding (``max_length`` rows; any ``L <= max_length`` is taken). Time and class
    condition every block by **adaLN-Zero** (not by an embedding added to the tokens):
    ``c = MLP(sinusoidal(t * time_scale)) + class_embedding(y)`` gives each block's LayerNorm
    shift/scale and residual gates (:class:`TransformerBlock`), and the final LayerNorm's
    shift/scale before the Linear to the K logits. The gates, the final modulation and the final
    Linear are zero at initialisation: the net starts with uniform logits.

    The defaults (``dim=128, depth=4, heads=4``, K = 27, ``max_length=32``) have 1,264,539
    parameters with ``num_classes=None`` (429,312 of them the adaLN modulations), 1,265,947 with
    10 classes.

    Args:
        num_categories: K, the number of data categories (e.g. the alphabet size); the token
            embedding has ``K + 1`` rows, the last the mask state. Linked from the data by the CLI.
        max_length: the longest sequence length L taken (rows of the positional embedding).
        num_classes: number of classes for class conditioning (labels ``0 .. num_classes - 1``,
            ``-1`` the null label); None builds an unconditional net.
        dim: width of the tokens.
        depth: number of transformer blocks.
        heads: attention heads per block; must divide ``dim``.
        mlp_ratio: hidden width of each block's MLP over ``dim``.
        dropout: dropout probability of the attention weights, inside the MLPs and on the
            embedded tokens.
        time_scale: factor applied to the time fraction ``t`` before the sinusoidal embedding.
    """

    data_kind = "sequences"  #: what the net takes: sequences [B, L] (the models check it against their data)

    def __init__(
        self,
        num_categories: int = 27,
        max_length: int = 32,
        num_classes: int | None = None,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        check_sizes("SequenceTransformer", num_categories=num_categories, max_length=max_length, dim=dim,
                    depth=depth, heads=heads, num_classes=num_classes)
        if dim % heads:
            raise ValueError(f"SequenceTransformer: heads={heads} must divide dim={dim}")
        self.num_categories = num_categories
        self.max_length = max_length
        self.num_classes = num_classes
        self.dim = dim
        self.time_scale = time_scale
        self.embed = nn.Embedding(num_categories + 1, dim)
        self.pos_embed = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.embed_dropout = nn.Dropout(dropout)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_embed = ClassEmbedding(num_classes, dim) if num_classes is not None else None
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, num_categories)
        for layer in (self.modulation_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits of ``p(x_0 | x_t)`` per position.

        Args:
            x: int64 categories ``[B, L]`` in ``[0, num_categories]`` (``num_categories`` is the
                mask state), ``L <= max_length``.
            t: float time fractions in ``[0, 1]``, ``[B]`` or 0-dim.
            y: int64 class labels ``[B]``; -1 (or None for all) is the null label.

        Returns:
            float32 logits ``[B, L, num_categories]``.
        """
        if x.ndim != 2 or x.shape[1] > self.max_length:
            raise ValueError(f"SequenceTransformer: expected x of shape [B, L] with L <= max_length={self.max_length}, "
                             f"got {tuple(x.shape)}")
        t = check_categorical_inputs("SequenceTransformer", x, t, y, self.num_categories, self.num_classes)
        h = self.embed_dropout(self.embed(x.long()) + self.pos_embed[: x.shape[1]])
        c = self.time_embed(timestep_embedding(t * self.time_scale, self.dim).to(h.dtype))
        if self.class_embed is not None:
            c = c + self.class_embed(y, x.shape[0])
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.modulation_out(F.silu(c))[:, None].chunk(2, dim=-1)
        return self.out(self.norm_out(h) * (1 + scale) + shift).float()
