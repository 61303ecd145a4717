"""How our datasets encode values, in one place for data/ (which writes and reads them) and the
models, callbacks and metrics (which turn samples back into data): image categories <-> the batch
contract's floats, character-level text <-> categories, and the joint labels and colours of
``colour_digits``.

It imports only numpy and torch (nothing of ours, no Lightning): ``data/streams.py``, which spawned
DataLoader workers import, uses it, and so do ``models/`` and ``callbacks/`` without importing ``data/``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


# -- categories <-> images ---------------------------------------------------------------------
def images_from_categories(x: torch.Tensor, num_categories: int) -> torch.Tensor:
    """Image categories (int64, any shape) as the batch contract's floats in [-1, 1]:
    ``k * 2 / (K - 1) - 1``, the 8-bit ``k / 127.5 - 1`` at K = 256 and -1 / 1 for binarized images,
    which is what the same shards give read as floats. One definition for the discrete family's
    samples and the callbacks' real data."""
    return x.float() * (2.0 / (num_categories - 1)) - 1.0


def categories_from_images(x: torch.Tensor, num_categories: int) -> torch.Tensor:
    """The inverse of :func:`images_from_categories`: floats in [-1, 1] as int64 categories,
    rounded to the nearest of the K levels."""
    return torch.round((x + 1) * ((num_categories - 1) / 2.0)).long()


# -- character-level text ----------------------------------------------------------------------
#: the pad/end symbol of :func:`~lightning_diffusion.data.sources.words`: category 0, after the last character of a word
PAD = "."
#: the alphabet of :func:`~lightning_diffusion.data.sources.words`: ``ALPHABET[k]`` is category k (27 categories)
ALPHABET = PAD + "abcdefghijklmnopqrstuvwxyz"


def encode_text(words: Sequence[str], seq_length: int, alphabet: str = ALPHABET) -> np.ndarray:
    """Words as uint8 categories ``[N, seq_length]``: ``alphabet.index(c)`` per character, the rest
    filled with category 0 (the pad/end symbol). A character outside ``alphabet[1:]`` or a word
    longer than ``seq_length`` is a ValueError naming it."""
    if len(alphabet) > 256:
        raise ValueError(f"encode_text: at most 256 symbols fit in uint8, the alphabet has {len(alphabet)}")
    code = {c: k for k, c in enumerate(alphabet) if k > 0}
    out = np.zeros((len(words), seq_length), dtype=np.uint8)
    for i, word in enumerate(words):
        if len(word) > seq_length:
            raise ValueError(f"encode_text: {word!r} has {len(word)} characters, more than seq_length {seq_length}")
        try:
            out[i, :len(word)] = [code[c] for c in word]
        except KeyError as e:
            raise ValueError(f"encode_text: {word!r} has the character {e.args[0]!r}, not in the alphabet "
                             f"{alphabet[1:]!r}") from None
    return out


def decode_text(x: Any, alphabet: str = ALPHABET, stop: bool = True) -> list[str]:
    """Sequences of categories (an int array or tensor ``[L]`` or ``[N, L]``) as text, one string
    per sequence: ``alphabet[k]`` per position; ``stop``: up to the first pad/end symbol (category 0),
    else every position (the pad shown as ``alphabet[0]``)."""
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
    out = []
    for row in arr.tolist():
        if stop and 0 in row:
            row = row[:row.index(0)]
        out.append("".join(alphabet[int(k)] for k in row))
    return out


# -- colour_digits: its colours and joint labels -----------------------------------------------
# The named colours of ``colour_digits``: well-separated hues (the six corners of the RGB cube
# other than black and white, orange between red and yellow) and white. Every one has a channel at
# 255, so the per-pixel channel maximum of a tinted digit is the grey digit itself.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (255, 0, 0)),
    ("orange", (255, 128, 0)),
    ("yellow", (255, 255, 0)),
    ("green", (0, 255, 0)),
    ("cyan", (0, 255, 255)),
    ("blue", (0, 0, 255)),
    ("magenta", (255, 0, 255)),
    ("white", (255, 255, 255)),
)
COLOUR_NAMES: tuple[str, ...] = tuple(name for name, _ in COLOURS)


def colour_digit_label(digit: int | np.ndarray, colour: int | np.ndarray, num_colours: int = len(COLOURS)):
    """The joint class label of ``colour_digits``: ``digit * num_colours + colour``."""
    return digit * num_colours + colour


def split_colour_digit_label(label: Any, num_colours: int = len(COLOURS)) -> tuple[Any, Any]:
    """``(digit, colour)`` of joint labels (ints, numpy arrays or tensors): the inverse of
    :func:`colour_digit_label`."""
    return label // num_colours, label % num_colours


def attribute_labels(label: torch.Tensor, sizes: Sequence[int], check: bool = True) -> torch.Tensor:
    """Per-attribute labels ``[B, k]`` (int64) of joint labels ``[B]`` in mixed radix ``sizes``
    ``[n_0, .., n_{k-1}]``, the first attribute the most significant digit:
    ``joint = ((a_0 n_1 + a_1) n_2 + a_2) ...``; so with ``[10, 8]`` a ``colour_digits`` label
    ``digit * 8 + colour`` becomes ``[digit, colour]`` (:func:`split_colour_digit_label`). A joint
    label -1 (null) becomes all -1; labels already ``[B, k]`` are returned as they are (int64).
    ValueError for a joint label outside ``[-1, prod(sizes))`` or a column outside ``[-1, n_i)``
    (``check=False`` skips these range checks, which cost a device synchronisation each)."""
    sizes = [int(n) for n in sizes]
    if label.ndim == 2 and label.shape[1] == len(sizes):
        out = label.long()
    elif label.ndim == 1:
        total = math.prod(sizes)
        if check and label.numel() and (int(label.min()) < -1 or int(label.max()) >= total):
            raise ValueError(f"joint labels must be in [-1, {total - 1}] for label_attributes {sizes}, got "
                             f"{int(label.min())} .. {int(label.max())}")
        columns, rest = [], label.long().clamp(min=0)
        for n in reversed(sizes):
            columns.append(rest % n)
            rest = rest // n
        out = torch.where((label == -1)[:, None], -1, torch.stack(columns[::-1], dim=1))
        return out
    else:
        raise ValueError(f"labels for label_attributes {sizes} must be joint [B] or per attribute [B, {len(sizes)}], "
                         f"got shape {tuple(label.shape)}")
    for i, n in enumerate(sizes):
        if check and out.numel() and (int(out[:, i].min()) < -1 or int(out[:, i].max()) >= n):
            raise ValueError(f"labels column {i} must be in [-1, {n - 1}] (label_attributes {sizes}; -1 = dropped), "
                             f"got {int(out[:, i].min())} .. {int(out[:, i].max())}")
    return out


#: held-out (digit, colour) pairs of ``colour_digits`` by preset name. ``diagonals16``: the 16 pairs on
#: two shifted diagonals, ``(c, c)`` and ``((c + 5) % 10, c)`` for every colour c in 0..7: two per
#: colour, one or two per digit, so every digit is still seen in at least 6 colours and every colour
#: with 8 digits
HELD_OUT_PRESETS: dict[str, tuple[tuple[int, int], ...]] = {
    "diagonals16": tuple(sorted({(c, c) for c in range(8)} | {((c + 5) % 10, c) for c in range(8)})),
}


def held_out_pairs(held_out: str | Sequence[Sequence[int]] | None, num_digits: int = 10,
                   num_colours: int = len(COLOURS)) -> list[tuple[int, int]]:
    """The (digit, colour) pairs ``held_out`` names, sorted: a preset of :data:`HELD_OUT_PRESETS` or the
    pairs themselves ([[digit, colour], ...]); ``[]`` for None. ValueError for an unknown preset, a
    pair out of range, or a choice that leaves a digit or a colour unseen in training."""
    if held_out is None:
        return []
    if isinstance(held_out, str):
        if held_out not in HELD_OUT_PRESETS:
            raise ValueError(f"colour_digits: held_out {held_out!r} is not a preset; choose one of "
                             f"{sorted(HELD_OUT_PRESETS)} or give the pairs [[digit, colour], ...]")
        return sorted(HELD_OUT_PRESETS[held_out])
    pairs = []
    for pair in held_out:
        if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair) \
                or not (0 <= pair[0] < num_digits and 0 <= pair[1] < num_colours):
            raise ValueError(f"colour_digits: held_out pair {list(pair)} is not a [digit, colour] with digit in 0..{num_digits - 1} "
                             f"and colour in 0..{num_colours - 1}")
        pairs.append((int(pair[0]), int(pair[1])))
    pairs = sorted(set(pairs))
    unseen_digits = [d for d in range(num_digits) if sum(p[0] == d for p in pairs) == num_colours]
    unseen_colours = [c for c in range(num_colours) if sum(p[1] == c for p in pairs) == num_digits]
    if unseen_digits or unseen_colours:
        raise ValueError(f"colour_digits: held_out leaves digits {unseen_digits} and colours "
                         f"{[COLOUR_NAMES[c] for c in unseen_colours]} unseen in training (every pair of them held out); "
                         "hold out fewer pairs so that every digit and every colour is still seen")
    return pairs
