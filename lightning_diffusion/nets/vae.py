"""Encoders and decoders of the VAE families: plain ``nn.Module``s that know no distribution.

A VAE net (:class:`ConvVAENet` for images, :class:`MLPVAENet` for points) has
``encode(x) -> [B, 2 * latent_dim]`` (the posterior's mean and raw log-variance, concatenated) and
``decode(z) -> features`` ([B, out_features, H, W] or [B, out_features]); the model adds the
1x1 head that turns features into its likelihood's parameters, so one net serves every decoder
likelihood.

The ladder net (:class:`LadderVAENet`, VDVAE's layout, Child 2021; NVAE, Vahdat & Kautz 2020) has
a bottom-up deterministic path ``bottom_up(x) -> {resolution: activations}`` and a top-down path
``top_down(activations | None, latent_fn, batch_size) -> features`` of residual cells shared by the
prior and the posterior. At each latent group the cell computes the prior's parameters from the
top-down state and, given activations, the posterior's from the state and the bottom-up
activations at that resolution, and asks ``latent_fn(group, prior, posterior)`` for the ``z`` to
continue with: the model decides whether that is a posterior sample, a prior sample at some
temperature, and what densities to record.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LatentFn = Callable[[int, tuple[Tensor, Tensor], "tuple[Tensor, Tensor] | None"], Tensor]


class BottleneckBlock(nn.Module):
    """VDVAE's residual block: ``GELU -> conv1x1 (in -> mid) -> GELU -> conv3x3 -> GELU -> conv3x3 ->
    GELU -> conv1x1 (mid -> out)``, plus the input if ``residual``. At resolutions <= 2 the 3x3
    convs become 1x1 (as VDVAE). ``out_scale`` multiplies the last conv's initial weights (VDVAE:
    ``sqrt(1 / number of blocks)``); ``zero_last`` starts it at zero.

    Args:
        in_channels: input channels.
        mid_channels: bottleneck width.
        out_channels: output channels (must equal ``in_channels`` if ``residual``).
        resolution: spatial size the block runs at.
        residual: add the input to the output.
        out_scale: initial scale of the last conv's weights.
        zero_last: initialize the last conv's weights and bias to zero.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, resolution: int,
                 residual: bool = True, out_scale: float = 1.0, zero_last: bool = False) -> None:
        super().__init__()
        kernel = 3 if resolution > 2 else 1
        self.residual = residual
        self.c1 = nn.Conv2d(in_channels, mid_channels, 1)
        self.c2 = nn.Conv2d(mid_channels, mid_channels, kernel, padding=kernel // 2)
        self.c3 = nn.Conv2d(mid_channels, mid_channels, kernel, padding=kernel // 2)
        self.c4 = nn.Conv2d(mid_channels, out_channels, 1)
        with torch.no_grad():
            if zero_last:
                self.c4.weight.zero_()
                self.c4.bias.zero_()
            else:
                self.c4.weight.mul_(out_scale)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c4(F.gelu(self.c3(F.gelu(self.c2(F.gelu(self.c1(F.gelu(x))))))))
        return x + h if self.residual else h


def _require_image_size(name: str, image_size: int | None, instead: str) -> None:
    """An image net needs ``image_size``; the CLI links None from points data."""
    if image_size is None:
        raise ValueError(f"{name} takes images [C, H, W], but image_size is None, as the CLI links it from points "
                         f"data [D]: for points use {instead}")


def _check_image_size(name: str, image_size: int, levels: int) -> int:
    _require_image_size(name, image_size, "MLPVAENet (class_path: MLPVAENet)")
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(f"{name}: image_size {image_size} is not divisible by 2^{levels - 1} = {factor} "
                         f"({levels} entries in `channels` halve it {levels - 1} times); use fewer channel levels")
    return image_size // factor


def _conv_encoder(in_channels: int, image_size: int, channels: list[int], num_blocks: int) -> list[nn.Module]:
    """The convolutional encoder trunk of :class:`ConvVAENet` and :class:`ConvVQNet`: conv3x3 to
    ``channels[0]``, then per level ``num_blocks`` bottleneck blocks and a stride-2 conv to the next
    level's width; ends at ``channels[-1]`` maps of ``image_size / 2^(levels - 1)`` pixels."""
    scale = math.sqrt(1.0 / max(1, num_blocks * len(channels)))
    enc: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
    res = image_size
    for i, width in enumerate(channels):
        enc += [BottleneckBlock(width, max(width // 4, 8), width, res, out_scale=scale) for _ in range(num_blocks)]
        if i + 1 < len(channels):
            enc.append(nn.Conv2d(width, channels[i + 1], 3, stride=2, padding=1))
            res //= 2
    return enc


def _conv_decoder(bottom: int, channels: list[int], num_blocks: int, out_features: int) -> list[nn.Module]:
    """The mirror of :func:`_conv_encoder`, from ``channels[-1]`` maps of ``bottom`` pixels: blocks,
    nearest-neighbour upsampling, ending in ``out_features`` GELU features at full resolution."""
    scale = math.sqrt(1.0 / max(1, num_blocks * len(channels)))
    dec: list[nn.Module] = []
    res = bottom
    for i, width in reversed(list(enumerate(channels))):
        dec += [BottleneckBlock(width, max(width // 4, 8), width, res, out_scale=scale) for _ in range(num_blocks)]
        if i > 0:
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, channels[i - 1], 3, padding=1)]
            res *= 2
    return [*dec, nn.GELU(), nn.Conv2d(channels[0], out_features, 3, padding=1), nn.GELU()]


class ConvVAENet(nn.Module):
    """Convolutional encoder/decoder of a single-latent VAE for images ``[B, C, H, W]``.

    Encoder: conv3x3 to ``channels[0]``, then per level ``num_blocks`` bottleneck blocks and a
    stride-2 conv to the next level's width; the last map is flattened to a Linear that gives the
    posterior's mean and log-variance. Decoder: the mirror image, nearest-neighbour upsampling,
    ending in ``out_features`` feature maps at full resolution.

    Args:
        in_channels: image channels C (linked from the data by the CLI).
        image_size: image height = width (linked by the CLI); divisible by ``2^(len(channels) - 1)``.
        latent_dim: dimension of z.
        channels: widths of the levels, from full resolution down.
        num_blocks: bottleneck blocks per level in the encoder and in the decoder.
        out_features: channels of the decoder's output features (default ``channels[0]``).
    """

    data_kind = "images"  #: what the net takes: images [B, C, H, W] (the VAE checks it against its data)

    def __init__(self, in_channels: int = 1, image_size: int = 8, latent_dim: int = 16,
                 channels: Sequence[int] = (32, 64), num_blocks: int = 1, out_features: int | None = None) -> None:
        super().__init__()
        channels = list(channels)
        if not channels:
            raise ValueError("ConvVAENet: `channels` needs at least one width")
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        self.bottom = _check_image_size("ConvVAENet", image_size, len(channels))
        self.out_features = out_features or channels[0]
        self.encoder = nn.Sequential(*_conv_encoder(in_channels, image_size, channels, num_blocks), nn.GELU(),
                                     nn.Flatten(), nn.Linear(channels[-1] * self.bottom**2, 2 * latent_dim))
        self.z_in = nn.Linear(latent_dim, channels[-1] * self.bottom**2)
        self.bottom_channels = channels[-1]
        self.decoder = nn.Sequential(*_conv_decoder(self.bottom, channels, num_blocks, self.out_features))

    def encode(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> [B, 2 * latent_dim]: posterior mean and raw log-variance."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(f"ConvVAENet: expected images [B, {self.in_channels}, {self.image_size}, {self.image_size}] "
                             f"(in_channels, image_size), got {tuple(x.shape)}")
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, latent_dim] -> features [B, out_features, H, W]."""
        h = self.z_in(z).view(z.shape[0], self.bottom_channels, self.bottom, self.bottom)
        return self.decoder(h)


class ConvVQNet(nn.Module):
    """Convolutional encoder/decoder of a VQ-VAE (van den Oord et al. 2017) for images ``[B, C, H, W]``:
    the trunks of :class:`ConvVAENet` (bottleneck blocks, stride-2 convs down, nearest-neighbour
    upsampling back), but the latent is a grid: ``encode(x) -> [B, code_dim, h, w]`` (a 1x1 conv
    after the trunk, no flattening) and ``decode(e) -> [B, out_features, H, W]`` from a grid of code
    vectors, ``h = w = image_size / 2^(len(channels) - 1)``. It knows no codebook: the model
    quantizes (:class:`~lightning_diffusion.models.vqvae.VQVAE`).

    Args:
        in_channels: image channels C (linked from the data by the CLI).
        image_size: image height = width (linked by the CLI); divisible by ``2^(len(channels) - 1)``.
        code_dim: dimension D of a code vector (the codebook's width).
        channels: widths of the levels, from full resolution down.
        num_blocks: bottleneck blocks per level in the encoder and in the decoder.
        out_features: channels of the decoder's output features (default ``channels[0]``).
    """

    data_kind = "images"  #: what the net takes: images [B, C, H, W]

    def __init__(self, in_channels: int = 1, image_size: int = 8, code_dim: int = 32,
                 channels: Sequence[int] = (32, 64), num_blocks: int = 1, out_features: int | None = None) -> None:
        super().__init__()
        channels = list(channels)
        if not channels:
            raise ValueError("ConvVQNet: `channels` needs at least one width")
        if code_dim < 1:
            raise ValueError(f"ConvVQNet: code_dim must be >= 1, got {code_dim}")
        self.in_channels, self.image_size, self.code_dim = in_channels, image_size, code_dim
        self.latent_size = _check_image_size("ConvVQNet", image_size, len(channels))
        self.out_features = out_features or channels[0]
        self.encoder = nn.Sequential(*_conv_encoder(in_channels, image_size, channels, num_blocks), nn.GELU(),
                                     nn.Conv2d(channels[-1], code_dim, 1))
        self.decoder = nn.Sequential(nn.Conv2d(code_dim, channels[-1], 1),
                                     *_conv_decoder(self.latent_size, channels, num_blocks, self.out_features))

    def encode(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> the encoder's vectors [B, code_dim, h, w] (before quantization)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(f"ConvVQNet: expected images [B, {self.in_channels}, {self.image_size}, {self.image_size}] "
                             f"(in_channels, image_size), got {tuple(x.shape)}")
        return self.encoder(x)

    def decode(self, e: Tensor) -> Tensor:
        """Code vectors [B, code_dim, h, w] -> features [B, out_features, H, W]."""
        return self.decoder(e)


class MLPVAENet(nn.Module):
    """MLP encoder/decoder of a single-latent VAE for points ``[B, D]`` (toy 2-D data).

    Args:
        in_channels: dimension D of the points (linked from the data by the CLI).
        latent_dim: dimension of z.
        hidden: width of the hidden layers.
        num_layers: hidden layers of the encoder and of the decoder.
        out_features: size of the decoder's output features (default ``hidden``).
    """

    data_kind = "points"  #: what the net takes: points [B, D] (the VAE checks it against its data)

    def __init__(self, in_channels: int = 2, latent_dim: int = 2, hidden: int = 256, num_layers: int = 3,
                 out_features: int | None = None) -> None:
        super().__init__()
        self.in_channels, self.latent_dim = in_channels, latent_dim
        self.out_features = out_features or hidden

        def mlp(n_in: int, n_out: int, last_act: bool) -> nn.Sequential:
            layers: list[nn.Module] = []
            for i in range(num_layers):
                layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.SiLU()]
            layers.append(nn.Linear(hidden if num_layers else n_in, n_out))
            return nn.Sequential(*layers, *([nn.SiLU()] if last_act else []))

        self.encoder = mlp(in_channels, 2 * latent_dim, last_act=False)
        self.decoder = mlp(latent_dim, self.out_features, last_act=True)

    def encode(self, x: Tensor) -> Tensor:
        """Points [B, D] -> [B, 2 * latent_dim]: posterior mean and raw log-variance."""
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"MLPVAENet: expected points [B, {self.in_channels}] (in_channels), got {tuple(x.shape)}")
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, latent_dim] -> features [B, out_features]."""
        return self.decoder(z)


class TopDownBlock(nn.Module):
    """One latent group of the top-down path (VDVAE's ``DecBlock``), shared by prior and posterior:

    ``prior: [p_mean, p_logvar, h_p] = prior_net(x)``; ``posterior: [q_mean, q_logvar] =
    posterior_net(cat(x, a))`` with ``a`` the bottom-up activations at this resolution;
    ``z = latent_fn(...)``; ``x <- resnet(x + h_p + z_proj(z))``. The prior net starts at zero
    (a standard normal prior, no change of x), the residual branches at ``out_scale``.
    """

    def __init__(self, width: int, latent_channels: int, resolution: int, bottleneck: int, out_scale: float) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.posterior_net = BottleneckBlock(2 * width, bottleneck, 2 * latent_channels, resolution, residual=False)
        self.prior_net = BottleneckBlock(width, bottleneck, 2 * latent_channels + width, resolution, residual=False,
                                         zero_last=True)
        self.z_proj = nn.Conv2d(latent_channels, width, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(out_scale)
        self.resnet = BottleneckBlock(width, bottleneck, width, resolution, out_scale=out_scale)

    def forward(self, x: Tensor, activations: Tensor | None, latent_fn: LatentFn, group: int) -> Tensor:
        zc = self.latent_channels
        prior = self.prior_net(x)
        prior_mean, prior_logvar, h = prior[:, :zc], prior[:, zc:2 * zc], prior[:, 2 * zc:]
        posterior = None
        if activations is not None:
            posterior = tuple(self.posterior_net(torch.cat([x, activations], 1)).chunk(2, dim=1))
        z = latent_fn(group, (prior_mean, prior_logvar), posterior)
        return self.resnet(x + h + self.z_proj(z))


class LadderVAENet(nn.Module):
    """Top-down ladder net of a hierarchical VAE for images (VDVAE layout, smaller by default).

    Bottom-up: conv3x3 to ``width`` at ``image_size``, then at each resolution of the path
    (``image_size`` and every ``latent_resolutions`` entry, descending) ``encoder_blocks``
    residual blocks, the activations kept for the top-down path, and an average pool to the next
    resolution. Top-down: from a learned bias at the lowest resolution, ``groups_per_resolution[i]``
    :class:`TopDownBlock` latent groups at ``latent_resolutions[i]`` (ascending), nearest
    upsampling between resolutions, then ``output_blocks`` residual blocks at ``image_size``.

    Args:
        in_channels: image channels C (linked from the data by the CLI).
        image_size: image height = width (linked by the CLI).
        width: channels of the residual stream.
        latent_channels: channels of each latent group (VDVAE: 16; NVAE: 20).
        latent_resolutions: resolutions of the latent groups, from the top (coarse) down; each must
            divide ``image_size`` and the next one (e.g. ``[1, 4, 8]`` for 8x8 digits; VDVAE
            CIFAR-10: ``[1, 4, 8, 16, 32]``).
        groups_per_resolution: latent groups at each resolution (VDVAE CIFAR-10, its decoder spec
            ``1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21``: ``[1, 3, 6, 11, 22]``).
        encoder_blocks: bottom-up residual blocks per resolution of the path (``image_size`` first,
            descending), one number for all or a list (VDVAE CIFAR-10: ``[12, 7, 7, 4, 3]``).
        output_blocks: residual blocks at ``image_size`` after the last group (when the last latent
            resolution is below ``image_size`` it also upsamples there).
        bottleneck_ratio: bottleneck width of the blocks as a fraction of ``width`` (VDVAE: 0.25).
        out_features: channels of the output features (default ``width``).
    """

    data_kind = "images"  #: what the net takes: images [B, C, H, W] (the HVAE checks it against its data)

    def __init__(self, in_channels: int = 1, image_size: int = 8, width: int = 64, latent_channels: int = 8,
                 latent_resolutions: Sequence[int] = (1, 4, 8), groups_per_resolution: Sequence[int] = (2, 2, 2),
                 encoder_blocks: int | Sequence[int] = 2, output_blocks: int = 1, bottleneck_ratio: float = 0.25,
                 out_features: int | None = None) -> None:
        super().__init__()
        _require_image_size("LadderVAENet", image_size, "VAE with MLPVAENet (the hierarchical VAE models images)")
        resolutions, groups = [int(r) for r in latent_resolutions], [int(g) for g in groups_per_resolution]
        if len(resolutions) != len(groups) or not resolutions:
            raise ValueError(f"LadderVAENet: latent_resolutions {resolutions} and groups_per_resolution {groups} must be "
                             "non-empty lists of the same length")
        chain = [*resolutions, image_size]
        for coarse, fine in zip(chain[:-1], chain[1:]):
            if coarse < 1 or fine < coarse or fine % coarse:
                raise ValueError(f"LadderVAENet: latent_resolutions {resolutions} do not fit image_size {image_size}: "
                                 "each must be >= 1, ascending, and divide the next one and image_size")
        if any(g < 1 for g in groups):
            raise ValueError(f"LadderVAENet: groups_per_resolution {groups} must all be >= 1")
        self.in_channels, self.image_size, self.width = in_channels, image_size, width
        self.latent_channels, self.out_features = latent_channels, out_features or width
        self.latent_resolutions, self.groups_per_resolution = resolutions, groups
        bottleneck = max(1, int(width * bottleneck_ratio))
        self.path = sorted(set(chain), reverse=True)  # bottom-up resolutions: image_size first
        blocks = [encoder_blocks] * len(self.path) if isinstance(encoder_blocks, int) else [int(b) for b in encoder_blocks]
        if len(blocks) != len(self.path):
            raise ValueError(f"LadderVAENet: encoder_blocks {blocks} needs one entry per bottom-up resolution {self.path}")
        enc_scale = math.sqrt(1.0 / max(1, sum(blocks)))
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.encoder = nn.ModuleDict({
            str(r): nn.Sequential(*[BottleneckBlock(width, bottleneck, width, r, out_scale=enc_scale)
                                    for _ in range(n)]) for r, n in zip(self.path, blocks)})
        num_groups = sum(groups)
        dec_scale = math.sqrt(1.0 / max(1, num_groups + output_blocks))
        self.group_resolutions = [r for r, g in zip(resolutions, groups) for _ in range(g)]
        self.blocks = nn.ModuleList(TopDownBlock(width, latent_channels, r, bottleneck, dec_scale)
                                    for r in self.group_resolutions)
        self.bias = nn.Parameter(torch.zeros(1, width, resolutions[0], resolutions[0]))
        self.output = nn.Sequential(*[BottleneckBlock(width, bottleneck, width, image_size, out_scale=dec_scale)
                                      for _ in range(output_blocks)], nn.GELU(),
                                    nn.Conv2d(width, self.out_features, 1), nn.GELU())

    @property
    def group_shapes(self) -> list[tuple[int, int, int]]:
        """Shape ``(latent_channels, r, r)`` of each latent group, top to bottom."""
        return [(self.latent_channels, r, r) for r in self.group_resolutions]

    def bottom_up(self, x: Tensor) -> dict[int, Tensor]:
        """Images [B, C, H, W] -> activations [B, width, r, r] at every resolution r of the path."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(f"LadderVAENet: expected images [B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}] (in_channels, image_size), got {tuple(x.shape)}")
        h, out = self.stem(x), {}
        for i, r in enumerate(self.path):
            if i:
                h = F.avg_pool2d(h, self.path[i - 1] // r)
            h = self.encoder[str(r)](h)
            out[r] = h
        return out

    def top_down(self, activations: dict[int, Tensor] | None, latent_fn: LatentFn, batch_size: int,
                 groups: int | None = None) -> Tensor:
        """Run the latent groups top to bottom: with ``activations`` (from :meth:`bottom_up`) each
        group's posterior parameters are computed too. Returns features [B, out_features, H, W];
        with ``groups``, only the top ``groups`` groups run (``latent_fn`` sees those alone) and the
        features after them are returned as they are (what a caller that wants only the top latents uses)."""
        x = self.bias.expand(batch_size, -1, -1, -1)
        for group, (block, r) in enumerate(zip(self.blocks, self.group_resolutions)):
            if groups is not None and group >= groups:
                return x
            if x.shape[-1] != r:
                x = F.interpolate(x, scale_factor=r // x.shape[-1], mode="nearest")
            x = block(x, None if activations is None else activations[r], latent_fn, group)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, scale_factor=self.image_size // x.shape[-1], mode="nearest")
        return self.output(x)
