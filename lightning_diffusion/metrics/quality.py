"""Sample-quality metrics on features and the bits/dim mean, as ``torchmetrics.Metric`` subclasses.

Each metric's states declare how they reduce over processes (``dist_reduce_fx``), and
torchmetrics does the reduction when ``compute()`` runs under ``torch.distributed`` (gloo or NCCL):
the result is the same on every rank and equals the one-process result on the same data.

- :class:`FID` keeps sufficient statistics only (count, ``sum x`` and ``sum x x^T`` in float64,
  summed over ranks): its state does not grow with the number of samples.
- :class:`KID`, :class:`PrecisionRecall` and :class:`InceptionScoreFromLogits` need the rows
  themselves: list states concatenated over ranks (rank 0's rows first), at most ``max_features``
  rows per process and side (the first ones seen), so memory stays bounded.
- :class:`BitsPerDim` is the mean bits/dim over every sample of every rank (float64 sum and count).
- For points (2-D toy data): :class:`EnergyDistance` and :class:`MMD`.

The formulas are torch-fidelity's (the reference implementation papers use); the metrics only
feed them. They take features, not images: compute them with any extractor
(:mod:`lightning_diffusion.metrics.features`), once per batch, for every metric that needs them.
A LightningModule can hold them as attributes and ``self.log("val/fid", self.fid)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


def _rows(features: Tensor, name: str, what: str = "features") -> Tensor:
    """``features`` as ``[N, D]`` (detached): a batch of rows; anything else is a ValueError."""
    if features.ndim < 2:
        raise ValueError(f"{name}.update: expected {what} of shape [N, D], got shape {tuple(features.shape)}")
    return features.detach().flatten(1)


def _check_cap(owner: str, option: str, cap: int | None) -> None:
    """A row cap is a non-negative int or None; anything else is a ValueError naming the option."""
    if cap is not None and (not isinstance(cap, int) or cap < 0):
        raise ValueError(f"{owner}: {option} must be a non-negative int or None, got {cap!r}")


def _keep(state: list[Tensor], rows: Tensor, cap: int | None) -> None:
    """Append ``rows`` to the list state, cut to the ``cap`` rows it may hold (None: all). An empty
    ``[0, D]`` slice is appended too: every rank then syncs 2-D rows."""
    if cap is not None:
        rows = rows[: max(0, cap - sum(r.shape[0] for r in state))]
    state.append(rows)


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A list state as one ``[N, D]`` tensor (``[0, 0]`` when it holds nothing)."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, 0)
    rows = dim_zero_cat(state)
    return rows if rows.ndim == 2 else rows.reshape(0, 0)  # a rank without rows syncs a 1-D empty tensor


class FID(Metric):
    r"""Fréchet distance of two Gaussians fitted to features (FID on Inception features,
    Heusel et al. 2017): ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))``, with the
    unbiased covariances (``ddof = 1``) and torch-fidelity's trace of the matrix square root (the
    eigenvalues of ``S_r S_f``).

    States, per side (``real_*``, ``fake_*``), all ``dist_reduce_fx="sum"``: the count (int64),
    ``sum x`` ``[D]`` and ``sum x x^T`` ``[D, D]`` in float64. Their size does not depend on how
    many samples were seen.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_features: int, reset_real_features: bool = True, **kwargs: Any):
        """
        Args:
            num_features: the feature dimension D.
            reset_real_features: False: ``reset()`` keeps the real side (torchmetrics' convention),
                so fixed real statistics serve every evaluation.
            **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).
        """
        super().__init__(**kwargs)
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"FID: num_features must be a positive int, got {num_features!r}")
        self.num_features, self.reset_real_features = num_features, reset_real_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(num_features, num_features, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def update(self, features: Tensor, real: bool) -> None:
        """Add feature rows ``[N, D]`` to the real (``real=True``) or generated side."""
        f = _rows(features, "FID").to(self.real_sum.device, torch.float64)
        if f.shape[1] != self.num_features:
            raise ValueError(f"FID.update: features have {f.shape[1]} dimensions, the metric {self.num_features}")
        side = "real" if real else "fake"
        # out of place: the states may be inference tensors (created under Lightning's inference mode)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + f.shape[0])
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)

    def mean_cov(self, real: bool) -> tuple[Tensor, Tensor]:
        """Mean and unbiased covariance (numpy.cov's ``ddof = 1``) of one side, from this process's
        states (inside ``sync_context()``: of every rank's)."""
        side = "real" if real else "fake"
        n = int(getattr(self, f"{side}_count"))
        if n < 2:
            raise ValueError(f"FID needs at least 2 {side} feature vectors, have {n}")
        mean = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> Tensor:
        """The FID (float64 scalar)."""
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        (mu_r, cov_r), (mu_f, cov_f) = self.mean_cov(real=True), self.mean_cov(real=False)
        value = fid_statistics_to_metric({"mu": mu_r.cpu().numpy(), "sigma": cov_r.cpu().numpy()},
                                         {"mu": mu_f.cpu().numpy(), "sigma": cov_f.cpu().numpy()},
                                         verbose=False)[KEY_METRIC_FID]
        return torch.tensor(value, dtype=torch.float64)

    def real_statistics(self) -> dict[str, Tensor | int]:
        """The real side as ``{"n", "sum", "outer"}`` (CPU), e.g. to cache; of every rank inside
        ``sync_context()``."""
        return {"n": int(self.real_count), "sum": self.real_sum.cpu(), "outer": self.real_outer.cpu()}

    def set_real_statistics(self, stats: dict[str, Tensor | int]) -> None:
        """Replace this process's real side by ``stats`` (:meth:`real_statistics`' form). Under
        ``torch.distributed`` the sides are summed over ranks: give the statistics to one rank."""
        total, outer = torch.as_tensor(stats["sum"]), torch.as_tensor(stats["outer"])
        if total.shape != (self.num_features,) or outer.shape != (self.num_features, self.num_features):
            raise ValueError(f"FID.set_real_statistics: statistics of shapes {tuple(total.shape)} and "
                             f"{tuple(outer.shape)} do not fit {self.num_features}-dimensional features")
        device = self.real_sum.device
        self.real_count = torch.tensor(int(stats["n"]), dtype=torch.long, device=device)
        self.real_sum, self.real_outer = total.to(device, torch.float64), outer.to(device, torch.float64)
        self._computed = None

    def reset(self) -> None:
        """Clear the states (the generated side only where ``reset_real_features=False``)."""
        kept = {name: getattr(self, name) for name in ("real_count", "real_sum", "real_outer")}
        super().reset()
        if not self.reset_real_features:
            for name, value in kept.items():
                setattr(self, name, value)


class FeatureRows(Metric):
    """Feature rows of the real and the generated side as list states (``dist_reduce_fx="cat"``):
    at most ``max_real`` / ``max_fake`` rows per process (the first ones seen; None: all)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, max_real: int | None, max_fake: int | None, reset_real_features: bool, **kwargs: Any):
        """
        Args:
            max_real: real rows kept per process (the first ones seen); None: all.
            max_fake: generated rows kept per process; None: all.
            reset_real_features: False: ``reset()`` keeps the real rows.
            **kwargs: torchmetrics ``Metric`` options.
        """
        super().__init__(**kwargs)
        for cap in (max_real, max_fake):
            _check_cap(type(self).__name__, "max_features", cap)
        self.max_rows = {True: max_real, False: max_fake}
        self.reset_real_features = reset_real_features
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        """Keep feature rows ``[N, D]`` of the real (``real=True``) or generated side, up to the cap."""
        _keep(self.real_features if real else self.fake_features, _rows(features, type(self).__name__).float(),
              self.max_rows[real])

    def features(self, real: bool) -> Tensor:
        """One side's rows ``[N, D]`` (this process's; every rank's, rank 0's first, inside
        ``sync_context()`` or ``compute()``)."""
        return _cat(self.real_features if real else self.fake_features)

    def set_real_features(self, rows: Tensor) -> None:
        """Replace this process's real rows by ``rows`` ``[N, D]`` (e.g. its share of cached rows)."""
        self.real_features = [_rows(rows, type(self).__name__).float().to(self.device)]
        self._computed = None

    def _both(self) -> tuple[Tensor, Tensor]:
        real, fake = self.features(True), self.features(False)
        if real.shape[0] == 0 or fake.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} needs feature rows of both sides, has {real.shape[0]} real and "
                             f"{fake.shape[0]} generated")
        return real.cpu(), fake.cpu()

    def reset(self) -> None:
        """Clear the states (the generated side only where ``reset_real_features=False``)."""
        kept = list(self.real_features)  # Metric.reset clears the list in place
        super().reset()
        if not self.reset_real_features:
            self.real_features = kept


class KID(FeatureRows):
    """Kernel Inception distance (Binkowski et al. 2018): the unbiased MMD^2 with the cubic
    polynomial kernel ``k(a, b) = (a.b / D + 1)^3``, mean and std over ``subsets`` random subsets
    of ``min(subset_size, N_real, N_fake)`` rows of each side (torch-fidelity's formula, defaults and
    seed).

    States: the rows of each side, list states with ``dist_reduce_fx="cat"``.
    """

    higher_is_better = False

    def __init__(self, subsets: int = 100, subset_size: int = 1000, seed: int = 2020,
                 max_features: int | None = None, reset_real_features: bool = True, **kwargs: Any):
        """
        Args:
            subsets: number of random subsets the MMD is averaged over.
            subset_size: rows per subset (fewer where a side has fewer).
            seed: seed of the subsets (numpy's RandomState, as torch-fidelity).
            max_features: rows kept per process and side (the first ones seen); None: all.
            reset_real_features: False: ``reset()`` keeps the real rows.
            **kwargs: torchmetrics ``Metric`` options.
        """
        super().__init__(max_features, max_features, reset_real_features, **kwargs)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(KID mean, KID std)`` over the subsets (float64 scalars)."""
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

        real, fake = self._both()
        size = min(self.subset_size, real.shape[0], fake.shape[0])
        out = kid_features_to_metric(real.double(), fake.double(), kid_subsets=self.subsets, kid_subset_size=size,
                                     kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                     kid_kernel_poly_coef0=1, rng_seed=self.seed, verbose=False)
        return (torch.tensor(out[KEY_METRIC_KID_MEAN], dtype=torch.float64),
                torch.tensor(out[KEY_METRIC_KID_STD], dtype=torch.float64))


class PrecisionRecall(FeatureRows):
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of
    generated rows inside the real manifold (the union of balls reaching each real row's k-th
    nearest real neighbour), recall the fraction of real rows inside the generated manifold, with
    k = ``neighborhood`` (torch-fidelity's formula).

    States: the rows of each side, list states with ``dist_reduce_fx="cat"``.
    """

    higher_is_better = True

    def __init__(self, neighborhood: int = 3, max_features: int | None = None, reset_real_features: bool = True,
                 **kwargs: Any):
        """
        Args:
            neighborhood: k of the k-nearest-neighbour balls.
            max_features: rows kept per process and side (the first ones seen); None: all.
            reset_real_features: False: ``reset()`` keeps the real rows.
            **kwargs: torchmetrics ``Metric`` options.
        """
        super().__init__(max_features, max_features, reset_real_features, **kwargs)
        self.neighborhood = neighborhood

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(precision, recall)``, fractions in [0, 1] (float64 scalars)."""
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

        real, fake = self._both()
        out = prc_features_to_metric(fake, real, prc_neighborhood=self.neighborhood, prc_batch_size=10000,
                                     save_cpu_ram=False, verbose=False)
        return (torch.tensor(out[KEY_METRIC_PRECISION], dtype=torch.float64),
                torch.tensor(out[KEY_METRIC_RECALL], dtype=torch.float64))


class EnergyDistance(FeatureRows):
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` of generated and real points over all
    pairs (:func:`energy_distance`). States: the rows of each side (``dist_reduce_fx="cat"``)."""

    higher_is_better = False

    def __init__(self, max_real_features: int | None = None, max_fake_features: int | None = None,
                 reset_real_features: bool = True, **kwargs: Any):
        """
        Args:
            max_real_features: real rows kept per process (the first ones seen); None: all.
            max_fake_features: generated rows kept per process; None: all.
            reset_real_features: False: ``reset()`` keeps the real rows.
            **kwargs: torchmetrics ``Metric`` options.
        """
        super().__init__(max_real_features, max_fake_features, reset_real_features, **kwargs)

    def compute(self) -> Tensor:
        """The energy distance (float64 scalar)."""
        real, fake = self._both()
        return torch.tensor(energy_distance(fake, real), dtype=torch.float64)


class MMD(EnergyDistance):
    """Squared MMD of generated and real points with a sum of Gaussian kernels (:func:`mmd`).
    States: the rows of each side (``dist_reduce_fx="cat"``)."""

    def compute(self) -> Tensor:
        """The squared MMD (float64 scalar)."""
        real, fake = self._both()
        return torch.tensor(mmd(fake, real), dtype=torch.float64)


class InceptionScoreFromLogits(Metric):
    """Inception score ``exp E_x KL(p(y|x) || p(y))`` (Salimans et al. 2016) of a classifier's
    logits, mean and std over ``splits`` splits of the shuffled rows (torch-fidelity's formula and
    seed). Unlike torchmetrics' ``InceptionScore`` it takes logits, not images.

    State: the logits, a list state with ``dist_reduce_fx="cat"``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, splits: int = 10, seed: int = 2020, max_logits: int | None = None, **kwargs: Any):
        """
        Args:
            splits: number of splits (fewer where there are fewer rows).
            seed: seed of the shuffle (numpy's RandomState, as torch-fidelity).
            max_logits: rows kept per process (the first ones seen); None: all.
            **kwargs: torchmetrics ``Metric`` options.
        """
        super().__init__(**kwargs)
        _check_cap("InceptionScoreFromLogits", "max_logits", max_logits)
        self.splits, self.seed, self.max_logits = splits, seed, max_logits
        self.add_state("logits", [], dist_reduce_fx="cat")

    def update(self, logits: Tensor) -> None:
        """Keep classifier logits ``[N, K]`` of generated samples, up to the cap."""
        _keep(self.logits, _rows(logits, "InceptionScoreFromLogits", "logits").float(), self.max_logits)

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(IS mean, IS std)`` over the splits (float64 scalars)."""
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

        logits = _cat(self.logits).cpu()
        if logits.shape[0] == 0:
            raise ValueError("InceptionScoreFromLogits needs logits of at least one sample, has none")
        out = isc_features_to_metric(logits.double(), splits=min(self.splits, logits.shape[0]), rng_seed=self.seed)
        return (torch.tensor(out[KEY_METRIC_ISC_MEAN], dtype=torch.float64),
                torch.tensor(out[KEY_METRIC_ISC_STD], dtype=torch.float64))


class BitsPerDim(Metric):
    """The mean of per-sample bits/dim over every sample of every rank (NaN when there is none).

    States: ``total`` (the sum of the values) and ``count``, float64, ``dist_reduce_fx="sum"``, so
    the mean weights every sample equally however they are split over ranks.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any):
        """
        Args:
            **kwargs: torchmetrics ``Metric`` options.
        """
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, bits_per_dim: Tensor) -> None:
        """Add per-sample values (any shape, e.g. ``model.bits_per_dim(x)``'s ``[B]``)."""
        values = bits_per_dim.detach().to(self.total.device, torch.float64)
        self.total = self.total + values.sum()
        self.count = self.count + values.numel()

    def compute(self) -> Tensor:
        """The mean bits/dim (float64 scalar)."""
        return self.total / self.count


# -- points ----------------------------------------------------------------------------------------
def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` over all pairs (V-statistic, float64)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def mmd(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = (0.05, 0.2, 1.0)) -> float:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels
    ``k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))`` (V-statistic, float64)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).item()


# -- the real-data cache ---------------------------------------------------------------------------
def save_stats(path: str | Path, stats: dict[str, Tensor | int], bank: Tensor, meta: dict) -> None:
    """Cache real-data statistics (atomic write): :meth:`FID.real_statistics`, the real feature rows
    and a ``meta`` dict of strings and numbers only, so that :func:`load_stats` reads them with
    ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")
    torch.save({"stats": {"n": int(stats["n"]), "sum": stats["sum"], "outer": stats["outer"]}, "bank": bank,
                "meta": meta}, tmp)
    os.replace(tmp, path)


def load_stats(path: str | Path) -> tuple[dict[str, Tensor | int], Tensor, dict]:
    """Read statistics cached by :func:`save_stats` with ``torch.load(weights_only=True)``:
    ``(stats for FID.set_real_statistics, feature rows, meta)``.

    Raises ValueError naming the file, saying to delete it (the statistics are then recomputed), for
    a file that is no such cache: unreadable, holding objects a safe load refuses, or missing keys.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stats = {"n": int(state["stats"]["n"]), "sum": state["stats"]["sum"].double(),
                 "outer": state["stats"]["outer"].double()}
        bank, meta = state["bank"], state.get("meta", {})
        if not isinstance(bank, Tensor):
            raise TypeError("'bank' is not a tensor")
    except Exception as e:  # noqa: BLE001 - any failure: the file is not a cache this version reads
        raise ValueError(f"cached real-data statistics {path} cannot be read safely ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); delete the file: the statistics are "
                         "recomputed from the data on the next run") from e
    return stats, bank, meta


def split_count(total: int, rank: int, world: int) -> int:
    """Rank ``rank``'s share of ``total`` items split over ``world`` ranks (first ranks get one more)."""
    return total // world + (1 if rank < total % world else 0)


def split_offset(total: int, rank: int, world: int) -> int:
    """Where rank ``rank``'s share of ``total`` items starts (the shares of :func:`split_count`, in rank order)."""
    return sum(split_count(total, r, world) for r in range(rank))


__all__ = ["FID", "FeatureRows", "KID", "PrecisionRecall", "InceptionScoreFromLogits", "BitsPerDim",
           "EnergyDistance", "MMD", "energy_distance", "mmd", "save_stats", "load_stats", "split_count",
           "split_offset"]
