"""``lightning-diffusion sample``, ``evaluate``, ``consolidate`` and ``features``: work on a trained
checkpoint without a Trainer loop. ``sample`` and ``evaluate`` load the EMA weights by default
(``--weights raw`` for the others) from a checkpoint file or a sharded checkpoint folder.

Unlike the training callbacks, which preview with a fast sampler, ``sample`` and ``evaluate`` draw
with the model's own default sampler unless told otherwise (``--sampler``/``--steps``,
``--sample_options``): the paper's, e.g. a DDPM's ancestral sampling over all T steps, so that the
numbers of a finished model are the model's; ``--sampler dpm_solver --steps 20`` is the fast one."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_diffusion.callbacks.common import GRID_MIN_SIZE
from lightning_diffusion.checkpoints import load_checkpoint  # noqa: F401 - re-exported: the subcommands read with it

Weights = Literal["ema", "raw"]


def load_model(ckpt_path: str | Path, weights: Weights = "ema", device: str = "cpu"):
    """The model of a checkpoint written by ``lightning-diffusion fit`` (any family), in eval mode,
    with its EMA averages when ``weights="ema"`` and the run had an EMA callback.

    Returns ``(model, checkpoint dict, weights used)``. The file is read with ``weights_only=True``
    (see :func:`load_checkpoint`).
    """
    from lightning_diffusion.callbacks.ema import load_ema_weights

    check_device(device)
    path = Path(ckpt_path)
    if path.is_dir():  # a sharded checkpoint (FSDP / ModelParallelStrategy): consolidated in memory and
        # handed to load_from_checkpoint (which takes a file or a buffer) as one serialized checkpoint
        ckpt = consolidated_checkpoint(path)
        source: Path | io.BytesIO = io.BytesIO()
        torch.save(ckpt, source)
        source.seek(0)
    elif not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path} does not exist")
    else:
        ckpt, source = load_checkpoint(path, map_location=device), path
    hparams = ckpt.get("hyper_parameters") or {}
    class_path = str(hparams.get("_class_path", ""))
    if not class_path:
        raise ValueError(f"{path}: no hyper_parameters._class_path; was it written by `lightning-diffusion fit`? "
                         "Models built in Python reload with Model.load_from_checkpoint(path, net=...)")
    import importlib

    import lightning as L

    from lightning_diffusion.checkpoints import check_class_paths

    check_class_paths(hparams, path)  # the model's class and the net's, before Lightning rebuilds them
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise ValueError(f"{path}: hyper_parameters._class_path {class_path!r} is not a LightningModule class; "
                         "was it written by `lightning-diffusion fit`?")
    model = cls.load_from_checkpoint(source, map_location=device, weights_only=True).eval()
    used = "ema" if weights == "ema" and load_ema_weights(model, ckpt) else "raw"
    model.held_weights = used  # what evaluation_weights names without a trainer (evaluate's lines)
    return model, ckpt, used


def check_device(device: str) -> torch.device:
    """``torch.device(device)``, refused with an :class:`~lightning_diffusion.errors.OptionError`
    naming ``--device`` and the devices this machine has where it names none of them (``cuda``
    without a GPU: torch's own error would come out of the checkpoint's loading)."""
    from lightning_diffusion.errors import OptionError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    here = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count)), *(["mps"] if mps else [])])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OptionError("--device", device, f"not a device ({e})", f"devices here: {here}") from None
    if dev.type == "cuda" and count == 0:
        raise OptionError("--device", device, "this machine has no CUDA device (torch.cuda.is_available() is False)",
                          f"use --device cpu (devices here: {here})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= count:
        raise OptionError("--device", device, f"this machine has {count} CUDA device(s)", f"devices here: {here}")
    if dev.type == "mps" and not mps:
        raise OptionError("--device", device, "MPS is not available here", f"devices here: {here}")
    return dev


def check_count(option: str, value: Any, least: int = 1, meaning: str = "") -> None:
    """Refuse a numeric command-line option that is not an integer >= ``least`` with an
    :class:`~lightning_diffusion.errors.OptionError` naming ``--option`` (``meaning``: what the
    number counts, for the message). None (an option's "not given") passes."""
    from lightning_diffusion.errors import OptionError

    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OptionError(f"--{option}", value, f"must be an integer >= {least}" + (f" ({meaning})" if meaning else ""))


def consolidated_checkpoint(folder: str | Path) -> dict[str, Any]:
    """One ordinary Lightning checkpoint dict from a sharded checkpoint folder (torch distributed
    checkpoint + ``meta.pt``), as ``ModelParallelStrategy`` (FSDP2) or ``FSDPStrategy`` (FSDP1) with
    ``state_dict_type="sharded"`` write it: full tensors, in one process, without a process group.

    Lightning's own ``lightning.pytorch.utilities.consolidate_checkpoint`` reads the folder with the
    same loader but expects FSDP1's key ``model``; ModelParallelStrategy writes ``state_dict``. This
    accepts both and gathers ``optimizer_<i>`` into ``optimizer_states``.
    """
    import re

    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder} is not a sharded checkpoint folder (no .metadata file)")
    ckpt = _load_distributed_checkpoint(folder)
    if "model" in ckpt and "state_dict" not in ckpt:
        ckpt["state_dict"] = ckpt.pop("model")
    optimizers = sorted((k for k in ckpt if re.fullmatch(r"optimizer_[0-9]+", k)), key=lambda k: int(k.split("_")[1]))
    if optimizers:
        ckpt["optimizer_states"] = [ckpt.pop(k) for k in optimizers]
    return ckpt


def consolidate(*, ckpt_path: str, out: str | None = None) -> Path:
    """Write a sharded checkpoint folder (FSDP / ModelParallelStrategy) as one checkpoint file that
    ``load_from_checkpoint``, ``--ckpt_path`` of ``fit`` on one device, ``sample`` and ``evaluate``
    read: weights, EMA averages, optimizer, schedulers, loops and the data position.

    Args:
        ckpt_path: the sharded checkpoint folder, e.g. ``runs/x/version_0/checkpoints/last.ckpt``.
        out: the file to write (default: ``<ckpt_path>.consolidated``).
    """
    target = Path(out) if out else Path(f"{ckpt_path}.consolidated")
    ckpt = consolidated_checkpoint(ckpt_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(ckpt, partial)
    os.replace(partial, target)
    print(f"Wrote {target} (step {ckpt.get('global_step')}, {len(ckpt['state_dict'])} tensors)")
    return target


def _labels(model, num: int, class_label: int | None, device) -> torch.Tensor | None:
    from lightning_diffusion.callbacks.samples import class_labels

    if not getattr(model, "class_conditional", False):
        if class_label is not None:
            raise ValueError("--class_label given, but the model is not class_conditional")
        return None
    if class_label is not None:
        check_count("class_label", class_label, least=0, meaning=f"a class of the model's {model.num_classes}")
        if class_label >= model.num_classes:
            raise ValueError(f"--class_label={class_label}: the model has {model.num_classes} classes, "
                             f"0 to {model.num_classes - 1}")
        return torch.full((num,), class_label, dtype=torch.long, device=device)
    return class_labels(model, num, device=device)


def sample(*, ckpt_path: str, num: int = 64, out: str = "samples", sampler: str | None = None,
           steps: int | None = None, guidance_scale: float = 1.0, class_label: int | None = None,
           batch_size: int = 256, seed: int = 0, weights: Weights = "ema", device: str = "cpu",
           options: dict[str, Any] | None = None, nrow: int | None = None,
           min_size: int = GRID_MIN_SIZE) -> Path:
    """Draw samples from a checkpoint: one PNG per image, grid.png and samples.npz in OUT.

    Args:
        ckpt_path: checkpoint written by ``lightning-diffusion fit``.
        num: number of samples.
        out: output directory.
        sampler: diffusion families: ancestral, ddim, euler_maruyama, pc, ode, heun, dpm_solver
            (None: the model's own default, the paper's: DDPM ancestral over all T steps, ScoreSDE
            its ``sampler``; the README's sampler benchmark compares ``dpm_solver`` at 20 steps with them).
        steps: sampler steps (None: the sampler's default).
        guidance_scale: classifier-free guidance scale for class-conditional models (1: none).
        class_label: condition every sample on this class (default: cycle through the classes in
            order, so sample i has class ``i % num_classes``).
        batch_size: samples per ``model.sample`` call.
        seed: seed of the sampling noise.
        weights: ``ema`` (default; raw if the run had no EMA) or ``raw``.
        device: ``cpu`` or ``cuda``.
        options: further sampler options, e.g. ``{eta: 0.5}`` or ``{temperature: 0.8}``.
        nrow: images per row of grid.png, which shows the first 256 samples (None: about the
            square root of their number). With the cycled classes, ``--num 80 --nrow 8`` on
            ``colour_digits`` (label ``digit * 8 + colour``) puts digits in rows and colours in
            columns.
        min_size: pixels that grid.png's longer side reaches at least, by an integer
            nearest-neighbour enlargement (each sample pixel an exact k x k block); 0 keeps the
            native size. ``images/`` and ``samples.npz`` always hold the native samples.
    """
    import numpy as np

    from lightning_diffusion.callbacks.samples import save_image_grid, save_scatter

    from lightning_diffusion.callbacks.common import check_model_options

    check_count("num", num, meaning="the number of samples")
    check_count("batch_size", batch_size, meaning="samples per model.sample call")
    check_count("nrow", nrow, meaning="images per row of grid.png")
    check_count("min_size", min_size, least=0, meaning="pixels; 0 keeps the native size")
    model, _, used = load_model(ckpt_path, weights, device)
    kwargs = dict(options or {})
    if sampler is not None:
        kwargs["sampler"] = sampler
    if steps is not None:
        kwargs["steps"] = steps
    if guidance_scale != 1.0:
        kwargs["guidance_scale"] = guidance_scale
    check_model_options(model, "--options", kwargs, written_as={k: f"--{k}" for k in ("sampler", "steps", "guidance_scale")
                                                                if k not in (options or {})})
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = _labels(model, num, class_label, device)
    start, chunks = time.perf_counter(), []
    with torch.no_grad():
        for i in range(0, num, batch_size):
            y = None if labels is None else labels[i:i + batch_size]
            chunks.append(model.sample(min(batch_size, num - i), y=y, generator=generator, **kwargs).cpu())
    x = torch.cat(chunks)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    if x.ndim == 4:
        from PIL import Image

        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        (out_dir / "images").mkdir(exist_ok=True)
        for i, im in enumerate(images):
            Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(out_dir / "images" / f"{i:06d}.png")
        save_image_grid(x[:256], out_dir / "grid.png", nrow=nrow, min_size=min_size)
        arrays["images"] = images
    else:
        save_scatter(x, out_dir / "grid.png")
        arrays["points"] = x.numpy()
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    np.savez_compressed(out_dir / "samples.npz", **arrays)
    seconds = time.perf_counter() - start
    nfe = getattr(model, "last_sample_nfe", None)
    print(f"Wrote {num} samples ({used} weights, {kwargs or 'model defaults'}"
          + (f", {nfe} NFE per batch" if nfe is not None else "") + f", {seconds:.1f} s) to {out_dir}: "
          "images/, grid.png, samples.npz")
    return out_dir


def _datamodule(ckpt: dict, dataset: str | None, batch_size: int):
    from lightning_diffusion.data.datamodule import ShardDataModule

    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    name = dataset or saved.get("dataset")
    if name is None:
        raise ValueError("the checkpoint does not record its dataset: pass --dataset (an embedded name or a shard dir)")
    return ShardDataModule(name, batch_size=batch_size, num_workers=0,
                           train=None if dataset else saved.get("train"), val=None if dataset else saved.get("val"),
                           test=None if dataset else saved.get("test"))


def evaluate(*, ckpt_path: str, metrics: str = "fid,bpd", split: str = "test", num_samples: int = 1000,
             extractor: str | None = None, weights_path: str | None = None, dataset: str | None = None,
             batch_size: int = 256, num_batches: int = 0, seed: int = 0, weights: Weights = "ema",
             device: str = "cpu", out: str | None = None, sample_options: dict[str, Any] | None = None,
             bpd_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score a checkpoint: sample quality against a split and bits/dim on it; prints a table and
    writes JSON.

    Args:
        ckpt_path: checkpoint written by ``lightning-diffusion fit``.
        metrics: comma-separated: ``fid`` (with KID, IS, precision/recall; energy distance and MMD
            for points) and/or ``bpd``.
        split: the split sample quality compares with and bits/dim is computed on.
        num_samples: generated samples for ``fid`` (papers: 50000).
        extractor: ``digits`` or ``inception-v3-compat`` (default: digits for the embedded digits).
        weights_path: the extractor's weights (offline machines).
        dataset: the data (default: the one the checkpoint was trained on).
        batch_size: batch size of the data and of sampling.
        num_batches: batches scored for ``bpd`` (0: the whole split).
        seed: seed of sampling and of the estimators' noise.
        weights: ``ema`` (default; raw if the run had no EMA) or ``raw``.
        device: ``cpu`` or ``cuda``.
        out: JSON path (default: ``eval-<split>-step<N>.json`` next to the checkpoint).
        sample_options: options for ``model.sample`` (e.g. ``{sampler: ddim, steps: 100}``; None:
            the model's own default sampler, the paper's, not the callbacks' fast preview one).
            The JSON records them as ``sample_options``.
        bpd_options: options for ``model.bits_per_dim`` (e.g. ``{num_importance_samples: 1000}``).
    """
    from lightning_diffusion.callbacks.quality import Likelihood, SampleQuality

    from lightning_diffusion.callbacks.common import check_model_options

    wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {"fid", "bpd"})
    if unknown:
        raise ValueError(f"--metrics: unknown {unknown}; choose from fid, bpd")
    check_count("num_samples", num_samples, meaning="generated samples for fid")
    check_count("batch_size", batch_size, meaning="the batch size of the data and of sampling")
    check_count("num_batches", num_batches, least=0, meaning="batches scored for bpd; 0: the whole split")
    model, ckpt, used = load_model(ckpt_path, weights, device)
    if "fid" in wanted:
        check_model_options(model, "--sample_options", dict(sample_options or {}))
    if "bpd" in wanted:
        check_model_options(model, "--bpd_options", dict(bpd_options or {}), check="check_bpd_options")
    data = _datamodule(ckpt, dataset, batch_size)
    data.setup("test")
    name = str(data.hparams.get("dataset") or "")
    extractor = extractor or ("digits" if Path(name).name.startswith("digits") else "inception-v3-compat")
    results: dict[str, Any] = {"ckpt_path": str(ckpt_path), "global_step": ckpt.get("global_step"), "weights": used,
                               "split": split, "dataset": name}
    start = time.perf_counter()
    if "fid" in wanted:
        quality = SampleQuality(num_samples=num_samples, extractor=extractor, weights_path=weights_path,
                                real_split=split, batch_size=batch_size, seed=seed, sample_options=sample_options,
                                preview_sampler=False)
        results.update(quality.evaluate(None, model, datamodule=data))
        results["sample_options"] = quality.last_sample_options
        results["sample_nfe"] = getattr(model, "last_sample_nfe", None)
        results["extractor"] = extractor if model.data_shape is None or len(model.data_shape) == 3 else "points"
        results["fid_seconds"] = time.perf_counter() - start
    if "bpd" in wanted:
        t = time.perf_counter()
        likelihood = Likelihood(num_batches=num_batches, split=split, bpd_options=bpd_options, seed=seed)
        results.update(likelihood.evaluate(None, model, datamodule=data))
        results["bpd_seconds"] = time.perf_counter() - t
    table = ["| metric | value |", "| --- | --- |"]
    for key, value in results.items():
        if key.startswith("val/"):
            table.append(f"| {key[4:]} | {value:.6g} |" if isinstance(value, float) and math.isfinite(value)
                         else f"| {key[4:]} | {value} |")
    print(f"{ckpt_path} (step {results['global_step']}, {used} weights), {name} {split}:")
    print("\n".join(table))
    path = Path(out) if out else Path(ckpt_path).parent / f"eval-{split}-step{results['global_step']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k.replace("val/", ""): v for k, v in results.items()}, indent=2))
    print(f"Wrote {path}")
    return results


def fetch_inception(*, out: str) -> None:
    """Download the inception-v3-compat weights (torch-fidelity's release) and check their SHA-256.

    Args:
        out: file to write; copy it to the offline machine and pass it as ``weights_path``.
    """
    from lightning_diffusion.metrics.features import fetch_inception as fetch

    print(f"Wrote {fetch(out)}")


def train_digits(*, out: str | None = None, epochs: int = 25, seed: int = 0) -> None:
    """Train the digits feature network (deterministic) and cache its weights.

    Args:
        out: weights file (default ``$LD_DATA/weights/digits-cnn-v1.pt``, where SampleQuality looks).
        epochs: training epochs.
        seed: seed of initialisation and batch order.
    """
    from lightning_diffusion.metrics.features import train_digits_classifier

    check_count("epochs", epochs, meaning="training epochs")

    path = train_digits_classifier(out, epochs=epochs, seed=seed)
    accuracy = torch.load(path, weights_only=True)["val_accuracy"]
    print(f"Wrote {path} (validation accuracy {accuracy:.3f})")


def run(name: str, argv: list[str]) -> None:
    from jsonargparse import CLI

    if name == "features":
        CLI({"fetch-inception": fetch_inception, "train-digits": train_digits}, args=argv,
            prog="lightning-diffusion features", description="Feature networks of the sample-quality metrics.")
    else:
        CLI({"sample": sample, "evaluate": evaluate, "consolidate": consolidate}[name], args=argv,
            prog=f"lightning-diffusion {name}")
