"""Writing WebDataset tar shards and their ``index.json``; the embedded datasets' cache.

On-disk format (one directory per dataset)::

    index.json
    train-000000.tar  train-000001.tar ...  val-000000.tar ...  test-000000.tar ...

Each tar sample ``<key>.png`` (8-bit image) or ``<key>.npy`` (float32 point, or an integer
sequence of categories), plus ``<key>.cls`` (ASCII integer label) where the data has labels.
``index.json`` records the source and its parameters, the sample shape (``[C, H, W]`` for images,
``[D]`` for points, ``[L]`` for sequences) and dtype, the classes, and per split the sample count
and every shard's file name, count, SHA-256 and size in bytes. A categorical source also records
``num_categories`` (K) and ``levels`` (images: the 8-bit value of each category) or ``alphabet``
(text: the character of each category); other indexes have none of these keys.

A dataset may live anywhere webdataset reads (:func:`remote_index`): its ``index.json`` is read from
the same place as its shards, an ``http(s)://`` directory or a ``pipe:`` command that prints it.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lightning_diffusion.data.sources import Source, binary_digits, colour_digits, digits, toy2d, words
from lightning_diffusion.data.streams import Network, ShardError, iter_shard, local_path, read_url
from lightning_diffusion.paths import data_cache_dir, sha256_file  # noqa: F401 - importable from here as before

INDEX_FORMAT = "lightning-diffusion-shards/1"
SPLITS = ("train", "val", "test")


def encode_sample(x: np.ndarray, kind: str) -> tuple[str, bytes]:
    """Encode one sample as (extension, bytes): 8-bit PNG for images, ``.npy`` for points (float32)
    and sequences (their integer dtype)."""
    if kind == "image":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, format="PNG")
        return "png", buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x) if kind == "sequence" else np.ascontiguousarray(x, dtype=np.float32),
            allow_pickle=False)
    return "npy", buf.getvalue()


def _check_categorical(source: Source) -> None:
    """A categorical source's facts agree with each other (before anything is written)."""
    k = source.num_categories
    if source.kind == "sequence" and k is None:
        raise ValueError(f"{source.name}: a sequence source must set num_categories")
    if k is None:
        return
    if k < 2:
        raise ValueError(f"{source.name}: num_categories must be >= 2, got {k}")
    if source.kind == "points":
        raise ValueError(f"{source.name}: points are continuous; num_categories is for images and sequences")
    if source.kind == "image" and (source.levels is None or len(source.levels) != k
                                   or any(not 0 <= v <= 255 for v in source.levels)):
        raise ValueError(f"{source.name}: categorical images need levels, the 8-bit value of each of the "
                         f"{k} categories, got {source.levels}")
    if source.alphabet is not None and len(source.alphabet) != k:
        raise ValueError(f"{source.name}: the alphabet has {len(source.alphabet)} symbols, num_categories is {k}")


def _check_sample(source: Source, x: np.ndarray, i: int) -> None:
    """One sample of a categorical source holds only its categories (levels for images)."""
    k = source.num_categories
    if k is None:
        return
    if source.kind == "sequence":
        if x.dtype.kind not in "iu" or x.size and (x.min() < 0 or x.max() >= k):
            raise ValueError(f"{source.name}: sample {i} is not integer categories in [0, {k}) "
                             f"(dtype {x.dtype}, range {x.min() if x.size else None}..{x.max() if x.size else None})")
    elif not np.isin(x, source.levels).all():
        raise ValueError(f"{source.name}: sample {i} has pixel values other than the levels {source.levels}")


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Deterministic split of ``range(n)`` into train/val/test by ``fractions`` (they sum to 1).

    A permutation from ``numpy.random.default_rng(seed)``; val and test get ``round(f * n)``
    samples and train the rest, so the same (n, fractions, seed) always gives the same split.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"--fractions must be three non-negative numbers summing to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
    n_train = n - n_val - n_test
    return {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}


def write_shards(
    source: Source,
    out: str | Path,
    shard_size: int = 1000,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``source`` as train/val/test tar shards plus ``index.json`` into ``out``; return the index.

    Args:
        source: what to write (see :mod:`lightning_diffusion.data.sources`).
        out: output directory, created if missing; existing shards of the same names are replaced.
        shard_size: samples per tar shard.
        fractions: train/val/test fractions for sources without a predefined split. For sources
            with an official test split, the test split is kept and ``fractions[1] /
            (fractions[0] + fractions[1])`` of the official training set becomes val.
        seed: seed of the deterministic split.
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
    _check_categorical(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "all" in source.pools:
        pool = source.pools["all"]
        assignment = {s: (pool, idx) for s, idx in split_indices(len(pool), fractions, seed).items()}
    else:
        train_pool, test_pool = source.pools["train"], source.pools["test"]
        val_frac = fractions[1] / max(fractions[0] + fractions[1], 1e-12)
        parts = split_indices(len(train_pool), (1 - val_frac, val_frac, 0.0), seed)
        assignment = {
            "train": (train_pool, parts["train"]),
            "val": (train_pool, parts["val"]),
            "test": (test_pool, np.arange(len(test_pool))),
        }
    if source.train_excluded_labels:  # held out of training entirely (composition); val and test keep them
        pool, indices = assignment["train"]
        excluded = set(source.train_excluded_labels)
        assignment["train"] = (pool, np.asarray([i for i in indices if pool[int(i)][1] not in excluded], dtype=np.int64))

    shape, dtype = None, None
    splits: dict[str, Any] = {}
    for split in SPLITS:
        pool, indices = assignment[split]
        shards, written = [], 0
        for first in range(0, len(indices), shard_size):
            name = f"{split}-{len(shards):06d}.tar"
            # mtime=0 makes the bytes, and so the SHA-256, reproducible
            with wds.TarWriter(str(out / name), encoder=False, mtime=0) as sink:
                for i in indices[first:first + shard_size]:
                    x, y = pool[int(i)]
                    sample_shape = [x.shape[2], x.shape[0], x.shape[1]] if source.kind == "image" else list(x.shape)
                    if shape is None:
                        shape = sample_shape
                    elif sample_shape != shape:
                        raise ValueError(
                            f"{source.name}: sample {int(i)} has shape {sample_shape}, others {shape}; "
                            "pass an image size so all samples are resized to one shape"
                        )
                    _check_sample(source, x, int(i))
                    dtype = str(x.dtype)
                    ext, data = encode_sample(x, source.kind)
                    record = {"__key__": f"{split}{written:08d}", ext: data}
                    if y is not None:
                        record["cls"] = str(int(y)).encode()
                    sink.write(record)
                    written += 1
            shards.append({"name": name, "count": min(shard_size, len(indices) - first),
                           "sha256": sha256_file(out / name), "size": (out / name).stat().st_size})
        splits[split] = {"count": written, "shards": shards}

    index = {
        "format": INDEX_FORMAT,
        "source": source.name,
        "params": source.params,
        "kind": source.kind,
        "shape": shape,
        "dtype": "uint8" if source.kind == "image" else dtype if source.kind == "sequence" else "float32",
        "num_classes": None if source.classes is None else len(source.classes),
        "classes": source.classes,
        "split": {"fractions": list(fractions), "seed": seed, "shard_size": shard_size,
                  **({"train_excluded_labels": sorted(source.train_excluded_labels)}
                     if source.train_excluded_labels else {})},
        "extra": source.extra,
        "splits": splits,
    }
    if source.num_categories is not None:  # only categorical indexes have these keys
        index["num_categories"] = source.num_categories
        if source.levels is not None:
            index["levels"] = list(source.levels)
        if source.alphabet is not None:
            index["alphabet"] = source.alphabet
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out / "index.json")
    return index


def load_index(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Read ``index.json`` (given as the file or its directory); return (index, directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shard index at {path}; write one with `lightning-diffusion shards`")
    return _parse_index(path.read_bytes(), path), path.parent


def _parse_index(data: bytes, where: str | Path) -> dict[str, Any]:
    """The index in ``data`` (the bytes of ``where``, named in errors), checked for its keys."""
    try:
        index = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e
    for key in ("kind", "shape", "splits"):
        if not isinstance(index, dict) or key not in index:
            raise ValueError(f"{where}: missing key {key!r}; is it an index written by `lightning-diffusion shards`?")
    return index


INDEX_NAME = "index.json"
# a shard name the index may give a remote dataset: a relative path of plain characters, so that it
# goes into a URL or a pipe: command as it is (the index is data, and a pipe: command runs in the shell)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")


def remote_index(url: str, network: Network = Network()) -> tuple[dict[str, Any], str]:
    """Read the ``index.json`` of a dataset at ``url`` (anything webdataset reads but a local path,
    see :class:`~lightning_diffusion.data.streams.UrlStream`); return (index, the index's URL).

    ``url`` names the index itself (it ends in ``.json``: ``https://host/digits/index.json``), a
    directory that holds it (``https://host/digits`` or ``.../digits/``: ``/index.json`` is
    appended), or, for ``pipe:``, a command that prints it (``pipe:aws s3 cp
    s3://bucket/digits/index.json -``). The shards are read from the same place:
    :func:`remote_shard_url`. The read waits and retries as ``network`` says; a failed or stalled
    read is an OSError naming the URL (and the timeout).
    """
    index_url = url
    if url.startswith("pipe:"):
        if INDEX_NAME not in url:
            raise ValueError(
                f"dataset {url!r} is a command that does not read {INDEX_NAME}: give the command that prints the "
                f"index, e.g. pipe:aws s3 cp s3://bucket/digits/{INDEX_NAME} - (each shard is read by the same "
                f"command with {INDEX_NAME} replaced by the shard's name), or give the shards as train/val/test "
                "patterns with dataset null")
    elif not url.split("?")[0].endswith(".json"):
        index_url = url.rstrip("/") + "/" + INDEX_NAME
    try:
        data = read_url(index_url, network)
    except OSError as e:
        raise OSError(f"no shard index: {e}; give the URL of the dataset's directory or of its {INDEX_NAME}") from e
    return _parse_index(data, index_url), index_url


def remote_shard_url(index_url: str, name: str) -> str:
    """The URL (or ``pipe:`` command) that reads shard ``name`` of the index at ``index_url``: the
    index's URL with its last ``index.json`` (or, for a URL, its last path component) replaced by
    the name. A name that is not a plain relative path is refused (a :class:`ShardError` naming the
    index and the name)."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name.split("/"):
        raise ShardError(f"{index_url} lists a shard named {name!r}; a remote index may name its shards only with "
                         "letters, digits and _.+-/ (a relative path inside the dataset's directory, no '..'): "
                         "rewrite the index")
    if INDEX_NAME in index_url:
        head, _, tail = index_url.rpartition(INDEX_NAME)
        return head + name + tail
    path, query = (index_url.split("?", 1) + [""])[:2]
    return path.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")


def local_shard_path(index_path: str | Path, name: Any) -> str:
    """The path of shard ``name`` of the local index at ``index_path``: the name must be a relative
    path inside the index's directory (no absolute path, no ``..``, no symlink leading out of the
    directory), and, where it exists, a regular file (not a directory, device or FIFO). Anything
    else is a :class:`ShardError` naming the index and the name: an index names only its own
    shards. A missing file is left to the read, which names it."""
    index_path = Path(index_path)
    root = index_path.parent
    problem = None
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        problem = "it is not a relative path inside the dataset's directory (absolute, empty or with '..')"
    else:
        real, real_root = os.path.realpath(root / name), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            problem = f"it leads outside the dataset's directory {root} (to {real}, through a symlink)"
        elif os.path.exists(real) and not stat.S_ISREG(os.stat(real).st_mode):
            problem = "it is not a regular file (a directory, device or FIFO)"
    if problem is not None:
        raise ShardError(f"{index_path} lists a shard named {name!r}, but {problem}: an index names only the tar "
                         f"files of its own directory; rewrite it with `lightning-diffusion shards`")
    return str(root / name)


def verify_shards(path: str | Path) -> None:
    """Check every shard listed in an index against its recorded SHA-256; raise naming the first bad one.

    ``path`` is the index or its directory, local or anywhere webdataset reads (a URL or ``pipe:``
    command, as :func:`remote_index` takes it): a remote shard is read whole through the same
    checks as training reads it (count, size and SHA-256; a :class:`ShardError` naming its URL)."""
    if local_path(str(path)) is None:
        index, index_url = remote_index(str(path))
        for split in index["splits"].values():
            for shard in split["shards"]:
                for _ in iter_shard(remote_shard_url(index_url, shard["name"]), {**shard, "index": index_url}):
                    pass
        return
    index, root = load_index(path)
    for split in index["splits"].values():
        for shard in split["shards"]:
            file = Path(local_shard_path(root / INDEX_NAME, shard["name"]))
            if not file.is_file():
                raise FileNotFoundError(f"shard {file} listed in {root / 'index.json'} is missing")
            if sha256_file(file) != shard["sha256"]:
                raise ValueError(f"shard {file}: SHA-256 differs from index.json (corrupt or replaced)")


# Embedded datasets: built on first use, no network needed.
EMBEDDED: dict[str, tuple[Any, dict[str, Any], int]] = {
    # name: (source function, its arguments, shard size)
    "digits": (digits, {"image_size": 8}, 256),
    "digits16": (digits, {"image_size": 16}, 256),
    "digits32": (digits, {"image_size": 32}, 256),
    "binary_digits": (binary_digits, {"image_size": 8}, 256),
    "colour_digits": (colour_digits, {"image_size": 16}, 512),
    "colour_digits32": (colour_digits, {"image_size": 32}, 512),
    # 8x8, the 16 (digit, colour) pairs of the diagonals16 preset held out of training: composition
    "colour_digits8_held_out": (colour_digits, {"image_size": 8, "held_out": "diagonals16"}, 512),
    "gaussians8": (toy2d, {"name": "gaussians8"}, 4000),
    "moons": (toy2d, {"name": "moons"}, 4000),
    "swissroll": (toy2d, {"name": "swissroll"}, 4000),
    "checkerboard": (toy2d, {"name": "checkerboard"}, 4000),
    "words": (words, {"seq_length": 16}, 1024),  # needs the `text` extra
}


def ensure_embedded(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the directory of embedded dataset ``name``, writing its shards first if missing.

    Safe when several processes (DDP ranks) call it at once: one writes under a file lock into a
    temporary directory that is renamed into place, the others wait and reuse it.
    """
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded dataset {name!r}; choose one of {sorted(EMBEDDED)}")
    fn, kwargs, shard_size = EMBEDDED[name]
    root = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if (target / "index.json").is_file():
        return target
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "index.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            write_shards(fn(**kwargs), tmp, shard_size=shard_size)
            if target.exists():  # a half-written directory from an old crash
                shutil.rmtree(target)
            os.replace(tmp, target)
    return target
