"""Our ShardDataModule feeding your own LightningModule.

The user's arrays are written once as WebDataset shards (``write_shards``: tar files plus an
``index.json`` with the counts, shape and classes), then streamed by ``ShardDataModule`` as batch
dicts ``{"x": [B, D], "y": [B]}``: a resampled, shuffled training stream with the same number of
batches on every rank, and validation that reads every sample exactly once. The DataModule knows
the data's facts (``data_shape``, ``num_classes``), so the model is built from them. The model here
is the user's own: a small classifier of labelled 2-D points. Any of the embedded datasets works
the same way (``--dataset digits`` gives 8x8 images and 10 classes).

    python examples/shard_datamodule.py
    python examples/shard_datamodule.py --dataset digits
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from lightning_diffusion import ShardDataModule, Source, write_shards


def write_my_shards(out: str | Path, num_points: int = 3000, seed: int = 0) -> Path:
    """The user's own data, three labelled spirals, written as shards into ``out``; returns ``out``."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, num_points)
    r = rng.uniform(0.2, 2.0, num_points)
    angle = 2 * math.pi * label / 3 + 2.5 * r
    points = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1) + 0.05 * rng.standard_normal((num_points, 2))
    source = Source(name="spirals", params={"num_points": num_points, "seed": seed}, kind="points",
                    pools={"all": list(zip(points.astype(np.float32), label.tolist()))},
                    classes=["arm0", "arm1", "arm2"])
    write_shards(source, out, shard_size=1000, fractions=(0.8, 0.1, 0.1), seed=seed)
    return Path(out)


class Classifier(L.LightningModule):
    """The user's model: an MLP classifier over flattened samples of any shape."""

    def __init__(self, data_shape: tuple[int, ...], num_classes: int, hidden: int = 128, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(data_shape), hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, num_classes))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.net(batch["x"])
        self.log("val/loss", nn.functional.cross_entropy(logits, batch["y"]), batch_size=len(logits))
        self.log("val/accuracy", (logits.argmax(1) == batch["y"]).float().mean(), batch_size=len(logits))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Write the shards (unless ``--dataset`` names other data), train the classifier, return its metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=None,
                        help="an embedded dataset name or a shard directory; default: write the example's own shards")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batches-per-epoch", type=int, default=100, help="training batches between validations")
    parser.add_argument("--out", default="runs/shard_datamodule", help="run directory (the shards go to OUT/shards)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dataset = args.dataset or str(write_my_shards(Path(args.out) / "shards"))
    data = ShardDataModule(dataset, batch_size=128, batches_per_epoch=args.batches_per_epoch)
    if data.num_classes is None:
        raise SystemExit(f"--dataset {dataset}: the shards have no labels; a classifier needs them")
    model = Classifier(data.data_shape, data.num_classes)
    trainer = L.Trainer(max_steps=args.max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=args.out)
    trainer.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"{data.count('val')} validation samples of {dataset}, shape {data.data_shape}, {data.num_classes} "
          f"classes: accuracy {metrics['val/accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
