"""SLURM: ``slurm/train.sbatch`` on the one-machine cluster of ``slurm/local_cluster.sh`` (a 2-task DDP
job; SIGUSR1 -> hpc checkpoint -> requeue -> resume with the same W&B run), and the two-node
environment path through SLURM's variables (2 processes on this machine as 2 nodes x 1 task).

The cluster tests need Debian's ``slurm-wlm`` and ``munge`` and root (slurmd); without them they are
skipped with the reason (CI installs them: ``.ci/run``). The two-node test needs neither.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_ended_cleanly

SCRIPT = ROOT / "slurm" / "local_cluster.sh"
TEMPLATE = ROOT / "slurm" / "train.sbatch"
CONFIG = ROOT / "configs" / "ddpm_toy2d.yaml"
# a tiny, fast run of the toy config on 2 CPU processes (gloo)
TINY = ["--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--model.init_args.net.init_args.hidden=32",
        "--model.init_args.timesteps=20", "--data.init_args.num_workers=0", "--data.init_args.batch_size=64",
        "--trainer.limit_val_batches=0", "--trainer.callbacks.num_samples=200"]  # (the last: SampleGrid's)

_BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel", "srun")
_MISSING = [b for b in _BINARIES if shutil.which(b) is None]
needs_cluster = pytest.mark.skipif(
    bool(_MISSING) or os.geteuid() != 0,
    reason=(f"SLURM binaries missing ({', '.join(_MISSING)}): apt-get install -y slurm-wlm munge" if _MISSING
            else "starting slurmd for the local SLURM cluster needs root"))


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local cluster of its own (own state directory and ports), stopped after the module.
    Yields the environment for client commands and jobs."""
    state = tmp_path_factory.mktemp("slurm")
    # not WANDB_SERVICE either: set where this pytest process itself ran W&B (the in-process CLI tests),
    # it would make the jobs' ranks share that service, which then refuses the requeued job's run id
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "WANDB_SERVICE"}
    env.update(LD_SLURM_PORT=str(_free_port_pair()), SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", WANDB_MODE="offline", LD_COMMAND=f"{sys.executable} -m lightning_diffusion")
    proc = subprocess.run([str(SCRIPT), "start", str(state)], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert proc.returncode == 0, f"local_cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
        yield env
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], env=env, capture_output=True, timeout=60)


def _sbatch(env, run_dir: Path, *overrides: str) -> str:
    """Submit the template as a 1-node, 2-task CPU job (``--gres=none`` drops its GPU request)."""
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none",
         "--time=00:10:00", f"--output={run_dir / 'slurm.out'}", str(TEMPLATE), str(CONFIG), str(run_dir),
         *TINY, *overrides], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def _job(env, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _log(run_dir: Path) -> str:
    path = run_dir / "slurm.out"
    return path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else ""


def _fail(env, job_id: str, run_dir: Path, why: str):
    subprocess.run(["scancel", job_id], env=env, capture_output=True)
    pytest.fail(f"job {job_id}: {why}\n{_job(env, job_id)}\n--- log tail ---\n{_log(run_dir)[-6000:]}")


def _wait_until_done(env, job_id: str, run_dir: Path, timeout: float) -> dict[str, str]:
    """Poll until the job has ended. A requeued batch job waits for its begin time (cred_expire + 1
    s after the requeue; 11 s on the local cluster, 121 s by SLURM's default): move it to now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(env, job_id)
        state = job.get("JobState", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            return job
        if state == "PENDING" and job.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, capture_output=True)
        elif state == "PENDING" and job.get("Reason") not in ("None", "Priority", "Resources"):
            _fail(env, job_id, run_dir, f"pending for reason {job.get('Reason')}")
        time.sleep(0.5)
    _fail(env, job_id, run_dir, f"not done after {timeout} s")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@needs_cluster
def test_sbatch_ddp_job_trains_is_signalled_requeued_and_finishes_in_the_same_wandb_run(cluster, tmp_path):
    """(a) an sbatch'ed 2-task DDP job trains and finishes; (b) SIGUSR1 mid-run writes an hpc
    checkpoint and requeues it, and the job resumes from it to max_steps in the same W&B run.
    One job checks both: the suite's time budget has no room for a second one."""
    max_steps = 40
    job_id = _sbatch(cluster, tmp_path, f"--trainer.max_steps={max_steps}", "--data.init_args.batches_per_epoch=10",
                     "--trainer.logger=WandbLogger", "--trainer.logger.init_args.offline=true",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.callbacks+=WandbSamples",
                     "--trainer.callbacks.every_n_epochs=100", "--trainer.callbacks.num_samples=16")
    # signal once the first epoch (10 steps) is done, well before the last
    deadline = time.monotonic() + 180
    while "Epoch 1:" not in _log(tmp_path):
        if time.monotonic() > deadline or _job(cluster, job_id).get("JobState") not in ("PENDING", "RUNNING"):
            _fail(cluster, job_id, tmp_path, "training did not reach its second epoch")
        time.sleep(0.25)
    # to the tasks of the job's steps (srun's python processes), not the batch shell: as --signal=SIGUSR1@90
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster, check=True, timeout=30)
    job = _wait_until_done(cluster, job_id, tmp_path, timeout=300)
    log = _log(tmp_path)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-6000:]
    # srun started both tasks, in both runs; Lightning took its ranks from SLURM, auto-requeue armed
    assert log.count("GLOBAL_RANK: 0, MEMBER: 1/2") == 2 and log.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2
    assert log.count("SLURM auto-requeueing enabled") == 4

    # the hpc checkpoint was written mid-run, the job requeued (same id, run twice) and resumed from it
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and 10 <= _load(hpc)["global_step"] < max_steps
    assert "SlurmRequeue: requeue signal received" in log and "Handling auto-requeue signal" in log
    assert "DUE TO JOB REQUEUE" in log
    assert job["Restarts"] == "1" and "restart 0" in log and "restart 1" in log
    assert f"Restored all states from the checkpoint at {hpc}" in log

    # the W&B run continued: its id is in both checkpoints, names the checkpoint folder (the resumed
    # logger had it before wandb.init) and both offline run folders
    run_id = _load(hpc)["wandb_run_id"]
    last = _load(tmp_path / "lightning_logs" / run_id / "checkpoints" / "last.ckpt")
    assert last["global_step"] == max_steps and last["wandb_run_id"] == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs
    assert f"Resuming W&B run {run_id}" in log


def two_node_ranks(tmp_path: Path, port: int, timeout: float = 240) -> list[tuple[int, str]]:
    """Run the CLI as the 2 ranks of a 2-node x 1-task job, with the SLURM variables srun sets (no
    SLURM itself), on this machine: (exit status, output) of each rank. A few DDP steps of the toy config."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT", "WANDB_SERVICE")}
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", MASTER_PORT=str(port),
                PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "scripts"), base.get("PYTHONPATH", "")]),
                SLURM_JOB_ID="4242", SLURM_JOB_NAME="ld-two-nodes", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
                SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="localhost,localhost",
                SLURM_JOB_NODELIST="localhost,localhost", SLURM_CPUS_PER_TASK="1")
    args = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(CONFIG), *TINY,
            "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.callbacks+=slurm_ranks.RankReport", f"--trainer.callbacks.out={tmp_path / 'ranks'}"]
    procs = []
    for rank in range(2):  # one task per node: global rank = node rank
        env = {**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank)}
        procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def test_two_node_environment_from_slurm_variables(tmp_path):
    """Two processes on this machine with the SLURM variables srun sets for a 2-node x 1-task job:
    Lightning's SLURMEnvironment places them (world size 2, node ranks 0/1, global ranks 0/1), the CLI
    trains a few DDP steps, every rank ends with the same parameters and exits 0 without an abort."""
    port = _free_port_pair()
    for rank, (code, out) in enumerate(two_node_ranks(tmp_path, port)):
        assert_ended_cleanly(code, out, f"rank {rank}")

    reports = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert report["environment"] == "SLURMEnvironment"
        assert (report["world_size"], report["dist_world_size"], report["num_nodes"]) == (2, 2, 2)
        assert (report["global_rank"], report["dist_rank"]) == (rank, rank)
        assert (report["node_rank"], report["local_rank"]) == (rank, 0)
        assert (report["main_address"], report["main_port"]) == ("localhost", port)
        assert report["global_step"] == 3
        assert report["log_dir"] == str(tmp_path / "ddpm_toy2d" / "slurm-4242")
    assert len({r["params"] for r in reports}) == 1, "ranks ended with different parameters"
    assert _load(tmp_path / "ddpm_toy2d" / "slurm-4242" / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_slurm_requeue_defers_the_signal_to_the_step_end(tmp_path, monkeypatch):
    """SIGUSR1 in the middle of a training step only marks it; at the step's end the hpc checkpoint
    is written (at that step) and `scontrol requeue JOBID` called, once; training goes on."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from torch import nn

    from lightning_diffusion.callbacks import SlurmRequeue

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

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)
            self.handled_in_step: list[bool] = []

        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # arrives inside the step: only noted
                time.sleep(0.05)
                self.handled_in_step.append((tmp_path / "hpc_ckpt_1.ckpt").exists())
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=2)
    model = Tiny()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[SLURMEnvironment()], callbacks=[SlurmRequeue()])
    before = signal.getsignal(signal.SIGUSR1)
    trainer.fit(model, data)
    assert model.handled_in_step == [False]
    assert _load(tmp_path / "hpc_ckpt_1.ckpt")["global_step"] == 4 and trainer.global_step == 6
    assert calls.read_text().split("\n")[:-1] == ["requeue 77"]
    assert not (tmp_path / "hpc_ckpt_2.ckpt").exists() and signal.getsignal(signal.SIGUSR1) == before

