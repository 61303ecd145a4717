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


class LinkConflictError(UserError, ValueError):
    """An explicit value of an option that the CLI links from the data, differing from the data's."""


class CheckpointError(UserError, ValueError):
    """A file given as a checkpoint that is none (or not one this package can read)."""

