"""Maximum-likelihood EBMs on the 8x8 digits at equal CPU time (issue 24, items 2-3): contrastive
divergence (``configs/ebm_digits.yaml``) against diffusion recovery likelihood
(``configs/ebm_recovery_digits.yaml``, Gao et al. 2021), and optionally the energy-parameterized
diffusion model (``configs/ebm_diffusion_digits.yaml``, ``--with_diffusion``).

Each config is trained alone (``lightning-diffusion fit`` in a subprocess, one after the other) for the
same wall-clock budget (``--minutes``: ``trainer.max_time``, ``max_steps`` lifted), then its last
checkpoint (EMA weights where the config keeps them) is scored on the same test images with the code
of ``benchmarks/bench_six_families.py`` and ``benchmarks/bench_ebm_diffusion_digits.py``:

- digits-CNN FID of ``--fid_samples`` samples against the test split, each model with its own
  sampler: CD's MALA from fresh chains (``--cd_sample_steps`` steps, the config's grid sampler), the
  recovery model's ladder (6 levels x 30 Langevin steps), the diffusion model's DDIM 50 steps;
- bits/dim with each estimator's name: ``ais-logZ`` (CD: ``E + log Z``), ``recovery-ais`` (recovery: the
  ladder's variational bound with each conditional's log Z by AIS, ``EBM.recovery_nll``) and
  ``ais-logZ-level0`` (recovery, the old estimate: the lowest level's marginal energy ``E(a_1 x, 0)``),
  ``ais-energy-t0`` and the VLB (diffusion).
  AIS's log Z is a stochastic lower bound, so those NLLs err low; the recovery model's normaliser is
  never trained, only estimated here, and its steep lowest-level energy (``net / s_0^2``) is hard for
  AIS: on a 20-minute run AIS gave -1.20, -0.94, -0.55 bits/dim at 1000, 4000, 16000 steps (64-128
  chains), still below the 0 that no discrete NLL goes under, so a row below 0 gets a ``note``. One
  AIS run scores the whole test split.

The issue's target: FID <= 30 for a maximum-likelihood EBM (``targets`` in the JSON).

    python benchmarks/bench_ebm_recovery_digits.py --minutes 20 --threads 2 \\
        --json benchmarks/results/cpu_ebm_recovery_digits.json

A smoke test: ``--minutes 0.3 --models recovery --fid_samples 50 --num_test 20 --ais_steps 20``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
CONFIGS = {"cd": "ebm_digits", "recovery": "ebm_recovery_digits", "diffusion": "ebm_diffusion_digits"}


def sample_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Each model's sampler: CD's MALA (its config's grid sampler), the recovery ladder (the model's
    default), the diffusion model's DDIM."""
    if name == "cd":
        return {"sampler": "mala", "steps": args.cd_sample_steps}
    if name == "diffusion":
        return {"sampler": "ddim", "steps": 50}
    return {}


def evaluate(name: str, run: dict[str, Any], x: torch.Tensor, args: argparse.Namespace, fid_data) -> dict[str, Any]:
    """bits/dim with the estimators' names and the FID of one checkpoint (EMA weights where kept)."""
    from bench_six_families import fid, score, summarize

    from lightning_diffusion.commands import load_model

    model, _, used = load_model(run["checkpoint"], "ema")
    run["weights"] = used
    ais = {"ais_chains": args.ais_chains, "ais_steps": args.ais_steps}
    if name == "diffusion":
        jobs = [{"steps": args.vlb_steps}, {"estimator": "ais", **ais}]
    else:  # the EBM's AIS settings are model options: set them on the loaded model
        model.ais_chains, model.ais_steps = args.ais_chains, args.ais_steps
        # recovery: the ladder's bound (recovery-ais, its default) and the old level-0 estimate
        jobs = [{}, {"estimator": "level0"}] if name == "recovery" else [{}]
    rows = []
    for options in jobs:
        batch = len(x) if name != "diffusion" or options.get("estimator") == "ais" else args.bpd_batch_size
        bits, seconds = score(model, x, batch, args.seed, **options)
        mean, se = summarize(bits)
        row = {"estimator": model.bpd_estimator(**options), "bits_per_dim": mean, "stderr": se, "n": len(bits),
               "seconds": seconds, "options": options}
        if mean < 0:  # 8-bit data: a true discrete NLL is >= 0, so AIS's log Z is far below the truth
            row["note"] = "below 0 bits/dim, impossible for 8-bit data: AIS has not converged (raise --ais_steps)"
        if name == "recovery" and not options:  # the bound's own diagnostics: per-level nats, the top level's log Z
            row["bound"] = dict(model.last_bound)
        elif name != "diffusion":
            log_z, log_z_se, method = model.log_partition()
            row["log_z"] = {"nats": log_z, "stderr": log_z_se, "method": method, **ais}
        elif options.get("estimator") == "ais":
            row["ais"] = dict(model.last_ais)
        rows.append(row)
        print(f"[{name}] {row['estimator']:>22}: {mean:.4f} +- {se:.4f} bits/dim ({len(bits)} images, {seconds:.1f} s)",
              flush=True)
    run["bpd"] = rows
    if args.fid_samples:
        run["fid"] = fid(model, sample_options(name, args), args, fid_data)
        print(f"[{name}] FID {run['fid']['fid']:.3f} ({run['fid']['fid_samples']} samples, "
              f"{run['fid']['sample_seconds']:.1f} s sampling)", flush=True)
    return run


def main() -> None:
    sys.path.insert(0, str(HERE))  # the shared training and scoring code
    from bench_ebm_diffusion_digits import add_training_arguments, train_all

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)
    p.add_argument("--models", nargs="+", default=["cd", "recovery"], choices=list(CONFIGS),
                   help="which configs to train (default cd and recovery)")
    p.add_argument("--with_diffusion", action="store_true", help="also the energy-parameterized diffusion model")
    p.add_argument("--seed", type=int, default=0, help="seed of the estimators' noise and of sampling")
    p.add_argument("--num_test", type=int, default=None, help="score only the first N test images (smoke tests)")
    p.add_argument("--bpd_batch_size", type=int, default=60, help="diffusion: test images per bound call")
    p.add_argument("--vlb_steps", type=int, default=None, help="diffusion: respaced bound of S steps (None: all T)")
    p.add_argument("--batch_t", type=int, default=25, help="diffusion: bound timesteps per net call")
    p.add_argument("--ais_chains", type=int, default=128, help="AIS chains (one run for the test split)")
    p.add_argument("--ais_steps", type=int, default=1000, help="AIS distributions")
    p.add_argument("--cd_sample_steps", type=int, default=500, help="CD: MALA steps of its samples")
    p.add_argument("--fid_samples", type=int, default=500, help="samples per model for the FID (0: no FID)")
    p.add_argument("--fid_batch_size", type=int, default=250, help="samples per sample() call")
    p.add_argument("--extractor_weights", default=None, help="digits CNN weights (default $LD_DATA/weights)")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--json", default=str(HERE / "results" / "cpu_ebm_recovery_digits.json"))
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_six_families import test_split

    from lightning_diffusion import ShardDataModule

    models = list(dict.fromkeys(args.models + (["diffusion"] if args.with_diffusion else [])))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ebm_recovery_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"benchmark": "bench_ebm_recovery_digits", "minutes": args.minutes,
                               "budget": args.budget, "side_by_side": args.side_by_side,
                               "threads": torch.get_num_threads(), "seed": args.seed, "runs": {}}
    trained = train_all(args, workdir, {name: CONFIGS[name] for name in models})
    x = test_split(False, args.num_test)
    results["num_test"] = len(x)
    fid_data = ShardDataModule("digits", batch_size=256, num_workers=0)
    fid_data.setup("test")
    for name, run in trained.items():
        results["runs"][name] = evaluate(name, run, x, args, fid_data)
    results["targets"] = {f"{name}_fid_at_most_30": run["fid"]["fid"] <= 30 for name, run in results["runs"].items()
                          if name != "diffusion" and "fid" in run}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    for name, run in results["runs"].items():
        bpd = ", ".join(f"{r['estimator']} {r['bits_per_dim']:.3f}" for r in run["bpd"])
        print(f"{name}: {run['global_step']} steps; {bpd}" + (f"; FID {run['fid']['fid']:.2f}" if "fid" in run else ""))
    print(f"targets: {results['targets']}; wrote {args.json}")


if __name__ == "__main__":
    main()
