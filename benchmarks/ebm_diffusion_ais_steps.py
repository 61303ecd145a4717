"""AIS on the t -> 0 energy of a trained energy-parameterized model against the path length.

``bits_per_dim(estimator="ais")`` (``ais-energy-t0``) of a checkpoint's EMA weights on the digits
test split for each ``--ais_steps`` and each transition (MALA, HMC), with the AIS diagnostics
(log Z, its standard error, effective sample size of the chains, acceptance, NFE). AIS's log Z is a
stochastic lower bound, so the bits/dim err low; a path long enough rises to a plateau, and an ESS
near 1 says the chains' weights (and the standard error) mean nothing yet.

    python benchmarks/ebm_diffusion_ais_steps.py --ckpt RUN/checkpoints/last.ckpt --ais_steps 500 2000 8000 \\
        --json benchmarks/results/cpu_ebm_diffusion_digits_ais.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of an energy-parameterized DDPM/ScoreSDE on the digits")
    p.add_argument("--ais_steps", type=int, nargs="+", default=[500, 2000, 8000], help="AIS distributions")
    p.add_argument("--transitions", nargs="+", default=["mala", "hmc"], help="AIS transitions")
    p.add_argument("--ais_chains", type=int, default=64, help="AIS chains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_six_families import test_split

    from lightning_diffusion.commands import load_model

    model, _, used = load_model(args.ckpt, "ema")
    x = test_split(False, None)
    rows = []
    for steps in args.ais_steps:
        for transition in args.transitions:
            start = time.perf_counter()
            bpd = model.bits_per_dim(x, estimator="ais", ais_chains=args.ais_chains, ais_steps=steps,
                                     ais_transition=transition, generator=torch.Generator().manual_seed(args.seed))
            row = {"ais_steps": steps, "transition": transition, "bits_per_dim": bpd.double().mean().item(),
                   **{k: float(v) for k, v in model.last_ais.items()}, "seconds": time.perf_counter() - start}
            rows.append(row)
            if args.json:  # after every row: an interrupted run keeps what it finished
                Path(args.json).write_text(json.dumps({"checkpoint": args.ckpt, "weights": used, "num_test": len(x),
                                                       "ais_chains": args.ais_chains, "rows": rows}, indent=2))
            print(f"{transition} {steps:>6} distributions: {row['bits_per_dim']:8.3f} bits/dim, log Z "
                  f"{row['log_z']:.1f} +- {row['stderr']:.2f} nats, ESS {row['ess']:.1f}/{args.ais_chains}, "
                  f"acceptance {row['acceptance']:.2f}, {row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
