"""SampleGrid: a picture of samples in the run directory (and in the logger, if it takes images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

# class_labels, check_model_options, save_image_grid and save_scatter are importable from here as before
from lightning_diffusion.callbacks.common import (GRID_MIN_SIZE, batch_data, check_min_size,  # noqa: F401
                                                  check_model_options, class_labels, describe_options, eval_batches,
                                                  run_dir, sampling_options, save_image_grid, save_scatter)
from lightning_diffusion.callbacks.ema import evaluation_weights
from lightning_diffusion.callbacks.protocol import HasDensity


class SampleGrid(L.Callback):
    """Draws samples with ``pl_module.sample`` and saves them in ``<run dir>/samples/``.

    Images become a PNG grid; 2-D points a scatter plot over validation data; sequences of
    categories (int64 ``[N, L]``, text) a ``.txt`` file, one sample a line, decoded with the data's
    alphabet, and the first few printed. Every rank samples
    (a sharded model needs all ranks in its forward) from the same seed; rank zero writes the file
    and logs it to loggers that have ``log_image`` (W&B). Uses only the model contract.

    A class-conditional model (``class_conditional = True``, ``num_classes``) is sampled with the
    labels of :func:`class_labels`, in class order: ``nrow`` images per row. On ``colour_digits``
    (label ``digit * 8 + colour``) 80 samples with ``nrow: 8`` put digits in rows and colours in
    columns.

    Sampler: the model's fast ``preview_sample_options()`` by the preview-sampler rule
    (docs/architecture.md, Contracts, ``preview_sample_options``; :func:`~lightning_diffusion.callbacks.common.sampling_options`
    applies it), so a fit ends seconds after its last step. ``last_sample_options`` holds the options
    of the last grid.
    """

    def __init__(self, num_samples: int = 64, every_n_epochs: int = 0, seed: int = 0,
                 num_reference: int = 2000, nrow: int | None = None, guidance_scale: float = 1.0,
                 sample_options: dict[str, Any] | None = None, preview_sampler: bool = True,
                 min_size: int = GRID_MIN_SIZE, labels: list[int] | None = None):
        """
        Args:
            num_samples: samples per grid (images) or per scatter plot (points).
            every_n_epochs: also save a grid every this many training epochs; 0: only at fit end.
            seed: seed of the sampler's noise, the same for every grid so they compare.
            num_reference: validation points drawn under a 2-D scatter plot.
            nrow: images per row of the grid; None: about the square root of ``num_samples``.
            guidance_scale: classifier-free guidance scale for class-conditional models (1: none).
            sample_options: further options of ``pl_module.sample``, e.g. ``{sampler: ddim, steps: 50}``.
            preview_sampler: sample with the model's fast ``preview_sample_options()`` as the
                preview-sampler rule says (docs/architecture.md, Contracts, ``preview_sample_options``); False: the model's own default.
            min_size: pixels that an image grid's longer side reaches at least, by an integer
                nearest-neighbour enlargement (each sample pixel an exact k x k block; 100 digits of
                8 x 8: 91 px natively, 546 px at 512); 0 keeps the native size. Scatter plots of
                points are not affected.
            labels: the class labels to sample, in grid order (repeated to ``num_samples``), e.g. the
                held-out (digit, colour) pairs of a composition run as joint labels ``digit * 8 + colour``;
                None: every class in turn (:func:`class_labels`). Needs a class-conditional model.
        """
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"SampleGrid: num_samples must be >= 1, got {num_samples}")
        check_min_size("SampleGrid", min_size)
        if nrow is not None and nrow < 1:
            raise ValueError(f"SampleGrid: nrow must be >= 1 or None, got {nrow}")
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.seed, self.num_reference, self.nrow = seed, num_reference, nrow
        self.sample_options = dict(sample_options or {})
        self._written_options = set(self.sample_options)
        if guidance_scale != 1.0:
            self.sample_options["guidance_scale"] = guidance_scale
        self.preview_sampler, self.min_size = preview_sampler, min_size
        self.last_path: Path | None = None
        self.last_sample_options: dict[str, Any] | None = None  # what the last grid was sampled with
        if labels is not None and (not labels or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                     for v in labels)):
            raise ValueError(f"SampleGrid: labels must be a non-empty list of class labels >= 0 (or None: every "
                             f"class in turn), got {labels}")
        self.labels = None if labels is None else list(labels)

    def options(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """The options the grid samples with (:func:`~lightning_diffusion.callbacks.common.sampling_options`)."""
        return sampling_options(pl_module, self.sample_options, self.preview_sampler)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before training: the model must take ``sample_options`` (:func:`check_model_options`)."""
        if stage == "fit" and self.labels is not None:
            num_classes = getattr(pl_module, "num_classes", None)
            if not getattr(pl_module, "class_conditional", False) or num_classes is None:
                raise ValueError(f"SampleGrid: labels={self.labels} need a class-conditional model (class_conditional: "
                                 "true, labelled data); drop SampleGrid.labels")
            if max(self.labels) >= num_classes:
                raise ValueError(f"SampleGrid: labels={self.labels} has {max(self.labels)}, but the model has "
                                 f"{num_classes} classes (0 .. {num_classes - 1})")
        if stage == "fit":
            check_model_options(pl_module, "SampleGrid.sample_options", self.options(pl_module),
                                written_as={"guidance_scale": "SampleGrid.guidance_scale"}
                                if "guidance_scale" not in self._written_options else None)

    def _reference(self, trainer: L.Trainer) -> Tensor | None:
        """Up to ``num_reference`` validation points (None without validation data)."""
        try:
            batches = eval_batches(trainer, "val")
        except ValueError:
            return None
        points = []
        for batch in batches:
            points.append(batch_data(batch))
            if sum(p.shape[0] for p in points) >= self.num_reference:
                break
        return torch.cat(points)[: self.num_reference].cpu() if points else None

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with torch.no_grad(), evaluation_weights(trainer, pl_module):
            if self.labels is None:
                labels = class_labels(pl_module, self.num_samples, device=pl_module.device)
            else:  # the given labels, repeated to num_samples
                given = torch.tensor(self.labels, dtype=torch.long, device=pl_module.device)
                labels = given[torch.arange(self.num_samples, device=pl_module.device) % len(given)]
            self.last_sample_options = self.options(pl_module)
            extra = {} if labels is None else {"y": labels}
            x = pl_module.sample(self.num_samples, generator=generator, **self.last_sample_options, **extra)
            density = bounds = None
            if x.ndim == 2 and x.shape[-1] == 2 and isinstance(pl_module, HasDensity):  # every rank: a sharded net
                bounds = _bounds(x)
                density = pl_module.density_grid(bounds).log_density
        if not x.dtype.is_floating_point and x.ndim == 2:  # sequences of categories: text
            return self._save_text(trainer, x, name)
        path = run_dir(trainer) / "samples" / f"{name}.png"
        if trainer.is_global_zero:
            if x.ndim == 4:
                save_image_grid(x, path, nrow=self.nrow, min_size=self.min_size)
            else:
                save_scatter(x, path, self._reference(trainer) if x.shape[-1] == 2 else None, density, bounds)
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)
        self.last_path = path
        return path

    def _save_text(self, trainer: L.Trainer, x: Tensor, name: str) -> Path:
        """Sequences [N, L] of categories as text, one a line, in ``samples/<name>.txt``, decoded with
        the data's alphabet (``datamodule.alphabet``; the categories' numbers without one)."""
        from lightning_diffusion.encodings import decode_text

        alphabet = getattr(trainer.datamodule, "alphabet", None) if trainer.datamodule is not None else None
        lines = decode_text(x, alphabet) if alphabet else [" ".join(map(str, row)) for row in x.tolist()]
        path = run_dir(trainer) / "samples" / f"{name}.txt"
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
            rank_zero_info(f"Samples ({name}): " + ", ".join(lines[:12]))
        self.last_path = path
        return path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.save(trainer, pl_module, f"epoch{trainer.current_epoch:04d}-step{trainer.global_step:07d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.save(trainer, pl_module, "final")
        nfe = getattr(pl_module, "last_sample_nfe", None)
        rank_zero_info(f"Samples: {path} ({describe_options(self.last_sample_options, nfe)})")


def _bounds(points: Tensor, pad: float = 0.25) -> tuple[tuple[float, float], tuple[float, float]]:
    """A square box around 2-D ``points``: the larger axis range widened by ``pad`` of it on each side."""
    lo, hi = points.float().min(0).values, points.float().max(0).values
    centre, half = (lo + hi) / 2, float((hi - lo).max()) * (0.5 + pad)
    return ((float(centre[0]) - half, float(centre[0]) + half), (float(centre[1]) - half, float(centre[1]) + half))
