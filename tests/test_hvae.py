"""The hierarchical VAE: the ladder's groups and errors, per-group temperatures, the IWAE bound against
the ELBO, gradient skipping (the counter, the adaptive threshold, a NaN batch that leaves the weights
and the optimizer state untouched, checkpointed state), training on digits, and the CLI."""

import math
import warnings

import lightning as L
import pytest
import torch

from conftest import fit_run
from tiny import tiny_trainer
from lightning_diffusion import HierarchicalVAE, LadderVAENet, ShardDataModule
from lightning_diffusion.models.vae import GradientSkip


pytestmark = pytest.mark.usefixtures("one_thread")


DIGITS = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0)) / 127.5 - 1


def small_model(**kwargs):
    net = LadderVAENet(width=16, latent_channels=2, latent_resolutions=(1, 4), groups_per_resolution=(1, 2),
                       encoder_blocks=1, output_blocks=1)
    return HierarchicalVAE(net, data_shape=(1, 8, 8), **kwargs)


def test_ladder_groups_and_errors():
    net = LadderVAENet(width=16, latent_channels=3, latent_resolutions=(1, 2, 8), groups_per_resolution=(1, 2, 3))
    assert net.group_shapes == [(3, 1, 1), (3, 2, 2), (3, 2, 2), (3, 8, 8), (3, 8, 8), (3, 8, 8)]
    assert sorted(net.bottom_up(DIGITS)) == [1, 2, 8]
    model = HierarchicalVAE(net, data_shape=(1, 8, 8))
    assert model.num_groups == 6
    with pytest.raises(ValueError, match="latent_resolutions .* do not fit image_size 8"):
        LadderVAENet(latent_resolutions=(3, 8), groups_per_resolution=(1, 1))
    with pytest.raises(ValueError, match="latent_resolutions .* do not fit image_size 8"):
        LadderVAENet(latent_resolutions=(16,), groups_per_resolution=(1,))
    with pytest.raises(ValueError, match="same length"):
        LadderVAENet(latent_resolutions=(1, 4), groups_per_resolution=(1,))
    with pytest.raises(ValueError, match="models images"):
        HierarchicalVAE(net, data_shape=(2,), likelihood="gaussian")
    with pytest.raises(ValueError, match=r"num_groups|6 latent groups"):
        model.sample(2, temperature=[1.0, 0.5])


def test_elbo_terms_iwae_and_temperature():
    model = small_model()
    model.train()
    terms = model._terms({"x": DIGITS}, torch.Generator().manual_seed(0))
    assert len(terms["kl_groups"]) == 3 and all(k.item() >= 0 for k in terms["kl_groups"])
    assert sum(k.item() for k in terms["kl_groups"]) == pytest.approx(terms["kl"].item(), rel=1e-5)
    elbo = model.bits_per_dim(DIGITS, 1, generator=torch.Generator().manual_seed(1))
    iwae = model.bits_per_dim(DIGITS, 50, generator=torch.Generator().manual_seed(1))
    assert (iwae <= elbo + 0.01).all() and iwae.mean() < elbo.mean()  # a tighter bound
    # temperature 0 is the prior's mean at every group: the same samples whatever the noise
    a = model.sample(3, temperature=0.0, decoder="mean", generator=torch.Generator().manual_seed(0))
    b = model.sample(3, temperature=[0.0, 0.0, 0.0], decoder="mean", generator=torch.Generator().manual_seed(5))
    c = model.sample(3, temperature=[1.0, 0.0, 0.0], decoder="mean", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(b, c) and a.shape == (3, 1, 8, 8)
    assert model.reconstruct(DIGITS).shape == DIGITS.shape


def test_soft_clamp_bounds_the_log_variances():
    model = small_model(logvar_soft_clamp=2.0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=3.0)  # wild weights: huge raw log-variances
    seen = []

    def record(group, prior, posterior):
        for _, logvar in (model._clamped(prior), model._clamped(posterior)):
            seen.append(logvar.abs().max().item())
        return posterior[0]

    model.net.top_down(model.net.bottom_up(DIGITS), record, DIGITS.shape[0])
    assert max(seen) <= 2.0 and max(seen) > 1.9


# -- gradient skipping ------------------------------------------------------------------------------
def test_gradient_skip_counts_adapts_and_warns():
    skip = GradientSkip(threshold=None, factor=5.0, window=10, warn_rate=0.3, min_history=5)
    assert [skip.update(n) for n in (1.0, 1.2, 0.9, 100.0, 1.1)] == [False] * 5  # no history yet: only non-finite skipped
    assert skip.update(math.nan) and skip.update(math.inf)
    assert skip.current_threshold() == pytest.approx(5 * 1.1)  # 5 x the median of the finite norms
    assert skip.update(50.0) and not skip.update(1.1)
    assert skip.total_skips == 3 and skip.total_steps == 9
    # a norm that drifts up 100x for good is skipped only until the median has moved: no stall
    decisions = [skip.update(110.0) for _ in range(10)]
    assert decisions[0] and not decisions[-1] and sum(decisions) < 10
    skip2 = GradientSkip(threshold=None, factor=5.0, window=10, warn_rate=0.3, min_history=5)
    for n in [1.0] * 10 + [math.nan] * 4:
        skip2.update(n)
    message = skip2.warning()
    assert message is not None and "40% of the last 10 updates" in message
    assert skip2.warning() is None  # at most once per window
    # a fixed threshold (VDVAE) skips every update above it, which the warning then reports
    fixed = GradientSkip(threshold=2.0, factor=None, window=4, warn_rate=0.1)
    assert [fixed.update(n) for n in (1.0, 3.0, 3.0, 3.0)] == [False, True, True, True]
    restored = GradientSkip(threshold=2.0, factor=None, window=4, warn_rate=0.1)
    restored.load_state_dict(fixed.state_dict())
    assert restored.state_dict() == fixed.state_dict() and restored.rate == 0.75


class NaNOnStep(L.Callback):
    """Poison the batch of one training step with NaN and snapshot the weights and Adam's state around it."""

    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    def snapshot(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        state = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()} for k, v in optimizer.state.items()}
        return [p.detach().clone() for p in pl_module.parameters()], state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["x"][0, 0, 0, 0] = math.nan
            self.before = self.snapshot(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1 and self.after is None:
            self.after = self.snapshot(trainer, pl_module)


def test_nan_batch_is_skipped_and_leaves_weights_and_adam_state_untouched(tmp_path):
    torch.manual_seed(0)
    dm = ShardDataModule("digits", batch_size=32, batches_per_epoch=5)
    model = small_model(lr=1e-3, warmup_steps=0)
    spy = NaNOnStep(step=3)
    trainer = tiny_trainer(max_steps=6, limit_val_batches=0, callbacks=[spy], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)  # no FloatingPointError: the NaN batch is skipped
    (params_before, adam_before), (params_after, adam_after) = spy.before, spy.after
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    for key, state in adam_before.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(adam_after[key][name])), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.grad_skip.total_skips == 1 and model.grad_skip.total_steps == 6
    assert trainer.callback_metrics["train/grad_skips"] == 1
    # the counter travels in the checkpoint and comes back on resume
    trainer.save_checkpoint(tmp_path / "skip.ckpt")
    reloaded = HierarchicalVAE.load_from_checkpoint(tmp_path / "skip.ckpt", net=small_model().net)
    assert reloaded.grad_skip.state_dict() == model.grad_skip.state_dict()


def test_without_skipping_a_nan_loss_raises():
    model = small_model(grad_skip_factor=None)
    assert model.grad_skip is None
    bad = DIGITS.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="train/loss is nan"):
        model.training_step({"x": bad}, 0)


# -- training ------------------------------------------------------------------------------------
def test_training_on_digits_lowers_val_bits_per_dim():
    torch.manual_seed(0)
    dm = ShardDataModule("digits", batch_size=64, batches_per_epoch=20)
    net = LadderVAENet(width=24, latent_channels=4, latent_resolutions=(1, 4, 8), groups_per_resolution=(1, 1, 1),
                       encoder_blocks=1, output_blocks=1)
    model = HierarchicalVAE(net, data_shape=dm.data_shape, lr=3e-3, warmup_steps=10, kl_warmup_steps=30)
    x = next(iter(dm.val_dataloader()))["x"]
    before = model.bits_per_dim(x).mean().item()
    trainer = tiny_trainer(max_steps=60, check_val_every_n_epoch=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    assert not [w for w in caught if "gradient skipping" in str(w.message)]  # no skip-rate warning in a healthy run
    after = model.bits_per_dim(x).mean().item()
    # observed: 5.3 -> 4.2 bits/dim
    assert after < before - 0.5 and after < 4.6, (before, after)
    metrics = trainer.callback_metrics
    assert {"train/kl_group0", "train/kl_group2", "val/kl_group1", "train/grad_skip_rate"} <= set(metrics)
    counts = [metrics[f"val/active_units_group{i}"].item() for i in range(3)]
    assert metrics["val/active_units"].item() == sum(counts)
    assert counts[0] <= 4 and counts[1] <= 4 * 16 and counts[2] <= 4 * 64
    assert metrics["train/grad_skip_rate"].item() < 0.1


def test_active_units_by_hand():
    """Unit u is active if the variance over the data of E_q[z_u | x] exceeds 0.01 (Burda et al. 2016)."""
    model = small_model()
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.0])  # variances 1, 0.25, 0.04, 0.0025, 0
    for _ in range(4):  # batches accumulate over the epoch
        means = [torch.randn(50, 5, generator=g) * scales + 3.0, torch.randn(50, 2, 1, 1, generator=g) * 0.01]
        model._accumulate_units(means)
    assert model.active_units() == [3, 0]
    model.on_validation_epoch_start()
    assert model.active_units() is None


def test_cli_fit_and_reload(tmp_path):
    run = fit_run(tmp_path, "hvae_digits", "--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3",
                  "--data.init_args.num_workers=0", "--trainer.check_val_every_n_epoch=1",
                  "--model.init_args.net.init_args.width=16")
    ckpt = run / "checkpoints" / "last.ckpt"
    assert "grad_skip" in torch.load(ckpt, map_location="cpu", weights_only=False)
    model = HierarchicalVAE.load_from_checkpoint(ckpt)
    assert model.net.width == 16 and model.num_groups == 6
    assert model.sample(4, temperature=0.8).shape == (4, 1, 8, 8)
    assert (run / "samples" / "final.png").is_file()
    assert len(list((run / "samples").glob("reconstructions-step*.png"))) == 1  # WandbSamples through reconstruct()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/active_units_group5" in header and "val/kl_group5" in header


def test_the_top_group_first_stage_nats_with_the_models_own_top_prior_are_its_elbo():
    """HierarchicalVAE as a first stage of latent diffusion: ``encode_latents``'s nats minus ``log p(z_top)``
    under the HVAE's own top prior, averaged over draws, is the negative ELBO that ``bits_per_dim``
    computes with every group's KL in closed form; ``decode_latents`` draws the lower groups from their
    priors given the top one."""
    from lightning_diffusion import likelihoods as dist
    from lightning_diffusion.models.first_stage import FirstStage

    torch.manual_seed(0)
    model = small_model().eval()
    with torch.no_grad():  # the prior nets start at zero (N(0, I) priors): give them something to be wrong about
        for block in model.net.blocks:
            for p in block.prior_net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    assert isinstance(model, FirstStage) and model.latent_shape == (2,) and model.latent_categories is None
    x, draws = DIGITS[:3], 3000
    with torch.no_grad():
        z, nats = model.encode_latents(x.repeat(draws, 1, 1, 1), torch.Generator().manual_seed(1))
        # what training draws (bottom-up and the top group alone): the same z from the same generator
        assert torch.equal(model.sample_latents(x.repeat(draws, 1, 1, 1), torch.Generator().manual_seed(1)), z)
        top = model.net.blocks[0].prior_net(model.net.bias)  # the top group's prior: no groups above it
        mean, logvar = model._clamped((top[:, :2], top[:, 2:4]))
        log_prior = dist.diagonal_gaussian_log_prob(z, mean.flatten(1), logvar.flatten(1))
        two_stage = ((nats - log_prior) / (64 * math.log(2))).view(draws, 3)
        elbo = torch.stack([model.bits_per_dim(x, generator=torch.Generator().manual_seed(i))
                            for i in range(300)]).mean(0)
    error = two_stage.std(0) / math.sqrt(draws) + 0.02
    assert ((two_stage.mean(0) - elbo).abs() < 4 * error).all(), (two_stage.mean(0), elbo)
    images = model.decode_latents(z[:4], torch.Generator().manual_seed(2))
    again = model.decode_latents(z[:4], torch.Generator().manual_seed(2))
    other = model.decode_latents(z[:4], torch.Generator().manual_seed(3))  # the lower groups are drawn
    assert images.shape == (4, 1, 8, 8) and torch.equal(images, again) and not torch.equal(images, other)
    with pytest.raises(ValueError, match=r"expected \[B, 2\]"):
        model.decode_latents(torch.zeros(2, 3))


def test_latent_ddpm_digits_fits_on_the_top_group_of_hvae_digits(tmp_path):
    """configs/hvae_digits.yaml, then configs/latent_ddpm_digits.yaml over its top group (8 latents),
    3 steps each through the CLI: images and a finite two-stage bound under its name."""
    from lightning_diffusion.commands import load_model

    small = ("--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3", "--data.init_args.batch_size=16",
             "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false")
    hvae_ckpt = fit_run(tmp_path, "hvae_digits", *small) / "checkpoints" / "last.ckpt"
    run = fit_run(tmp_path, "latent_ddpm_digits", *small, f"--model.init_args.first_stage_ckpt={hvae_ckpt}",
                  "--model.init_args.prior.init_args.timesteps=50",
                  "--model.init_args.prior.init_args.net.init_args.in_channels=8",
                  "--trainer.callbacks.init_args.sample_options={sampler: ddim, steps: 3}")
    model, _, _ = load_model(run / "checkpoints" / "last.ckpt")
    assert type(model.first_stage) is HierarchicalVAE and tuple(model.latent_shape) == (8,)
    images = model.sample(2, sampler="ddim", steps=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    bpd = model.bits_per_dim(DIGITS[:2], steps=5)
    assert torch.isfinite(bpd).all() and (bpd > 0).all() and model.bpd_estimator(steps=5) == "elbo+vlb-respaced-5"
