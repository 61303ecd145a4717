"""Resuming with changed options: what the command line says wins, or the resume is refused.

LightningCLI's own rule re-parses a checkpoint's saved hyperparameters over the command line, so
every ``--model.*`` given on resume vanished without a word. Ours (used by the CLI for ``--ckpt_path``):
the model is built from the command line and ``--config``; its options are compared with the
checkpoint's, and

- a change the checkpoint's weights cannot be loaded into, or would mean something else under
  (a net width, the parameterization, the number of timesteps: the family's
  ``GenerativeModel.resume_fixed_hparams``, every net argument but ``dropout``, the same rules inside
  the config of a nested model (``resume_nested_models``: LatentDiffusion's prior), and anything that
  changes a parameter's name or shape), refuses the resume before training with
  :class:`~lightning_diffusion.errors.ResumeConflictError`, listing each such option with its old
  and new value;
- any other change (lr, warm-up, loss weights, ...) applies, and is reported; the optimizer's
  learning rate, betas and weight decay are set from the new options after the optimizer state
  is restored (``GenerativeModel.on_train_start``).
"""

from __future__ import annotations

from typing import Any, Mapping

from lightning_diffusion.errors import ResumeConflictError

#: net arguments that change no parameter and no output's meaning: they may differ on resume
NET_CHANGEABLE = frozenset({"dropout"})
_MISSING = "<not set>"


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"net.init_args.hidden": 256, ...}`` of a nested hyperparameter dict; lists and tuples are
    leaves, compared as lists."""
    if hasattr(config, "as_dict"):  # a jsonargparse Namespace
        config = config.as_dict()
    if isinstance(config, Mapping):
        out: dict[str, Any] = {}
        for key, value in config.items():
            if key != "_instantiator":
                out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: plain(config)}


def plain(value: Any) -> Any:
    """``value`` for comparing a config's with a checkpoint's: tuples (and nested ones) as lists,
    jsonargparse Namespaces as dicts."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def is_fixed(key: str, fixed_hparams: frozenset[str] | None, nested: Mapping[str, Any] | None = None) -> bool:
    """Whether a change of option ``key`` (flattened, e.g. ``net.init_args.hidden``) must refuse a
    resume. ``fixed_hparams`` None (a model not of our families): only a changed class is. ``nested``:
    the model's options that hold a nested model's config (``{"prior": the prior}`` of LatentDiffusion,
    ``resume_nested_models``), each checked by that model's own rules: its class, and its init_args as its
    ``resume_fixed_hparams`` and net say."""
    head, _, rest = key.partition(".")
    if key in ("_class_path", "class_path"):
        return True
    if fixed_hparams is None:
        return False
    if head in fixed_hparams:
        return True
    if head == "net":
        return rest == "class_path" or rest.rpartition(".")[2] not in NET_CHANGEABLE
    if nested and head in nested:
        inner = nested[head]
        names = getattr(inner, "resume_fixed_hparams", None)
        return is_fixed(rest.removeprefix("init_args."), None if names is None else frozenset(names),
                        getattr(inner, "resume_nested_models", None))
    return False


def compare(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{option: (old value, new value)}`` for every option that differs between two hyperparameter sets."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b))
            if a.get(k, _MISSING) != b.get(k, _MISSING)}


def state_dict_mismatch(model_state: Mapping[str, Any], ckpt_state: Mapping[str, Any]) -> list[str]:
    """Parameters and buffers whose name or shape differ between the model and a checkpoint."""
    out = []
    for name in sorted(set(model_state) | set(ckpt_state)):
        if name not in ckpt_state:
            out.append(f"{name}: not in the checkpoint")
        elif name not in model_state:
            out.append(f"{name}: in the checkpoint only")
        elif tuple(model_state[name].shape) != tuple(ckpt_state[name].shape):
            out.append(f"{name}: shape {list(ckpt_state[name].shape)} in the checkpoint, {list(model_state[name].shape)} now")
    return out


def check_resume(model: Any, new_hparams: Mapping[str, Any], checkpoint: Mapping[str, Any], ckpt_path: str,
                 prefix: str = "model.init_args.") -> dict[str, tuple[Any, Any]]:
    """Refuse (raise :class:`ResumeConflictError`) or accept a resume of ``model`` (built from
    ``new_hparams``) from ``checkpoint``; return the accepted changes ``{option: (old, new)}``.

    Options are named as on the command line (``prefix`` + the flattened key)."""
    old = checkpoint.get("hyper_parameters") or {}
    changes = compare(new_hparams, old) if old else {}
    fixed_names = getattr(model, "resume_fixed_hparams", None)
    fixed = None if fixed_names is None else frozenset(fixed_names)
    nested = getattr(model, "resume_nested_models", None)
    refused = {k: v for k, v in changes.items() if is_fixed(k, fixed, nested)}
    state = checkpoint.get("state_dict")
    shapes = state_dict_mismatch(model.state_dict(), state) if isinstance(state, Mapping) else []
    if refused or shapes:
        lines = [f"  {_option(k, prefix)}: {old_v!r} in the checkpoint, {new_v!r} now" for k, (old_v, new_v) in refused.items()]
        if shapes:
            lines += [f"  parameter {s}" for s in shapes[:8]] + ([f"  ... {len(shapes) - 8} more"] if len(shapes) > 8 else [])
        raise ResumeConflictError(
            f"--ckpt_path {ckpt_path}: the checkpoint's weights cannot be resumed with these options:\n"
            + "\n".join(lines)
            + "\nGive the checkpoint's values (its run's config.yaml has them: --config RUN_DIR/config.yaml), "
              "or start a new run without --ckpt_path")
    return {k: v for k, v in changes.items() if k not in refused}


def _option(key: str, prefix: str) -> str:
    return "model.class_path" if key == "_class_path" else prefix + key
