"""Callbacks of the foundation: LastCheckpoint and SampleGrid."""

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lightning_diffusion import DDPM, MLP, LastCheckpoint, SampleGrid, ShardDataModule


def _fit(tmp_path, callbacks, max_steps):
    torch.manual_seed(0)
    model = DDPM(MLP(hidden=16, num_layers=1), timesteps=10, data_shape=(2,))
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=tmp_path, logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
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
