"""WandbSamples: PNGs in the run directory, images and the metrics table in an offline W&B run at
the right global step, the same W&B run continued on resume, other loggers, and a foreign module
with ``reconstruct``."""

from __future__ import annotations

import glob
import json
import struct
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image
from torch import nn

from tiny import tiny_model, tiny_trainer
from lightning_diffusion import DDPM, EMA
from lightning_diffusion.callbacks.wandb import WandbSamples, continue_wandb_run, wandb_run_id_from_checkpoint


pytestmark = pytest.mark.usefixtures("offline_wandb")  # tests/conftest.py


class Dicts(torch.utils.data.Dataset):
    """Fixed random data as batch dicts ``{"x": ...}``."""

    def __init__(self, shape: tuple[int, ...], n: int = 8):
        self.x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i]}


def loader(shape: tuple[int, ...]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Dicts(shape), batch_size=4)  # 2 batches per epoch


def tiny_ddpm() -> DDPM:
    torch.manual_seed(0)
    return tiny_model("ddpm", net=dict(model_channels=8, channel_mult=(1,)), timesteps=5, warmup_steps=0)


def fit(model, tmp_path, callbacks, logger, max_steps, **kw):
    trainer = tiny_trainer(max_steps=max_steps, default_root_dir=tmp_path, logger=logger, callbacks=callbacks,
                           limit_val_batches=1, enable_checkpointing=True)
    shape = model.data_shape
    trainer.fit(model, loader(shape), loader(shape), **kw)
    return trainer


def wandb_records(run_dir: Path, timeout: float = 30.0) -> list[dict]:
    """The history rows of a finished offline W&B run, read from its ``run-<id>.wandb`` file (a
    LevelDB-style log of protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers).
    ``finish()`` may return before wandb's service has written the file out: wait for the ``exit``
    record, which comes last."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        data, pos, chunk, rows, kinds = path.read_bytes(), 7, b"", [], []
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
                pos += left
                continue
            chunk += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(chunk)
                chunk = b""
                kinds.append(record.WhichOneof("record_type"))
                if kinds[-1] == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
        if "exit" in kinds:
            return rows
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s: {kinds}"
        time.sleep(0.2)


def offline_runs(tmp_path: Path, run_id: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}")))


def test_offline_wandb_run_gets_images_and_table_and_resume_continues_it(tmp_path):
    # -- first run: 2 epochs of 2 steps, logged at the end of each epoch (steps 2 and 4) ----------
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="ld-test")
    samples = WandbSamples(num_samples=4, num_trajectories=2, num_frames=3)
    fit(tiny_ddpm(), tmp_path, [EMA(decay=0.9), samples, ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
        logger, max_steps=4)
    run_id = logger.version
    logger.experiment.finish()

    out = tmp_path / "samples"  # WandbLogger: trainer.log_dir is its save_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl", "samples-step0000002.png", "samples-step0000004.png",
        "trajectory-step0000002.png", "trajectory-step0000004.png"]
    # 2 x 2 images of 8 px, 1 px padding: 19 px, enlarged 27x to >= 512 (min_size); trajectory: 2 rows x 3 frames
    assert Image.open(out / "samples-step0000004.png").size == (19 * 27, 19 * 27)
    assert Image.open(out / "trajectory-step0000004.png").size == (28 * 19, 19 * 19)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["weights"]) for r in rows] == [(2, 0, "ema"), (4, 1, "ema")]
    assert all("val/loss" in r and "train/loss" in r for r in rows)

    (run_dir,) = offline_runs(tmp_path, run_id)
    history = wandb_records(run_dir)  # waits for the run to be written out
    media = run_dir / "files" / "media"
    assert len(list((media / "images").glob("samples_*.png"))) == 2
    assert {Image.open(p).size for p in (media / "images").glob("samples_*.png")} == {(513, 513)}  # what W&B shows
    assert len(list((media / "images").glob("trajectory_*.png"))) == 2
    assert len(list((media / "table").glob("metrics_*.table.json"))) == 2
    images = [(r["trainer/global_step"], r["samples/captions"]) for r in history if "samples/filenames" in r]
    assert images == [(2, ["samples, step 2, ema weights, the model's default sampler"]),  # T = 5: no preview sampler
                      (4, ["samples, step 4, ema weights, the model's default sampler"])]
    (table,) = [r for r in history if r.get("metrics/_type") == "table-file" and r["trainer/global_step"] == 4]
    logged = json.loads((run_dir / "files" / table["metrics/path"]).read_text())
    assert logged["columns"][:3] == ["step", "epoch", "weights"] and [row[:3] for row in logged["data"]] == [
        [2, 0, "ema"], [4, 1, "ema"]]

    # the checkpoint holds the run id
    ckpt = tmp_path / "ck" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["wandb_run_id"] == run_id
    assert wandb_run_id_from_checkpoint(ckpt) == run_id
    assert wandb_run_id_from_checkpoint("last") is None

    # -- resume with a new WandbLogger given no id: the callback continues the checkpoint's run ----
    time.sleep(1.1)  # offline run folders are named to the second: a resume within it would share the folder
    resumed = WandbLogger(save_dir=tmp_path, offline=True, project="ld-test")
    with pytest.warns(UserWarning, match=f"continuing W&B run '{run_id}'"):
        fit(tiny_ddpm(), tmp_path, [EMA(decay=0.9), WandbSamples(num_samples=4, num_trajectories=2, num_frames=3)],
            resumed, max_steps=6, ckpt_path=ckpt)
    assert resumed.version == resumed.experiment.id == run_id
    resumed.experiment.finish()
    first, second = offline_runs(tmp_path, run_id)  # offline, a resumed run is a second folder of the same id
    assert first == run_dir
    # the resumed run replays epoch 1's end at step 4 (already logged: skipped), then logs step 6
    history = wandb_records(second)
    assert [r["trainer/global_step"] for r in history if "samples/filenames" in r] == [6]
    (table,) = [r for r in history if r.get("metrics/_type") == "table-file"]
    logged = json.loads((second / "files" / table["metrics/path"]).read_text())
    assert [row[0] for row in logged["data"]] == [2, 4, 6]  # the first rows came back with the checkpoint


def test_continue_wandb_run_before_the_run_starts(tmp_path):
    # the clean route (what the CLI does with --ckpt_path): the id is set before wandb.init
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="ld-test")
    continue_wandb_run(logger, "abc123")
    assert logger.version == "abc123"
    assert logger.experiment.id == "abc123"
    logger.experiment.finish()
    assert len(offline_runs(tmp_path, "abc123")) == 1 and len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        wandb_run_id_from_checkpoint(tmp_path / "nope.ckpt")


def test_csv_logger_gets_the_pngs_and_the_jsonl(tmp_path):
    logger = CSVLogger(tmp_path)
    fit(tiny_ddpm(), tmp_path, [WandbSamples(every_n_epochs=0, num_samples=9, num_trajectories=1, num_frames=2)],
        logger, max_steps=3)
    out = Path(logger.log_dir) / "samples"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "samples-step0000003.png",
                                                    "trajectory-step0000003.png"]
    assert Image.open(out / "samples-step0000003.png").size == (28 * 19, 28 * 19)  # 3 x 3 images, enlarged 19x
    assert Image.open(out / "trajectory-step0000003.png").size == (19 * 27, 10 * 27)  # 1 row x 2 frames
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 3 and row["weights"] == "raw"


class LinearAutoencoder(L.LightningModule):
    """A module of no family of ours, nn only: ``sample``, ``bits_per_dim`` and ``reconstruct`` by
    the contract, on images [C, H, W] or points [D]."""

    def __init__(self, data_shape: tuple[int, ...]):
        super().__init__()
        self.data_shape = data_shape
        dim = int(torch.tensor(data_shape).prod())
        self.encoder, self.decoder = nn.Linear(dim, 2), nn.Linear(2, dim)

    def reconstruct(self, x, generator=None):
        return self.decoder(self.encoder(x.flatten(1))).view_as(x).clamp(-1, 1)

    def sample(self, num_samples, *, y=None, generator=None, **options):
        z = torch.randn(num_samples, 2, generator=generator, device=self.device)
        return self.decoder(z).view(num_samples, *self.data_shape).clamp(-1, 1)

    def bits_per_dim(self, x, **options):
        return ((self.reconstruct(x) - x) ** 2).flatten(1).mean(1)

    def training_step(self, batch, batch_idx):
        return self.bits_per_dim(batch["x"]).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.bits_per_dim(batch["x"]).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ImageLogger(CSVLogger):
    """A non-W&B logger with ``log_image``: gets the images, duck-typed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images: list[tuple[str, str, int]] = []

    def log_image(self, key, images, step=None):
        self.images += [(key, Path(image).name, step) for image in images]


@pytest.mark.parametrize("shape, sizes", [((1, 8, 8), {"samples": (19 * 27, 19 * 27), "reconstructions": (37 * 14, 19 * 14)}),
                                          ((2,), {"samples": (500, 500), "reconstructions": (500, 500)})])
def test_foreign_module_with_reconstruct(tmp_path, shape, sizes):
    logger = ImageLogger(tmp_path)
    callback = WandbSamples(num_samples=4, num_reconstructions=4)
    fit(LinearAutoencoder(shape), tmp_path, [callback], logger, max_steps=2)  # one epoch
    out = Path(logger.log_dir) / "samples"
    assert sorted(p.name for p in out.glob("*.png")) == ["reconstructions-step0000002.png", "samples-step0000002.png"]
    assert {name: Image.open(path).size for name, path in callback.last_paths.items()} == sizes
    assert sorted(logger.images) == [("reconstructions", "reconstructions-step0000002.png", 2),
                                     ("samples", "samples-step0000002.png", 2)]


def test_min_size_zero_keeps_the_native_size(tmp_path):
    callback = WandbSamples(every_n_epochs=0, num_samples=9, num_trajectories=0, min_size=0)
    fit(tiny_ddpm(), tmp_path, [callback], CSVLogger(tmp_path), max_steps=1)
    assert Image.open(callback.last_paths["samples"]).size == (28, 28)
