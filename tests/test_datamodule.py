"""ShardDataModule: batch format, exact coverage over 2 ranks x 2 workers, equal train batch counts,
deterministic streams, and clear errors for bad shards."""

import io
import multiprocessing as mp
import pickle
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_diffusion.data import ShardDataModule, ShardError, ensure_embedded, verify_shards
from lightning_diffusion.data.shards import EMBEDDED, load_index, write_shards
from lightning_diffusion.data.sources import toy2d


def attach(dm, rank, world, epoch=0):
    """Pretend the DataModule runs on ``rank`` of ``world`` (what the Trainer tells it under DDP)."""
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)
    return dm


def rows(batches):
    return [tuple(r) for b in batches for r in b["x"].reshape(b["x"].shape[0], -1).tolist()]


def test_embedded_digits_batch_format():
    dm = ShardDataModule("digits", batch_size=32)
    assert dm.data_shape == (1, 8, 8) and dm.num_classes == 10 and dm.num_channels == 1 and dm.image_size == 8
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "y"}
    assert batch["x"].shape == (32, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1 and batch["x"].min() == -1
    assert batch["y"].dtype == torch.int64 and 0 <= batch["y"].min() and batch["y"].max() <= 9
    assert len(dm.train_dataloader()) == 45  # ceil(1437 training images / 32)
    points = ShardDataModule("gaussians8", batch_size=64)
    assert points.data_shape == (2,) and points.kind == "points" and points.image_size is None


# 1 val shard (sample-level split) with forked workers; many shards (shard-level) with spawned
# workers, which cannot see the rank themselves
@pytest.mark.parametrize("shard_size,context", [(4000, "fork"), (7, "spawn")])
def test_eval_exactly_once_two_ranks_two_workers(tmp_path, shard_size, context):
    write_shards(toy2d("gaussians8", 1000, seed=1), tmp_path, shard_size=shard_size)
    seen = []
    for rank in range(2):
        dm = attach(ShardDataModule(str(tmp_path), batch_size=16, num_workers=2, multiprocessing_context=context),
                    rank, 2)
        for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
            seen += [(split, r) for r in rows(loader)]
    expected = []
    for split in ("val", "test"):
        dm = ShardDataModule(str(tmp_path), batch_size=1000)
        expected += [(split, r) for r in rows(dm.val_dataloader() if split == "val" else dm.test_dataloader())]
    assert len(expected) == 200
    assert sorted(seen) == sorted(expected)  # every sample exactly once: no loss, no duplicate


def test_train_equal_batches_per_rank_two_workers(tmp_path):
    write_shards(toy2d("gaussians8", 2000, seed=2), tmp_path, shard_size=100)
    per_rank = []
    for rank in range(2):
        dm = attach(ShardDataModule(str(tmp_path), batch_size=24, num_workers=2), rank, 2)
        batches = list(dm.train_dataloader())
        assert all(b["x"].shape == (24, 2) for b in batches)
        per_rank.append(batches)
    # 1600 training points, global batch 48 -> ceil(1600 / 48) = 34 batches on every rank
    assert [len(b) for b in per_rank] == [34, 34]
    assert rows(per_rank[0]) != rows(per_rank[1])  # each rank draws its own stream
    # an odd number of batches still splits over 2 workers without loss
    dm = attach(ShardDataModule(str(tmp_path), batch_size=24, num_workers=2, batches_per_epoch=5), 0, 2)
    assert len(list(dm.train_dataloader())) == 5


def test_train_stream_is_a_function_of_seed_and_epoch(tmp_path):
    write_shards(toy2d("gaussians8", 1000, seed=2), tmp_path, shard_size=100)

    def first_epoch(seed, epoch):
        dm = attach(ShardDataModule(str(tmp_path), batch_size=50, seed=seed), 0, 1, epoch)
        return rows(dm.train_dataloader())

    assert first_epoch(0, 0) == first_epoch(0, 0)
    assert first_epoch(0, 0) != first_epoch(0, 1)
    assert first_epoch(0, 0) != first_epoch(1, 0)


def test_random_flip_mirrors_about_half():
    plain = attach(ShardDataModule("digits", batch_size=256, batches_per_epoch=2), 0, 1)
    flipped = attach(ShardDataModule("digits", batch_size=256, batches_per_epoch=2, random_flip=True), 0, 1)
    a = torch.cat([b["x"] for b in plain.train_dataloader()])
    b = torch.cat([b["x"] for b in flipped.train_dataloader()])
    same = (a == b).flatten(1).all(1)
    mirrored = (a.flip(-1) == b).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 0.4 < (mirrored & ~same).float().mean() < 0.6


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(shape):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _dm_reading(tmp_path, shard, **kwargs):
    good = str(ensure_embedded("digits") / "val-000000.tar")
    return ShardDataModule(None, val=f"{good}::{shard}", batch_size=64, num_classes=10, **kwargs)


def test_corrupt_tar_names_the_shard(tmp_path):
    bad = tmp_path / "val-bad.tar"
    good_bytes = (ensure_embedded("digits") / "val-000000.tar").read_bytes()
    bad.write_bytes(good_bytes[:5000] + b"\x00garbage" * 100)  # a truncated, overwritten tar
    with pytest.raises(ShardError, match="val-bad.tar"):
        list(_dm_reading(tmp_path, bad).val_dataloader())
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 50)
    with pytest.raises(ShardError, match=r"junk\.tar.*not a readable tar"):
        list(_dm_reading(tmp_path, junk).val_dataloader())


def test_missing_key_wrong_shape_missing_label(tmp_path):
    shard = tmp_path / "s.tar"
    _write_tar(shard, [("k1.cls", b"3"), ("k1.txt", b"hello")])
    with pytest.raises(ShardError, match=r"s\.tar, sample 'k1': no image or npy entry"):
        list(_dm_reading(tmp_path, shard).val_dataloader())
    _write_tar(shard, [("k2.png", _png((16, 16))), ("k2.cls", b"1")])
    with pytest.raises(ShardError, match=r"s\.tar, sample 'k2'.*shape \[1, 16, 16\], expected \[1, 8, 8\]"):
        list(_dm_reading(tmp_path, shard).val_dataloader())
    _write_tar(shard, [("k3.png", _png((8, 8)))])
    with pytest.raises(ShardError, match=r"s\.tar, sample 'k3': missing key 'cls'"):
        list(_dm_reading(tmp_path, shard).val_dataloader())


def test_shard_content_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.mkdir, ())

    shard = tmp_path / "evil.tar"
    _write_tar(shard, [("k.png", _png((8, 8))), ("k.cls", b"1"), ("k.pickle", pickle.dumps(Payload())),
                       ("k.pyd", pickle.dumps(Payload()))])
    batches = list(_dm_reading(tmp_path, shard).val_dataloader())
    assert sum(b["x"].shape[0] for b in batches) == 181
    assert not marker.exists()


def test_patterns_without_index(tmp_path):
    write_shards(toy2d("moons", 1000), tmp_path, shard_size=100)
    dm = ShardDataModule(None, train=str(tmp_path / "train-{000000..000007}.tar"),
                         val=str(tmp_path / "val-000000.tar"), batch_size=100, batches_per_epoch=3)
    assert dm.data_shape == (2,) and dm.num_classes is None
    assert len(list(dm.train_dataloader())) == 3
    assert sum(b["x"].shape[0] for b in dm.val_dataloader()) == 100
    with pytest.raises(ValueError, match="batches_per_epoch"):
        ShardDataModule(None, train=str(tmp_path / "train-{000000..000007}.tar")).train_dataloader()


def test_missing_dataset_and_shard_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ShardDataModule(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no shard index at {tmp_path / 'empty' / 'index.json'}"):
        ShardDataModule(str(tmp_path / "empty"))
    with pytest.raises(ShardError, match="does not exist"):
        ShardDataModule(None, train=str(tmp_path / "missing-{0..1}.tar"))


def test_verify_shards_detects_tampering(tmp_path):
    write_shards(toy2d("moons", 300), tmp_path, shard_size=100)
    verify_shards(tmp_path)
    (tmp_path / "train-000001.tar").write_bytes(b"x")
    with pytest.raises(ValueError, match="train-000001.tar: SHA-256 differs"):
        verify_shards(tmp_path)


def _build(name, root):
    ensure_embedded(name, root)


def test_embedded_build_is_safe_under_concurrency(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build, args=("moons", tmp_path)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    verify_shards(tmp_path / "moons")
    index, _ = load_index(tmp_path / "moons")
    assert index["splits"]["train"]["count"] == 16000
    assert "moons" in EMBEDDED
