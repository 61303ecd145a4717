"""``configs/ebm_diffusion_digits.yaml`` (issue 23, item 5) through the CLI: the digits UNet inside an
EnergyHead gets the data's facts by the links into ``net.init_args.net`` (cli.LINKS), trains with
``parameterization: energy`` and ends with a grid."""

import torch

from conftest import run_cli
from tiny import shrink_config

NESTED = "model.init_args.net.init_args.net.init_args"


def _tiny_config(path):
    """ebm_diffusion_digits with 50 timesteps (>= the Likelihood's 50 respaced steps), a narrower UNet, 8-image batches and a 16-image grid;
    its net, head, process kind and callbacks kept (the quality/likelihood callbacks do not fire in 2 steps)."""
    return shrink_config("ebm_diffusion_digits", path, {
        "model.init_args.timesteps": 50, f"{NESTED}.model_channels": 8, "trainer.max_steps": 2,
        "trainer.precision": "32-true", "data.init_args.batch_size": 8, "data.init_args.batches_per_epoch": 2,
    }, callbacks={"SampleGrid": {"num_samples": 16, "sample_options": {"sampler": "dpm_solver", "steps": 4}},
                  "WandbSamples": {"sample_options": {"sampler": "dpm_solver", "steps": 4}}})


def test_ebm_diffusion_digits_fits_through_the_cli_with_the_links_through_the_energy_head(tmp_path):
    """``fit --config ebm_diffusion_digits``: 2 optimizer steps, last.ckpt and samples/final.png written;
    the checkpoint's UNet inside the EnergyHead got in_channels 1, image_size 8 and num_classes 10 from
    the digits (none is written in the config), and its energy model is parameterization energy."""
    config = _tiny_config(tmp_path / "ebm_diffusion_digits.yaml")
    run_cli("fit", "--config", str(config), f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.version=v", "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=1")
    run = tmp_path / "ebm_diffusion_digits" / "v"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 and (run / "samples" / "final.png").stat().st_size > 0
    hparams = checkpoint["hyper_parameters"]
    assert hparams["parameterization"] == "energy" and hparams["net"]["class_path"].endswith("EnergyHead")
    unet = hparams["net"]["init_args"]["net"]["init_args"]
    assert (unet["in_channels"], unet["image_size"], unet["num_classes"]) == (1, 8, 10)


def test_a_nested_linked_value_that_contradicts_the_data_is_refused(tmp_path):
    """``--model.init_args.net.init_args.net.init_args.in_channels=3`` on the 1-channel digits is refused
    in one line naming the option and the data's value (the link would replace it silently)."""
    config = _tiny_config(tmp_path / "ebm_diffusion_digits.yaml")
    proc = run_cli("fit", "--config", str(config), f"--{NESTED}.in_channels=3",
                   f"--trainer.logger.init_args.save_dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert f"--{NESTED}.in_channels=3, but the data have data.num_channels=1" in proc.stderr
