"""One bits/dim table on the 8x8 digits test split for every model family: DDPM (and the energy-based
DDPM), ScoreSDE, VAE, HierarchicalVAE, VQ-VAE, EBM, DiscreteDiffusion (absorbing and uniform) and
LatentDiffusion, with the FID of a fast sampler and the training and evaluation time of each checkpoint.
``benchmarks/bench_families_budget.py`` trains every family for the same wall time and scores them
with this code.

Every checkpoint is loaded with ``lightning_diffusion.commands.load_model`` (EMA weights when the
run had an EMA callback; ``--weights raw`` for the raw ones) and scored on the same 180 test images
(the 8-bit digits; the discrete models read them as K = 256 categories, checked to be the same
pixels), each estimator with its own fixed noise seed:

- ``ddpm``: the full variational bound (every one of the T = 1000 terms; ``--ddpm_steps S`` for the
  respaced bound), discretized-Gaussian decoder;
- ``energy``: a DDPM whose net outputs an energy (``parameterization: energy``): the same bound as
  ``ddpm`` (``--energy_batch_t`` timesteps x ``--energy_bpd_batch_size`` images per call: the net keeps a
  graph for ``grad_x E``);
- ``latent``: LatentDiffusion's two-stage bound (``elbo+vlb``: one draw z ~ q(z | x), the VAE first
  stage's nats and the DDPM prior's bound on the scaled latents; ``--ddpm_steps`` respaces the prior's);
- ``vqvae``: its ``vq-uniform-prior`` bound (deterministic: the decoder's discrete likelihood of the
  encoder's codes plus log K nats per code position);
- ``score_sde``: the probability-flow ODE likelihood with the model's defaults (adaptive solver,
  one uniform dequantization; ``--sde_steps N`` for a fixed rk4 grid);
- ``vae``, ``hvae``: the IWAE bound at ``--iwae_k`` (1000; evaluated in chunks of at most B rows
  with a running logsumexp inside ``bits_per_dim``) and the ELBO (K = 1);
- ``ebm``: ``E(x) + log Z`` with log Z by forward AIS at the checkpoint's ``ais_chains`` x
  ``ais_steps`` (``--ebm_ais_chains`` / ``--ebm_ais_steps`` override them); log Z, its Monte Carlo
  standard error and the settings are reported. AIS errs low on log Z, so this NLL errs low;
- ``discrete_absorbing``, ``discrete_uniform``: the model's exact bound (``vlb``: all T terms
  summed; ``masked-elbo`` in continuous time: ``elbo_samples`` stratified times), no dequantization.

Bits/dim is the mean over the test images +- its standard error (std / sqrt(n)); the standard
error is over images only, not over the estimators' own noise (AIS log Z's error is listed apart).

FID: ``--fid_samples`` samples per model against the statistics of the real test split, with the
digits CNN features (``SampleQuality(extractor="digits", real_split="test")``, the code of
``lightning-diffusion evaluate``). One fixed fast sampler per family (``--sample_options
FAMILY=JSON`` replaces it): DDPM, energy DDPM and the latent DDPM prior ``{sampler: ddim, steps: 50}``
(the latent model then decodes with the VAE's mean), VQ-VAE its own ``sample`` (codes uniform over the
codebook, the prior of its bound, then a decoder draw: noise-like by design, NFE 1), ScoreSDE ``{sampler: dpm_solver,
steps: 20}``, VAE/HVAE the decoder's sample at temperature 1, EBM ``{sampler: mala}`` (the model's
``sample_steps`` from fresh chains at the base, as its config's sample grid), discrete ancestral with
100 steps. With 180 real test images the FID has a large bias; it ranks models, it is not a
paper number.

Training time: metrics.csv has no wall-clock column, so the training wall time is the checkpoint
file's mtime minus the mtime of the run's ``config.yaml`` (written by rank zero when ``fit`` starts,
after the model and data are built). It includes the validation and in-training evaluations
(sample grids, SampleQuality, Likelihood) and, for a resumed run (``config-2.yaml``, ...), the time
between launches; the number of launches is reported. The step count is the checkpoint's
``global_step`` next to the config's ``trainer.max_steps``.

    python benchmarks/bench_six_families.py \\
        --ckpt ddpm=runs/ddpm_digits/version_0/checkpoints/last.ckpt \\
        --ckpt score_sde=runs/sde_vp_digits/version_0/checkpoints/last.ckpt \\
        --ckpt vae=runs/vae_digits/version_0/checkpoints/last.ckpt \\
        --ckpt hvae=runs/hvae_digits/version_0/checkpoints/last.ckpt \\
        --ckpt ebm=runs/ebm_digits/version_0/checkpoints/last.ckpt \\
        --ckpt discrete_absorbing=runs/discrete_absorbing_digits/version_0/checkpoints/last.ckpt \\
        --ckpt discrete_uniform=runs/discrete_uniform_digits/version_0/checkpoints/last.ckpt \\
        --fid_samples 500 --threads 2 --json benchmarks/results/cpu_six_families.json

Any subset of the families works; results are written to ``--json`` after every family, so an
interrupted run keeps what it finished. ``--num_test N`` scores only the first N test images
(smoke tests).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

#: family -> (class name, variant): the variant is what :func:`variant` reads off the model (a
#: DiscreteDiffusion's corruption; a Gaussian diffusion whose net outputs an energy, ``energy-net``;
#: None for the others), so a checkpoint of the wrong kind is refused.
FAMILIES: dict[str, tuple[str, str | None]] = {
    "ddpm": ("DDPM", None),
    "energy": ("DDPM", "energy-net"),
    "score_sde": ("ScoreSDE", None),
    "vae": ("VAE", None),
    "hvae": ("HierarchicalVAE", None),
    "vqvae": ("VQVAE", None),
    "ebm": ("EBM", None),
    "ebm_recovery": ("EBM", "recovery"),
    "discrete_absorbing": ("DiscreteDiffusion", "absorbing"),
    "discrete_uniform": ("DiscreteDiffusion", "uniform"),
    "latent": ("LatentDiffusion", None),
}

SAMPLE_OPTIONS: dict[str, dict[str, Any]] = {
    "ddpm": {"sampler": "ddim", "steps": 50},
    "energy": {"sampler": "ddim", "steps": 50},  # every sampler runs unchanged on the energy's gradient
    "score_sde": {"sampler": "dpm_solver", "steps": 20},
    "vae": {},
    "hvae": {},
    "vqvae": {},  # codes uniform over the codebook (the prior of its bound), then the decoder's draw
    "ebm": {"sampler": "mala"},
    "ebm_recovery": {},  # the model's default: the walk down its noise ladder
    "discrete_absorbing": {"sampler": "ancestral", "steps": 100},
    "discrete_uniform": {"sampler": "ancestral", "steps": 100},
    "latent": {"sampler": "ddim", "steps": 50},  # the DDPM prior's sampler, then the decoder's mean
}

#: network evaluations of one ``sample`` call for the models that do not count them: one decoder pass
DECODER_ONLY = ("VAE", "HierarchicalVAE", "VQVAE")


def variant(model) -> str | None:
    """What tells two families of one class apart: a DiscreteDiffusion's corruption; ``energy-net`` for a
    Gaussian diffusion whose net outputs an energy (its parameterization's row has an energy scale);
    ``recovery`` for an EBM trained by recovery likelihood; None otherwise."""
    if hasattr(model, "corruption"):
        return model.corruption
    if getattr(model, "objective", None) == "recovery":  # an EBM trained by diffusion recovery likelihood
        return "recovery"
    name = getattr(model, "parameterization", None)
    if isinstance(name, str):
        from lightning_diffusion.diffusion.parameterization import row

        return "energy-net" if row(name).energy_scale is not None else None
    return None


def parse_pairs(values: list[str], what: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        family, sep, rest = value.partition("=")
        if not sep or family not in FAMILIES:
            parser.error(f"{what} {value!r}: expected FAMILY=..., FAMILY one of {', '.join(FAMILIES)}")
        out[family] = rest
    return out


def training_time(ckpt: Path) -> dict[str, Any]:
    """The run directory's facts: training wall time (checkpoint mtime - config.yaml mtime), launches
    and the config's max_steps. Empty values when the checkpoint is not in a run directory."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    configs = sorted(run.glob("config*.yaml"), key=lambda p: p.stat().st_mtime)
    first = run / "config.yaml"
    out: dict[str, Any] = {"run_dir": str(run), "launches": len(configs), "train_seconds": None, "max_steps": None}
    if first.is_file():
        out["train_seconds"] = ckpt.stat().st_mtime - first.stat().st_mtime
        import yaml

        try:
            config = yaml.safe_load(first.read_text()) or {}
            out["max_steps"] = (config.get("trainer") or {}).get("max_steps")
        except yaml.YAMLError:
            pass
    return out


def test_split(categorical: bool, limit: int | None) -> torch.Tensor:
    from lightning_diffusion import ShardDataModule

    dm = ShardDataModule("digits", batch_size=1000, categorical=True if categorical else None)
    dm.setup("test")
    x = torch.cat([batch["x"] for batch in dm.test_dataloader()])
    return x[:limit] if limit else x


def summarize(bits: torch.Tensor) -> tuple[float, float]:
    bits = bits.double()
    return bits.mean().item(), (bits.std() / math.sqrt(len(bits))).item() if len(bits) > 1 else float("nan")


def score(model, x: torch.Tensor, batch_size: int, seed: int, **options) -> tuple[torch.Tensor, float]:
    """bits_per_dim of every row of ``x`` in batches, one generator for the whole split; (bits, seconds)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    start, parts = time.perf_counter(), []
    for chunk in x.split(batch_size):
        parts.append(model.bits_per_dim(chunk.to(model.device), generator=generator, **options).double().cpu())
    return torch.cat(parts), time.perf_counter() - start


def bpd_rows(family: str, model, x_float: torch.Tensor, x_cat: torch.Tensor, args) -> tuple[list[dict], dict]:
    """The bits/dim rows of one model ([{estimator, bits_per_dim, stderr, seconds, options}]) and extras."""
    jobs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    x, batch_size = x_float, args.bpd_batch_size
    if family in ("ddpm", "latent"):  # the latent model's options are its DDPM prior's
        jobs.append({"steps": args.ddpm_steps, "batch_t": args.ddpm_batch_t})
    elif family == "energy":  # the energy net keeps a graph for grad_x E: smaller batches
        jobs.append({"steps": args.ddpm_steps, "batch_t": args.energy_batch_t})
        batch_size = min(batch_size, args.energy_bpd_batch_size)
    elif family == "score_sde":
        jobs.append({} if args.sde_steps is None else {"steps": args.sde_steps})
    elif family in ("vae", "hvae"):
        jobs.append({"num_importance_samples": args.iwae_k})
        jobs.append({"num_importance_samples": 1})
    elif family in ("ebm", "ebm_recovery"):
        if args.ebm_ais_chains is not None:
            model.ais_chains = args.ebm_ais_chains
        if args.ebm_ais_steps is not None:
            model.ais_steps = args.ebm_ais_steps
        start = time.perf_counter()
        log_z, log_z_se, method = model.log_partition(torch.Generator(device=model.device).manual_seed(args.seed))
        extra.update({"log_z": log_z, "log_z_stderr": log_z_se, "log_z_method": method,
                      "log_z_seconds": time.perf_counter() - start,
                      # log Z's Monte Carlo error in bits/dim (the same shift for every image)
                      "log_z_stderr_bpd": log_z_se / (math.prod(model.data_shape) * math.log(2)),
                      "ais_chains": model.ais_chains, "ais_steps": model.ais_steps,
                      "ais_step_size": model.ais_step_size or model.step_size,
                      "whiten_chains": getattr(model, "whiten_chains", None)})
        jobs.append({})  # log Z is cached: bits_per_dim reuses it
    elif family.startswith("discrete"):
        x = x_cat
        extra.update({"corruption": model.corruption, "timesteps": model.timesteps, "schedule": model.schedule})
        if model.process.continuous:
            extra["elbo_samples"] = model.elbo_samples
        jobs.append({})
    else:  # the contract suffices (vqvae: its vq-uniform-prior bound, deterministic)
        jobs.append({})
    rows = []
    for options in jobs:
        bits, seconds = score(model, x, batch_size, args.seed, **options)
        if family in ("ebm", "ebm_recovery"):
            seconds += extra["log_z_seconds"]
        mean, se = summarize(bits)
        estimator = model.bpd_estimator(**options)
        if family == "score_sde" and options.get("steps"):
            estimator += f"-rk4-{options['steps']}"  # bpd_estimator names the divergence, not the solver
        rows.append({"estimator": estimator, "bits_per_dim": mean, "stderr": se, "n": len(bits), "seconds": seconds,
                     "options": options, "nfe": getattr(model, "last_likelihood_nfe", None)})
    return rows, extra


def fid(model, options: dict[str, Any], args, datamodule) -> dict[str, Any]:
    """Digits-CNN FID of ``args.fid_samples`` samples against the real test split (SampleQuality),
    with the sampling time and NFE of the model's ``sample`` calls."""
    from lightning_diffusion.callbacks.quality import SampleQuality

    quality = SampleQuality(num_samples=args.fid_samples, extractor="digits", weights_path=args.extractor_weights,
                            metrics=["fid"], real_split="test", batch_size=args.fid_batch_size, seed=args.seed,
                            sample_options=options)
    quality.real_statistics(None, model, False, datamodule)  # cached on disk; not part of the timing
    sampled = {"seconds": 0.0, "nfe": None}
    original = model.sample

    @functools.wraps(original)  # sample's signature stays readable: check_sample_options reads its options from it
    def timed(*a, **kw):
        start = time.perf_counter()
        out = original(*a, **kw)
        sampled["seconds"] += time.perf_counter() - start
        sampled["nfe"] = getattr(model, "last_sample_nfe", None)
        if sampled["nfe"] is None and getattr(model, "objective", None) == "recovery" and not kw.get("sampler"):
            sampled["nfe"] = model.recovery_levels * model.recovery_steps  # the ladder: K Langevin steps per level
        elif sampled["nfe"] is None and type(model).__name__ == "EBM":  # one energy gradient per MCMC step
            sampled["nfe"] = kw.get("steps") or model.sample_steps
        elif sampled["nfe"] is None and type(model).__name__ in DECODER_ONLY:
            sampled["nfe"] = 1  # one decoder (top-down) pass
        return out

    model.sample = timed  # an instance attribute: SampleQuality's calls go through the timer
    try:
        start = time.perf_counter()
        results = quality.evaluate(None, model, datamodule=datamodule)
        seconds = time.perf_counter() - start
    finally:
        del model.sample
    return {"fid": results["val/fid"], "fid_samples": int(results["val/fid_num_samples"]), "sample_options": options,
            "nfe": sampled["nfe"], "sample_seconds": sampled["seconds"],
            "samples_per_second": args.fid_samples / max(sampled["seconds"], 1e-9), "fid_seconds": seconds}


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def table(results: dict[str, Any]) -> str:
    lines = ["| family | checkpoint step | training (wall) | estimator | bits/dim | eval time | FID (sampler, NFE) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for family, r in results["families"].items():
        f = r.get("fid")
        if f:
            opts = ", ".join(f"{k} {v}" for k, v in f["sample_options"].items()) or "default"
            fid_cell = f"{f['fid']:.2f} ({opts}; NFE {f['nfe'] if f['nfe'] is not None else '-'})"
        else:
            fid_cell = "-"
        steps = f"{r['global_step']}" + (f" / {r['max_steps']}" if r.get("max_steps") else "")
        for i, row in enumerate(r["bpd"]):
            note = ""
            if family in ("ebm", "ebm_recovery"):
                note = f" (log Z {r['log_z']:.2f} +- {r['log_z_stderr']:.2f} nats, AIS {r['ais_chains']}x{r['ais_steps']})"
            lines.append(f"| {family if i == 0 else ''} | {steps if i == 0 else ''} | "
                         f"{fmt_time(r['train_seconds']) if i == 0 else ''} | {row['estimator']}{note} | "
                         f"{row['bits_per_dim']:.3f} +- {row['stderr']:.3f} | {fmt_time(row['seconds'])} | "
                         f"{fid_cell if i == 0 else ''} |")
    return "\n".join(lines)


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The scoring options (shared with ``bench_families_budget.py``)."""
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is; 1 on a busy CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the estimators' noise and of sampling")
    p.add_argument("--num_test", type=int, default=None, help="score only the first N test images (smoke tests)")
    p.add_argument("--bpd_batch_size", type=int, default=180, help="test images per bits_per_dim call")
    p.add_argument("--ddpm_steps", type=int, default=None,
                   help="DDPM, energy DDPM, latent DDPM prior: respaced bound of S steps (None: all T)")
    p.add_argument("--ddpm_batch_t", type=int, default=100, help="DDPM: timesteps per net call in the bound")
    p.add_argument("--energy_batch_t", type=int, default=25, help="energy DDPM: timesteps per net call in the bound "
                   "(the energy net keeps a graph for grad_x E: batch_t x images at once)")
    p.add_argument("--energy_bpd_batch_size", type=int, default=60, help="energy DDPM: test images per bound call")
    p.add_argument("--sde_steps", type=int, default=None, help="ScoreSDE: fixed rk4 grid (None: adaptive ODE)")
    p.add_argument("--iwae_k", type=int, default=1000, help="VAE/HVAE: importance samples of the IWAE bound")
    p.add_argument("--ebm_ais_chains", type=int, default=None, help="EBM: AIS chains (None: the checkpoint's)")
    p.add_argument("--ebm_ais_steps", type=int, default=None, help="EBM: AIS distributions (None: the checkpoint's)")
    p.add_argument("--fid_samples", type=int, default=500, help="samples per model for the FID (0: no FID)")
    p.add_argument("--fid_batch_size", type=int, default=250, help="samples per sample() call")
    p.add_argument("--sample_options", action="append", metavar="FAMILY=JSON",
                   help="replace a family's FID sampler options, e.g. ddpm='{\"sampler\": \"dpm_solver\", \"steps\": 20}'")
    p.add_argument("--extractor_weights", default=None, help="digits CNN weights (default $LD_DATA/weights)")


def sample_options_of(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """:data:`SAMPLE_OPTIONS` with ``--sample_options`` applied."""
    options = {k: dict(v) for k, v in SAMPLE_OPTIONS.items()}
    for family, text in parse_pairs(args.sample_options, "--sample_options", p).items():
        options[family] = json.loads(text)
    return options


class DigitsTestSplit:
    """The digits test split as floats and as categories (checked to be the same pixels) and the FID's
    data module."""

    def __init__(self, num_test: int | None) -> None:
        from lightning_diffusion import ShardDataModule

        self.x_float, self.x_cat = test_split(False, num_test), test_split(True, num_test)
        if not torch.equal(torch.round((self.x_float + 1) * 127.5).long(), self.x_cat):
            raise SystemExit("the categorical digits test split is not the float one's pixels")
        self.fid_data = ShardDataModule("digits", batch_size=256, num_workers=0)
        self.fid_data.setup("test")


def score_checkpoint(family: str, path: Path, args: argparse.Namespace, data: DigitsTestSplit,
                     sample_options: dict[str, Any]) -> dict[str, Any]:
    """Load one checkpoint, check it is of ``family`` on the digits, and score it: bits/dim rows with the
    family's estimator(s), FID (``args.fid_samples`` > 0) with ``sample_options``; printed as it goes."""
    from lightning_diffusion.commands import load_model

    model, ckpt, used = load_model(path, args.weights, args.device)
    cls, kind = FAMILIES[family]
    if type(model).__name__ != cls or variant(model) != kind:
        found = variant(model)
        raise SystemExit(f"--ckpt {family}={path}: the checkpoint holds a {type(model).__name__}"
                         + (f" ({found})" if found else "") + f", not a {cls}" + (f" ({kind})" if kind else ""))
    if tuple(model.data_shape) != (1, 8, 8):
        raise SystemExit(f"--ckpt {family}={path}: data_shape {model.data_shape}, not the digits' (1, 8, 8)")
    r: dict[str, Any] = {"checkpoint": str(path), "class": cls, "weights": used,
                         "global_step": ckpt.get("global_step"), **training_time(path)}
    print(f"{family}: {path} (step {r['global_step']}, {used} weights, training {fmt_time(r['train_seconds'])})",
          flush=True)
    rows, extra = bpd_rows(family, model, data.x_float, data.x_cat, args)
    r["bpd"] = rows
    r.update(extra)
    for row in rows:
        print(f"  {row['estimator']:>14}: {row['bits_per_dim']:.4f} +- {row['stderr']:.4f} bits/dim "
              f"({row['n']} images, {row['seconds']:.1f} s)", flush=True)
    if family in ("ebm", "ebm_recovery"):
        print(f"  log Z {extra['log_z']:.3f} +- {extra['log_z_stderr']:.3f} nats ({extra['log_z_method']}, "
              f"{extra['ais_chains']} chains x {extra['ais_steps']} steps, {extra['log_z_seconds']:.1f} s)")
    if args.fid_samples:
        r["fid"] = fid(model, sample_options, args, data.fid_data)
        f = r["fid"]
        print(f"  FID {f['fid']:.3f} ({f['fid_samples']} samples, {f['sample_options']}, NFE {f['nfe']}, "
              f"{f['samples_per_second']:.1f} samples/s, {f['fid_seconds']:.1f} s)", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", metavar="FAMILY=PATH", required=True,
                   help=f"a checkpoint of one family ({', '.join(FAMILIES)}); repeat for each")
    add_scoring_args(p)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpts = parse_pairs(args.ckpt, "--ckpt", p)
    sample_options = sample_options_of(args, p)
    for family, path in ckpts.items():
        if not Path(path).exists():
            p.error(f"--ckpt {family}={path}: no such file")

    data = DigitsTestSplit(args.num_test)
    results: dict[str, Any] = {"benchmark": "bench_six_families", "dataset": "digits", "split": "test",
                               "num_test": len(data.x_float), "threads": torch.get_num_threads(), "seed": args.seed,
                               "device": args.device, "fid_real": "digits test split", "families": {}}
    print(f"digits test split: {len(data.x_float)} images, {torch.get_num_threads()} threads, device {args.device}",
          flush=True)
    for family in FAMILIES:
        if family not in ckpts:
            continue
        results["families"][family] = score_checkpoint(family, Path(ckpts[family]), args, data, sample_options[family])
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
