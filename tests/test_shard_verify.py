"""Shards are checked against index.json as they are read: a shard cut at a sample boundary (still
a valid tar) or with a flipped byte (still decodable) is a ShardError naming it, in training and in
evaluation; the SHA-256 is computed once per shard and process; ShardDataModule refuses bad options."""

import io
import re
import shutil
from collections import Counter

import numpy as np
import pytest

from tiny import tiny_model, tiny_trainer
from lightning_diffusion.data import ShardDataModule, ShardError, ensure_embedded, streams
from lightning_diffusion.data.streams import iter_shard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def digits(tmp_path):
    """A private copy of the embedded digits shards (6 train shards of 256 samples, the last 157;
    val: one shard of 180), so a test may damage them."""
    root = tmp_path / "digits"
    shutil.copytree(ensure_embedded("digits"), root)
    return root


def cut_to_first_half(shard):
    """Rewrite ``shard`` as a valid tar of its first half of samples; return (kept, recorded)."""
    import webdataset as wds

    samples = [{k: v for k, v in raw.items() if k != "__url__"} for raw in iter_shard(str(shard))]
    kept = samples[:len(samples) // 2]
    with wds.TarWriter(str(shard), encoder=False, mtime=0) as sink:
        for raw in kept:
            sink.write(raw)
    return len(kept), len(samples)


def forget_sizes(root):
    """Drop the shards' sizes from ``root``'s index.json (as an index that records none), so that a
    cut shard is found by its sample count alone."""
    import json

    index = json.loads((root / "index.json").read_text())
    for split in index["splits"].values():
        for shard in split["shards"]:
            del shard["size"]
    (root / "index.json").write_text(json.dumps(index))


def flip_a_pixel_byte(shard):
    """Flip one bit inside the compressed pixels (IDAT) of the shard's first PNG such that the PNG
    still decodes, to other pixels; the tar stays valid (its checksums cover headers only)."""
    from PIL import Image

    data = bytearray(shard.read_bytes())
    png = next(iter_shard(str(shard)))["png"]
    at = data.find(png)
    original = np.asarray(Image.open(io.BytesIO(png)))
    idat = png.find(b"IDAT") + 4
    for pos in range(idat, idat + int.from_bytes(png[idat - 8:idat - 4], "big")):
        changed = bytearray(png)
        changed[pos] ^= 1
        try:
            with Image.open(io.BytesIO(bytes(changed))) as im:
                im.load()
                pixels = np.asarray(im)
        except Exception:  # noqa: BLE001 - this flip breaks the PNG; try the next byte
            continue
        if pixels.shape == original.shape and (pixels != original).any():
            data[at + pos] ^= 1
            shard.write_bytes(bytes(data))
            return
    raise AssertionError("no decodable one-bit change found")


def epochs(dm, n, **attach):
    """Iterate ``n`` training epochs; the samples read."""
    from types import SimpleNamespace

    read = 0
    for epoch in range(n):
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=epoch)
        read += sum(b["x"].shape[0] for b in dm.train_dataloader())
    return read


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_on_a_cut_shard_names_it_and_both_counts(digits, num_workers):
    size = (digits / "train-000002.tar").stat().st_size
    kept, recorded = cut_to_first_half(digits / "train-000002.tar")
    assert (kept, recorded) == (128, 256)
    cut = (digits / "train-000002.tar").stat().st_size
    dm = ShardDataModule(str(digits), batch_size=64, num_workers=num_workers, multiprocessing_context="fork")
    # refused when it is opened, by its size on disk (before its first sample)
    with pytest.raises(ShardError, match=rf"shard {digits}/train-000002.tar is {cut} bytes, but "
                                         rf"{digits}/index.json records {size}: it is truncated"):
        epochs(dm, 4)
    forget_sizes(digits)  # an index without sizes: the count of its first complete read names it
    dm = ShardDataModule(str(digits), batch_size=64, num_workers=num_workers, multiprocessing_context="fork")
    with pytest.raises(ShardError, match=rf"shard {digits}/train-000002.tar holds 128 samples, but "
                                         rf"{digits}/index.json records 256: it was cut short"):
        epochs(dm, 4)
    # the intact set reads 4 epochs of 23 batches of 64 without complaint
    intact = ShardDataModule("digits", batch_size=64, num_workers=num_workers, multiprocessing_context="fork")
    assert epochs(intact, 4) == 4 * 23 * 64


def test_fit_on_a_cut_shard_stops_with_the_shard_error(digits):
    import lightning as L
    import torch

    from lightning_diffusion import DDPM, UNet

    cut_to_first_half(digits / "train-000000.tar")
    forget_sizes(digits)  # found by its count: seed 0's stream (4 batches of 64 an epoch through a buffer of 64)
    # first reads train-000000 to its end in epoch 3 (with sizes it is refused when first opened)
    dm = ShardDataModule(str(digits), batch_size=64, batches_per_epoch=4, shuffle_buffer=64)
    model = tiny_model("ddpm", net=dict(model_channels=8, channel_mult=(1,)), timesteps=10)
    trainer = tiny_trainer(max_epochs=30, limit_val_batches=0)
    torch.manual_seed(0)
    with pytest.raises(ShardError, match=r"train-000000\.tar holds 128 samples, but .*index\.json records 256"):
        trainer.fit(model, dm)
    assert trainer.current_epoch == 3


def test_eval_on_a_cut_shard_and_on_too_many_samples(digits):
    cut_to_first_half(digits / "val-000000.tar")  # 180 -> 90
    forget_sizes(digits)  # the counts alone (the sizes: test_training_on_a_cut_shard_names_it_and_both_counts)
    dm = ShardDataModule(str(digits), batch_size=64)
    with pytest.raises(ShardError, match=r"val-000000\.tar holds 90 samples, but .* records 180"):
        list(dm.val_dataloader())
    # more samples than recorded: a training shard (256) in the test shard's (180) place
    shutil.copy(digits / "train-000000.tar", digits / "test-000000.tar")
    with pytest.raises(ShardError, match=r"test-000000\.tar holds 256 samples, but .* records 180"):
        list(dm.test_dataloader())


def test_flipped_byte_is_a_sha_error_and_verify_false_reads_it(digits):
    shard = digits / "val-000000.tar"
    flip_a_pixel_byte(shard)
    with pytest.raises(ShardError, match=rf"shard {shard}: SHA-256 is [0-9a-f]{{64}}, but {digits}/index\.json "
                                         r"records [0-9a-f]{64}: the file is corrupt.*lightning-diffusion shards.*"
                                         r"verify=False"):
        list(ShardDataModule(str(digits), batch_size=64).val_dataloader())
    batches = list(ShardDataModule(str(digits), batch_size=64, verify=False).val_dataloader())
    assert sum(b["x"].shape[0] for b in batches) == 180
    # training reads the same shard set: with a flipped training shard the error comes there too
    flip_a_pixel_byte(digits / "train-000001.tar")
    with pytest.raises(ShardError, match=r"train-000001\.tar: SHA-256 is"):
        epochs(ShardDataModule(str(digits), batch_size=64), 4)
    assert epochs(ShardDataModule(str(digits), batch_size=64, verify=False), 2) == 2 * 23 * 64


def test_sha256_computed_once_per_shard_per_process(digits, monkeypatch):
    hashed = Counter()

    class CountingReader(streams._HashingReader):
        def hexdigest(self):
            hashed[self.file.name.rsplit("/", 1)[1]] += 1
            return super().hexdigest()

    monkeypatch.setattr(streams, "_HashingReader", CountingReader)
    dm = ShardDataModule(str(digits), batch_size=64)
    for _ in range(3):
        assert sum(b["x"].shape[0] for b in dm.val_dataloader()) == 180
    assert hashed == {"val-000000.tar": 1}
    read = epochs(dm, 5)  # 5 x 23 batches of 64 + a buffer of 1000: every train shard is read many times
    assert read == 5 * 23 * 64
    assert hashed == {"val-000000.tar": 1, **{f"train-00000{i}.tar": 1 for i in range(6)}}
    # a shard replaced after it was checked is hashed (and refused) again
    flip_a_pixel_byte(digits / "val-000000.tar")
    with pytest.raises(ShardError, match="SHA-256 is"):
        list(dm.val_dataloader())
    assert hashed["val-000000.tar"] == 2
    # verify=False hashes nothing
    hashed.clear()
    list(ShardDataModule(str(digits), batch_size=64, verify=False).val_dataloader())
    assert hashed == {}


def test_patterns_outside_the_index_are_read_unchecked(digits):
    cut_to_first_half(digits / "val-000000.tar")
    dm = ShardDataModule(None, val=str(digits / "val-000000.tar"), batch_size=64, num_classes=10)
    assert sum(b["x"].shape[0] for b in dm.val_dataloader()) == 90
    # a pattern naming a shard the index lists is checked against it
    dm = ShardDataModule(str(digits), val=str(digits / "val-{000000..000000}.tar"), batch_size=64)
    with pytest.raises(ShardError, match=r"val-000000\.tar is \d+ bytes, but .*index\.json records \d+"):
        list(dm.val_dataloader())


def test_no_shuffle_buffer_reads_in_order():
    import random
    from types import SimpleNamespace

    import torch

    from lightning_diffusion.data.streams import decode_sample

    dm = ShardDataModule("digits", batch_size=16, batches_per_epoch=2, shuffle_buffer=0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    x = next(iter(dm.train_dataloader()))["x"]
    # the first 16 samples of the shard the stream (seed-epoch-rank-worker 0-0-0-0) draws first, in order
    first = random.Random("0-0-0-0").choice(dm.urls["train"])
    expected = [decode_sample(raw, (1, 8, 8), True)[0] for _, raw in zip(range(16), iter_shard(first))]
    assert torch.equal(x, torch.stack(expected))


@pytest.mark.parametrize("option,value,message", [
    ("batch_size", -4, "data.batch_size must be >= 1, got -4"),
    ("batch_size", 0, "data.batch_size must be >= 1, got 0"),
    ("num_workers", -1, "data.num_workers must be >= 0, got -1"),
    ("batches_per_epoch", 0, "data.batches_per_epoch must be >= 1, got 0"),
    ("shuffle_buffer", -1, "data.shuffle_buffer must be >= 0, got -1"),
])
def test_bad_options_are_refused_at_construction(option, value, message):
    with pytest.raises(ValueError, match=message):
        ShardDataModule("digits", **{option: value})


# -- issue 21: an index names only its own shards; a cut shard is refused when opened --------------
@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A toy2d dataset written by the CLI: 2000 points, one training shard of 1600 (shuffle buffers of
    100 read a few hundred of them in 5 steps), val and test of 200."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("toy") / "toy"
    run_cli("shards", "toy2d", f"--out={out}", "--num_points=2000", "--shard_size=2000")
    return out


@pytest.fixture
def toy(toy_dir, tmp_path):
    """A private copy of ``toy_dir``, for a test to damage."""
    root = tmp_path / "toy"
    shutil.copytree(toy_dir, root)
    return root


def _rename_val_shard(root, name):
    import json

    index = json.loads((root / "index.json").read_text())
    index["splits"]["val"]["shards"][0]["name"] = name
    (root / "index.json").write_text(json.dumps(index))


def test_an_index_names_only_its_own_regular_files(toy, tmp_path):
    import os

    from lightning_diffusion.data import verify_shards

    outside = tmp_path / "outside.tar"
    shutil.copy(toy / "val-000000.tar", outside)
    (toy / "sub.tar").mkdir()
    os.mkfifo(toy / "fifo.tar")
    (toy / "out-link.tar").symlink_to(outside)
    (toy / "in-link.tar").symlink_to("val-000000.tar")
    relative = "it is not a relative path inside the dataset's directory (absolute, empty or with '..')"
    for name, problem in ((str(outside), relative), ("../outside.tar", relative), ("/dev/zero", relative),
                          ("sub.tar", "it is not a regular file (a directory, device or FIFO)"),
                          ("fifo.tar", "it is not a regular file (a directory, device or FIFO)"),
                          ("out-link.tar", f"it leads outside the dataset's directory {toy} (to {outside}, through "
                                           "a symlink)")):
        _rename_val_shard(toy, name)
        message = f"{toy}/index.json lists a shard named {name!r}, but {problem}: an index names only the tar files " \
                  "of its own directory; rewrite it with `lightning-diffusion shards`"
        with pytest.raises(ShardError) as error:
            ShardDataModule(str(toy))
        assert str(error.value) == message
        with pytest.raises(ShardError, match=re.escape(message)):
            verify_shards(toy)
    _rename_val_shard(toy, "in-link.tar")  # a symlink within the directory is the dataset's own file
    assert sum(b["x"].shape[0] for b in ShardDataModule(str(toy), batch_size=64).val_dataloader()) == 200
    # a pattern (the user's own choice, no index) naming a device: refused, not read forever
    with pytest.raises(ShardError, match=r"shard /dev/zero is not a regular file"):
        ShardDataModule(None, train="/dev/zero")


def test_a_cut_shard_fails_a_five_step_fit_before_the_first_batch(toy, tmp_path):
    from test_fail_fast import fails_before_training, fit_config

    shard = toy / "train-000000.tar"
    size = shard.stat().st_size
    assert cut_to_first_half(shard) == (800, 1600)  # a valid tar, cut at a sample boundary
    out = fails_before_training(tmp_path, fit_config(tmp_path, [], dataset=str(toy)), "--trainer.max_steps=5",
                                "--data.init_args.shuffle_buffer=100")
    assert f"lightning-diffusion fit: error: shard {shard} is {shard.stat().st_size} bytes, but {toy}/index.json " \
           f"records {size}: it is truncated; rewrite the shards" in out, out[-2000:]


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_an_error_in_a_dataloader_worker_is_the_same_one_line(toy, tmp_path):
    from conftest import run_cli
    from test_fail_fast import fit_config

    shard = toy / "train-000000.tar"
    shard.write_bytes(np.random.default_rng(0).integers(0, 256, shard.stat().st_size, dtype=np.uint8).tobytes())
    config = fit_config(tmp_path, [], dataset=str(toy))
    lines = {}
    for workers in (0, 2):
        proc = run_cli("fit", "--config", str(config), f"--data.init_args.num_workers={workers}", check=False)
        assert proc.returncode == 1, proc.stderr[-3000:]
        lines[workers] = _error_lines(proc)
    assert lines[2] == lines[0] == [f"lightning-diffusion fit: error: shard {shard} is not a readable tar file: "
                                    f"{lines[0][0].split('is not a readable tar file: ')[1]}"], lines
    # the evaluation loaders too
    dm = ShardDataModule(str(toy), batch_size=64, num_workers=2, multiprocessing_context="fork")
    with pytest.raises(ShardError) as error:
        list(dm.eval_dataloader("train"))
    assert str(error.value) == lines[0][0].split("error: ", 1)[1]


def test_no_points_is_refused_and_an_empty_dataset_is_named(toy, tmp_path):
    import json

    from conftest import run_cli
    from test_fail_fast import fails_before_training, fit_config

    for n in (0, -5):
        proc = run_cli("shards", "toy2d", f"--out={tmp_path / 'none'}", f"--num_points={n}", check=False)
        assert proc.returncode == 1 and _error_lines(proc) == [
            f"lightning-diffusion shards: error: toy2d: --num_points must be >= 1 (points generated in total, before "
            f"the split), got {n}"], proc.stderr
        assert not (tmp_path / "none").exists()
    index = json.loads((toy / "index.json").read_text())
    index["splits"]["val"] = {"count": 0, "shards": []}  # an index without validation samples
    (toy / "index.json").write_text(json.dumps(index))
    out = fails_before_training(tmp_path, fit_config(tmp_path, [], dataset=str(toy)))
    assert f"lightning-diffusion fit: error: ShardDataModule: {toy}/index.json has no samples in split 'val': write " \
           "the dataset with enough samples for every split (`lightning-diffusion shards`), or give a `val` pattern " \
           "(data.val)" in out, out[-2000:]
    for split in index["splits"].values():  # no samples at all
        split.update(count=0, shards=[])
    (toy / "index.json").write_text(json.dumps(index))
    out = fails_before_training(tmp_path, fit_config(tmp_path, [], dataset=str(toy)))
    assert f"lightning-diffusion fit: error: ShardDataModule: dataset '{toy}' has no samples: {toy}/index.json lists " \
           "no shards in any split; write it again with more samples (`lightning-diffusion shards`)" in out, out[-2000:]
