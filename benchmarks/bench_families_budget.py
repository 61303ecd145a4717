"""The families table at one budget (issue 25, item 5): every family's digits config trained for the
same time on this machine (wall time, or with ``--budget cpu`` each run's own CPU time: fair when runs
share the machine), then scored with one estimator per family, bits/dim, digits-CNN FID
and the NFE of the FID's sampler.

Training: ``lightning-diffusion fit --config configs/CONFIG.yaml`` in a subprocess per config with
``--trainer.max_time`` = ``--minutes`` (``--budget cpu``: ``cpu_budget.CPUBudget`` of ``--minutes`` CPU
minutes) and ``--trainer.max_steps=-1`` (the time decides, not the
config's step count), the progress bar off, ``OMP_NUM_THREADS=--threads``. ``--parallel N`` runs go at
once (default 2 runs x 1 thread: the 2-core machine is used fully, and whatever else runs on it slows
concurrent runs alike; ``--parallel 1 --threads 2`` trains each alone). The configs run as shipped,
their in-training evaluations (validation, sample grids, and where a config has them SampleQuality
and Likelihood every 1500 steps) included in the budget, as a user's run pays them; what ``fit`` does
after the fit loop stops (the final sample grid: 500 MALA steps for the EBM) is not, nor is the start-up.

The latent model (``latent_ddpm_digits``) is a DDPM prior over the frozen VAE of this benchmark's own
``vae_digits`` run: it starts when that run has finished and trains its prior for ``--latent_minutes``
(default ``--minutes``). Its row's budget is therefore the VAE's minutes plus its own (``8 + 8`` in the
minutes column; 2x the others'): the first stage is part of what the model cost, and it is not split off
because the VAE row reuses the same first stage. ``--latent_minutes`` sets another split.

Scoring: ``benchmarks/bench_six_families.py`` (its estimators, FID samplers and options; every
scoring flag below is passed through), one subprocess per checkpoint, ``--parallel`` at once, each on
``--threads`` threads, EMA weights where the config has EMA. Default estimators: DDPM, energy DDPM and
the latent DDPM prior the full T = 1000-term bound; ScoreSDE the adaptive probability-flow ODE; VAE and
HVAE IWAE-1000 (and the ELBO); VQ-VAE its ``vq-uniform-prior`` bound; EBM ``E(x) + log Z`` with AIS log Z
(errs low; the recovery-likelihood EBM on its lowest level's energy, sampled by walking its ladder down); absorbing discrete diffusion its exact masked ELBO.

    python benchmarks/bench_families_budget.py --minutes 8 --workdir runs/families_budget \\
        --json benchmarks/results/cpu_families_budget.json

``--families vae_digits,ddpm_digits`` runs a subset. ``--workdir`` is kept: a config whose run finished
(``CONFIG.train.json`` there) is not trained again and a checkpoint already scored with the same flags
(``CONFIG.score.json``) is not scored again, so an interrupted benchmark continues where it stopped (an
unfinished training run is started afresh: its partial checkpoint's timer would not hold the budget).
A smoke test (6.5 minutes on the shared 2-core machine; `--minutes 8` about an hour: ~45 min training,
~15-20 min scoring)::

    python benchmarks/bench_families_budget.py --minutes 0.3 --workdir /tmp/fb --num_test 20 \\
        --fid_samples 50 --iwae_k 10 --ddpm_steps 10 --sde_steps 10 --ebm_ais_chains 8 --ebm_ais_steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_six_families import (  # the shared scoring code (benchmarks/ on sys.path)
    add_scoring_args,
    fmt_time,
)

#: config -> bench_six_families family, in training order (the VAE first: the latent model needs it)
CONFIGS: dict[str, str] = {
    "vae_digits": "vae",
    "hvae_digits": "hvae",
    "vqvae_digits": "vqvae",
    "ddpm_digits": "ddpm",
    "sde_vp_digits": "score_sde",
    "ebm_digits": "ebm",
    "ebm_recovery_digits": "ebm_recovery",
    "ebm_diffusion_digits": "energy",
    "discrete_absorbing_digits": "discrete_absorbing",
    "latent_ddpm_digits": "latent",
}
from cpu_budget import cpu_seconds, fit_limit, max_time  # noqa: E402 - this folder is on sys.path when a benchmark runs

#: config -> the config whose checkpoint it needs as its first stage
FIRST_STAGE = {"latent_ddpm_digits": "vae_digits"}


def checkpoint(workdir: Path, config: str) -> Path:
    return workdir / "runs" / config / "bench" / "checkpoints" / "last.ckpt"


def env_with_threads(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def start_training(config: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Launch ``fit`` of ``configs/CONFIG.yaml`` for its minutes of wall or CPU time (``args.budget``; a
    subprocess); an earlier unfinished run of it is removed first."""
    minutes = args.latent_minutes if config in FIRST_STAGE else args.minutes
    run_dir = workdir / "runs" / config
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
           *fit_limit(minutes, args.budget), "--trainer.max_steps=-1",
           f"--trainer.logger.init_args.save_dir={workdir / 'runs'}", "--trainer.logger.init_args.version=bench",
           "--trainer.enable_progress_bar=false"]
    if config in FIRST_STAGE:
        cmd.append(f"--model.init_args.first_stage_ckpt={checkpoint(workdir, FIRST_STAGE[config])}")
    print(f"[train {config}] {minutes:g} {args.budget} min, {args.threads} thread(s)", flush=True)
    log = open(workdir / f"{config}.train.log", "w")  # noqa: SIM115 - open while the run lasts; closed by finish_training
    env = env_with_threads(args.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))  # cpu_budget
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, text=True)
    return {"config": config, "proc": proc, "log": log, "start": time.perf_counter(), "minutes": minutes,
            "budget": args.budget, "max_time": max_time(minutes), "command": cmd[2:], "threads": args.threads}


def finish_training(job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The facts of a finished training run (written to ``CONFIG.train.json``); SystemExit if it failed."""
    import torch

    config = job["config"]
    job["log"].close()
    wall = time.perf_counter() - job["start"]
    if job["proc"].returncode:
        tail = (workdir / f"{config}.train.log").read_text()[-4000:]
        raise SystemExit(f"[train {config}] fit failed ({job['proc'].returncode}):\n{tail}")
    ckpt = checkpoint(workdir, config)
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    facts = {"config": config, "family": CONFIGS[config], "checkpoint": str(ckpt), "global_step": step,
             "minutes": job["minutes"], "budget": job["budget"], "max_time": job["max_time"], "process_wall_s": wall,
             "threads": job["threads"], "command": job["command"]}
    cpu = cpu_seconds((workdir / f"{config}.train.log").read_text())
    if cpu is not None:
        facts["train_cpu_s"] = cpu
    if config in FIRST_STAGE:
        first = json.loads((workdir / f"{FIRST_STAGE[config]}.train.json").read_text())
        facts["first_stage"] = {"config": FIRST_STAGE[config], "minutes": first["minutes"],
                                "global_step": first["global_step"], "checkpoint": first["checkpoint"]}
    (workdir / f"{config}.train.json").write_text(json.dumps(facts, indent=2))
    print(f"[train {config}] {step} steps in {wall / 60:.2f} min (process wall, imports included)", flush=True)
    return facts


def train_all(configs: list[str], args: argparse.Namespace, workdir: Path) -> None:
    """Train every config without a finished run in ``workdir``, ``args.parallel`` at once; a config with
    a first stage waits for it."""
    pending = [c for c in configs if not (workdir / f"{c}.train.json").is_file()]
    for c, need in FIRST_STAGE.items():  # a first stage trained again makes its user's run stale
        if need in pending and c in configs and c not in pending:
            (workdir / f"{c}.train.json").unlink()
            pending.append(c)
            print(f"[train {c}] its first stage {need} is trained again: so is it", flush=True)
    for c in configs:
        if c not in pending:
            done = json.loads((workdir / f"{c}.train.json").read_text())
            minutes = args.latent_minutes if c in FIRST_STAGE else args.minutes
            if done["minutes"] != minutes or done.get("budget", "wall") != args.budget:
                raise SystemExit(f"{workdir}: {c} was trained for {done['minutes']:g} {done.get('budget', 'wall')} "
                                 f"minutes there, not {minutes:g} {args.budget}: "
                                 f"use another --workdir (or remove {workdir / f'{c}.train.json'} to train it again)")
            print(f"[train {c}] done before ({workdir / f'{c}.train.json'}): not trained again", flush=True)
    for c in pending:
        need = FIRST_STAGE.get(c)
        if need and need not in configs and not (workdir / f"{need}.train.json").is_file():
            raise SystemExit(f"{c} needs the {need} run of this benchmark as its first stage: add {need} to "
                             f"--families (or keep a workdir where it ran)")
    running: list[dict[str, Any]] = []
    while pending or running:
        ready = [c for c in pending if c not in FIRST_STAGE or (workdir / f"{FIRST_STAGE[c]}.train.json").is_file()]
        while ready and len(running) < args.parallel:
            config = ready.pop(0)
            pending.remove(config)
            running.append(start_training(config, args, workdir))
        time.sleep(1)
        for job in [j for j in running if j["proc"].poll() is not None]:
            running.remove(job)
            try:
                finish_training(job, workdir)
            except SystemExit:
                for other in running:
                    other["proc"].terminate()
                raise


def scoring_flags(args: argparse.Namespace) -> list[str]:
    """The scoring flags given (those that differ from bench_six_families' defaults), to pass through."""
    parser = argparse.ArgumentParser()
    add_scoring_args(parser)
    flags = []
    for action in parser._actions:  # argparse's own list of the options it defined
        if not action.option_strings or action.dest in ("help", "threads"):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        for item in value if isinstance(value, list) else [value]:
            flags.append(f"{action.option_strings[0]}={item}")
    return flags


def start_scoring(config: str, args: argparse.Namespace, workdir: Path, flags: list[str]) -> dict[str, Any] | None:
    """Launch bench_six_families on one checkpoint (a subprocess); None when it was scored before with
    the same flags."""
    out = workdir / f"{config}.score.json"
    ckpt = checkpoint(workdir, config)
    if out.is_file():
        done = json.loads(out.read_text())
        if done.get("flags") == flags and done.get("checkpoint_mtime") == ckpt.stat().st_mtime:
            print(f"[score {config}] scored before with these flags ({out}): not scored again", flush=True)
            return None
    cmd = [sys.executable, str(HERE / "bench_six_families.py"), "--ckpt", f"{CONFIGS[config]}={ckpt}",
           f"--threads={args.threads}", *flags, "--json", str(workdir / f"{config}.scoring.json")]
    print(f"[score {config}] {' '.join(cmd[2:])}", flush=True)
    log = open(workdir / f"{config}.score.log", "w")  # noqa: SIM115 - open while the run lasts; closed by finish_scoring
    proc = subprocess.Popen(cmd, env=env_with_threads(args.threads), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    return {"config": config, "proc": proc, "log": log, "start": time.perf_counter()}


def finish_scoring(job: dict[str, Any], workdir: Path, flags: list[str]) -> None:
    config = job["config"]
    job["log"].close()
    if job["proc"].returncode:
        tail = (workdir / f"{config}.score.log").read_text()[-4000:]
        raise SystemExit(f"[score {config}] bench_six_families failed ({job['proc'].returncode}):\n{tail}")
    scored = json.loads((workdir / f"{config}.scoring.json").read_text())
    result = scored["families"][CONFIGS[config]]
    out = {"flags": flags, "checkpoint_mtime": checkpoint(workdir, config).stat().st_mtime,
           "num_test": scored["num_test"], "score_wall_s": time.perf_counter() - job["start"], "result": result}
    (workdir / f"{config}.score.json").write_text(json.dumps(out, indent=2))
    print(f"[score {config}] done in {out['score_wall_s'] / 60:.2f} min", flush=True)


def score_all(configs: list[str], args: argparse.Namespace, workdir: Path) -> None:
    flags = scoring_flags(args)
    pending, running = list(configs), []
    while pending or running:
        while pending and len(running) < args.parallel:
            job = start_scoring(pending.pop(0), args, workdir, flags)
            if job is not None:
                running.append(job)
        time.sleep(1)
        for job in [j for j in running if j["proc"].poll() is not None]:
            running.remove(job)
            finish_scoring(job, workdir, flags)


def collect(configs: list[str], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One row per config: the training facts and the scores."""
    rows = {}
    for config in configs:
        train = json.loads((workdir / f"{config}.train.json").read_text())
        score = json.loads((workdir / f"{config}.score.json").read_text())
        rows[config] = {**train, "num_test": score["num_test"], "score_wall_s": score["score_wall_s"],
                        "scoring_flags": score["flags"], **score["result"]}
    return {"benchmark": "bench_families_budget", "dataset": "digits", "split": "test", "minutes": args.minutes,
            "budget": args.budget,
            "latent_minutes": args.latent_minutes, "parallel": args.parallel, "threads": args.threads,
            "cpu_count": os.cpu_count(), "workdir": str(workdir), "rows": rows}


def budget_cell(row: dict[str, Any]) -> str:
    if "first_stage" in row:
        return f"{row['first_stage']['minutes']:g} + {row['minutes']:g}"
    return f"{row['minutes']:g}"


def table(results: dict[str, Any]) -> str:
    lines = ["| family | config | steps reached | minutes | estimator | bits/dim | FID | NFE (FID sampler) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for config, r in results["rows"].items():
        f = r.get("fid")
        sampler = ", ".join(f"{k} {v}" for k, v in (f or {}).get("sample_options", {}).items()) or "default"
        steps = str(r["global_step"])
        if "first_stage" in r:
            steps += f" (VAE {r['first_stage']['global_step']})"
        for i, row in enumerate(r["bpd"]):
            first = i == 0
            estimator = row["estimator"]
            if r["family"] in ("ebm", "ebm_recovery"):
                estimator += f" (log Z +- {r['log_z_stderr']:.2f} nats, AIS {r['ais_chains']}x{r['ais_steps']})"
            fid_cell = f"{f['fid']:.2f}" if f else "-"
            nfe_cell = f"{f['nfe']} ({sampler})" if f else "-"
            cells = [r["family"], config, steps, budget_cell(r)] if first else ["", "", "", ""]
            cells += [estimator, f"{row['bits_per_dim']:.3f} +- {row['stderr']:.3f}"]
            cells += [fid_cell, nfe_cell] if first else ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, required=True, help="training time of each config (minutes)")
    p.add_argument("--budget", choices=["wall", "cpu"], default="wall",
                   help="what --minutes counts: wall-clock time (trainer.max_time), or each run's CPU time "
                   "(cpu_budget.CPUBudget: fair when runs share the machine)")
    p.add_argument("--latent_minutes", type=float, default=None,
                   help="the latent model's prior's minutes, on top of its vae_digits first stage's (default --minutes)")
    p.add_argument("--families", default=",".join(CONFIGS),
                   help=f"comma-separated configs (default all: {','.join(CONFIGS)})")
    p.add_argument("--parallel", type=int, default=2, help="runs (training, then scoring) at once")
    p.add_argument("--workdir", default=None, help="runs, logs and per-config results (kept: a rerun continues; "
                   "default a new temporary folder)")
    p.add_argument("--json", default=None, help="write the table's results here")
    add_scoring_args(p)
    p.set_defaults(threads=1)
    args = p.parse_args()
    if args.latent_minutes is None:
        args.latent_minutes = args.minutes
    configs = [c.strip() for c in args.families.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"--families: unknown {unknown}; one of {', '.join(CONFIGS)}")
    if args.parallel < 1 or args.threads < 1:
        p.error("--parallel and --threads must be >= 1")
    if args.minutes <= 0 or args.latent_minutes <= 0:
        p.error("--minutes and --latent_minutes must be > 0")
    configs = [c for c in CONFIGS if c in configs]  # training order: a first stage before its user
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_families_budget_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}: {len(configs)} configs, {args.minutes:g} {args.budget} min each, {args.parallel} at once x "
          f"{args.threads} thread(s)", flush=True)
    start = time.perf_counter()
    train_all(configs, args, workdir)
    trained = time.perf_counter()
    score_all(configs, args, workdir)
    results = collect(configs, args, workdir)
    results["train_wall_s"], results["score_wall_s"] = trained - start, time.perf_counter() - trained
    print()
    print(table(results))
    print(f"\nthis invocation: training {fmt_time(results['train_wall_s'])}, scoring {fmt_time(results['score_wall_s'])}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
