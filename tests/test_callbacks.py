"""Callbacks of the foundation: LastCheckpoint and SampleGrid."""

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
from PIL import Image

from tiny import tiny_model, tiny_trainer
from lightning_diffusion import DDPM, MLP, LastCheckpoint, SampleGrid, ShardDataModule


def _fit(tmp_path, callbacks, max_steps):
    torch.manual_seed(0)
    model = DDPM(MLP(hidden=16, num_layers=1), timesteps=10, data_shape=(2,))
    trainer = tiny_trainer(max_steps=max_steps, default_root_dir=tmp_path, callbacks=callbacks, limit_val_batches=0,
                           enable_checkpointing=True)
    trainer.fit(model, datamodule=ShardDataModule("gaussians8", batch_size=8, batches_per_epoch=4))
    return trainer


def test_last_checkpoint_holds_the_final_step(tmp_path):
    # Lightning's own ModelCheckpoint leaves last.ckpt at the last multiple of N ...
    _fit(tmp_path / "stock", [ModelCheckpoint(dirpath=tmp_path / "stock", every_n_train_steps=3, save_last=True)], 5)
    assert torch.load(tmp_path / "stock" / "last.ckpt", weights_only=False)["global_step"] == 3
    # ... LastCheckpoint also writes it when training ends between two saves
    _fit(tmp_path / "ours", [LastCheckpoint(dirpath=tmp_path / "ours", every_n_train_steps=3)], 5)
    assert torch.load(tmp_path / "ours" / "last.ckpt", weights_only=False)["global_step"] == 5
    assert (tmp_path / "ours" / "epoch=0-step=3.ckpt").is_file()


def test_sample_grid_every_n_epochs_and_at_the_end(tmp_path):
    grid = SampleGrid(num_samples=50, every_n_epochs=1)
    _fit(tmp_path, [grid], 8)  # 2 epochs of 4 batches
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["epoch0000-step0000004.png", "epoch0001-step0000008.png", "final.png"]
    assert grid.last_path == tmp_path / "samples" / "final.png"
    assert Image.open(grid.last_path).size == (500, 500)


def test_sample_grid_enlarges_images_by_an_integer_factor(tmp_path):
    """100 digits of 8 x 8 px: a 91 x 91 grid natively (min_size 0), too small to judge by eye; by default
    enlarged 6x to 546 x 546 (the smallest integer factor reaching 512 px), each pixel an exact 6 x 6 block.
    A scatter plot of points stays 500 x 500 (test_sample_grid_every_n_epochs_and_at_the_end)."""
    torch.manual_seed(0)
    model = tiny_model("ddpm", net=dict(model_channels=8, channel_mult=(1,)), timesteps=5)
    trainer = tiny_trainer(default_root_dir=tmp_path)
    native = np.asarray(Image.open(SampleGrid(num_samples=100, min_size=0).save(trainer, model, "native")))
    big = np.asarray(Image.open(SampleGrid(num_samples=100).save(trainer, model, "default")))
    assert native.shape[:2] == (91, 91) and big.shape[:2] == (546, 546)
    assert np.array_equal(big, native.repeat(6, axis=0).repeat(6, axis=1))
    bigger = np.asarray(Image.open(SampleGrid(num_samples=100, min_size=1000).save(trainer, model, "bigger")))
    assert bigger.shape[:2] == (91 * 11, 91 * 11)
    with pytest.raises(ValueError, match=r"SampleGrid.min_size=-1: must be an integer >= 0"):
        SampleGrid(min_size=-1)
