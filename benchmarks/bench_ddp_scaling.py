"""DDP scaling on CPU: training throughput of 1 process vs 2 DDP processes (gloo), side by side.

Weak scaling, as DDP is used: every process trains the DDPM of ``configs/ddpm_digits.yaml`` (UNet,
digits 8x8) on its own batches of ``--batch_size`` (pre-made in memory, so the data pipeline is not
measured), through ``L.Trainer``. Each timed run is a fresh ``python`` process per side (Lightning's
launcher starts the second rank), rounds alternate 1, 2, 1, 2 ...; a run's time is that of its
steps after ``--warmup`` untimed ones (rank zero's clock, after a barrier). Reported: samples/s of
each side (all ranks), and the scaling efficiency ``samples/s(2) / (2 x samples/s(1))``.

Each process runs ``--threads`` intra-op threads (default 1): on a 2-core machine, 1 process x 1
thread vs 2 processes x 1 thread is the comparison that does not oversubscribe the cores. The ideal
is 1.0; the all-reduce of the gradients (1.0M parameters, gloo over loopback) is the overhead.

    python benchmarks/bench_ddp_scaling.py [--steps 60] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def worker(args: argparse.Namespace) -> None:
    """One timed run with ``args.world`` processes (this is rank zero; Lightning starts the rest)."""
    import logging
    import warnings

    import lightning as L
    import torch
    import yaml
    from torch.utils.data import DataLoader

    from bench_training_step import build_model, make_batches

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == args.warmup:
                trainer.strategy.barrier()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            trainer.strategy.barrier()
            self.seconds = time.perf_counter() - self.t0

    config = yaml.safe_load(Path(args.config).read_text())
    torch.manual_seed(args.seed)
    model = build_model(config)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    total = args.warmup + args.steps
    batches = make_batches(8, args.batch_size, args.seed + rank, torch.device("cpu"))
    loader = DataLoader([batches[i % len(batches)] for i in range(total)], batch_size=None, shuffle=False)
    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=args.world, strategy="ddp" if args.world > 1 else "auto",
                        max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=[timer])
    trainer.fit(model, train_dataloaders=loader)
    if trainer.is_global_zero:
        samples = args.steps * args.batch_size * args.world
        Path(args.out).write_text(json.dumps({"world": args.world, "seconds": timer.seconds,
                                              "samples_per_s": samples / timer.seconds}))
    from lightning_diffusion.distributed import end_process_group

    end_process_group()  # every rank leaves the process group together, before the interpreter exits


def timed_run(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, __file__, "--worker", "--world", str(world), "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch_size", str(args.batch_size),
               "--threads", str(args.threads), "--config", args.config, "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"world {world} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "ddpm_digits.yaml"))
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each side (alternating)")
    p.add_argument("--batch_size", type=int, default=128, help="samples per process and step")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the numbers to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    rows = []
    for r in range(args.rounds):
        one, two = timed_run(1, args), timed_run(2, args)
        rows.append({"round": r, "1": one["samples_per_s"], "2": two["samples_per_s"]})
        print(f"round {r}: 1 process {one['samples_per_s']:8.1f} samples/s   2 DDP processes "
              f"{two['samples_per_s']:8.1f} samples/s   efficiency {two['samples_per_s'] / (2 * one['samples_per_s']):.3f}")
    med = {k: statistics.median(row[k] for row in rows) for k in ("1", "2")}
    efficiency = med["2"] / (2 * med["1"])
    print(f"\nmedian: 1 process {med['1']:.1f} samples/s, 2 DDP processes {med['2']:.1f} samples/s "
          f"(x{med['2'] / med['1']:.2f}); scaling efficiency {efficiency:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "ddp_scaling_cpu", "config": Path(args.config).name, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "batch_size_per_process": args.batch_size,
            "threads_per_process": args.threads, "cpu_count": os.cpu_count(), "per_round": rows,
            "median_samples_per_s": med, "efficiency": efficiency}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
