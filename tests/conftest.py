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


@pytest.fixture
def fake_slurm_job(tmp_path, monkeypatch) -> Path:
    """This process as task 0 of a one-task SLURM job (job 77; no other SLURM_ variable) with a fake
    ``scontrol`` on PATH that appends its arguments to the returned file."""
    calls = tmp_path / "scontrol.calls"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in dict(SLURM_JOB_ID="77", SLURM_JOB_NAME="t", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                           SLURM_NNODES="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                           SLURM_NODELIST="localhost").items():
        monkeypatch.setenv(key, value)
    return calls


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of small-tensor tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): OpenMP spin-waiting on a busy shared CPU costs more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# what a process that aborts at its end prints: std::terminate (e.g. a gloo thread unwound during the
# interpreter's exit, see lightning_diffusion/distributed.py) and faulthandler's report of the SIGABRT
ABORT_MARKERS = ("terminate called", "Fatal Python error")


def assert_ended_cleanly(returncode: int, output: str, what: str) -> None:
    """``what`` (a process, or a launcher and the ranks it started, whose output this is) exited 0
    and no process in it aborted."""
    aborted = [m for m in ABORT_MARKERS if m in output]
    assert returncode == 0 and not aborted, f"{what} failed ({returncode}; {aborted or 'no abort'}):\n{output[-4000:]}"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = True,
            separate_process: bool = False) -> subprocess.CompletedProcess:
    """Run ``lightning-diffusion ARGS`` as a user would; return the finished process (its
    returncode, stdout and stderr).

    By default the command runs in this process (``cli.main``, with stdout, stderr and Lightning's
    log captured, and SystemExit turned into the return code): a separate Python pays ~8 s of
    imports per call, which the suite's 10-minute budget cannot afford for every invocation.
    ``separate_process=True`` runs ``python -m lightning_diffusion`` in a child process."""
    env = {"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    if separate_process:
        proc = subprocess.run([sys.executable, "-m", "lightning_diffusion", *args], cwd=cwd or ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    else:
        proc = _run_cli_here(list(args), cwd or ROOT, env)
    if check and proc.returncode != 0:
        raise AssertionError(f"lightning-diffusion {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def fit_run(root: Path, config: str, *overrides: str) -> Path:
    """``lightning-diffusion fit --config configs/CONFIG.yaml OVERRIDES`` (in this process) logging into
    ``root/CONFIG/v``; returns that run directory (its checkpoint: ``checkpoints/last.ckpt``)."""
    run_cli("fit", "--config", f"configs/{config}.yaml", *overrides, f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.logger.init_args.version=v")
    return Path(root) / config / "v"


def _run_cli_here(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import logging
    import traceback

    from lightning_diffusion.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning_diffusion")]
    saved_env = {k: os.environ.get(k) for k in env}
    old_cwd = os.getcwd()
    code = 0
    try:
        os.environ.update(env)
        os.chdir(cwd)
        for logger in loggers:
            logger.addHandler(handler)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if not isinstance(exit_.code, (int, type(None))):
                    print(exit_.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - a child process would print the traceback and exit 1
                traceback.print_exc()
                code = 1
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        os.chdir(old_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["lightning-diffusion", *args], code, out.getvalue(), err.getvalue())
