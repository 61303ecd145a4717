"""The DDPM UNet of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models").

Same architecture as the official ``diffusion_tf`` model: a PixelCNN++-style UNet of wide
ResNet blocks conditioned on time, with self-attention at chosen resolutions. The defaults
are the 35.7M-parameter CIFAR-10 model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_diffusion.nets.embedding import ClassEmbedding, check_unconditional, timestep_embedding


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or for narrow layers the largest divisor of ``channels`` that
    leaves at least 4 channels per group (as the DDPM UNet's narrowest layer, 128 channels in 32
    groups).

    A group of one channel would subtract that channel's spatial mean, and with it the per-channel
    bias by which a ResBlock adds the time and class embedding: the net would not see t or y.
    """
    groups = max(g for g in range(1, max(1, min(32, channels // 4)) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Wide ResNet block with an additive time embedding.

    ``GN -> SiLU -> conv3x3 -> + Linear(SiLU(temb)) -> GN -> SiLU -> dropout -> conv3x3``, plus a
    shortcut (a 1x1 conv when the channel count changes). The last conv starts at zero, so the
    block starts as the identity/shortcut.

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels of the output feature map.
        temb_channels: size of the time(+class) embedding.
        dropout: dropout probability before the last conv.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """``x``: ``[B, in_channels, H, W]``; ``temb``: ``[B, temb_channels]``. Returns ``[B, out_channels, H, W]``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the spatial positions of a feature map.

    ``x + proj(softmax(q k^T / sqrt(d)) v)`` with ``q, k, v`` 1x1 convs of ``GN(x)`` and ``d`` the
    per-head width. The output projection starts at zero, so the block starts as the identity.

    Args:
        channels: channels of the feature map.
        num_heads: number of attention heads; must divide ``channels``.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, C, H, W]``. Returns the same shape."""
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def heads(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, heads, H*W, C/heads]
            return t.reshape(b, self.num_heads, c // self.num_heads, hgt * wid).transpose(-1, -2)

        out = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3x3 conv, or 2x2 average pooling when ``with_conv`` is False."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv when ``with_conv``."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM UNet (Ho et al. 2020) predicting, e.g., the noise of a noisy image at time ``t``.

    Per resolution level, the down path has ``num_res_blocks`` ResBlocks and the up path
    ``num_res_blocks + 1`` ResBlocks fed with the skip connections of the down path; levels are
    separated by 2x down/upsampling. Self-attention follows each ResBlock at the resolutions in
    ``attention_resolutions`` and sits in the middle, between two ResBlocks.

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output; None means ``in_channels``.
        image_size: input resolution in pixels, used to place attention blocks at the
            resolutions in ``attention_resolutions``; None places them as for 32x32 inputs.
        model_channels: base width ``ch``; level ``i`` has ``ch * channel_mult[i]`` channels and
            the time embedding has ``4 * ch``.
        channel_mult: width multiplier per resolution level; ``len(channel_mult) - 1`` is the
            number of 2x downsamplings.
        num_res_blocks: ResBlocks per level in the down path (one more in the up path).
        attention_resolutions: resolutions in pixels (feature-map side length) at which
            self-attention blocks are used.
        dropout: dropout probability inside the ResBlocks.
        num_heads: attention heads in each self-attention block.
        num_classes: number of classes for class conditioning; None builds an unconditional
            net. With classes, an extra "null" label (used for ``y=None`` and ``y == -1``)
            supports classifier-free guidance. A list of class counts (e.g. ``[10, 8]``) takes
            per-attribute labels ``y [B, k]``, one embedding per attribute summed
            (:class:`~lightning_diffusion.nets.embedding.ClassEmbedding`).
        time_scale: factor applied to ``t`` before the sinusoidal embedding, e.g. 1000 for
            continuous times in [0, 1]; 1 for integer DDPM steps.
        resample_with_conv: use convolutions in the down/upsampling layers (else average
            pooling / plain nearest upsampling).
    """

    data_kind = "images"  #: what the net takes: images [B, C, H, W] (the models check it against their data)

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int | None = None,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_classes: int | list[int] | None = None,
        time_scale: float = 1.0,
        resample_with_conv: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.model_channels = model_channels
        self.num_levels = len(channel_mult)
        self.num_res_blocks = num_res_blocks
        self.time_scale = time_scale
        ch, temb_ch = model_channels, 4 * model_channels

        self.time_embed = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.class_embed = ClassEmbedding(num_classes, temb_ch) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def attention(channels: int, resolution: int) -> nn.Module:
            return AttentionBlock(channels, num_heads) if resolution in attention_resolutions else nn.Identity()

        resolution = 32 if image_size is None else image_size
        skip_channels = [ch]
        self.down_blocks = nn.ModuleList()
        self.down_attns = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResBlock(ch, model_channels * mult, temb_ch, dropout))
                ch = model_channels * mult
                self.down_attns.append(attention(ch, resolution))
                skip_channels.append(ch)
            if level != self.num_levels - 1:
                self.downsamples.append(Downsample(ch, resample_with_conv))
                skip_channels.append(ch)
                resolution //= 2

        self.mid_block1 = ResBlock(ch, ch, temb_ch, dropout)
        self.mid_attn = AttentionBlock(ch, num_heads)
        self.mid_block2 = ResBlock(ch, ch, temb_ch, dropout)

        self.up_blocks = nn.ModuleList()
        self.up_attns = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up_blocks.append(ResBlock(ch + skip_channels.pop(), model_channels * mult, temb_ch, dropout))
                ch = model_channels * mult
                self.up_attns.append(attention(ch, resolution))
            if level != 0:
                self.upsamples.append(Upsample(ch, resample_with_conv))
                resolution *= 2

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Apply the net.

        Args:
            x: images, ``[B, in_channels, H, W]``; H and W divisible by ``2 ** (len(channel_mult) - 1)``.
            t: float times, ``[B]`` or a scalar (0-dim) shared by the batch.
            y: integer class labels ``[B]``; -1 (or ``y=None`` for all) means the null label.

        Returns:
            ``[B, out_channels, H, W]``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape [B, {self.in_channels}, H, W] (in_channels={self.in_channels}), "
                f"got {tuple(x.shape)}"
            )
        factor = 2 ** (self.num_levels - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"H and W must be divisible by 2**(len(channel_mult)-1) = {factor}, got {x.shape[2]}x{x.shape[3]}"
            )
        batch = x.shape[0]
        if t.ndim == 0:
            t = t.expand(batch)
        temb = self.time_embed(timestep_embedding(t * self.time_scale, self.model_channels).to(x.dtype))
        if self.class_embed is not None:
            temb = temb + self.class_embed(y, batch)
        else:
            check_unconditional(y)

        hs = [self.conv_in(x)]
        h = hs[-1]
        blocks = iter(zip(self.down_blocks, self.down_attns))
        for level in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                block, attn = next(blocks)
                h = attn(block(h, temb))
                hs.append(h)
            if level != self.num_levels - 1:
                h = self.downsamples[level](h)
                hs.append(h)

        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)

        blocks = iter(zip(self.up_blocks, self.up_attns))
        for level in range(self.num_levels):
            for _ in range(self.num_res_blocks + 1):
                block, attn = next(blocks)
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if level != self.num_levels - 1:
                h = self.upsamples[level](h)

        return self.conv_out(F.silu(self.norm_out(h)))
