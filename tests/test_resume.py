"""Exact resume: 2N steps straight == N steps, resume, N more == a run SIGKILLed mid-way and
resumed from its last checkpoint. On CPU the parameters, EMA averages and optimizer state agree
bitwise. The stream position (epoch, batches processed, seed), RNG states, EMA, optimizer and LR
scheduler travel in the checkpoint; writes of last.ckpt are atomic."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import ROOT

CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": 14, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "check_val_every_n_epoch": 2, "limit_val_batches": 2,
                "num_sanity_val_steps": 0,
                "callbacks": [{"class_path": "EMA", "init_args": {"decay": 0.99}},
                              {"class_path": "LastCheckpoint", "init_args": {"every_n_train_steps": 3}}]},
    "model": {"class_path": "DDPM", "init_args": {
        "net": {"class_path": "UNet", "init_args": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                                                    "attention_resolutions": [], "dropout": 0.3}},
        "timesteps": 100, "lr": 1e-3, "warmup_steps": 5}},
    "data": {"class_path": "ShardDataModule", "init_args": {"dataset": "digits", "batch_size": 16,
                                                            "batches_per_epoch": 4, "num_workers": 2,
                                                            "shuffle_buffer": 64, "random_flip": True}},
}


def write_config(path: Path, **trainer) -> Path:
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["trainer"].update(trainer)
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, run: Path, *extra: str) -> subprocess.Popen:
    """A CLI fit in a subprocess (for the run that is SIGKILLed)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "tests" / "scripts"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # kill_switch
    return subprocess.Popen([sys.executable, "-m", "lightning_diffusion", *fit_args(config, run, *extra)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def fit_args(config: Path, run: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), f"--trainer.default_root_dir={run}",
            f"--trainer.callbacks.dirpath={run}/checkpoints", *extra]


def fit_here(config: Path, run: Path, *extra: str) -> None:
    """The same CLI fit in this process (saves a subprocess's ~8 s of imports), with one intra-op
    thread like the subprocess: float sums in another thread count round differently."""
    from lightning_diffusion.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(fit_args(config, run, *extra))
    finally:
        torch.set_num_threads(threads)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def final_state(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    return {"step": ckpt["global_step"], "params": ckpt["state_dict"], "ema": ema["shadow"],
            "adam": ckpt["optimizer_states"][0]["state"], "sched": ckpt["lr_schedulers"][0]}


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == 14
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), f"parameter {key} differs"
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), f"EMA average {key} differs"
    for i in a["adam"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a["adam"][i][name], b["adam"][i][name])
    assert a["sched"] == b["sched"]


def test_resume_and_sigkill_resume_are_bitwise_exact(tmp_path, caplog):
    # killed: a subprocess that SIGKILLs itself right after the checkpoint of step 9 (mid-epoch: epoch 2
    # after 1 of its 4 batches, an odd offset over 2 workers; tests/scripts/kill_switch.py); it runs
    # while the in-process runs below do
    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    kill = {"class_path": "kill_switch.SigkillAt", "init_args": {"step": 9}}
    proc = fit(write_config(tmp_path / "c14k.yaml", max_steps=200,
                            callbacks=[kill, *CONFIG["trainer"]["callbacks"]]), killed)  # dirpath: the last's

    # straight: 14 steps (epochs of 4 batches, 2 DataLoader workers, dropout, random flips)
    straight = tmp_path / "straight"
    fit_here(write_config(tmp_path / "c14.yaml"), straight)

    # 8 steps, resume, 6 more. Step 8 ends epoch 1: the checkpoint is written after the epoch's last
    # batch, then (straight run) validation and a new epoch's iter() come before step 9
    split = tmp_path / "split"
    fit_here(write_config(tmp_path / "c8.yaml", max_steps=8), split)
    assert torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    with caplog.at_level(logging.INFO):
        fit_here(write_config(tmp_path / "c14b.yaml"), split, f"--ckpt_path={split}/checkpoints/last.ckpt")
    assert "Restored all states" in caplog.text

    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, f"the run to kill ended by itself:\n{out[-3000:]}"
    step = torch.load(last, weights_only=False)["global_step"]
    assert step == 9  # the checkpoint of the step the kill switch was set at
    fit_here(write_config(tmp_path / "c14c.yaml"), killed, f"--ckpt_path={last}")

    reference = final_state(straight)
    assert_same(reference, final_state(split))
    assert_same(reference, final_state(killed))


def test_last_checkpoint_survives_a_crash_during_its_write(tmp_path, monkeypatch):
    from lightning_diffusion.callbacks import LastCheckpoint

    from test_ema import Regression, loader, trainer

    ckpt = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
    trainer(tmp_path, [ckpt], max_steps=4).fit(Regression(), loader())
    good = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert good["global_step"] == 4

    def crash(self, filepath, weights_only=False):  # a kill half-way through the write
        Path(filepath).write_bytes(b"PK\x03\x04 torn")
        raise RuntimeError("killed during the checkpoint write")

    monkeypatch.setattr(L.Trainer, "save_checkpoint", crash)
    with pytest.raises(RuntimeError, match="killed during the checkpoint write"):
        trainer(tmp_path, [LastCheckpoint(dirpath=tmp_path, every_n_train_steps=2)], max_steps=8).fit(
            Regression(), loader(), ckpt_path=tmp_path / "last.ckpt")
    monkeypatch.undo()
    intact = torch.load(tmp_path / "last.ckpt", weights_only=False)  # the old file, complete
    assert intact["global_step"] == 4
    assert torch.equal(intact["state_dict"]["lin.weight"], good["state_dict"]["lin.weight"])


def test_latent_diffusion_s_prior_options_are_judged_by_the_prior_s_own_rules_on_resume():
    """LatentDiffusion's ``prior`` option holds a model's config: on resume a change of the prior's class, of its
    resume_fixed_hparams (timesteps, beta_schedule, ...) or of its net's width is refused naming the option as
    given on the command line, a change of its dropout or label dropout applies; the first stage's file is fixed."""
    from lightning_diffusion.errors import ResumeConflictError
    from lightning_diffusion.resume import check_resume
    from tiny import tiny_latent_model

    model = tiny_latent_model()
    net = {"class_path": "lightning_diffusion.MLP", "init_args": {"in_channels": 4, "hidden": 16, "dropout": 0.0}}
    prior = {"class_path": "lightning_diffusion.DDPM",
             "init_args": {"timesteps": 20, "beta_schedule": "linear", "label_dropout": 0.1, "net": net}}
    old = {**model.hparams, "prior": prior}
    checkpoint = {"hyper_parameters": old, "state_dict": model.state_dict()}

    def prior_with(**init_args):
        out = yaml.safe_load(yaml.safe_dump(prior))
        for key, value in init_args.items():
            *parents, last = key.split("__")
            node = out["init_args"]
            for part in parents:
                node = node[part]["init_args"]
            node[last] = value
        return out

    for new_prior, named in ((prior_with(timesteps=40), "model.init_args.prior.init_args.timesteps: 20 in the checkpoint"),
                             (prior_with(beta_schedule="cosine"), "model.init_args.prior.init_args.beta_schedule:"),
                             (prior_with(net__hidden=32), "model.init_args.prior.init_args.net.init_args.hidden: 16"),
                             ({**prior, "class_path": "lightning_diffusion.ScoreSDE"}, "model.init_args.prior.class_path:")):
        with pytest.raises(ResumeConflictError, match=named):
            check_resume(model, {**old, "prior": new_prior}, checkpoint, "last.ckpt")
    changes = check_resume(model, {**old, "prior": prior_with(label_dropout=0.2, net__dropout=0.1)}, checkpoint, "last.ckpt")
    assert sorted(changes) == ["prior.init_args.label_dropout", "prior.init_args.net.init_args.dropout"]
    with pytest.raises(ResumeConflictError, match="model.init_args.first_stage_ckpt:"):
        check_resume(model, {**old, "first_stage_ckpt": "elsewhere.ckpt"}, checkpoint, "last.ckpt")
