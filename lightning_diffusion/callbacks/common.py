"""What the callbacks share: the run directory, labels for class-conditional models, the options a
callback samples with (the model's fast preview sampler by default) and checking them against the
model, reading evaluation batches, and saving pictures.

Imports no other callback module but :mod:`~lightning_diffusion.callbacks.protocol`, so the
callbacks import each other in one direction only: ``protocol`` <- ``common`` <- ``samples``,
``quality``, ``wandb`` (which also use ``ema``); ``ema``, ``checkpoint`` and ``requeue`` stand alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_diffusion.callbacks.protocol import batch_x
from lightning_diffusion.errors import OptionError


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory: ``trainer.log_dir`` (it broadcasts: every rank must call it), else
    ``default_root_dir``."""
    return Path(trainer.log_dir or trainer.default_root_dir)


# -- the model's side -------------------------------------------------------------------------------
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


def sampling_options(pl_module: Any, options: dict[str, Any], preview: bool = True) -> dict[str, Any]:
    """The options a sampling callback passes to ``pl_module.sample``: the preview-sampler rule
    (docs/architecture.md, Contracts, ``preview_sample_options``, where it is stated once) applied to the user's ``options``
    and the model's ``preview_sample_options()``. ``preview=False``, or a model without
    ``preview_sample_options`` (a user's own LightningModule), uses ``options`` as given.

    Args:
        pl_module: the model.
        options: the callback's ``sample_options`` (with ``guidance_scale`` if it takes it apart).
        preview: use the model's preview options where the rule allows.
    """
    options = dict(options)
    method = getattr(pl_module, "preview_sample_options", None)
    if not preview or method is None or "sampler" in options or "steps" in options:
        return options
    merged = {**method(), **options}
    check = getattr(pl_module, "check_sample_options", None)
    if merged != options and check is not None:
        try:
            check(**merged)
        except OptionError:
            return options  # the user's options belong to the model's own sampler (or are wrong: refused with it)
    return merged


def describe_options(options: dict[str, Any], nfe: int | None = None) -> str:
    """``options`` for a log line: ``sampler dpm_solver, steps 20`` (``the model's default sampler``
    for none), with ``nfe`` network evaluations if known."""
    text = ", ".join(f"{k} {v}" for k, v in options.items()) or "the model's default sampler"
    return text + (f", {nfe} NFE" if nfe is not None else "")


def check_model_options(pl_module: Any, where: str, options: dict[str, Any], check: str = "check_sample_options",
                        written_as: dict[str, str] | None = None) -> None:
    """Check a callback's options for the model before training: ``pl_module.<check>(**options)``
    (``check_sample_options`` or ``check_bpd_options``; a model without it, such as a user's own
    LightningModule, is not checked). A refused option (an :class:`~lightning_diffusion.errors.OptionError`)
    becomes a ValueError that names it as the config writes it, ``<where>.<option>=<value>``
    (``where``: e.g. ``SampleQuality.sample_options``; ``written_as`` renames options the callback
    took elsewhere), with what is allowed and what to do.

    Args:
        pl_module: the model.
        where: the callback and its option, as in the config.
        options: the options the callback will pass.
        check: the model's check method.
        written_as: option -> how the config writes it, for options not in ``where``.
    """
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


# -- the data's side --------------------------------------------------------------------------------
_TRAINER_LOADERS = {"train": "train_dataloader", "val": "val_dataloaders", "test": "test_dataloaders"}


def check_split(split: str, option: str) -> None:
    """Refuse a split other than train, val or test, naming the callback's ``option``."""
    if split not in _TRAINER_LOADERS:
        raise ValueError(f"{option}={split!r}: unknown split; choose train, val or test")


def find_datamodule(trainer: L.Trainer | None, datamodule: Any = None) -> Any:
    """``datamodule`` if given, else the trainer's (None without either)."""
    if datamodule is not None:
        return datamodule
    return getattr(trainer, "datamodule", None) if trainer is not None else None


def eval_batches(trainer: L.Trainer | None, split: str, datamodule: Any = None, option: str = "split"):
    """Batches of ``split`` (train, val or test): from a DataModule with ``eval_dataloader``
    (ShardDataModule: every sample once over ranks); else the trainer's loader of that split
    (Lightning gives each rank its share); else the DataModule's ``<split>_dataloader()``.
    ``option`` names the callback's option in errors."""
    check_split(split, option)
    datamodule = find_datamodule(trainer, datamodule)
    if datamodule is not None and hasattr(datamodule, "eval_dataloader"):
        return datamodule.eval_dataloader(split)
    loaders = getattr(trainer, _TRAINER_LOADERS[split], None) if trainer is not None else None
    if loaders is None and datamodule is not None and hasattr(datamodule, f"{split}_dataloader"):
        loaders = getattr(datamodule, f"{split}_dataloader")()
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ValueError(f"{option}={split!r}: no {split} data; give the Trainer a DataModule or {split} dataloaders, "
                         f"or choose another {option}")
    return loaders


def batch_data(batch: Any) -> Tensor:
    """The data tensor of a batch (:func:`~lightning_diffusion.callbacks.protocol.batch_x`), or a
    ValueError that says what batches may be."""
    x = batch_x(batch)
    if x is None:
        raise ValueError(f"a batch of type {type(batch).__name__} holds no data tensor; batches are dicts with key "
                         "'x', tuples or lists whose first item is the data, or tensors")
    return x


def batch_labels(batch: Any, x: Tensor) -> Tensor:
    """The labels of a batch (``batch["y"]`` of a dict, the second item of a tuple or list) as int64 on
    ``x``'s device, or a ValueError that says where labels are looked for."""
    y = batch.get("y") if isinstance(batch, dict) else batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 \
        else None
    if not isinstance(y, Tensor):
        raise ValueError(f"labels=True, but a batch of type {type(batch).__name__} holds no labels; batches are dicts "
                         "with key 'y' or tuples (x, y) (a labelled dataset: its index has classes)")
    return y.to(device=x.device, dtype=torch.long)


# -- pictures ---------------------------------------------------------------------------------------
#: default ``min_size`` of sample grids: upscaled until the longer side has at least this many pixels
GRID_MIN_SIZE = 512


def check_min_size(owner: str, min_size: Any) -> None:
    """Refuse a ``min_size`` (pixels) that is not an integer >= 0, naming ``owner`` (e.g. ``SampleGrid``)."""
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"{owner}.min_size={min_size!r}: must be an integer >= 0 (pixels of a sample grid's longer "
                         "side; 0 keeps the native size)")


def upscale_factor(width: int, height: int, min_size: int = GRID_MIN_SIZE) -> int:
    """The integer factor a picture of ``width`` x ``height`` pixels is enlarged by: the smallest
    k >= 1 with ``k * max(width, height) >= min_size`` (pixels); 1 for ``min_size`` 0 (native size)."""
    check_min_size("save_image_grid", min_size)
    return max(1, math.ceil(min_size / max(width, height, 1)))


def save_image_grid(x: Tensor, path: str | Path, nrow: int | None = None, min_size: int = GRID_MIN_SIZE) -> Path:
    """Save images in [-1, 1], [N, C, H, W], as one PNG grid (``nrow`` images per row, 1 px white
    padding), enlarged by the integer factor of :func:`upscale_factor` with nearest-neighbour
    resampling, so each pixel of a sample becomes an exact k x k block (a grid of 8 x 8 digits is
    91 x 91 pixels natively, 546 x 546 with ``min_size`` 512).

    Args:
        x: the images.
        path: the PNG to write.
        nrow: images per row; None: about the square root of their number.
        min_size: pixels the grid's longer side reaches at least; 0 keeps the native size.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(math.sqrt(x.shape[0])))
    grid = make_grid((x.float().cpu() + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    # to 8 bits as torchvision's save_image does; PIL's NEAREST resize by an integer factor copies pixels exactly
    image = Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy())
    k = upscale_factor(image.width, image.height, min_size)
    if k > 1:
        image = image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)
    image.save(path)
    return path


def save_scatter(points: Tensor, path: str | Path, reference: Tensor | None = None,
                 density: Tensor | None = None, bounds: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Path:
    """Save a scatter plot of 2-D ``points`` [N, 2] over ``reference`` data (grey), as PNG. With a
    ``density`` (a model's log density [ny, nx] on a grid over ``bounds``, rows are y), three panels:
    the data, the density as a heat map, the samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = points.float().cpu()
    ref = reference.float().cpu() if reference is not None else None
    if density is None:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:red", label="samples")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", markerscale=4)
    else:
        (x_lo, x_hi), (y_lo, y_hi) = bounds
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), dpi=100, sharex=True, sharey=True)
        for ax, (title, data) in zip(axes[::2], (("data", ref), ("samples", pts))):
            if data is not None:
                ax.scatter(data[:, 0], data[:, 1], s=2, c="tab:red" if title == "samples" else "0.3")
            ax.set_title(title)
        axes[1].imshow(density.float().exp().cpu().numpy(), origin="lower", extent=(x_lo, x_hi, y_lo, y_hi),
                       cmap="viridis", aspect="auto")
        axes[1].set_title("learned density")
        for ax in axes:
            ax.set_xlim(x_lo, x_hi)
            ax.set_ylim(y_lo, y_hi)
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
