"""The torchmetrics metrics of ``lightning_diffusion.metrics.quality``: FID equals torchmetrics' own
FrechetInceptionDistance given the same feature extractor; the states declare their reductions and
two gloo ranks give the one-process results; FID's state does not grow; a user's LightningModule
logs them with ``self.log``."""

from __future__ import annotations

import json
import os
import socket

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tiny import tiny_trainer
from lightning_diffusion import FID, KID, BitsPerDim, InceptionScoreFromLogits, PrecisionRecall
from lightning_diffusion.metrics import get_extractor


class FeaturesOnly(nn.Module):
    """An extractor's features alone, as torchmetrics' FID takes a custom ``feature`` module."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor, self.num_features = extractor, extractor.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x)[0]


def test_fid_equals_torchmetrics_frechet_inception_distance_with_the_same_extractor():
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = FeaturesOnly(get_extractor("digits"))
    theirs = FrechetInceptionDistance(feature=extractor)  # a custom module: images go to it unchanged
    ours = FID(extractor.num_features)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(400, 1, 8, 8, generator=g) * 2 - 1
    fake = (torch.rand(300, 1, 8, 8, generator=g) * 2 - 1).clamp(-0.3, 1)  # another distribution
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for batch in images.split(128):
                theirs.update(batch, real=is_real)
                ours.update(extractor(batch), real=is_real)
    expected = theirs.compute().item()
    assert expected > 1e-3  # not a comparison of zeros
    assert ours.compute().item() == pytest.approx(expected, rel=1e-6)


def test_fid_state_size_is_constant_as_samples_grow_and_states_sum():
    fid = FID(16)
    bytes_held = []
    for n in (10, 1000, 10000):
        fid.update(torch.randn(n, 16), real=True)
        fid.update(torch.randn(n, 16), real=False)
        bytes_held.append(sum(t.numel() * t.element_size() for t in fid.metric_state.values()))
    assert bytes_held[0] == bytes_held[-1] == 2 * (8 + 16 * 8 + 16 * 16 * 8)
    assert {name: fn.__name__ for name, fn in fid._reductions.items()} == {
        f"{side}_{what}": "dim_zero_sum" for side in ("real", "fake") for what in ("count", "sum", "outer")}
    assert fid.fake_sum.dtype == fid.fake_outer.dtype == torch.float64
    assert int(fid.fake_count) == 10 + 1000 + 10000


def test_bits_per_dim_states_are_float64_sums_and_merge_as_ranks_would():
    metric = BitsPerDim()
    assert {name: fn.__name__ for name, fn in metric._reductions.items()} == {"total": "dim_zero_sum",
                                                                            "count": "dim_zero_sum"}
    values = torch.rand(37, generator=torch.Generator().manual_seed(0)) * 5
    first, second = BitsPerDim(), BitsPerDim()
    first.update(values[:30])
    second.update(values[30:])  # uneven shares: a mean of rank means would be wrong
    second.merge_state(first)  # what the sum reduction over ranks does
    assert second.total.dtype == second.count.dtype == torch.float64 and second.count.item() == 37
    assert second.compute().item() == pytest.approx(values.double().mean().item(), rel=1e-12)
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert torch.isnan(BitsPerDim().compute())  # no sample: NaN, not an error


def test_feature_rows_keep_the_first_max_features_and_reset_keeps_the_real_side():
    kid = KID(max_features=5, reset_real_features=False)
    kid.update(torch.arange(12.0).view(6, 2), real=True)
    kid.update(torch.ones(4, 2), real=False)
    kid.update(torch.zeros(4, 2), real=False)
    assert torch.equal(kid.features(real=True), torch.arange(10.0).view(5, 2))
    assert kid.features(real=False).shape == (5, 2)
    kid.reset()
    assert kid.features(real=True).shape == (5, 2) and kid.features(real=False).shape == (0, 0)
    with pytest.raises(ValueError, match="KID needs feature rows of both sides, has 5 real and 0 generated"), \
            pytest.warns(UserWarning, match="called before the ``update``"):
        kid.compute()
    with pytest.raises(ValueError, match=r"FID.update: features have 3 dimensions, the metric 4"):
        FID(4).update(torch.zeros(2, 3), real=True)


# -- two gloo ranks give the one-process numbers ---------------------------------------------------
def _data() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"real": torch.randn(301, 8, generator=g), "fake": torch.randn(257, 8, generator=g) * 1.3 + 0.2,
            "logits": torch.randn(257, 10, generator=g), "bpd": torch.rand(257, generator=g) + 1}


def _compute(rows: dict[str, Tensor], cap: int) -> dict[str, float]:
    fid, kid, pr = FID(8), KID(subsets=20, subset_size=100, max_features=cap), PrecisionRecall()
    inception, bpd = InceptionScoreFromLogits(max_logits=cap), BitsPerDim()
    for metric in (fid, kid, pr):
        for batch in rows["real"].split(64):
            metric.update(batch, real=True)
        for batch in rows["fake"].split(64):
            metric.update(batch, real=False)
    inception.update(rows["logits"])
    bpd.update(rows["bpd"])
    (kid_mean, kid_std), (precision, recall), (is_mean, is_std) = kid.compute(), pr.compute(), inception.compute()
    return {"fid": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item(),
            "precision": precision.item(), "recall": recall.item(), "is": is_mean.item(), "is_std": is_std.item(),
            "bpd": bpd.compute().item()}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # contiguous, uneven shares in rank order (rank 0 takes one more); each rank keeps 100 rows for KID and IS
        shares = {k: v.tensor_split([v.shape[0] // 2 + 1])[rank] for k, v in _data().items()}
        results = _compute(shares, cap=100)  # compute() reduces the states over both ranks
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    """FID's sums, the cat-reduced rows of KID, precision/recall and IS (rank 0's first: the
    one-process order, so KID's random subsets and IS's shuffle pick the same rows), and BitsPerDim's
    sums, reduced by torchmetrics over 2 gloo ranks with uneven shares. KID and IS keep at most 100
    rows per rank (``max_features`` is per process): the one-process reference gets those 200 rows."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(tmp_path / "r.json")), nprocs=2)
    two = json.loads((tmp_path / "r.json").read_text())
    data = _data()
    kept = {k: torch.cat([part[:100] for part in v.tensor_split([v.shape[0] // 2 + 1])]) for k, v in data.items()}
    single, single_kept = _compute(data, cap=1000), _compute(kept, cap=1000)
    assert two["fid"] == pytest.approx(single["fid"], rel=1e-9)
    assert two["precision"] == single["precision"] and two["recall"] == single["recall"]
    assert two["bpd"] == pytest.approx(single["bpd"], rel=1e-12)
    for key in ("kid", "kid_std", "is", "is_std"):
        assert two[key] == pytest.approx(single_kept[key], rel=1e-9), key


# -- a user's own LightningModule logs them --------------------------------------------------------
class FeatureModule(L.LightningModule):
    """Not ours: a fixed linear map (lr 0) whose outputs are the 'generated' features of each
    validation batch, its inputs the real ones; the squared norm per dimension stands for bits/dim."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.fid, self.bpd = FID(4), BitsPerDim()

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        x = batch[0]
        self.fid.update(x, real=True)
        self.fid.update(self.layer(x), real=False)
        self.bpd.update(x.square().mean(1))
        self.log("val/fid", self.fid)
        self.log("val/bpd", self.bpd)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_user_module_logs_fid_and_bits_per_dim_with_self_log(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(96, 4)
    model = FeatureModule()
    trainer = tiny_trainer(max_epochs=2, limit_train_batches=2, default_root_dir=tmp_path, num_sanity_val_steps=2)
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=32), DataLoader(TensorDataset(x), batch_size=32))
    expected = FID(4)
    with torch.no_grad():
        expected.update(x, real=True)
        expected.update(model.layer(x), real=False)
    # the epoch's value over all 3 batches (Lightning computes, then resets: epoch 2 did not add to epoch 1)
    assert trainer.callback_metrics["val/fid"].item() == pytest.approx(expected.compute().item(), rel=1e-6)
    assert trainer.callback_metrics["val/bpd"].item() == pytest.approx(x.square().mean(1).mean().item(), rel=1e-6)
    assert int(model.fid.fake_count) == 0  # reset after the epoch
