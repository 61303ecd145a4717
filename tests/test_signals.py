"""SIGTERM and SIGINT save and fail; a full disk at a checkpoint is one line (issue 21).

Through the CLI: SIGTERM mid-fit exits 143 with ``last.ckpt`` at the step it stopped at and one line
naming it, and a resume from it ends bitwise equal to an uninterrupted run; SIGINT exits 130 with a
checkpoint; a fit without LastCheckpoint still exits non-zero and says so; a fit blocked in a data
read (a ``pipe:`` shard whose command sleeps) ends within seconds of SIGTERM; under 2-process DDP a
signal that reaches the ranks at different steps stops both at the same one. A full disk while
writing a checkpoint (a real tmpfs, and an injected ENOSPC) exits 1 with one line naming the
directory, the space needed and free and the last good checkpoint, which still loads, and leaves no
partial file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from tiny import tiny_trainer
from conftest import ABORT_MARKERS, ROOT, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTS = ROOT / "tests" / "scripts"  # kill_switch.SignalAt: a signal at a known step

CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": 12, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "check_val_every_n_epoch": 2, "limit_val_batches": 1,
                "num_sanity_val_steps": 0,
                "callbacks": [{"class_path": "EMA", "init_args": {"decay": 0.99}},
                              {"class_path": "LastCheckpoint", "init_args": {"every_n_train_steps": 5}}]},
    "model": {"class_path": "DDPM", "init_args": {
        "net": {"class_path": "lightning_diffusion.MLP", "init_args": {"hidden": 32, "num_layers": 2}},
        "timesteps": 10, "lr": 1e-3, "warmup_steps": 3}},
    "data": {"class_path": "ShardDataModule", "init_args": {"dataset": "gaussians8", "batch_size": 64,
                                                            "batches_per_epoch": 4, "num_workers": 2,
                                                            "shuffle_buffer": 64}},
}


def write_config(path: Path, *, signals: list[dict] = (), checkpoint: bool = True, data: dict | None = None,
                 **trainer) -> Path:
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["trainer"].update(trainer)
    callbacks = config["trainer"]["callbacks"]
    if not checkpoint:
        callbacks.pop()
    callbacks[:0] = [{"class_path": "kill_switch.SignalAt", "init_args": s} for s in signals]
    config["data"]["init_args"].update(data or {})
    path.write_text(yaml.safe_dump(config))
    return path


def fit_args(config: Path, run: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), f"--trainer.default_root_dir={run}",
            f"--trainer.callbacks.dirpath={run}/checkpoints", *extra]


def child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def start(args: list[str], out: Path) -> subprocess.Popen:
    """``lightning-diffusion ARGS`` in a child process of its own session (so that what it leaves, a
    ``pipe:`` command, can be ended with its process group), stdout and stderr into ``out``."""
    return subprocess.Popen([sys.executable, "-m", "lightning_diffusion", *args], cwd=ROOT, env=child_env(),
                            stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def end_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started: the fit and its commands
    except ProcessLookupError:
        pass


@pytest.fixture
def in_path(monkeypatch):
    """tests/scripts importable in this process (kill_switch.SignalAt for in-process fits)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))


def stop_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("lightning-diffusion fit: stopped by")]


def state(ckpt: Path) -> dict:
    ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    return {"step": ckpt["global_step"], "params": ckpt["state_dict"], "ema": ema["shadow"],
            "adam": ckpt["optimizer_states"][0]["state"]}


def test_sigterm_saves_the_step_exits_143_and_resumes_bitwise(tmp_path, in_path):
    # SIGTERM at the start of the batch after step 6 (mid-epoch: epoch 1 after 2 of its 4 batches,
    # 2 DataLoader workers): the fit finishes that batch, saves last.ckpt at step 7, exits 143
    stopped = tmp_path / "stopped"
    log = tmp_path / "stopped.log"
    proc = start(fit_args(write_config(tmp_path / "sig.yaml", signals=[{"step": 6}], max_steps=200), stopped), log)
    try:
        straight = tmp_path / "straight"  # meanwhile, 12 steps without a signal, in this process
        run_cli(*fit_args(write_config(tmp_path / "c12.yaml"), straight))
        proc.wait(timeout=240)
    finally:
        end_group(proc)
    out = log.read_text()
    ckpt = stopped / "checkpoints" / "last.ckpt"
    assert proc.returncode == 143, out[-4000:]
    assert stop_lines(out) == [f"lightning-diffusion fit: stopped by SIGTERM at step 7; saved {ckpt}; "
                               f"resume with --ckpt_path {ckpt}"], out[-3000:]
    assert "Received SIGTERM" not in out  # Lightning's handler did not run
    assert state(ckpt)["step"] == 7
    assert not list((stopped / "checkpoints").glob("*.partial*"))

    run_cli(*fit_args(write_config(tmp_path / "c12r.yaml"), stopped, f"--ckpt_path={ckpt}"))
    a, b = state(straight / "checkpoints" / "last.ckpt"), state(ckpt)
    assert a["step"] == b["step"] == 12
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), f"parameter {key} differs"
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), f"EMA average {key} differs"
    for i in a["adam"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["adam"][i][name], b["adam"][i][name]), f"Adam {name} of {i} differs"


def test_sigint_saves_and_exits_130(tmp_path, in_path):
    run = tmp_path / "run"
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    proc = run_cli(*fit_args(write_config(tmp_path / "c.yaml", signals=[{"step": 2, "signal": "SIGINT"}],
                                          max_steps=50, data={"num_workers": 0}), run), check=False)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert stop_lines(proc.stderr) == [f"lightning-diffusion fit: stopped by SIGINT at step 3; saved {ckpt}; "
                                       f"resume with --ckpt_path {ckpt}"]
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    assert {signum: signal.getsignal(signum) for signum in before} == before  # the handlers the fit found
    with pytest.raises(KeyboardInterrupt):  # after the fit, SIGINT does here what it did before
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_a_fit_that_fails_leaves_the_signal_handlers_it_found_and_the_next_fit_takes_them(tmp_path):
    """Lightning's teardown puts back, after StopOnSignal's own restore on an error, the handlers it found
    at the fit's start (ours): that stale handler passes signals on, is not taken by the next fit for the
    user's (it chained to it: a SIGINT after the later fit then did nothing), and the CLI removes it when
    its command ends."""
    from lightning_diffusion.callbacks import StopOnSignal
    from lightning_diffusion.callbacks.signals import restore_signal_handlers
    from test_ema import Regression, loader

    class Fails(Regression):
        def validation_step(self, batch, batch_idx):
            raise FloatingPointError("diverged in the sanity check")

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    first, second = StopOnSignal(), StopOnSignal()
    for callback in (first, first, second):  # a callback object may be reused by a second fit
        trainer = tiny_trainer(max_steps=2, num_sanity_val_steps=1, callbacks=[callback])
        with pytest.raises(FloatingPointError):
            trainer.fit(Fails(), loader(), loader())
        assert signal.getsignal(signal.SIGINT) == callback._handle  # Lightning's teardown put it back
        assert callback._previous == before  # what the user had, not an ended fit's handler
    with pytest.raises(KeyboardInterrupt):  # the stale handler passes SIGINT on to the user's
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    restore_signal_handlers()
    assert {signum: signal.getsignal(signum) for signum in before} == before
    # through the CLI (in this process), an error in the sanity check leaves the handlers as they were
    proc = run_cli("fit", "--config", "configs/ebm_toy2d.yaml", "--model.init_args.step_size=1e4",
                   "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                   "--trainer.callbacks=[]", check=False)
    assert proc.returncode == 1 and "the MCMC chains diverged" in proc.stderr, proc.stderr[-2000:]
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_sigterm_without_last_checkpoint_still_fails_and_says_so(tmp_path, in_path):
    proc = run_cli("fit", "--config", str(write_config(tmp_path / "c.yaml", signals=[{"step": 2}], checkpoint=False,
                                                       max_steps=50, data={"num_workers": 0})),
                   f"--trainer.default_root_dir={tmp_path}", check=False)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert stop_lines(proc.stderr) == ["lightning-diffusion fit: stopped by SIGTERM at step 3; no checkpoint was "
                                       "written (the trainer has no LastCheckpoint callback)"]


@pytest.mark.parametrize("command, signame", [("validate", "SIGTERM"), ("test", "SIGINT")])
def test_a_signal_stops_an_evaluation_command_with_its_exit_status_not_0(tmp_path, in_path, command, signame):
    """Lightning's own handler ends validate / test on SIGTERM with SIGTERMException (exit status 0, as if
    they had finished, their metrics never logged): StopOnSignal stops them at the batch's end with
    128 + the signal number and says the metrics are incomplete; the handlers the command found come back."""
    run = tmp_path / "run"
    run_cli(*fit_args(write_config(tmp_path / "fit.yaml", data={"num_workers": 0}), run))
    ckpt = run / "checkpoints" / "last.ckpt"
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    config = write_config(tmp_path / "eval.yaml", data={"num_workers": 0, "batch_size": 8}, limit_val_batches=6,
                          limit_test_batches=6)
    evaluate = [command, "--config", str(config), f"--trainer.default_root_dir={run}", f"--ckpt_path={ckpt}"]
    straight = run_cli(*evaluate)  # without a signal: every batch, its metrics printed
    table = f"{command.capitalize()} metric"  # the metrics table Lightning prints at the end
    assert table in straight.stdout, straight.stdout[-2000:]
    proc = run_cli(*evaluate, "--trainer.callbacks+=kill_switch.EvalSignalAt", "--trainer.callbacks.batch=2",
                   f"--trainer.callbacks.signal={signame}", check=False)
    code = 143 if signame == "SIGTERM" else 130
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"lightning-diffusion {command}: stopped")]
    assert lines == [f"lightning-diffusion {command}: stopped by {signame} in {command} after 3 batches; its metrics "
                     "are incomplete and were not logged: run the command again"], proc.stderr[-3000:]
    assert table not in proc.stdout  # no metrics table of a partial evaluation
    assert "Received SIGTERM" not in proc.stdout + proc.stderr  # Lightning's handler did not run
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.fixture(scope="module")
def tiny_points(tmp_path_factory) -> Path:
    """A toy2d dataset of 200 points (160 in its one training shard)."""
    out = tmp_path_factory.mktemp("tiny") / "points"
    run_cli("shards", "toy2d", "--out", str(out), "--num_points", "200")
    return out


def test_a_fit_blocked_in_a_data_read_ends_within_seconds_of_sigterm(tmp_path, tiny_points):
    # the training shard is a command that prints the 160 samples and then neither writes nor ends:
    # after 10 batches of 16 the DataLoader's workers wait on it forever, and no step ends again
    stall = f"pipe:sh -c 'cat {tiny_points / 'train-000000.tar'}; exec sleep 1000'"
    runs = {}
    for name, grace in (("grace", 2), ("second", 60)):
        run = tmp_path / name
        stop = {"class_path": "StopOnSignal", "init_args": {"grace_seconds": grace}}
        config = write_config(tmp_path / f"{name}.yaml", max_steps=1000,
                              data={"dataset": str(tiny_points), "train": stall, "batch_size": 16,
                                    "shuffle_buffer": 16, "batches_per_epoch": 1000},
                              callbacks=[*CONFIG["trainer"]["callbacks"][:1], stop,
                                         {"class_path": "LastCheckpoint", "init_args": {"every_n_train_steps": 4}}])
        runs[name] = (run, start(fit_args(config, run), tmp_path / f"{name}.log"))
    try:
        for name, (run, proc) in runs.items():  # blocked: a checkpoint written, then no batch for 3 s
            deadline = time.monotonic() + 120
            while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
                assert time.monotonic() < deadline, f"{name}: no checkpoint in 120 s"
                time.sleep(0.2)
        time.sleep(3)
        took = {}
        for name, (run, proc) in runs.items():
            assert proc.poll() is None, f"{name} ended before the signal:\n{(tmp_path / f'{name}.log').read_text()}"
            proc.send_signal(signal.SIGTERM)  # to the main process only (not its workers, not the command)
        time.sleep(1.5)
        sent_again = time.monotonic()
        runs["second"][1].send_signal(signal.SIGTERM)  # a second SIGTERM ends a fit with a long grace
        for name, (run, proc) in runs.items():
            proc.wait(timeout=60)
            took[name] = time.monotonic() - sent_again
    finally:
        for _, proc in runs.values():
            end_group(proc)
    time.sleep(0.5)
    left = [pid for pid in _pids() if stall.split(":", 1)[1] in _cmdline(pid)]
    for pid in left:  # cleanup: the commands run in sessions of their own, which they lead
        try:
            os.killpg(pid, signal.SIGKILL) if os.getsid(pid) == pid else os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, "the stalled commands outlived the fit"
    for name, (run, proc) in runs.items():
        out = (tmp_path / f"{name}.log").read_text()
        assert proc.returncode == 143, f"{name}: {proc.returncode}\n{out[-3000:]}"
        lines = stop_lines(out)
        assert len(lines) == 1, out[-3000:]
        ckpt = run / "checkpoints" / "last.ckpt"
        step = torch.load(ckpt, weights_only=True)["global_step"]
        how = ("while waiting for data (no batch within 2 s of the signal)" if name == "grace"
               else "by a second SIGTERM")
        assert how in lines[0] and f"the last checkpoint is {ckpt} (step {step}); resume with --ckpt_path {ckpt}" \
            in lines[0], lines[0]
        assert "Traceback" not in out, out[-3000:]
    # measured: the grace run ends ~2 s after its signal (the workers are ended, not waited for 5 s
    # each), the other ~1 s after the second signal (took: since the second signal, 1.5 s after the first)
    assert took["grace"] < 8, took
    assert took["second"] < 8, took


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ranks_signalled_at_different_steps_stop_together(tmp_path, strategy):
    # 2 CPU processes (gloo), DDP or FSDP2 (ModelParallelStrategy: last.ckpt is a sharded folder).
    # Rank 1 gets SIGTERM at the start of the batch after step 3, rank 0 after step 5: both stop at
    # step 4, the step where the all-reduce first sees a signal; one checkpoint, exit 143, no hang
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", signals=[{"step": 3, "rank": 1}, {"step": 5, "rank": 0}],
                          max_steps=100, strategy=FSDP2 if strategy == "fsdp2" else "ddp", devices=2,
                          data={"num_workers": 0})
    log = tmp_path / "ddp.log"
    proc = start(fit_args(config, run), log)
    try:
        proc.wait(timeout=240)
    finally:
        end_group(proc)
    out = log.read_text()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert proc.returncode == 143, out[-4000:]
    assert stop_lines(out) == [f"lightning-diffusion fit: stopped by SIGTERM at step 4; saved {ckpt}; "
                               f"resume with --ckpt_path {ckpt}"], out[-3000:]  # rank zero's line only
    assert not [m for m in ABORT_MARKERS if m in out], out[-3000:]
    meta = ckpt / "meta.pt" if strategy == "fsdp2" else ckpt  # a sharded checkpoint's step is in meta.pt
    assert torch.load(meta, weights_only=True)["global_step"] == 4
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]


DISK_FULL = re.compile(
    r"lightning-diffusion fit: error: no space left on device for checkpoint (?P<name>\S+) in (?P<dir>\S+): it needs "
    r"(about (?P<needed>[\d.]+) MB \(the size of last\.ckpt\)|more than the [\d.]+ MB written before the disk filled), "
    r"(?P<free>[\d.]+) MB are free; the last good checkpoint, (?P<last>\S+) \(step (?P<step>\d+)\), is intact; "
    r"the partial file was removed\. Free space there or give the checkpoint callback another dirpath$", re.M)


def disk_full_config(path: Path, dirpath: Path, **trainer) -> Path:
    return write_config(path, max_steps=8, data={"num_workers": 0}, callbacks=[
        CONFIG["trainer"]["callbacks"][0],
        {"class_path": "LastCheckpoint", "init_args": {"every_n_train_steps": 2, "save_top_k": 0,
                                                       "dirpath": str(dirpath)}}], **trainer)


def assert_disk_full(proc: subprocess.CompletedProcess, dirpath: Path) -> re.Match:
    assert proc.returncode == 1, proc.stderr[-3000:]
    match = DISK_FULL.search(proc.stderr)
    assert match, proc.stderr[-3000:]
    assert Path(match["dir"]) == dirpath and Path(match["last"]) == dirpath / "last.ckpt"
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in dirpath.iterdir()) == ["last.ckpt"]  # no .partial-<host>-<pid> left
    last = dirpath / "last.ckpt"
    meta = last / "meta.pt" if last.is_dir() else last  # FSDP2: a sharded folder, its step in meta.pt
    assert torch.load(meta, weights_only=True)["global_step"] == int(match["step"]) == 2
    return match


@contextlib.contextmanager
def small_tmpfs(size: str):
    """A tmpfs of ``size`` (mount's notation: ``320k``) mounted on a new folder for the test, unmounted and
    removed after it; the test is skipped where it cannot be mounted (not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = Path(tempfile.mkdtemp(prefix="ld-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    # the checkpoint of this config is 0.21 MB: room for one, not for a second beside it
    with small_tmpfs("320k") as mount:
        dirpath = mount / "checkpoints"
        proc = run_cli("fit", "--config", str(disk_full_config(tmp_path / "c.yaml", dirpath)),
                       f"--trainer.default_root_dir={tmp_path}", check=False)
        match = assert_disk_full(proc, dirpath)
        size = (dirpath / "last.ckpt").stat().st_size
        assert float(match["needed"]) == round(size / 1e6, 1)
        free = os.statvfs(mount)
        assert abs(float(match["free"]) - free.f_bavail * free.f_frsize / 1e6) <= 0.1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_disk_full_under_ddp_fails_every_rank_in_one_line_without_a_hang(tmp_path, strategy):
    """Two ranks (gloo; DDP, or FSDP2 with a sharded checkpoint folder), checkpoints on a real tmpfs: the second
    save finds the disk full; every rank ends (no rank left waiting in a collective) with exit status 1 and
    the disk-full line, the last good checkpoint intact and no partial file left."""
    # room for one checkpoint, not for a second beside it: 0.21 MB, or FSDP2's larger sharded folder
    with small_tmpfs("700k" if strategy == "fsdp2" else "320k") as mount:
        dirpath = mount / "checkpoints"
        config = disk_full_config(tmp_path / "c.yaml", dirpath, strategy=FSDP2 if strategy == "fsdp2" else "ddp",
                                  devices=2)
        log = tmp_path / "ddp.log"
        proc = start(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"], log)
        try:
            proc.wait(timeout=240)
        finally:
            end_group(proc)
        out = log.read_text()
        assert not [m for m in ABORT_MARKERS if m in out], out[-3000:]
        # every rank fails alike (the save's outcome is shared) and says so in the same line, each with the free
        # space it saw
        lines = [(m["dir"], m["last"], m["step"]) for m in DISK_FULL.finditer(out)]
        assert len(lines) == 2 and len(set(lines)) == 1, out[-3000:]
        assert_disk_full(subprocess.CompletedProcess(proc.args, proc.returncode, "", out), dirpath)


def test_disk_full_injected_during_the_save(tmp_path, monkeypatch):
    # the second save (step 4) writes part of its file and then finds the disk full
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    save, calls = TorchCheckpointIO.save_checkpoint, []

    def full_disk(self, checkpoint, path, storage_options=None):
        calls.append(path)
        if len(calls) < 2:
            return save(self, checkpoint, path, storage_options)
        Path(path).write_bytes(b"\0" * 50_000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    dirpath = tmp_path / "checkpoints"
    proc = run_cli("fit", "--config", str(disk_full_config(tmp_path / "c.yaml", dirpath)),
                   f"--trainer.default_root_dir={tmp_path}", check=False)
    assert_disk_full(proc, dirpath)
    assert len(calls) == 2 and ".partial-" in str(calls[1])


def test_in_a_slurm_job_the_stop_checkpoint_is_the_one_a_requeued_job_resumes(tmp_path, monkeypatch, fake_slurm_job):
    """Library use (a Trainer of one's own, FitStopped raised from fit) in a SLURM job with
    auto-requeue: SIGUSR1 (``--signal=B:USR1@90``) at step 3 writes hpc_ckpt_1.ckpt at step 4 and
    requeues; the SIGTERM with which SLURM then ends the job (step 5) writes last.ckpt at step 6 and
    links it as hpc_ckpt_2.ckpt, the newest, which the requeued job restores (not the older hpc one)."""
    import lightning as L
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from lightning_diffusion.callbacks import EMA, FitStopped, LastCheckpoint, SlurmRequeue, StopOnSignal
    from test_ema import Regression, loader

    calls = fake_slurm_job  # what the fake scontrol was called with

    class Signals(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in (3, 5):
                os.kill(os.getpid(), signal.SIGUSR1 if trainer.global_step == 3 else signal.SIGTERM)

    trainer = tiny_trainer(max_steps=50, devices=1, default_root_dir=tmp_path, enable_checkpointing=True,
                           plugins=[SLURMEnvironment()],
                           callbacks=[Signals(), EMA(decay=0.9), SlurmRequeue(), StopOnSignal(),
                                      LastCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=100)])
    with pytest.raises(FitStopped) as stopped:
        trainer.fit(Regression(), loader())
    last, hpc = tmp_path / "ck" / "last.ckpt", tmp_path / "hpc_ckpt_2.ckpt"
    assert stopped.value.code == 143 and stopped.value.step == 6 and stopped.value.checkpoint == str(last)
    assert str(stopped.value) == (f"stopped by SIGTERM at step 6; saved {last} (and as {hpc}, which a requeued job "
                                  f"resumes); resume with --ckpt_path {last}")
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 4
    assert torch.load(hpc, weights_only=True)["global_step"] == 6 and hpc.read_bytes() == last.read_bytes()
    assert calls.read_text().split("\n")[:-1] == ["requeue 77"]
    from lightning_diffusion.cli import slurm_hpc_checkpoint

    assert slurm_hpc_checkpoint(tmp_path) == str(hpc)  # what the CLI's requeued job resumes
