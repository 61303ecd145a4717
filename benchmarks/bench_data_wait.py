"""How long the DDPM training step waits for data, with the digits config.

Builds the DDPM and the ShardDataModule exactly as ``lightning-diffusion fit --config
configs/ddpm_digits.yaml`` does (through DiffusionCLI, so the data facts are linked into the
model; the DataModule keeps its configured batch_size / num_workers unless overridden) and trains
in-process. A callback records per batch:

- data wait: ``on_train_batch_end`` of the previous batch -> ``on_train_batch_start`` of this one
  (fetching the next batch, plus the loop's bookkeeping; at an epoch start also the new
  DataLoader iterator, i.e. worker start-up when num_workers > 0);
- step time: ``on_train_batch_start`` of the previous batch -> ``on_train_batch_start`` of this one.

Validation, checkpointing, the logger and the final sample grid are switched off: they are not
data wait. The first ``--skip`` batches are warm-up and are not counted.

Target: data-wait fraction = total wait / total step time <= 5%.

    python benchmarks/bench_data_wait.py [--steps 200] [--num_workers N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class DataWaitTimer(L.Callback):
    """Per-batch timestamps of on_train_batch_start / on_train_batch_end (synchronised on GPU)."""

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.first_of_epoch: list[bool] = []

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(self._now(pl_module))
        self.first_of_epoch.append(batch_idx == 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(self._now(pl_module))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "ddpm_digits.yaml"))
    p.add_argument("--steps", type=int, default=200, help="training steps (batches) to run")
    p.add_argument("--skip", type=int, default=5, help="first batches not counted (warm-up)")
    p.add_argument("--num_workers", type=int, default=None, help="override data.num_workers of the config")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args()
    if args.steps <= args.skip + 1:
        p.error(f"--steps must exceed --skip + 1 ({args.skip + 1})")

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightning_diffusion.cli import DiffusionCLI

    cli_args = ["--config", args.config, "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    if args.num_workers is not None:
        cli_args.append(f"--data.init_args.num_workers={args.num_workers}")
    cli = DiffusionCLI(args=cli_args, run=False)
    model, data = cli.model, cli.datamodule

    timer = DataWaitTimer()
    trainer = L.Trainer(max_steps=args.steps, accelerator=args.accelerator, devices=1, logger=False,
                        log_every_n_steps=cli.trainer.log_every_n_steps, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, datamodule=data)

    s, e = timer.starts, timer.ends
    idx = range(args.skip + 1, len(s))
    waits = [s[i] - e[i - 1] for i in idx]
    steps = [s[i] - s[i - 1] for i in idx]
    epoch_waits = [w for i, w in zip(idx, waits) if timer.first_of_epoch[i]]
    fraction = sum(waits) / sum(steps)
    batches_per_epoch = data.train_batches_per_rank()

    print(f"\nDDPM digits: batch {data.batch_size}, num_workers {data.num_workers}, {batches_per_epoch} batches/epoch, "
          f"{trainer.strategy.root_device}, {torch.get_num_threads()} threads; {len(waits)} batches counted")
    print(f"{'':34s}{'median':>10s}{'mean':>10s}{'max':>10s}")
    for name, xs in (("step time (ms)", steps), ("data wait (ms)", waits)):
        print(f"{name:34s}{1e3 * statistics.median(xs):10.2f}{1e3 * statistics.mean(xs):10.2f}{1e3 * max(xs):10.2f}")
    if epoch_waits:
        print(f"{'data wait at epoch starts (ms)':34s}{1e3 * statistics.median(epoch_waits):10.2f}"
              f"{1e3 * statistics.mean(epoch_waits):10.2f}{1e3 * max(epoch_waits):10.2f}   ({len(epoch_waits)} epoch starts,"
              f" {100 * sum(epoch_waits) / sum(steps):.1f}% of step time)")
    print(f"\ndata-wait fraction = {100 * fraction:.2f}% of step time  (target <= 5%: {'met' if fraction <= 0.05 else 'NOT met'})")
    print(f"throughput: {len(steps) / sum(steps):.2f} steps/s")

    if args.json:
        out = {"benchmark": "data_wait", "steps": args.steps, "skip": args.skip, "batch_size": data.batch_size,
               "num_workers": data.num_workers, "batches_per_epoch": batches_per_epoch,
               "device": str(trainer.strategy.root_device), "threads": torch.get_num_threads(),
               "batches_counted": len(waits), "data_wait_fraction": fraction, "target_fraction": 0.05,
               "median_step_s": statistics.median(steps), "median_wait_s": statistics.median(waits),
               "mean_step_s": statistics.mean(steps), "mean_wait_s": statistics.mean(waits), "max_wait_s": max(waits),
               "epoch_start_waits_s": epoch_waits, "steps_per_s": len(steps) / sum(steps)}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
