"""Exact resume of an energy-parameterized DDPM (issue 23): 14 steps straight == 8 steps, resume from
last.ckpt, 6 more, bitwise on CPU (parameters, EMA averages, Adam moments, LR scheduler), with
tests/test_resume.py's CLI runs and comparison; the net is an EnergyHead over the UNet, whose loss
backpropagates through grad_x E."""

from __future__ import annotations

import logging

import torch
import yaml

from test_resume import CONFIG, assert_same, final_state, fit_here


def _energy_config(path, **trainer):
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["trainer"].update(trainer)
    unet = config["model"]["init_args"]["net"]
    unet["init_args"].update(model_channels=8, channel_mult=[1])
    config["model"]["init_args"].update(net={"class_path": "EnergyHead", "init_args": {"net": unet}},
                                        parameterization="energy")
    config["data"]["init_args"].update(num_workers=0, batch_size=8)
    path.write_text(yaml.safe_dump(config))
    return path


def test_energy_ddpm_resumes_bitwise(tmp_path, caplog):
    """``parameterization: energy`` through ``fit --config``: 8 steps + resume + 6 == 14 straight,
    bitwise (dropout 0.3 and random flips drawn in both; the resume restores the RNG states)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    fit_here(_energy_config(tmp_path / "c14.yaml"), straight)
    fit_here(_energy_config(tmp_path / "c8.yaml", max_steps=8), split)
    with caplog.at_level(logging.INFO):
        fit_here(_energy_config(tmp_path / "c14b.yaml"), split, f"--ckpt_path={split}/checkpoints/last.ckpt")
    assert "Restored all states" in caplog.text
    reference = final_state(straight)
    assert any(k.startswith("net.net.") for k in reference["params"])  # the UNet inside the EnergyHead
    assert_same(reference, final_state(split))
    assert not torch.equal(reference["params"]["net.net.conv_out.weight"], torch.zeros_like(
        reference["params"]["net.net.conv_out.weight"]))  # it trained
