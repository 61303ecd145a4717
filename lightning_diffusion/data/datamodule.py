"""ShardDataModule: WebDataset shards -> batch dicts ``{"x": Tensor, "y": LongTensor}``.

Training reads a *resampled* stream: shards drawn at random with replacement, a shuffle buffer,
and a fixed number of batches per epoch that is the same on every rank, so DDP never waits on a
rank that ran out of data. The stream is a pure function of (seed, epoch, rank, worker), which is
what lets a later resume restore the position in it.

Validation and test read every sample exactly once across all ranks x workers. Rank and world
size are handed to the readers explicitly: with spawn/forkserver workers webdataset's own
node splitter cannot see them and silently duplicates data.

Shard content is untrusted: only PNG/JPEG, ``.npy`` (with ``allow_pickle=False``) and ASCII
``.cls`` labels are decoded; nothing is unpickled.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_diffusion.data.shards import EMBEDDED, SPLITS, ensure_embedded, load_index

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")

# TrainStream's __len__ is exact: each worker yields its own share of the rank's batches.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


class ShardError(RuntimeError):
    """A shard that cannot be read or holds a bad sample; the message names the shard and key."""


def expand_pattern(pattern: str) -> list[str]:
    """Expand a brace pattern (``train-{000000..000009}.tar``, several joined by ``::``) to paths."""
    from webdataset.shardlists import expand_urls

    return list(expand_urls(pattern))


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Yield the raw samples (``{"__key__", "__url__", ext: bytes}``) of one tar shard.

    Any failure to open or parse the tar is raised as :class:`ShardError` naming the shard.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        with open(url, "rb") as stream:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            yield from group_by_keys(files)
    except ShardError:
        raise
    except FileNotFoundError as e:
        raise ShardError(f"shard {url} does not exist") from e
    except Exception as e:  # tarfile.ReadError, truncated data, duplicate names ...
        raise ShardError(f"shard {url} is not a readable tar file: {type(e).__name__}: {e}") from e


def decode_sample(raw: dict[str, Any], shape: tuple[int, ...] | None, labelled: bool) -> tuple[torch.Tensor, int | None]:
    """Decode one raw sample to (x, y): images to float CHW in [-1, 1], points to float32 [D].

    Raises :class:`ShardError` naming the shard and key on a missing key or a wrong shape.
    """
    where = f"shard {raw.get('__url__')}, sample {raw.get('__key__')!r}"
    ext = next((e for e in (*IMAGE_EXTENSIONS, "npy") if e in raw), None)
    if ext is None:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise ShardError(f"{where}: no image or npy entry (keys present: {present}); expected one of {[*IMAGE_EXTENSIONS, 'npy']}")
    try:
        if ext == "npy":
            x = torch.from_numpy(np.load(io.BytesIO(raw[ext]), allow_pickle=False).astype(np.float32))
        else:
            from PIL import Image

            with Image.open(io.BytesIO(raw[ext])) as im:
                im.load()
                arr = np.asarray(im, dtype=np.uint8)
            arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
            x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    except Exception as e:
        raise ShardError(f"{where}: cannot decode .{ext}: {type(e).__name__}: {e}") from e
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ShardError(f"{where}: .{ext} has shape {list(x.shape)}, expected {list(shape)} (from the index / first sample)")
    y = None
    if "cls" in raw:
        try:
            y = int(raw["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as e:
            raise ShardError(f"{where}: .cls is not an ASCII integer") from e
    elif labelled:
        raise ShardError(f"{where}: missing key 'cls' (the dataset has class labels)")
    return x, y


def collate(samples: list[tuple[torch.Tensor, int | None]]) -> dict[str, torch.Tensor]:
    """Stack decoded samples into the batch dict of DESIGN.md."""
    batch = {"x": torch.stack([x for x, _ in samples])}
    if samples[0][1] is not None:
        batch["y"] = torch.tensor([y for _, y in samples], dtype=torch.int64)
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """Infinite resampled stream cut into ``batches_per_rank`` batches per epoch for one rank.

    Every (seed, epoch, rank, worker) gives its own reproducible stream: shards are drawn with
    replacement, samples pass a shuffle buffer of ``shuffle_buffer`` and, if ``random_flip``, are
    flipped horizontally with probability 1/2. Workers share the rank's batches as evenly as
    possible; DataLoader interleaves them.
    """

    def __init__(self, urls: list[str], batch_size: int, batches_per_rank: int, shape: tuple[int, ...],
                 labelled: bool, shuffle_buffer: int, random_flip: bool, seed: int, rank: int, world_size: int):
        super().__init__()
        self.urls, self.batch_size, self.batches_per_rank = urls, batch_size, batches_per_rank
        self.shape, self.labelled = shape, labelled
        self.shuffle_buffer, self.random_flip = shuffle_buffer, random_flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_rank

    def _samples(self, rng: random.Random) -> Iterator[tuple[torch.Tensor, int | None]]:
        buffer: list = []
        while True:
            for raw in iter_shard(rng.choice(self.urls)):
                sample = decode_sample(raw, self.shape, self.labelled)
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], sample = sample, buffer[j]
                yield sample

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        wid, nworkers = _worker()
        n_batches = self.batches_per_rank // nworkers + (wid < self.batches_per_rank % nworkers)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{wid}")
        samples = self._samples(rng)
        for _ in range(n_batches):
            batch = collate([next(samples) for _ in range(self.batch_size)])
            if self.random_flip:
                flip = torch.tensor([rng.random() < 0.5 for _ in range(self.batch_size)])
                batch["x"] = torch.where(flip[:, None, None, None], batch["x"].flip(-1), batch["x"])
            yield batch


class EvalStream(IterableDataset):
    """Reads every sample of ``urls`` exactly once across ranks x workers, in batches.

    With at least as many shards as readers (ranks x workers), reader g takes shards g, g+G, ...;
    otherwise every reader walks all shards and keeps samples g, g+G, ... of the sequence.
    """

    def __init__(self, urls: list[str], batch_size: int, shape: tuple[int, ...], labelled: bool,
                 rank: int, world_size: int):
        super().__init__()
        self.urls, self.batch_size, self.shape, self.labelled = urls, batch_size, shape, labelled
        self.rank, self.world_size = rank, world_size

    def _raw(self) -> Iterator[dict[str, Any]]:
        wid, nworkers = _worker()
        readers, me = self.world_size * nworkers, self.rank * nworkers + wid
        if len(self.urls) >= readers:
            for url in self.urls[me::readers]:
                yield from iter_shard(url)
        else:
            i = 0
            for url in self.urls:
                for raw in iter_shard(url):
                    if i % readers == me:
                        yield raw
                    i += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batch = []
        for raw in self._raw():
            batch.append(decode_sample(raw, self.shape, self.labelled))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


class _EpochLoader(DataLoader):
    """A DataLoader over a TrainStream that hands the trainer's epoch to the stream."""

    def __init__(self, dataset: TrainStream, epoch_fn, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn

    def __iter__(self):
        self.dataset.epoch = self._epoch_fn()  # before the workers copy the dataset
        return super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards written by ``lightning-diffusion shards`` (or any tar shards of
    PNG/JPEG/npy samples with optional ``.cls`` labels) as batch dicts.

    Properties a model needs are read at construction from ``index.json`` (or the first sample),
    so the CLI links them into the model: ``data_shape``, ``num_channels``, ``image_size``,
    ``num_classes``, ``kind``.
    """

    def __init__(
        self,
        dataset: str | None = "digits",
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        random_flip: bool = False,
        batches_per_epoch: int | None = None,
        num_classes: int | None = None,
        seed: int = 0,
    ):
        """
        Args:
            dataset: an embedded dataset name (``digits``, ``digits16``, ``digits32``,
                ``gaussians8``, ``moons``, ``swissroll``, ``checkerboard``; built into ``$LD_DATA``
                on first use), or the path of a shard directory / its ``index.json``. None when
                only shard patterns are given.
            train: brace pattern of training shards, e.g. ``/data/train-{000000..000099}.tar``;
                overrides the index's list.
            val: brace pattern of validation shards; overrides the index's list.
            test: brace pattern of test shards; overrides the index's list.
            batch_size: samples per batch on each device (per rank).
            num_workers: DataLoader worker processes per rank.
            shuffle_buffer: samples held in the training shuffle buffer of each worker.
            random_flip: flip training images horizontally with probability 1/2.
            batches_per_epoch: training batches per epoch on every rank. Default: the training
                count divided by the global batch (batch_size x world size), rounded up.
            num_classes: number of classes, for shards without an index; default from the index.
            seed: seed of the training stream (with epoch, rank and worker).
        """
        super().__init__()
        # num_classes is logged by the model (linked, resolved); two differing copies would clash
        self.save_hyperparameters(ignore=["num_classes"])
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.random_flip = shuffle_buffer, random_flip
        self.batches_per_epoch, self.seed = batches_per_epoch, seed
        self.index: dict[str, Any] | None = None
        self.urls: dict[str, list[str]] = {s: [] for s in SPLITS}
        if dataset is not None:
            path = ensure_embedded(dataset) if dataset in EMBEDDED else Path(dataset)
            self.index, root = load_index(path)
            for split in SPLITS:
                self.urls[split] = [str(root / s["name"]) for s in self.index["splits"].get(split, {}).get("shards", [])]
        for split, pattern in (("train", train), ("val", val), ("test", test)):
            if pattern is not None:
                self.urls[split] = expand_pattern(pattern)
        if not any(self.urls.values()):
            raise ValueError("ShardDataModule: give `dataset` (embedded name or shard directory) or shard patterns")

        if self.index is not None:
            self.data_shape: tuple[int, ...] = tuple(self.index["shape"])
            self.num_classes: int | None = num_classes if num_classes is not None else self.index.get("num_classes")
            self.kind: str = self.index["kind"]
        else:
            url = next(u for s in SPLITS for u in self.urls[s])
            first = next(iter_shard(url), None)
            if first is None:
                raise ShardError(f"shard {url} holds no samples")
            x, _ = decode_sample(first, None, labelled=False)
            self.data_shape, self.num_classes = tuple(x.shape), num_classes
            self.kind = "image" if x.ndim == 3 else "points"
        self.num_channels: int = self.data_shape[0]
        self.image_size: int | None = self.data_shape[-1] if self.kind == "image" else None

    # -- facts -----------------------------------------------------------------------------
    def count(self, split: str) -> int | None:
        """Number of samples in ``split`` according to the index (None without an index)."""
        if self.index is None or split not in self.index["splits"]:
            return None
        return self.index["splits"][split]["count"]

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _labelled(self) -> bool:
        return self.num_classes is not None

    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(num_workers=self.num_workers, persistent_workers=False,
                    multiprocessing_context="spawn" if self.num_workers > 0 else None)

    # -- loaders ---------------------------------------------------------------------------
    def train_batches_per_rank(self) -> int:
        """Training batches per epoch on each rank (the same on all ranks)."""
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        count = self.count("train")
        if count is None:
            raise ValueError("ShardDataModule: set `batches_per_epoch`; the training shards have no index with a count")
        return max(1, math.ceil(count / (self.batch_size * self._rank_world()[1])))

    def train_dataloader(self) -> DataLoader:
        if not self.urls["train"]:
            raise ValueError("ShardDataModule: no training shards (index split 'train' empty and no `train` pattern)")
        rank, world = self._rank_world()
        stream = TrainStream(self.urls["train"], self.batch_size, self.train_batches_per_rank(), self.data_shape,
                             self._labelled(), self.shuffle_buffer, self.random_flip and self.kind == "image",
                             self.seed, rank, world)
        return _EpochLoader(stream, self._current_epoch, **self._loader_kwargs())

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _eval_loader(self, split: str) -> DataLoader:
        if not self.urls[split]:
            raise ValueError(f"ShardDataModule: no {split} shards (index split {split!r} empty and no `{split}` pattern)")
        rank, world = self._rank_world()
        stream = EvalStream(self.urls[split], self.batch_size, self.data_shape, self._labelled(), rank, world)
        return DataLoader(stream, batch_size=None, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
