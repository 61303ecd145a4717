"""SampleGrid: a picture of samples in the run directory (and in the logger, if it takes images)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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


def class_labels(module: Any, num: int, offset: int = 0, device: torch.device | str | None = None) -> Tensor | None:
    """Labels for ``num`` samples of a model with ``class_conditional = True`` and ``num_classes``:
    sample i gets class ``(offset + i) % num_classes`` (balanced, in class order, so a grid with a
    multiple of ``num_classes`` samples shows every class in turn); None for any other model.

    Args:
        module: the model; only its ``class_conditional`` and ``num_classes`` attributes are read.
        num: number of labels.
        offset: class of the first sample (for a batch inside a larger set).
        device: device of the labels.
    """
    if not getattr(module, "class_conditional", False):
        return None
    return (torch.arange(offset, offset + num, device=device) % int(module.num_classes)).long()


def check_model_options(pl_module: Any, where: str, options: dict[str, Any], check: str = "check_sample_options",
                        written_as: dict[str, str] | None = None) -> None:
    """Check a callback's options for the model before training: ``pl_module.<check>(**options)``
    (``check_sample_options`` or ``check_bpd_options``; a model without it, such as a user's own
    LightningModule, is not checked). A refused option becomes a ValueError that names it as the
    config writes it, ``<where>.<option>=<value>`` (``where``: e.g. ``SampleQuality.sample_options``;
    ``written_as`` renames options the callback took elsewhere), with what is allowed and what to do.

    Args:
        pl_module: the model.
        where: the callback and its option, as in the config.
        options: the options the callback will pass.
        check: the model's check method.
        written_as: option -> how the config writes it, for options not in ``where``.
    """
    from lightning_diffusion.diffusion.samplers import OptionError

    method = getattr(pl_module, check, None)
    if method is None:
        return
    try:
        method(**options)
    except OptionError as error:
        written_as = written_as or {}
        if error.option in written_as or error.option in options:
            name = written_as.get(error.option, f"{where}.{error.option}")
            given = f"{name}={error.value!r}"
        else:  # a default that the options leave in place
            given = f"{where}={options!r}"
        advice = f"; {error.advice}" if error.advice else ""
        raise ValueError(f"{given}: {error.problem}{advice}") from None


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

    A class-conditional model (``class_conditional = True``, ``num_classes``) is sampled with the
    labels of :func:`class_labels`, in class order: ``nrow`` images per row. On ``colour_digits``
    (label ``digit * 8 + colour``) 80 samples with ``nrow: 8`` put digits in rows and colours in
    columns.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 0, seed: int = 0,
                 num_reference: int = 2000, nrow: int | None = None, guidance_scale: float = 1.0,
                 sample_options: dict[str, Any] | None = None):
        """
        Args:
            num_samples: samples per grid (images) or per scatter plot (points).
            every_n_epochs: also save a grid every this many training epochs; 0: only at fit end.
            seed: seed of the sampler's noise, the same for every grid so they compare.
            num_reference: validation points drawn under a 2-D scatter plot.
            nrow: images per row of the grid; None: about the square root of ``num_samples``.
            guidance_scale: classifier-free guidance scale for class-conditional models (1: none).
            sample_options: further options of ``pl_module.sample``, e.g. ``{sampler: ddim, steps: 50}``.
        """
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"SampleGrid: num_samples must be >= 1, got {num_samples}")
        if nrow is not None and nrow < 1:
            raise ValueError(f"SampleGrid: nrow must be >= 1 or None, got {nrow}")
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.seed, self.num_reference, self.nrow = seed, num_reference, nrow
        self.sample_options = dict(sample_options or {})
        self._written_options = set(self.sample_options)
        if guidance_scale != 1.0:
            self.sample_options["guidance_scale"] = guidance_scale
        self.last_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before training: the model must take ``sample_options`` (:func:`check_model_options`)."""
        if stage == "fit":
            check_model_options(pl_module, "SampleGrid.sample_options", self.sample_options,
                                written_as={"guidance_scale": "SampleGrid.guidance_scale"}
                                if "guidance_scale" not in self._written_options else None)

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
            labels = class_labels(pl_module, self.num_samples, device=pl_module.device)
            options = self.sample_options if labels is None else {**self.sample_options, "y": labels}
            x = pl_module.sample(self.num_samples, generator=generator, **options)
        path = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"{name}.png"
        if trainer.is_global_zero:
            if x.ndim == 4:
                save_image_grid(x, path, nrow=self.nrow)
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
