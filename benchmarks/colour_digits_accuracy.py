"""Conditional sample quality of a class-conditional model trained on ``colour_digits``: does a
sample show the digit and the colour it was asked for?

Draws ``--per_class`` samples of each of the 80 classes (label ``digit * 8 + colour``) at every
``--guidance`` scale (the same noise for every scale) and reads them back with
:func:`lightning_diffusion.metrics.features.colour_digit_accuracy`: the digit with the project's
digits CNN (on the channel maximum, pooled to 8x8), the colour as the nearest named colour of the
foreground. Chance: 10% (digit), 12.5% (colour), 1.25% (both). As reference the same readers are
scored on the real test split. With ``--grid PATH`` one sample per class at the largest guidance
scale is saved as a grid, digits 0-9 in rows and the colours in columns, each image enlarged
``--scale`` times.

    python benchmarks/colour_digits_accuracy.py --ckpt runs/ddpm_colour_digits/version_0/checkpoints/last.ckpt \\
        --guidance 1 3 --per_class 10 [--grid docs/colour_digits.png] [--json out.json] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lightning_diffusion.callbacks.samples import class_labels, save_image_grid
from lightning_diffusion.commands import load_model
from lightning_diffusion.data.datamodule import ShardDataModule
from lightning_diffusion.data.sources import COLOUR_NAMES
from lightning_diffusion.metrics.features import DigitsFeatures, colour_digit_accuracy


def save_grid(x: torch.Tensor, path: Path, scale: int) -> None:
    """One image per class in class order, 8 per row (digits in rows, colours in columns), the whole
    grid enlarged ``scale`` times with nearest-neighbour pixels (``save_image_grid``'s ``min_size``
    set to ``scale`` times the native grid's longer side, which its integer factor then equals)."""
    nrow, rows = len(COLOUR_NAMES), math.ceil(len(x) / len(COLOUR_NAMES))
    native = max(min(nrow, len(x)) * (x.shape[-1] + 1), rows * (x.shape[-2] + 1)) + 1  # 1 px padding
    save_image_grid(x, path, nrow=nrow, min_size=scale * native)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by lightning-diffusion fit")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales")
    parser.add_argument("--per_class", type=int, default=10, help="samples per class (80 classes)")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    parser.add_argument("--grid", type=Path, help="write a digits x colours grid (largest guidance) here")
    parser.add_argument("--scale", type=int, default=3, help="enlargement of each image in --grid")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ckpt, used = load_model(args.ckpt, args.weights)
    if not getattr(model, "class_conditional", False) or model.num_classes != 10 * len(COLOUR_NAMES):
        raise SystemExit(f"{args.ckpt}: not a class-conditional model of colour_digits' 80 classes")
    digits = DigitsFeatures()
    real = next(iter(ShardDataModule("colour_digits", batch_size=10_000).eval_dataloader("test")))
    results = {"ckpt": str(args.ckpt), "global_step": ckpt.get("global_step"), "weights": used,
               "sampler": args.sampler, "steps": args.steps, "per_class": args.per_class,
               "real_test": colour_digit_accuracy(real["x"], real["y"], digits), "guidance": {}}
    y = class_labels(model, 80 * args.per_class)
    for w in args.guidance:
        start, chunks = time.perf_counter(), []
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for i in range(0, len(y), args.batch_size):
                chunks.append(model.sample(len(y[i:i + args.batch_size]), y=y[i:i + args.batch_size], guidance_scale=w,
                                           sampler=args.sampler, steps=args.steps, generator=generator))
        x = torch.cat(chunks)
        results["guidance"][str(w)] = {**colour_digit_accuracy(x, y, digits), "seconds": time.perf_counter() - start}
        if args.grid is not None and w == max(args.guidance):
            save_grid(x[:80], args.grid, args.scale)
    print(f"{args.ckpt} (step {results['global_step']}, {used} weights), {args.sampler} {args.steps} steps, "
          f"{80 * args.per_class} samples per scale")
    print("| guidance | digit | colour | both | seconds |\n| --- | --- | --- | --- | --- |")
    for w, r in results["guidance"].items():
        print(f"| {w} | {r['digit']:.3f} | {r['colour']:.3f} | {r['both']:.3f} | {r['seconds']:.0f} |")
    r = results["real_test"]
    print(f"| real test images | {r['digit']:.3f} | {r['colour']:.3f} | {r['both']:.3f} | |")
    if args.grid is not None:
        print(f"Wrote {args.grid}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
