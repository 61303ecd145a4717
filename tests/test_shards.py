"""Shard writers: round trips of counts, shapes, labels, pixels and SHA-256 for every source."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import run_cli
from lightning_diffusion.data import sources
from lightning_diffusion.data.datamodule import decode_sample, iter_shard
from lightning_diffusion.data.shards import load_index, sha256_file, split_indices, verify_shards, write_shards


def read_split(root, split):
    index, root = load_index(root)
    xs, ys = [], []
    for shard in index["splits"][split]["shards"]:
        n = 0
        for raw in iter_shard(str(root / shard["name"])):
            x, y = decode_sample(raw, tuple(index["shape"]), index["num_classes"] is not None)
            xs.append(x)
            ys.append(y)
            n += 1
        assert n == shard["count"]
    return torch.stack(xs), ys


def to_model_space(uint8_hwc):
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1], the DataModule's mapping."""
    return torch.from_numpy(uint8_hwc).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_digits_round_trip_and_determinism(tmp_path):
    from sklearn.datasets import load_digits

    index = write_shards(sources.digits(8), tmp_path / "a", shard_size=256)
    assert {s: v["count"] for s, v in index["splits"].items()} == {"train": 1437, "val": 180, "test": 180}
    assert index["shape"] == [1, 8, 8] and index["dtype"] == "uint8"
    assert index["num_classes"] == 10 and index["classes"] == [str(i) for i in range(10)]
    assert index["source"] == "digits" and index["params"] == {"image_size": 8}
    assert len(index["splits"]["train"]["shards"]) == 6  # ceil(1437 / 256)
    verify_shards(tmp_path / "a")

    d = load_digits()
    pixels = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)[..., None]
    split = split_indices(1797, (0.8, 0.1, 0.1), 0)
    for name in ("train", "val", "test"):
        x, y = read_split(tmp_path / "a", name)
        assert y == d.target[split[name]].tolist()
        assert torch.equal(x, to_model_space(pixels[split[name]]))

    # the same arguments give byte-identical shards; another seed another split
    again = write_shards(sources.digits(8), tmp_path / "b", shard_size=256)
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [s["sha256"] for s in index["splits"]["train"]["shards"]]
    other = split_indices(1797, (0.8, 0.1, 0.1), 1)
    assert not np.array_equal(other["val"], split["val"])


def test_digits_upsampled_shape(tmp_path):
    index = write_shards(sources.digits(16), tmp_path, shard_size=2000)
    assert index["shape"] == [1, 16, 16]
    x, _ = read_split(tmp_path, "val")
    assert x.shape == (180, 1, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_toy2d_round_trip(tmp_path):
    index = write_shards(sources.toy2d("gaussians8", 1000, seed=3, radius=2.0, std=0.1), tmp_path, shard_size=300)
    assert {s: v["count"] for s, v in index["splits"].items()} == {"train": 800, "val": 100, "test": 100}
    assert index["shape"] == [2] and index["dtype"] == "float32" and index["kind"] == "points"
    assert index["extra"] == {"radius": 2.0, "std": 0.1, "num_modes": 8}
    x_all, y_all = sources.toy2d_points("gaussians8", 1000, np.random.default_rng(3))
    split = split_indices(1000, (0.8, 0.1, 0.1), 0)
    x, y = read_split(tmp_path, "train")
    assert torch.equal(x, torch.from_numpy(x_all[split["train"]]))
    assert y == y_all[split["train"]].tolist()
    # every point lies near its mode's centre: radius 2, std 0.1 -> within 6 std
    angle = 2 * np.pi * np.asarray(y) / 8
    centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
    assert np.abs(x.numpy() - centres).max() < 0.6


@pytest.mark.parametrize("name", ["moons", "swissroll", "checkerboard"])
def test_toy2d_other_sets(name, tmp_path):
    index = write_shards(sources.toy2d(name, 2000), tmp_path)
    assert index["num_classes"] is None and index["shape"] == [2]
    x, y = read_split(tmp_path, "train")
    assert x.shape == (1600, 2) and all(v is None for v in y)
    assert x.abs().max() < 4
    if name == "checkerboard":  # points only on squares where floor(x1) + floor(x2) is even
        parity = (np.floor(x[:, 0].numpy()) + np.floor(x[:, 1].numpy())) % 2
        assert (parity == 0).all()


def test_imagefolder_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in (("cat", 7), ("dog", 5)):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(n):
            w, h = rng.integers(12, 30, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "tree" / cls / f"{i}.png")
    index = write_shards(sources.imagefolder(str(tmp_path / "tree"), image_size=8), tmp_path / "out",
                         shard_size=4, fractions=(0.5, 0.25, 0.25))
    assert index["classes"] == ["cat", "dog"] and index["shape"] == [3, 8, 8]
    assert sum(v["count"] for v in index["splits"].values()) == 12
    labels = []
    for split in ("train", "val", "test"):
        x, y = read_split(tmp_path / "out", split)
        assert x.shape[1:] == (3, 8, 8)
        labels += y
    assert sorted(labels) == [0] * 7 + [1] * 5


def test_imagefolder_needs_one_size(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "0.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "a" / "1.png")
    with pytest.raises(ValueError, match="image size"):
        write_shards(sources.imagefolder(str(tmp_path)), tmp_path / "out", fractions=(1.0, 0.0, 0.0))


def _fake_cifar10(root, n_per_batch=10):
    """CIFAR-10 in torchvision's on-disk format (cifar-10-batches-py pickles)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        arrays[name] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return arrays, names


def test_torchvision_cifar10_round_trip(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    arrays, names = _fake_cifar10(tmp_path / "root")
    # The fake files cannot match CIFAR-10's published MD5s; everything else is torchvision's own reader.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    index = write_shards(sources.torchvision_dataset("CIFAR10", str(tmp_path / "root")), tmp_path / "out",
                         shard_size=16, fractions=(0.8, 0.2, 0.0))
    assert {s: v["count"] for s, v in index["splits"].items()} == {"train": 40, "val": 10, "test": 10}
    assert index["shape"] == [3, 32, 32] and index["classes"] == names and index["params"]["name"] == "CIFAR10"
    for shard in index["splits"]["train"]["shards"]:
        assert sha256_file(tmp_path / "out" / shard["name"]) == shard["sha256"]
    x, y = read_split(tmp_path / "out", "test")  # the official test split, in order
    test_x, test_y = arrays["test_batch"]
    assert y == test_y and torch.equal(x, to_model_space(test_x))
    train_x = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    split = split_indices(50, (0.8, 0.2, 0.0), 0)
    x, y = read_split(tmp_path / "out", "val")
    assert y == [train_y[i] for i in split["val"]] and torch.equal(x, to_model_space(train_x[split["val"]]))


def test_torchvision_mnist_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = {}
    for prefix, n in (("train", 20), ("t10k", 6)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        # IDX format: magic (0x0803 images, 0x0801 labels), big-endian dims, then the bytes
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(np.array([2051, n, 28, 28], ">i4").tobytes() + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], ">i4").tobytes() + y.tobytes())
        images[prefix] = (x, y)
    index = write_shards(sources.torchvision_dataset("MNIST", str(tmp_path / "root")), tmp_path / "out")
    assert index["splits"]["test"]["count"] == 6 and index["shape"] == [1, 28, 28]
    x, y = read_split(tmp_path / "out", "test")
    assert y == images["t10k"][1].tolist() and torch.equal(x, to_model_space(images["t10k"][0][..., None]))


def test_torchvision_missing_root_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        sources.torchvision_dataset("CIFAR10", str(tmp_path / "nothing"))


def test_shards_command(tmp_path):
    proc = run_cli("shards", "toy2d", "--out", str(tmp_path), "--name", "moons", "--num_points", "500",
                   "--shard_size", "100")
    assert "train=400" in proc.stdout
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["params"]["name"] == "moons" and len(index["splits"]["train"]["shards"]) == 4
    assert "torchvision" in run_cli("shards", "--help").stdout
