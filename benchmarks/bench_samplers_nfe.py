"""Sample quality versus NFE of every sampler on the 2-D toy set ``gaussians8``.

``gaussians8`` is ``GaussianMixture.circle()``: 8 equal isotropic modes of std 0.1 on a circle of
radius 2. For each sampler (ancestral, ddim, euler_maruyama, pc, ode, heun, dpm_solver, and the
few-step rows dpm_solver_3m = dpm_solver with order 3 ending at sigma/alpha = 0.01, and unipc) and each
NFE budget (10, 20, 50, 100, 1000 by default) the sampler's ``steps`` is set so that its actual
NFE (``SamplerOutput.nfe``, or ``model.last_sample_nfe``) is at most the budget and as close to it
as the sampler allows:

- ancestral, ddim, euler_maruyama: NFE = steps;
- pc (one Langevin corrector step): NFE = (steps - 1) (corrector_steps + 1) + 1;
- heun: NFE = 2 N - 1, dpm_solver, dpm_solver_3m, unipc: NFE = M; on a DDPM their grids are rounded to integer steps
  and merged levels cost no evaluation, so steps is searched upward until the budget is reached;
- ode is adaptive (dopri5): it takes no steps; it runs at ``rtol = atol`` in ``--ode_tols`` and
  each tolerance gets its own row, its cell in the column of the smallest budget >= its NFE.

Quality is the exact energy distance (V-statistic over all pairs, as in tests/test_samplers.py)
between ``--num`` samples and ``--num`` reference draws of the mixture. Its noise floor is the
energy distance between an independent mixture sample of the same size and the reference (mean
and standard deviation over ``--null_draws`` draws): a sampler cannot be told apart from the
mixture below it, and differences of about one standard deviation are noise.

Denoisers:

- ``--source oracle`` (default): the exact denoiser ``E[x_0 | x_t]`` of the mixture under
  ``--process`` vp (VPSDE), subvp (SubVPSDE), ve (VESDE, sigma_max = 50 as in the tests) or ddpm
  (DiscreteVP of the linear 1000-step schedule). No network: the table shows the samplers' own
  discretisation error only.
- ``--ckpt PATH``: a DDPM or ScoreSDE trained on gaussians8 (``lightning-diffusion fit --config
  configs/ddpm_toy2d.yaml`` or ``configs/sde_vp_toy2d.yaml``), sampled through ``model.sample``
  with the process it was trained with (``--process`` is ignored). DDPM's ancestral sampler uses
  the model's fixed variance.

heun runs on EDM's grid top ``sigma_max = 80`` (Karras et al. 2022, Table 1), not the process's own
(a VP SDE reaches sigma/alpha = 152 at t = 1); a checkpoint is sampled with its EMA averages
unless ``--raw``.

Target: dpm_solver or heun with at most 20 NFE is within 10% of the energy distance of 1000-step
ancestral sampling, or within one noise-floor standard deviation of it (divided by sqrt(repeats):
a cell is the mean over ``--repeats`` sampling seeds). The defaults, 10000 samples and 3 repeats,
put that standard deviation near 0.15e-3, a quarter of the floor (~0.65e-3).

Few-step target (issue 14): unipc or dpm_solver_3m at <= 10 NFE within 20% of 1000-step ancestral.
A reduced run for it (a few minutes):

    python benchmarks/bench_samplers_nfe.py --process vp --samplers ancestral dpm_solver dpm_solver_3m unipc --budgets 10 20 50 1000 --reference_above 50

    python benchmarks/bench_samplers_nfe.py [--process vp|subvp|ve|ddpm] [--num 10000] [--repeats 3] [--json out.json]
    python benchmarks/bench_samplers_nfe.py --ckpt runs/ddpm_toy2d/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from lightning_diffusion.diffusion import NoiseSchedule, sample
from lightning_diffusion.diffusion.mixture import GaussianMixture
from lightning_diffusion.diffusion.samplers import karras_grid, sampler_grid
from lightning_diffusion.diffusion.sde import VESDE, VPSDE, DiscreteVP, GaussianProcess, SubVPSDE
from lightning_diffusion.metrics import energy_distance

STEP_SAMPLERS = ("ancestral", "ddim", "euler_maruyama", "pc", "heun", "dpm_solver", "dpm_solver_3m", "unipc")
SAMPLERS = (*STEP_SAMPLERS[:4], "ode", *STEP_SAMPLERS[4:])
# a row of the table -> the sampler it runs (rows not listed run the sampler of their name)
ROW_SAMPLER = {"dpm_solver_3m": "dpm_solver"}
SOLVERS = ("dpm_solver", "unipc")  # NFE = M solver steps, on a DDPM after merging rounded grid times
PROCESSES: dict[str, Callable[[], GaussianProcess]] = {
    "vp": lambda: VPSDE(),
    "subvp": lambda: SubVPSDE(),
    "ve": lambda: VESDE(),  # sigma_max = 50, as tests/test_samplers.py uses for the circle
    "ddpm": lambda: DiscreteVP(NoiseSchedule("linear", 1000)),
}
PC_CORRECTOR_STEPS = 1  # pc's default
# options of a sampler in this table: heun on EDM's own grid top (Karras et al. 2022, Table 1:
# sigma_max = 80 for every process; a VP SDE would otherwise start at sigma/alpha = 152)
# dpm_solver_3m: DPM-Solver++(3M) on the grid unipc ends on by default (sigma/alpha = 0.01, the
# reference code's t_end = 1/N), the few-step settings of Lu et al. 2022
SAMPLER_OPTIONS: dict[str, dict] = {"heun": {"sigma_max": 80.0}, "dpm_solver_3m": {"order": 3, "sigma_min": 0.01}}


def row_sampler(row: str) -> str:
    return ROW_SAMPLER.get(row, row)


# -- budget -> steps ------------------------------------------------------------------------------
def predicted_nfe(name: str, process: GaussianProcess, steps: int) -> int:
    """The NFE of ``name`` at ``steps`` (the samplers' docstrings; heun/dpm_solver count the
    grid levels left after a DDPM's integer rounding). Checked against the actual NFE later."""
    if name in ("ancestral", "ddim", "euler_maruyama"):
        return steps
    if name == "pc":
        return (steps - 1) * (PC_CORRECTOR_STEPS + 1) + 1
    if name == "heun":
        return 2 * len(karras_grid(process, steps, **SAMPLER_OPTIONS["heun"])) - 1
    if row_sampler(name) in SOLVERS:
        grid_options = {k: v for k, v in SAMPLER_OPTIONS.get(name, {}).items() if k in ("grid", "sigma_min")}
        return len(sampler_grid(row_sampler(name), process, steps, **grid_options)) - 1
    raise ValueError(name)


def steps_for_budget(name: str, process: GaussianProcess, budget: int) -> int | None:
    """The smallest ``steps`` whose NFE is the largest NFE <= budget (None if none fits)."""
    least = 1 if row_sampler(name) in SOLVERS else 2
    most = int(process.t_max) + 1 if process.discrete and name != "heun" and row_sampler(name) not in SOLVERS \
        else 20 * budget
    nfe = lambda s: predicted_nfe(name, process, s)  # noqa: E731  (non-decreasing in s)
    if nfe(least) > budget:
        return None
    lo, hi = least, most  # largest s with nfe(s) <= budget
    if nfe(hi) <= budget:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if nfe(mid) <= budget else (lo, mid)
    best = nfe(lo)
    lo2, hi2 = least, lo  # smallest s with nfe(s) == best
    while lo2 < hi2:
        mid = (lo2 + hi2) // 2
        lo2, hi2 = (mid + 1, hi2) if nfe(mid) < best else (lo2, mid)
    return lo2


# -- sources ----------------------------------------------------------------------------------------
class OracleSource:
    """The exact denoiser of the mixture under a process."""

    def __init__(self, mix: GaussianMixture, process: GaussianProcess):
        self.mix, self.process = mix, process

    def denoise_fn(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mix.denoise(x, self.process.alpha(t), self.process.sigma(t)).float()

    def __call__(self, name: str, num: int, steps: int | None, generator: torch.Generator,
                 **options) -> tuple[torch.Tensor, int]:
        out = sample(name, self.denoise_fn, self.process, (num, self.mix.dim), steps=steps, generator=generator,
                     **options)
        return out.x, out.nfe


class CheckpointSource:
    """A trained DDPM or ScoreSDE, sampled through ``model.sample``."""

    def __init__(self, ckpt: Path, device: str, raw: bool = False):
        from lightning_diffusion import DDPM
        from lightning_diffusion.commands import load_model

        try:
            self.model, _, self.weights = load_model(ckpt, "raw" if raw else "ema", device)
        except (ValueError, TypeError) as e:
            raise SystemExit(f"cannot rebuild the model of {ckpt}: {e}") from e
        cls = type(self.model)
        if not hasattr(self.model, "denoise"):
            raise SystemExit(f"{ckpt}: a {cls.__name__}, expected a DDPM or ScoreSDE trained on gaussians8")
        if tuple(self.model.data_shape) != (2,):
            raise SystemExit(f"{ckpt}: model data_shape is {self.model.data_shape}, expected (2,) (gaussians8)")
        self.process = self.model.process if isinstance(self.model, DDPM) else self.model.sde
        self.device = device
        self.description = f"{cls.__name__} {ckpt} ({type(self.process).__name__}, {self.weights} weights)"

    def __call__(self, name: str, num: int, steps: int | None, generator: torch.Generator,
                 **options) -> tuple[torch.Tensor, int]:
        x = self.model.sample(num, sampler=name, steps=steps, generator=generator, **options)
        return x.detach().cpu(), int(self.model.last_sample_nfe)


def fmt_tol(tol: float) -> str:
    return f"{tol:.0e}".replace("e-0", "e-")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=["oracle", "ckpt"], default="oracle",
                   help="oracle: the mixture's exact denoiser (default); ckpt: the model of --ckpt (implied by --ckpt)")
    p.add_argument("--process", choices=list(PROCESSES), default="vp", help="process of the oracle")
    p.add_argument("--ckpt", help="DDPM or ScoreSDE checkpoint trained on gaussians8 (instead of the oracle)")
    p.add_argument("--num", type=int, default=10000, help="samples per run (and reference draws)")
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 50, 100, 1000], help="NFE budgets")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS),
                   help="samplers to run (default all; the target needs ancestral, dpm_solver, heun)")
    p.add_argument("--ode_tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5], help="ode rtol = atol")
    p.add_argument("--null_draws", type=int, default=10, help="independent mixture samples for the noise floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="sample a --ckpt with its raw weights, not its EMA averages")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per cell with seeds seed, seed+1, ...; cells show the mean energy distance")
    p.add_argument("--device", default="cpu", help="device of a --ckpt model")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: small tensors)")
    p.add_argument("--json", help="write all numbers to this JSON file")
    p.add_argument("--reference_above", type=int, default=None,
                   help="budgets above this run only ancestral, the reference (a reduced run; default: all rows)")
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    budgets = sorted(set(args.budgets))

    mix = GaussianMixture.circle()  # gaussians8: radius 2, std 0.1
    if args.source == "ckpt" and not args.ckpt:
        raise SystemExit("--source ckpt needs --ckpt PATH")
    if args.ckpt:
        ckpt = Path(args.ckpt)
        if not ckpt.is_file():
            raise SystemExit(f"--ckpt {ckpt} does not exist")
        source = CheckpointSource(ckpt, args.device, raw=args.raw)
        process, description = source.process, source.description
    else:
        process = PROCESSES[args.process]()
        source, description = OracleSource(mix, process), f"oracle denoiser, {args.process} ({type(process).__name__})"

    t0 = time.perf_counter()
    ref = mix.sample(args.num, torch.Generator().manual_seed(args.seed + 123))[0]
    null = torch.tensor([energy_distance(mix.sample(args.num, torch.Generator().manual_seed(args.seed + 1000 + i))[0],
                                         ref) for i in range(args.null_draws)])
    floor, floor_sd = null.mean().item(), null.std().item()
    mean_sd = floor_sd / args.repeats**0.5  # sd of a mean over --repeats runs (the reference is shared)
    print(f"gaussians8, {description}; {args.num} samples vs {args.num} reference draws, seed {args.seed}"
          + (f", mean of {args.repeats} runs per cell" if args.repeats > 1 else ""))
    print(f"noise floor (energy distance of an independent mixture sample, {args.null_draws} draws): "
          f"{1e3 * floor:.2f} +- {1e3 * floor_sd:.2f} (x1e3)\n")

    def run(name: str, steps: int | None, **options) -> dict:
        """``--repeats`` runs with seeds seed, seed+1, ...: the mean energy distance and the NFE."""
        start, eds, nfes = time.perf_counter(), [], []
        for i in range(args.repeats):
            x, nfe = source(row_sampler(name), args.num, steps, torch.Generator().manual_seed(args.seed + i), **options)
            eds.append(energy_distance(x.float(), ref) if bool(torch.isfinite(x).all()) else float("nan"))
            nfes.append(nfe)
        ed = sum(eds) / len(eds)
        return {"steps": steps, "nfe": max(nfes), "ed": ed, "eds": eds, "finite": ed == ed,
                "seconds": time.perf_counter() - start, **options}

    results: dict[str, dict[str, dict]] = {}
    for name in STEP_SAMPLERS:
        results[name] = {}
        if name not in args.samplers:
            continue
        for budget in budgets:
            if args.reference_above is not None and budget > args.reference_above and name != "ancestral":
                continue
            steps = steps_for_budget(name, process, budget)
            if steps is None:
                continue
            r = run(name, steps, **SAMPLER_OPTIONS.get(name, {}))
            if r["nfe"] > budget:
                print(f"warning: {name} at steps={steps} took {r['nfe']} NFE > budget {budget}")
            results[name][str(budget)] = r
    ode_rows = {}
    for tol in args.ode_tols if "ode" in args.samplers else []:
        ode_rows[fmt_tol(tol)] = run("ode", None, rtol=tol, atol=tol)
    results["ode"] = ode_rows
    elapsed = time.perf_counter() - t0

    # -- table --------------------------------------------------------------------------------------
    def cell(r: dict | None) -> str:
        if r is None:
            return "–"
        return f"{1e3 * r['ed']:.2f} ({r['nfe']})" if r["finite"] else f"diverged ({r['nfe']})"

    print("energy distance x1e3 (actual NFE), by NFE budget")
    print("| sampler | " + " | ".join(f"<= {b}" for b in budgets) + " | > " + str(budgets[-1]) + " |")
    print("|---|" + "---|" * (len(budgets) + 1))
    for name in (n for n in SAMPLERS if n in args.samplers):
        if name != "ode":
            print(f"| {name} | " + " | ".join(cell(results[name].get(str(b))) for b in budgets) + " | – |")
            continue
        for tol, r in ode_rows.items():
            column = next((i for i, b in enumerate(budgets) if r["nfe"] <= b), len(budgets))
            cells = ["–"] * (len(budgets) + 1)
            cells[column] = cell(r)
            print(f"| ode tol={tol} | " + " | ".join(cells) + " |")
    print(f"| noise floor | {1e3 * floor:.2f} +- {1e3 * floor_sd:.2f} |" + " |" * len(budgets))

    # -- target -------------------------------------------------------------------------------------
    slow = results["ancestral"].get("1000")
    verdict: dict = {"reference": "ancestral at 1000 NFE", "candidates": {}}
    line = "target: dpm_solver or heun at <= 20 NFE within 10% of 1000-step ancestral"
    if slow is None or not slow["finite"] or 20 not in budgets:
        print(f"\n{line}: not evaluated (needs budgets 20 and 1000)")
        verdict["met"] = None
    else:
        ed_slow = slow["ed"]
        met_by = []
        parts = []
        for name in ("dpm_solver", "heun"):
            r = results[name].get("20")
            if r is None or not r["finite"]:
                continue
            within_10 = r["ed"] <= 1.1 * ed_slow
            within_sd = r["ed"] <= ed_slow + mean_sd
            how = "within 10%" if within_10 else "within the noise floor's sd" if within_sd else "no"
            verdict["candidates"][name] = {"nfe": r["nfe"], "ed": r["ed"], "ratio": r["ed"] / ed_slow,
                                           "within_10pct": within_10, "within_floor_sd": within_sd}
            parts.append(f"{name} {1e3 * r['ed']:.2f} ({r['nfe']} NFE, {r['ed'] / ed_slow:.2f}x): {how}")
            if within_10 or within_sd:
                met_by.append(f"{name} ({how})")
        verdict["met"] = bool(met_by)
        exact = ode_rows.get(fmt_tol(min(args.ode_tols))) if ode_rows else None
        if exact is not None and exact["finite"]:  # deterministic samplers share the prior draws: a paired test
            verdict["paired_vs_ode"] = {name: c["ed"] / exact["ed"] for name, c in verdict["candidates"].items()}
            parts.append(f"paired with the ode at tol={fmt_tol(min(args.ode_tols))} "
                         f"({1e3 * exact['ed']:.2f}, same prior draws): "
                         + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in verdict["paired_vs_ode"].items()))
        print(f"\n{line}: {'MET by ' + ', '.join(met_by) if met_by else 'NOT MET'}")
        print(f"  ancestral {1e3 * ed_slow:.2f} ({slow['nfe']} NFE); noise floor sd {1e3 * mean_sd:.2f}"
              + (f" (/ sqrt({args.repeats}))" if args.repeats > 1 else "") + ";\n  " + ";\n  ".join(parts))
    # -- few-step target (issue 14): <= 10 NFE within 20% of 1000-step ancestral ----------------------
    few: dict = {"reference": "ancestral at 1000 NFE", "candidates": {}, "met": None}
    few_line = "few-step target: unipc or dpm_solver_3m at <= 10 NFE within 20% of 1000-step ancestral"
    if slow is None or not slow["finite"] or 10 not in budgets:
        print(f"\n{few_line}: not evaluated (needs budgets 10 and 1000)")
    else:
        for name in ("unipc", "dpm_solver_3m"):
            r = results[name].get("10")
            if r is not None and r["finite"]:
                few["candidates"][name] = {"nfe": r["nfe"], "ed": r["ed"], "ratio": r["ed"] / slow["ed"],
                                           "within_20pct": r["ed"] <= 1.2 * slow["ed"]}
        met = [name for name, c in few["candidates"].items() if c["within_20pct"]]
        few["met"] = bool(met)
        print(f"\n{few_line}: {'MET by ' + ', '.join(met) if met else 'NOT MET'}")
        print("  " + "; ".join(f"{name} {1e3 * c['ed']:.2f} ({c['nfe']} NFE, {c['ratio']:.2f}x)"
                               for name, c in few["candidates"].items())
              + f"; ancestral {1e3 * slow['ed']:.2f} ({slow['nfe']} NFE)")
    print(f"({elapsed:.0f} s)")

    if args.json:
        out = {"dataset": "gaussians8", "source": "ckpt" if args.ckpt else "oracle", "ckpt": args.ckpt,
               "process": type(process).__name__ if args.ckpt else args.process, "num": args.num, "seed": args.seed,
               "budgets": budgets, "repeats": args.repeats,
               "noise_floor": {"mean": floor, "sd": floor_sd, "sd_of_mean": mean_sd, "draws": null.tolist()},
               "results": results, "target": verdict, "few_step_target": few, "seconds": elapsed,
               "command": "python " + " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
