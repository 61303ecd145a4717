"""`lightning-diffusion sample` and `evaluate` on a checkpoint from `fit`, as a user runs them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fit_run, run_cli

# T = 50: the config's callbacks sample with 25 DDIM steps and score a 50-step respaced bound, which
# must fit in T (checked before training)
TINY = ["--trainer.max_steps=4", "--model.init_args.timesteps=50", "--data.init_args.batches_per_epoch=2",
        "--data.init_args.num_workers=0", "--trainer.check_val_every_n_epoch=1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    return fit_run(root, "ddpm_digits", *TINY) / "checkpoints" / "last.ckpt"


def test_sample_writes_pngs_grid_and_npz_with_ema_weights(ckpt, tmp_path):
    out = tmp_path / "s"
    proc = run_cli("sample", f"--ckpt_path={ckpt}", "--num=12", f"--out={out}", "--sampler=ddim", "--steps=5",
                   "--batch_size=5")
    assert "Wrote 12 samples (ema weights" in proc.stdout
    assert len(list((out / "images").glob("*.png"))) == 12
    assert Image.open(out / "images" / "000000.png").size == (8, 8)
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (12, 8, 8, 1) and data["images"].dtype == np.uint8
    assert (out / "grid.png").is_file()
    # what `sample` loads: the checkpoint's EMA averages, not its raw weights
    from lightning_diffusion.callbacks.ema import ema_state_from_checkpoint
    from lightning_diffusion.commands import load_model

    ema_model, state, used = load_model(ckpt)
    raw_model, _, used_raw = load_model(ckpt, weights="raw")
    assert (used, used_raw) == ("ema", "raw")
    shadow = ema_state_from_checkpoint(state)
    for name, p in ema_model.named_parameters():
        assert torch.equal(p, shadow[name]) and torch.equal(dict(raw_model.named_parameters())[name],
                                                             state["state_dict"][name])
    assert any(not torch.equal(shadow[n], state["state_dict"][n]) for n in shadow)


def test_evaluate_samples_with_the_models_own_default_not_the_callbacks_preview(ckpt, tmp_path):
    """Without --sample_options, evaluate scores the model's own sampler (the paper's: ancestral over
    all T = 50 steps), not the fast one the training callbacks preview with (DPM-Solver++, 19 NFE here)."""
    out = tmp_path / "eval.json"
    run_cli("evaluate", f"--ckpt_path={ckpt}", "--metrics=fid", "--split=test", "--num_samples=10",
            "--batch_size=10", f"--out={out}")
    result = json.loads(out.read_text())
    assert result["sample_options"] == {} and result["sample_nfe"] == 50


def test_evaluate_prints_a_table_and_writes_json(ckpt, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli("evaluate", f"--ckpt_path={ckpt}", "--metrics=fid,bpd", "--split=test", "--num_samples=40",
                   "--sample_options={sampler: ddim, steps: 5}", "--bpd_options={steps: 5}", "--num_batches=1",
                   "--batch_size=64", f"--out={out}")
    assert "| fid |" in proc.stdout and "| bpd_vlb-respaced-5 |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["weights"] == "ema" and result["extractor"] == "digits" and result["global_step"] == 4
    assert result["fid_num_samples"] == 40 and result["fid"] > 0
    assert result["sample_options"] == {"sampler": "ddim", "steps": 5} and result["sample_nfe"] == 5
    assert result["bpd_num_samples"] == 64 and 0 < result["bpd"] < 30
    bad = run_cli("evaluate", f"--ckpt_path={ckpt}", "--metrics=fid,nll", check=False)
    assert bad.returncode != 0 and "unknown ['nll']" in bad.stderr
    missing = run_cli("sample", f"--ckpt_path={tmp_path}/nope.ckpt", check=False)
    assert missing.returncode != 0 and "nope.ckpt does not exist" in missing.stderr
    assert torch.load(ckpt, weights_only=False)["callbacks"]  # EMA state is in the checkpoint
