"""Energy-based diffusion against DDPM at equal CPU time on the 8x8 digits (issue 23, item 5).

Trains ``configs/ddpm_digits.yaml`` and ``configs/ebm_diffusion_digits.yaml`` one after the other
(each alone, ``lightning-diffusion fit`` in a subprocess) for the same wall-clock budget
(``--minutes``: Lightning's ``trainer.max_time``, ``max_steps`` lifted so that the time decides),
then scores both EMA checkpoints on the same test images with the code of
``benchmarks/bench_six_families.py``:

- digits-CNN FID of ``--fid_samples`` samples (DDIM, 50 steps, for both: every sampler runs
  unchanged on the energy model) against the test split (``SampleQuality(extractor="digits")``);
- bits/dim: the variational bound of both (``vlb``: all T = 1000 terms, or ``--vlb_steps S`` for
  the respaced bound), and for the energy model also AIS on its t -> 0 energy
  (``bits_per_dim(estimator="ais")``, ``ais-energy-t0``: ``--ais_chains`` x ``--ais_steps``, one
  AIS run for the whole test split). AIS's log Z is a stochastic lower bound, so that NLL errs low;
  log Z's Monte Carlo standard error is reported apart (in nats and in bits/dim).

The issue's targets: the energy model's FID within 1.5x the DDPM's, its bits/dim within 0.3 of the
DDPM's (``targets`` in the JSON). The training budget includes each config's in-training
evaluations (validation, SampleQuality and Likelihood every 1500 steps; the energy config has one
more Likelihood, the AIS one), as a user's run would; the steps reached are reported.

    python benchmarks/bench_ebm_diffusion_digits.py --minutes 20 --threads 2 \\
        --json benchmarks/results/cpu_ebm_diffusion_digits.json

On a machine shared with other work, ``--side_by_side --threads 1`` trains both at once, so the load
slows both alike (the JSON records ``side_by_side``). A smoke test: ``--minutes 0.3 --fid_samples 50 --num_test 20 --vlb_steps 10 --ais_steps 20``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = {"ddpm": "ddpm_digits", "energy": "ebm_diffusion_digits"}
SAMPLE_OPTIONS = {"sampler": "ddim", "steps": 50}


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The training options of the equal-time benchmarks (this one and ``bench_ebm_recovery_digits.py``)."""
    p.add_argument("--minutes", type=float, required=True, help="training time of each model (minutes)")
    p.add_argument("--budget", choices=["wall", "cpu"], default="wall",
                   help="what --minutes counts: wall-clock time (trainer.max_time), or the process's CPU time "
                   "(cpu_budget.CPUBudget: fair on a machine that other work shares)")
    p.add_argument("--threads", type=int, default=0, help="threads of training and evaluation (0: leave as is)")
    p.add_argument("--side_by_side", action="store_true", help="train the models at once, each on --threads threads "
                   "(a machine shared with other work then slows them alike)")


def start(name: str, config: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Launch ``fit --config configs/CONFIG.yaml`` for ``args.minutes`` of wall time, or of the fit's CPU
    time with ``--budget cpu`` (a subprocess)."""
    from cpu_budget import fit_limit

    budget = getattr(args, "budget", "wall")
    limit = fit_limit(args.minutes, budget)
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
           *limit, "--trainer.max_steps=-1",
           f"--trainer.logger.init_args.save_dir={workdir / 'runs'}", "--trainer.logger.init_args.version=bench",
           "--trainer.enable_progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads) if args.threads else os.environ.get("OMP_NUM_THREADS", "")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))  # cpu_budget
    env = {k: v for k, v in env.items() if v != ""}
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    log = open(workdir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, text=True)
    return {"name": name, "config": config, "proc": proc, "log": log, "start": time.perf_counter(),
            "limit": " ".join(limit[:1] if budget == "wall" else limit)}


def finish(job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Wait for a run launched by :func:`start`; its facts (checkpoint, steps reached, wall time)."""
    from cpu_budget import cpu_seconds

    name, config = job["name"], job["config"]
    returncode = job["proc"].wait()
    wall = time.perf_counter() - job["start"]
    job["log"].close()
    if returncode:
        tail = (workdir / f"{name}.log").read_text()[-4000:]
        raise SystemExit(f"[{name}] fit failed ({returncode}):\n{tail}")
    ckpt = workdir / "runs" / config / "bench" / "checkpoints" / "last.ckpt"
    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
    cpu = cpu_seconds((workdir / f"{name}.log").read_text())
    print(f"[{name}] {step} steps in {wall / 60:.2f} min (process wall, imports included)"
          + (f"; {cpu:.1f} training CPU s" if cpu is not None else ""), flush=True)
    return {"config": config, "checkpoint": str(ckpt), "global_step": step, "process_wall_s": wall,
            "limit": job["limit"], **({"train_cpu_s": cpu} if cpu is not None else {})}


def train(name: str, config: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``fit --config configs/CONFIG.yaml`` for ``args.minutes`` of wall time, alone; the run's facts."""
    return finish(start(name, config, args, workdir), workdir)


def train_all(args: argparse.Namespace, workdir: Path, configs: dict[str, str] = CONFIGS) -> dict[str, dict[str, Any]]:
    """The configs (name -> config) for the same time: one after the other (each alone), or with
    ``--side_by_side`` all at once (each on ``--threads`` threads), so that whatever else shares the
    machine slows them alike."""
    if args.side_by_side:
        jobs = [start(name, config, args, workdir) for name, config in configs.items()]
        return {job["name"]: finish(job, workdir) for job in jobs}
    return {name: train(name, config, args, workdir) for name, config in configs.items()}


def evaluate(name: str, run: dict[str, Any], x: torch.Tensor, args: argparse.Namespace, fid_data) -> dict[str, Any]:
    """bits/dim (the bound; for the energy model also AIS) and FID of one checkpoint's EMA weights."""
    from bench_six_families import fid, score, summarize

    from lightning_diffusion.commands import load_model

    model, _, used = load_model(run["checkpoint"], "ema")
    run["weights"] = used
    rows = []
    jobs = [{"steps": args.vlb_steps, "batch_t": args.batch_t}]
    if name == "energy":
        jobs.append({"estimator": "ais", "ais_chains": args.ais_chains, "ais_steps": args.ais_steps})
    for options in jobs:
        batch = len(x) if options.get("estimator") == "ais" else args.bpd_batch_size  # one AIS run for the split
        bits, seconds = score(model, x, batch, args.seed, **options)
        mean, se = summarize(bits)
        row = {"estimator": model.bpd_estimator(**options), "bits_per_dim": mean, "stderr": se, "n": len(bits),
               "seconds": seconds, "options": options}
        if options.get("estimator") == "ais":
            row["ais"] = dict(model.last_ais)  # log Z, its stderr (nats and bits/dim), ESS, acceptance, NFE
        rows.append(row)
        print(f"[{name}] {row['estimator']:>16}: {mean:.4f} +- {se:.4f} bits/dim ({len(bits)} images, {seconds:.1f} s)"
              + (f"; log Z {row['ais']['log_z']:.2f} +- {row['ais']['stderr']:.2f} nats" if "ais" in row else ""),
              flush=True)
    run["bpd"] = rows
    if args.fid_samples:
        run["fid"] = fid(model, dict(SAMPLE_OPTIONS), args, fid_data)
        print(f"[{name}] FID {run['fid']['fid']:.3f} ({run['fid']['fid_samples']} samples, NFE {run['fid']['nfe']})",
              flush=True)
    return run


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: FID ratio <= 1.5 and the bound's gap <= 0.3 bits/dim (energy - DDPM)."""
    ddpm, energy = results["runs"]["ddpm"], results["runs"]["energy"]
    vlb = {name: next(r for r in run["bpd"] if r["estimator"].startswith("vlb"))["bits_per_dim"]
           for name, run in (("ddpm", ddpm), ("energy", energy))}
    out: dict[str, Any] = {"bpd_gap_vlb": vlb["energy"] - vlb["ddpm"]}
    out["bpd_within_0.3"] = abs(out["bpd_gap_vlb"]) <= 0.3
    if "fid" in ddpm and "fid" in energy:
        out["fid_ratio"] = energy["fid"]["fid"] / ddpm["fid"]["fid"]
        out["fid_within_1.5x"] = out["fid_ratio"] <= 1.5
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the estimators' noise and of sampling")
    p.add_argument("--num_test", type=int, default=None, help="score only the first N test images (smoke tests)")
    p.add_argument("--bpd_batch_size", type=int, default=60, help="test images per bound call")
    p.add_argument("--vlb_steps", type=int, default=None, help="respaced bound of S steps (None: all T = 1000)")
    p.add_argument("--batch_t", type=int, default=25, help="bound timesteps per net call (the energy net keeps a "
                   "graph for grad_x E: batch_t x bpd_batch_size images at once)")
    p.add_argument("--ais_chains", type=int, default=64, help="energy model: AIS chains")
    p.add_argument("--ais_steps", type=int, default=500, help="energy model: AIS distributions")
    p.add_argument("--fid_samples", type=int, default=500, help="samples per model for the FID (0: no FID)")
    p.add_argument("--fid_batch_size", type=int, default=250, help="samples per sample() call")
    p.add_argument("--extractor_weights", default=None, help="digits CNN weights (default $LD_DATA/weights)")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--json", default=str(HERE / "results" / "cpu_ebm_diffusion_digits.json"))
    args = p.parse_args()
    sys.path.insert(0, str(HERE))  # bench_six_families: the shared scoring code
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    from bench_six_families import test_split

    from lightning_diffusion import ShardDataModule

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ebm_diffusion_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"benchmark": "bench_ebm_diffusion_digits", "minutes": args.minutes,
                               "threads": torch.get_num_threads(), "side_by_side": args.side_by_side, "seed": args.seed, "sample_options": SAMPLE_OPTIONS,
                               "runs": {}}
    trained = train_all(args, workdir)
    x = test_split(False, args.num_test)
    results["num_test"] = len(x)
    fid_data = ShardDataModule("digits", batch_size=256, num_workers=0)
    fid_data.setup("test")
    for name, run in trained.items():
        results["runs"][name] = evaluate(name, run, x, args, fid_data)
    results["targets"] = targets(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    t = results["targets"]
    print(f"bits/dim gap (energy - ddpm, vlb): {t['bpd_gap_vlb']:+.3f} (target |gap| <= 0.3: {t['bpd_within_0.3']})"
          + (f"; FID ratio {t['fid_ratio']:.2f} (target <= 1.5: {t['fid_within_1.5x']})" if "fid_ratio" in t else ""))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
