"""Latent against pixel diffusion on the coloured digits at equal CPU time.

Two arms get the same ``--minutes`` of training CPU time (``time.process_time`` of this process, one
intra-op thread by default; evaluations excluded, everything else a fit does, data included, counted):

- **latent**: the VAE first stage (``configs/vae_colour_digits.yaml``) for ``--vae_minutes``, then the
  class-conditional latent DDPM (``configs/latent_ddpm_colour_digits.yaml``) on its checkpoint for the
  rest of the budget; the first stage's time is the latent arm's time. Its times to the target are
  reported twice: with the first stage's minutes (``latent``) and without (``latent_prior``: the cost
  of one more prior over a first stage that is trained once and shared, as latent diffusion's first
  stages are).
- **pixel**: the class-conditional pixel DDPM (``configs/ddpm_colour_digits.yaml``) for the whole budget.

Each fit runs the shipped config as ``lightning-diffusion fit`` does (in this process), with validation,
sample grids and the logger off and :class:`CpuBudget` added: at each of ``--eval_at`` training CPU
minutes of the arm (the latent arm's count from the start of its first stage; default every quarter
minute to 2, then every minute; and at the end of the budget) it stops the clock, draws ``--per_class`` guided samples of each of
the 80 classes from the EMA weights (``--sampler`` / ``--steps``, guidance ``--guidance``) and reads their
digit and colour back (:func:`lightning_diffusion.metrics.features.colour_digit_accuracy`, as
``benchmarks/colour_digits_accuracy.py`` does). Reported per arm: training steps per CPU second (each
stage), the accuracy curve against training CPU time, bits/dim of ``--bpd_images`` test images (the
latent arm: LSGM's two-stage bound ``elbo+vlb``; the pixel arm: the DDPM's ``vlb``; both of the
unconditional (null-label) model unless ``--bpd_labels``, ``--bpd_steps`` respaces both), and the
training CPU time each arm needs to reach the pixel model's final accuracy on both digit and colour
(linear between evaluations; None if it never does).

Time it alone on the machine (two busy processes on two cores slow each other far more than 2x).

    OMP_NUM_THREADS=1 python benchmarks/bench_latent_vs_pixel.py --minutes 5 --vae_minutes 1 \\
        --json benchmarks/results/cpu_latent_vs_pixel.json [--grid docs/latent_vs_pixel.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # colour_digits_accuracy (and this file, by class path)
from cpu_budget import CPUBudget  # noqa: E402 - from this folder, put on sys.path above


def guided_samples(model: Any, per_class: int, guidance: float, sampler: str, steps: int, seed: int,
                   batch_size: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of each of the model's classes (in class order) with guidance ``guidance``, and
    their labels."""
    from lightning_diffusion.callbacks.common import class_labels

    y = class_labels(model, model.num_classes * per_class)
    generator, chunks = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            chunks.append(model.sample(len(y[i:i + batch_size]), y=y[i:i + batch_size], guidance_scale=guidance,
                                       sampler=sampler, steps=steps, generator=generator))
    return torch.cat(chunks), y


class CpuBudget(CPUBudget):
    """:class:`cpu_budget.CPUBudget` of ``budget_s`` seconds of training CPU time that, at the times
    ``eval_at_s`` (none: never) and at the end, stops the clock and appends the accuracy of guided
    samples (EMA weights) as a JSON line to ``out``, with the time as ``offset_s`` + the training CPU
    seconds so far.

    Args:
        out: the JSON-lines file.
        budget_s: training CPU seconds before the fit stops.
        offset_s: CPU seconds spent before this fit (the latent arm's first stage), added to each record.
        eval_at_s: the arm's training CPU seconds (``offset_s`` included) at which to evaluate; empty: no
            evaluation (the first stage).
        per_class: samples per class of each evaluation.
        guidance: the classifier-free guidance scale of the samples.
        sampler: the sampler of the samples.
        steps: its steps.
        seed: the noise of the samples (the same at every evaluation).
    """

    def __init__(self, out: str, budget_s: float, offset_s: float = 0.0, eval_at_s: list[float] | None = None,
                 per_class: int = 5, guidance: float = 3.0, sampler: str = "ddim", steps: int = 50, seed: int = 0):
        super().__init__(budget_s / 60)
        self.out, self.budget_s, self.offset_s = out, budget_s, offset_s
        self.eval_at_s = sorted(eval_at_s or [])
        self.per_class, self.guidance, self.sampler, self.steps, self.seed = per_class, guidance, sampler, steps, seed
        self.pending, self.done = list(self.eval_at_s), False

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.pending, self.done = [t for t in self.eval_at_s if t > self.offset_s], False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.done:
            return
        spent = self.spent()
        final = spent >= self.budget_s
        due = bool(self.pending) and self.offset_s + spent >= self.pending[0]
        if self.eval_at_s and (final or due):
            self.evaluate(trainer, pl_module, spent)
            while self.pending and self.pending[0] <= self.offset_s + spent:
                self.pending.pop(0)
        if final:
            self._write({"event": "end", "step": trainer.global_step, "cpu_s": self.offset_s + spent,
                         "train_cpu_s": spent})
            self.done = trainer.should_stop = True

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, spent: float) -> None:
        from lightning_diffusion import evaluation_weights
        from lightning_diffusion.metrics.features import colour_digit_accuracy

        start = time.process_time()
        with evaluation_weights(trainer, pl_module) as weights:
            x, y = guided_samples(pl_module, self.per_class, self.guidance, self.sampler, self.steps, self.seed)
        accuracy = colour_digit_accuracy(x, y)
        self.excluded += time.process_time() - start
        self._write({"event": "accuracy", "step": trainer.global_step, "cpu_s": self.offset_s + spent,
                     "weights": weights, **accuracy, "eval_cpu_s": time.process_time() - start})


def fit(name: str, config: str, workdir: Path, budget: dict[str, Any], settings: dict[str, Any] | None = None) -> dict:
    """``lightning-diffusion fit`` of ``configs/CONFIG.yaml`` in this process with :class:`CpuBudget`
    (``budget``: its init_args) and ``settings`` (dotted model keys) applied, validation, sample grids and
    the logger off; returns its records and the path of its last checkpoint."""
    from lightning_diffusion.cli import main

    config_dict = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    run = workdir / name
    out = workdir / f"{name}.jsonl"
    out.unlink(missing_ok=True)
    ema = [c for c in config_dict["trainer"].get("callbacks", []) if c["class_path"] == "EMA"]
    config_dict["trainer"].update(
        max_steps=10 ** 7, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, accelerator="cpu", default_root_dir=str(run),
        callbacks=[*ema, {"class_path": "bench_latent_vs_pixel.CpuBudget", "init_args": {"out": str(out), **budget}},
                   {"class_path": "LastCheckpoint", "init_args": {"dirpath": str(run / "checkpoints"),
                                                                  "every_n_train_steps": 10 ** 7}}])
    for key, value in (settings or {}).items():
        node = config_dict["model"]["init_args"]
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config_dict))
    print(f"[{name}] fit {config} for {budget['budget_s']:.0f} CPU s", flush=True)
    main(["fit", "--config", str(path)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    end = next(r for r in records if r["event"] == "end")
    curve = [{k: r[k] for k in ("step", "cpu_s", "digit", "colour", "both")} for r in records if r["event"] == "accuracy"]
    for r in curve:
        print(f"[{name}] step {r['step']:6d}  {r['cpu_s'] / 60:6.2f} CPU min  digit {r['digit']:.3f}  "
              f"colour {r['colour']:.3f}  both {r['both']:.3f}", flush=True)
    return {"config": f"configs/{config}.yaml", "steps": end["step"], "train_cpu_s": end["train_cpu_s"],
            "steps_per_s": end["step"] / max(end["train_cpu_s"], 1e-9), "curve": curve,
            "eval_cpu_s": sum(r["eval_cpu_s"] for r in records if r["event"] == "accuracy"),
            "ckpt": str(run / "checkpoints" / "last.ckpt")}


def cpu_seconds_to(curve: list[dict[str, float]], level: float, key: str = "both") -> float | None:
    """Training CPU seconds at which ``curve[key]`` first reaches ``level`` (linear between evaluations,
    from the first one; None if it never does)."""
    previous = None
    for r in curve:
        if r[key] >= level:
            if previous is None:
                return r["cpu_s"]
            a0, a1, s0, s1 = previous[key], r[key], previous["cpu_s"], r["cpu_s"]
            return s0 + (s1 - s0) * (level - a0) / (a1 - a0)
        previous = r
    return None


def bits_per_dim(ckpt: str, x: torch.Tensor, y: torch.Tensor | None, steps: int | None, batch_size: int) -> dict:
    """Mean bits/dim (and its standard error) of the images ``x`` under the EMA weights of ``ckpt``, with the
    model's own estimator (named) and one draw per image."""
    from lightning_diffusion.commands import load_model

    model, _, weights = load_model(ckpt, "ema")
    options = {} if steps is None else {"steps": steps}
    start, values = time.process_time(), []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            labels = None if y is None else y[i:i + batch_size]
            values.append(model.bits_per_dim(x[i:i + batch_size], y=labels,
                                             generator=torch.Generator().manual_seed(i), **options).double())
    bpd = torch.cat(values)
    return {"estimator": model.bpd_estimator(**options), "bpd": bpd.mean().item(),
            "se": (bpd.std() / math.sqrt(len(bpd))).item() if len(bpd) > 1 else None, "images": len(bpd),
            "weights": weights, "cpu_s": time.process_time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training CPU minutes of each arm")
    parser.add_argument("--vae_minutes", type=float, default=1.0, help="training CPU minutes of the latent arm's VAE")
    parser.add_argument("--eval_at", type=float, nargs="+",
                        help="training CPU minutes of each arm at which to evaluate (every 0.25 to 2, then every 1)")
    parser.add_argument("--per_class", type=int, default=5, help="guided samples per class at each evaluation")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--bpd_images", type=int, default=200, help="test images scored (0: none)")
    parser.add_argument("--bpd_steps", type=int, help="respaced steps of both VLBs (default: all T)")
    parser.add_argument("--bpd_labels", action="store_true", help="score -log p(x | y) instead of -log p(x)")
    parser.add_argument("--bpd_batch_size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="runs and records (default: a temporary directory)")
    parser.add_argument("--grid", type=Path, help="write both arms' final guided grids (one per class) here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not 0 < args.vae_minutes < args.minutes:
        raise SystemExit(f"--vae_minutes {args.vae_minutes}: must lie in (0, --minutes {args.minutes})")
    torch.set_num_threads(args.threads)
    budget_s = 60 * args.minutes
    eval_at = args.eval_at or [m / 4 for m in range(1, 8)] + list(range(2, math.ceil(args.minutes)))
    eval_at_s = [60 * m for m in eval_at if 0 < m < args.minutes]
    sampling = dict(per_class=args.per_class, guidance=args.guidance, sampler=args.sampler, steps=args.steps)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latent_vs_pixel_"))
    workdir.mkdir(parents=True, exist_ok=True)

    vae_s = 60 * args.vae_minutes
    vae = fit("vae", "vae_colour_digits", workdir, {"budget_s": vae_s})
    prior = fit("latent", "latent_ddpm_colour_digits", workdir,
                {"budget_s": budget_s - vae["train_cpu_s"], "offset_s": vae["train_cpu_s"],
                 "eval_at_s": eval_at_s, **sampling}, {"first_stage_ckpt": vae["ckpt"]})
    pixel = fit("pixel", "ddpm_colour_digits", workdir, {"budget_s": budget_s, "eval_at_s": eval_at_s, **sampling})

    results: dict[str, Any] = {
        "minutes": args.minutes, "vae_minutes": args.vae_minutes, "threads": args.threads, "eval_at_minutes": eval_at,
        "sampling": sampling, "torch": torch.__version__,
        "latent": {"first_stage": {k: vae[k] for k in ("config", "steps", "train_cpu_s", "steps_per_s")},
                   "prior": {k: prior[k] for k in ("config", "steps", "train_cpu_s", "steps_per_s", "eval_cpu_s")},
                   "train_cpu_s": vae["train_cpu_s"] + prior["train_cpu_s"], "curve": prior["curve"]},
        "pixel": {k: pixel[k] for k in ("config", "steps", "train_cpu_s", "steps_per_s", "eval_cpu_s", "curve")},
    }
    target = pixel["curve"][-1]["both"] if pixel["curve"] else None
    results["target_both"] = target
    results["cpu_s_to_target"] = {arm: None if target is None else cpu_seconds_to(run["curve"], target)
                                  for arm, run in (("latent", prior), ("pixel", pixel))}
    latent_s = results["cpu_s_to_target"]["latent"]
    results["cpu_s_to_target"]["latent_prior"] = None if latent_s is None else latent_s - vae["train_cpu_s"]

    if args.bpd_images:
        from lightning_diffusion import ShardDataModule

        test = next(iter(ShardDataModule("colour_digits", batch_size=args.bpd_images).eval_dataloader("test")))
        y = test["y"] if args.bpd_labels else None
        for arm, run in (("latent", prior), ("pixel", pixel)):
            results[arm]["bpd"] = bits_per_dim(run["ckpt"], test["x"], y, args.bpd_steps, args.bpd_batch_size)
    if args.grid is not None:
        from colour_digits_accuracy import save_grid
        from lightning_diffusion.commands import load_model

        grids = []
        for run in (prior, pixel):
            model, _, _ = load_model(run["ckpt"], "ema")
            grids.append(guided_samples(model, 1, args.guidance, args.sampler, args.steps, seed=0)[0])
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        save_grid(torch.cat(grids), args.grid, scale=3)  # latent's 10 rows above the pixel model's

    print(f"\n{args.minutes:g} CPU minutes per arm ({args.threads} thread(s)); guided samples: {args.per_class} per class, "
          f"{args.sampler} {args.steps} steps, guidance {args.guidance:g}")
    print("| arm | steps/s | digit | colour | both | bits/dim (estimator) | CPU min to pixel's both |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arm in ("latent", "pixel"):
        r = results[arm]
        rate = (f"vae {r['first_stage']['steps_per_s']:.2f}, prior {r['prior']['steps_per_s']:.2f}" if arm == "latent"
                else f"{r['steps_per_s']:.2f}")
        last = r["curve"][-1] if r["curve"] else {"digit": math.nan, "colour": math.nan, "both": math.nan}
        bpd = r.get("bpd")
        bpd_text = f"{bpd['bpd']:.3f} ({bpd['estimator']})" if bpd else "-"
        to = results["cpu_s_to_target"][arm]
        to_text = "never" if to is None else f"{to / 60:.2f}"
        if arm == "latent" and to is not None:
            to_text += f" ({results['cpu_s_to_target']['latent_prior'] / 60:.2f} without the first stage)"
        print(f"| {arm} | {rate} | {last['digit']:.3f} | {last['colour']:.3f} | {last['both']:.3f} | {bpd_text} | "
              f"{to_text} |")
    print(f"target: the pixel arm's last both-accuracy, {target}")
    print(f"runs in {workdir}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
