"""WandbSamples: samples, denoising trajectories, reconstructions and a metrics table, logged with
the global step to W&B (or any logger with ``log_image``) and saved as PNG in the run directory.

Resuming the same W&B run. The W&B run id is stored in every checkpoint under
``checkpoint["wandb_run_id"]``. Lightning starts the logger's run (``wandb.init``) in ``setup``,
*before* it restores callbacks from ``trainer.fit(ckpt_path=...)``, so no callback hook can choose
the id in time. The clean way is to give the logger the id up front (a CLI resuming from
``--ckpt_path`` should do so)::

    WandbLogger(id=wandb_run_id_from_checkpoint(ckpt_path), resume="allow", ...)

Without it, :meth:`WandbSamples.on_load_checkpoint`
finishes the fresh run the logger had started (left empty) and continues the checkpoint's run, with
a warning; checkpoint folders Lightning named after the logger's version keep the fresh id.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_diffusion.callbacks.common import (GRID_MIN_SIZE, check_min_size, check_model_options, describe_options,
                                                  run_dir, sampling_options, save_image_grid, save_scatter)
from lightning_diffusion.callbacks.ema import evaluation_weights
from lightning_diffusion.callbacks.protocol import HasTrajectory, Reconstructs, batch_x

RUN_ID_KEY = "wandb_run_id"
"""Key of the W&B run id in a Lightning checkpoint dict."""

_CKPT_ALIASES = ("last", "best", "hpc")  # ckpt_path names Lightning resolves itself


def wandb_run_id_from_checkpoint(path: str | os.PathLike | None) -> str | None:
    """The W&B run id stored in a checkpoint by :class:`WandbSamples`, or None.

    ``path``: a checkpoint file, or a sharded checkpoint folder (FSDP / ModelParallel: the id is in
    its ``meta.pt``). None for ``path=None``, for Lightning's aliases ``"last"``, ``"best"``,
    ``"hpc"`` (not files), and for checkpoints written without WandbSamples. Tensors are memory-mapped,
    not read, so this is cheap for large checkpoints.
    """
    if path is None or str(path) in _CKPT_ALIASES:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"
    if not path.is_file():
        raise FileNotFoundError(f"wandb_run_id_from_checkpoint: no checkpoint file at {path}")
    from lightning_diffusion.checkpoints import load_checkpoint

    if path.name == "meta.pt":  # a sharded folder's metadata: no state_dict of its own
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    else:
        checkpoint = load_checkpoint(path, mmap=True)
    run_id = checkpoint.get(RUN_ID_KEY) if isinstance(checkpoint, dict) else None
    return str(run_id) if run_id else None


def continue_wandb_run(logger: WandbLogger, run_id: str) -> None:
    """Make ``logger`` log to the W&B run ``run_id`` (``resume="allow"``), on rank zero.

    Before the logger's run has started, this sets its id. After, unless the user gave the logger an
    id of their own, it finishes the started run (empty but for what was logged so far) and starts
    ``run_id`` in its place.
    """
    if logger._experiment is None:
        logger._id = run_id
        logger._wandb_init.update(id=run_id, resume="allow")
        return
    started = logger._experiment.id
    if started == run_id:
        return
    if logger._wandb_init.get("id"):
        rank_zero_warn(f"WandbSamples: the checkpoint belongs to W&B run {run_id!r}, but the WandbLogger was given "
                       f"id {started!r}; logging to {started!r}.")
        return
    rank_zero_warn(f"WandbSamples: continuing W&B run {run_id!r} of the checkpoint. The logger had already started "
                   f"run {started!r} (Lightning starts it before restoring callbacks), which is now finished and "
                   "empty; delete it if you like (checkpoint folders named after the logger's version keep its id). To avoid "
                   "this, pass "
                   "WandbLogger(id=wandb_run_id_from_checkpoint(ckpt_path)).")
    logger._experiment.finish()
    logger._experiment = None
    logger._id = run_id
    logger._wandb_init.update(id=run_id, resume="allow")
    _ = logger.experiment  # starts the continued run now, as Lightning would have


def _wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class WandbSamples(L.Callback):
    """Every ``every_n_epochs`` training epochs and when training ends, draws samples and logs:

    - ``samples``: a grid of ``sample(num_samples)`` (images), or a scatter plot over the first
      validation batch (2-D points);
    - ``trajectory`` (models with ``sample_trajectory``, image data): a strip, one row per sample,
      ``num_frames`` columns from pure noise (left) to the sample (right);
    - ``reconstructions`` (models with ``reconstruct``): originals and reconstructions side by side
      (images, pairs left-right), or reconstructions scattered over the originals (points), of the
      first validation batch seen (the sanity check's, if it runs; none if validation never runs);
    - ``metrics``: a table, one row per logging so far, of ``trainer.callback_metrics`` with the
      step, the epoch and the weights that sampled (``ema`` or ``raw``, see :func:`evaluation_weights`).

    Where: PNGs ``samples-step0000100.png``, ``trajectory-step...``, ``reconstructions-step...`` and
    ``metrics.jsonl`` (a JSON line per row) in ``<trainer.log_dir or default_root_dir>/samples/``,
    always, for every logger or none. A :class:`WandbLogger` also gets the images
    (``log_image``, captioned with the step and weights) and the table (``log_table``); other
    loggers with a ``log_image`` method get the images; the rest have the files. All at
    ``step=trainer.global_step``.

    When: at ``on_train_epoch_end``, which Lightning calls after the epoch's validation, so the table
    holds that validation's metrics; and at ``on_train_end`` (before teardown, the model still on its
    devices) unless this step was just logged.

    Sampler: the model's fast ``preview_sample_options()`` by the preview-sampler rule
    (docs/architecture.md, Contracts, ``preview_sample_options``; :func:`~lightning_diffusion.callbacks.common.sampling_options`
    applies it), for the samples and the trajectory alike; the images' captions name the options used.

    Distributed: every rank samples from the same seed (a sharded FSDP model needs all ranks in its
    forward); only global rank zero writes files and calls the loggers, with no collective inside.
    The W&B run id is kept in the checkpoint: see the module docstring and
    :func:`wandb_run_id_from_checkpoint`.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 64, num_trajectories: int = 8,
                 num_frames: int = 8, num_reconstructions: int = 16, seed: int = 0,
                 sample_options: dict[str, Any] | None = None, preview_sampler: bool = True,
                 min_size: int = GRID_MIN_SIZE):
        """
        Args:
            every_n_epochs: log every this many training epochs; 0: only when training ends.
            num_samples: samples per grid (images) or per scatter plot (points).
            num_trajectories: rows (samples) of the trajectory strip; 0 disables it. Sampling keeps
                every step's estimate in memory (``NFE x rows x data size`` floats): keep it small.
            num_frames: columns of the trajectory strip (>= 2), noise to sample.
            num_reconstructions: validation samples reconstructed; 0 disables reconstructions.
            seed: seed of the sampling noise, the same every time (and on every rank) so that
                pictures of different steps compare.
            sample_options: keyword options of ``sample`` / ``sample_trajectory``, e.g.
                ``{"sampler": "ddim", "steps": 50}`` for diffusion models.
            preview_sampler: sample with the model's fast ``preview_sample_options()`` as the
                preview-sampler rule says (docs/architecture.md, Contracts, ``preview_sample_options``); False: the model's own default.
            min_size: pixels that the longer side of each image grid (samples, trajectory,
                reconstructions) reaches at least, by an integer nearest-neighbour enlargement of the
                PNG that is written and logged (each sample pixel an exact k x k block); 0 keeps the
                native size. Scatter plots of points are not affected.
        """
        super().__init__()
        check_min_size("WandbSamples", min_size)
        if every_n_epochs < 0:
            raise ValueError(f"WandbSamples: every_n_epochs must be >= 0, got {every_n_epochs}")
        if num_samples < 1:
            raise ValueError(f"WandbSamples: num_samples must be >= 1, got {num_samples}")
        if num_trajectories > 0 and num_frames < 2:
            raise ValueError(f"WandbSamples: num_frames must be >= 2 (noise and sample), got {num_frames}")
        self.every_n_epochs, self.num_samples = every_n_epochs, num_samples
        self.num_trajectories, self.num_frames = num_trajectories, num_frames
        self.num_reconstructions, self.seed = num_reconstructions, seed
        self.sample_options = dict(sample_options or {})
        self.preview_sampler, self.min_size = preview_sampler, min_size
        self.last_sample_options: dict[str, Any] | None = None  # what the last logging sampled with
        self.run_id: str | None = None  # W&B run id restored from a checkpoint
        self.rows: list[dict[str, Any]] = []  # the metrics table
        self.last_paths: dict[str, Path] = {}  # the PNGs of the last logging (rank zero)
        self._val_x: Tensor | None = None  # first validation batch (on CPU)
        self._logged_step = -1  # global step of the last logging

    # -- when -------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the sanity check and the first step of ``fit``: the model must take ``sample_options``."""
        if stage == "fit":
            check_model_options(pl_module, "WandbSamples.sample_options", self.options(pl_module))

    def options(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """The options the samples are drawn with (:func:`~lightning_diffusion.callbacks.common.sampling_options`)."""
        return sampling_options(pl_module, self.sample_options, self.preview_sampler)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._val_x is None and dataloader_idx == 0:
            x = batch_x(batch)
            if isinstance(x, Tensor):  # points: the whole batch, also the scatter plots' reference
                self._val_x = (x if x.ndim == 2 else x[: self.num_reconstructions]).detach().cpu().clone()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
                and self._logged_step != trainer.global_step):  # a resumed run may replay an epoch end
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._logged_step != trainer.global_step:
            self.log_samples(trainer, pl_module)
        if trainer.is_global_zero and self.last_paths:
            rank_zero_info(f"WandbSamples: {self.last_paths['samples'].parent}")

    # -- what -------------------------------------------------------------------------------------
    def generate(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> tuple[str, dict[str, Tensor]]:
        """Samples ``[N, ...]``, trajectories ``[F, N, ...]`` and reconstructions ``[2, N, ...]``
        (originals, reconstructions) on the evaluation weights; returns them and the weights' name.
        Called on every rank."""
        def generator() -> torch.Generator:
            return torch.Generator(device=pl_module.device).manual_seed(self.seed)

        out: dict[str, Tensor] = {}
        options = self.last_sample_options = self.options(pl_module)
        with torch.no_grad(), evaluation_weights(trainer, pl_module) as which:
            out["samples"] = pl_module.sample(self.num_samples, generator=generator(), **options)
            if self.num_trajectories > 0 and isinstance(pl_module, HasTrajectory) and out["samples"].ndim == 4:
                try:
                    out["trajectory"] = pl_module.sample_trajectory(
                        self.num_trajectories, num_frames=self.num_frames, generator=generator(), **options)
                except NotImplementedError:  # a family whose sampler is not iterative
                    pass
            if self.num_reconstructions > 0 and isinstance(pl_module, Reconstructs) and self._val_x is not None:
                x = self._val_x[: self.num_reconstructions].to(pl_module.device)
                out["reconstructions"] = torch.stack([x, pl_module.reconstruct(x, generator=generator())])
        return which, out

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Path]:
        """Generate (every rank), then write the PNGs and the table row and log them (rank zero)."""
        step = trainer.global_step
        out_dir = run_dir(trainer) / "samples"  # log_dir broadcasts: every rank
        which, generated = self.generate(trainer, pl_module)
        self._logged_step = step
        row = {"step": step, "epoch": trainer.current_epoch, "weights": which,
               **{k: float(v) for k, v in sorted(trainer.callback_metrics.items())
                  if not isinstance(v, Tensor) or v.numel() == 1}}
        self.rows.append(row)
        if trainer.is_global_zero:
            self.last_paths = self._write(out_dir, step, generated)
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self._log(trainer, step, which)
        return self.last_paths

    def _write(self, out_dir: Path, step: int, generated: dict[str, Tensor]) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, x in generated.items():
            path = out_dir / f"{name}-step{step:07d}.png"
            image = x.ndim == (4 if name == "samples" else 5)
            if name == "samples" and image:
                save_image_grid(x, path, min_size=self.min_size)
            elif name == "samples" and x.ndim == 2 and x.shape[-1] >= 2:
                save_scatter(x, path, self._val_x)
            elif name == "trajectory" and image:  # [F, N, ...] -> rows of samples, columns of frames
                save_image_grid(x.transpose(0, 1).flatten(0, 1), path, nrow=x.shape[0], min_size=self.min_size)
            elif name == "reconstructions" and image:  # [2, N, ...] -> (original, reconstruction) pairs
                save_image_grid(x.transpose(0, 1).flatten(0, 1), path, nrow=2 * math.ceil(math.sqrt(x.shape[1])),
                                min_size=self.min_size)
            elif name == "reconstructions" and x.ndim == 3 and x.shape[-1] >= 2:
                save_scatter(x[1], path, reference=x[0])
            else:
                continue
            paths[name] = path
        return paths

    def _log(self, trainer: L.Trainer, step: int, which: str) -> None:
        """Rank zero: the images to loggers with ``log_image``, the table to W&B."""
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        for logger in trainer.loggers:
            if not hasattr(logger, "log_image"):
                continue
            wandb = isinstance(logger, WandbLogger)
            for name, path in self.last_paths.items():
                sampled = "" if name == "reconstructions" else f", {describe_options(self.last_sample_options or {})}"
                caption = {"caption": [f"{name}, step {step}, {which} weights{sampled}"]} if wandb else {}
                logger.log_image(key=name, images=[str(path)], step=step, **caption)
            if wandb:
                logger.log_table(key="metrics", columns=columns, data=[[row.get(c) for c in columns] for row in self.rows],
                                 step=step)

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "logged_step": self._logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
        self._logged_step = state_dict.get("logged_step", -1)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        logger = _wandb_logger(trainer)
        run_id = (logger.version if logger is not None else None) or self.run_id
        if run_id:
            checkpoint[RUN_ID_KEY] = str(run_id)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.run_id = checkpoint.get(RUN_ID_KEY)
        logger = _wandb_logger(trainer)
        if self.run_id and logger is not None and trainer.is_global_zero:
            continue_wandb_run(logger, self.run_id)
