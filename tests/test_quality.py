"""SampleQuality / Likelihood callbacks and the metrics under them, against exact references:
FID of identical sets is 0, of noise is large; the 2-rank FID equals the 1-process FID of the
same samples; FID statistics have constant size; Likelihood weights by counts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tiny import tiny_model, tiny_trainer
from lightning_diffusion.callbacks import Likelihood, SampleQuality
from lightning_diffusion.data import ShardDataModule
from lightning_diffusion.metrics import FID, energy_distance, get_extractor, mmd


class PoolModel(L.LightningModule):
    """Not one of ours: ``sample`` returns rows of a fixed pool, rank r (seed r) starting at
    ``r * per_rank``; ``bits_per_dim`` is a known function of x."""

    def __init__(self, pool: torch.Tensor, per_rank: int = 0):
        super().__init__()
        self.pool, self.per_rank = pool, per_rank
        self.w = nn.Parameter(torch.zeros(()))
        self._cursor: dict[int, int] = {}

    def sample(self, num_samples, *, y=None, generator=None, **options):
        seed = generator.initial_seed() if generator is not None else 0
        start = self._cursor.get(seed, seed * self.per_rank)
        self._cursor[seed] = start + num_samples
        return self.pool[start:start + num_samples].clone()

    def bits_per_dim(self, x, **options):
        return x.flatten(1).mean(1) + 3.0


def digits_split(split: str) -> torch.Tensor:
    dm = ShardDataModule("digits", batch_size=500, num_workers=0)
    dm.setup("fit")
    return torch.cat([b["x"] for b in dm.eval_dataloader(split)])


@pytest.fixture(scope="module")
def digits_data():
    dm = ShardDataModule("digits", batch_size=256, num_workers=0)
    dm.setup("fit")
    return dm


def test_digits_extractor_is_a_good_classifier_and_deterministic(digits_data):
    ext = get_extractor("digits")
    assert ext.val_accuracy > 0.95
    batch = next(iter(digits_data.eval_dataloader("test")))
    f1, logits = ext(batch["x"])
    assert f1.shape == (batch["x"].shape[0], 64) and logits.shape[1] == 10
    assert (logits.argmax(1) == batch["y"]).float().mean() > 0.9
    # larger / RGB inputs map onto the same 8x8 grey input
    up = torch.nn.functional.interpolate(batch["x"], scale_factor=2, mode="nearest").expand(-1, 3, -1, -1)
    torch.testing.assert_close(ext(up)[0], f1, rtol=1e-5, atol=1e-5)


def test_training_the_digits_classifier_leaves_the_global_rng_alone(tmp_path):
    """A fit on a fresh $LD_DATA trains the classifier at setup; one on a warm cache loads it. Both must
    draw the same training noise afterwards, so the training restores the caller's RNG state."""
    from lightning_diffusion.metrics.features import train_digits_classifier

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_digits_classifier(tmp_path / "cnn.pt", epochs=1)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_fid_real_vs_real_is_zero_and_noise_is_large(digits_data):
    train = digits_split("train")
    cb = SampleQuality(num_samples=train.shape[0], extractor="digits", batch_size=500, cache_stats=False)
    same = cb.evaluate(None, PoolModel(train, per_rank=0), datamodule=digits_data)
    assert abs(same["val/fid"]) < 1e-6 and same["val/fid_num_samples"] == train.shape[0]
    assert same["val/precision"] == 1.0 and same["val/recall"] == 1.0
    held_out = torch.cat([digits_split("val"), digits_split("test")])
    cb2 = SampleQuality(num_samples=held_out.shape[0], extractor="digits", cache_stats=False)
    other = cb2.evaluate(None, PoolModel(held_out), datamodule=digits_data)
    noise = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cb3 = SampleQuality(num_samples=1000, extractor="digits", cache_stats=False)
    bad = cb3.evaluate(None, PoolModel(noise), datamodule=digits_data)
    # held-out real digits: small FID and KID; uniform noise: orders of magnitude worse
    assert other["val/fid"] < 0.05 * bad["val/fid"]
    assert bad["val/kid"] > 20 * max(other["val/kid"], 1e-4)
    assert other["val/is"] > 5 and bad["val/is"] < other["val/is"]
    assert bad["val/precision"] < 0.2 < other["val/precision"]


def test_fid_state_has_constant_size():
    stats = FID(64)
    sizes = []
    for _ in range(3):
        stats.update(torch.randn(500, 64), real=False)
        sizes.append(sum(t.numel() for t in (stats.fake_sum, stats.fake_outer)))
    assert sizes[0] == sizes[-1] == 64 + 64 * 64
    # and the moments equal numpy's
    f = torch.randn(300, 5, dtype=torch.float64)
    s = FID(5)
    s.update(f[:100], real=True), s.update(f[100:], real=True)
    mean, cov = s.mean_cov(real=True)
    np.testing.assert_allclose(mean.numpy(), f.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(f.numpy(), rowvar=False), atol=1e-12)


def test_fid_of_two_gaussians_matches_closed_form():
    # features N(m1, diag(v1)) and N(m2, diag(v2)): FID -> |m1-m2|^2 + sum (sqrt v1 - sqrt v2)^2
    g = torch.Generator().manual_seed(0)
    d, n = 4, 200_000
    m1, m2 = torch.zeros(d), torch.tensor([1.0, 0.0, -0.5, 0.0])
    v1, v2 = torch.ones(d), torch.tensor([4.0, 1.0, 0.25, 1.0])
    fid = FID(d)
    fid.update(m1 + v1.sqrt() * torch.randn(n, d, generator=g), real=True)
    fid.update(m2 + v2.sqrt() * torch.randn(n, d, generator=g), real=False)
    exact = ((m1 - m2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum()  # 1.25 + 1 + 0.25 = 2.5
    assert fid.compute().item() == pytest.approx(exact.item(), abs=0.03)


def test_point_metrics_are_zero_for_identical_sets_and_grow_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert mmd(x, x) == pytest.approx(0.0, abs=1e-12)
    near, far = x + 0.1, x + 1.0
    assert 0 < energy_distance(x, near) < energy_distance(x, far)
    assert 0 < mmd(x, near) < mmd(x, far)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fid_rank(rank: int, world: int, port: int, pool: torch.Tensor, data_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LD_DATA=data_dir)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = ShardDataModule("digits", batch_size=128, num_workers=0)
        dm.setup("fit")
        cb = SampleQuality(num_samples=pool.shape[0], extractor="digits", batch_size=100, cache_stats=False)
        results = cb.evaluate(None, PoolModel(pool, per_rank=(pool.shape[0] + world - 1) // world), datamodule=dm)
        lk = Likelihood(num_batches=2, split="test").evaluate(None, PoolModel(pool), datamodule=dm)
        # the real statistics cached by two ranks (the file absent: computed, gathered, written), then
        # read by two ranks (rank 0 holds the sums, each rank its share of the rows)
        cached = [SampleQuality(num_samples=pool.shape[0], extractor="digits", batch_size=100).evaluate(
            None, PoolModel(pool, per_rank=(pool.shape[0] + world - 1) // world), datamodule=dm) for _ in range(2)]
        if rank == 0:
            with open(out, "w") as f:
                json.dump({**results, **lk, "cached": cached}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_rank_fid_and_bpd_equal_single_process(digits_data, tmp_path):
    pool = torch.cat([digits_split("val"), digits_split("test")])[:301]  # odd: uneven shares
    get_extractor("digits")  # train the classifier once, before the ranks race for it
    for stale in Path(os.environ["LD_DATA"]).glob("stats/digits-train-*-digits-all-*.pt"):
        stale.unlink()  # the ranks write the cache
    single_cb = SampleQuality(num_samples=301, extractor="digits", batch_size=100, cache_stats=False)
    single = single_cb.evaluate(None, PoolModel(pool, per_rank=301), datamodule=digits_data)
    mp.spawn(_fid_rank, args=(2, _free_port(), pool, os.environ["LD_DATA"], str(tmp_path / "r.json")), nprocs=2)
    two = json.loads((tmp_path / "r.json").read_text())
    assert two["val/fid_num_samples"] == 301
    assert two["val/fid"] == pytest.approx(single["val/fid"], rel=1e-6, abs=1e-8)
    assert two["val/precision"] == pytest.approx(single["val/precision"], abs=1e-9)
    for cached in two["cached"]:  # written by the ranks, then read by them: the same numbers
        assert cached["val/fid"] == pytest.approx(single["val/fid"], rel=1e-6, abs=1e-8)
        assert cached["val/precision"] == pytest.approx(single["val/precision"], abs=1e-9)
        assert cached["val/recall"] == pytest.approx(single["val/recall"], abs=1e-9)
        assert cached["val/is"] == pytest.approx(single["val/is"], rel=1e-6)
    assert two["cached"][0]["val/kid"] == pytest.approx(two["cached"][1]["val/kid"], rel=1e-9)
    # Likelihood: per-sample mean over all samples the ranks scored (the first 2 batches of 128
    # of the test split per rank: the test split has 180 -> 90 each, all of them)
    test = digits_split("test")
    expected = (test.flatten(1).mean(1) + 3.0).double().mean().item()
    assert two["val/bpd"] == pytest.approx(expected, abs=1e-9)
    assert two["val/bpd_num_samples"] == test.shape[0]


def test_callbacks_in_a_fit_log_with_counts_and_cache_real_stats(tmp_path, digits_data):
    from lightning_diffusion import DDPM, EMA, UNet

    torch.manual_seed(0)
    model = tiny_model("ddpm", warmup_steps=1)
    quality = SampleQuality(num_samples=64, extractor="digits", batch_size=64, every_n_epochs=1,
                            sample_options={"sampler": "ddim", "steps": 5}, metrics=["fid", "kid", "pr"])
    lk = Likelihood(every_n_epochs=1, num_batches=1, bpd_options={"steps": 10})
    dm = ShardDataModule("digits", batch_size=32, num_workers=0, batches_per_epoch=3)
    trainer = tiny_trainer(max_epochs=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="q"),
                           callbacks=[EMA(), quality, lk], limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    lines = [json.loads(x) for x in (tmp_path / "q" / "version_0" / "metrics" / "sample_quality.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["num_samples"] == 64 and line["extractor"] == "digits" for line in lines)
    assert lines[0]["weights"] == "ema" and lines[0]["num_real"] == 1437 and lines[0]["fid"] > 0
    bpd = [json.loads(x) for x in (tmp_path / "q" / "version_0" / "metrics" / "likelihood.jsonl").read_text().splitlines()]
    assert bpd[-1]["estimator"] == "vlb-respaced-10" and bpd[-1]["num_samples"] == 32 and 0 < bpd[-1]["bpd"] < 20
    metrics = (tmp_path / "q" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/fid", "val/fid_num_samples", "val/kid", "val/bpd", "val/bpd_vlb-respaced-10", "val/ema"} <= set(metrics)
    cached = list(Path(os.environ["LD_DATA"]).glob("stats/digits-train-*-digits-all-*.pt"))
    assert len(cached) == 1, "real statistics were not cached"
    stats = torch.load(cached[0], weights_only=False)
    assert stats["meta"]["count"] == 1437 and stats["stats"]["outer"].shape == (64, 64)
    # KID and precision/recall keep the same feature rows: one copy in memory (views of the same storage)
    kid, pr = quality._metrics["kid"], quality._metrics["pr"]
    for side in ("real_features", "fake_features"):
        rows_kid, rows_pr = getattr(kid, side), getattr(pr, side)
        assert len(rows_kid) == len(rows_pr) > 0 and sum(r.shape[0] for r in rows_kid) == (1437 if side[0] == "r" else 64)
        assert all(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for a, b in zip(rows_kid, rows_pr))


def test_inception_weights_are_checked_before_loading(tmp_path, monkeypatch):
    from lightning_diffusion.metrics.features import InceptionV3Features

    monkeypatch.setenv("LD_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="features fetch-inception"):
        InceptionV3Features()
    fake = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"not": torch.zeros(3)}, fake)
    with pytest.raises(ValueError, match="does not start with 6726825d"):
        InceptionV3Features(str(fake))
    with pytest.raises(ValueError, match="unknown feature extractor 'clip'"):
        get_extractor("clip")


def test_fewer_samples_than_ranks_is_refused_on_every_rank():
    """Each rank generates a share of num_samples: a rank with none could not join the reductions, so the
    same check refuses the option on every rank (before any collective) instead of one rank raising."""
    from types import SimpleNamespace

    from lightning_diffusion.callbacks import SampleQuality

    callback = SampleQuality(num_samples=3, extractor="digits")
    for rank in range(4):
        with pytest.raises(ValueError, match="num_samples=3 is less than the 4 ranks"):
            callback._check_world(SimpleNamespace(global_rank=rank, world_size=4))
    callback._check_world(SimpleNamespace(global_rank=0, world_size=3))
