import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Embedded datasets are built once per test session into a temporary $LD_DATA."""
    path = tmp_path_factory.mktemp("ld_data")
    os.environ["LD_DATA"] = str(path)
    return path


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode with its files in the test's ``tmp_path``; the run is finished after the
    test (an open run would be reused by the next WandbLogger)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    yield
    import wandb

    wandb.finish()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of small-tensor tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): OpenMP spin-waiting on a busy shared CPU costs more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m lightning_diffusion ARGS`` as a user would; return the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "lightning_diffusion", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lightning-diffusion {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
