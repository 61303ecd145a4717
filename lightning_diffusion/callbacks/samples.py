"""SampleGrid: a picture of samples in the run directory (and in the logger, if it takes images)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_diffusion.callbacks.ema import evaluation_weights


def save_image_grid(x: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images in [-1, 1], [N, C, H, W], as one PNG grid (``nrow`` images per row)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(math.sqrt(x.shape[0])))
    save_image((x.float().cpu() + 1) / 2, path, nrow=nrow, padding=1, pad_value=1.0)
    return path


def save_scatter(points: Tensor, path: str | Path, reference: Tensor | None = None) -> Path:
    """Save a scatter plot of 2-D ``points`` [N, 2] over ``reference`` data (grey), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        ref = reference.float().cpu()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", label="data")
    pts = points.float().cpu()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:red", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class SampleGrid(L.Callback):
    """Draws samples with ``pl_module.sample`` and saves them in ``<run dir>/samples/``.

    Images become a PNG grid; 2-D points a scatter plot over validation data. Every rank samples
    (a sharded model needs all ranks in its forward) from the same seed; rank zero writes the file
    and logs it to loggers that have ``log_image`` (W&B). Uses only the model contract.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 0, seed: int = 0,
                 num_reference: int = 2000):
        """
        Args:
            num_samples: samples per grid (images) or per scatter plot (points).
            every_n_epochs: also save a grid every this many training epochs; 0: only at fit end.
            seed: seed of the sampler's noise, the same for every grid so they compare.
            num_reference: validation points drawn under a 2-D scatter plot.
        """
        super().__init__()
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.seed, self.num_reference = seed, num_reference
        self.last_path: Path | None = None

    def _reference(self, trainer: L.Trainer) -> Tensor | None:
        """Up to ``num_reference`` validation points (None without validation data)."""
        from lightning_diffusion.callbacks.quality import _eval_batches, _images

        try:
            batches = _eval_batches(trainer, "val")
        except ValueError:
            return None
        points = []
        for batch in batches:
            points.append(_images(batch))
            if sum(p.shape[0] for p in points) >= self.num_reference:
                break
        return torch.cat(points)[: self.num_reference].cpu() if points else None

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with torch.no_grad(), evaluation_weights(trainer, pl_module):
            x = pl_module.sample(self.num_samples, generator=generator)
        path = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"{name}.png"
        if trainer.is_global_zero:
            if x.ndim == 4:
                save_image_grid(x, path)
            else:
                save_scatter(x, path, self._reference(trainer) if x.shape[-1] == 2 else None)
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
        self.last_path = path
        return path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.save(trainer, pl_module, f"epoch{trainer.current_epoch:04d}-step{trainer.global_step:07d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.save(trainer, pl_module, "final")
        rank_zero_info(f"Samples: {path}")
