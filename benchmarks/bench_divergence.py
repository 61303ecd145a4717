"""Exact divergence against Hutchinson's estimate in ScoreSDE's ODE likelihood: what each costs and
how far each lands from the truth, by data dimension D. It justifies ``likelihood_divergence:
auto`` (exact up to ``likelihood.EXACT_DIVERGENCE_MAX_DIMS`` dimensions, Rademacher above).

Cost: seconds of ``bits_per_dim(x, divergence=..., steps=S)`` (a fixed rk4 grid, so both run the
same 4 S net evaluations) with an untrained net: the toy configs' MLP (4 x 256) on points of D =
2 .. 64 (batch 512), and the digits configs' UNet on 1 x 8 x 8 images (D = 64, batch 128). Exact
takes one forward and D vector-Jacobian products per evaluation, Hutchinson one of each.

Error: the exact score of a Gaussian mixture (``MixtureOracle``: the 8-mode circle at D = 2,
``GaussianMixture.random(4, D)`` above) on ``--points`` points, adaptive solver at the default
tolerances: each estimator's mean error against the analytic NLL, Hutchinson's per-sample standard
deviation (one probe per point) and the standard error of a 512-point mean that it implies.

    python benchmarks/bench_divergence.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time


def time_bpd(model, x, divergence: str, steps: int, repeats: int) -> float:
    import torch

    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model.bits_per_dim(x, divergence=divergence, steps=steps, generator=torch.Generator().manual_seed(0))
        best = min(best, time.perf_counter() - start)
    return best


def cost_rows(args) -> list[dict]:
    import torch

    from lightning_diffusion import MLP, ScoreSDE, UNet

    rows = []
    nets = [(f"MLP 4x256, points D={d}", (d,), lambda d=d: MLP(in_channels=d, hidden=256, num_layers=4,
                                                               time_scale=1000.0))
            for d in (args.dims if "cost" in args.parts else ())]
    if "unet" in args.parts:
        nets.append(("UNet (sde_vp_digits), 1x8x8", (1, 8, 8),
                     lambda: UNet(in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                                  attention_resolutions=(4,), image_size=8, time_scale=1000.0)))
    for name, shape, make in nets:
        torch.manual_seed(0)
        model = ScoreSDE(make(), data_shape=shape).eval()
        batch = args.batch if len(shape) == 1 else args.image_batch
        x = torch.randn(batch, *shape).clamp(-1, 1)
        hutchinson = time_bpd(model, x, "rademacher", args.steps, args.repeats)
        exact = time_bpd(model, x, "exact", args.steps, args.repeats)
        row = {"net": name, "D": math.prod(shape), "batch": batch, "nfe": 4 * args.steps,
               "hutchinson_s": hutchinson, "exact_s": exact, "ratio": exact / hutchinson}
        rows.append(row)
        print(f"{name:32} batch {batch:4}  hutchinson {hutchinson:7.2f} s  exact {exact:7.2f} s  "
              f"exact/hutchinson {row['ratio']:5.1f}x", flush=True)
    return rows


def error_rows(args) -> list[dict]:
    import torch
    from torch import nn

    from lightning_diffusion import ScoreSDE
    from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle

    rows = []
    for d in args.dims:
        mix = GaussianMixture.circle() if d == 2 else GaussianMixture.random(4, d, seed=3)
        model = ScoreSDE(nn.Identity(), data_shape=(d,), parameterization="score")
        model.net = MixtureOracle(mix, model.sde, "score")
        x, _ = mix.sample(args.points, torch.Generator().manual_seed(0))
        true = -mix.log_prob(x) / (d * math.log(2))
        row = {"D": d, "points": args.points}
        for divergence in ("exact", "rademacher"):
            error = model.bits_per_dim(x.float(), divergence=divergence,
                                       generator=torch.Generator().manual_seed(1)).double() - true
            row[f"{divergence}_mean_error"] = error.mean().item()
            row[f"{divergence}_per_sample_std"] = error.std().item()
        row["rademacher_stderr_512"] = row["rademacher_per_sample_std"] / math.sqrt(512)
        rows.append(row)
        print(f"D={d:3}  exact error {row['exact_mean_error']:+.4f}  rademacher error "
              f"{row['rademacher_mean_error']:+.4f}, per-sample std {row['rademacher_per_sample_std']:.3f} "
              f"bits/dim (standard error of 512 points {row['rademacher_stderr_512']:.4f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--batch", type=int, default=512, help="points per bits_per_dim call (cost)")
    p.add_argument("--image_batch", type=int, default=128, help="images per bits_per_dim call (cost)")
    p.add_argument("--steps", type=int, default=5, help="rk4 steps of the timed solves (4 net evaluations each)")
    p.add_argument("--repeats", type=int, default=2, help="timed solves per row (the fastest counts)")
    p.add_argument("--points", type=int, default=512, help="mixture points of the error rows")
    p.add_argument("--parts", nargs="+", choices=["cost", "unet", "error"], default=["cost", "unet", "error"],
                   help="cost: the MLP rows; unet: the digits UNet row; error: the mixture rows")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"cost": cost_rows(args) if {"cost", "unet"} & set(args.parts) else [],
           "error": error_rows(args) if "error" in args.parts else [], "threads": torch.get_num_threads()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
