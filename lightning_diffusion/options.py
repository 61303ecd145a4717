"""One option mechanism: the options of a callable are checked against its own signature.

A method's or a sampler's keyword parameters *are* its options: the names it takes, and for each,
from its annotation, the values it takes: a ``Literal``'s values, ``bool`` (true or false, not 1),
``int`` (not True), ``float`` (any real number), ``None`` where the hint is optional, and a number's
range declared with :class:`Bound` in ``Annotated`` (``steps: PositiveInt | None = None``). The
annotations stay plain type hints, which LightningCLI/jsonargparse read too. :func:`check_call`
refuses an unknown name (with the closest valid name, difflib) or a value of the wrong kind with an
:class:`~lightning_diffusion.errors.OptionError`; every family's ``check_sample_options`` /
``check_bpd_options`` and the sampler registries use it, so no option is listed twice.

Written here rather than taken from pydantic's ``validate_call``: its messages cannot name the
closest valid option, a callback's ``sample_options`` key or the advice a user needs, and it is not
a dependency of ours. No Lightning, nothing of ours but the error classes: the pure-math folders
(``diffusion/``, ``discrete/``) check their samplers' options with it too.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from typing import Annotated, Any, Callable, Literal, NamedTuple

from lightning_diffusion.errors import OptionError


class Bound(NamedTuple):
    """The range of a number option, as ``Annotated`` metadata: ``value >= least`` (``> least`` with
    ``above``) and ``value <= most``; None: no bound on that side."""

    least: float | None = None
    most: float | None = None
    above: bool = False

    def admits(self, value: float) -> bool:
        low = self.least is None or (value > self.least if self.above else value >= self.least)
        return low and (self.most is None or value <= self.most)

    def describe(self) -> str:
        """`` >= 1``, `` > 0``, `` in (0, 1]``: the words after "a number"."""
        if self.most is None:
            return "" if self.least is None else f" {'>' if self.above else '>='} {self.least:g}"
        low = "(" if self.above else "["
        return f" in {low}{'-inf' if self.least is None else f'{self.least:g}'}, {self.most:g}]"


class Choices(NamedTuple):
    """``Annotated`` metadata of a ``Literal`` that says its values in words: the message reads
    ``must be <text>`` instead of ``must be one of [...]``."""

    text: str


#: an integer >= 1 (a count: steps, samples, chunks)
PositiveInt = Annotated[int, Bound(1)]
#: an integer >= 0 (a count that may be zero: moves per level)
NonNegativeInt = Annotated[int, Bound(0)]
#: a number > 0 (a step size, a tolerance, a temperature that divides)
Positive = Annotated[float, Bound(0, above=True)]
#: a number >= 0
NonNegative = Annotated[float, Bound(0)]
#: a share in (0, 1]
Fraction = Annotated[float, Bound(0, 1, above=True)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kinds(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union (``int | None``: int, NoneType), or the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _unannotated(kind: Any) -> tuple[Any, tuple[Any, ...]]:
    """(the type, its ``Annotated`` metadata)."""
    if typing.get_origin(kind) is Annotated:
        return kind.__origin__, tuple(kind.__metadata__)
    return kind, ()


def check_value(option: str, value: Any, annotation: Any) -> None:
    """Raise :class:`OptionError` unless ``value`` is of ``annotation``'s kind: one of a ``Literal``'s
    values (of the same type: True is not 1), true or false for ``bool``, an integer for ``int``, a
    number for ``float``, each within its :class:`Bound`, or None where the hint allows it. Other
    annotations (str, tensors, sequences, none at all) are not checked."""
    kinds = [_unannotated(kind) for kind in _kinds(annotation)]
    optional = any(kind is type(None) for kind, _ in kinds)
    if value is None and optional:
        return
    numbers = [(kind, meta) for kind, meta in kinds if kind in (int, float)]
    for kind, meta in kinds:
        if typing.get_origin(kind) is Literal:
            if any(type(value) is type(v) and value == v for v in typing.get_args(kind)):
                return
            words = next((m.text for m in meta if isinstance(m, Choices)), None)
            raise OptionError(option, value, f"must be {words}" if words else
                              f"must be one of {list(typing.get_args(kind))}")
        if kind is bool:
            if isinstance(value, bool):
                return
            raise OptionError(option, value, "must be true or false")
        if kind not in (int, float, type(None)):
            return  # a kind not checked here
    if not numbers:
        return
    kind, meta = numbers[0]
    bound = next((m for m in meta if isinstance(m, Bound)), Bound())
    if (_is_int(value) if kind is int else _is_number(value)) and bound.admits(value):
        return
    wanted = ("an integer" if kind is int else "a number") + bound.describe()
    raise OptionError(option, value, f"must be {wanted}" + (" or None" if optional else ""),
                      "write it as a number (YAML reads 1e-5 as text: write 1.0e-5)" if isinstance(value, str) else "")


@functools.lru_cache(maxsize=None)
def _parameters(function: Callable) -> tuple[tuple[str, Any, Any], ...]:
    """``(name, annotation, default)`` of the keyword parameters of a plain function, its annotations
    evaluated (those that cannot be, e.g. names imported only for type checking, are left unchecked)."""
    hints: dict[str, Any] = {}
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # one unresolvable hint: evaluate them one by one
        for name, hint in getattr(function, "__annotations__", {}).items():
            try:
                hints[name] = eval(hint, function.__globals__) if isinstance(hint, str) else hint  # noqa: S307
            except Exception:
                pass
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple((p.name, hints.get(p.name), p.default) for p in inspect.signature(function).parameters.values()
                 if p.kind in keyword and p.name not in ("self", "cls"))


def _function(fn: Callable) -> Callable:
    """The plain function behind a bound method or a decorated one (``functools.wraps``)."""
    return inspect.unwrap(getattr(fn, "__func__", fn))


def options_of(fn: Callable, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{name: annotation}`` of ``fn``'s keyword parameters but ``skip``, in signature order."""
    return {name: hint for name, hint, _ in _parameters(_function(fn)) if name not in skip}


def defaults_of(fn: Callable) -> dict[str, Any]:
    """``{name: default}`` of ``fn``'s keyword parameters that have one."""
    return {name: default for name, _, default in _parameters(_function(fn)) if default is not inspect.Parameter.empty}


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean X?)`` with the closest of the ``known`` names to a misspelt ``name``
    (difflib), or ``""`` when none is close: the one suggestion of every option and parser error."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def refuse_unknown(option: str, value: Any, owner: str, known: list[str] | tuple[str, ...]) -> None:
    """Raise the :class:`OptionError` of an option ``owner`` (``VAE.sample``, ``the ddim sampler``)
    does not take, with the closest of the ``known`` names and the list of them."""
    raise OptionError(option, value, f"{owner} has no option {option!r}" + did_you_mean(option, known),
                      f"its options are {', '.join(known)}" if known else "it takes no options")


def check_call(fn: Callable, options: dict[str, Any], owner: str, *, skip: tuple[str, ...] = (),
               rest: bool = False, listed: list[str] | None = None) -> dict[str, Any]:
    """Raise :class:`OptionError` unless ``fn(**options)`` takes ``options`` by its signature: each
    name is a keyword parameter of ``fn`` and each value of its annotation's kind (:func:`check_value`).

    ``skip`` names parameters that are arguments, not options (``x``, ``y``, ``generator``): not
    taken as options, not listed. With ``rest``, the names that are not ``fn``'s options are returned
    (for its ``**options``: a sampler's own) instead of refused. ``owner`` names ``fn`` in the message
    about an unknown option, and ``listed`` (default: ``fn``'s options) are the names it offers."""
    accepted = {name: hint for name, hint in options_of(fn).items() if name not in skip}
    others: dict[str, Any] = {}
    for option, value in options.items():
        if option in accepted:
            check_value(option, value, accepted[option])
        elif rest:
            others[option] = value
        else:
            refuse_unknown(option, value, owner, list(accepted) if listed is None else listed)
    return others


def check_number(option: str, value: Any, *, least: float | None = None, integer: bool = False,
                 optional: bool = False, above: bool = False) -> None:
    """Raise :class:`OptionError` unless ``value`` is a number (an integer with ``integer``; None
    with ``optional``) ``>= least`` (``> least`` with ``above``): :func:`check_value` of that
    annotation, for a value that is no parameter's (a constructor's argument, a list's entry)."""
    kind = Annotated[int if integer else float, Bound(least, above=above)]
    check_value(option, value, kind | None if optional else kind)


def registered(registry: dict[str, Any], name: Any, what: str = "sampler") -> Any:
    """The entry ``name`` of a sampler registry; an :class:`OptionError` on option ``sampler``
    naming the registered ones otherwise (``what``: ``sampler``, ``EBM sampler``, ...)."""
    if not isinstance(name, str) or name not in registry:
        raise OptionError("sampler", name, f"unknown {what} {name!r}; choose one of {sorted(registry)}")
    return registry[name]
