"""Sample quality of a DDPM trained on the embedded 8x8 digits, judged by a digit classifier.

A logistic-regression classifier is trained on the real digits (scikit-learn ``load_digits``,
pixels mapped exactly like the shards: ``round(v * 255 / 16)``, then ``/ 127.5 - 1``) of the
shards' training split (``split_indices(1797, (0.8, 0.1, 0.1), seed 0)``); its accuracy on the
test split is reported. Then ``--num`` samples are drawn from the model (quantised to 8 bits,
as a PNG would store them) and classified. Printed and written to ``--json``:

- the class histogram of the samples (a good model covers all ten digits about equally);
- the mean max-probability of the samples (how digit-like they are), next to the same number on
  the real test images as the reference.

Target: every digit present with roughly 10% of the samples, and a mean max-probability close to
that of the real test images.

The checkpoint is loaded with ``DDPM.load_from_checkpoint``: checkpoints written by the CLI keep the
net's config in their hyperparameters.

    python benchmarks/digits_sample_quality.py --ckpt runs/ddpm_digits/version_0/checkpoints/last.ckpt [--num 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lightning_diffusion import DDPM
from lightning_diffusion.checkpoints import load_checkpoint
from lightning_diffusion.data.shards import split_indices


def load_model(ckpt: Path, device: str) -> DDPM:
    """The DDPM of ``ckpt`` in eval mode. A checkpoint written by the CLI holds the net's config."""
    try:
        return DDPM.load_from_checkpoint(ckpt, map_location=device, weights_only=True).eval()
    except TypeError as e:
        raise SystemExit(f"cannot rebuild the model of {ckpt}: {e}. A model built in Python needs its net: "
                         "DDPM.load_from_checkpoint(path, net=...)") from e


def real_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real digits as flat [-1, 1] vectors, by the shards' train/val/test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).reshape(len(d.images), -1) / 127.5 - 1.0
    return {s: (x[i], d.target[i]) for s, i in split_indices(len(x), (0.8, 0.1, 0.1), 0).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint of DDPM on digits (8x8)")
    p.add_argument("--num", type=int, default=1000, help="samples to draw")
    p.add_argument("--batch_size", type=int, default=500, help="samples per sampling batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is; 1 on a busy CPU)")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sklearn.linear_model import LogisticRegression

    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        raise SystemExit(f"--ckpt {ckpt} does not exist")
    try:
        step = load_checkpoint(ckpt, mmap=True).get("global_step")  # weights_only: a bad file is named first
    except ValueError as e:
        raise SystemExit(str(e)) from e
    model = load_model(ckpt, args.device)
    if tuple(model.data_shape) != (1, 8, 8):
        raise SystemExit(f"{ckpt}: model data_shape is {model.data_shape}, expected (1, 8, 8) (digits 8x8)")
    print(f"model: {ckpt} (global step {step})")

    data = real_digits()
    clf = LogisticRegression(max_iter=5000).fit(*data["train"])
    x_test, y_test = data["test"]
    accuracy = float(clf.score(x_test, y_test))
    real_conf = float(clf.predict_proba(x_test).max(1).mean())

    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    chunks, start = [], time.perf_counter()
    for first in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - first)
        chunks.append(model.sample(n, generator=generator).float().cpu())
    seconds = time.perf_counter() - start
    x = torch.cat(chunks).clamp(-1, 1)
    x = torch.round((x + 1) * 127.5) / 127.5 - 1  # 8-bit, like the data
    proba = clf.predict_proba(x.reshape(len(x), -1).numpy())
    counts = np.bincount(proba.argmax(1), minlength=10)
    sample_conf = float(proba.max(1).mean())

    print(f"classifier: logistic regression on {len(data['train'][0])} real training digits, "
          f"test accuracy {accuracy:.4f} on {len(y_test)}")
    print(f"samples: {args.num} in {seconds:.1f} s\n")
    print("digit   " + "".join(f"{d:>6d}" for d in range(10)))
    print("count   " + "".join(f"{c:>6d}" for c in counts))
    print("share % " + "".join(f"{100 * c / args.num:>6.1f}" for c in counts))
    print(f"\nmean max-probability: samples {sample_conf:.4f}   real test images {real_conf:.4f}   "
          f"(ratio {sample_conf / real_conf:.3f})")
    print(f"digits present: {int((counts > 0).sum())}/10, smallest class share {100 * counts.min() / args.num:.1f}%")

    if args.json:
        out = {"benchmark": "digits_sample_quality", "ckpt": str(ckpt), "global_step": step, "num": args.num,
               "seed": args.seed, "classifier": "LogisticRegression",
               "classifier_test_accuracy": accuracy, "class_counts": counts.tolist(),
               "mean_max_prob_samples": sample_conf, "mean_max_prob_real_test": real_conf,
               "sampling_seconds": seconds}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
