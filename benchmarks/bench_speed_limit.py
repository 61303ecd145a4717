"""The distance to this machine's limit, measured side by side in one run.

1. The machine's matmul rate: a 4096 x 4096 GEMM in float32 and in bfloat16 (the physical limit of
   the convolutions and matmuls a training step is made of), the median of several.
2. The model FLOPs of one training step of the config's model (``torch.utils.flop_counter``,
   forward + backward of the loss; the optimizer's elementwise work is not counted, as MFU
   conventions have it).
3. Training steps/s and MFU (model FLOPs/s over the matmul rate of the step's precision) of
   (a) the in-memory hand loop: the config's model, optimizer, warm-up, clipping and precision on
       pre-made batches of real digits (``bench_training_step.plain_round``), and
   (b) ``lightning-diffusion fit --config CONFIG`` exactly as shipped (data, validation, callbacks,
       logger as configured) in its own process, with one timing callback added
       (:class:`StepClock`): steps/s from the end of its first step to the end of its last, so
       every validation, callback and checkpoint in between counts; its start-up (process start to
       the first step) and its tail (last step to exit: the end-of-fit grid and the rest) are shown
       apart. The hand loop runs before and after the fit; the median of its rounds is reported.
4. Sampling samples/s of the config's model (its net at random weights: the speed does not depend
   on them) for ``--sample_num`` samples with 1000-step ``ancestral`` and 20-step ``dpm_solver``,
   with the net in float32 and in bfloat16 (``precision: bf16``), and of ``--baseline_config``'s
   model (the config as shipped before issue 14) in float32: the path "today" meant.

Targets (issue 14): (b) / (a) >= 0.9; the step's model FLOPs >= 40% of the matmul rate;
sampling samples/s >= 2x the float32 path.

Time it alone on the machine (two busy processes on two cores slow each other far more than 2x).

    python benchmarks/bench_speed_limit.py [--config configs/ddpm_digits.yaml] [--max_steps 0]
        [--json benchmarks/results/cpu_speed_limit.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_training_step import build_model, make_batches, plain_round, step_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class StepClock(L.Callback):
    """Wall-clock times of a fit, written as JSON to ``out`` when the fit ends: the end of the first
    and of the last training step, the steps between them, the end of ``fit``, and the in-memory
    hand loop measured inside the fit.

    Every ``loop_every_n_steps`` steps it stops the fit's clock and times ``loop_steps`` steps of
    the hand loop (``bench_training_step.plain_round``) on a copy of the model built from
    ``config`` with the fit's current weights, on pre-made batches, under a forked RNG (the fit's
    random stream is untouched); that time is not counted in the fit's. So both rates are sampled
    at the same moments in the same process: the ratio does not depend on the machine's speed
    drifting between measurements (on this shared 2-core VM it drifts by +-10% within minutes).

    Args:
        out: the JSON file the times are written to.
        config: the config file (to build the loop's model).
        loop_every_n_steps: fit steps between in-fit loop rounds (0: none).
        loop_steps: steps per in-fit loop round.
    """

    def __init__(self, out: str, config: str = "", loop_every_n_steps: int = 0, loop_steps: int = 30):
        self.out, self.config = out, config
        self.loop_every_n_steps, self.loop_steps = loop_every_n_steps, loop_steps
        self.first_end: float | None = None
        self.last_end: float | None = None
        self.first_step = self.last_step = 0
        self.excluded = 0.0
        self.loop: list[float] = []
        self._loop_model = self._batches = self._precision = None

    def _loop_round(self, pl_module: L.LightningModule) -> None:
        with torch.random.fork_rng():
            if self._loop_model is None:  # built once, at the first round
                config = yaml.safe_load(Path(self.config).read_text())
                self._precision = str(config.get("trainer", {}).get("precision", "32-true"))
                self._loop_model = build_model(config)
                self._batches = make_batches(8, int(config["data"]["init_args"].get("batch_size", 128)), 0,
                                             torch.device("cpu"))
            self._loop_model.load_state_dict(pl_module.state_dict())
            self.loop.append(plain_round(self._loop_model, self._batches, self.loop_steps, torch.device("cpu"),
                                         self._precision))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        now = time.time()
        if self.first_end is None:
            self.first_end, self.first_step = now, trainer.global_step
        self.last_end, self.last_step = now - self.excluded, trainer.global_step
        if self.loop_every_n_steps and trainer.global_step % self.loop_every_n_steps == 0 \
                and trainer.global_step < trainer.max_steps:
            start = time.time()
            self._loop_round(pl_module)
            self.excluded += time.time() - start

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.out).write_text(json.dumps({"first_end": self.first_end, "last_end": self.last_end,
                                              "first_step": self.first_step, "last_step": self.last_step,
                                              "fit_end": time.time() - self.excluded, "excluded": self.excluded,
                                              "loop": self.loop}))


def matmul_rate(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Median FLOP/s of an n x n x n GEMM in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def shipped_fit(config: str, max_steps: int, workdir: Path, loop_every: int, loop_steps: int) -> dict[str, Any]:
    """``lightning-diffusion fit --config config`` in its own process with :class:`StepClock`."""
    out = workdir / "clock.json"
    cmd = [sys.executable, "-m", "lightning_diffusion", "fit", "--config", config,
           "--trainer.callbacks+=bench_speed_limit.StepClock", f"--trainer.callbacks.out={out}",
           f"--trainer.callbacks.config={config}", f"--trainer.callbacks.loop_every_n_steps={loop_every}",
           f"--trainer.callbacks.loop_steps={loop_steps}", f"--trainer.logger.init_args.save_dir={workdir / 'runs'}"]
    if max_steps:
        cmd.append(f"--trainer.max_steps={max_steps}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    print(f"shipped fit: {' '.join(cmd[2:])}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
    end = time.time()
    if proc.returncode:
        raise SystemExit(f"the fit failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    clock = json.loads(out.read_text())
    steps = clock["last_step"] - clock["first_step"]
    end -= clock["excluded"]
    return {"command": " ".join(cmd[2:]), "steps": clock["last_step"],
            "steps_per_s": steps / (clock["last_end"] - clock["first_end"]),
            "startup_s": clock["first_end"] - start, "tail_s": end - clock["last_end"], "process_s": end - start,
            "in_fit_loop_steps_per_s": clock["loop"], "excluded_s": clock["excluded"]}


def sampling_rates(config: dict, num: int, device: torch.device, baseline: dict | None = None) -> dict[str, dict[str, float]]:
    """samples/s of ``sample(num)`` per (sampler, steps): the config's model with its net in fp32
    and in bf16, and (``baseline``: the config before issue 14) the baseline's model in fp32, the
    path "today" meant; all at random weights."""

    def build(cfg: dict) -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        for p in model.net.parameters():  # the zero-initialised output layer would make every call trivially cheap
            torch.nn.init.normal_(p, std=0.02)
        return model

    model = build(config)
    models = {"32": model, "bf16": model}
    rows = [("32", "32"), ("bf16", "bf16")]
    if baseline is not None:
        models["baseline-32"] = build(baseline)
        rows.insert(0, ("baseline-32", "32"))
    rates: dict[str, dict[str, float]] = {}
    for sampler, steps in (("dpm_solver", 20), ("ancestral", 1000)):
        key = f"{sampler}-{steps}"
        rates[key] = {}
        for label, precision in rows:
            generator = torch.Generator(device).manual_seed(0)
            start = time.perf_counter()
            models[label].sample(num, sampler=sampler, steps=steps, generator=generator, precision=precision)
            seconds = time.perf_counter() - start
            rates[key][label] = num / seconds
            print(f"sampling {num} with {key:16s} {label:>12s}: {seconds:7.1f} s = {num / seconds:8.2f} samples/s",
                  flush=True)
        rates[key]["ratio"] = rates[key]["bf16"] / rates[key]["32"]
        if baseline is not None:
            rates[key]["ratio_over_baseline"] = rates[key]["bf16"] / rates[key]["baseline-32"]
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "ddpm_digits.yaml"))
    p.add_argument("--max_steps", type=int, default=0, help="steps of the shipped fit (0: the config's own)")
    p.add_argument("--loop_steps", type=int, default=60, help="steps per round of the in-memory loop")
    p.add_argument("--loop_rounds", type=int, default=2, help="rounds of the in-memory loop before and after the fit")
    p.add_argument("--sample_num", type=int, default=360, help="samples per sampling measurement")
    p.add_argument("--in_fit_every", type=int, default=250,
                   help="also time a loop round inside the fit every this many steps (0: never)")
    p.add_argument("--skip_fit", action="store_true", help="do not run the shipped fit")
    p.add_argument("--workdir", help="where the shipped fit runs (default: a new temporary directory, kept)")
    p.add_argument("--skip_sampling", action="store_true")
    p.add_argument("--baseline_config", default=str(ROOT / "benchmarks" / "configs" / "ddpm_digits_before.yaml"),
                   help="the sampling baseline: this config's model with its net in fp32 ('' for none)")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    config = yaml.safe_load(Path(args.config).read_text())
    precision = str(config.get("trainer", {}).get("precision", "32-true"))
    precision = {"32": "32-true", "bf16": "bf16-mixed"}.get(precision, precision)
    batch_size = int(config["data"]["init_args"].get("batch_size", 128))

    rate = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    print(f"matmul 4096^3: fp32 {rate['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rate['bf16'] / 1e9:.0f} GFLOP/s; "
          f"{torch.get_num_threads()} threads", flush=True)
    torch.manual_seed(0)
    model = build_model(config)
    batches = make_batches(8, batch_size, 0, device)
    flops = step_flops(model, batches[0], device, precision)
    print(f"{Path(args.config).name}: {sum(q.numel() for q in model.parameters()):,} parameters, batch {batch_size}, "
          f"{precision}; {flops / 1e9:.2f} GFLOP per training step", flush=True)

    loop = []
    plain_round(model, batches, 10, device, precision)  # warm-up

    def loop_rounds() -> None:
        for _ in range(args.loop_rounds):
            loop.append(plain_round(model, batches, args.loop_steps, device, precision))
            print(f"in-memory loop: {loop[-1]:.2f} steps/s", flush=True)

    loop_rounds()
    fit = None
    if not args.skip_fit:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="speed_limit_")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        fit = shipped_fit(str(Path(args.config).resolve()), args.max_steps, workdir, args.in_fit_every,
                          args.loop_steps)
        print(f"the run is in {workdir / 'runs'}", flush=True)
        print(f"shipped fit: {fit['steps']} steps at {fit['steps_per_s']:.2f} steps/s; start-up {fit['startup_s']:.1f} s, "
              f"after the last step {fit['tail_s']:.1f} s, whole process {fit['process_s']:.1f} s", flush=True)
        loop_rounds()
    outside = statistics.median(loop)
    inside = fit["in_fit_loop_steps_per_s"] if fit else []
    # the ratio's reference: the rounds sampled inside the fit, at the same moments, where there are any
    loop_sps = statistics.median(inside) if inside else outside
    print(f"in-memory loop: median {outside:.2f} steps/s outside the fit"
          + (f", {statistics.median(inside):.2f} inside it ({len(inside)} rounds: "
             f"{', '.join(f'{v:.2f}' for v in inside)})" if inside else ""), flush=True)
    peak = rate["bf16"] if precision.startswith("bf16") else rate["fp32"]
    mfu = {"loop": flops * loop_sps / peak, "loop_of_fp32": flops * loop_sps / rate["fp32"]}
    if fit:
        mfu.update(fit=flops * fit["steps_per_s"] / peak, fit_of_fp32=flops * fit["steps_per_s"] / rate["fp32"])
    baseline = yaml.safe_load(Path(args.baseline_config).read_text()) if args.baseline_config else None
    sampling = None if args.skip_sampling else sampling_rates(config, args.sample_num, device, baseline)

    print(f"\n{'':34s}{'steps/s':>9s}{'GFLOP/s':>9s}{'MFU':>8s}{'of fp32':>9s}")
    print(f"{'in-memory hand loop':34s}{loop_sps:9.2f}{flops * loop_sps / 1e9:9.1f}{mfu['loop']:8.1%}"
          f"{mfu['loop_of_fp32']:9.1%}")
    if fit:
        print(f"{'shipped fit --config':34s}{fit['steps_per_s']:9.2f}{flops * fit['steps_per_s'] / 1e9:9.1f}"
              f"{mfu['fit']:8.1%}{mfu['fit_of_fp32']:9.1%}")
        print(f"\nshipped / in-memory = {fit['steps_per_s'] / loop_sps:.3f} (target >= 0.9)")
    print(f"step MFU = {mfu['loop']:.1%} of the {precision} matmul rate (target >= 40%)")
    if sampling:
        for key, r in sampling.items():
            print(f"sampling {key}: fp32 {r['32']:.2f} -> bf16 {r['bf16']:.2f} samples/s = {r['ratio']:.2f}x"
                  + (f"; over the baseline config's fp32 {r['baseline-32']:.2f}: {r['ratio_over_baseline']:.2f}x"
                     if "baseline-32" in r else "") + " (target >= 2)")
    if args.json:
        out = {"benchmark": "speed_limit", "config": Path(args.config).name, "precision": precision,
               "threads": torch.get_num_threads(), "batch_size": batch_size, "matmul_flops": rate,
               "flops_per_step": flops, "loop_steps_per_s_outside_fit": loop, "loop_median_outside_fit": outside,
               "loop_steps_per_s": loop_sps, "fit": fit, "mfu": mfu,
               "fit_over_loop": fit["steps_per_s"] / loop_sps if fit else None, "sampling": sampling,
               "sample_num": args.sample_num, "targets": {"fit_over_loop": 0.9, "mfu": 0.4, "sampling": 2.0}}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
