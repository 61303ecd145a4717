"""Checkpoints and cached statistics are read with ``torch.load(weights_only=True)``: a checkpoint of
``lightning-diffusion fit`` loads that way; a file that is no checkpoint is named in a clear error;
a pickled object in a checkpoint or a statistics cache is refused without being run."""

import os

import pytest
import torch

from conftest import fit_run, run_cli
from lightning_diffusion.checkpoints import load_checkpoint
from lightning_diffusion.commands import load_model

TINY = ["--trainer.max_steps=2", "--model.init_args.timesteps=20", "--data.init_args.batches_per_epoch=2",
        "--data.init_args.num_workers=0", "--trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("trusted")
    # the toy config: its checkpoint holds what every fit's does (EMA, LastCheckpoint, loops, data
    # position, RNG states, optimizer, scheduler), at a fraction of the digits config's time
    return fit_run(root, "ddpm_toy2d", *TINY) / "checkpoints" / "last.ckpt"


class Payload:
    """Unpickling this runs ``marker.mkdir()``: a refused load leaves no marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_fit_checkpoint_loads_with_weights_only(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # raises on any non-allowlisted object
    assert state["global_step"] == 2 and state["hyper_parameters"]["_class_path"] == "lightning_diffusion.DDPM"
    assert {"state_dict", "loops", "callbacks", "optimizer_states", "lr_schedulers", "rng_states"} <= set(state)
    model, loaded, used = load_model(ckpt, weights="raw")
    assert used == "raw" and loaded["global_step"] == 2
    for name, p in model.named_parameters():
        assert torch.equal(p, state["state_dict"][name])
    assert load_checkpoint(ckpt, mmap=True)["global_step"] == 2
    ema_model, _, used = load_model(ckpt)  # the EMA averages, from the callback state in the same safe load
    assert used == "ema"
    assert any(not torch.equal(p, state["state_dict"][n]) for n, p in ema_model.named_parameters())


@pytest.mark.parametrize("kind", ["random bytes", "text", "png", "empty", "zip"])
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, kind):
    import zipfile

    from PIL import Image

    path = tmp_path / f"bad-{kind.replace(' ', '_')}.ckpt"
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("model: DDPM\nsteps: 10\n")
    elif kind == "png":
        Image.new("RGB", (8, 8)).save(path, format="PNG")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not a torch archive")
    with pytest.raises(ValueError, match=rf"{path} is not a PyTorch/Lightning checkpoint \(.*\); give the \.ckpt"):
        load_model(path)


def test_sample_command_names_a_bad_checkpoint(tmp_path):
    path = tmp_path / "random.ckpt"
    path.write_bytes(os.urandom(4096))
    proc = run_cli("sample", f"--ckpt_path={path}", f"--out={tmp_path / 's'}", check=False)
    assert proc.returncode != 0
    assert f"{path} is not a PyTorch/Lightning checkpoint (not the zip archive torch.save writes)" in proc.stderr
    assert "could not find MARK" not in proc.stderr and "UnpicklingError" not in proc.stderr


def test_checkpoint_without_state_dict_or_with_a_pickled_object(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3), "step": 4}, path)
    with pytest.raises(ValueError, match=rf"{path} is not a PyTorch/Lightning checkpoint \(no 'state_dict': "
                                         r"it holds keys \['step', 'weight'\]\)"):
        load_model(path)
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ValueError, match=r"no 'state_dict': it holds a list"):
        load_model(path)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "lightning_diffusion.DDPM", "x": Payload(marker)}},
               path)
    with pytest.raises(ValueError, match=rf"{path} holds an object of class posix\.mkdir, which a safe "
                                         r"\(weights_only\) load refuses.*torch\.load\(path, weights_only=False\)"):
        load_model(path)
    assert not marker.exists()
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "os.system"}}, path)
    with pytest.raises(ValueError, match=r"_class_path 'os\.system' is not a LightningModule class"):
        load_model(path)


def test_wandb_run_id_reads_with_weights_only(tmp_path):
    from lightning_diffusion.callbacks.wandb import RUN_ID_KEY, wandb_run_id_from_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, RUN_ID_KEY: "abc123"}, path)
    assert wandb_run_id_from_checkpoint(path) == "abc123"
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, RUN_ID_KEY: Payload(marker)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        wandb_run_id_from_checkpoint(path)
    assert not marker.exists()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    with pytest.raises(ValueError, match=rf"{path} is not a PyTorch/Lightning checkpoint"):
        wandb_run_id_from_checkpoint(path)


def test_cached_statistics_load_with_weights_only(tmp_path):
    from lightning_diffusion.metrics.quality import FID, load_stats, save_stats

    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    stats = FID(4)
    stats.update(features, real=True)
    path = tmp_path / "stats" / "digits-train.pt"
    save_stats(path, stats.real_statistics(), features[:10], {"split": "train", "extractor": "points", "count": 50})
    loaded, bank, meta = load_stats(path)
    restored = FID(4)
    restored.set_real_statistics(loaded)
    mean, cov = restored.mean_cov(real=True)
    assert loaded["n"] == 50 and torch.allclose(mean, features.double().mean(0))
    assert torch.allclose(cov, torch.cov(features.double().T))
    assert torch.equal(bank, features[:10]) and meta["count"] == 50

    marker = tmp_path / "pwned"
    torch.save({"stats": stats.real_statistics(), "bank": features, "meta": Payload(marker)}, path)
    with pytest.raises(ValueError, match=rf"cached real-data statistics {path} cannot be read safely .*delete the file"):
        load_stats(path)
    assert not marker.exists()
    torch.save({"bank": features}, path)  # no 'stats'
    with pytest.raises(ValueError, match=r"cannot be read safely \(KeyError: 'stats'\); delete the file"):
        load_stats(path)
