"""``lightning-diffusion shards SOURCE --out DIR``: one subcommand per data source."""

from __future__ import annotations

from pathlib import Path

from lightning_diffusion.data import sources
from lightning_diffusion.data.shards import write_shards
from lightning_diffusion.data.sources import (BINARY_THRESHOLD, ColourDigitsSize, ImageSize, Toy2DName, TorchvisionName,
                                              WordListName)

Fractions = tuple[float, float, float]


def _write(source: sources.Source, out: str, shard_size: int, fractions: Fractions, seed: int) -> None:
    index = write_shards(source, out, shard_size=shard_size, fractions=fractions, seed=seed)
    counts = ", ".join(f"{s}={v['count']}" for s, v in index["splits"].items())
    print(f"Wrote {Path(out) / 'index.json'}: {counts}; shape {index['shape']} {index['dtype']}")


def digits(*, out: str, image_size: ImageSize = 8, shard_size: int = 256,
           fractions: Fractions = (0.8, 0.1, 0.1), seed: int = 0) -> None:
    """scikit-learn's bundled 8x8 digits as 8-bit PNG with labels.

    Args:
        out: output directory for the shards and index.json (required).
        image_size: 8 (native), or 16 / 32 pixels (bicubic upsampling).
        shard_size: samples per tar shard.
        fractions: train/val/test fractions (sum to 1).
        seed: seed of the deterministic split.
    """
    _write(sources.digits(image_size), out, shard_size, fractions, seed)


def binary_digits(*, out: str, image_size: ImageSize = 8, threshold: int = BINARY_THRESHOLD, shard_size: int = 256,
                  fractions: Fractions = (0.8, 0.1, 0.1), seed: int = 0) -> None:
    """The digits binarized (K = 2): 1 where the 8-bit grey value is >= threshold; the same split as `digits`.

    Args:
        out: output directory for the shards and index.json (required).
        image_size: 8 (native), or 16 / 32 pixels (bicubic upsampling before the threshold).
        threshold: 8-bit grey value from which a pixel is 1 (default 128: sklearn level >= 8 of 16).
        shard_size: samples per tar shard.
        fractions: train/val/test fractions (sum to 1); the defaults and seed give the test digits of `digits`.
        seed: seed of the deterministic split.
    """
    _write(sources.binary_digits(image_size, threshold), out, shard_size, fractions, seed)


def words(*, out: str, lists: tuple[WordListName, ...] = ("nouns", "adjectives", "verbs"), seq_length: int = 16,
          file: str | None = None, shard_size: int = 1024, fractions: Fractions = (0.8, 0.1, 0.1),
          seed: int = 0) -> None:
    """Character-level text: English words as sequences of categories (K = 27: pad/end, a-z).

    The word lists come with the `text` extra (pip install 'lightning-diffusion[text]'), or --file.

    Args:
        out: output directory for the shards and index.json (required).
        lists: the extra's word lists to use: nouns, adjectives, verbs.
        seq_length: sequence length L; longer words are left out, shorter ones end in the pad symbol.
        file: your own word list (UTF-8, one word a line) instead of the lists.
        shard_size: samples per tar shard.
        fractions: train/val/test fractions (sum to 1).
        seed: seed of the deterministic split.
    """
    _write(sources.words(tuple(lists), seq_length, file), out, shard_size, fractions, seed)


def colour_digits(*, out: str, image_size: ColourDigitsSize = 16, colours_per_image: int | None = None,
                  held_out: str | list[tuple[int, int]] | None = None, shard_size: int = 512, fractions: Fractions = (0.8, 0.1, 0.1), seed: int = 0) -> None:
    """The 8x8 digits upsampled and tinted with 8 named colours, RGB; label digit * 8 + colour.

    Args:
        out: output directory for the shards and index.json (required).
        image_size: 16 (default) or 32 pixels (bicubic upsampling before tinting), or 8 (native).
        colours_per_image: distinct colours each digit image is drawn in, 1 .. 8 (default: all 8).
        held_out: (digit, colour) pairs left out of the train split (kept in val/test): a preset
            (diagonals16: 16 of the 80) or [[digit, colour], ...]; default none.
        shard_size: samples per tar shard.
        fractions: train/val/test fractions (sum to 1).
        seed: seed of the colour draw and of the deterministic split.
    """
    _write(sources.colour_digits(image_size, colours_per_image, seed, held_out), out, shard_size, fractions, seed)


def toy2d(*, out: str, name: Toy2DName = "gaussians8", num_points: int = 20000, radius: float = 2.0,
          std: float = 0.1, shard_size: int = 4000, fractions: Fractions = (0.8, 0.1, 0.1), seed: int = 0) -> None:
    """A generated 2-D toy set as float32 npy records.

    Args:
        out: output directory for the shards and index.json (required).
        name: gaussians8 (8-mode mixture on a circle), moons, swissroll or checkerboard.
        num_points: points generated in total, before the split.
        radius: gaussians8: radius of the circle of the mode centres.
        std: gaussians8: standard deviation of each mode.
        shard_size: samples per tar shard.
        fractions: train/val/test fractions (sum to 1).
        seed: seed of the points and of the split.
    """
    _write(sources.toy2d(name, num_points, seed, radius=radius, std=std), out, shard_size, fractions, seed)


def imagefolder(path: str, *, out: str, image_size: int | None = None, grayscale: bool = False,
                shard_size: int = 1000, fractions: Fractions = (0.8, 0.1, 0.1), seed: int = 0) -> None:
    """Any tree PATH/<class>/<image>, the class taken from the subfolder.

    Args:
        path: root of the image tree.
        out: output directory for the shards and index.json (required).
        image_size: resize the shorter side to this many pixels, then centre-crop a square.
        grayscale: store 1-channel images instead of RGB.
        shard_size: samples per tar shard.
        fractions: train/val/test fractions (sum to 1).
        seed: seed of the deterministic split.
    """
    _write(sources.imagefolder(path, image_size, grayscale), out, shard_size, fractions, seed)


def torchvision(name: TorchvisionName, *, out: str, root: str, download: bool = False, shard_size: int = 1000,
                fractions: Fractions = (0.98, 0.02, 0.0), seed: int = 0) -> None:
    """CIFAR10, MNIST or FashionMNIST through torchvision.datasets; the official test split is kept.

    Args:
        name: CIFAR10, MNIST or FashionMNIST.
        out: output directory for the shards and index.json (required).
        root: torchvision's dataset root (where the downloaded files are or go).
        download: download into root first (needs network access).
        shard_size: samples per tar shard.
        fractions: (train, val, ignored): the share of the official training set held out as val is
            val / (train + val).
        seed: seed of the train/val split.
    """
    _write(sources.torchvision_dataset(name, root, download), out, shard_size, fractions, seed)


def shards_cli(argv: list[str]) -> None:
    """Parse ``SOURCE ...`` and write the shards."""
    from jsonargparse import CLI

    CLI({"digits": digits, "binary_digits": binary_digits, "words": words, "colour_digits": colour_digits, "toy2d": toy2d, "imagefolder": imagefolder, "torchvision": torchvision},
        args=argv, prog="lightning-diffusion shards",
        description="Write train/val/test WebDataset tar shards and index.json (counts, shape, dtype, classes, source, SHA-256 per shard).")
