"""Errors of the user's input that the ``lightning-diffusion`` command prints as one line.

:class:`UserError` is the base: its message names the file, option or key that is wrong and what to
do, so the command prints it without a traceback (``LD_DEBUG=1`` or ``--debug`` shows one). The
subclasses also derive from the built-in exception a library caller would catch.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave (a config, an option, a file); the message says what to do."""


class ResumeConflictError(UserError, ValueError):
    """``--ckpt_path`` with options the checkpoint's weights cannot be loaded into (or would mean
    something else under): each differing option is listed with its old and new value."""


class RunDirectoryBusyError(UserError, RuntimeError):
    """A second fit into a run directory that a running fit holds."""


class RunExistsError(UserError, FileExistsError):
    """A ``fit`` without ``--ckpt_path`` into a run directory that already holds an earlier launch's
    checkpoints or metrics (it would start from step 0 over them)."""


class LinkConflictError(UserError, ValueError):
    """An explicit value of an option that the CLI links from the data, differing from the data's."""


class CheckpointError(UserError, ValueError):
    """A file given as a checkpoint that is none (or not one this package can read)."""


class OptionError(UserError, ValueError):
    """A bad option of a sampler, likelihood estimator or model method: which ``option``, its
    ``value`` as given, what is allowed (``problem``) and what to do (``advice``). ``str(error)``
    reads ``option=value: problem; advice``; a caller that knows where the option was written (a
    callback's ``sample_options``) names it with :meth:`message`. Here, not in ``diffusion/``, so
    that every layer (the pure math, the models, the callbacks) raises and catches the same class
    without importing another's folder."""

    def __init__(self, option: str, value: object, problem: str, advice: str = ""):
        self.option, self.value, self.problem, self.advice = option, value, problem, advice
        super().__init__(self.message())

    def message(self, where: str = "") -> str:
        """The sentence, with ``where`` (e.g. ``SampleQuality.sample_options.``) before the option."""
        return f"{where}{self.option}={self.value!r}: {self.problem}" + (f"; {self.advice}" if self.advice else "")
