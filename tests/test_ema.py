"""EMA callback: the decay formula, the average against a hand computation, evaluation on the
averages, and exact survival of raw and averaged weights through a checkpoint resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from tiny import tiny_trainer
from lightning_diffusion.callbacks import EMA, evaluation_weights, load_ema_weights
from lightning_diffusion.callbacks.ema import ema_decay, ema_state_from_checkpoint


def test_ema_decay_warmup_by_hand():
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == pytest.approx(1 - 2 ** (-2 / 3), abs=1e-15)  # 0.370039...
    assert ema_decay(1) == pytest.approx(0.37003947505256, abs=1e-12)
    assert ema_decay(10, power=0.75) == pytest.approx(1 - 11 ** -0.75, abs=1e-15)
    assert ema_decay(30, inv_gamma=10.0) == pytest.approx(1 - 4 ** (-2 / 3), abs=1e-15)
    assert ema_decay(10**9) == 0.9999  # capped
    assert ema_decay(10**9, decay=0.999) == 0.999


class Regression(L.LightningModule):
    """y = w x + b fitted with plain SGD on a fixed dataset: every step is deterministic."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.lr = lr
        self.history: list[dict[str, torch.Tensor]] = []  # parameters after each optimizer step
        self.val_params: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.lin(x) - y) ** 2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.history.append({n: p.detach().clone() for n, p in self.named_parameters()})

    def validation_step(self, batch, batch_idx):
        self.val_params.append(self.lin.weight.detach().clone())
        x, y = batch
        self.log("val/loss", ((self.lin(x) - y) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(n: int = 32, batch: int = 8, repeat: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch if repeat else n, 3, generator=g).repeat(n // batch if repeat else 1, 1)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(tmp_path, callbacks, **kw):
    return tiny_trainer(callbacks=callbacks,
                        **{"max_steps": 8, "default_root_dir": tmp_path, "enable_checkpointing": True, **kw})


def test_ema_matches_hand_computation_and_evaluation_uses_it(tmp_path):
    torch.manual_seed(0)
    model = Regression()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(decay=0.9, power=0.75, inv_gamma=2.0)
    trainer(tmp_path, [ema], max_steps=8, enable_checkpointing=False, check_val_every_n_epoch=1,
            limit_val_batches=1).fit(model, loader(), loader())
    # by hand: average starts as the initial weights; step k applies d_k = min(0.9, 1 - (1 + k/2)^-0.75)
    expected = {n: t.double() for n, t in init.items()}
    for k, params in enumerate(model.history, start=1):
        d = min(0.9, 1 - (1 + k / 2.0) ** -0.75)
        expected = {n: d * expected[n] + (1 - d) * params[n].double() for n in expected}
    assert ema.num_updates == 8
    for n, t in expected.items():
        torch.testing.assert_close(ema.shadow[n].double(), t, rtol=0, atol=1e-6)
    # trained and averaged weights differ, the model holds the trained ones after fit
    assert (ema.shadow["lin.weight"] - model.lin.weight).abs().max() > 1e-3
    torch.testing.assert_close(model.lin.weight.detach(), model.history[-1]["lin.weight"], rtol=0, atol=0)
    # validation ran on the averages: after epoch 1 (4 steps) and epoch 2 (8 steps)
    assert len(model.val_params) == 2
    torch.testing.assert_close(model.val_params[-1], ema.shadow["lin.weight"], rtol=0, atol=0)
    assert (model.val_params[-1] - model.history[-1]["lin.weight"]).abs().max() > 1e-3
    # other callbacks / commands reach the same weights
    with evaluation_weights(None, model) as which:
        assert which == "raw"
    t = trainer(tmp_path, [ema])
    with evaluation_weights(t, model) as which:
        assert which == "ema"
        torch.testing.assert_close(model.lin.weight.detach(), ema.shadow["lin.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.lin.weight.detach(), model.history[-1]["lin.weight"], rtol=0, atol=0)


def test_ema_raw_evaluation_and_update_every(tmp_path):
    model = Regression()
    ema = EMA(decay=0.5, update_every=3, evaluate_with="raw")
    trainer(tmp_path, [ema], max_steps=8, enable_checkpointing=False, limit_val_batches=1).fit(model, loader(), loader())
    assert ema.num_updates == 2 and ema.last_step == 6  # steps 3 and 6
    torch.testing.assert_close(model.val_params[-1], model.history[-1]["lin.weight"], rtol=0, atol=0)


def test_ema_survives_resume_exactly(tmp_path):
    # 8 steps straight vs 4 steps, checkpoint, resume, 4 more: raw weights, averages and Adam
    # state all come back, so both runs end bitwise equal
    torch.manual_seed(1)
    straight = Regression()
    ema_straight = EMA(decay=0.99)
    # every batch the same: a plain DataLoader restarts from its first batch on resume, and this
    # test is about the weights, averages and optimizer state, not the data position
    trainer(tmp_path / "a", [ema_straight], max_steps=8, enable_checkpointing=False).fit(straight, loader(repeat=True))

    torch.manual_seed(1)
    first = Regression()
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    ema_first = EMA(decay=0.99)
    trainer(tmp_path / "b", [ema_first, ckpt_cb], max_steps=4).fit(first, loader(repeat=True))
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    shadow = ema_state_from_checkpoint(ckpt)
    torch.testing.assert_close(shadow["lin.weight"], ema_first.shadow["lin.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ckpt["state_dict"]["lin.weight"], first.lin.weight.detach(), rtol=0, atol=0)

    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    resumed = Regression()
    ema_resumed = EMA(decay=0.99)
    trainer(tmp_path / "c", [ema_resumed], max_steps=8, enable_checkpointing=False).fit(
        resumed, loader(repeat=True), ckpt_path=tmp_path / "ck" / "last.ckpt")
    assert ema_resumed.num_updates == ema_straight.num_updates == 8
    for n, p in straight.named_parameters():
        torch.testing.assert_close(dict(resumed.named_parameters())[n], p, rtol=0, atol=0)
        torch.testing.assert_close(ema_resumed.shadow[n], ema_straight.shadow[n], rtol=0, atol=0)

    # load_ema_weights puts the averages into a fresh module (what `sample` does by default)
    fresh = Regression()
    assert load_ema_weights(fresh, ckpt)
    torch.testing.assert_close(fresh.lin.weight.detach(), shadow["lin.weight"], rtol=0, atol=0)
    assert not load_ema_weights(fresh, {"state_dict": {}})


class SaveDuringValidation(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_validation_epoch_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def test_checkpoint_written_during_validation_holds_trained_weights(tmp_path):
    model = Regression()
    ema = EMA(decay=0.9)
    path = tmp_path / "mid_val.ckpt"
    trainer(tmp_path, [ema, SaveDuringValidation(path)], max_steps=4, enable_checkpointing=False,
            limit_val_batches=1).fit(model, loader(), loader())
    ckpt = torch.load(path, weights_only=False)
    # validation ran on the averages, yet the file's state_dict has the trained weights
    torch.testing.assert_close(model.val_params[-1], ema.shadow["lin.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ckpt["state_dict"]["lin.weight"], model.history[-1]["lin.weight"], rtol=0, atol=0)
    torch.testing.assert_close(ema_state_from_checkpoint(ckpt)["lin.weight"], ema.shadow["lin.weight"], rtol=0, atol=0)


def test_ema_rejects_bad_options():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="evaluate_with"):
        EMA(evaluate_with="average")


# EMA under DDP and FSDP2 (sharded averages, evaluation on them, exact resume, the checkpoint holding
# them whole): tests/test_distributed.py
