"""SampleQuality and Likelihood: evaluation callbacks over the model contract, split across ranks.

Both run on the evaluation weights (:func:`~lightning_diffusion.callbacks.ema.evaluation_weights`),
every rank does its share and the same number of network calls (a sharded FSDP model needs all
ranks in each forward), results are reduced over ranks by the torchmetrics metrics of
:mod:`lightning_diffusion.metrics.quality` (their ``compute()``, outside any rank-zero code), and rank
zero appends a JSON line with every detail (number of samples, extractor, estimator, weights) to
``<run dir>/metrics/<name>.jsonl`` next to the logged numbers.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import MaxMetric, MinMetric

from lightning_diffusion.callbacks.common import (batch_data, batch_labels, check_model_options, check_split, class_labels,
                                                  describe_options, eval_batches, find_datamodule, run_dir,
                                                  sampling_options)
from lightning_diffusion.callbacks.ema import evaluation_weights
from lightning_diffusion.callbacks.protocol import estimator_name
from lightning_diffusion.distributed import rank_world
from lightning_diffusion.encodings import images_from_categories
from lightning_diffusion.metrics import quality
from lightning_diffusion.metrics.features import EXTRACTORS, FeatureExtractor, get_extractor
from lightning_diffusion.paths import data_cache_dir
from lightning_diffusion.seeds import derived_seed

IMAGE_METRICS = ("fid", "kid", "is", "pr")


def _append_jsonl(trainer: L.Trainer, name: str, record: dict) -> None:
    path = run_dir(trainer) / "metrics" / f"{name}.jsonl"  # trainer.log_dir broadcasts: every rank calls it
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _data_shape(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, ...] | None:
    """The shape of one sample, from the model (our families) or the DataModule; None if neither says."""
    shape = getattr(pl_module, "data_shape", None) or getattr(getattr(trainer, "datamodule", None), "data_shape", None)
    return tuple(shape) if shape is not None else None


class _Periodic(L.Callback):
    """Runs :meth:`evaluate` every ``every_n_epochs`` validation epochs and/or ``every_n_steps``
    optimizer steps (0 disables either)."""

    def __init__(self, every_n_epochs: int, every_n_steps: int):
        super().__init__()
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.last_results: dict[str, float] = {}

    def evaluate(self, trainer: L.Trainer | None, pl_module: L.LightningModule,
                 datamodule: Any = None) -> dict[str, float]:
        """Run the evaluation now (every rank must call it); ``datamodule`` when there is no trainer."""
        raise NotImplementedError

    @property
    def scheduled(self) -> bool:
        """Whether training runs the evaluation (every_n_epochs or every_n_steps > 0)."""
        return self.every_n_epochs > 0 or self.every_n_steps > 0

    def _log(self, pl_module: L.LightningModule, results: dict[str, float]) -> None:
        for key, value in results.items():
            pl_module.log(key, float(value), sync_dist=False)  # identical on every rank already

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0 or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._log(pl_module, self.evaluate(trainer, pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps > 0 and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0 \
                and trainer.global_step != getattr(self, "_last_step", -1):
            self._last_step = trainer.global_step
            self._log(pl_module, self.evaluate(trainer, pl_module))


class SampleQuality(_Periodic):
    """FID, KID, IS and precision/recall of ``num_samples`` generated images (energy distance and
    MMD for points), logged as ``val/fid`` etc. with ``val/fid_num_samples``.

    Generation is split across ranks (rank r draws its share with seed ``seed + r``); features
    go into the torchmetrics metrics :class:`~lightning_diffusion.metrics.quality.FID` (constant-size
    statistics), ``KID``, ``PrecisionRecall`` and ``InceptionScoreFromLogits`` (at most
    ``max_features`` rows), which reduce over ranks in ``compute()``. The
    real side is ``real_split`` of the DataModule (every sample once over ranks), its statistics
    cached in ``$LD_DATA/stats/`` keyed by dataset fingerprint, split and extractor.

    Sampler: the model's fast ``preview_sample_options()`` by the preview-sampler rule
    (docs/architecture.md, Contracts, ``preview_sample_options``; :func:`~lightning_diffusion.callbacks.common.sampling_options`
    applies it); each record's ``sample_options`` are the ones used. ``lightning-diffusion evaluate`` passes
    ``preview_sampler=False``: the model's own default, the paper's sampler.
    """

    def __init__(self, num_samples: int = 1000, every_n_epochs: int = 1, every_n_steps: int = 0,
                 extractor: str = "inception-v3-compat", weights_path: str | None = None,
                 metrics: list[str] | None = None, real_split: str = "train", num_real: int | None = None,
                 batch_size: int = 250, seed: int = 0, max_features: int = 10000,
                 sample_options: dict[str, Any] | None = None, cache_stats: bool = True,
                 preview_sampler: bool = True):
        """
        Args:
            num_samples: generated samples per evaluation, over all ranks (papers: 50000 for FID).
            every_n_epochs: evaluate at the end of every this many validation epochs (0: never).
            every_n_steps: evaluate every this many optimizer steps (0: never).
            extractor: ``inception-v3-compat`` (papers' FID) or ``digits`` (embedded digits);
                ignored for 2-D points.
            weights_path: the extractor's weights file (see :mod:`lightning_diffusion.metrics.features`).
            metrics: any of ``fid``, ``kid``, ``is``, ``pr`` (default all).
            real_split: the DataModule split the generated samples are compared with.
            num_real: use at most this many real samples (None: the whole split).
            batch_size: samples generated per ``sample`` call on each rank.
            seed: base seed of the generated samples (rank r uses ``seed + r``): every evaluation
                draws the same noise, so successive numbers compare.
            max_features: feature vectors kept for KID, IS and precision/recall (FID uses all).
            sample_options: options for ``model.sample`` (e.g. ``{sampler: ddim, steps: 50}``).
            cache_stats: cache the real statistics on disk.
            preview_sampler: sample with the model's fast ``preview_sample_options()`` as the
                preview-sampler rule says (docs/architecture.md, Contracts, ``preview_sample_options``); False: the model's own default.
        """
        super().__init__(every_n_epochs, every_n_steps)
        metrics = list(IMAGE_METRICS) if metrics is None else list(metrics)
        unknown = sorted(set(metrics) - set(IMAGE_METRICS))
        if unknown:
            raise ValueError(f"SampleQuality: unknown metrics {unknown}; choose from {list(IMAGE_METRICS)}")
        if num_samples < 2:
            raise ValueError(f"SampleQuality: num_samples must be >= 2, got {num_samples}")
        if extractor not in EXTRACTORS:
            raise ValueError(f"SampleQuality.extractor={extractor!r}: unknown feature extractor; choose one of "
                             f"{sorted(EXTRACTORS)} (2-D points need none: they get energy distance and MMD)")
        check_split(real_split, "real_split")
        self.num_samples, self.extractor_name, self.weights_path = num_samples, extractor, weights_path
        self.metrics, self.real_split, self.num_real = metrics, real_split, num_real
        self.batch_size, self.seed, self.max_features = batch_size, seed, max_features
        self.sample_options = dict(sample_options or {})
        self.cache_stats, self.preview_sampler = cache_stats, preview_sampler
        self.last_sample_options: dict[str, Any] | None = None  # what the last evaluation sampled with
        self._extractor: FeatureExtractor | None = None
        self._metrics: dict[str, Metric] | None = None  # quality_metrics(): made on first use
        self._metrics_kind: tuple[bool, int] | None = None  # (points, feature dimension) they were made for
        self._real_ready = False  # whether their real side is filled

    # -- before training ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the sanity check and the first step of ``fit``, so that a run does not fail only
        at its first evaluation: the model must take ``sample_options``, and image data need the
        feature extractor's weights (loaded now: a missing file is named with the command that
        makes it)."""
        if stage != "fit" or not self.scheduled:
            return
        self._check_world(trainer)
        check_model_options(pl_module, "SampleQuality.sample_options", self.options(pl_module))
        shape = _data_shape(trainer, pl_module)
        if shape is not None and len(shape) == 3:  # images; points need no extractor
            self.check_extractor()

    def _check_world(self, trainer: L.Trainer | None) -> None:
        """Every rank generates its share of ``num_samples``: with fewer samples than ranks one would
        have none and could not take part in the reductions (the same test on every rank: no hang)."""
        world = rank_world(trainer)[1]
        if self.num_samples < world:
            raise ValueError(f"SampleQuality.num_samples={self.num_samples} is less than the {world} ranks: every "
                             f"rank generates a share; give num_samples >= {world}")

    def check_extractor(self) -> None:
        """Load the feature extractor; a missing or wrong weights file is a ValueError that names the
        callback's options, the file and the command that fetches or makes it."""
        try:
            self.extractor(torch.device("cpu"))
        except (FileNotFoundError, ValueError) as error:
            given = f"extractor={self.extractor_name!r}" + \
                (f", weights_path={self.weights_path!r}" if self.weights_path else "")
            raise ValueError(f"SampleQuality ({given}): {error}") from None

    # -- pieces -------------------------------------------------------------------------------
    def options(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """The options the samples are drawn with (:func:`~lightning_diffusion.callbacks.common.sampling_options`)."""
        return sampling_options(pl_module, self.sample_options, self.preview_sampler)

    def extractor(self, device: torch.device) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = get_extractor(self.extractor_name, self.weights_path)
        return self._extractor.to(device)

    def generate(self, trainer: L.Trainer | None, pl_module: L.LightningModule):
        """Yield this rank's generated batches; every rank runs the same number of ``sample`` calls
        (ceil(num_samples / world) samples each, extra ones dropped)."""
        rank, world = rank_world(trainer)
        share = quality.split_count(self.num_samples, rank, world)
        per_rank = math.ceil(self.num_samples / world)
        offset = quality.split_offset(self.num_samples, rank, world)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + rank)
        options = self.last_sample_options = self.options(pl_module)
        done = 0
        while done < per_rank:
            n = min(self.batch_size, per_rank - done)
            x = pl_module.sample(n, generator=generator, y=class_labels(pl_module, n, offset + done, pl_module.device),
                                 **options)
            keep = max(0, min(n, share - done))
            done += n
            if keep:
                yield x[:keep]

    def _real_path(self, trainer: L.Trainer | None, kind: str, rows: bool, datamodule: Any = None) -> Path | None:
        datamodule = find_datamodule(trainer, datamodule)
        if not self.cache_stats or datamodule is None or not hasattr(datamodule, "fingerprint"):
            return None
        dataset = Path(str(getattr(datamodule, "hparams", {}).get("dataset") or "data")).name
        key = f"{dataset}-{self.real_split}-{datamodule.fingerprint(self.real_split)}-{kind}-" \
              f"{self.num_real or 'all'}-{self.max_features if rows else 0}"  # 0: no feature rows in the file
        return data_cache_dir() / "stats" / f"{key}.pt"

    def quality_metrics(self, trainer: L.Trainer | None, pl_module: L.LightningModule, points: bool,
                        dim: int) -> dict[str, Metric]:
        """The torchmetrics metrics of this callback on ``pl_module``'s device, made on first use
        (again if the kind of data changes): ``fid`` always (its counts go into every record),
        ``kid``, ``pr`` and ``is`` as chosen, ``energy_distance`` and ``mmd`` for points. Their real
        side is kept across evaluations (``reset_real_features=False``); rows kept per rank are this
        rank's share of ``max_features``."""
        if self._metrics is None or self._metrics_kind != (points, dim):
            rank, world = rank_world(trainer)
            cap = quality.split_count(self.max_features, rank, world)
            made: dict[str, Metric] = {"fid": quality.FID(dim, reset_real_features=False)}
            if points:  # every generated point is kept (each rank's share of num_samples)
                made["energy_distance"] = quality.EnergyDistance(max_real_features=cap, reset_real_features=False)
                made["mmd"] = quality.MMD(max_real_features=cap, reset_real_features=False)
            else:
                if "kid" in self.metrics:
                    made["kid"] = quality.KID(max_features=cap, reset_real_features=False)
                if "pr" in self.metrics:
                    made["pr"] = quality.PrecisionRecall(max_features=cap, reset_real_features=False)
                if "is" in self.metrics:
                    made["is"] = quality.InceptionScoreFromLogits(max_logits=cap)
            self._metrics, self._metrics_kind, self._real_ready = made, (points, dim), False
        for metric in self._metrics.values():  # held by a callback, not the module: Lightning does not move it
            metric.to(pl_module.device)
        return self._metrics

    def _dim(self, pl_module: L.LightningModule, x: Tensor, points: bool) -> int:
        return x.shape[1] if points else self.extractor(pl_module.device).num_features

    def real_statistics(self, trainer: L.Trainer | None, pl_module: L.LightningModule, points: bool,
                        datamodule: Any = None, dim: int | None = None) -> dict[str, Metric]:
        """:meth:`quality_metrics` with their real side filled from the ``real_split`` (every rank
        its share), once per callback; cached on disk. ``dim``: of points (default 2)."""
        dim = dim or (2 if points else self.extractor(pl_module.device).num_features)
        metrics = self.quality_metrics(trainer, pl_module, points, dim)
        if self._real_ready:
            return metrics
        rows = [m for m in metrics.values() if isinstance(m, quality.FeatureRows)]
        kind = "points" if points else self.extractor_name
        path = self._real_path(trainer, kind, bool(rows), datamodule)
        rank, world = rank_world(trainer)
        # every rank reads the cache, or none does: a rank that computes enters collectives that a rank
        # reading the file would skip (with $LD_DATA per node, one node may have the file and another not)
        everywhere = MinMetric().to(pl_module.device)
        everywhere.update(torch.tensor(float(path is not None and path.is_file())))
        if everywhere.compute() == 1:
            stats, bank, _ = quality.load_stats(path)
            if rank == 0:  # the sides are summed over ranks: one rank holds the totals
                metrics["fid"].set_real_statistics(stats)
            start, share = quality.split_offset(len(bank), rank, world), quality.split_count(len(bank), rank, world)
            for metric in rows:  # concatenated in rank order: the cached order
                metric.set_real_features(bank[start:start + share])
            self._real_ready = True
            return metrics
        limit = None if self.num_real is None else quality.split_count(self.num_real, rank, world)
        seen = 0
        categories = getattr(find_datamodule(trainer, datamodule), "num_categories", None)
        for batch in eval_batches(trainer, self.real_split, datamodule, option="real_split"):
            x = batch_data(batch)
            if categories and not x.is_floating_point() and x.dim() == 4:
                x = images_from_categories(x, categories)  # categorical images: scored as the samples are
            if limit is not None:
                x = x[: max(0, limit - seen)]
            if x.shape[0] == 0:
                break
            seen += x.shape[0]
            features, _ = self._features(x.to(pl_module.device), points)
            for name, metric in metrics.items():
                if name != "is":
                    metric.update(features, real=True)
        if seen == 0:  # rows of shape [0, D]: a rank without real data still syncs 2-D rows
            for metric in rows:
                metric.update(torch.zeros(0, dim, device=pl_module.device), real=True)
        if path is not None:
            with ExitStack() as synced:  # the totals and rows of every rank
                for metric in (metrics["fid"], *rows[:1]):
                    synced.enter_context(metric.sync_context())
                stats = metrics["fid"].real_statistics()
                bank = rows[0].features(real=True).cpu() if rows else torch.zeros(0, dim)
            if rank == 0:
                quality.save_stats(path, stats, bank, {"split": self.real_split, "extractor": kind,
                                                       "count": stats["n"]})
        self._real_ready = True
        return metrics

    @torch.no_grad()
    def _features(self, x: Tensor, points: bool) -> tuple[Tensor, Tensor | None]:
        if points:
            return x.float(), None
        return self.extractor(x.device)(x)

    # -- the evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer | None, pl_module: L.LightningModule,
                 datamodule: Any = None) -> dict[str, float]:
        """Generate, extract, reduce over ranks and compute; returns ``{val/fid: ..., ...}`` (the
        same on every rank)."""
        start = time.perf_counter()
        world = rank_world(trainer)[1]
        self._check_world(trainer)
        metrics, points = None, None
        with evaluation_weights(trainer, pl_module) as weights:
            for x in self.generate(trainer, pl_module):
                if metrics is None:
                    points = x.ndim == 2
                    metrics = self.quality_metrics(trainer, pl_module, points, self._dim(pl_module, x, points))
                    for metric in metrics.values():
                        metric.reset()  # the generated side of the last evaluation
                features, logits = self._features(x, points)
                for name, metric in metrics.items():
                    if name == "is":
                        metric.update(logits)
                    else:
                        metric.update(features, real=False)
        if metrics is None:
            raise RuntimeError("SampleQuality: this rank generated nothing; num_samples < world size?")
        self.real_statistics(trainer, pl_module, points, datamodule, dim=self._metrics_kind[1])
        # every rank computes every metric in the same order: torchmetrics reduces the states in compute()
        fid = metrics["fid"]
        with fid.sync_context():
            num_samples, num_real = int(fid.fake_count), int(fid.real_count)
        results: dict[str, float] = {}
        if points:
            results["val/energy_distance"] = metrics["energy_distance"].compute().item()
            results["val/mmd"] = metrics["mmd"].compute().item()
        else:
            if "fid" in self.metrics:
                results["val/fid"] = fid.compute().item()
                results["val/fid_num_samples"] = float(num_samples)
            if "kid" in self.metrics:
                results["val/kid"], results["val/kid_std"] = (v.item() for v in metrics["kid"].compute())
            if "is" in self.metrics:
                results["val/is"], results["val/is_std"] = (v.item() for v in metrics["is"].compute())
            if "pr" in self.metrics:
                results["val/precision"], results["val/recall"] = (v.item() for v in metrics["pr"].compute())
        seconds = time.perf_counter() - start
        self.last_results = results
        step = trainer.global_step if trainer is not None else None
        if trainer is not None:
            _append_jsonl(trainer, "sample_quality", {
                "step": step, "epoch": trainer.current_epoch, **{k.split("/", 1)[1]: v for k, v in results.items()},
                "num_samples": num_samples,
                "num_real": num_real, "real_split": self.real_split,
                "extractor": "points" if points else self.extractor_name, "weights": weights,
                "sample_options": self.last_sample_options, "world_size": world, "seconds": seconds})
        described = ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in results.items())
        rank_zero_info(f"SampleQuality (step {step}, {num_samples} samples vs {num_real} real "
                       f"{self.real_split}, extractor {'points' if points else self.extractor_name}, {weights} "
                       f"weights, {describe_options(self.last_sample_options)}, {seconds:.0f} s): {described}")
        return results


class Likelihood(_Periodic):
    """``bits_per_dim`` over ``num_batches`` batches of ``split`` on every rank, averaged over all
    evaluated samples (sums and counts reduced over ranks), logged as ``val/bpd`` and
    ``val/bpd_<estimator>`` (elbo, iwae-K, vlb, ode-exact, ode-hutchinson-rademacher); with ``labels``,
    the bound on ``-log p(x | y)`` as ``val/bpd_given_y`` and ``val/bpd_<estimator>_given_y``."""

    def __init__(self, every_n_epochs: int = 1, every_n_steps: int = 0, num_batches: int = 4, split: str = "val",
                 bpd_options: dict[str, Any] | None = None, seed: int = 0, labels: bool = False):
        """
        Args:
            every_n_epochs: evaluate at the end of every this many validation epochs (0: never).
            every_n_steps: evaluate every this many optimizer steps (0: never).
            num_batches: batches per rank (the DataModule's batch size); None-like 0: the whole split.
            split: the DataModule split scored.
            bpd_options: options for ``model.bits_per_dim`` (e.g. ``{num_importance_samples: 100}``
                for a VAE, ``{steps: 100}`` for a DDPM's respaced bound).
            seed: seed of the estimator's noise (the same at every evaluation).
            labels: score each sample under its own label, ``bits_per_dim(x, y=y)``: the bound on
                ``-log p(x | y)`` of a class-conditional model (logged with the suffix ``_given_y``: it
                does not compare with ``-log p(x)``). False (default): ``-log p(x)``, which a
                class-conditional model with label dropout scores under its null label.
        """
        super().__init__(every_n_epochs, every_n_steps)
        check_split(split, "split")
        self.num_batches, self.split, self.seed, self.labels = num_batches, split, seed, bool(labels)
        self.bpd_options = dict(bpd_options or {})
        if self.labels and "y" in self.bpd_options:
            raise ValueError("Likelihood: bpd_options has 'y'; labels=True gives each sample its own label")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the sanity check and the first step of ``fit``: the model must take ``bpd_options`` (and
        labels, with ``labels``)."""
        if stage == "fit" and self.scheduled:
            check_model_options(pl_module, "Likelihood.bpd_options", self.bpd_options, check="check_bpd_options")
        if stage == "fit" and self.labels:
            self._check_labels(pl_module)

    @staticmethod
    def _check_labels(pl_module: L.LightningModule) -> None:
        if "y" not in _parameters(pl_module.bits_per_dim) or not getattr(pl_module, "class_conditional", True):
            raise ValueError(f"Likelihood.labels=True: {type(pl_module).__name__} is not class-conditional (its "
                             "bits_per_dim takes no labels y); leave labels out to score -log p(x)")

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer | None, pl_module: L.LightningModule,
                 datamodule: Any = None) -> dict[str, float]:
        start = time.perf_counter()
        if self.labels:
            self._check_labels(pl_module)
        rank, world = rank_world(trainer)
        batches = []
        for batch in eval_batches(trainer, self.split, datamodule):
            batches.append(batch)
            if self.num_batches and len(batches) >= self.num_batches:
                break
        # every rank makes the same number of bits_per_dim calls (a sharded model needs all ranks)
        most = MaxMetric().to(pl_module.device)
        most.update(torch.tensor(float(len(batches))))
        calls = int(most.compute())
        mean_bpd = quality.BitsPerDim().to(pl_module.device)
        with evaluation_weights(trainer, pl_module) as weights:
            supports_generator = "generator" in _parameters(pl_module.bits_per_dim)
            for i in range(calls):
                real = i < len(batches)
                if batches:
                    batch = batches[i] if real else batches[-1]
                    x = batch_data(batch).to(pl_module.device)
                    y = batch_labels(batch, x) if self.labels else None
                elif getattr(pl_module, "data_shape", None) is not None:  # no batch here: a stand-in call, so that
                    dtype = torch.long if getattr(pl_module, "num_categories", None) else None  # categorical data
                    x = torch.zeros(1, *pl_module.data_shape, device=pl_module.device, dtype=dtype)  # all ranks run
                    y = torch.zeros(1, dtype=torch.long, device=pl_module.device) if self.labels else None
                else:
                    continue
                options = dict(self.bpd_options)
                if y is not None:
                    options["y"] = y
                if supports_generator and "generator" not in options:
                    options["generator"] = torch.Generator(device=pl_module.device).manual_seed(
                        derived_seed(self.seed, rank, i))
                bpd = pl_module.bits_per_dim(x, **options)
                if real:
                    mean_bpd.update(bpd)
        mean = mean_bpd.compute().item()  # over every sample of every rank (torchmetrics sums the states)
        with mean_bpd.sync_context():
            n = mean_bpd.count.item()
        estimator = estimator_name(pl_module, **self.bpd_options)
        given = "_given_y" if self.labels else ""
        results = {f"val/bpd{given}": mean, f"val/bpd_{estimator}{given}": mean, "val/bpd_num_samples": float(n)}
        self.last_results = results
        seconds = time.perf_counter() - start
        if trainer is not None:
            _append_jsonl(trainer, "likelihood", {"step": trainer.global_step, "epoch": trainer.current_epoch,
                                                  "bpd": mean, "estimator": estimator, "num_samples": int(n),
                                                  "labels": self.labels,
                                                  "split": self.split, "weights": weights,
                                                  "bpd_options": self.bpd_options, "seconds": seconds})
        rank_zero_info(f"Likelihood: {self.split} {mean:.4f} bits/dim{' of x given its label' if self.labels else ''} "
                       f"({estimator}, {int(n)} samples, {weights} "
                       f"weights, {seconds:.0f} s)")
        return results


def _parameters(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
