"""bf16-mixed for every family: the loss on a fixed batch under bf16 autocast is close to fp32,
bits/dim is computed in full precision whatever the autocast context, and a `bf16-mixed` fit runs."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model, tiny_trainer

from lightning_diffusion import ShardDataModule

pytestmark = pytest.mark.usefixtures("one_thread")


FAMILIES = ("ddpm", "score_sde", "vae", "hvae")
BPD_OPTIONS = {"ddpm": {"steps": 10}, "score_sde": {"steps": 8}, "vae": {}, "hvae": {}}


@pytest.fixture(scope="module")
def batch():
    dm = ShardDataModule("digits", batch_size=32, num_workers=0)
    dm.setup("fit")
    return next(iter(dm.eval_dataloader("val")))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_loss_is_close_to_fp32_and_bits_per_dim_stays_full_precision(family, batch):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    with torch.no_grad():  # the UNet's output layers start at zero (a constant loss): perturb them all
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fp32 = model.loss(batch, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model.loss(batch, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(bf16)
    # bf16 keeps 8 mantissa bits: the same loss within a few per cent, not bit for bit
    assert abs(bf16.float().item() - fp32.item()) <= 0.05 * abs(fp32.item()) + 1e-3
    assert bf16.float().item() != fp32.item()  # autocast did run in bf16

    x = batch["x"][:8]
    options = BPD_OPTIONS[family]
    reference = model.bits_per_dim(x, generator=torch.Generator().manual_seed(2), **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.bits_per_dim(x, generator=torch.Generator().manual_seed(2), **options)
    assert under_autocast.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(under_autocast.double(), reference.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_mixed_fit_runs(family, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(family)
    dm = ShardDataModule("digits", batch_size=16, num_workers=0, batches_per_epoch=2)
    trainer = tiny_trainer(precision="bf16-mixed", max_steps=2, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize("family", ["ddpm", "score_sde"])
def test_sampling_in_bf16_runs_the_net_in_bf16_and_keeps_the_solver_in_fp32(family):
    """``sample(..., precision="bf16")``: every network evaluation under bfloat16 autocast (its
    convolutions return bf16), the solver's state and the result float32, and the samples those of
    the float32 net up to bf16 rounding (same noise: close, but not equal)."""
    from lightning_diffusion.errors import OptionError

    torch.manual_seed(0)
    model = tiny_model(family).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    hook = model.net.input_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) \
        if hasattr(model.net, "input_conv") else \
        next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(
            lambda m, i, o: seen.append(o.dtype))
    options = {"sampler": "ddim", "steps": 10}
    model.check_sample_options(precision="bf16", **options)  # what the callbacks check at setup
    fp32 = model.sample(16, generator=torch.Generator().manual_seed(3), **options)
    assert set(seen) == {torch.float32}
    seen.clear()
    net = model.net
    bf16 = model.sample(16, generator=torch.Generator().manual_seed(3), precision="bf16", **options)
    hook.remove()
    # the call ran a bf16 copy: the model keeps its own net and its float32 weights
    assert model.net is net and all(p.dtype == torch.float32 for p in model.parameters())
    assert model.last_sample_nfe == 10
    assert set(seen) == {torch.bfloat16} and len(seen) == 10
    assert bf16.dtype == torch.float32
    difference = (bf16 - fp32).abs()
    # 8 mantissa bits: one evaluation within 1% (measured 0.3%), the samples after 10 steps within
    # 0.01 on average (measured 0.002 / 0.0003; a random net's rare pixels may move further)
    assert 0 < difference.mean() < 0.01, difference.mean()
    x, t = torch.randn(16, 1, 8, 8), torch.full((16,), 50.0 if family == "ddpm" else 0.5)
    with torch.no_grad():
        exact = model.denoise(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model.denoise(x, t).float()
    assert 1e-4 < ((rounded - exact).norm() / exact.norm()).item() < 0.01
    with pytest.raises(OptionError, match=r"precision='16': must be one of \['32', 'bf16'\]"):
        model.sample(2, precision="16", **options)
