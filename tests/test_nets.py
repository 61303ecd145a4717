"""Tests of the denoising networks (lightning_diffusion.nets)."""

import math

import pytest
import torch
from torch import nn

from lightning_diffusion.nets import MLP, UNet, timestep_embedding

# Ho et al. 2020, CIFAR-10 model: "35.7M parameters"; pesser/pytorch_diffusion counts 35,746,307.
DDPM_CIFAR10_PARAMS = 35.7e6


def small_unet(**kwargs) -> UNet:
    args = dict(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, dropout=0.0)
    args.update(kwargs)
    return UNet(**args)


def perturb_zero_init(net: nn.Module) -> None:
    """Give the zero-initialised layers random weights so that every parameter affects the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)


def test_unet_default_param_count_is_ddpm_cifar10():
    n = sum(p.numel() for p in UNet(in_channels=3, image_size=32).parameters())
    assert abs(n - DDPM_CIFAR10_PARAMS) / DDPM_CIFAR10_PARAMS < 0.005, n


@pytest.mark.parametrize("size", [8, 16, 32])
def test_unet_output_shape(size):
    net = small_unet(out_channels=6, image_size=size, attention_resolutions=(size // 2,))
    x = torch.randn(2, 3, size, size)
    assert net(x, torch.rand(2)).shape == (2, 6, size, size)
    assert net(x, torch.tensor(0.5)).shape == (2, 6, size, size)  # 0-dim t is broadcast


def test_unet_narrow_groupnorm_and_heads():
    net = small_unet(model_channels=48, image_size=8, attention_resolutions=(8, 4), num_heads=4)
    assert net(torch.randn(1, 3, 8, 8), torch.rand(1)).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("model_channels", [8, 16, 32, 128])
def test_every_unet_resblock_sees_the_embedding(model_channels):
    """A GroupNorm of one channel per group after the embedding's per-channel bias would erase it:
    narrow nets (16 channels) then ignored t and y altogether."""
    from lightning_diffusion.nets.unet import ResBlock

    net = small_unet(model_channels=model_channels, image_size=8, num_classes=10)
    perturb_zero_init(net)
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    temb_ch = 4 * model_channels
    for block in blocks:
        x = torch.randn(2, block.conv1.in_channels, 4, 4)
        changed = block(x, torch.randn(2, temb_ch)) - block(x, torch.randn(2, temb_ch))
        assert changed.abs().amax() > 1e-3, block
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2) * 100
    assert (net(x, t, torch.tensor([1, 2])) - net(x, t, torch.tensor([3, 4]))).abs().amax() > 1e-3
    assert (net(x, t, torch.tensor([1, 2])) - net(x, t + 400, torch.tensor([1, 2]))).abs().amax() > 1e-3


def test_timestep_embedding_values():
    dim = 6
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), dim)
    assert emb.shape == (2, dim)
    assert torch.equal(emb[0], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    freqs = [math.exp(-math.log(10000.0) * i / 3) for i in range(3)]
    expected = [math.cos(2.0 * f) for f in freqs] + [math.sin(2.0 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(expected))
    odd = timestep_embedding(torch.tensor([2.0]), 7)
    assert odd.shape == (1, 7) and odd[0, -1] == 0 and torch.allclose(odd[0, :6], emb[1])


@pytest.mark.parametrize("make_net, x", [
    (lambda: small_unet(num_classes=10, image_size=8), torch.randn(3, 3, 8, 8)),
    (lambda: MLP(hidden=32, num_layers=2, num_classes=10), torch.randn(3, 2)),
])
def test_class_conditioning(make_net, x):
    net = make_net()
    perturb_zero_init(net)
    t = torch.rand(3)
    out_null = net(x, t)
    assert torch.allclose(net(x, t, torch.full((3,), -1)), out_null)
    out_y = net(x, t, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out_y, out_null)
    mixed = net(x, t, torch.tensor([0, -1, 2]))
    assert torch.allclose(mixed[1], out_null[1], atol=1e-6) and torch.allclose(mixed[0], out_y[0], atol=1e-6)


@pytest.mark.parametrize("make_net, x", [
    (lambda: small_unet(image_size=8, attention_resolutions=(8,)), torch.randn(2, 3, 8, 8)),
    (lambda: MLP(hidden=32, num_layers=2), torch.randn(2, 2)),
])
def test_unconditional_net_rejects_labels(make_net, x):
    net = make_net()
    t = torch.rand(2)
    assert torch.equal(net(x, t, torch.full((2,), -1)), net(x, t))
    with pytest.raises(ValueError, match="num_classes"):
        net(x, t, torch.tensor([0, 1]))


@pytest.mark.parametrize("make_net, x", [
    (lambda: small_unet(num_classes=10, image_size=8, attention_resolutions=(8, 4)), torch.randn(2, 3, 8, 8)),
    (lambda: MLP(hidden=32, num_layers=2, num_classes=10), torch.randn(2, 2)),
])
def test_every_parameter_gets_a_gradient(make_net, x):
    net = make_net()
    net(x, torch.rand(2), torch.tensor([3, -1])).sum().backward()
    assert all(p.grad is not None for p in net.parameters())  # no unused parameters (DDP)
    net.zero_grad(set_to_none=True)
    perturb_zero_init(net)
    net(x, torch.rand(2), torch.tensor([3, -1])).sum().backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead


def test_unet_errors():
    net = small_unet(channel_mult=(1, 2, 2), image_size=16)
    with pytest.raises(ValueError, match=r"divisible by .* 4, got 16x10"):
        net(torch.randn(1, 3, 16, 10), torch.rand(1))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(1, 1, 16, 16\)"):
        net(torch.randn(1, 1, 16, 16), torch.rand(1))


def test_mlp_shapes_and_errors():
    net = MLP(in_channels=3, hidden=32, num_layers=2)
    assert net(torch.randn(5, 3), torch.rand(5)).shape == (5, 3)
    assert net(torch.randn(5, 3), torch.tensor(0.3)).shape == (5, 3)
    with pytest.raises(ValueError, match=r"\[B, 3\].*\(5, 2\)"):
        net(torch.randn(5, 2), torch.rand(5))


def test_mlp_overfits_a_function_of_x_and_t():
    torch.manual_seed(0)
    x, t = torch.randn(256, 2), torch.rand(256)
    target = torch.stack([torch.sin(3 * x[:, 0]) * t, x[:, 1] ** 2 - t], dim=1)
    net = MLP(hidden=64, num_layers=3, time_scale=1000.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = nn.functional.mse_loss(net(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
