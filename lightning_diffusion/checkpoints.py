"""Reading a checkpoint file safely: :func:`load_checkpoint`.

Its own module (torch and :mod:`lightning_diffusion.errors` only), so that the CLI, the commands and
the callbacks read checkpoints one way without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a Lightning checkpoint file, with errors that name it.

    Only tensors and plain containers/numbers/strings are unpickled. That is all a checkpoint of
    ``lightning-diffusion fit`` holds (checked for DDPM, ScoreSDE and HierarchicalVAE runs: the
    hyperparameters are dicts of the config's values, the RNG states tensors and lists, the loops',
    optimizers', schedulers' and callbacks' (EMA, checkpointing, W&B) states dicts and tensors, the
    data position ints), so no class is allowlisted (``torch.serialization.add_safe_globals``) and
    nothing falls back to ``weights_only=False``. ``mmap=True`` maps the tensors instead of reading them.

    Raises :class:`~lightning_diffusion.errors.CheckpointError` (a ValueError): ``<path> is not a PyTorch/Lightning checkpoint (...)`` for a file that
    ``torch.save`` did not write (random bytes, text, an image) or that is no dict with a
    ``state_dict``; for a checkpoint holding an object of another class, the message names the class.
    """
    import pickle
    import re
    import zipfile

    from lightning_diffusion.errors import CheckpointError

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every failure is named with the file below, in one message
        inner = e.__context__ if isinstance(e, pickle.UnpicklingError) and e.__context__ is not None else e
        refused = re.search(r"GLOBAL ([\w.]+)", str(inner))  # torch's weights-only unpickler names what it refused
        if refused:
            raise CheckpointError(f"{path} holds an object of class {refused[1]}, which a safe (weights_only) load refuses: it "
                             "was not written by `lightning-diffusion fit`. If you trust the file, read it with "
                             "torch.load(path, weights_only=False)") from None  # torch's own message adds nothing
        reason = "not the zip archive torch.save writes" if not zipfile.is_zipfile(path) else \
            f"{type(inner).__name__}: {inner}"
        raise CheckpointError(f"{path} is not a PyTorch/Lightning checkpoint ({reason}); give the .ckpt file (or "
                         "sharded checkpoint folder) that `lightning-diffusion fit` wrote, e.g. "
                         "<run>/checkpoints/last.ckpt") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        what = f"keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{path} is not a PyTorch/Lightning checkpoint (no 'state_dict': it holds {what}); give "
                         "the .ckpt file that `lightning-diffusion fit` wrote, e.g. <run>/checkpoints/last.ckpt")
    return ckpt


def check_class_paths(hyper_parameters: Any, path: str | Path, where: str = "model") -> None:
    """Raise :class:`~lightning_diffusion.errors.CheckpointError` naming the first class of a
    checkpoint's ``hyper_parameters`` (the model's ``_class_path``, every nested ``class_path``: the
    net, its parts) that cannot be imported here, with where it sits (``model``,
    ``model.init_args.net``) and what to do: a run trained with a user's own module needs that
    module importable to be rebuilt. Checked before Lightning rebuilds the model, whose error is a
    long traceback through jsonargparse.

    Args:
        hyper_parameters: the checkpoint's ``hyper_parameters`` (or a part of it).
        path: the checkpoint, for the message.
        where: the config key of ``hyper_parameters`` itself.
    """
    import importlib

    from lightning_diffusion.errors import CheckpointError

    if not isinstance(hyper_parameters, dict):
        return
    class_path = hyper_parameters.get("_class_path", hyper_parameters.get("class_path"))
    if isinstance(class_path, str) and "." in class_path:
        module, _, name = class_path.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name, None)
            problem = None if found is not None else f"module {module} has no {name}"
        except ImportError as e:
            problem = str(e)
        if problem:
            raise CheckpointError(
                f"{path}: the checkpoint's {where} class {class_path!r} cannot be imported here ({problem}); install "
                f"or import the module that defines it (add its folder to PYTHONPATH, or pip install its package), "
                f"as when the run was trained")
    inner = hyper_parameters.get("init_args") if "class_path" in hyper_parameters else hyper_parameters
    for key, value in (inner or {}).items() if isinstance(inner, dict) else ():
        if isinstance(value, dict):
            check_class_paths(value, path, f"{where}.init_args.{key}")
