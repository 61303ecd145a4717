"""ShardDataModule: WebDataset shards -> batch dicts ``{"x": Tensor, "y": LongTensor}``.

``x`` is float (images in [-1, 1], points) or, for categorical data (``categorical``), int64
categories in ``[0, num_categories)``: images ``[B, C, H, W]``, sequences ``[B, L]``.

Training reads a *resampled* stream: shards drawn at random with replacement, a shuffle buffer,
and a fixed number of batches per epoch that is the same on every rank, so DDP never waits on a
rank that ran out of data. The stream is a pure function of (seed, epoch, rank, worker), which is
what lets a later resume restore the position in it.

Validation and test read every sample exactly once across all ranks x workers. Rank and world
size are handed to the readers explicitly: with spawn/forkserver workers webdataset's own
node splitter cannot see them and silently duplicates data.

Small splits (``cache``) are kept in memory, decoded, after each shard's first complete and
checked read: later epochs parse no tar and decode no image, so no worker processes are needed.

Shards and the index may be local or anywhere webdataset reads (``file:``, ``pipe:COMMAND``,
``http(s)://``): the streams open them with webdataset's ``gopen`` and check them alike.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_diffusion.data.shards import (EMBEDDED, INDEX_NAME, SPLITS, ensure_embedded, load_index,
                                             local_shard_path, remote_index, remote_shard_url)
from lightning_diffusion.data.streams import (Categories, EvalStream, Network, ShardError, TrainStream, decode_sample,
                                              expand_pattern, iter_shard, local_path)
from lightning_diffusion.distributed import rank_world

__all__ = ["ShardDataModule", "ShardError"]

#: ``cache=None`` (auto) keeps a split in memory when its shards total at most this on disk and its
#: decoded samples (estimated by :meth:`ShardDataModule.decoded_bytes`) at most this too.
CACHE_AUTO_BYTES = 64 * 2**20
#: what one decoded sample costs in memory besides its elements: the tensor object and its storage
CACHE_SAMPLE_OVERHEAD = 512


def _record_key(url: str) -> str:
    """What a shard's index record is found by: a local shard's real path (however it is spelled),
    a remote one's URL."""
    path = local_path(url)
    return url if path is None else os.path.realpath(path)


def worker_message(error: BaseException) -> str | None:
    """The original message of an error that torch re-raised from a DataLoader worker (its
    ``ExceptionWrapper`` makes it "Caught ShardError in DataLoader worker process 0. Original
    Traceback ..." with the worker's whole traceback); None for any other error."""
    text = str(error.args[0]) if error.args else ""
    if not (text.startswith(f"Caught {type(error).__name__} in DataLoader worker process")
            and "\nOriginal Traceback" in text):
        return None
    kind = type(error)
    # the traceback's last line names the type as traceback.format_exception does, message after it
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    head, found, message = text.rpartition(f"\n{name}: ")
    return message.rstrip("\n") if found else None


class _WorkerErrors:
    """A DataLoader's iterator whose errors from worker processes carry their own message: the same
    error type re-raised with the worker's message, so the CLI prints the one line it prints
    without workers (torch wraps it in the worker's traceback)."""

    def __init__(self, iterator):
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except Exception as e:
            message = worker_message(e)
            if message is None:
                raise
            try:
                error = type(e)(message)
            except Exception:  # a type that cannot be built from a message: keep torch's
                raise e from None
            raise error from None

    def __len__(self) -> int:
        return len(self._iterator)

    def __getattr__(self, name: str):  # what Lightning or torch may ask of the loader's iterator
        if name == "_iterator":
            raise AttributeError(name)
        return getattr(self._iterator, name)


class _Loader(DataLoader):
    """A DataLoader whose worker errors reach the user as one line (:class:`_WorkerErrors`)."""

    def __iter__(self):
        return _WorkerErrors(super().__iter__())


class _EpochLoader(_Loader):
    """A DataLoader over a TrainStream that hands the trainer's epoch to the stream, and knows its
    position for an exact mid-epoch resume.

    Lightning saves ``state_dict()`` in the checkpoint (a stateful loader) and hands it back to
    ``load_state_dict`` on resume: the next epoch iterated is then the saved one, started after the
    batches already trained on (Lightning's own count of processed batches, not the batches
    fetched, which run one ahead).
    """

    def __init__(self, dataset: TrainStream, epoch_fn, progress_fn, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn, self._progress_fn = epoch_fn, progress_fn
        self._resume: dict[str, int] | None = None
        self._iter_epoch: int | None = None

    def _position(self, epoch: int, batches: int) -> tuple[int, int]:
        """``(epoch, batches trained on)`` with a finished epoch as the start of the next one."""
        return (epoch + 1, 0) if batches >= self.dataset.batches_per_rank else (epoch, batches)

    def __iter__(self):
        if self._resume is None:
            epoch, start = self._epoch_fn(), 0
        else:
            # The first iteration after a resume continues the saved position, whatever the trainer's
            # epoch says at this point: Lightning calls iter() before it settles its counters, and
            # for a checkpoint saved after the last batch of an epoch (on_train_batch_end) it is
            # still the finished epoch (state_dict saves that as the next epoch's start; _position
            # also reads checkpoints written before it did).
            epoch, start = self._position(self._resume["epoch"], self._resume["batches"])
            if self._resume.get("num_workers", self.num_workers) != self.num_workers:
                import warnings

                warnings.warn(f"ShardDataModule: resuming with num_workers={self.num_workers}, saved with "
                              f"{self._resume['num_workers']}: the rest of the epoch is not the same batches")
            self._resume = None
        self.dataset.epoch = self._iter_epoch = epoch  # before the workers copy the dataset
        self.dataset.start_batch = start
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from: the epoch being iterated (the loader's own count, not the
        trainer's, which Lightning advances at different points of a finished epoch) and the batches
        of it already trained on; a finished epoch is saved as the start of the next one."""
        epoch, batches = self._position(self._iter_epoch if self._iter_epoch is not None else self._epoch_fn(),
                                        self._progress_fn())
        return {"epoch": epoch, "batches": batches, "seed": self.dataset.seed, "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.dataset.seed) != self.dataset.seed:
            raise ValueError(f"ShardDataModule: the checkpoint's data seed {state['seed']} is not this run's "
                             f"seed {self.dataset.seed}: set data.seed to resume the same stream")
        self._resume = dict(state)


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards written by ``lightning-diffusion shards`` (or any tar shards of
    PNG/JPEG/npy samples with optional ``.cls`` labels) as batch dicts.

    Properties a model needs are read at construction from ``index.json`` (or the first sample),
    so the CLI links them into the model: ``data_shape``, ``num_channels``, ``image_size``,
    ``num_classes``, ``num_categories``, ``kind``.

    With ``categorical`` the batches' ``x`` are int64 categories in ``[0, num_categories)``:
    8-bit images as their 256 grey values (or, for binarized shards, the categories their
    ``levels`` stand for), text as its symbols; ``num_categories`` is None for float data.
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
        multiprocessing_context: str | None = None,
        verify: bool = True,
        categorical: bool | None = None,
        cache: bool | None = None,
        connect_timeout: float = 30.0,
        stall_timeout: float = 30.0,
        retries: int = 3,
    ):
        """
        Args:
            dataset: an embedded dataset name (``digits``, ``digits16``, ``digits32``,
                ``colour_digits`` (16 px RGB), ``colour_digits32``, ``gaussians8``, ``moons``,
                ``swissroll``, ``checkerboard``, ``binary_digits`` (8 px, K = 2), ``words``
                (character-level text, K = 27, needs the ``text`` extra); built into ``$LD_DATA``
                on first use), or the path of a shard directory / its ``index.json`` (also as a
                ``file:`` URL); or a dataset anywhere webdataset reads, its index read from the same
                place as its shards: an ``http(s)://`` (``curl``) directory URL or the URL of its
                ``index.json``, or a ``pipe:`` command that prints the index
                (``pipe:aws s3 cp s3://bucket/digits/index.json -``), whose shards are read by the
                same command with ``index.json`` replaced by each shard's name. None when only
                shard patterns are given.
            train: brace pattern of training shards, e.g. ``/data/train-{000000..000099}.tar``,
                ``https://host/digits/train-{000000..000005}.tar`` or ``pipe:gsutil cat
                gs://bucket/digits/train-{000000..000005}.tar``; overrides the index's list.
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
            multiprocessing_context: start method of the workers (``fork``, ``spawn``,
                ``forkserver``); None: the platform's default. Coverage is exact with any of them.
            verify: check the SHA-256 of every shard listed in ``index.json`` against the index, once
                per local shard and process (worker), on every read of a remote one (each read is a
                new transfer), hashed while the shard is read. False skips the hashing, for very
                large datasets on slow storage. Either way, every complete read of a listed shard
                must give the sample count (and the size in bytes) the index records. A failed
                check is a ShardError naming the shard. Shards given by pattern and not in the index
                go unchecked.
            categorical: read ``x`` as int64 categories (``num_categories`` set) instead of floats.
                True: images become their 8-bit values (K = 256: category ``round((x + 1) *
                127.5)`` of the float image) or, where the index records ``levels`` (binarized
                digits), the category of each level (K = 2); sequences their categories. False:
                floats, refused for sequences. None (default): categorical exactly for data that
                have no float form (sequences: text), floats for images and points. A sample that
                holds floats or a value outside the categories is a ShardError naming the shard
                and key.
            cache: keep each shard's decoded samples ``(x, y)`` in memory after its first complete
                read (which passes the ``verify`` / count checks first; a shard that fails them
                raises and is not kept), and serve its later reads from memory: no tar parsing, and
                each sample decoded once, so training needs no ``num_workers``. The batches are
                bit-identical with and without (same samples, order, flips, resume). Per process
                and per split's loader: each worker (and rank) holds its own copy. A shard changed on
                disk (other size or mtime_ns) is read and checked again; a remote shard is read once
                per loader (no mtime to see a change by). None (default, auto):
                cache a split when its shards total at most 64 MiB (``CACHE_AUTO_BYTES``) on disk
                and their decoded samples, as :meth:`decoded_bytes` estimates them from the index's
                counts (elements x 4 bytes for floats, 8 for int64 categories, + 512 bytes a
                sample), at most 64 MiB too; splits without recorded counts (or, remote, sizes) are
                not cached. E.g.
                digits' training split: 1437 samples, 1.1 MiB decoded, 2.9 MiB on disk (cached);
                colour_digits: 39 MiB decoded; colour_digits32: 140 MiB and CIFAR-10's training
                split: 610 MiB (not cached). True: always (memory is the user's call). False: never.
            connect_timeout: seconds curl waits for an ``http(s)://`` server to accept the
                connection (``curl --connect-timeout``), for the index and every shard.
            stall_timeout: seconds a remote read (``http(s)://``, ``pipe:``; the index and every
                shard) may go without receiving a byte; then the process behind it (curl, the
                command with its children) is killed, and the read is tried again or fails with a
                ShardError naming the URL and the timeout (an OSError for the index). curl's first
                byte may take ``connect_timeout + stall_timeout``.
            retries: how many times a stalled remote read, or a curl transfer that failed in a way
                that may pass (connection refused, reset, timed out or cut off; HTTP 408, 429,
                5xx), is tried again, after 1, 2, 4, ... seconds (at most 30); each retry is logged
                as a warning naming the URL and the attempt, and skips the bytes already read. A
                ``pipe:`` command that fails is not run again. 0: never.
        """
        for option, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                     ("shuffle_buffer", shuffle_buffer, 0), ("batches_per_epoch", batches_per_epoch, 1)):
            if value is not None and value < least:
                raise ValueError(f"ShardDataModule: data.{option} must be >= {least}, got {value}"
                                 + (" (None: one pass over the training split)" if option == "batches_per_epoch" else ""))
        super().__init__()
        # num_classes is logged by the model (linked, resolved); two differing copies would clash
        self.save_hyperparameters(ignore=["num_classes"])
        self.network = Network(connect_timeout, stall_timeout, retries).check("ShardDataModule: data.")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.random_flip = shuffle_buffer, random_flip
        self.batches_per_epoch, self.seed = batches_per_epoch, seed
        self.multiprocessing_context, self.verify = multiprocessing_context, verify
        if cache is not None and not isinstance(cache, bool):
            raise ValueError(f"ShardDataModule: data.cache must be true, false or null (auto), got {cache!r}")
        self.cache = cache
        self.index: dict[str, Any] | None = None
        self.urls: dict[str, list[str]] = {s: [] for s in SPLITS}
        self._records: dict[str, dict[str, Any]] = {}  # _record_key of a shard -> what index.json records of it
        #: where the index was read (a path or URL), for messages; None for shards given by patterns alone
        self.index_at: str | None = None
        if dataset is not None:
            self.index, self.index_at, shard_at = self._read_index(dataset, self.network)
            for split in SPLITS:
                shards = self.index["splits"].get(split, {}).get("shards", [])
                self.urls[split] = [shard_at(s["name"]) for s in shards]
                for s, url in zip(shards, self.urls[split]):
                    self._records[_record_key(url)] = {"count": s.get("count"), "sha256": s.get("sha256"),
                                                       "size": s.get("size"), "index": self.index_at}
        for split, pattern in (("train", train), ("val", val), ("test", test)):
            if pattern is not None:
                self.urls[split] = expand_pattern(pattern)
        if not any(self.urls.values()):
            if dataset is not None:
                raise ValueError(f"ShardDataModule: dataset {dataset!r} has no samples: {self.index_at} lists no shards in "
                                 f"any split; write it again with more samples (`lightning-diffusion shards`)")
            raise ValueError("ShardDataModule: give `dataset` (embedded name or shard directory) or shard patterns")

        if self.index is not None:
            self.data_shape: tuple[int, ...] = tuple(self.index["shape"])
            self.num_classes: int | None = num_classes if num_classes is not None else self.index.get("num_classes")
            self.kind: str = self.index["kind"]
        else:
            url = next(u for s in SPLITS for u in self.urls[s])
            first = next(iter_shard(url, network=self.network), None)
            if first is None:
                raise ShardError(f"shard {url} holds no samples")
            x, _ = decode_sample(first, None, labelled=False)
            self.data_shape, self.num_classes = tuple(x.shape), num_classes
            self.kind = "image" if x.ndim == 3 else "points"
        self.num_channels: int = self.data_shape[0]
        self.image_size: int | None = self.data_shape[-1] if self.kind == "image" else None
        self._categories = self._resolve_categories(dataset, categorical)
        #: whether ``x`` is int64 categories (the resolved ``categorical`` option)
        self.categorical: bool = self._categories is not None
        #: K of the batches' categories; None for float data (linked into a model's ``num_categories``)
        self.num_categories: int | None = None if self._categories is None else self._categories.num_categories
        #: text: the symbol of each category (``alphabet[0]`` the pad/end symbol), for
        #: :func:`~lightning_diffusion.data.sources.decode_text`; None for other data
        self.alphabet: str | None = (self.index or {}).get("alphabet") if self.categorical else None

    @staticmethod
    def _read_index(dataset: str, network: Network) -> tuple[dict[str, Any], str, Callable[[str], str]]:
        """(index, where it was read, the function from a shard's name to its path or URL) of an
        embedded name, a local directory / index.json (path or ``file:``), or a remote URL."""
        if dataset in EMBEDDED:
            root = ensure_embedded(dataset)
        elif (path := local_path(dataset)) is not None:
            root = Path(path)
        else:
            index, index_url = remote_index(dataset, network)
            return index, index_url, lambda name: remote_shard_url(index_url, name)
        if not root.exists():
            raise FileNotFoundError(
                f"ShardDataModule: dataset {dataset!r} is neither an embedded dataset ({', '.join(EMBEDDED)}) "
                "nor an existing shard directory or index.json, nor a URL webdataset reads (https://, pipe:); "
                "write shards with `lightning-diffusion shards`")
        index, root = load_index(root)
        return index, str(root / INDEX_NAME), lambda name: local_shard_path(root / INDEX_NAME, name)

    def _resolve_categories(self, dataset: str | None, categorical: bool | None) -> Categories | None:
        """How ``x`` is decoded: None (floats) or the :class:`Categories`, refusing a reading the
        data cannot have (a ValueError naming the dataset and the option)."""
        index = self.index or {}
        where = f"ShardDataModule: dataset {dataset!r}" if dataset is not None else "ShardDataModule: the shards"
        k = index.get("num_categories")
        if categorical is None:
            categorical = self.kind not in ("image", "points")
        if not categorical:
            if self.kind not in ("image", "points"):
                raise ValueError(f"{where} holds {self.kind}s of {k} categories, which have no float form: "
                                 "leave data.categorical unset (or true)")
            return None
        if self.kind == "points":
            raise ValueError(f"{where} holds continuous points; data.categorical=true is for images and sequences")
        if k is None:
            if self.kind != "image":
                raise ValueError(f"{where}: categorical {self.kind}s need an index.json that records num_categories")
            if self.index is not None and self.index.get("dtype", "uint8") != "uint8":
                raise ValueError(f"{where}: images of dtype {self.index['dtype']} cannot be read as 8-bit categories")
            return Categories(256)  # 8-bit images: the grey value is the category
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"{where}: index.json records num_categories={k!r}; it must be an integer >= 2")
        levels = index.get("levels")
        if self.kind == "image" and levels is not None:
            if len(levels) != k:
                raise ValueError(f"{where}: index.json records {len(levels)} levels for {k} categories")
            return Categories(k, tuple(int(v) for v in levels))
        return Categories(k)

    # -- facts -----------------------------------------------------------------------------
    def count(self, split: str) -> int | None:
        """Number of samples in ``split`` according to the index (None without an index)."""
        if self.index is None or split not in self.index["splits"]:
            return None
        return self.index["splits"][split]["count"]

    def _rank_world(self) -> tuple[int, int]:
        return rank_world(getattr(self, "trainer", None))

    def _labelled(self) -> bool:
        return self.num_classes is not None

    def _shard_records(self, urls: list[str]) -> dict[str, dict[str, Any]]:
        """What the index records of each of ``urls`` (those it lists), for the streams' checks."""
        return {u: self._records[r] for u in urls if (r := _record_key(u)) in self._records}

    def decoded_bytes(self, split: str) -> int | None:
        """Estimated memory of ``split``'s decoded samples, what ``cache`` holds of it per process:
        samples x (elements x 4 bytes for floats, 8 for int64 categories, + 512 bytes of tensor a
        sample), from the counts index.json records; None when a shard of the split has none."""
        counts = [self._records.get(_record_key(u), {}).get("count") for u in self.urls.get(split, [])]
        if not counts or any(c is None for c in counts):
            return None
        per_sample = math.prod(self.data_shape) * (8 if self.categorical else 4) + CACHE_SAMPLE_OVERHEAD
        return sum(counts) * per_sample

    def caches(self, split: str) -> bool:
        """Whether ``split``'s loaders keep its decoded samples in memory (the resolved ``cache``)."""
        if self.cache is not None:
            return self.cache
        decoded = self.decoded_bytes(split)
        if decoded is None or decoded > CACHE_AUTO_BYTES:
            return False
        on_disk = 0
        for url in self.urls[split]:
            path = local_path(url)
            if path is None:  # remote: the size its index records
                size = self._records.get(url, {}).get("size")
                if size is None:
                    return False
                on_disk += size
                continue
            try:
                on_disk += os.path.getsize(path)
            except OSError:
                return False  # a missing shard: the stream names it
        return on_disk <= CACHE_AUTO_BYTES

    def _loader_kwargs(self) -> dict[str, Any]:
        # Our own generator: DataLoader.__iter__ draws its workers' base seed from it, and from the global
        # torch RNG without one. The streams seed themselves, so that draw only disturbed the training
        # noise and dropout: an iter() between a checkpoint and the next step (a new epoch, validation)
        # then made the resumed run differ from the straight one.
        return dict(num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                    multiprocessing_context=self.multiprocessing_context if self.num_workers > 0 else None)

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
            raise ValueError(self._no_shards("train"))
        rank, world = self._rank_world()
        stream = TrainStream(self.urls["train"], self.batch_size, self.train_batches_per_rank(), self.data_shape,
                             self._labelled(), self.shuffle_buffer, self.random_flip and self.kind == "image",
                             self.seed, rank, world, self._shard_records(self.urls["train"]), self.verify,
                             self._categories, self.caches("train"), self.network)
        return _EpochLoader(stream, self._current_epoch, self._batches_done, **self._loader_kwargs())

    def _no_shards(self, split: str) -> str:
        """Why ``split`` cannot be read: the index it came from has no samples in it."""
        if self.index_at is None:
            return f"ShardDataModule: no {split} shards: give a `{split}` pattern (data.{split}) or a dataset"
        return (f"ShardDataModule: {self.index_at} has no samples in split {split!r}: write the dataset with enough "
                f"samples for every split (`lightning-diffusion shards`), or give a `{split}` pattern (data.{split})")

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def _batches_done(self) -> int:
        """Training batches of the current epoch the trainer has processed (0 without a trainer)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every sample of ``split`` (train, val or test) exactly once over ranks x workers, in
        shard order, unshuffled: what evaluation and real-data statistics read."""
        return self._eval_loader(split)

    def fingerprint(self, split: str) -> str:
        """A short key of ``split``'s content (the SHA-256s of its shards in the index, else their
        paths): caches of statistics of real data are keyed by it."""
        import hashlib

        shards = (self.index or {}).get("splits", {}).get(split, {}).get("shards")
        parts = [str(s.get("sha256", s)) if isinstance(s, dict) else str(s) for s in shards] if shards else \
            [str(u) for u in self.urls.get(split, [])]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _eval_loader(self, split: str) -> DataLoader:
        if split not in self.urls:
            raise ValueError(f"ShardDataModule: unknown split {split!r}; choose train, val or test")
        if not self.urls[split]:
            raise ValueError(self._no_shards(split))
        rank, world = self._rank_world()
        stream = EvalStream(self.urls[split], self.batch_size, self.data_shape, self._labelled(), rank, world,
                            self._shard_records(self.urls[split]), self.verify, self._categories,
                            self.caches(split), self.network)
        return _Loader(stream, batch_size=None, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
