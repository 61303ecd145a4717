"""A finished run is never restarted over: a fresh fit into it is refused and changes nothing;
``--ckpt_path last`` resumes it; a resumed run (also a copied one, resumed twice) keeps
``last.ckpt`` as its newest checkpoint; a resume from an older checkpoint moves the rows it logs
again into ``metrics-superseded-<n>.csv``, so ``metrics.csv`` never holds a step twice."""

import csv
import shutil
from pathlib import Path

import pytest
import torch

from tiny import tiny_trainer
from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# the toy config, 10 timesteps, a metrics row per step, in runs/ddpm_toy2d/<version> of the cwd
TOY = ["--config", "ddpm_toy2d", "--model.init_args.timesteps=10", "--trainer.enable_progress_bar=false",
       "--trainer.log_every_n_steps=1", "--trainer.logger.init_args.save_dir=runs"]
RUN = Path("runs") / "ddpm_toy2d"


def fit(cwd: Path, version: str, max_steps: int, *extra: str, check: bool = True):
    return run_cli("fit", *TOY, f"--trainer.logger.init_args.version={version}", f"--trainer.max_steps={max_steps}",
                   *extra, cwd=cwd, check=check)


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def train_steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-step run, runs/ddpm_toy2d/run1 in the returned folder; tests copy it."""
    cwd = tmp_path_factory.mktemp("finished")
    fit(cwd, "run1", 3)
    return cwd


def own_copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished / "runs", tmp_path / "runs")
    return tmp_path


def test_fresh_fit_into_a_finished_run_is_refused_and_changes_nothing(finished, tmp_path):
    cwd = own_copy(finished, tmp_path)
    run = cwd / RUN / "run1"
    before = snapshot(run)
    assert {"checkpoints/last.ckpt", "metrics.csv", "config.yaml"} <= set(before)

    proc = fit(cwd, "run1", 2, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [
        "lightning-diffusion fit: error: run directory runs/ddpm_toy2d/run1 already holds a run "
        "(checkpoints/last.ckpt, metrics.csv); a fit without --ckpt_path would start from step 0 over it. Resume it "
        "with --ckpt_path runs/ddpm_toy2d/run1/checkpoints/last.ckpt (or --ckpt_path last), or give this fit a new "
        "directory (--trainer.logger.init_args.version=NAME, or another name/save_dir)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(run) == before  # byte for byte, the lock file too; nothing added
    assert train_steps(run / "metrics.csv") == [0, 1, 2] and step_of(run / "checkpoints" / "last.ckpt") == 3

    # --ckpt_path last: the run's last.ckpt, named; the resumed run reaches max_steps after its history
    proc = fit(cwd, "run1", 5, "--ckpt_path=last")
    assert "--ckpt_path last: resuming from runs/ddpm_toy2d/run1/checkpoints/last.ckpt (step 3)" in proc.stderr
    assert step_of(run / "checkpoints" / "last.ckpt") == 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert train_steps(run / "metrics.csv") == [0, 1, 2, 3, 4]
    assert "ckpt_path: runs/ddpm_toy2d/run1/checkpoints/last.ckpt" in (run / "config-2.yaml").read_text()

    # a run with nothing to resume: the directory is named
    proc = fit(cwd, "nosuch", 2, "--ckpt_path=last", check=False)
    assert proc.returncode == 1
    assert "error: --ckpt_path last: no checkpoint in runs/ddpm_toy2d/nosuch/checkpoints, the checkpoints of run " \
           "directory runs/ddpm_toy2d/nosuch" in proc.stderr


def test_copied_run_resumed_twice_keeps_last_ckpt_the_newest(finished, tmp_path):
    cwd = own_copy(finished, tmp_path)
    shutil.copytree(cwd / RUN / "run1", cwd / RUN / "copy")
    copy = cwd / RUN / "copy"
    last = copy / "checkpoints" / "last.ckpt"
    fit(cwd, "copy", 5, f"--ckpt_path={last.relative_to(cwd)}")  # the README's resume, twice
    assert step_of(last) == 5
    proc = fit(cwd, "copy", 7, f"--ckpt_path={last.relative_to(cwd)}")
    assert "Restored all states from the checkpoint at runs/ddpm_toy2d/copy/checkpoints/last.ckpt" in proc.stderr
    assert step_of(last) == 7  # the second resume went on from the first one's end, not from step 3
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no last-v1.ckpt, last-v2.ckpt
    assert train_steps(copy / "metrics.csv") == list(range(7))  # strictly increasing, no step twice
    assert not list(copy.glob("metrics-superseded-*"))
    assert step_of(cwd / RUN / "run1" / "checkpoints" / "last.ckpt") == 3  # the original untouched


def test_resume_from_an_older_checkpoint_moves_the_superseded_rows_aside(finished, tmp_path):
    cwd = own_copy(finished, tmp_path)
    run = cwd / RUN / "run1"
    older = run / "checkpoints" / "step3.ckpt"
    shutil.copyfile(run / "checkpoints" / "last.ckpt", older)  # a checkpoint the user keeps, at step 3
    kept = older.read_bytes()
    fit(cwd, "run1", 6, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert train_steps(run / "metrics.csv") == [0, 1, 2, 3, 4, 5]

    proc = fit(cwd, "run1", 5, f"--ckpt_path={older}")  # back to step 3, on to 5
    side = run / "metrics-superseded-1.csv"
    assert "runs/ddpm_toy2d/run1/metrics.csv: 3 rows of steps 3-5, logged after the checkpoint this fit resumes " \
           "(step 3), moved to runs/ddpm_toy2d/run1/metrics-superseded-1.csv" in proc.stderr
    assert train_steps(run / "metrics.csv") == [0, 1, 2, 3, 4]  # each step once: this fit's 3 and 4
    assert train_steps(side) == [3, 4, 5]  # the rows of the abandoned steps, kept
    assert step_of(run / "checkpoints" / "last.ckpt") == 5
    assert older.read_bytes() == kept  # a named checkpoint is never replaced
    # the step-6 last.ckpt the resumed fit would have replaced: moved aside, named, whole
    assert "runs/ddpm_toy2d/run1/checkpoints/last.ckpt (step 6) is further along than the checkpoint this fit " \
           "resumes (step 3): moved to runs/ddpm_toy2d/run1/checkpoints/superseded/last-step6.ckpt" in proc.stderr
    assert step_of(run / "checkpoints" / "superseded" / "last-step6.ckpt") == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step3.ckpt", "superseded"]
    proc = fit(cwd, "run1", 6, "--ckpt_path=last")  # `last` is this branch's newest, not the superseded one
    assert "resuming from runs/ddpm_toy2d/run1/checkpoints/last.ckpt (step 5)" in proc.stderr
    assert train_steps(run / "metrics.csv") == [0, 1, 2, 3, 4, 5]


def test_ckpt_path_last_picks_the_newest_of_last_and_hpc_and_needs_a_known_directory(tmp_path):
    """``last`` of a run: of last.ckpt, last-v<n>.ckpt (older versions) and the newest hpc_ckpt_<n>.ckpt,
    the one at the highest step; other checkpoints (an abandoned branch's periodic ones) only where
    there is none of those. A W&B run without an id has no directory yet: an error that says so."""
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from lightning_diffusion import LastCheckpoint
    from lightning_diffusion.errors import CheckpointError
    from lightning_diffusion.run_directory import resolve_last_checkpoint

    def save(path: Path, step: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {}, "global_step": step}, path)

    def trainer(**kwargs) -> L.Trainer:
        return tiny_trainer(default_root_dir=tmp_path, callbacks=[LastCheckpoint()], enable_checkpointing=True,
                            **kwargs)

    with pytest.raises(CheckpointError, match=f"--ckpt_path last: no checkpoint in {tmp_path}/checkpoints"):
        resolve_last_checkpoint(trainer())
    save(tmp_path / "checkpoints" / "epoch=0-step=9.ckpt", 9)
    assert resolve_last_checkpoint(trainer()).name == "epoch=0-step=9.ckpt"  # nothing else
    save(tmp_path / "checkpoints" / "last.ckpt", 5)
    assert resolve_last_checkpoint(trainer()).name == "last.ckpt"  # not the periodic one at step 9
    save(tmp_path / "checkpoints" / "last-v1.ckpt", 7)
    save(tmp_path / "hpc_ckpt_2.ckpt", 6)
    save(tmp_path / "hpc_ckpt_10.ckpt", 8)
    assert resolve_last_checkpoint(trainer()).name == "hpc_ckpt_10.ckpt"
    save(tmp_path / "checkpoints" / "last.ckpt", 11)
    assert resolve_last_checkpoint(trainer()).name == "last.ckpt"

    wandb = tiny_trainer(default_root_dir=tmp_path, logger=WandbLogger(save_dir=str(tmp_path), offline=True),
                         callbacks=[LastCheckpoint()], enable_checkpointing=True)
    unknown = r"not known before its W&B run starts .*\(--trainer.logger.init_args.id=ID\)"
    with pytest.raises(CheckpointError, match=unknown):
        resolve_last_checkpoint(wandb)


def test_wandb_run_with_an_id_is_refused_and_resumed_with_last_one_without_is_new(tmp_path, offline_wandb):
    """A W&B run's directory is ``save_dir/<project>/<run id>``: with the id given it is known before the
    run starts, so a fresh fit into it is refused and ``--ckpt_path last`` resumes it; without an id
    every fit gets a new run (a directory of its own): nothing to refuse."""
    wandb = ["--config", "ddpm_toy2d", "--model.init_args.timesteps=10", "--trainer.enable_progress_bar=false",
             "--trainer.logger=WandbLogger", "--trainer.logger.init_args.offline=true",
             "--trainer.logger.init_args.save_dir=runs", "--trainer.callbacks.num_samples=16"]
    run_cli("fit", *wandb, "--trainer.logger.init_args.id=wb1", "--trainer.max_steps=2", cwd=tmp_path)
    run = Path("runs") / "lightning_logs" / "wb1"
    assert step_of(tmp_path / run / "checkpoints" / "last.ckpt") == 2
    proc = run_cli("fit", *wandb, "--trainer.logger.init_args.id=wb1", "--trainer.max_steps=2", cwd=tmp_path,
                   check=False)
    assert proc.returncode == 1
    assert f"error: run directory {run} already holds a run (checkpoints/last.ckpt)" in proc.stderr
    proc = run_cli("fit", *wandb, "--trainer.logger.init_args.id=wb1", "--trainer.max_steps=4", "--ckpt_path=last",
                   cwd=tmp_path)
    assert f"--ckpt_path last: resuming from {run}/checkpoints/last.ckpt (step 2)" in proc.stderr
    assert step_of(tmp_path / run / "checkpoints" / "last.ckpt") == 4
    import wandb as wandb_module

    wandb_module.finish()  # (in this process the run stays open, and a WandbLogger would take it again)
    run_cli("fit", *wandb, "--trainer.max_steps=1", cwd=tmp_path)  # a new run id: not refused
    assert len(list((tmp_path / "runs" / "lightning_logs").iterdir())) == 2
    # an id known only once the run starts (here the open run of the fit just before, which a logger
    # given no id takes again in this process): its directory is checked then, before any checkpoint
    proc = run_cli("fit", *wandb, "--trainer.max_steps=1", cwd=tmp_path, check=False)
    wandb_module.finish()
    assert proc.returncode == 1 and "already holds a run (checkpoints/last.ckpt)" in proc.stderr
    assert "Traceback" not in proc.stderr
