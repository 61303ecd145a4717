"""Fail fast: what can be checked before the first training step is checked then (issue 16, part 4).

Every CLI case runs ``lightning-diffusion fit`` in-process on a config that would otherwise train
(a checkpoint after every step, every step logged) and asserts that it stops with a message that
names the option as the config writes it, before any step: no checkpoint, no ``train/loss``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from conftest import run_cli
from tiny import tiny_trainer
from lightning_diffusion import DDPM, MLP, LastCheckpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = {"class_path": "UNet", "init_args": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                                  "attention_resolutions": [], "dropout": 0.0}}
TINY_MLP = {"class_path": "lightning_diffusion.MLP", "init_args": {"hidden": 16, "num_layers": 1}}


def fit_config(tmp_path: Path, callbacks: list[dict], *, dataset: str = "digits", net: dict | None = None,
               model: dict | None = None) -> Path:
    """A config that checkpoints and logs after every step: a DDPM of 10 timesteps."""
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "log_every_n_steps": 1, "accelerator": "cpu", "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "run", "version": "v"}},
                    "callbacks": [{"class_path": "LastCheckpoint", "init_args": {"every_n_train_steps": 1}},
                                  *callbacks]},
        "model": model or {"class_path": "DDPM", "init_args": {
            "net": net or (TINY_UNET if dataset == "digits" else TINY_MLP), "timesteps": 10, "warmup_steps": 1}},
        "data": {"class_path": "ShardDataModule",
                 "init_args": {"dataset": dataset, "batch_size": 16, "batches_per_epoch": 2, "num_workers": 0}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fails_before_training(tmp_path: Path, config: Path, *args: str) -> str:
    """Run fit; assert it failed with no step taken; return its output."""
    proc = run_cli("fit", "--config", str(config), *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint was written: training ran"
    metrics = tmp_path / "run" / "v" / "metrics.csv"
    assert not metrics.is_file() or "train/loss" not in metrics.read_text(), "train/loss was logged"
    return " ".join(out.split())  # one line: messages may wrap


def sample_quality(**init_args) -> dict:
    return {"class_path": "SampleQuality", "init_args": {"num_samples": 16, "batch_size": 16, **init_args}}


# -- 1. feature extractor weights -------------------------------------------------------------------
def test_missing_inception_weights_stop_the_run_at_setup(tmp_path):
    out = fails_before_training(tmp_path, fit_config(tmp_path, [sample_quality(extractor="inception-v3-compat")]))
    assert re.search(r"SampleQuality \(extractor='inception-v3-compat'\): the InceptionV3 weights are not at "
                     r"\S+weights-inception-2015-12-05-6726825d\.pth: run `lightning-diffusion features "
                     r"fetch-inception --out \S+`", out), out[-2000:]


def test_missing_digits_weights_file_stops_the_run_at_setup(tmp_path):
    missing = tmp_path / "nowhere" / "digits.pt"
    out = fails_before_training(tmp_path, fit_config(
        tmp_path, [sample_quality(extractor="digits", weights_path=str(missing))]))
    assert f"SampleQuality (extractor='digits', weights_path='{missing}'): the digits classifier weights are " \
           f"not at {missing}: run `lightning-diffusion features train-digits --out {missing}`" in out, out[-2000:]


def test_unknown_extractor_is_named(tmp_path):
    out = fails_before_training(tmp_path, fit_config(tmp_path, [sample_quality(extractor="inception")]))
    assert "SampleQuality.extractor='inception': unknown feature extractor; choose one of ['digits', " \
           "'inception-v3-compat']" in out, out[-2000:]


def test_points_need_no_extractor_weights(tmp_path):
    """Toy 2-D data get energy distance and MMD: the (missing) Inception weights are not asked for."""
    config = fit_config(tmp_path, [sample_quality(every_n_epochs=0)], dataset="gaussians8")
    run_cli("fit", "--config", str(config), "--trainer.max_steps=1")
    assert list(tmp_path.rglob("last.ckpt"))


# -- 2. sampler and likelihood options against the model --------------------------------------------
@pytest.mark.parametrize(("callback", "expected"), [
    (sample_quality(extractor="digits", sample_options={"sampler": "ddim", "steps": 25}),
     "SampleQuality.sample_options.steps=25: steps must be an integer in [2, 10] (a DDPM of 10 timesteps has at "
     "most 10 grid points); give steps <= 10"),
    ({"class_path": "SampleGrid", "init_args": {"sample_options": {"sampler": "ddim", "stpes": 5}}},
     "SampleGrid.sample_options.stpes=5: the ddim sampler has no option 'stpes' (did you mean steps?); its options "
     "are steps, sampler, guidance_scale, clip, precision, eta"),
    ({"class_path": "SampleGrid", "init_args": {"sample_options": {"sampler": "dpm++"}}},
     "SampleGrid.sample_options.sampler='dpm++': unknown sampler 'dpm++'; choose one of ['ancestral', 'annealed_mcmc', 'ddim', "),
    ({"class_path": "SampleGrid", "init_args": {"guidance_scale": 3.0}},
     "SampleGrid.guidance_scale=3.0: classifier-free guidance needs a class_conditional DDPM; "
     "use guidance_scale 1.0, or train with class_conditional: true"),
    ({"class_path": "WandbSamples", "init_args": {"sample_options": {"sampler": "ddim"}}},
     "WandbSamples.sample_options={'sampler': 'ddim'}: the default of 50 steps is out of range (a DDPM of 10 "
     "timesteps has at most 10 grid points): steps must be an integer in [2, 10]; give steps <= 10"),
    ({"class_path": "WandbSamples", "init_args": {"sample_options": {"sampler": "ddim", "eta": "half"}}},
     "WandbSamples.sample_options.eta='half': must be a number; write it as a number"),
    ({"class_path": "Likelihood", "init_args": {"bpd_options": {"steps": 50}}},
     "Likelihood.bpd_options.steps=50: steps must be an integer in [1, 10] (the respaced bound of a DDPM of 10 "
     "timesteps); give steps <= 10"),
    ({"class_path": "Likelihood", "init_args": {"bpd_options": {"num_importance_samples": 10}}},
     "Likelihood.bpd_options.num_importance_samples=10: DDPM.bits_per_dim has no option 'num_importance_samples'; "
     "its options are steps, batch_t"),
])
def test_bad_options_stop_the_run_at_setup(tmp_path, callback, expected):
    out = fails_before_training(tmp_path, fit_config(tmp_path, [callback]))
    assert expected in out, out[-2000:]


def test_vae_options_are_checked_too(tmp_path):
    model = {"class_path": "VAE", "init_args": {"net": {"class_path": "MLPVAENet", "init_args": {"hidden": 16}},
                                                "warmup_steps": 1}}
    callbacks = [{"class_path": "SampleGrid", "init_args": {"sample_options": {"sampler": "ddim"}}}]
    out = fails_before_training(tmp_path, fit_config(tmp_path, callbacks, dataset="gaussians8", model=model))
    assert "SampleGrid.sample_options.sampler='ddim': VAE.sample has no option 'sampler'; its " \
           "options are decoder, temperature" in out, out[-2000:]
    callbacks = [{"class_path": "Likelihood", "init_args": {"bpd_options": {"num_importance_samples": 0}}}]
    out = fails_before_training(tmp_path, fit_config(tmp_path, callbacks, dataset="gaussians8", model=model))
    assert "Likelihood.bpd_options.num_importance_samples=0: must be an integer >= 1" in out, out[-2000:]


def test_score_sde_default_sampler_is_checked_when_built():
    from lightning_diffusion import ScoreSDE

    with pytest.raises(ValueError, match=r"ScoreSDE: sample_steps=1: steps must be an integer >= 2"):
        ScoreSDE(nn.Identity(), sample_steps=1, data_shape=(2,))
    with pytest.raises(ValueError, match=r"ScoreSDE: sampler='dpm\+\+': unknown sampler 'dpm\+\+'"):
        ScoreSDE(nn.Identity(), sampler="dpm++", data_shape=(2,))
    ScoreSDE(nn.Identity(), sampler="ode", data_shape=(2,))  # adaptive: sample_steps does not apply


def test_the_models_own_sample_and_bits_per_dim_use_the_same_rule():
    model = DDPM(MLP(in_channels=2, hidden=8, num_layers=1), timesteps=10, data_shape=(2,))
    with pytest.raises(ValueError, match=r"steps=25: steps must be an integer in \[2, 10\]"):
        model.sample(2, sampler="ddim", steps=25)
    with pytest.raises(ValueError, match=r"stpes=5: the ddim sampler has no option 'stpes' \(did you mean steps\?\)"):
        model.sample(2, sampler="ddim", stpes=5)
    with pytest.raises(ValueError, match=r"steps=11: steps must be an integer in \[1, 10\]"):
        model.bits_per_dim(torch.zeros(2, 2), steps=11)
    assert model.sample(2, sampler="ddim", steps=10).shape == (2, 2)


def test_a_users_module_without_the_checks_still_gets_the_callbacks():
    """Modules not of our families have no check_sample_options: nothing is checked, nothing breaks."""
    from lightning_diffusion.callbacks.samples import check_model_options

    check_model_options(nn.Linear(1, 1), "SampleGrid.sample_options", {"anything": 1})


# -- 3. net against the kind of data -----------------------------------------------------------------
@pytest.mark.parametrize(("config", "dataset", "expected"), [
    ("configs/ddpm_toy2d.yaml", "digits",
     "DDPM: the net MLP takes points [D], but the data are 1x8x8 images: use UNet (class_path: UNet)"),
    ("configs/ddpm_digits.yaml", "gaussians8",
     "DDPM: the net UNet takes images [C, H, W], but the data are points of dimension 2: use MLP "
     "(class_path: lightning_diffusion.MLP)"),
    ("configs/sde_vp_toy2d.yaml", "digits",
     "ScoreSDE: the net MLP takes points [D], but the data are 1x8x8 images: use UNet (class_path: UNet)"),
    ("configs/vae_toy2d.yaml", "digits",
     "VAE: the net MLPVAENet takes points [D], but the data are 1x8x8 images: use ConvVAENet (class_path: ConvVAENet)"),
    ("configs/vae_digits.yaml", "gaussians8",
     "ConvVAENet takes images [C, H, W], but image_size is None, as the CLI links it from points data [D]: for "
     "points use MLPVAENet (class_path: MLPVAENet)"),
    ("configs/hvae_digits.yaml", "gaussians8",
     "LadderVAENet takes images [C, H, W], but image_size is None, as the CLI links it from points data [D]: for "
     "points use VAE with MLPVAENet"),
    ("configs/ebm_toy2d.yaml", "digits",
     "EBM: the net EnergyMLP takes points [D], but the data are 1x8x8 images: use EnergyConvNet (class_path: "
     "EnergyConvNet)"),
])
def test_a_net_for_the_other_kind_of_data_is_named(tmp_path, config, dataset, expected):
    overrides = [f"--data.init_args.dataset={dataset}", "--trainer.max_steps=2", "--trainer.logger=false",
                 f"--trainer.default_root_dir={tmp_path}", "--data.init_args.num_workers=0",
                 "--trainer.callbacks+=LastCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
                 f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}"]
    proc = run_cli("fit", "--config", config, *overrides, check=False)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0 and expected in out, out[-3000:]
    # one line, not jsonargparse's "Does not validate against any of the Union subtypes" with the config
    assert f"lightning-diffusion fit: error: {expected}" in out and "Union subtypes" not in out, out[-3000:]
    assert not list(tmp_path.rglob("*.ckpt"))


# -- 4. the NaN-loss message names a checkpoint only when one exists ---------------------------------
class NaNAfter(nn.Module):
    """An MLP whose output turns NaN from its ``after``-th training call on."""

    data_kind = "points"

    def __init__(self, after: int):
        super().__init__()
        self.net, self.after, self.calls = MLP(in_channels=2, hidden=8, num_layers=1), after, 0

    def forward(self, x, t, y=None):
        self.calls += self.training
        out = self.net(x, t, y)
        return out * math.nan if self.training and self.calls > self.after else out


@pytest.mark.parametrize("after", [0, 2])
def test_nan_loss_names_a_checkpoint_only_when_one_was_written(tmp_path, after):
    model = DDPM(NaNAfter(after), timesteps=10, data_shape=(2,), warmup_steps=1)
    data = DataLoader([{"x": torch.randn(2)} for _ in range(64)], batch_size=8)
    checkpoint = LastCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1)
    trainer = tiny_trainer(max_steps=5, callbacks=[checkpoint], default_root_dir=tmp_path, enable_checkpointing=True,
                           num_sanity_val_steps=2)
    with pytest.raises(FloatingPointError) as error:
        trainer.fit(model, data)
    message = str(error.value)
    assert f"train/loss is nan at global step {after}" in message
    if after == 0:
        assert "no checkpoint has been written yet in this run" in message and ".ckpt" not in message
    else:
        last = tmp_path / "checkpoints" / "last.ckpt"
        assert f"the last checkpoint written, {last}, holds parameters of an earlier step" in message
        assert last.is_file()


# -- 5. issue 21: categorical nets on float data, an EBM whose chains diverge -----------------------------
def test_a_categorical_net_on_float_data_names_data_categorical(tmp_path):
    proc = run_cli("fit", "--config", "configs/discrete_absorbing_digits.yaml", "--data.init_args.categorical=false",
                   "--trainer.max_steps=2", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                   check=False)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1 and "lightning-diffusion fit: error: CategoricalUNet: num_categories is None: the net " \
        "takes categorical data (int64 categories), but the data are read as floats (data.init_args.categorical: " \
        "false, or data without categories); set data.init_args.categorical: true" in out, out[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_ebm_chains_that_diverge_name_step_size(tmp_path):
    """step_size=1e4 sends the Langevin chains to NaN at the first chain run (the sanity check's): the
    guard names step_size; the loss alone said 'val/loss is nan ... Lower model.lr'."""
    out = fails_before_training(tmp_path, Path("configs/ebm_toy2d.yaml"), "--model.init_args.step_size=1e4",
                                "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}",
                                f"--trainer.logger.init_args.save_dir={tmp_path}",
                                "--trainer.logger.init_args.name=run", "--trainer.logger.init_args.version=v")
    assert "lightning-diffusion fit: error: EBM: the MCMC chains diverged at global step 0: non-finite chain states " \
        "after 20 langevin steps of step_size=10000; the parameters before this step are intact (no checkpoint has " \
        "been written yet in this run). Lower model.step_size (by 10x at a time)" in out, out[-2000:]


def test_ebm_guard_keeps_a_nan_energy_of_the_second_tensor():
    """Python's max over floats dropped a NaN that came after a finite value."""
    from lightning_diffusion import EBM, EnergyMLP

    model = EBM(EnergyMLP(in_channels=2, hidden=8, num_layers=1), data_shape=(2,))
    with pytest.raises(FloatingPointError, match="the energies diverged"):
        model._guard(torch.ones(4), torch.full((4,), math.nan))
