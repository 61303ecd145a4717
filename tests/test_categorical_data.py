"""Categorical batches through ShardDataModule: 8-bit digits as K = 256 categories (equal, batch by
batch, to the float digits on the test split), binarized digits (K = 2, threshold 128), character-
level text (K = 27) that round-trips to the words, exact mid-epoch resume, bad input named by shard
and key, and the CLI link of num_categories (into a model that has it; DDPM unchanged)."""

import io
import json
import tarfile
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from lightning_diffusion.data import ShardDataModule, ShardError, write_shards
from lightning_diffusion.data import sources
from lightning_diffusion.data.sources import ALPHABET, binary_digits, decode_text, encode_text, words
from lightning_diffusion.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def attach(dm, epoch=0):
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=epoch)
    return dm


def test_categorical_digits_equal_the_float_digits_batch_by_batch():
    floats = ShardDataModule("digits", batch_size=64)
    cats = ShardDataModule("digits", batch_size=64, categorical=True)
    assert floats.num_categories is None and not floats.categorical and floats.alphabet is None
    assert cats.num_categories == 256 and cats.categorical and cats.data_shape == (1, 8, 8)
    # the same shards: the categorical model is scored on the same test digits
    assert cats.fingerprint("test") == floats.fingerprint("test") and cats.count("test") == 180
    n = 0
    for f, c in zip(floats.test_dataloader(), cats.test_dataloader(), strict=True):
        assert c["x"].dtype == torch.int64 and c["x"].shape == f["x"].shape == (len(f["x"]), 1, 8, 8)
        assert 0 <= int(c["x"].min()) and int(c["x"].max()) <= 255
        assert torch.equal(c["x"], torch.round((f["x"] + 1) * 127.5).long())
        assert torch.equal(c["y"], f["y"])
        n += len(c["x"])
    assert n == 180
    train = next(iter(cats.train_dataloader()))
    assert train["x"].dtype == torch.int64 and train["x"].shape == (64, 1, 8, 8) and int(train["x"].max()) == 255
    # 17 grey levels of sklearn's digits: round(level * 255 / 16)
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(train["x"].unique().tolist()) <= levels


def test_binary_digits_threshold_and_same_split():
    cats = ShardDataModule("digits", batch_size=50, categorical=True)
    binary = ShardDataModule("binary_digits", batch_size=50, categorical=True)
    as_float = ShardDataModule("binary_digits", batch_size=50)
    assert binary.num_categories == 2 and as_float.num_categories is None
    assert binary.index["levels"] == [0, 255] and binary.index["params"]["threshold"] == sources.BINARY_THRESHOLD == 128
    assert binary.count("test") == cats.count("test") == 180
    ones = total = 0
    for c, b, f in zip(cats.test_dataloader(), binary.test_dataloader(), as_float.test_dataloader(), strict=True):
        assert b["x"].dtype == torch.int64 and b["x"].shape == c["x"].shape
        assert set(b["x"].unique().tolist()) == {0, 1}
        assert torch.equal(b["x"], (c["x"] >= 128).long())  # the documented threshold
        assert torch.equal(f["x"], b["x"].float() * 2 - 1)  # the float reading: -1 / 1
        assert torch.equal(b["y"], c["y"])  # same digits in the same order
        ones, total = ones + int(b["x"].sum()), total + b["x"].numel()
    assert 0.2 < ones / total < 0.5
    # another threshold, written as its own source
    raw = sources.digits().pools["all"].x
    high = binary_digits(threshold=200).pools["all"].x
    assert np.array_equal(high, np.where(raw >= 200, 255, 0)) and not np.array_equal(high, np.where(raw >= 128, 255, 0))
    with pytest.raises(ValueError, match="threshold"):
        binary_digits(threshold=0)


def all_texts(dm):
    return [t for split in ("train", "val", "test") for b in dm.eval_dataloader(split)
            for t in decode_text(b["x"], dm.alphabet)]


def test_text_from_a_word_file_round_trips(tmp_path):
    (tmp_path / "w.txt").write_text("cat\nZebra\ndog\ncat\nx-ray\nantidisestablishment\n\n")
    index = write_shards(words(file=str(tmp_path / "w.txt"), seq_length=8), tmp_path / "shards", shard_size=2,
                         fractions=(0.34, 0.33, 0.33))
    assert index["kind"] == "sequence" and index["shape"] == [8] and index["dtype"] == "uint8"
    assert index["num_categories"] == 27 and index["alphabet"] == ALPHABET and index["num_classes"] is None
    assert index["extra"]["words_kept"] == 3
    dm = ShardDataModule(str(tmp_path / "shards"), batch_size=2)
    assert dm.categorical and dm.num_categories == 27 and dm.kind == "sequence" and dm.image_size is None
    assert sorted(all_texts(dm)) == ["cat", "dog", "zebra"]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x"} and batch["x"].dtype == torch.int64 and batch["x"].shape[1] == 8
    assert encode_text(["cab"], 5).tolist() == [[3, 1, 2, 0, 0]]
    assert decode_text(np.array([3, 1, 0, 2]), stop=False) == ["ca.b"] and decode_text(np.array([3, 1, 0, 2])) == ["ca"]
    with pytest.raises(ValueError, match="'x-y'.*'-'"):
        encode_text(["x-y"], 5)
    with pytest.raises(ValueError, match="no float form.*data.categorical"):
        ShardDataModule(str(tmp_path / "shards"), categorical=False)


def test_packaged_word_list_round_trips_through_the_embedded_dataset():
    pytest.importorskip("wonderwords", reason="the `text` extra: pip install 'lightning-diffusion[text]'")
    raw, origin = sources.packaged_words()
    assert origin == "wonderwords 3.0.1" and len(raw) > 8000
    expected = sorted({w.strip().lower() for w in raw
                       if len(w.strip()) <= 16 and set(w.strip().lower()) <= set(ALPHABET[1:]) and w.strip()})
    dm = ShardDataModule("words", batch_size=1000)  # the embedded name builds the shards
    assert dm.num_categories == 27 and dm.data_shape == (16,) and dm.alphabet == ALPHABET
    assert dm.index["extra"]["origin"] == origin and sum(dm.count(s) for s in ("train", "val", "test")) == len(expected)
    assert sorted(all_texts(dm)) == expected  # every word once, decoded back to its text
    x = next(iter(dm.train_dataloader()))["x"]
    assert x.dtype == torch.int64 and x.shape == (1000, 16) and 0 <= int(x.min()) and int(x.max()) < 27


def test_missing_text_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sources, "TEXT_EXTRA", "no_such_word_list_package")
    with pytest.raises(UserError, match=r"lightning-diffusion\[text\]"):
        words()


@pytest.mark.parametrize("dataset", ["digits", "binary_digits"])
def test_exact_mid_epoch_resume_of_categorical_batches(dataset):
    def loader():
        return attach(ShardDataModule(dataset, batch_size=32, num_workers=2, batches_per_epoch=7,
                                      shuffle_buffer=100, random_flip=True, categorical=True), epoch=1).train_dataloader()

    straight = list(loader())
    assert len(straight) == 7 and all(b["x"].dtype == torch.int64 for b in straight)
    for done in (3, 4):  # an odd and an even offset over 2 workers
        resumed = loader()
        resumed.load_state_dict({"epoch": 1, "batches": done, "seed": 0, "num_workers": 2})
        rest = list(resumed)
        assert len(rest) == 7 - done
        for a, b in zip(rest, straight[done:]):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def rewrite_first(shard, make):
    """Replace the first sample of a tar shard by ``make(key)`` (a dict ext -> bytes), the rest kept."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0].name.split(".")[0]
    out = [(m, data) for m, data in members if not m.name.startswith(first + ".")]
    with tarfile.open(shard, "w") as tar:
        for ext, data in make(first).items():
            info = tarfile.TarInfo(f"{first}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for m, data in out:
            tar.addfile(m, io.BytesIO(data))
    return first


def npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def png(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("bad,message", [
    (np.array([3, 30, 0, 0], dtype=np.uint8), r"category 30 at flat position 1, outside \[0, 27\)"),
    (np.array([3.0, 1.0, 0, 0], dtype=np.float32), r"holds float32 values, but the dataset is categorical"),
])
def test_bad_sequence_sample_names_shard_and_key(tmp_path, bad, message):
    (tmp_path / "w.txt").write_text("\n".join(["cat", "dog", "emu", "gnu", "yak", "owl"]))
    write_shards(words(file=str(tmp_path / "w.txt"), seq_length=4), tmp_path, shard_size=100, fractions=(1, 0, 0))
    shard = tmp_path / "train-000000.tar"
    key = rewrite_first(shard, lambda k: {"npy": npy(bad)})
    dm = ShardDataModule(str(tmp_path), batch_size=6, verify=False, shuffle_buffer=0)
    with pytest.raises(ShardError, match=message) as e:
        list(dm.eval_dataloader("train"))
    assert str(shard) in str(e.value) and repr(key) in str(e.value)


def test_bad_binary_pixel_names_shard_and_key(tmp_path):
    write_shards(binary_digits(), tmp_path, shard_size=2000, fractions=(1, 0, 0))
    shard = tmp_path / "train-000000.tar"
    image = np.zeros((8, 8), dtype=np.uint8)
    image[2, 3] = 128
    key = rewrite_first(shard, lambda k: {"png": png(image), "cls": b"3"})
    dm = ShardDataModule(str(tmp_path), batch_size=256, verify=False, categorical=True)
    with pytest.raises(ShardError, match=r"value 128 at flat position 19, which is none of the dataset's 2 category "
                                         r"levels \[0, 255\]") as e:
        list(dm.eval_dataloader("train"))
    assert str(shard) in str(e.value) and repr(key) in str(e.value)


def test_options_the_data_cannot_take_are_refused(tmp_path):
    with pytest.raises(ValueError, match="continuous points; data.categorical=true"):
        ShardDataModule("gaussians8", categorical=True)
    # a sequence source must keep to its categories before anything is written
    bad = sources.Source(name="mine", params={}, kind="sequence", num_categories=3,
                         pools={"all": sources._ArrayPool(np.array([[0, 1], [2, 3]], dtype=np.uint8), None)})
    with pytest.raises(ValueError, match=r"mine: sample 1 is not integer categories in \[0, 3\)"):
        write_shards(bad, tmp_path / "bad")
    # an index that says nonsense
    write_shards(binary_digits(), tmp_path / "b", shard_size=2000)
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    (tmp_path / "b" / "index.json").write_text(json.dumps({**index, "levels": [0, 128, 255]}))
    with pytest.raises(ValueError, match="3 levels for 2 categories"):
        ShardDataModule(str(tmp_path / "b"), categorical=True)


# -- the CLI link ---------------------------------------------------------------------------------

BUILT: list = []


class TinyNet(nn.Module):
    """A net that takes the number of categories (linked from the data)."""

    def __init__(self, num_categories: int, dim: int = 4):
        super().__init__()
        self.num_categories = num_categories
        self.embed = nn.Embedding(num_categories, dim)


class TinyCategorical(L.LightningModule):
    """A categorical model of the user's own: it takes ``num_categories`` and int64 batches."""

    def __init__(self, net: nn.Module, num_categories: int, data_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None):
        super().__init__()
        self.net, self.num_categories, self.data_shape = net, num_categories, data_shape
        self.batches: list = []
        BUILT.append(self)

    def training_step(self, batch, batch_idx):
        self.batches.append(batch["x"])
        return self.net.embed(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_fit(tmp_path, *args, check=True):
    return run_cli("fit", "--model=test_categorical_data.TinyCategorical",
                   "--model.init_args.net=test_categorical_data.TinyNet", "--data=ShardDataModule",
                   "--data.init_args.batch_size=8", "--data.init_args.batches_per_epoch=2", "--trainer.max_steps=2",
                   "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                   f"--trainer.default_root_dir={tmp_path}", *args, check=check)


def test_cli_links_num_categories_into_the_model_and_its_net(tmp_path):
    BUILT.clear()
    tiny_fit(tmp_path, "--data.init_args.dataset=binary_digits", "--data.init_args.categorical=true")
    model = BUILT[-1]
    assert model.num_categories == 2 and model.net.num_categories == 2 and model.data_shape == (1, 8, 8)
    assert len(model.batches) == 2 and all(x.dtype == torch.int64 and set(x.unique().tolist()) <= {0, 1}
                                           for x in model.batches)
    tiny_fit(tmp_path, "--data.init_args.dataset=digits", "--data.init_args.categorical=true")
    assert BUILT[-1].num_categories == 256 and BUILT[-1].net.num_categories == 256
    # an explicit value that contradicts the data is refused, as for the other linked facts
    proc = tiny_fit(tmp_path, "--data.init_args.dataset=binary_digits", "--data.init_args.categorical=true",
                    "--model.init_args.num_categories=3", check=False)
    assert proc.returncode == 1 and "data.num_categories=2" in proc.stderr


def test_float_families_keep_working_and_refuse_categorical_data(tmp_path):
    import lightning_diffusion as ld

    logger = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=run"]
    run_cli("fit", "--config", "configs/ddpm_toy2d.yaml", "--trainer.max_steps=2", "--model.init_args.timesteps=10",
            "--data.init_args.batches_per_epoch=2", "--trainer.enable_progress_bar=false", *logger)
    ckpt = tmp_path / "ddpm_toy2d" / "run" / "checkpoints" / "last.ckpt"
    # the link into a model without num_categories leaves no trace in its hyperparameters
    model = ld.DDPM.load_from_checkpoint(ckpt)
    assert "num_categories" not in model.hparams and model.data_shape == (2,)
    proc = run_cli("fit", "--config", "configs/ddpm_digits.yaml", "--data.init_args.categorical=true",
                   "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}", check=False)
    assert proc.returncode == 1
    assert "categorical (data.num_categories=256" in proc.stderr and "DDPM has no num_categories option" in proc.stderr
