"""The callbacks' fast preview sampler: a fit ends seconds after its last step.

``GenerativeModel.preview_sample_options()`` is the family's fast default (DDPM, ScoreSDE:
DPM-Solver++(2M) at 20 steps; DiscreteDiffusion: ancestral on 100 respaced steps; others: none);
SampleGrid, SampleQuality and WandbSamples merge the user's ``sample_options`` over it when those
name neither ``sampler`` nor ``steps`` (``callbacks.common.sampling_options``), while
``model.sample()`` keeps the paper's default."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from tiny import tiny_trainer
from lightning_diffusion import DDPM, MLP, SampleGrid, SampleQuality, ScoreSDE, ShardDataModule, WandbSamples
from lightning_diffusion.callbacks.common import sampling_options
from lightning_diffusion.diffusion.sde import VESDE, VPSDE, SubVPSDE
from lightning_diffusion.errors import OptionError
from lightning_diffusion.models.discrete_diffusion import DiscreteDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"sampler": "dpm_solver", "steps": 20}


class NetCalls(L.Callback):
    """Counts the net's forward calls, and marks the count when training ends and when ``on_fit_end``
    starts (listed before the sampling callbacks, its hooks run first)."""

    def __init__(self):
        self.calls, self.marks = 0, {}

    def setup(self, trainer, pl_module, stage):
        pl_module.net.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_train_end(self, trainer, pl_module):
        self.marks["train_end"] = self.calls

    def on_fit_end(self, trainer, pl_module):
        self.marks["fit_end"] = self.calls


def _ddpm(timesteps: int = 1000) -> DDPM:
    torch.manual_seed(0)
    return DDPM(MLP(hidden=16, num_layers=1), timesteps=timesteps, data_shape=(2,), warmup_steps=0)


def _fit(tmp_path, model, callbacks, max_steps: int = 2) -> L.Trainer:
    trainer = tiny_trainer(max_steps=max_steps, default_root_dir=tmp_path, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(model, datamodule=ShardDataModule("gaussians8", batch_size=8, batches_per_epoch=4, num_workers=0))
    return trainer


# -- the merge rule -----------------------------------------------------------------------------------
class _Model(nn.Module):
    """A model with a preview default and a check that refuses ``variance`` off the slow sampler."""

    def preview_sample_options(self):
        return {"sampler": "fast", "steps": 20, "eta": 0.0}

    def check_sample_options(self, sampler="slow", steps=None, **options):
        if "variance" in options and sampler != "slow":
            raise OptionError("variance", options["variance"], f"the {sampler} sampler has no option 'variance'")


@pytest.mark.parametrize("given, used", [
    ({}, {"sampler": "fast", "steps": 20, "eta": 0.0}),  # nothing given: the preview
    ({"guidance_scale": 3.0}, {"sampler": "fast", "steps": 20, "eta": 0.0, "guidance_scale": 3.0}),  # merged over it
    ({"eta": 0.5}, {"sampler": "fast", "steps": 20, "eta": 0.5}),  # the user's keys win
    ({"sampler": "slow"}, {"sampler": "slow"}),  # a sampler: no preview steps either
    ({"steps": 7}, {"steps": 7}),  # steps: of the model's own sampler
    ({"sampler": "fast", "eta": 0.5}, {"sampler": "fast", "eta": 0.5}),
    ({"variance": "fixedsmall"}, {"variance": "fixedsmall"}),  # belongs to the model's own sampler
])
def test_the_preview_applies_only_where_the_user_chose_no_sampler(given, used):
    before = dict(given)
    assert sampling_options(_Model(), given) == used
    assert given == before  # the callback's own options are not changed
    assert sampling_options(_Model(), given, preview=False) == given


def test_a_model_without_a_preview_samples_as_given():
    """A user's LightningModule without preview_sample_options, and the families whose preview is {}."""
    from lightning_diffusion import VAE
    from lightning_diffusion.nets.vae import MLPVAENet

    assert sampling_options(nn.Linear(1, 1), {"temperature": 0.5}) == {"temperature": 0.5}
    vae = VAE(MLPVAENet(hidden=8, num_layers=1), likelihood="gaussian", data_shape=(2,))
    assert vae.preview_sample_options() == {} and sampling_options(vae, {}) == {}


# -- the families' previews ---------------------------------------------------------------------------
@pytest.mark.parametrize("make, preview, nfe", [
    (lambda: _ddpm(1000), FAST, 20),
    (lambda: DDPM(MLP(hidden=8, num_layers=1), timesteps=1000, beta_schedule="cosine", data_shape=(2,)),
     {"sampler": "dpm_solver", "steps": 25}, 20),  # a wider log-SNR range; rounding to integer steps merges 5
    (lambda: _ddpm(50), FAST, 19),  # a grid rounded to 50 integer steps merges one level
    (lambda: _ddpm(20), {}, 20),  # ancestral over all T <= 20 steps costs no more
    (lambda: _ddpm(10), {}, 10),
    (lambda: ScoreSDE(MLP(hidden=8, num_layers=1, time_scale=1000.0), sde=VPSDE(), data_shape=(2,)), FAST, 20),
    (lambda: ScoreSDE(MLP(hidden=8, num_layers=1, time_scale=1000.0), sde=VESDE(), data_shape=(2,)), FAST, 20),
    (lambda: ScoreSDE(MLP(hidden=8, num_layers=1, time_scale=1000.0), sde=SubVPSDE(), data_shape=(2,)),
     {"sampler": "dpm_solver", "steps": 32}, 32),  # sub-VP's log-SNR spans 18.8 at t_eps 1e-5, VP's 11.9
])
def test_every_gaussian_process_previews_with_few_network_calls(make, preview, nfe):
    model = make()
    assert model.preview_sample_options() == preview
    model.check_sample_options(**preview)
    x = model.sample(6, generator=torch.Generator().manual_seed(0), **preview)
    assert x.shape == (6, 2) and torch.isfinite(x).all() and model.last_sample_nfe == nfe
    model.sample(2)  # sample()'s own default stays the paper's: ancestral over all T (pc over sample_steps)
    paper = model.schedule.timesteps if isinstance(model, DDPM) else 2 * model.sample_steps - 1
    assert model.last_sample_nfe == paper


class _ZeroLogits(nn.Module):
    num_categories, data_kind = 3, "sequences"

    def forward(self, x_t, t, y=None):
        return torch.zeros(*x_t.shape, self.num_categories)


@pytest.mark.parametrize("options, preview", [
    ({"corruption": "uniform", "timesteps": 1000}, {"sampler": "ancestral", "steps": 100}),
    ({"corruption": "absorbing", "timesteps": 0, "loss": "masked_elbo"}, {"sampler": "ancestral", "steps": 100}),
    ({"corruption": "uniform", "timesteps": 1000, "sample_steps": 400}, {"sampler": "ancestral", "steps": 100}),
    ({"corruption": "uniform", "timesteps": 1000, "sample_steps": 100}, {}),  # the shipped configs: already 100
    ({"corruption": "uniform", "timesteps": 50}, {}),  # T <= 100: the model's own T steps
    ({"corruption": "uniform", "timesteps": 1000, "sampler": "sundae"}, {}),  # few steps by design
])
def test_discrete_diffusion_previews_with_a_respaced_ancestral_sampler(options, preview):
    model = DiscreteDiffusion(_ZeroLogits(), num_categories=3, data_shape=(4,), **options)
    assert model.preview_sample_options() == preview
    model.sample(5, **sampling_options(model, {}))
    own = options.get("sample_steps") or options["timesteps"] or 1000
    assert model.last_sample_nfe == (preview["steps"] if preview else (10 if "sampler" in options else own))
    model.sample(5)  # sample()'s own default is unchanged
    assert model.last_sample_nfe == (10 if "sampler" in options else own)


# -- the callbacks in a fit ---------------------------------------------------------------------------
def test_a_1000_step_ddpm_fit_ends_with_20_network_calls_per_sampling_callback(tmp_path):
    """No sample_options: SampleGrid (at fit end), WandbSamples (at train end) and SampleQuality (every
    step) sample with DPM-Solver++(2M) at 20 steps, not 1000 ancestral ones, and record that."""
    model, counter = _ddpm(1000), NetCalls()
    grid, wandb = SampleGrid(num_samples=16), WandbSamples(every_n_epochs=0, num_samples=16, num_reconstructions=0)
    quality = SampleQuality(num_samples=32, batch_size=32, every_n_epochs=0, every_n_steps=2, num_real=64,
                            cache_stats=False)
    _fit(tmp_path, model, [counter, wandb, grid, quality])
    assert counter.marks["fit_end"] - counter.marks["train_end"] == 20  # WandbSamples' samples
    assert counter.calls - counter.marks["fit_end"] == 20  # SampleGrid's final grid
    assert model.last_sample_nfe == 20
    assert grid.last_sample_options == wandb.last_sample_options == quality.last_sample_options == FAST
    (record,) = [json.loads(line) for line in (tmp_path / "metrics" / "sample_quality.jsonl").read_text().splitlines()]
    assert record["sample_options"] == FAST and record["step"] == 2
    assert grid.sample_options == {}  # the callback's own options are the user's


@pytest.mark.parametrize("grid, nfe, used", [
    (SampleGrid(num_samples=4, sample_options={"sampler": "ancestral"}), 1000, {"sampler": "ancestral"}),
    (SampleGrid(num_samples=4, sample_options={"steps": 30}), 30, {"steps": 30}),  # 30 ancestral steps
    (SampleGrid(num_samples=4, sample_options={"sampler": "ddim"}), 50, {"sampler": "ddim"}),  # ddim's own 50
    (SampleGrid(num_samples=4, preview_sampler=False), 1000, {}),
])
def test_a_sampler_or_steps_of_the_user_is_taken_as_written(tmp_path, grid, nfe, used):
    model, counter = _ddpm(1000), NetCalls()
    _fit(tmp_path, model, [counter, grid], max_steps=1)
    assert grid.last_sample_options == used and model.last_sample_nfe == nfe
    assert counter.calls - counter.marks["fit_end"] == nfe


def test_the_setup_check_checks_the_options_used(tmp_path):
    """The merged options are what setup checks: guidance on an unconditional model is refused before
    the first step, named as written."""
    with pytest.raises(ValueError, match=r"SampleGrid.guidance_scale=3.0: classifier-free guidance needs a "
                                         r"class_conditional DDPM"):
        _fit(tmp_path, _ddpm(1000), [SampleGrid(num_samples=4, guidance_scale=3.0)], max_steps=1)
