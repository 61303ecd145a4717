"""The public API: every name of ``lightning_diffusion.__all__`` resolves, is ours and is documented,
and a LightningModule that is not ours but implements the callbacks' protocol gets EMA,
SampleQuality, Likelihood and WandbSamples (offline W&B)."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusion
from tiny import tiny_trainer
from lightning_diffusion import (EMA, GenerativeModule, HasTrajectory, Likelihood, NamesEstimator, Reconstructs,
                                 SampleQuality, WandbSamples)

PUBLIC = [name for name in lightning_diffusion.__all__ if name != "__version__"]


def test_version_is_semantic_and_is_the_distributions():
    assert re.fullmatch(r"\d+\.\d+\.\d+", lightning_diffusion.__version__)
    assert importlib.metadata.version("lightning-diffusion") == lightning_diffusion.__version__
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    assert f"## [{lightning_diffusion.__version__}]" in changelog


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_resolves_is_ours_and_documented(name):
    obj = getattr(lightning_diffusion, name)
    assert obj.__module__.startswith("lightning_diffusion."), f"{name} is not ours: {obj.__module__}"
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__  # its own, not inherited
    assert doc and doc.strip(), f"lightning_diffusion.{name} has no docstring"
    # every public argument has a type hint (of a function, or of a class's own constructor)
    function = obj.__init__ if inspect.isclass(obj) else obj
    if not getattr(function, "__module__", "").startswith("lightning_diffusion."):
        return  # inherited from elsewhere (an exception's, a Protocol's)
    unannotated = [p.name for p in inspect.signature(function).parameters.values()
                   if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    assert not unannotated, f"lightning_diffusion.{name}: arguments without type hints: {unannotated}"


def test_names_outside_all_are_not_public():
    assert dir(lightning_diffusion) == sorted(lightning_diffusion.__all__)
    with pytest.raises(AttributeError, match="no attribute 'timestep_embedding'"):
        lightning_diffusion.timestep_embedding  # noqa: B018 (reachable only from its submodule: private)


# -- a user's own module with the protocol ---------------------------------------------------------
class UserModule(L.LightningModule):
    """Not ours: a 2-D Gaussian with learned mean and scale, passed through dropout. It records the
    mode (training or eval) and whether autograd was on at every call the callbacks make."""

    def __init__(self):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(2))
        self.log_std = nn.Parameter(torch.zeros(2))
        self.dropout = nn.Dropout(0.5)  # would make samples and bits/dim random in training mode
        self.calls: list[tuple[str, bool, bool]] = []  # (method, training, grad enabled)
        self.training_modes: list[bool] = []

    def _record(self, method: str) -> None:
        self.calls.append((method, self.training, torch.is_grad_enabled()))

    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               **options) -> Tensor:
        self._record("sample")
        noise = torch.randn(num_samples, 2, generator=generator, device=self.device)
        return self.mean + self.log_std.exp() * self.dropout(noise)

    def bits_per_dim(self, x: Tensor, **options) -> Tensor:
        self._record("bits_per_dim")
        return self._bits(x)

    def _bits(self, x: Tensor) -> Tensor:
        z = self.dropout((x - self.mean) / self.log_std.exp())
        nats = (0.5 * z.pow(2) + self.log_std + 0.5 * math.log(2 * math.pi)).sum(1)
        return nats / (2 * math.log(2))

    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._record("reconstruct")
        return self.dropout(x)

    def bpd_estimator(self, **options) -> str:
        return "exact"

    def training_step(self, batch, batch_idx):
        self.training_modes.append(self.training)
        x, = batch
        return self._bits(x).mean()

    def validation_step(self, batch, batch_idx):
        x, = batch
        self.log("val/loss", ((x - self.mean) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_own_module_gets_every_callback(tmp_path, offline_wandb):
    torch.manual_seed(0)
    model = UserModule()
    assert isinstance(model, GenerativeModule) and isinstance(model, Reconstructs)
    assert isinstance(model, NamesEstimator) and not isinstance(model, HasTrajectory)
    points = 1.0 + 0.5 * torch.randn(256, 2, generator=torch.Generator().manual_seed(1))  # tuples, not dicts
    train, val = DataLoader(TensorDataset(points), batch_size=32), DataLoader(TensorDataset(points[:64]), batch_size=32)
    ema = EMA(decay=0.9)
    quality = SampleQuality(num_samples=64, every_n_epochs=0, every_n_steps=3, batch_size=32, real_split="train")
    likelihood = Likelihood(num_batches=0)
    samples = WandbSamples(every_n_epochs=1, num_samples=32, num_reconstructions=8)
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="ld-test")
    trainer = tiny_trainer(max_steps=8, callbacks=[ema, quality, likelihood, samples], logger=logger,
                           default_root_dir=tmp_path)
    trainer.fit(model, train, val)  # 8 steps = one epoch: validation once, at its end

    metrics = trainer.callback_metrics
    assert metrics["val/ema"] == 1.0  # validation ran on the averages
    assert quality.last_results["val/energy_distance"] >= 0 and "val/mmd" in quality.last_results
    assert {"val/bpd", "val/bpd_exact", "val/bpd_num_samples"} <= set(metrics)
    assert metrics["val/bpd_num_samples"] == 64
    # every call of the callbacks ran in eval mode and without gradients; training ran in training mode
    methods = {method for method, _, _ in model.calls}
    assert methods == {"sample", "bits_per_dim", "reconstruct"}
    assert not any(training or grad for _, training, grad in model.calls), model.calls
    assert all(model.training_modes) and len(model.training_modes) == 8 and model.training
    # on the EMA weights, also for SampleQuality inside training (steps 3 and 6)
    run_dir = Path(trainer.log_dir or tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics" / "sample_quality.jsonl").read_text().splitlines()]
    assert [(r["step"], r["weights"]) for r in records] == [(3, "ema"), (6, "ema")]
    assert records[0]["num_real"] == 256  # the train split: the trainer's training loader
    (likelihood_record,) = [json.loads(line) for line in
                            (run_dir / "metrics" / "likelihood.jsonl").read_text().splitlines()]
    assert likelihood_record["weights"] == "ema" and likelihood_record["estimator"] == "exact"
    # WandbSamples: scatter plots of samples and reconstructions into the offline W&B run
    assert sorted(samples.last_paths) == ["reconstructions", "samples"]
    assert all(path.is_file() for path in samples.last_paths.values())
    run_id = logger.version
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert samples.rows[-1]["weights"] == "ema" and samples.rows[-1]["step"] == 8


def test_callbacks_name_the_missing_split(tmp_path):
    model = UserModule()
    train = DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=32)
    likelihood = Likelihood(split="test")
    trainer = tiny_trainer(max_steps=2, callbacks=[likelihood], default_root_dir=tmp_path, limit_val_batches=1)
    with pytest.raises(ValueError, match=r"split='test': no test data"):
        trainer.fit(model, train, train)
    with pytest.raises(ValueError, match=r"real_split='valid': unknown split"):
        SampleQuality(num_samples=4, real_split="valid").evaluate(trainer, model)


class TwoGaussians(L.LightningModule):
    """An exact class-conditional density of 2-D points: ``x | y ~ N(mu_y, I)``, y uniform over 2 classes."""

    class_conditional = True

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        log_c = torch.distributions.Normal(self.mu, 1.0).log_prob(x.unsqueeze(1)).sum(-1)  # [B, 2]
        log_p = log_c.gather(1, y[:, None]).squeeze(1) if y is not None else torch.logsumexp(log_c, 1) - math.log(2)
        return -log_p / (2 * math.log(2))


def test_likelihood_with_labels_scores_each_sample_under_its_own_label():
    """``Likelihood(labels=True)`` is the bound on ``-log p(x | y)`` with each sample's own label (closed form
    here), logged apart from ``-log p(x)`` (the mixture), which it is not."""
    import types

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (96,), generator=g)
    mu = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    x = mu[y] + torch.randn(96, 2, generator=g)
    rows = [{"x": xi, "y": yi} for xi, yi in zip(x, y)]
    data = types.SimpleNamespace(val_dataloader=lambda: DataLoader(rows, batch_size=32))
    normal = torch.distributions.MultivariateNormal
    given_y = -normal(mu[y], torch.eye(2)).log_prob(x) / (2 * math.log(2))
    mixture = -torch.logsumexp(torch.stack([normal(m, torch.eye(2)).log_prob(x) for m in mu]) - math.log(2), 0) / (2 * math.log(2))
    model = TwoGaussians()
    conditional = Likelihood(num_batches=0, labels=True).evaluate(None, model, data)
    marginal = Likelihood(num_batches=0).evaluate(None, model, data)
    assert set(conditional) == {"val/bpd_given_y", "val/bpd_bpd_given_y", "val/bpd_num_samples"}
    assert conditional["val/bpd_given_y"] == pytest.approx(given_y.mean().item(), abs=1e-5)
    assert marginal["val/bpd"] == pytest.approx(mixture.mean().item(), abs=1e-5)
    assert conditional["val/bpd_given_y"] < marginal["val/bpd"] - 0.05  # the label tells which component
    with pytest.raises(ValueError, match=r"Likelihood.labels=True: UserModule is not class-conditional"):
        Likelihood(num_batches=0, labels=True).evaluate(None, UserModule(), data)
