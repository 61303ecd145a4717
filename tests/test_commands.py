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
    # grid.png: 12 samples, 3 per row, natively 28 x 37 px (8 px + 1 px padding), enlarged 14x (the smallest
    # integer factor that takes the longer side to >= 512 px) with each pixel an exact 14 x 14 block
    native = tmp_path / "native"
    run_cli("sample", f"--ckpt_path={ckpt}", "--num=12", f"--out={native}", "--sampler=ddim", "--steps=5",
            "--batch_size=5", "--min_size=0")
    small, big = np.asarray(Image.open(native / "grid.png")), np.asarray(Image.open(out / "grid.png"))
    assert small.shape[:2] == (37, 28) and big.shape[:2] == (37 * 14, 28 * 14)
    assert np.array_equal(big, small.repeat(14, axis=0).repeat(14, axis=1))
    assert np.array_equal(np.load(native / "samples.npz")["images"], data["images"])  # the native samples
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


@pytest.mark.parametrize(("command", "expected"), [
    (("sample", "--num=0"), "lightning-diffusion sample: error: --num=0: must be an integer >= 1 (the number of samples)"),
    (("sample", "--num=-1"), "lightning-diffusion sample: error: --num=-1: must be an integer >= 1"),
    (("sample", "--batch_size=0"), "lightning-diffusion sample: error: --batch_size=0: must be an integer >= 1"),
    (("evaluate", "--num_batches=-1"),
     "lightning-diffusion evaluate: error: --num_batches=-1: must be an integer >= 0 (batches scored for bpd; 0: the "
     "whole split)"),
    (("evaluate", "--num_samples=0"), "lightning-diffusion evaluate: error: --num_samples=0: must be an integer >= 1"),
    (("evaluate", "--metrics=bpd", "--bpd_options={stpes: 5}"),
     "lightning-diffusion evaluate: error: --bpd_options.stpes=5: DDPM.bits_per_dim has no option 'stpes' (did you "
     "mean steps?); its options are steps, batch_t"),
    (("evaluate", "--metrics=fid", "--sample_options={sampler: ddim, stpes: 5}"),
     "lightning-diffusion evaluate: error: --sample_options.stpes=5: the ddim sampler has no option 'stpes' (did you "
     "mean steps?)"),
    (("sample", "--steps=0"), "lightning-diffusion sample: error: --steps=0: steps must be an integer in [2, 50]"),
])
def test_bad_command_options_are_one_line(ckpt, tmp_path, command, expected):
    """torch.cat()/range() errors, a TypeError traceback, or (--num_batches -1) one batch scored in silence."""
    proc = run_cli(*command, f"--ckpt_path={ckpt}", f"--out={tmp_path / 'out'}", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(expected), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_device_cuda_without_a_gpu_says_so(ckpt, tmp_path, monkeypatch):
    """It said the checkpoint 'is not a PyTorch/Lightning checkpoint'."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    proc = run_cli("sample", f"--ckpt_path={ckpt}", "--device=cuda", f"--out={tmp_path}", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(
        "lightning-diffusion sample: error: --device='cuda': this machine has no CUDA device (torch.cuda.is_available() "
        "is False); use --device cpu (devices here: cpu"), proc.stderr[-2000:]


@pytest.mark.parametrize(("key", "class_path", "where"), [
    ("_class_path", "my_own_models.MyDDPM", "model"),
    ("net", "my_own_nets.MyUNet", "model.init_args.net"),
])
def test_a_checkpoint_class_that_cannot_be_imported_is_named(ckpt, tmp_path, key, class_path, where):
    """A run trained with a user's own module, sampled where that module is not importable: 32-200
    lines of traceback before."""
    state = torch.load(ckpt, weights_only=False)
    if key == "net":
        state["hyper_parameters"]["net"]["class_path"] = class_path
    else:
        state["hyper_parameters"][key] = class_path
    own = tmp_path / "own.ckpt"
    torch.save(state, own)
    module = class_path.split(".")[0]
    for command in ("sample", "evaluate"):
        proc = run_cli(command, f"--ckpt_path={own}", f"--out={tmp_path / 'out'}", check=False)
        assert proc.returncode == 1 and proc.stderr.startswith(
            f"lightning-diffusion {command}: error: {own}: the checkpoint's {where} class '{class_path}' cannot be "
            f"imported here (No module named '{module}'); install or import the module that defines it (add its "
            "folder to PYTHONPATH, or pip install its package)"), proc.stderr[-2000:]


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_evaluate_names_the_weights_it_used(ckpt, tmp_path, weights):
    """Likelihood printed 'raw weights' for the EMA averages that load_model had put in."""
    proc = run_cli("evaluate", f"--ckpt_path={ckpt}", "--metrics=bpd", "--bpd_options={steps: 5}", "--num_batches=1",
                   f"--weights={weights}", f"--out={tmp_path / 'eval.json'}")
    out = proc.stdout + proc.stderr
    assert f"bits/dim (vlb-respaced-5, 180 samples, {weights} weights" in out, out[-2000:]
    assert f"(step 4, {weights} weights)" in out
    assert json.loads((tmp_path / "eval.json").read_text())["weights"] == weights
