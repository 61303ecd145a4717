"""Energy networks: ``E(x) -> Tensor[B]``, one number per sample, for energy-based models.

The density is ``p(x) = exp(-E(x)) / Z``. Samplers (Langevin, MALA) follow ``-grad_x E``, so the
activations are smooth (SiLU): a ReLU net has a piecewise-constant gradient in x.

- :class:`EnergyMLP` for points ``[B, D]``;
- :class:`EnergyConvNet` for images ``[B, C, H, W]`` (a small residual conv net with average-pool
  downsampling and a global sum, as IGEBM's);
- :class:`ScalarEnergy` wraps any other module (our ``MLP`` / ``UNet``, or a user's net) whose
  output is ``[B]``, ``[B, 1]`` or shaped like ``x`` (then summed over the non-batch dimensions).

``EnergyMLP`` and ``EnergyConvNet`` take ``time_embed_dim`` to condition the energy on a time or
noise level ``t`` [B] (``net(x, t)``: the sinusoidal embedding of :mod:`.embedding`, projected into
every layer), as the EBM's ``recovery`` objective needs (one energy per level of its ladder).

Each takes ``spectral_norm=True`` to bound every Linear/Conv layer's spectral norm by 1 (Miyato et
al. 2018), which bounds the energy's Lipschitz constant: a common way to keep CD training stable.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_diffusion.nets.embedding import timestep_embedding


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Put a spectral-norm parametrization on every Linear and Conv layer of ``module`` (in place)."""
    from torch.nn.utils.parametrizations import spectral_norm

    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            setattr(module, name, spectral_norm(child))
        else:
            apply_spectral_norm(child)
    return module


class _TimeEmbedding(nn.Module):
    """``t`` [B] -> ``[B, width]``: the sinusoidal embedding of ``dim`` features through ``Linear, SiLU, Linear``."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        if dim < 2:
            raise ValueError(f"time_embed_dim must be >= 2 (or None: no time), got {dim}")
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor, batch: int, like: Tensor) -> Tensor:
        if t is None:
            raise ValueError("this energy net was built with time_embed_dim: call it as net(x, t) with times t [B]")
        t = t.expand(batch) if t.ndim == 0 else t
        return self.mlp(timestep_embedding(t, self.dim).to(like.dtype))


def _no_time(t: Tensor | None, name: str) -> None:
    if t is not None:
        raise ValueError(f"{name} was built without time_embed_dim, so it takes no time t: build it with "
                         "time_embed_dim (e.g. 64) to condition the energy on t")


class EnergyMLP(nn.Module):
    """``E(x)`` of points ``[B, D]``: ``num_layers`` hidden SiLU layers of width ``hidden``, then a
    linear map to one number.

    Args:
        in_channels: dimension ``D`` of the points (linked from the data by the CLI).
        hidden: width of the hidden layers.
        num_layers: number of hidden layers.
        spectral_norm: bound each layer's spectral norm by 1.
        time_embed_dim: None (``E(x)``), or the size of the sinusoidal embedding of a time ``t``
            (``E(x, t)``; its projection is added to every hidden layer's pre-activation).
    """

    data_kind = "points"  #: what the net takes: points [B, D] (the models check it against their data)

    def __init__(self, in_channels: int = 2, hidden: int = 128, num_layers: int = 3, spectral_norm: bool = False,
                 time_embed_dim: int | None = None):
        super().__init__()
        if num_layers < 1 or hidden < 1:
            raise ValueError(f"EnergyMLP: num_layers and hidden must be >= 1, got {num_layers} and {hidden}")
        self.in_channels = in_channels
        dims = [in_channels] + [hidden] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(hidden, 1)
        self.time_conditioned = time_embed_dim is not None  #: whether forward takes a time t
        if self.time_conditioned:
            self.time_embed = _TimeEmbedding(time_embed_dim, hidden)
            self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """``x``: ``[B, in_channels]``; ``t``: times ``[B]`` (only with ``time_embed_dim``). Returns the energies ``[B]``."""
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"EnergyMLP: expected x of shape [B, {self.in_channels}], got {tuple(x.shape)}")
        h = x
        if self.time_conditioned:
            emb = F.silu(self.time_embed(t, x.shape[0], x))
            for layer, proj in zip(self.layers, self.time_proj):
                h = F.silu(layer(h) + proj(emb))
        else:
            _no_time(t, "EnergyMLP")
            for layer in self.layers:
                h = F.silu(layer(h))
        return self.out(h).squeeze(-1)


class _ConvBlock(nn.Module):
    """``h + conv(silu(conv(silu(h)) [+ Linear(emb)]))``, then a 2x average pool when ``down``; with
    ``emb_width`` the time embedding's projection is added per channel after the first conv."""

    def __init__(self, channels_in: int, channels_out: int, down: bool, emb_width: int | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()
        if emb_width is not None:
            self.emb_proj = nn.Linear(emb_width, channels_out)
        self.down = down

    def forward(self, h: Tensor, emb: Tensor | None = None) -> Tensor:
        inner = self.conv1(F.silu(h))
        if emb is not None:
            inner = inner + self.emb_proj(emb)[:, :, None, None]
        h = self.skip(h) + self.conv2(F.silu(inner))
        return F.avg_pool2d(h, 2) if self.down else h


class EnergyConvNet(nn.Module):
    """``E(x)`` of images ``[B, C, H, W]``: a 3x3 conv, one residual block per entry of
    ``channels`` (each but the last halving the resolution by average pooling), a global sum
    over positions, and a linear map to one number.

    Args:
        in_channels: image channels ``C`` (linked from the data by the CLI).
        image_size: image side ``H = W`` (linked from the data); must be divisible by
            ``2 ** (len(channels) - 1)``.
        channels: channels of the residual blocks, one block per entry.
        spectral_norm: bound each layer's spectral norm by 1.
        time_embed_dim: None (``E(x)``), or the size of the sinusoidal embedding of a time ``t``
            (``E(x, t)``; its projection is added per channel inside every block, as DDPM's UNet does).
    """

    data_kind = "images"  #: what the net takes: images [B, C, H, W] (the models check it against their data)

    def __init__(self, in_channels: int = 1, image_size: int | None = 8, channels: tuple[int, ...] = (32, 64),
                 spectral_norm: bool = False, time_embed_dim: int | None = None):
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ValueError("EnergyConvNet: channels must name at least one block")
        if image_size is None:
            raise ValueError("EnergyConvNet takes images [C, H, W], but image_size is None, as the CLI links it from "
                             "points data [D]: for points use EnergyMLP (class_path: EnergyMLP)")
        factor = 2 ** (len(channels) - 1)
        if image_size % factor:
            raise ValueError(f"EnergyConvNet: image_size={image_size} is not divisible by 2**(len(channels)-1)={factor}")
        self.in_channels, self.image_size = in_channels, image_size
        self.input = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.time_conditioned = time_embed_dim is not None  #: whether forward takes a time t
        width = 4 * channels[0] if self.time_conditioned else None
        if self.time_conditioned:
            self.time_embed = _TimeEmbedding(time_embed_dim, width)
        self.blocks = nn.ModuleList(_ConvBlock(a, b, down=i < len(channels) - 1, emb_width=width)
                                    for i, (a, b) in enumerate(zip((channels[0],) + channels[:-1], channels)))
        self.out = nn.Linear(channels[-1], 1)
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """``x``: ``[B, in_channels, image_size, image_size]``; ``t``: times ``[B]`` (only with
        ``time_embed_dim``). Returns the energies ``[B]``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"EnergyConvNet: expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.time_conditioned:
            emb = F.silu(self.time_embed(t, x.shape[0], x))
        else:
            _no_time(t, "EnergyConvNet")
            emb = None
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(h).sum(dim=(2, 3))).squeeze(-1)


class ScalarEnergy(nn.Module):
    """Any module as an energy: ``E(x) = net(x)`` reduced to ``[B]``.

    ``net`` is called as ``net(x)``, or as ``net(x, t)`` for our time-conditioned nets (``MLP``,
    ``UNet``: any ``forward`` with a second required argument), with the caller's ``t`` or ``t = 0``. An output ``[B]`` is the
    energy, ``[B, 1]`` is squeezed, any other shape is summed over its non-batch dimensions.

    Args:
        net: the module to wrap.
        spectral_norm: bound each of its Linear/Conv layers' spectral norm by 1.
    """

    def __init__(self, net: nn.Module, spectral_norm: bool = False):
        super().__init__()
        self.net = apply_spectral_norm(net) if spectral_norm else net
        params = [p for p in inspect.signature(net.forward).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._takes_t = len(params) >= 2
        self.time_conditioned = self._takes_t  #: whether forward uses a time t
        self.data_kind = getattr(net, "data_kind", None)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Returns the energies ``[B]`` of ``x`` ``[B, ...]`` (at times ``t`` [B], default 0, for a
        time-conditioned net)."""
        if not self._takes_t:
            _no_time(t, f"ScalarEnergy({type(self.net).__name__})")
            out = self.net(x)
        else:
            out = self.net(x, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype) if t is None else t)
        if out.ndim == 1:
            return out
        return out.reshape(out.shape[0], -1).sum(dim=1)
