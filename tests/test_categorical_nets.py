"""Tests of the nets of discrete diffusion (lightning_diffusion.nets.categorical): the contract
``net(x_t int64 in [0, K], t in [0, 1], y) -> float32 logits over K``, conditioning, gradients and
the errors for bad inputs.

Parameter counts of the defaults (checked below):

- ``CategoricalUNet()`` (digits: 8x8, 1 channel, K = 256): 1,036,288; with 10 classes 1,037,696;
  with the full output conv (``head_channels=None``) 1,092,576. The DDPM digits UNet of
  ``configs/ddpm_digits.yaml`` has 1,001,729.
- ``SequenceTransformer()`` (K = 27, L <= 32, dim 128, depth 4): 1,264,539; with 10 classes 1,265,947.
"""

from __future__ import annotations

import pytest
import torch
from test_nets import perturb_zero_init
from torch import nn

from lightning_diffusion.nets.categorical import CategoricalUNet, SequenceTransformer

K_IMAGE, K_TEXT = 256, 27


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def small_unet(**kwargs) -> CategoricalUNet:
    args = dict(num_categories=K_IMAGE, in_channels=1, image_size=8, model_channels=16, num_res_blocks=1,
                embed_dim=8, head_channels=8, dropout=0.0)
    args.update(kwargs)
    return CategoricalUNet(**args)


def small_transformer(**kwargs) -> SequenceTransformer:
    args = dict(num_categories=K_TEXT, max_length=16, dim=32, depth=2, heads=4, dropout=0.0)
    args.update(kwargs)
    return SequenceTransformer(**args)


def image_input(batch: int = 3, channels: int = 1, corruption: str = "absorbing", k: int = K_IMAGE) -> torch.Tensor:
    """int64 categories; absorbing inputs hold the mask state k (and the extremes 0 and k - 1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, k, (batch, channels, 8, 8), generator=g)
    if corruption == "absorbing":
        x[torch.rand(x.shape, generator=g) < 0.5] = k
        x[0, 0, 0, 0], x[0, 0, 0, 1] = 0, k - 1
    return x


def sequence_input(batch: int = 3, length: int = 16, corruption: str = "absorbing") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, K_TEXT, (batch, length), generator=g)
    if corruption == "absorbing":
        x[torch.rand(x.shape, generator=g) < 0.5] = K_TEXT
    return x


NETS = {
    "unet": (small_unet, image_input, lambda b: (b, 1, 8, 8, K_IMAGE)),
    "transformer": (small_transformer, sequence_input, lambda b: (b, 16, K_TEXT)),
}


def test_default_parameter_counts():
    assert count(CategoricalUNet()) == 1_036_288
    assert count(CategoricalUNet(num_classes=10)) == 1_037_696
    assert count(CategoricalUNet(head_channels=None)) == 1_092_576
    assert count(SequenceTransformer()) == 1_264_539
    assert count(SequenceTransformer(num_classes=10)) == 1_265_947


@pytest.mark.parametrize("corruption", ["uniform", "absorbing"])
@pytest.mark.parametrize("kind", list(NETS))
def test_output_shape_dtype_and_finite(kind, corruption):
    make, inputs, shape = NETS[kind]
    net = make(num_classes=10)
    perturb_zero_init(net)
    x = inputs(corruption=corruption)
    assert x.dtype == torch.int64
    out = net(x, torch.rand(3), torch.tensor([0, -1, 9]))
    assert out.shape == shape(3) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert net(x, torch.tensor(0.5)).shape == shape(3)  # 0-dim t is broadcast, y=None is the null label
    assert net(x, torch.zeros(3)).isfinite().all() and net(x, torch.ones(3)).isfinite().all()  # t at both ends


def test_unet_colour_images_and_full_head():
    """3 channels: each channel gets its own K logits; head_channels=None (the full output conv) too."""
    for head_channels in (8, None):
        net = small_unet(in_channels=3, head_channels=head_channels)
        perturb_zero_init(net)
        x = image_input(channels=3)
        out = net(x, torch.rand(3))
        assert out.shape == (3, 3, 8, 8, K_IMAGE) and torch.isfinite(out).all()
        # the channels are not interchangeable: swapping two input channels does not just swap the logits
        swapped = net(x[:, [1, 0, 2]], torch.rand(3))
        assert (swapped[:, [1, 0, 2]] - out).abs().amax() > 1e-4


@pytest.mark.parametrize("kind", list(NETS))
def test_starts_uniform(kind):
    """The last layer is zero at initialisation: the logits are all equal (cross-entropy log K)."""
    make, inputs, _ = NETS[kind]
    out = make(num_classes=10)(inputs(), torch.rand(3), torch.tensor([1, 2, -1]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kind", list(NETS))
def test_depends_on_x_t_and_y(kind):
    make, inputs, _ = NETS[kind]
    net = make(num_classes=10).eval()
    perturb_zero_init(net)
    x, t, y = inputs(), torch.full((3,), 0.3), torch.tensor([1, 2, 3])
    out = net(x, t, y)
    x_other = x.clone()
    x_other.view(3, -1)[:, 0] = (x_other.view(3, -1)[:, 0] + 1) % (x.max() + 1)
    assert (net(x_other, t, y) - out).abs().amax() > 1e-4
    assert (net(x, t + 0.4, y) - out).abs().amax() > 1e-4
    assert (net(x, t + 0.001, y) - out).abs().amax() > 1e-6  # one step of T = 1000 is seen
    assert (net(x, t, torch.tensor([4, 5, 6])) - out).abs().amax() > 1e-4
    null = net(x, t, torch.full((3,), -1))
    assert (null - out).abs().amax() > 1e-4
    torch.testing.assert_close(net(x, t, None), null)  # y=None is the null label for every sample
    mixed = net(x, t, torch.tensor([1, -1, 3]))  # label dropout: per-sample null labels
    torch.testing.assert_close(mixed[[0, 2]], out[[0, 2]])
    torch.testing.assert_close(mixed[1], null[1])


@pytest.mark.parametrize("kind", list(NETS))
def test_unconditional_net(kind):
    make, inputs, shape = NETS[kind]
    net = make()
    x = inputs()
    assert net(x, torch.rand(3), torch.full((3,), -1)).shape == shape(3)
    with pytest.raises(ValueError, match="without num_classes"):
        net(x, torch.rand(3), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("kind", list(NETS))
def test_gradient_reaches_every_parameter(kind):
    """At initialisation every parameter is in the graph (the zero-initialised last layers give the
    layers before them a zero gradient on the first step only); with those layers non-zero every
    parameter gets a non-zero gradient from one backward."""
    make, inputs, _ = NETS[kind]
    for perturbed in (False, True):
        net = make(num_classes=10)
        if perturbed:
            perturb_zero_init(net)
        x = inputs()
        logits = net(x, torch.rand(3), torch.tensor([0, 5, -1]))
        target = torch.randint(0, logits.shape[-1], logits.shape[:-1])
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
        missing = [name for name, p in net.named_parameters() if p.grad is None]
        assert not missing, missing
        if perturbed:
            zero = [name for name, p in net.named_parameters() if not p.grad.any()]
            assert not zero, zero


@pytest.mark.parametrize("kind", list(NETS))
def test_bad_inputs_name_the_net_and_the_argument(kind):
    make, inputs, _ = NETS[kind]
    net = make(num_classes=10)
    name = type(net).__name__
    x, t = inputs(), torch.rand(3)
    k = net.num_categories
    with pytest.raises(ValueError, match=rf"{name}: x must hold integer categories.*got dtype torch.float32"):
        net(x.float(), t)
    with pytest.raises(ValueError, match=rf"{name}: x holds categories outside \[0, {k}\].*max {k + 1}"):
        net(torch.where(x == k, k + 1, x), t)
    with pytest.raises(ValueError, match=rf"{name}: x holds categories outside \[0, {k}\].*min -1"):
        net(torch.where(x == k, -1, x), t)
    with pytest.raises(ValueError, match=rf"{name}: t must be the float time fraction"):
        net(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=rf"{name}: t must be the time fraction in \[0, 1\].*\[0, 500\]"):
        net(x, torch.tensor([0.0, 10.0, 500.0]))
    with pytest.raises(ValueError, match=rf"{name}: t must have shape \[B\] = \[3\]"):
        net(x, torch.rand(2))
    with pytest.raises(ValueError, match=rf"{name}: y holds labels outside \[-1, 9\]"):
        net(x, t, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match=rf"{name}: y must be integer class labels"):
        net(x, t, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=rf"{name}: expected x of shape"):
        net(x[..., None], t)


def test_constructor_errors():
    with pytest.raises(ValueError, match="CategoricalUNet: num_categories must be an integer >= 1, got 0"):
        CategoricalUNet(num_categories=0)
    with pytest.raises(ValueError, match="CategoricalUNet: num_classes must be None or an integer >= 1, got 0"):
        CategoricalUNet(num_classes=0)
    with pytest.raises(ValueError, match="SequenceTransformer: depth must be an integer >= 1, got 2.5"):
        SequenceTransformer(depth=2.5)
    with pytest.raises(ValueError, match="SequenceTransformer: heads=3 must divide dim=32"):
        SequenceTransformer(dim=32, heads=3)
    with pytest.raises(ValueError, match="SequenceTransformer: expected x of shape .* max_length=16"):
        small_transformer()(torch.zeros(2, 17, dtype=torch.long), torch.rand(2))


def test_transformer_takes_shorter_sequences_and_is_bidirectional():
    net = small_transformer().eval()
    perturb_zero_init(net)
    x = sequence_input(length=10)
    out = net(x, torch.rand(3))
    assert out.shape == (3, 10, K_TEXT)
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % K_TEXT
    # the last token changes the logits at the first position: attention looks both ways
    assert (net(changed, torch.rand(3).fill_(0.5))[:, 0] - net(x, torch.full((3,), 0.5))[:, 0]).abs().amax() > 1e-5


@pytest.mark.parametrize("kind", list(NETS))
def test_data_kind_and_attributes(kind):
    make, _, _ = NETS[kind]
    net = make()
    assert net.data_kind == {"unet": "images", "transformer": "sequences"}[kind]
    assert net.num_categories == {"unet": K_IMAGE, "transformer": K_TEXT}[kind]


def test_state_dict_round_trip_and_eval_determinism():
    for make, inputs, _ in NETS.values():
        net = make(num_classes=10, dropout=0.1)
        perturb_zero_init(net)
        other = make(num_classes=10, dropout=0.1)
        other.load_state_dict(net.state_dict())
        net.eval(), other.eval()
        x, t, y = inputs(), torch.rand(3), torch.tensor([0, 1, -1])
        torch.testing.assert_close(net(x, t, y), other(x, t, y))
