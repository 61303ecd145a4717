"""The ``lightning-diffusion`` command: LightningCLI's fit/validate/test/predict plus our own subcommands.

Trainer subcommands go to :class:`DiffusionCLI` (a LightningCLI in subclass mode); the others
(``shards`` ...) have their own parsers, since LightningCLI runs only Trainer methods.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback, _get_module_type, _InstantiatorFn
from lightning.pytorch.utilities import rank_zero_info

from lightning_diffusion import __version__
from lightning_diffusion.run_directory import slurm_hpc_checkpoint  # noqa: F401 - importable from here as before

TRAINER_SUBCOMMANDS = {
    "fit": "Train a model (resume with --ckpt_path).",
    "validate": "Run one validation epoch.",
    "test": "Run one test epoch.",
    "predict": "Run one prediction epoch.",
}


#: ``(DataModule attribute, model option)``: facts of the data that the CLI links into the model
LINKS = (
    ("data.data_shape", "model.init_args.data_shape"),
    ("data.num_classes", "model.init_args.num_classes"),
    ("data.num_channels", "model.init_args.net.init_args.in_channels"),
    ("data.image_size", "model.init_args.net.init_args.image_size"),
    ("data.num_classes", "model.init_args.net.init_args.num_classes"),
    # categorical data (None for float data); dropped for a model or net that has no such argument
    ("data.num_categories", "model.init_args.num_categories"),
    ("data.num_categories", "model.init_args.net.init_args.num_categories"),
)

#: the same data facts into a net inside a wrapper net (``EnergyHead(net=UNet)``: parameterization
#: energy), added to the parser only when the config's net has a ``net`` of its own
#: (:func:`_wrapped_net`): jsonargparse applies a link into a path the config lacks all the same, and
#: Lightning's saved hyperparameters then have no place for it (``Expected key ... to be in data``)
WRAPPED_NET_LINKS = (
    ("data.num_channels", "model.init_args.net.init_args.net.init_args.in_channels"),
    ("data.image_size", "model.init_args.net.init_args.net.init_args.image_size"),
    ("data.num_classes", "model.init_args.net.init_args.net.init_args.num_classes"),
)


class DiffusionCLI(LightningCLI):
    """LightningCLI with our models and DataModule by short name and data facts linked into the model.

    Links (applied when the DataModule is instantiated, so a config never repeats them):
    ``data.data_shape -> model.data_shape``, ``data.num_classes -> model.num_classes``, and into
    the model's ``net`` where it has such arguments: ``data.num_channels -> net.in_channels``,
    ``data.image_size -> net.image_size``, ``data.num_classes -> net.num_classes``.
    """

    def __init__(self, *args, **kwargs):
        # imported so that jsonargparse knows our classes by their short names
        import lightning_diffusion.callbacks  # noqa: F401
        import lightning_diffusion.data.datamodule  # noqa: F401
        import lightning_diffusion.diffusion.sde  # noqa: F401
        import lightning_diffusion.models  # noqa: F401
        import lightning_diffusion.nets  # noqa: F401

        from lightning_diffusion.run_directory import RunConfig

        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        # the run directory held while the fit runs, each launch's config in its own file
        kwargs.setdefault("save_config_callback", RunConfig)
        self._explicit_links: dict[str, Any] = {}
        self._resume_newest = False  # a requeued SLURM job without an hpc checkpoint: see _continue_slurm_job
        given = kwargs.get("args")
        self._args = [a for a in (given if isinstance(given, list) else sys.argv[1:]) if isinstance(a, str)]
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse ``args`` (:func:`main` always passes the command line itself, so Lightning's warning
        about ``args`` and ``sys.argv`` both being given would appear on every fit).

        An unknown option (a typo such as ``--model.init_args.timestep``, in a config file or on the
        command line) or a class that cannot be imported becomes one line naming the key and the
        closest valid names (:func:`_parser_error_line`), raised as a
        :class:`~lightning_diffusion.errors.UserError`; jsonargparse's own message for those is
        the whole config over some 60 lines. Every other parser error is reported by the parser as
        before (usage, message, exit status 2). The parsers are switched to ``exit_on_error=False``
        for the parse, jsonargparse's way of handing the error to the caller."""
        from argparse import ArgumentError

        subparsers = getattr(parser._subcommands_action, "_name_parser_map", {}) if parser._subcommands_action else {}
        parsers = [parser, *subparsers.values()]
        exits = [each.exit_on_error for each in parsers]
        for each in parsers:
            each.exit_on_error = False
        try:
            self.config = parser.parse_args(args)
            return
        except ArgumentError as error:
            if not exits[0]:  # a caller that asked for the exception gets it
                raise
            failed = error
        finally:
            for each, exit_on_error in zip(parsers, exits):
                each.exit_on_error = exit_on_error
        subcommand = next((a for a in args if isinstance(a, str) and a in subparsers), None)
        line = _parser_error_line(str(failed), subparsers.get(subcommand, parser), subcommand or "")
        if line is not None:
            from lightning_diffusion.errors import UserError

            raise UserError(line) from None
        refusing, cause = _raising_parser(failed, parsers)
        refusing.error(str(failed), cause)  # prints usage and the message and exits, as before

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in LINKS:
            parser.link_arguments(source, target, self._link_value(target), apply_on="instantiate")

    def _link_value(self, target: str) -> Callable[[Any], Any] | None:
        """The function that turns a data fact into the value of the link ``target`` (None: as is): a
        net's ``num_classes`` becomes the model's ``label_attributes`` (per-attribute label sizes,
        e.g. [10, 8] for digit and colour) where the config gives them, since the net then embeds each
        attribute on its own; :func:`_net_num_classes` checks that they factor the data's classes."""
        if not _is_net_classes(target):
            return None
        return lambda num_classes: _net_num_classes(num_classes, self._label_attributes())

    def _label_attributes(self) -> list[int] | None:
        """The model's ``label_attributes`` in the parsed config (None where not given)."""
        try:
            value = self.config[self.subcommand]["model.init_args.label_attributes"]
        except (KeyError, TypeError, AttributeError):
            return None
        return None if value is None else [int(size) for size in value]

    def _add_instantiators(self) -> None:
        """LightningCLI's instantiators, with the model's dropping the data links into a ``net`` the model
        does not have (:class:`_ModelInstantiator`: LatentDiffusion's nets are its prior's and first stage's)."""
        self.parser.add_instantiator(_ModelInstantiator(cli=self, key="model"), _get_module_type(self._model_class),
                                     subclasses=self.subclass_mode_model)
        self.parser.add_instantiator(_InstantiatorFn(cli=self, key="data"), _get_module_type(self._datamodule_class),
                                     subclasses=self.subclass_mode_data)

    def _parse_ckpt_path(self) -> None:
        """Keep the command line: LightningCLI's own version parses the checkpoint's hyperparameters
        *over* it, so every ``--model.*`` change given with ``--ckpt_path`` was silently dropped.
        Instead the model built from the command line is compared with the checkpoint in
        :meth:`instantiate_classes` (:func:`lightning_diffusion.resume.check_resume`)."""

    def before_instantiate_classes(self) -> None:
        """Resuming ``fit`` from a checkpoint continues its W&B run: the run id stored in the
        checkpoint becomes the id of every WandbLogger that was given none. In a SLURM job a requeued
        job continues its run (see :func:`_continue_slurm_job`)."""
        if _wrapped_net(self.config[self.subcommand]):
            subcommands = self.parser._subcommands_action
            parser = subcommands._name_parser_map[self.subcommand] if subcommands else self.parser
            for source, target in WRAPPED_NET_LINKS:
                parser.link_arguments(source, target, self._link_value(target), apply_on="instantiate")
        self._explicit_links = _explicit_link_values(self.config[self.subcommand], self._args)
        if self.subcommand != "fit":
            return
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        from lightning_diffusion.callbacks.wandb import wandb_run_id_from_checkpoint

        config = self.config.fit
        if SLURMEnvironment.detect():
            self._resume_newest = _continue_slurm_job(config)
        run_id = wandb_run_id_from_checkpoint(config.get("ckpt_path"))
        if not run_id:
            return
        for class_path, init_args in _logger_configs(config):
            if class_path.endswith("WandbLogger") and not init_args.get("id") and not init_args.get("version"):
                init_args["id"] = run_id
                rank_zero_info(f"Resuming W&B run {run_id} (stored in {config.get('ckpt_path')})")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        _add_slurm_requeue(self.trainer)
        _add_stop_on_signal(self.trainer)  # every trainer command: validate / test / predict too
        # A link into a net that lacks the target (image_size into an MLP, or a user's net) is
        # skipped when the net is built but still lands in the model's saved hyperparameters, which
        # load_from_checkpoint would then reject: drop such keys.
        for hparams in (self.model.hparams, getattr(self.model, "_hparams_initial", {})):
            for value in hparams.values():
                _drop_unaccepted_init_args(value)
        _drop_unaccepted_model_links(self.model, self.datamodule)
        _check_links(self._explicit_links, self.datamodule, self._label_attributes())
        ckpt_path = self.config[self.subcommand].get("ckpt_path")  # a requeued SLURM job's is set by now
        if self.subcommand == "fit" and (ckpt_path == "last" or (ckpt_path is None and self._resume_newest)):
            ckpt_path = self._resume_last(required=ckpt_path == "last")
        if ckpt_path and Path(ckpt_path).exists():
            from lightning_diffusion.resume import check_resume

            changes = check_resume(self.model, self.model.hparams, _checkpoint_for_comparison(ckpt_path), ckpt_path)
            if changes:
                rank_zero_info("Resuming with changed options (they apply from the next step): " + "; ".join(
                    f"model.init_args.{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        # the run directory held (rank zero) before the Trainer writes anything into it
        from lightning_diffusion.run_directory import RunConfig

        self.trainer.callbacks.sort(key=lambda cb: not isinstance(cb, RunConfig))
        run_config = self._run_config()
        if run_config is not None:
            run_config.hold(self.trainer, ckpt_path, fresh_fit=self.subcommand == "fit" and not ckpt_path)

    def _resume_last(self, required: bool = True) -> str | None:
        """``--ckpt_path last``: the newest checkpoint of this fit's run directory
        (:func:`~lightning_diffusion.run_directory.resolve_last_checkpoint`), named from here on in
        place of ``last`` (in the saved config too); a WandbLogger given no id continues the W&B run
        stored in it, as with an explicit ``--ckpt_path``. ``required=False`` (a requeued SLURM job):
        None where there is none to resume."""
        from lightning.pytorch.loggers import WandbLogger

        from lightning_diffusion.callbacks.wandb import continue_wandb_run, wandb_run_id_from_checkpoint
        from lightning_diffusion.errors import CheckpointError
        from lightning_diffusion.run_directory import resolve_last_checkpoint

        try:
            ckpt_path = str(resolve_last_checkpoint(self.trainer))
        except CheckpointError:
            if required:
                raise
            return None
        for config in (self.config, self.config_init):
            config[self.subcommand]["ckpt_path"] = ckpt_path
        run_id = wandb_run_id_from_checkpoint(ckpt_path)
        for logger in self.trainer.loggers:
            if run_id and isinstance(logger, WandbLogger) and logger.version is None:
                continue_wandb_run(logger, run_id)
                rank_zero_info(f"Resuming W&B run {run_id} (stored in {ckpt_path})")
        return ckpt_path

    def _run_config(self):
        """The trainer's :class:`~lightning_diffusion.run_directory.RunConfig` (None under fast_dev_run)."""
        from lightning_diffusion.run_directory import RunConfig

        return next((cb for cb in self.trainer.callbacks if isinstance(cb, RunConfig)), None)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            run_config = self._run_config()
            if run_config is not None:
                run_config.release()

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank takes part
        if not trainer.is_global_zero:
            return
        lines = [f"Run directory: {log_dir or trainer.default_root_dir}"]
        config = next((c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)), None)
        if config is not None:
            path = getattr(config, "config_path", None) or Path(log_dir or ".") / config.config_filename
            lines.append(f"  config:      {path}")
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            for label, path in (("last", getattr(ckpt, "last_model_path", "")), ("best", ckpt.best_model_path)):
                if path:
                    lines.append(f"  checkpoint:  {path} ({label})")
        for cb in trainer.callbacks:
            path = getattr(cb, "last_path", None)
            if path is not None:
                lines.append(f"  samples:     {path}")
        rank_zero_info("\n".join(lines))


def _checkpoint_for_comparison(ckpt_path: str) -> dict[str, Any]:
    """What :func:`~lightning_diffusion.resume.check_resume` needs of a checkpoint: its
    ``hyper_parameters`` and its ``state_dict`` (tensors memory-mapped, or for a sharded folder
    the parameters' shapes from its metadata), loaded with ``weights_only=True``."""
    import torch

    from lightning_diffusion.checkpoints import load_checkpoint

    path = Path(ckpt_path)
    if path.is_dir():  # a sharded checkpoint folder: meta.pt holds the hyperparameters
        out: dict[str, Any] = {}
        if (path / "meta.pt").is_file():
            meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
            out["hyper_parameters"] = meta.get("hyper_parameters")
        try:
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
            out["state_dict"] = {k.split(".", 1)[1]: _Shape(tuple(v.size)) for k, v in metadata.items()
                                 if k.split(".", 1)[0] in ("state_dict", "model") and hasattr(v, "size")}
        except Exception:  # noqa: BLE001 - no shapes to compare: the hyperparameters still are
            pass
        return out
    return load_checkpoint(path, mmap=True)


class _Shape:
    """A parameter known only by its shape (from a sharded checkpoint's metadata)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def _wrapped_net(config) -> bool:
    """Whether the config's model net wraps a net of its own (``model.init_args.net.init_args.net``
    with a ``class_path``), which :data:`WRAPPED_NET_LINKS` then reach."""
    try:
        return bool(config["model.init_args.net.init_args.net.class_path"])
    except (KeyError, TypeError, AttributeError):
        return False


class _ModelInstantiator(_InstantiatorFn):
    """Lightning's instantiator of the model (its hyperparameters from the config and the applied data
    links), skipping a link whose target's parent is not in the model's config: ``LINKS`` into
    ``model.init_args.net`` for a model without a ``net`` (LatentDiffusion), which Lightning's
    ``_set_dict_nested`` would refuse with an assertion."""

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        self.cli._dump_config()
        config = self.cli.config_dump.get(self.key, {})
        init_args = config.get("init_args", config) if isinstance(config, dict) else {}
        kept = {}
        for key, value in applied_instantiation_links.items():
            parts = key.split(".")[1:]
            parts = parts[1:] if parts[:1] == ["init_args"] else parts
            node, present = init_args, True
            for part in parts[:-1]:
                if not isinstance(node, dict) or part not in node:
                    present = False
                    break
                node = node[part]
            if present or not key.startswith(f"{self.key}."):
                kept[key] = value
        return super().__call__(class_type, *args, applied_instantiation_links=kept, **kwargs)


def _explicit_link_values(config, args: list[str]) -> dict[str, Any]:
    """``{model option: value}`` of the link targets (:data:`LINKS`) the user gave a value of: one
    named on the command line ``args``, or (from a config file) one that differs from the class's
    default."""
    import inspect

    from lightning_diffusion.resume import plain

    out: dict[str, Any] = {}
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    for _, target in (*LINKS, *WRAPPED_NET_LINKS):
        owner, _, name = target.rpartition(".init_args.")
        try:
            class_path, value = config[f"{owner}.class_path"], config[target]
        except (KeyError, TypeError):
            continue
        param = (_init_parameters(class_path) or {}).get(name) if isinstance(class_path, str) else None
        if param is None:
            continue
        default = param.default if param.default is not inspect.Parameter.empty else None
        if plain(value) != plain(default) or f"--{target}" in given:
            out[target] = value
    return out


def _is_net_classes(target: str) -> bool:
    """Whether the link ``target`` is a net's ``num_classes`` (bare or inside a wrapper net)."""
    return target.endswith(".net.init_args.num_classes")


def _net_num_classes(num_classes: int | None, label_attributes: list[int] | None) -> int | list[int] | None:
    """The ``num_classes`` of a net for data with ``num_classes`` labels: ``label_attributes`` (the
    per-attribute sizes) where given, else the data's. LinkConflictError where the attributes do not
    factor the data's classes (their product must equal it: joint label = mixed-radix digits)."""
    import math

    from lightning_diffusion.errors import LinkConflictError

    if num_classes is None or label_attributes is None:
        return num_classes
    if math.prod(label_attributes) != num_classes:
        raise LinkConflictError(f"--model.init_args.label_attributes={label_attributes} (product "
                                f"{math.prod(label_attributes)}), but the data have data.num_classes={num_classes}: "
                                "the attributes' sizes must multiply to the data's number of classes")
    return list(label_attributes)


def _check_links(explicit: dict[str, Any], datamodule, label_attributes: list[int] | None = None) -> None:
    """Refuse an explicit value of a linked option that differs from the data's (the link would
    silently replace it); a net's ``num_classes`` is compared with the model's ``label_attributes``
    where those are given (:func:`_net_num_classes`)."""
    from lightning_diffusion.errors import LinkConflictError
    from lightning_diffusion.resume import plain

    for source, target in (*LINKS, *WRAPPED_NET_LINKS):
        if target not in explicit or not hasattr(datamodule, source.split(".", 1)[1]):
            continue
        data_value = getattr(datamodule, source.split(".", 1)[1])
        if _is_net_classes(target):
            data_value = _net_num_classes(data_value, label_attributes)
        if data_value is not None and plain(explicit[target]) != plain(data_value):
            raise LinkConflictError(
                f"--{target}={plain(explicit[target])!r}, but the data have {source}={plain(data_value)!r}: "
                f"{target} is linked from the data; leave it out, or choose data that match it")


def _init_option_names(cls: type) -> list[str]:
    """The keywords ``cls(...)`` takes: those of its ``__init__`` and (through ``**kwargs``) of the
    base classes it passes them on to."""
    import inspect

    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            params = inspect.signature(klass.__init__).parameters
        except (ValueError, TypeError):
            break
        names += [n for n, p in params.items() if n != "self" and n not in names
                  and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return names


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``name`` (:func:`_init_option_names`)."""
    return name in _init_option_names(cls)


def _parser_error_line(message: str, parser, subcommand: str) -> str | None:
    """One line for a parser error that has a clear cause, None for any other.

    - an option that a class (model, net, data, callback) does not take, found in jsonargparse's
      "Problem with given class_path 'C': Option 'K' is not accepted": the key as the config writes
      it, the class and the closest of its ``__init__`` options (difflib);
    - a class_path whose module cannot be imported ("No module named ..."): the key, the class path,
      and to make the module importable;
    - "unrecognized arguments: --trainer.max_stesp=5" (command line) and "Group 'trainer' does not
      accept option 'max_stesp'" (a config file): the closest options of ``parser`` (the subcommand's).
    """
    import importlib

    from lightning_diffusion.options import did_you_mean

    def key_path(end: int) -> str:
        keys = re.findall(r'Parser key "([\w.]+)"', message[:end])
        return ".init_args.".join(keys) if keys else "?"

    accepted = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*Option '(\w+)' is not accepted", message)
    if accepted:
        class_path, option = accepted.groups()
        module, _, name = class_path.rpartition(".")
        try:
            names = _init_option_names(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            return None
        where = key_path(accepted.start())
        return f"{where}.init_args.{option}: {name} has no option {option!r}{did_you_mean(option, names)}; " \
               f"its options are {', '.join(names)}"
    missing = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(No module named '[\w.]+')", message)
    if missing:
        class_path, reason = missing.groups()
        return (f"{key_path(missing.start())}.class_path={class_path!r}: the class cannot be imported ({reason}); "
                "install or import the module that defines it (add its folder to PYTHONPATH, or pip install its "
                "package), or give a class_path that is installed here")
    options = [o for action in getattr(parser, "_actions", []) for o in action.option_strings if o.startswith("--")]
    help_line = f"`lightning-diffusion {subcommand} --help` lists the options".replace("  ", " ")
    unknown = re.fullmatch(r"unrecognized arguments: (.+)", message.strip())
    if unknown:
        parts = []
        for arg in unknown.group(1).split():
            option = arg.split("=", 1)[0]
            if not option.startswith("--"):
                return None
            parts.append(f"{option}: no such option{did_you_mean(option, options)}")
        return "; ".join(parts) + f"; {help_line}"
    group = re.fullmatch(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message.strip())
    if group:
        option = f"{group.group(1)}.{group.group(2)}"
        suggestion = did_you_mean(f"--{option}", options).replace("mean --", "mean ")  # the config's own spelling
        return f"{option} (in a config file): no such option{suggestion}; {help_line}"
    return None


def _raising_parser(error: BaseException, parsers: list):
    """Which of ``parsers`` (the command's and its subcommands') first refused the arguments
    (``error`` or an exception it was raised from), with the exception it refused them for: a
    subcommand's parser prints its own usage."""
    found, seen, inner = (parsers[0], error.__cause__), set(), error
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        tb = inner.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "error" and any(tb.tb_frame.f_locals.get("self") is p for p in parsers):
                found = (tb.tb_frame.f_locals["self"], inner.__cause__)
            tb = tb.tb_next
        inner = inner.__cause__ or inner.__context__
    return found


def _drop_unaccepted_model_links(model, datamodule) -> None:
    """A link into a model option the model does not have (``num_categories`` into a DDPM) is
    skipped when the model is built, but Lightning still records it in the saved hyperparameters,
    which ``load_from_checkpoint`` would reject: drop it there. Categorical data (a
    ``num_categories``) for a model without that option is refused before any training: it would
    get int64 categories where it takes floats."""
    from lightning_diffusion.errors import LinkConflictError

    for source, target in LINKS:
        owner, _, name = target.rpartition(".init_args.")
        if owner != "model" or _accepts(type(model), name):
            continue
        data_value = getattr(datamodule, source.split(".", 1)[1], None)
        if name == "num_categories" and data_value is not None:
            raise LinkConflictError(
                f"the data are categorical (data.num_categories={data_value!r}: int64 categories), but "
                f"{type(model).__name__} has no num_categories option and takes float data; choose a "
                "categorical model, or read the data as floats (--data.init_args.categorical=false)")
        for hparams in (model.hparams, getattr(model, "_hparams_initial", {})):
            hparams.pop(name, None)


def _logger_configs(config) -> Iterator[tuple[str, Any]]:
    """``(class_path, init_args)`` of each logger in a fit config that names its class (editable in place)."""
    loggers = config.trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if hasattr(logger, "get") and logger.get("init_args") is not None:
            yield str(logger.get("class_path", "")), logger.get("init_args")


def _continue_slurm_job(config) -> bool:
    """In a SLURM job (under ``srun``), make a requeued job continue its run where it stopped.

    - Loggers that take a ``version`` and were given none (CSVLogger, TensorBoardLogger) get
      ``slurm-<job id>``, which a requeued job keeps, so its metrics and checkpoints stay in one
      directory. (A WandbLogger's version is its run id: that one comes from the checkpoint.)
    - The newest ``hpc_ckpt_N.ckpt`` in ``trainer.default_root_dir`` becomes ``ckpt_path`` when none
      was given (the checkpoint Lightning would restore anyway; naming it here lets the W&B run id
      be read from it) and, when the job was requeued (``SLURM_RESTART_COUNT`` > 0), also in place of
      a given ``--ckpt_path``: that one is where the job started, the hpc checkpoint where it stopped.

    Returns True for a job requeued without an hpc checkpoint (a node failure) and given no
    ``--ckpt_path``: it resumes the newest checkpoint of its ``slurm-<job id>`` directory, if there
    is one (a fresh fit would be refused there).
    """
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array_job else os.environ.get("SLURM_JOB_ID")
    for class_path, init_args in _logger_configs(config):
        if job_id and not class_path.endswith("WandbLogger") and "version" in init_args and init_args.get("version") is None:
            init_args["version"] = f"slurm-{job_id}"
    hpc = slurm_hpc_checkpoint(config.trainer.get("default_root_dir") or os.getcwd())
    given = config.get("ckpt_path")
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    if hpc and (given is None or requeued):
        if given not in (None, hpc):
            rank_zero_info(f"Requeued SLURM job: resuming from {hpc} instead of --ckpt_path {given}")
        config["ckpt_path"] = hpc
    return requeued and not hpc and given is None  # requeued without an hpc checkpoint (a node failure)


def _add_slurm_requeue(trainer: L.Trainer) -> None:
    """In a SLURM job with auto-requeue, run the requeue at a step boundary: see :class:`SlurmRequeue`
    (Lightning's own handler saves a collective checkpoint from inside the signal handler and can
    hang DDP). Added unless the config has one already."""
    from lightning_diffusion.callbacks.requeue import SlurmRequeue

    if SlurmRequeue.requeue_environment(trainer) and not any(isinstance(cb, SlurmRequeue) for cb in trainer.callbacks):
        trainer.callbacks.append(SlurmRequeue())


def _add_stop_on_signal(trainer: L.Trainer) -> None:
    """SIGTERM / SIGINT save ``last.ckpt`` at the step and exit 143 / 130 (an evaluation command stops at
    its batch and exits the same way): see :class:`StopOnSignal`.
    Added last (after the config's callbacks, whose end-of-batch work the checkpoint then holds),
    unless the config has one already (to set its ``grace_seconds``)."""
    from lightning_diffusion.callbacks.signals import StopOnSignal

    if not any(isinstance(cb, StopOnSignal) for cb in trainer.callbacks):
        trainer.callbacks.append(StopOnSignal())


def _init_parameters(class_path: str):
    """The parameters of the class ``class_path`` (its ``__init__``), None if it cannot be imported."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        return inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return None


def _drop_unaccepted_init_args(config) -> None:
    """Remove ``init_args`` keys that the ``class_path`` class does not take, recursively (in place)."""
    import inspect

    if not isinstance(config, dict):
        return
    init_args = config.get("init_args")
    if isinstance(config.get("class_path"), str) and isinstance(init_args, dict):
        params = _init_parameters(config["class_path"])
        if params is None:
            return
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            for key in [k for k in init_args if k not in params]:
                del init_args[key]
    for value in (init_args or {}).values() if isinstance(init_args, dict) else ():
        _drop_unaccepted_init_args(value)


def _shards_main(argv: list[str]) -> None:
    from lightning_diffusion.data.commands import shards_cli

    shards_cli(argv)


def _command(name: str) -> Callable[[list[str]], None]:
    def main(argv: list[str]) -> None:
        from lightning_diffusion.commands import run

        run(name, argv)

    return main


EXTRA_SUBCOMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {
    "shards": ("Write WebDataset shards + index.json from (colour) digits, toy2d, an image folder or a torchvision set.",
               _shards_main),
    "sample": ("Draw samples from a checkpoint (EMA weights): PNGs, a grid and an npz.", _command("sample")),
    "evaluate": ("Score a checkpoint: FID/KID/IS/precision-recall and bits/dim on a split; table + JSON.",
                 _command("evaluate")),
    "consolidate": ("Write a sharded (FSDP / ModelParallelStrategy) checkpoint folder as one checkpoint file.",
                    _command("consolidate")),
    "features": ("Feature networks of the metrics: fetch the Inception weights, train the digits one.",
                 _command("features")),
}


def packaged_configs_dir() -> Path:
    """The folder of the configs that ship with the package: ``lightning_diffusion/configs`` in an
    installed wheel, the checkout's ``configs/`` in an editable install."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the packaged configs (``ddpm_digits``, ...), for ``--config NAME``."""
    return sorted(p.stem for p in packaged_configs_dir().glob("*.yaml"))


_CONFIG_NAME = re.compile(r"(?:configs/)?([\w.-]+?)(?:\.ya?ml)?")


def resolve_config(value: str) -> str:
    """The file ``--config value`` reads: ``value`` itself if it is a file, or if it is no config name
    (another path, or inline YAML, which LightningCLI takes too); else the packaged config named by
    ``NAME``, ``NAME.yaml`` or ``configs/NAME.yaml``, so that the README's commands work outside a
    checkout. Exits with a message naming the option and the packaged configs when there is none."""
    match = _CONFIG_NAME.fullmatch(value)
    if match is None or Path(value).is_file():
        return value
    packaged = packaged_configs_dir() / f"{match.group(1)}.yaml"
    if not packaged.is_file():
        sys.exit(f"lightning-diffusion: --config {value}: no such file, and no packaged config of that name; "
                 f"packaged configs: {', '.join(packaged_configs())}")
    if value != match.group(1):  # a file name that is not here: say which file is read instead
        rank_zero_info(f"--config {value}: no such file here; using the packaged config {packaged}")
    return str(packaged)


def _resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with the value of every ``-c``/``--config`` resolved by :func:`resolve_config`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
        elif arg in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


def _overview() -> str:
    width = max(map(len, [*TRAINER_SUBCOMMANDS, *EXTRA_SUBCOMMANDS]))
    rows = [f"  {k.ljust(width)}  {v}" for k, v in TRAINER_SUBCOMMANDS.items()]
    rows += [f"  {k.ljust(width)}  {v[0]}" for k, v in EXTRA_SUBCOMMANDS.items()]
    return (
        f"usage: lightning-diffusion [-h] [--version] SUBCOMMAND ...\n\n"
        f"Train and evaluate VAEs, hierarchical VAEs, DDPMs and score SDEs with PyTorch Lightning "
        f"(lightning_diffusion {__version__}).\n\n"
        "subcommands:\n" + "\n".join(rows) + "\n\n"
        "Run `lightning-diffusion SUBCOMMAND --help` for its options, e.g.\n"
        "  lightning-diffusion fit --config configs/ddpm_digits.yaml\n"
        "  lightning-diffusion fit --config configs/ddpm_digits.yaml --print_config\n\n"
        f"Configs in the package (--config NAME, also outside a checkout): {', '.join(packaged_configs())}\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-diffusion`` console script and ``python -m lightning_diffusion``.

    An error of the user's input (a config, an option, a file: see :func:`_user_errors`) is printed as
    one line naming it, and the command exits with status 1; ``--debug`` (anywhere on the command
    line) or ``LD_DEBUG=1`` shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LD_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return
    if argv[0] == "--version":
        print(__version__)
        return
    if argv[0] not in EXTRA_SUBCOMMANDS and argv[0] not in TRAINER_SUBCOMMANDS:
        known = ", ".join([*TRAINER_SUBCOMMANDS, *EXTRA_SUBCOMMANDS])
        sys.exit(f"lightning-diffusion: unknown subcommand {argv[0]!r}; choose one of: {known}")
    try:
        if argv[0] in EXTRA_SUBCOMMANDS:
            EXTRA_SUBCOMMANDS[argv[0]][1](argv[1:])
        else:
            DiffusionCLI(args=_resolve_config_args(argv))
            from lightning_diffusion.distributed import end_process_group

            end_process_group()  # every rank leaves the process group together: lightning_diffusion/distributed.py
    except BaseException as e:
        if argv[0] in TRAINER_SUBCOMMANDS:
            _exit_if_stopped_by_signal(argv[0], e)
        if debug or not isinstance(e, _user_errors()):
            raise
        sys.stderr.write(f"lightning-diffusion {argv[0]}: error: {_one_line(e)}\n"
                         "(--debug or LD_DEBUG=1 shows the traceback)\n")
        _end_process_group_after_refusal()
        sys.exit(1)
    finally:
        if argv[0] in TRAINER_SUBCOMMANDS:
            from lightning_diffusion.callbacks.signals import restore_signal_handlers

            restore_signal_handlers()  # after Lightning's teardown, which re-installs ours after an error


def _end_process_group_after_refusal(timeout: float = 30.0) -> None:
    """A user error that every rank raised together (a refusal broadcast from rank zero: a finished run
    directory, a resume conflict) leaves the process group in order before the exit, as a finished run
    does (:func:`~lightning_diffusion.distributed.end_process_group`): otherwise a gloo worker thread
    still holding the broadcast can abort the rank (SIGABRT instead of exit status 1) while the
    interpreter finalizes. An error of one rank alone gives up after ``timeout`` seconds and exits.
    Without a process group :func:`end_process_group` does nothing."""
    from lightning_diffusion.distributed import end_process_group

    try:
        end_process_group(timeout=timeout)
    except Exception as error:  # a rank that did not come: exit anyway, as before
        sys.stderr.write(f"lightning-diffusion: the process group did not end in order ({_one_line(error)})\n")


def _exit_if_stopped_by_signal(subcommand: str, error: BaseException) -> None:
    """A fit that SIGTERM or SIGINT stopped (:class:`~lightning_diffusion.callbacks.signals.FitStopped`,
    or another error after the signal) ends here: rank zero prints one line naming the checkpoint,
    and every rank exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""
    from lightning_diffusion.callbacks.signals import signal_stop

    stop = signal_stop(error)
    if stop is None:
        return
    if stop.global_rank == 0:
        sys.stderr.write(f"lightning-diffusion {subcommand}: {stop}\n")
        sys.stderr.flush()
    if stop.agreed:  # every rank stopped at the same step: they leave the process group together
        from lightning_diffusion.distributed import end_process_group

        try:
            end_process_group(timeout=60.0)
        except RuntimeError:
            pass  # a rank that did not arrive: this one still exits with the signal's status
    sys.exit(stop.code)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the command reports in one line: our own errors (:class:`~lightning_diffusion.errors.UserError`,
    shard errors, a NaN loss) and those of the user's files and values (a missing or unreadable
    file, a value out of range, a missing key, a file that is no checkpoint). Anything else is a
    bug, and keeps its traceback."""
    import pickle

    from lightning_diffusion.data.streams import ShardError
    from lightning_diffusion.errors import UserError

    return (UserError, ShardError, OSError, ValueError, KeyError, FloatingPointError, pickle.UnpicklingError)


def _one_line(error: BaseException) -> str:
    """The message of ``error``; for an error that jsonargparse wrapped (a model or net refusing its
    arguments while it is built comes out as "Does not validate against any of the Union subtypes"
    with the whole config), the message of the innermost error our package raised."""
    error = _own_error(error) or error
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return str(message) or type(error).__name__


def _own_error(error: BaseException) -> BaseException | None:
    import traceback

    package = str(Path(__file__).resolve().parent)
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or "jsonargparse" not in frames[-1].filename:
        return None
    found, seen = None, set()
    inner = error.__cause__ or error.__context__
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        tb = traceback.extract_tb(inner.__traceback__)
        if tb and tb[-1].filename.startswith(package) and isinstance(inner, _user_errors()):
            found = inner
        inner = inner.__cause__ or inner.__context__
    return found


if __name__ == "__main__":
    main()
