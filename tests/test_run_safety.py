"""Nothing lost, nothing silent: resume applies or refuses every change, one writer per run directory,
the metrics history and every launch's config kept, one clear line per user error."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = ["--config", "ddpm_toy2d", "--model.init_args.timesteps=10", "--trainer.enable_progress_bar=false",
       "--trainer.log_every_n_steps=1", "--trainer.logger.init_args.save_dir=runs",
       "--trainer.logger.init_args.version=run1"]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _metric_steps(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """3 steps of ddpm_toy2d (T=10) into runs/ddpm_toy2d/run1, with a metrics row per step."""
    cwd = tmp_path_factory.mktemp("resume")
    run_cli("fit", *TOY, "--trainer.max_steps=3", cwd=cwd)
    return cwd, cwd / "runs" / "ddpm_toy2d" / "run1"


def test_resume_refuses_changes_the_weights_cannot_take(first_run):
    cwd, run = first_run
    before = _ckpt(run)["global_step"]
    proc = run_cli("fit", *TOY, "--trainer.max_steps=6", f"--ckpt_path={run}/checkpoints/last.ckpt",
                   "--model.init_args.net.init_args.hidden=64", "--model.init_args.parameterization=x0",
                   cwd=cwd, check=False)
    assert proc.returncode == 1
    err = proc.stderr
    assert "model.init_args.net.init_args.hidden: 256 in the checkpoint, 64 now" in err
    assert "model.init_args.parameterization: 'eps' in the checkpoint, 'x0' now" in err
    assert "Traceback" not in err
    # refused before training: the checkpoint, the config and the metrics are as the first run left them
    assert _ckpt(run)["global_step"] == before == 3
    assert not (run / "config-2.yaml").exists()
    assert _metric_steps(run) == [0, 1, 2]

    # a parameterization alone (same shapes, other meaning) is refused too
    proc = run_cli("fit", *TOY, "--trainer.max_steps=6", f"--ckpt_path={run}/checkpoints/last.ckpt",
                   "--model.init_args.timesteps=20", cwd=cwd, check=False)
    assert proc.returncode == 1 and "model.init_args.timesteps: 10 in the checkpoint, 20 now" in proc.stderr


def test_resume_applies_lr_keeps_history_and_every_config(first_run):
    cwd, run = first_run
    proc = run_cli("fit", *TOY, "--trainer.max_steps=6", f"--ckpt_path={run}/checkpoints/last.ckpt",
                   "--model.init_args.lr=0.5", "--model.init_args.warmup_steps=4", cwd=cwd)
    assert "model.init_args.lr: 0.001 -> 0.5" in proc.stderr + proc.stdout
    ckpt = _ckpt(run)
    assert ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["lr"] == 0.5
    # the optimizer really ran with it: warm-up min(1, (step + 1) / 4) of the new lr at step 6
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.5) and group["initial_lr"] == 0.5
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [0.5]
    # every launch's config is kept; the new one records what ran
    first, second = (yaml.safe_load((run / name).read_text()) for name in ("config.yaml", "config-2.yaml"))
    assert first["model"]["init_args"]["lr"] == 0.001 and second["model"]["init_args"]["lr"] == 0.5
    assert second["ckpt_path"].endswith("last.ckpt")
    # the metrics history: the first launch's rows, then the resumed steps after them
    assert _metric_steps(run) == [0, 1, 2, 3, 4, 5]


def test_two_fits_into_one_directory_and_kill_9(tmp_path):
    """A running fit holds its directory: a second is refused naming it and the owner; after kill -9
    of the owner, a new fit takes the directory at once."""
    run = tmp_path / "runs" / "ddpm_toy2d" / "run1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # the owner logs no metrics row (nor reaches its first checkpoint, at step 1000): killed, it leaves
    # no run to resume, so a fresh fit may take the directory (else it is refused as a finished run)
    owner = subprocess.Popen([sys.executable, "-m", "lightning_diffusion", "fit", *TOY, "--trainer.max_steps=100000",
                              "--trainer.log_every_n_steps=1000000"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "config.yaml").is_file():
            assert owner.poll() is None, owner.stderr.read()
            assert time.time() < deadline, "the first fit did not start"
            time.sleep(0.5)
        config = (run / "config.yaml").read_bytes()
        proc = run_cli("fit", *TOY, "--trainer.max_steps=2", cwd=tmp_path, check=False)
        assert proc.returncode == 1
        assert f"run directory runs/ddpm_toy2d/run1 is in use by another fit: process {owner.pid}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert (run / "config.yaml").read_bytes() == config and not (run / "config-2.yaml").exists()
        assert owner.poll() is None  # the owner trains on
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    run_cli("fit", *TOY, "--trainer.max_steps=2", cwd=tmp_path)
    assert (run / "config-2.yaml").is_file() and _ckpt(run)["global_step"] == 2


def test_run_directory_lock_in_one_process(tmp_path):
    from lightning_diffusion.errors import RunDirectoryBusyError
    from lightning_diffusion.run_directory import RunDirectoryLock, launch_config_path

    lock = RunDirectoryLock(tmp_path / "run")
    lock.acquire()
    with pytest.raises(RunDirectoryBusyError, match=f"in use by another fit: process {os.getpid()}"):
        RunDirectoryLock(tmp_path / "run").acquire()
    lock.release()
    again = RunDirectoryLock(tmp_path / "run")
    again.acquire()  # free again
    again.release()

    assert launch_config_path(tmp_path).name == "config.yaml"
    (tmp_path / "config.yaml").write_text("a")
    (tmp_path / "config-2.yaml").write_text("b")
    assert launch_config_path(tmp_path).name == "config-3.yaml"


def test_checkpoint_partials_are_per_process(tmp_path):
    import socket

    from lightning_diffusion.callbacks.checkpoint import _remove_stale_partials

    target = str(tmp_path / "last.ckpt")
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = Path(f"{target}.partial-{host}-{os.getppid()}")
    stale = [Path(f"{target}.partial"), Path(f"{target}.partial-{host}-{dead.pid}")]
    other_host = Path(f"{target}.partial-elsewhere-{dead.pid}")
    for p in (live, other_host, *stale):
        p.write_text("x")
    _remove_stale_partials(target)
    assert live.exists() and other_host.exists() and not any(p.exists() for p in stale)


def test_explicit_linked_value_is_not_replaced(tmp_path):
    proc = run_cli("fit", "--config", "ddpm_digits", "--model.init_args.net.init_args.in_channels=3",
                   "--trainer.max_steps=1", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "--model.init_args.net.init_args.in_channels=3, but the data have data.num_channels=1" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_one_line_errors_and_no_args_warning(tmp_path):
    bad = tmp_path / "random-bytes.ckpt"
    bad.write_bytes(os.urandom(4096))
    proc = run_cli("fit", *TOY, f"--ckpt_path={bad}", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert lines == [l for l in lines if l.startswith("lightning-diffusion fit: error:")] and len(lines) == 1
    assert f"{bad} is not a PyTorch/Lightning checkpoint" in lines[0]
    assert "Traceback" not in proc.stderr
    debug = run_cli("fit", *TOY, f"--ckpt_path={bad}", "--debug", cwd=tmp_path, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr

    proc = run_cli("fit", *TOY, "--trainer.max_steps=1", cwd=tmp_path)
    assert "args parameter is intended" not in proc.stderr + proc.stdout
