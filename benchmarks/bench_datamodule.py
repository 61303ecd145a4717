"""ShardDataModule throughput (samples/s) vs an in-memory TensorDataset DataLoader, no model.

Iterates ``ShardDataModule(dataset).train_dataloader()`` for ``--batches`` batches (starting new
epochs as needed, so epoch restarts and worker start-up are counted) and, as the baseline, a
``DataLoader(TensorDataset(x, y), batch_size, shuffle=True)`` over the same training samples
decoded once into memory (``--memory_workers`` workers, default 0: the fastest in-memory case).
Both yield the same batch size; the timings include creating the iterators. ``--cache``
(``auto``, ``true``, ``false``) is ShardDataModule's ``cache``: with it, the shards are decoded
into memory on their first complete read, so the first epochs cost what streaming does and the
later ones next to nothing; ``--compare_cache`` runs the shard stream both ways and prints the
data time per batch of each (the first epoch, and the epochs after it).

Target: none fixed; the ratio shows what streaming shards costs against holding the data in
memory. What matters for training is bench_data_wait.py (data wait <= 5% of the step).

    python benchmarks/bench_datamodule.py [--dataset digits] [--batch_size 128] [--num_workers 0] [--batches 200]
        [--cache auto|true|false] [--compare_cache]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_diffusion import ShardDataModule


def decoded_train_set(data: ShardDataModule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All training samples, decoded once by the DataModule's own reader (its every-sample-once eval loader)."""
    reader = ShardDataModule(dataset=None, val="::".join(data.urls["train"]), batch_size=1024,
                             num_classes=data.num_classes)
    batches = list(reader.val_dataloader())
    x = torch.cat([b["x"] for b in batches])
    return x, (torch.cat([b["y"] for b in batches]) if "y" in batches[0] else None)


def time_batches(make_iter, batches: int) -> tuple[float, float, int]:
    """Seconds for ``batches`` batches (restarting the iterator when exhausted), seconds to the first, samples."""
    samples, it, first = 0, None, None
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it, None) if it is not None else None
        if batch is None:
            it = make_iter()
            batch = next(it)
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        samples += x.shape[0]
        if first is None:
            first = time.perf_counter() - start
    return time.perf_counter() - start, first, samples


def epoch_times(data: ShardDataModule, batches: int) -> list[float]:
    """Milliseconds per batch of each training epoch of ``data`` (one loader, as the Trainer
    iterates it), for about ``batches`` batches in all."""
    from types import SimpleNamespace

    data.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    loader = data.train_dataloader()
    times = []
    for epoch in range(max(2, -(-batches // len(loader)))):
        data.trainer.current_epoch = epoch
        start = time.perf_counter()
        n = sum(1 for _ in loader)
        times.append((time.perf_counter() - start) * 1e3 / n)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", help="embedded dataset name or shard directory")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=0, help="ShardDataModule workers")
    p.add_argument("--memory_workers", type=int, default=0, help="workers of the in-memory DataLoader")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batches_per_epoch", type=int, default=None, help="ShardDataModule batches_per_epoch (default: its own)")
    p.add_argument("--cache", choices=("auto", "true", "false"), default="auto", help="ShardDataModule cache")
    p.add_argument("--compare_cache", action="store_true",
                   help="also time the shard stream per epoch with cache=false and cache=true")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args()

    cache = {"auto": None, "true": True, "false": False}[args.cache]
    data = ShardDataModule(dataset=args.dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                           batches_per_epoch=args.batches_per_epoch, cache=cache)
    x, y = decoded_train_set(data)
    tensors = (x,) if y is None else (x, y)
    memory = DataLoader(TensorDataset(*tensors), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.memory_workers,
                        multiprocessing_context="spawn" if args.memory_workers > 0 else None)
    if len(memory) == 0:
        p.error(f"--batch_size {args.batch_size} exceeds the {len(x)} training samples")
    shard_loader = data.train_dataloader()

    results = {}
    for name, loader in (("shards", shard_loader), ("memory", memory)):
        total, first, samples = time_batches(lambda: iter(loader), args.batches)
        results[name] = {"seconds": total, "first_batch_s": first, "samples": samples, "samples_per_s": samples / total}
    ratio = results["shards"]["samples_per_s"] / results["memory"]["samples_per_s"]

    print(f"\n{args.dataset}: {len(x)} training samples of shape {list(x.shape[1:])}, batch {args.batch_size}, "
          f"{args.batches} batches; ShardDataModule: {args.num_workers} workers, "
          f"{data.train_batches_per_rank()} batches/epoch; in-memory: {args.memory_workers} workers")
    print(f"{'':30s}{'samples/s':>12s}{'first batch (s)':>17s}{'total (s)':>11s}")
    for name, label in (("shards", "ShardDataModule"), ("memory", "in-memory TensorDataset")):
        r = results[name]
        print(f"{label:30s}{r['samples_per_s']:12.0f}{r['first_batch_s']:17.3f}{r['seconds']:11.3f}")
    print(f"\nShardDataModule (cache {data.caches('train')}) / in-memory = {ratio:.3f}")
    if args.compare_cache:
        results["per_epoch_ms_per_batch"] = per_epoch = {}
        print(f"\ndata time per batch (ms), {args.num_workers} workers: first epoch, then the mean of the later ones")
        for flag in (False, True):
            times = epoch_times(ShardDataModule(dataset=args.dataset, batch_size=args.batch_size,
                                                num_workers=args.num_workers, batches_per_epoch=args.batches_per_epoch,
                                                cache=flag), args.batches)
            per_epoch[f"cache_{str(flag).lower()}"] = times
            later = sum(times[1:]) / max(1, len(times) - 1)
            print(f"  cache={str(flag).lower():5s}  first epoch {times[0]:7.2f}   later epochs {later:7.2f}")

    if args.json:
        out = {"benchmark": "datamodule", "dataset": args.dataset, "batch_size": args.batch_size,
               "num_workers": args.num_workers, "cache": data.caches("train"), "memory_workers": args.memory_workers, "batches": args.batches,
               "batches_per_epoch": data.train_batches_per_rank(), "train_samples": len(x), **results,
               "ratio_shards_over_memory": ratio}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
