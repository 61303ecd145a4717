"""Data sources that the shard writer turns into WebDataset shards.

A source is a small description of a dataset plus its samples:

- images are ``uint8`` arrays ``[H, W, C]`` (C = 1 or 3) stored as 8-bit PNG;
- points (toy 2-D sets) are ``float32`` arrays ``[D]`` stored as ``.npy``;
- sequences (character-level text) are integer arrays ``[L]`` of categories in ``[0, K)``, stored
  as ``.npy``.

A categorical source (``num_categories`` set: binarized digits, text) records K in the index, and
for images the 8-bit value each category is stored as (``levels``), for text the character of
each category (``alphabet``, the pad/end symbol first).

Sources with no predefined split put everything in the ``"all"`` pool and the writer splits it
deterministically; torchvision sets keep their official test split (pools ``"train"`` and
``"test"``). Pools are sequences of ``(array, label | None)`` so that large image folders are
read lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

# the encodings (text, colour-digit labels and colours) live in encodings.py, shared with the models and
# metrics; importable from here as before
from lightning_diffusion.encodings import (ALPHABET, COLOUR_NAMES, COLOURS, PAD, colour_digit_label,  # noqa: F401
                                           decode_text, encode_text, held_out_pairs, split_colour_digit_label)

ImageSize = Literal[8, 16, 32]
Toy2DName = Literal["gaussians8", "moons", "swissroll", "checkerboard"]
TorchvisionName = Literal["CIFAR10", "MNIST", "FashionMNIST"]


@dataclass
class Source:
    """What the shard writer needs to know about a dataset.

    Attributes:
        name: source name as typed on the command line (``digits``, ``toy2d`` ...).
        params: the source's parameters, recorded in ``index.json`` so shards are reproducible.
        kind: ``"image"`` (uint8 ``[H, W, C]``), ``"points"`` (float32 ``[D]``) or ``"sequence"``
            (integer ``[L]``, categories in ``[0, num_categories)``).
        pools: ``"all"`` to be split into train/val/test, or predefined ``"train"``/``"test"``.
        classes: class names, index = label; None for unlabelled data.
        extra: further facts for the index (e.g. the mixture's radius and std).
        num_categories: K of categorical data (required for sequences; for images, data stored as
            ``levels``); None for 8-bit images and points.
        levels: images with ``num_categories``: the 8-bit value category k is stored as.
        alphabet: sequences: the character of each category, ``alphabet[k]`` (pad/end symbol first).
        train_excluded_labels: labels whose samples the writer leaves out of the train split (kept in
            val and test), recorded in the index under ``split``; None: none left out.
    """

    name: str
    params: dict[str, Any]
    kind: Literal["image", "points", "sequence"]
    pools: dict[str, Sequence[tuple[np.ndarray, int | None]]]
    classes: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    num_categories: int | None = None
    levels: list[int] | None = None
    alphabet: str | None = None
    train_excluded_labels: list[int] | None = None


class _ArrayPool(Sequence):
    """A pool backed by in-memory arrays."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], (None if self.y is None else int(self.y[i]))


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of uint8 [N, H, W, C] images to size x size pixels."""
    from PIL import Image

    if images.shape[1] == size:
        return images
    out = []
    for img in images:
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        arr = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
        out.append(arr.reshape(size, size, -1))
    return np.stack(out).astype(np.uint8)


def digits(image_size: ImageSize = 8) -> Source:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), 8-bit grey.

    Pixel values 0..16 are mapped to 0..255; ``image_size`` 16 or 32 upsamples bicubically.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    x = _resize_uint8(x, image_size)
    return Source(
        name="digits",
        params={"image_size": image_size},
        kind="image",
        pools={"all": _ArrayPool(x, d.target.astype(np.int64))},
        classes=[str(c) for c in range(10)],
    )


#: ``binary_digits``: a pixel is 1 where its 8-bit grey value is at least this (the sklearn level
#: 0..16 is >= 8; the float digits' x = v / 127.5 - 1 > 0)
BINARY_THRESHOLD = 128


def binary_digits(image_size: ImageSize = 8, threshold: int = BINARY_THRESHOLD) -> Source:
    """The digits of :func:`digits` binarized: category 1 where the 8-bit grey value is
    ``>= threshold`` (default 128: sklearn's level >= 8 of 16), else 0; stored as 8-bit PNG of 0 and
    255 (``levels [0, 255]``, ``num_categories`` 2), with the digit labels.

    The same 1797 images in the same order as :func:`digits`, so the writer's deterministic split
    (same fractions and seed) puts the same digits in each split: test image i here is test image i
    of ``digits`` thresholded. Read as continuous data (the default) the pixels are -1 and 1; with
    ``ShardDataModule(categorical=True)`` they are the int64 categories 0 and 1.

    Args:
        image_size: 8 (native) or 16 / 32 (bicubic upsampling of the grey digit, then the threshold).
        threshold: 8-bit grey value from which a pixel is 1, in 1 .. 255.
    """
    if not 1 <= threshold <= 255:
        raise ValueError(f"binary_digits: threshold must be in 1 .. 255 (an 8-bit grey value), got {threshold}")
    grey = digits(image_size)
    pool = grey.pools["all"]
    x = np.where(pool.x >= threshold, 255, 0).astype(np.uint8)
    return Source(
        name="binary_digits",
        params={"image_size": image_size, "threshold": threshold},
        kind="image",
        pools={"all": _ArrayPool(x, pool.y)},
        classes=grey.classes,
        extra={"binarized": f"1 where the 8-bit grey digit is >= {threshold}"},
        num_categories=2,
        levels=[0, 255],
    )


ColourDigitsSize = Literal[8, 16, 32]


def tint(grey: np.ndarray, rgb: Sequence[int] | np.ndarray) -> np.ndarray:
    """Tint uint8 grey images ``[H, W, 1]`` or ``[N, H, W, 1]`` with a colour: ``round(grey * rgb /
    255)`` per channel, uint8 ``[..., H, W, 3]``: the digit in that colour on black.

    Args:
        grey: uint8 grey images, 0..255, channel last.
        rgb: one colour ``(r, g, b)`` in 0..255, or one per image ``[N, 3]``.
    """
    rgb = np.asarray(rgb, dtype=np.float64) / 255.0
    if rgb.ndim == 2:  # one colour per image
        rgb = rgb[:, None, None, :]
    return np.rint(grey.astype(np.float64) * rgb).astype(np.uint8)


def colour_digits(image_size: ColourDigitsSize = 16, colours_per_image: int | None = None, seed: int = 0,
                  held_out: str | Sequence[Sequence[int]] | None = None) -> Source:
    """scikit-learn's 8x8 digits upsampled to ``image_size`` pixels and tinted with named colours
    (:data:`COLOURS`): RGB uint8 images of a digit in one colour on black.

    Every one of the 1797 digits appears in ``colours_per_image`` distinct colours, drawn for each
    image from ``numpy.random.default_rng(seed)`` (default: in every colour, 14376 images with
    exactly as many of each (digit image, colour) pair; no randomness then). The label is the joint
    class ``digit * 8 + colour`` (:func:`colour_digit_label`), class names ``"3-red"``; the index
    records the colour names and RGB values under ``extra``.

    Args:
        image_size: side in pixels; the grey digit (0..16 -> 0..255) is upsampled bicubically
            before it is tinted (8: native).
        colours_per_image: distinct colours each digit image is drawn in, 1 .. 8; None: all 8.
        seed: seed of the colour draw (used only when ``colours_per_image`` < 8).
        held_out: (digit, colour) pairs left out of the training split entirely (they stay in val
            and test, to evaluate composition on): a preset of
            :data:`~lightning_diffusion.encodings.HELD_OUT_PRESETS` (``diagonals16``: 16 of the 80,
            two per colour) or the pairs ``[[digit, colour], ...]``; None: none. Recorded in the index
            (``params.held_out``, ``extra.held_out_pairs``, ``split.train_excluded_labels``). A pair out of
            range, or a choice leaving a digit or a colour unseen, is refused (ValueError).
    """
    num_colours = len(COLOURS)
    pairs = held_out_pairs(held_out, 10, num_colours)
    if image_size not in ColourDigitsSize.__args__:
        raise ValueError(f"colour_digits: image_size must be one of {list(ColourDigitsSize.__args__)}, got {image_size}")
    k = num_colours if colours_per_image is None else colours_per_image
    if not 1 <= k <= num_colours:
        raise ValueError(f"colour_digits: colours_per_image must be in 1 .. {num_colours} (or None: all), "
                         f"got {colours_per_image}")
    grey_source = digits(image_size)
    grey, digit = grey_source.pools["all"].x, grey_source.pools["all"].y
    rng = np.random.default_rng(seed)
    # per image, its colours in increasing order: with k = 8 every image in every colour
    chosen = np.sort(np.stack([rng.permutation(num_colours)[:k] for _ in range(len(grey))]), axis=1)
    image_index, colour = np.repeat(np.arange(len(grey)), k), chosen.reshape(-1)
    x = tint(grey[image_index], np.asarray([rgb for _, rgb in COLOURS])[colour])
    return Source(
        name="colour_digits",
        params={"image_size": image_size, "colours_per_image": k, "seed": seed,
                **({"held_out": held_out if isinstance(held_out, str) else [list(p) for p in pairs]} if pairs else {})},
        kind="image",
        pools={"all": _ArrayPool(x, colour_digit_label(digit[image_index], colour).astype(np.int64))},
        classes=[f"{d}-{name}" for d in range(10) for name in COLOUR_NAMES],
        extra={"colours": {name: list(rgb) for name, rgb in COLOURS}, "num_digits": 10, "num_colours": num_colours,
               "label": "digit * num_colours + colour",
               **({"held_out_pairs": [list(p) for p in pairs]} if pairs else {})},
        train_excluded_labels=[int(colour_digit_label(d, c, num_colours)) for d, c in pairs] or None,
    )


def toy2d_points(
    name: Toy2DName, num_points: int, rng: np.random.Generator, radius: float = 2.0, std: float = 0.1
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``num_points`` float32 points [N, 2] of a toy set, with mode labels for gaussians8.

    gaussians8: equal mixture of 8 isotropic Gaussians with std ``std`` centred on a circle of
    radius ``radius`` at angles 2*pi*k/8. moons, swissroll and checkerboard are scaled to lie
    roughly in [-2, 2]^2.
    """
    if name == "gaussians8":
        k = rng.integers(0, 8, num_points)
        angle = 2 * math.pi * k / 8
        centres = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        return (centres + std * rng.standard_normal((num_points, 2))).astype(np.float32), k
    if name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(num_points, noise=0.05, random_state=int(rng.integers(2**31)))
        return ((x - np.array([0.5, 0.25])) * 1.5).astype(np.float32), None
    if name == "swissroll":
        from sklearn.datasets import make_swiss_roll

        x, _ = make_swiss_roll(num_points, noise=0.5, random_state=int(rng.integers(2**31)))
        return (x[:, [0, 2]] / 7.5).astype(np.float32), None
    if name == "checkerboard":
        # 8 unit squares of a 4x4 board on [-2, 2]^2, alternating colours
        x1 = rng.uniform(-2, 2, num_points)
        x2 = rng.uniform(0, 1, num_points) - 2 + rng.integers(0, 2, num_points) * 2
        x2 = x2 + (np.floor(x1) % 2)
        return np.stack([x1, x2], axis=1).astype(np.float32), None
    raise ValueError(f"unknown toy2d set {name!r}; choose one of {list(Toy2DName.__args__)}")


def toy2d(name: Toy2DName = "gaussians8", num_points: int = 20000, seed: int = 0,
          radius: float = 2.0, std: float = 0.1) -> Source:
    """A generated 2-D toy set (see :func:`toy2d_points`); ``num_points`` >= 1 (a ValueError naming
    ``--num_points`` otherwise: an empty dataset trains nothing)."""
    if num_points < 1:
        raise ValueError(f"toy2d: --num_points must be >= 1 (points generated in total, before the split), "
                         f"got {num_points}")
    x, y = toy2d_points(name, num_points, np.random.default_rng(seed), radius=radius, std=std)
    extra = {"radius": radius, "std": std, "num_modes": 8} if name == "gaussians8" else {}
    return Source(
        name="toy2d",
        params={"name": name, "num_points": num_points, "seed": seed,
                **({"radius": radius, "std": std} if name == "gaussians8" else {})},
        kind="points",
        pools={"all": _ArrayPool(x, y)},
        classes=[f"mode{k}" for k in range(8)] if name == "gaussians8" else None,
        extra=extra,
    )


class _ImageFilePool(Sequence):
    """Images read from disk on access, resized (shorter side) and centre-cropped."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int | None, grayscale: bool):
        self.samples, self.image_size, self.grayscale = samples, image_size, grayscale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.grayscale else "RGB")
                if self.image_size is not None:
                    im = _resize_center_crop(im, self.image_size)
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise OSError(f"cannot read image {path}: {e}") from e
        return arr.reshape(arr.shape[0], arr.shape[1], -1), label


def _resize_center_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def imagefolder(path: str, image_size: int | None = None, grayscale: bool = False) -> Source:
    """Any tree ``path/<class>/<image>``; the class is the subfolder name (torchvision's layout).

    Images are converted to RGB (or grey), their shorter side resized to ``image_size`` pixels and
    centre-cropped to a square. Without ``image_size`` all images must already share one size.
    """
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: {root} is not a directory")
    folder = ImageFolder(str(root))
    pool = _ImageFilePool(list(folder.samples), image_size, grayscale)
    return Source(
        name="imagefolder",
        params={"path": str(root.resolve()), "image_size": image_size, "grayscale": grayscale},
        kind="image",
        pools={"all": pool},
        classes=list(folder.classes),
    )


def torchvision_dataset(name: TorchvisionName, root: str, download: bool = False) -> Source:
    """CIFAR10, MNIST or FashionMNIST read through ``torchvision.datasets`` from ``root``.

    Nothing is downloaded unless ``download=True``. The official test split stays the test split.
    """
    import torchvision.datasets as tvd

    cls = {"CIFAR10": tvd.CIFAR10, "MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST}[name]
    pools = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(root, train=train, download=download)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"torchvision {name}: no dataset under --root {root} ({e}). Pass --download true on a "
                "machine with network access, or copy the files there."
            ) from e
        x = np.asarray(ds.data)
        x = x.reshape(*x.shape[:3], -1).astype(np.uint8)  # MNIST [N,28,28] -> [N,28,28,1]
        pools[split] = _ArrayPool(x, np.asarray(ds.targets, dtype=np.int64))
    return Source(
        name="torchvision",
        params={"name": name, "root": str(Path(root).resolve())},
        kind="image",
        pools=pools,
        classes=list(ds.classes),
    )


# -- character-level text ----------------------------------------------------------------------

#: the word lists of the ``text`` extra (wonderwords' packaged lists: plain text, one word a line)
WORD_LISTS = {"nouns": "nounlist.txt", "adjectives": "adjectivelist.txt", "verbs": "verblist.txt"}
WordListName = Literal["nouns", "adjectives", "verbs"]
TEXT_EXTRA = "wonderwords"


def packaged_words(lists: Sequence[WordListName] = ("nouns", "adjectives", "verbs")) -> tuple[list[str], str]:
    """The words of the ``text`` extra's lists (``pip install 'lightning-diffusion[text]'``: the
    wonderwords package ships them as plain text in its wheel; read as files, nothing downloaded)
    and the package's name and version, e.g. ``"wonderwords 3.0.1"``."""
    from importlib import metadata, resources

    from lightning_diffusion.errors import UserError

    unknown = [name for name in lists if name not in WORD_LISTS]
    if unknown or not lists:
        raise ValueError(f"words: lists must be some of {list(WORD_LISTS)}, got {list(lists)}")
    try:
        assets = resources.files(TEXT_EXTRA) / "assets"
        version = metadata.version(TEXT_EXTRA)
    except (ImportError, metadata.PackageNotFoundError) as e:
        raise UserError(f"the text source needs the word lists of the `text` extra: pip install "
                        f"'lightning-diffusion[text]' (the {TEXT_EXTRA} package); or pass your own word "
                        "list with --file") from e
    out: list[str] = []
    for name in lists:
        out += assets.joinpath(WORD_LISTS[name]).read_text(encoding="utf-8").splitlines()
    return out, f"{TEXT_EXTRA} {version}"


def words(lists: Sequence[WordListName] = ("nouns", "adjectives", "verbs"), seq_length: int = 16,
          file: str | None = None) -> Source:
    """A character-level text set: English words as sequences ``[seq_length]`` of categories over
    :data:`ALPHABET` (K = 27: the pad/end symbol ``.`` then ``a`` .. ``z``).

    Each word is lower-cased; words with a character other than ``a`` .. ``z`` (hyphens, spaces,
    apostrophes) or longer than ``seq_length`` are left out, and duplicates are kept once. The
    words are sorted before the writer's deterministic split. Unlabelled.

    Args:
        lists: which of the ``text`` extra's word lists (wonderwords 3.0.1: 6782 nouns, 912
            adjectives, 1042 verbs; :func:`packaged_words`).
        seq_length: L, the sequence length: the longest word kept; the rest of a shorter word is
            the pad/end symbol.
        file: a word list of your own instead (UTF-8 text, one word a line): ``lists`` is ignored.
    """
    if seq_length < 1:
        raise ValueError(f"words: seq_length must be >= 1, got {seq_length}")
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"words: --file {file} is not a file (a word list: one word a line)")
        raw, origin = path.read_text(encoding="utf-8").splitlines(), str(path.resolve())
    else:
        raw, origin = packaged_words(lists)
    letters = set(ALPHABET[1:])
    cleaned = [w.strip().lower() for w in raw if w.strip()]
    kept = sorted({w for w in cleaned if len(w) <= seq_length and set(w) <= letters})
    if not kept:
        raise ValueError(f"words: no word of {origin} has only the letters a .. z and at most {seq_length} characters")
    return Source(
        name="words",
        params={"lists": None if file is not None else list(lists), "seq_length": seq_length, "file": file},
        kind="sequence",
        pools={"all": _ArrayPool(encode_text(kept, seq_length), None)},
        extra={"origin": origin, "words_read": len(cleaned), "words_kept": len(kept),
               "left_out": "words with characters other than a-z or longer than seq_length; duplicates"},
        num_categories=len(ALPHABET),
        alphabet=ALPHABET,
    )
