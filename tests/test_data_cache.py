"""ShardDataModule(cache=...): the in-memory cache of decoded shards gives bit-identical batches
(any seed, epoch, rank, workers, flips, categories, mid-epoch resume), serves a cached shard without
reading its file or decoding again, cannot be corrupted through a batch, caches a shard only after
its count / SHA-256 checks passed, re-reads a shard changed on disk, and in auto mode caches only
splits whose size it knows to be small."""

import os
import pickle

import pytest
import torch
from test_datamodule import attach
from test_shard_verify import cut_to_first_half, digits  # noqa: F401 (digits: a fixture)

from lightning_diffusion.data import ShardDataModule, ShardError, datamodule, streams
from lightning_diffusion.data.shards import write_shards
from lightning_diffusion.data.sources import toy2d

pytestmark = pytest.mark.usefixtures("one_thread")


def run(dm, epochs, resume=None):
    """The batches of ``epochs`` epochs through one training loader, as the Trainer iterates it,
    then (``resume = (epoch, batches)``) the rest of that epoch through the same loader, resumed."""
    loader = attach(dm, dm.trainer.global_rank, dm.trainer.world_size).train_dataloader()
    out = []
    for epoch in range(epochs):
        dm.trainer.current_epoch = epoch
        out.append(list(loader))
    if resume is not None:
        loader.load_state_dict({"epoch": resume[0], "batches": resume[1], "seed": dm.seed,
                                "num_workers": dm.num_workers})
        out.append(list(loader))
    return out, loader


def assert_same(a, b):
    assert [len(e) for e in a] == [len(e) for e in b]
    for ea, eb in zip(a, b):
        for x, y in zip(ea, eb):
            assert x.keys() == y.keys()
            assert all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("dataset,options,rank_world,resume", [
    ("digits", dict(random_flip=True, seed=3), (1, 2), (2, 5)),
    ("digits", dict(num_workers=2, shuffle_buffer=100, random_flip=True, categorical=True), (0, 1), (1, 3)),
    ("digits", dict(shuffle_buffer=0, batch_size=100), (0, 1), (2, 7)),
    ("binary_digits", dict(categorical=True, random_flip=True, batch_size=64), (0, 1), (2, 11)),
    ("points", dict(batch_size=50, batches_per_epoch=20, seed=1), (0, 3), (2, 13)),
])
def test_batches_are_bit_identical_with_and_without_the_cache(tmp_path, dataset, options, rank_world, resume):
    if dataset == "points":  # 8 training shards of 100 points
        write_shards(toy2d("gaussians8", 1000, seed=4), tmp_path, shard_size=100)
        dataset = str(tmp_path)
    options = {"batch_size": 128, **options}
    straight, _ = run(attach(ShardDataModule(dataset, cache=False, **options), *rank_world), 3, resume)
    cached, loader = run(attach(ShardDataModule(dataset, cache=True, **options), *rank_world), 3, resume)
    assert_same(straight, cached)
    # the resumed epoch (skipping batches served from a warm cache) is the straight epoch's rest
    assert_same([straight[resume[0]][resume[1]:]], [cached[-1]])
    if options.get("num_workers", 0) == 0:
        assert len(loader.dataset.cache) > 0  # the cache was used, in this process


def counting(monkeypatch):
    """Count the calls of streams.iter_shard (per shard) and streams.decode_sample."""
    calls = {"read": [], "decode": 0}
    read, decode = streams.iter_shard, streams.decode_sample

    def counted_read(url, *args, **kwargs):
        calls["read"].append(url)
        return read(url, *args, **kwargs)

    def counted_decode(*args, **kwargs):
        calls["decode"] += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(streams, "iter_shard", counted_read)
    monkeypatch.setattr(streams, "decode_sample", counted_decode)
    return calls


def test_a_cached_shard_is_neither_read_nor_decoded_again(monkeypatch):
    calls = counting(monkeypatch)
    dm = attach(ShardDataModule("digits", batch_size=128, cache=True), 0, 1)
    loader = dm.train_dataloader()
    cache = loader.dataset.cache
    epoch = 0
    while len(cache) < len(dm.urls["train"]):  # resampled with replacement: every shard, eventually
        cached_before = {u for u in dm.urls["train"] if u in cache}
        dm.trainer.current_epoch, epoch = epoch, epoch + 1
        calls["read"].clear()
        list(loader)
        assert not cached_before & set(calls["read"])  # no cached shard opened again
        assert epoch < 50
    undecoded = sum(s.decoded is None for _, samples in cache._shards.values() for s in samples)
    calls["read"].clear()
    calls["decode"] = 0
    for e in range(epoch, epoch + 3):
        dm.trainer.current_epoch = e
        assert len(list(loader)) == 12
    assert calls["read"] == [] and calls["decode"] <= undecoded  # each cached sample decoded at most once
    assert all((s.raw is None) == (s.decoded is not None) for _, samples in cache._shards.values() for s in samples)

    # evaluation: one pass reads and decodes everything, the next neither
    val = dm.val_dataloader()
    first = list(val)
    calls["read"].clear()
    calls["decode"] = 0
    assert_same([first], [list(val)])
    assert calls == {"read": [], "decode": 0}


def test_in_place_changes_of_a_batch_do_not_reach_the_cache():
    reference, _ = run(attach(ShardDataModule("digits", batch_size=128, cache=False, random_flip=True), 0, 1), 3)
    dm = attach(ShardDataModule("digits", batch_size=128, cache=True, random_flip=True), 0, 1)
    loader = dm.train_dataloader()
    seen = []
    for epoch in range(3):
        dm.trainer.current_epoch = epoch
        seen.append([])
        for batch in loader:
            seen[-1].append({k: v.clone() for k, v in batch.items()})
            batch["x"].add_(100.0)  # a training step that normalises its batch in place
            batch["y"].zero_()
    assert_same(reference, seen)
    val = ShardDataModule("digits", batch_size=64, cache=True).val_dataloader()
    clean = [{k: v.clone() for k, v in b.items()} for b in val]
    for b in val:
        b["x"].mul_(-3.0)
    assert_same([clean], [list(val)])


def test_a_short_or_corrupt_shard_raises_and_is_not_cached(digits):  # noqa: F811
    cut_to_first_half(digits / "val-000000.tar")  # 180 -> 90 samples
    val = ShardDataModule(str(digits), batch_size=64, cache=True).val_dataloader()
    for _ in range(2):  # not cached by the failed read: the second read checks (and fails) again
        with pytest.raises(ShardError, match=r"val-000000\.tar is \d+ bytes, but .* records \d+: it is truncated"):
            list(val)
        assert len(val.dataset.cache) == 0
    # a flipped byte in the tar's end padding: every sample reads fine, the SHA-256 does not match
    test = digits / "test-000000.tar"
    data = bytearray(test.read_bytes())
    data[-1] ^= 1
    test.write_bytes(bytes(data))
    loader = ShardDataModule(str(digits), batch_size=64, cache=True).test_dataloader()
    with pytest.raises(ShardError, match=r"test-000000\.tar: SHA-256 is .* records"):
        list(loader)
    assert len(loader.dataset.cache) == 0
    # training: the cut shard is never kept, and its first complete read names it
    cut_to_first_half(digits / "train-000002.tar")
    dm = attach(ShardDataModule(str(digits), batch_size=64, cache=True), 0, 1)
    train = dm.train_dataloader()
    with pytest.raises(ShardError, match=r"train-000002\.tar is \d+ bytes, but .* records \d+: it is truncated"):
        for epoch in range(20):
            dm.trainer.current_epoch = epoch
            list(train)
    assert str(digits / "train-000002.tar") not in train.dataset.cache


def test_a_shard_changed_on_disk_after_caching_is_read_and_checked_again(digits):  # noqa: F811
    shard = digits / "val-000000.tar"
    original = shard.read_bytes()
    val = ShardDataModule(str(digits), batch_size=64, cache=True).val_dataloader()
    reference = list(val)
    assert str(shard) in val.dataset.cache
    mtime = shard.stat().st_mtime_ns
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, other bytes, later mtime
    os.utime(shard, ns=(mtime + 10**9, mtime + 10**9))
    with pytest.raises(ShardError, match=r"val-000000\.tar: SHA-256 is"):
        list(val)
    assert str(shard) not in val.dataset.cache  # the stale copy is dropped
    shard.write_bytes(original)
    os.utime(shard, ns=(mtime + 2 * 10**9, mtime + 2 * 10**9))
    assert_same([reference], [list(val)])
    assert str(shard) in val.dataset.cache


def test_auto_caches_only_splits_known_to_be_small(tmp_path, monkeypatch):
    dm = ShardDataModule("digits")
    assert dm.decoded_bytes("train") == 1437 * (64 * 4 + 512) and dm.caches("train") and dm.caches("val")
    assert dm.train_dataloader().dataset.cache is not None and dm.val_dataloader().dataset.cache is not None
    assert ShardDataModule("digits", categorical=True).decoded_bytes("train") == 1437 * (64 * 8 + 512)
    on_disk = sum(os.path.getsize(u) for u in dm.urls["train"])
    monkeypatch.setattr(datamodule, "CACHE_AUTO_BYTES", dm.decoded_bytes("train") - 1)
    assert not dm.caches("train") and dm.train_dataloader().dataset.cache is None
    assert ShardDataModule("digits", cache=True).caches("train")  # True: whatever the size
    monkeypatch.setattr(datamodule, "CACHE_AUTO_BYTES", on_disk - 1)  # decoded fits, the files do not
    assert dm.decoded_bytes("train") <= on_disk - 1 and not dm.caches("train")
    monkeypatch.undo()
    assert not ShardDataModule("digits", cache=False).caches("train")
    assert ShardDataModule("digits", cache=False).val_dataloader().dataset.cache is None
    # shards without an index: their decoded size is unknown, auto does not cache them
    write_shards(toy2d("moons", 300), tmp_path, shard_size=100)
    bare = ShardDataModule(None, train=str(tmp_path / "train-{000000..000001}.tar"), batches_per_epoch=2)
    assert bare.decoded_bytes("train") is None and not bare.caches("train")
    with pytest.raises(ValueError, match="data.cache must be true, false or null"):
        ShardDataModule("digits", cache="yes")


def test_a_pickled_stream_arrives_with_an_empty_cache():
    dm = attach(ShardDataModule("digits", batch_size=128, cache=True), 0, 1)
    loader = dm.train_dataloader()
    list(loader)
    assert len(loader.dataset.cache) > 0
    copy = pickle.loads(pickle.dumps(loader.dataset))  # what a spawned worker receives
    assert copy.cache is not None and len(copy.cache) == 0
