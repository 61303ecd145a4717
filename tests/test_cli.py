"""The `lightning-diffusion` command as a user runs it: help, print_config, fit, resume, typos."""

import re

import numpy as np
import torch
import yaml
from PIL import Image

from conftest import ROOT, fit_run, run_cli

# a few steps of the README's config: a short diffusion keeps the final sample grid fast; T = 50 as the
# config's callbacks sample with 25 DDIM steps and score a 50-step respaced bound, which must fit in T
# (checked before training)
TINY = ["--trainer.max_steps=4", "--model.init_args.timesteps=50", "--data.init_args.batches_per_epoch=2",
        "--data.init_args.num_workers=0", "--trainer.check_val_every_n_epoch=1"]


def test_help_lists_every_subcommand():
    out = run_cli("--help", separate_process=True).stdout  # the real entry point, once
    for sub in ("fit", "validate", "test", "predict", "shards"):
        assert re.search(rf"^\s+{sub}\s+\S", out, re.M), f"{sub} missing from --help"
    assert "--trainer.max_steps" in run_cli("fit", "--help").stdout
    proc = run_cli("nosuch", check=False)
    assert proc.returncode != 0 and "unknown subcommand 'nosuch'" in proc.stderr


def test_print_config_resolves_short_names_and_overrides():
    out = run_cli("fit", "--config", "configs/ddpm_digits.yaml", "--model.init_args.timesteps=50",
                  "--model.init_args.net.init_args.model_channels=16", "--print_config").stdout
    config = yaml.safe_load(out)
    assert config["model"]["class_path"] == "lightning_diffusion.DDPM"
    assert config["model"]["init_args"]["timesteps"] == 50
    assert config["model"]["init_args"]["net"]["class_path"] == "lightning_diffusion.UNet"
    assert config["model"]["init_args"]["net"]["init_args"]["model_channels"] == 16
    assert config["data"]["class_path"] == "lightning_diffusion.ShardDataModule"


def test_fit_writes_checkpoint_config_and_grid_then_resumes(tmp_path):
    logger = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=run"]
    proc = run_cli("fit", "--config", "configs/ddpm_digits.yaml", *TINY, *logger)
    run = tmp_path / "ddpm_digits" / "run"
    out = proc.stdout + proc.stderr
    assert f"Run directory: {run}" in out and str(run / "samples" / "final.png") in out
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    # the data facts were linked into the model, not written in the config
    assert tuple(ckpt["hyper_parameters"]["data_shape"]) == (1, 8, 8) and ckpt["hyper_parameters"]["num_classes"] == 10
    # 10 x 10 tiles of 8 px with 1 px padding, 91 px, enlarged 6x to 546 px (>= 512): each pixel a 6 x 6 block
    grid = np.asarray(Image.open(run / "samples" / "final.png"))
    assert grid.shape[:2] == (546, 546)
    assert np.array_equal(grid, grid[::6, ::6].repeat(6, axis=0).repeat(6, axis=1))
    assert "val/loss" in (run / "metrics.csv").read_text()

    # resume into the same run directory: config.yaml is overwritten and the step count continues
    resumed = [*TINY[1:], "--trainer.max_steps=8", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    proc = run_cli("fit", "--config", "configs/ddpm_digits.yaml", *resumed, *logger)
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["epoch"] >= 3


def test_toy2d_fit_writes_a_scatter_plot(tmp_path):
    run = fit_run(tmp_path, "ddpm_toy2d", "--trainer.max_steps=3", "--model.init_args.timesteps=10",
                  "--data.init_args.batches_per_epoch=3", "--model.init_args.net.init_args.hidden=32")
    plot = run / "samples" / "final.png"
    assert Image.open(plot).size == (500, 500)


def test_config_typo_is_named():
    proc = run_cli("fit", "--config", "configs/ddpm_digits.yaml", "--model.init_args.timestep=5", "--print_config",
                   check=False)
    assert proc.returncode != 0 and "timestep" in proc.stderr
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "nope.yaml"), check=False)
    assert proc.returncode != 0 and "nope.yaml" in proc.stderr


def test_bad_dataset_path_is_named(tmp_path):
    proc = run_cli("fit", "--config", "configs/ddpm_digits.yaml", f"--data.init_args.dataset={tmp_path}/missing",
                   "--trainer.max_steps=1", check=False)
    assert proc.returncode != 0 and f"dataset '{tmp_path}/missing' is neither an embedded dataset" in proc.stderr


def test_every_config_parses(capsys):
    """Every shipped config resolves (class paths, argument names and types) without running."""
    import pytest

    from lightning_diffusion.cli import DiffusionCLI

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 11
    for path in configs:
        with pytest.raises(SystemExit) as exit_info:
            DiffusionCLI(args=["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code in (None, 0), path.name
        config = yaml.safe_load(capsys.readouterr().out)
        model = config["model"]["class_path"]
        assert model in ("lightning_diffusion.DDPM", "lightning_diffusion.ScoreSDE", "lightning_diffusion.VAE",
                         "lightning_diffusion.HierarchicalVAE", "lightning_diffusion.EBM",
                         "lightning_diffusion.DiscreteDiffusion", "lightning_diffusion.VQVAE",
                         "lightning_diffusion.LatentDiffusion"), path.name
        if "cifar10" in path.name and model != "lightning_diffusion.HierarchicalVAE":  # Ho et al.'s UNet: our defaults
            assert config["model"]["init_args"]["net"]["init_args"]["model_channels"] == 128
        if path.name == "hvae_cifar10.yaml":  # VDVAE's depth
            assert sum(config["model"]["init_args"]["net"]["init_args"]["groups_per_resolution"]) == 43


def test_cli_checkpoint_reloads_without_the_net(tmp_path):
    """A checkpoint written by the CLI rebuilds its model, net included, from its hyperparameters,
    also for a net that lacks a linked argument (the MLP has no image_size)."""
    from lightning_diffusion import ScoreSDE

    run = fit_run(tmp_path, "sde_vp_toy2d", "--trainer.max_steps=2", "--data.init_args.batches_per_epoch=2",
                  "--model.init_args.sample_steps=5", "--model.init_args.net.init_args.hidden=16")
    model = ScoreSDE.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.net.input.out_features == 16  # the net came back from the config in the checkpoint
    assert type(model.sde).__name__ == "VPSDE" and model.data_shape == (2,)
    assert model.sample(10, sampler="ddim", steps=5).shape == (10, 2)
