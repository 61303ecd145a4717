"""SLURM: ``slurm/train.sbatch`` on the one-machine cluster of ``slurm/local_cluster.sh`` (a 2-task DDP
job; SIGUSR1 -> hpc checkpoint -> requeue -> resume with the same W&B run); on its two-node cluster
(``--nodes 2``: each slurmd a host of its own in a network namespace, a 2-node x 1-task DDP job whose
all-reduce crosses between them, requeued and resumed on both); and the two-node environment path
through SLURM's variables (2 processes on this machine as 2 nodes x 1 task, no SLURM).

The cluster tests need Debian's ``slurm-wlm`` and ``munge`` and root (slurmd); the two-node cluster
also network namespaces, veth and a bridge (``ip``, ``nsenter``). Without them they are skipped with
the reason (CI installs them: ``.ci/run``). The test through SLURM's variables needs none of it.
"""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tiny import tiny_trainer
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


@dataclass
class Cluster:
    """A running local cluster: its state directory and the environment of client commands and jobs."""

    state: Path
    env: dict[str, str]

    def client(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) where it reaches slurmctld: through
        ``local_cluster.sh exec`` (the head node's namespace on the multi-node cluster)."""
        return subprocess.run([str(SCRIPT), "exec", str(self.state), "--", *args], env=self.env,
                              capture_output=True, text=True, **kwargs)


def _start_cluster(state: Path, *options: str, **env_vars: str):
    """Start a local cluster of its own in ``state``; yield it; stop it (and remove whatever it made)
    afterwards, also when starting failed."""
    # not WANDB_SERVICE either: set where this pytest process itself ran W&B (the in-process CLI tests),
    # it would make the jobs' ranks share that service, which then refuses the requeued job's run id
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LD_SLURM_")) and k not in ("WANDB_SERVICE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline",
               LD_COMMAND=f"{sys.executable} -m lightning_diffusion",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests" / "scripts"), env.get("PYTHONPATH")])),
               **env_vars)
    try:
        proc = subprocess.run([str(SCRIPT), *options, "start", str(state)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"local_cluster.sh {' '.join(options)} start failed:\n{proc.stdout}\n{proc.stderr}"
        yield Cluster(state, env)
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node local cluster of its own (own state directory and ports), stopped after the module."""
    yield from _start_cluster(tmp_path_factory.mktemp("slurm"), LD_SLURM_PORT=str(_free_port_pair()))


def _netns_missing() -> str | None:
    """Why this machine cannot make the two-node cluster's network (None when it can): ``ip`` and
    ``nsenter``, and a network namespace with a bridge and a veth pair in it, tried out."""
    missing = [b for b in ("ip", "nsenter") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} missing (apt-get install -y iproute2 util-linux): the two-node cluster needs them"
    probe = f"ldprobe{os.getpid()}"
    steps = [["ip", "netns", "add", probe], ["ip", "-n", probe, "link", "add", "br0", "type", "bridge"],
             ["ip", "-n", probe, "link", "add", "va", "type", "veth", "peer", "name", "vb"]]
    try:
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                return (f"no network namespaces for the two-node cluster: `{' '.join(step)}` failed: "
                        f"{proc.stderr.strip()}")
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


# the two-node cluster's namespaces (own prefix per test process) and its nodes' addresses
NETNS = f"ldt{os.getpid()}"
SUBNET = "10.15.0"


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """A two-node local cluster of its own: node1 and node2, each a slurmd in a network namespace of
    its own (NETNS-n1, NETNS-n2, joined by a bridge in NETNS-br), slurmctld on node1; stopped, and
    its namespaces removed, after the module."""
    reason = _netns_missing()
    if reason:
        pytest.skip(reason)
    yield from _start_cluster(tmp_path_factory.mktemp("slurm2"), "--nodes", "2", LD_SLURM_NETNS=NETNS,
                              LD_SLURM_SUBNET=SUBNET)


def _sbatch(cluster: Cluster, run_dir: Path, *overrides: str, nodes: int = 1, tasks_per_node: int = 2) -> str:
    """Submit the template as a CPU job of ``nodes`` x ``tasks_per_node`` tasks (``--gres=none``
    drops its GPU request)."""
    proc = cluster.client(
        "sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1",
        "--gres=none", "--time=00:10:00", f"--output={run_dir / 'slurm.out'}", str(TEMPLATE), str(CONFIG),
        str(run_dir), *TINY, *overrides, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def _job(cluster: Cluster, job_id: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", cluster.client("scontrol", "-o", "show", "job", job_id).stdout))


def _log(run_dir: Path) -> str:
    path = run_dir / "slurm.out"
    return path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else ""


def _fail(cluster: Cluster, job_id: str, run_dir: Path, why: str):
    cluster.client("scancel", job_id)
    pytest.fail(f"job {job_id}: {why}\n{_job(cluster, job_id)}\n--- log tail ---\n{_log(run_dir)[-6000:]}")


def _wait_until_done(cluster: Cluster, job_id: str, run_dir: Path, timeout: float) -> dict[str, str]:
    """Poll until the job has ended. A requeued batch job waits for its begin time (cred_expire + 1
    s after the requeue; 11 s on the local cluster, 121 s by SLURM's default): move it to now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(cluster, job_id)
        state = job.get("JobState", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            return job
        if state == "PENDING" and job.get("Reason") == "BeginTime":
            cluster.client("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        elif state == "PENDING" and job.get("Reason") not in ("None", "Priority", "Resources"):
            _fail(cluster, job_id, run_dir, f"pending for reason {job.get('Reason')}")
        time.sleep(0.5)
    _fail(cluster, job_id, run_dir, f"not done after {timeout} s")


def _signal_after_first_epoch(cluster: Cluster, job_id: str, run_dir: Path) -> None:
    """SIGUSR1 to the job's tasks once its first epoch (10 steps) is done, well before the last: to the
    tasks of the job's steps (srun's python processes), not the batch shell, as --signal=SIGUSR1@90."""
    deadline = time.monotonic() + 180
    while "Epoch 1:" not in _log(run_dir):
        if time.monotonic() > deadline or _job(cluster, job_id).get("JobState") not in ("PENDING", "RUNNING"):
            _fail(cluster, job_id, run_dir, "training did not reach its second epoch")
        time.sleep(0.25)
    proc = cluster.client("scancel", "--signal=USR1", job_id, timeout=30)
    assert proc.returncode == 0, f"scancel --signal=USR1 {job_id} failed: {proc.stderr}"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_requeued_and_resumed(job: dict[str, str], log: str, run_dir: Path, max_steps: int) -> Path:
    """The 2-task job signalled by ``_signal_after_first_epoch`` completed after one requeue, the
    SIGTERM that ended its first run and a resume; the hpc checkpoint it resumed from."""
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-6000:]
    # srun started both tasks, in both runs; Lightning took its ranks from SLURM, auto-requeue armed
    assert log.count("GLOBAL_RANK: 0, MEMBER: 1/2") == 2 and log.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2
    assert log.count("SLURM auto-requeueing enabled") == 4
    # the hpc checkpoint was written mid-run, the job requeued (same id, run twice) and resumed from it
    first = run_dir / "hpc_ckpt_1.ckpt"
    assert first.is_file() and 10 <= _load(first)["global_step"] < max_steps
    assert "SlurmRequeue: requeue signal received" in log and "Handling auto-requeue signal" in log
    assert "DUE TO JOB REQUEUE" in log
    assert job["Restarts"] == "1" and "restart 0" in log and "restart 1" in log
    # SLURM ends the requeued job's first run with SIGTERM through srun (KillWait=3 s before SIGKILL):
    # StopOnSignal stops every task at the same step end, writes last.ckpt there and links it as
    # hpc_ckpt_2.ckpt, which the requeued job resumes (observed: hpc_ckpt_1 at step 21, stop at 22)
    hpc = run_dir / "hpc_ckpt_2.ckpt"
    stops = re.findall(r"lightning-diffusion fit: stopped by SIGTERM at step (\d+); saved (\S+) \(and as (\S+),", log)
    assert len(stops) == 1 and stops[0][2] == str(hpc), log[-6000:]  # rank zero's one line
    step = int(stops[0][0])
    assert _load(first)["global_step"] <= step == _load(hpc)["global_step"] < max_steps, log[-6000:]
    assert not (run_dir / "hpc_ckpt_3.ckpt").exists()
    assert f"Restored all states from the checkpoint at {hpc}" in log
    return hpc


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
    _signal_after_first_epoch(cluster, job_id, tmp_path)
    job = _wait_until_done(cluster, job_id, tmp_path, timeout=300)
    log = _log(tmp_path)
    hpc = _assert_requeued_and_resumed(job, log, tmp_path, max_steps)

    # the W&B run continued: its id is in both checkpoints, names the checkpoint folder (the resumed
    # logger had it before wandb.init) and both offline run folders
    run_id = _load(hpc)["wandb_run_id"]
    last = _load(tmp_path / "lightning_logs" / run_id / "checkpoints" / "last.ckpt")
    assert last["global_step"] == max_steps and last["wandb_run_id"] == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs
    assert f"Resuming W&B run {run_id}" in log


def _sent_bytes(namespace: str) -> int:
    """Bytes sent so far over interface ld0 of a node's namespace (its only way to the other node)."""
    proc = subprocess.run(["ip", "-n", namespace, "-s", "-j", "link", "show", "ld0"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, f"ip -n {namespace} -s link show ld0 failed: {proc.stderr}"
    return json.loads(proc.stdout)[0]["stats64"]["tx"]["bytes"]


@needs_cluster
def test_two_host_ddp_job_all_reduces_across_hosts_is_requeued_and_resumes_on_both(two_hosts, tmp_path):
    """A 2-node x 1-task job on the two-node cluster: rank 0 on node1, rank 1 on node2, each in its own
    network namespace, so DDP (gloo) can only talk over the nodes' network; MASTER_ADDR is node1's
    address from the cluster's configuration. SIGUSR1 mid-run: hpc checkpoint, requeue, and both ranks
    resume from it (on both nodes again) to max_steps with identical parameters."""
    max_steps = 40
    sent_before = _sent_bytes(f"{NETNS}-n2")
    job_id = _sbatch(two_hosts, tmp_path, f"--trainer.max_steps={max_steps}", "--data.init_args.batches_per_epoch=10",
                     "--trainer.callbacks+=slurm_ranks.RankReport", f"--trainer.callbacks.out={tmp_path / 'ranks'}",
                     nodes=2, tasks_per_node=1)
    _signal_after_first_epoch(two_hosts, job_id, tmp_path)
    job = _wait_until_done(two_hosts, job_id, tmp_path, timeout=300)
    log = _log(tmp_path)
    _assert_requeued_and_resumed(job, log, tmp_path, max_steps)
    assert job["NodeList"] == "node[1-2]" and job["NumNodes"] == "2", job
    assert_ended_cleanly(0, log, f"job {job_id}")
    # in both runs the main address was node1's NodeAddr (train.sbatch prints it)
    assert log.count(f"main address {SUBNET}.1") == 2, log[-6000:]

    # the resumed run's ranks (restart 1): one per node, each in its node's namespace (not this
    # process's), the world of both; both at max_steps with the same parameters
    reports = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    own_netns = os.readlink("/proc/self/ns/net")
    for rank, report in enumerate(reports):
        assert report["environment"] == "SLURMEnvironment" and report["restart_count"] == 1, report
        assert (report["world_size"], report["dist_world_size"], report["num_nodes"]) == (2, 2, 2), report
        assert (report["global_rank"], report["dist_rank"], report["node_rank"], report["local_rank"]) == \
            (rank, rank, rank, 0), report
        assert report["slurm_node"] == f"node{rank + 1}" and report["main_address"] == f"{SUBNET}.1", report
        assert report["global_step"] == max_steps, report
    netns = {r["netns"] for r in reports}
    assert len(netns) == 2 and own_netns not in netns, f"ranks' network namespaces {netns}, this process's {own_netns}"
    assert reports[0]["params"] == reports[1]["params"], "the ranks ended with different parameters"

    # the gradient all-reduce crossed between the hosts: node2 sent at least one gradient's worth of
    # bytes per step over its interface (a 2-rank all-reduce sends about the whole gradient)
    last = _load(tmp_path / "ddpm_toy2d" / f"slurm-{job_id}" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == max_steps
    grad_bytes = sum(v.numel() * v.element_size() for k, v in last["state_dict"].items() if k.startswith("net."))
    sent = _sent_bytes(f"{NETNS}-n2") - sent_before
    assert sent >= max_steps * grad_bytes, f"node2 sent {sent} bytes, less than {max_steps} x {grad_bytes} (gradient)"


def two_node_ranks(tmp_path: Path, port: int, timeout: float = 240, *extra: str,
                   **env_vars: str) -> list[tuple[int, str]]:
    """Run the CLI as the 2 ranks of a 2-node x 1-task job, with the SLURM variables srun sets (no
    SLURM itself), on this machine: (exit status, output) of each rank. A few DDP steps of the toy
    config; ``extra`` options and ``env_vars`` (e.g. ``SLURM_RESTART_COUNT``) added."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("MASTER_ADDR", "MASTER_PORT", "WANDB_SERVICE")}
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", MASTER_PORT=str(port),
                PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "scripts"), base.get("PYTHONPATH", "")]),
                SLURM_JOB_ID="4242", SLURM_JOB_NAME="ld-two-nodes", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
                SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="localhost,localhost",
                SLURM_JOB_NODELIST="localhost,localhost", SLURM_CPUS_PER_TASK="1", **env_vars)
    args = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(CONFIG), *TINY,
            "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.callbacks+=slurm_ranks.RankReport", f"--trainer.callbacks.out={tmp_path / 'ranks'}", *extra]
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


def test_finished_slurm_run_is_refused_on_every_rank_and_a_requeue_without_hpc_resumes(tmp_path):
    """The job of the test above launched again into its finished slurm-4242 directory: refused on
    rank zero, and rank one (started by SLURM, waiting for rank zero) fails with it instead of
    hanging; nothing written. The same job requeued (SLURM_RESTART_COUNT=1) without an hpc checkpoint
    (a node failure) resumes the run's last.ckpt in that directory."""
    run = tmp_path / "ddpm_toy2d" / "slurm-4242"
    log = "--trainer.log_every_n_steps=1"
    for rank, (code, out) in enumerate(two_node_ranks(tmp_path, _free_port_pair(), 240, log)):
        assert_ended_cleanly(code, out, f"rank {rank}")
    metrics = (run / "metrics.csv").read_bytes()

    again = two_node_ranks(tmp_path, _free_port_pair(), 120, log)
    for rank, (code, out) in enumerate(again):
        assert code == 1, f"rank {rank} ({code}):\n{out.split('Extension modules')[0][-6000:]}"
        assert f"error: run directory {run} already holds a run (checkpoints/last.ckpt, metrics.csv)" in out, out[-3000:]
    assert (run / "metrics.csv").read_bytes() == metrics and not (run / "config-2.yaml").exists()

    requeued = two_node_ranks(tmp_path, _free_port_pair(), 240, log, "--trainer.max_steps=5", SLURM_RESTART_COUNT="1")
    for rank, (code, out) in enumerate(requeued):
        assert_ended_cleanly(code, out, f"requeued rank {rank}")
    assert f"--ckpt_path last: resuming from {run / 'checkpoints' / 'last.ckpt'} (step 3)" in requeued[0][1]
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == 5
    with open(run / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == [0, 1, 2, 3, 4], steps


def test_slurm_requeue_defers_the_signal_to_the_step_end(tmp_path, monkeypatch, fake_slurm_job):
    """SIGUSR1 in the middle of a training step only marks it; at the step's end the hpc checkpoint
    is written (at that step) and `scontrol requeue JOBID` called, once; training goes on. A second
    SIGUSR1 after that (the same event reaching a task late, as on another node) writes no second
    checkpoint and requeues nothing more."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from torch import nn

    from lightning_diffusion.callbacks import SlurmRequeue

    calls = fake_slurm_job  # what the fake scontrol was called with

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
            if self.global_step == 5:
                os.kill(os.getpid(), signal.SIGUSR1)  # after the requeue was done: ignored
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=2)
    model = Tiny()
    trainer = tiny_trainer(max_steps=6, devices=1, default_root_dir=tmp_path, plugins=[SLURMEnvironment()],
                           callbacks=[SlurmRequeue()])
    before = signal.getsignal(signal.SIGUSR1)
    trainer.fit(model, data)
    assert model.handled_in_step == [False]
    assert _load(tmp_path / "hpc_ckpt_1.ckpt")["global_step"] == 4 and trainer.global_step == 6
    assert calls.read_text().split("\n")[:-1] == ["requeue 77"]
    assert not (tmp_path / "hpc_ckpt_2.ckpt").exists() and signal.getsignal(signal.SIGUSR1) == before

