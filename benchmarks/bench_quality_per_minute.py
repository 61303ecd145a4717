"""Quality per minute of a shipped config: the digits-CNN FID of its samples against training time.

For each ``--config`` in turn (e.g. ``ddpm_digits`` as it was before and as it is shipped now) this
runs ``lightning-diffusion fit --config CONFIG`` as a user would, in its own process, with one
callback of this file added: :class:`QualityClock`. Every ``--every_steps`` optimizer steps it stops
the clock, draws ``--num_samples`` samples from the evaluation weights (EMA where the config has
it) with a fixed fast sampler (``dpm_solver``, 20 NFE, float32), computes their FID on the digits
CNN's features against the training split (:class:`~lightning_diffusion.SampleQuality`, the
statistics the shipped configs' SampleQuality logs), writes ``(step, training seconds, FID)`` and
starts the clock again. The evaluation's own time is not counted; everything else the shipped run
does (data, validation, its own callbacks and checkpoints, the logger) is.

The metric's floor is the FID of real digits the model never trains on (the validation and test
splits, 360 images) against the same training statistics: no model can be expected below it with
500 samples. Reported per config: the training minutes until the FID first reaches 1.5x the floor
(interpolated linearly between evaluations; None if it never does) and the FID at the end.

Target (issue 14): the time to reach 1.5x the floor halved, ``after / before <= 0.5``.

Time it alone on the machine (two busy processes on two cores slow each other far more than 2x).

    python benchmarks/bench_quality_per_minute.py --config before=benchmarks/configs/ddpm_digits_before.yaml \
        --config after=configs/ddpm_digits.yaml --max_steps 1000 --every_steps 50 \
        --json benchmarks/results/cpu_quality_per_minute.json --plot docs/quality_per_minute.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class QualityClock(L.Callback):
    """Every ``every_n_steps`` steps (and at the last): the FID of ``num_samples`` samples against
    the training split, with the clock stopped, appended as a JSON line to ``out``.

    Args:
        out: the JSON-lines file the records are appended to.
        every_n_steps: optimizer steps between evaluations.
        num_samples: samples per evaluation.
        sampler: the sampler of every evaluation.
        steps: its step count (NFE for ``dpm_solver``).
    """

    def __init__(self, out: str, every_n_steps: int = 250, num_samples: int = 500, sampler: str = "dpm_solver",
                 steps: int = 20):
        from lightning_diffusion import SampleQuality

        self.out, self.every_n_steps = out, every_n_steps
        self.quality = SampleQuality(num_samples=num_samples, every_n_epochs=0, extractor="digits", metrics=["fid"],
                                     sample_options={"sampler": sampler, "steps": steps})
        self.excluded = 0.0
        self.t0: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.quality.setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0, self.excluded = time.perf_counter(), 0.0
        self._write({"event": "train_start", "step": trainer.global_step, "seconds": 0.0})

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps and step < trainer.max_steps:
            return
        start = time.perf_counter()
        seconds = start - self.t0 - self.excluded
        results = self.quality.evaluate(trainer, pl_module)
        self._write({"event": "fid", "step": step, "seconds": seconds, "fid": results["val/fid"],
                     "eval_seconds": time.perf_counter() - start})
        self.excluded += time.perf_counter() - start


def floor_fid(num_samples_note: int = 500) -> dict[str, float]:
    """FID of the real validation + test digits against the training statistics (the metric's floor)."""
    import torch

    from lightning_diffusion import SampleQuality, ShardDataModule

    data = ShardDataModule("digits", batch_size=256, num_workers=0)
    probe = SampleQuality(num_samples=num_samples_note, every_n_epochs=0, extractor="digits", metrics=["fid"])
    module = argparse.Namespace(device=torch.device("cpu"))  # real_statistics needs a module only for its device
    fid = probe.real_statistics(None, module, points=False, datamodule=data)["fid"]  # the training split's side
    extractor = probe.extractor(torch.device("cpu"))
    for split in ("val", "test"):
        for batch in data.eval_dataloader(split):
            with torch.no_grad():
                features, _ = extractor(batch["x"])
            fid.update(features, real=False)
    return {"floor_fid": fid.compute().item(), "floor_images": int(fid.fake_count), "train_images": int(fid.real_count)}


def run_config(name: str, config: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Fit ``config`` with the QualityClock; returns its records and the whole run's wall time."""
    out = workdir / f"{name}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", config,
           "--trainer.callbacks+=bench_quality_per_minute.QualityClock",
           f"--trainer.callbacks.out={out}", f"--trainer.callbacks.every_n_steps={args.every_steps}",
           f"--trainer.callbacks.num_samples={args.num_samples}",
           f"--trainer.logger.init_args.save_dir={workdir / 'runs'}", "--trainer.enable_progress_bar=false"]
    if args.max_steps:
        cmd.append(f"--trainer.max_steps={args.max_steps}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"[{name}] fit failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    curve = [{k: r[k] for k in ("step", "seconds", "fid")} for r in records if r["event"] == "fid"]
    eval_seconds = sum(r["eval_seconds"] for r in records if r["event"] == "fid")
    for r in curve:
        print(f"[{name}] step {r['step']:5d}  {r['seconds'] / 60:6.2f} min  FID {r['fid']:7.3f}", flush=True)
    return {"config": config, "curve": curve, "process_wall_s": wall, "eval_seconds": eval_seconds}


def minutes_to(curve: list[dict[str, float]], level: float) -> float | None:
    """Training minutes at which the FID first reaches ``level`` (linear between evaluations)."""
    previous = None
    for r in curve:
        if r["fid"] <= level:
            if previous is None:
                return r["seconds"] / 60
            f0, f1, s0, s1 = previous["fid"], r["fid"], previous["seconds"], r["seconds"]
            return (s0 + (s1 - s0) * (f0 - level) / (f0 - f1)) / 60
        previous = r
    return None


def plot(runs: dict[str, Any], floor: float, level: float, path: str) -> None:
    """FID against training minutes per config, log scale, with the floor and the level drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, r in runs.items():
        ax.plot([c["seconds"] / 60 for c in r["curve"]], [c["fid"] for c in r["curve"]], marker=".", label=name)
    ax.axhline(floor, color="k", lw=1, ls="--", label=f"floor (held-out real digits) {floor:.2f}")
    ax.axhline(level, color="grey", lw=1, ls=":", label=f"1.5 x floor {level:.2f}")
    ax.set_yscale("log")
    ax.set_ylim(floor * 0.8, 30)
    ax.set_xlabel("training minutes (2-core CPU, alone)")
    ax.set_ylabel("digits-CNN FID, 500 samples (dpm_solver, 20 NFE)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[], metavar="NAME=PATH",
                   help="a config to fit, named (repeat: e.g. before=... after=...)")
    p.add_argument("--every_steps", type=int, default=250, help="optimizer steps between FID evaluations")
    p.add_argument("--num_samples", type=int, default=500, help="samples per FID evaluation")
    p.add_argument("--max_steps", type=int, default=0, help="override the configs' max_steps (0: as shipped)")
    p.add_argument("--level", type=float, default=1.5, help="the quality level, as a multiple of the floor")
    p.add_argument("--workdir", help="where the runs go (default: a temporary directory)")
    p.add_argument("--json", help="write the numbers to this JSON file")
    p.add_argument("--plot", help="draw the curves into this PNG file")
    p.add_argument("--from_json", help="only redraw --plot from this earlier --json result")
    args = p.parse_args()
    if args.from_json:
        done = json.loads(Path(args.from_json).read_text())
        plot(done["runs"], done["floor_fid"], done["level_fid"], args.plot)
        return
    if not args.config:
        p.error("give --config NAME=PATH (one or more)")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="quality_per_minute_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    floor = floor_fid(args.num_samples)
    level = args.level * floor["floor_fid"]
    print(f"floor: FID {floor['floor_fid']:.3f} of {floor['floor_images']} held-out real digits vs "
          f"{floor['train_images']} training digits; level {args.level} x floor = {level:.3f}", flush=True)
    runs = {}
    for item in args.config:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--config {item!r}: write NAME=PATH")
        runs[name] = run_config(name, str(Path(path).resolve()), args, workdir)
        runs[name]["minutes_to_level"] = minutes_to(runs[name]["curve"], level)
        runs[name]["final_fid"] = runs[name]["curve"][-1]["fid"]
        runs[name]["best_fid"] = min(r["fid"] for r in runs[name]["curve"])
    print(f"\n{'config':10s}{'min to ' + str(args.level) + 'x floor':>22s}{'final FID':>11s}{'best FID':>10s}"
          f"{'train min':>11s}")
    for name, r in runs.items():
        t = r["minutes_to_level"]
        print(f"{name:10s}{('%.2f' % t) if t is not None else 'never':>22s}{r['final_fid']:11.3f}{r['best_fid']:10.3f}"
              f"{r['curve'][-1]['seconds'] / 60:11.2f}")
    names = list(runs)
    ratio = None
    if len(names) >= 2 and all(runs[n]["minutes_to_level"] is not None for n in names[:2]):
        ratio = runs[names[1]]["minutes_to_level"] / runs[names[0]]["minutes_to_level"]
        print(f"\n{names[1]} / {names[0]} time to {args.level}x floor = {ratio:.3f}  (target <= 0.5: "
              f"{'met' if ratio <= 0.5 else 'NOT met'})")
    if args.plot:
        plot(runs, floor["floor_fid"], level, args.plot)
    if args.json:
        out = {"benchmark": "quality_per_minute", **floor, "level": args.level, "level_fid": level,
               "every_steps": args.every_steps, "num_samples": args.num_samples,
               "sampler": {"sampler": "dpm_solver", "steps": 20}, "runs": runs, "ratio": ratio, "target_ratio": 0.5}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
