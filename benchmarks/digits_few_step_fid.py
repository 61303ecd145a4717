"""Few-step sampling of a trained digits DDPM / ScoreSDE: digits-CNN FID against NFE.

Loads a checkpoint written by ``lightning-diffusion fit`` (EMA averages where the run had them),
draws ``--num`` samples with each (sampler, steps) row, the same seed and class labels for every
row, and computes their FID on the digits CNN's features against the training split (the
statistics the configs' SampleQuality logs). The reference row is 1000-step ancestral sampling.
The metric's floor (real held-out digits against the same statistics) is printed beside it.

Target (issue 14): a sampler at <= 10 NFE within 20% of the reference's FID (``ratio <= 1.2``).

    python benchmarks/digits_few_step_fid.py --ckpt runs/ddpm_digits/version_0/checkpoints/last.ckpt \
        [--num 500] [--json benchmarks/results/cpu_digits_few_step_fid.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ROWS = [("ancestral", 1000, {}), ("unipc", 10, {}), ("unipc", 8, {}), ("unipc", 5, {}), ("dpm_solver", 10, {}),
        ("dpm_solver", 10, {"order": 3}), ("ddim", 10, {}), ("dpm_solver", 20, {}), ("unipc", 20, {})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint of a DDPM or ScoreSDE trained on the digits")
    p.add_argument("--num", type=int, default=500, help="samples per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    from bench_quality_per_minute import floor_fid

    from lightning_diffusion import SampleQuality, ShardDataModule
    from lightning_diffusion.commands import load_model

    model, ckpt, weights = load_model(args.ckpt)
    data = ShardDataModule("digits", batch_size=256, num_workers=0)
    floor = floor_fid(args.num)
    print(f"{args.ckpt}: step {ckpt.get('global_step')}, {weights} weights; floor FID {floor['floor_fid']:.3f}",
          flush=True)
    rows = []
    for sampler, steps, extra in ROWS:
        options = {"sampler": sampler, "steps": steps, **extra}
        quality = SampleQuality(num_samples=args.num, every_n_epochs=0, extractor="digits", metrics=["fid"],
                                seed=args.seed, sample_options=options)
        start = time.perf_counter()
        fid = quality.evaluate(None, model, datamodule=data)["val/fid"]
        rows.append({"options": options, "nfe": model.last_sample_nfe, "fid": fid,
                     "seconds": time.perf_counter() - start})
        print(f"{sampler:11s} steps {steps:4d} {extra or ''}: NFE {model.last_sample_nfe:4d}  FID {fid:7.3f}  "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    reference = rows[0]["fid"]
    for r in rows:
        r["ratio"] = r["fid"] / reference
    best = min((r for r in rows[1:] if r["nfe"] <= 10), key=lambda r: r["fid"])
    print(f"\nbest at <= 10 NFE: {best['options']} FID {best['fid']:.3f} = {best['ratio']:.3f}x 1000-step ancestral "
          f"({reference:.3f}); target <= 1.2: {'met' if best['ratio'] <= 1.2 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "digits_few_step_fid", "ckpt": args.ckpt, "global_step": ckpt.get("global_step"),
            "weights": weights, "num": args.num, "seed": args.seed, **floor, "rows": rows,
            "best_at_10_nfe": best, "target_ratio": 1.2}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
