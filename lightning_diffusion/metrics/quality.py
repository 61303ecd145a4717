"""Sample-quality metrics on features, distributed and with bounded state.

FID keeps only sufficient statistics (:class:`GaussianStats`: count, sum and sum of outer
products in float64): its state does not grow with the number of samples and sums exactly over
ranks. KID, IS and precision/recall need the features themselves: a :class:`FeatureBank` keeps
at most ``capacity`` of them. The formulas are torch-fidelity's (the reference implementation
papers use); we only feed them. Points (2-D toy data) get :func:`energy_distance` and :func:`mmd`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class GaussianStats:
    """``n``, ``sum x`` and ``sum x x^T`` of features (float64), enough for a mean and covariance."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).flatten(1)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> "GaussianStats":
        """Sum over the ranks of the default process group (every rank must call it)."""
        if _distributed():
            backend_device = _collective_device()
            packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.outer.flatten()])
            packed = packed.to(backend_device)
            torch.distributed.all_reduce(packed)
            packed = packed.cpu()
            d = self.sum.numel()
            self.n, self.sum, self.outer = int(round(packed[0].item())), packed[1:1 + d], packed[1 + d:].view(d, d)
        return self

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean and unbiased covariance (numpy.cov's ``ddof = 1``)."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 feature vectors, have {self.n}")
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean, cov

    def state_dict(self) -> dict:
        return {"n": self.n, "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_state(cls, state: dict) -> "GaussianStats":
        stats = cls(state["sum"].numel())
        stats.n, stats.sum, stats.outer = int(state["n"]), state["sum"].double(), state["outer"].double()
        return stats


def _collective_device() -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class FeatureBank:
    """The first ``capacity`` feature rows seen (float32, CPU): bounded memory."""

    def __init__(self, capacity: int):
        self.capacity, self.rows, self.count = capacity, [], 0

    def update(self, features: Tensor) -> None:
        room = self.capacity - self.count
        if room > 0:
            rows = features.detach().float().cpu().flatten(1)[:room]
            self.rows.append(rows)
            self.count += rows.shape[0]

    def tensor(self) -> Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0)

    def all_gather(self) -> Tensor:
        """The rows of every rank, rank 0's first (every rank must call it; sizes may differ)."""
        mine = self.tensor()
        if not _distributed():
            return mine
        device = _collective_device()
        world = torch.distributed.get_world_size()
        sizes = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(world)]
        torch.distributed.all_gather(sizes, torch.tensor(list(mine.shape) if mine.ndim == 2 else [0, 0],
                                                         device=device))
        width = max(int(s[1]) for s in sizes)
        most = max(int(s[0]) for s in sizes)
        padded = torch.zeros(most, width, device=device)
        if mine.numel():
            padded[: mine.shape[0]] = mine.to(device)
        gathered = [torch.zeros(most, width, device=device) for _ in range(world)]
        torch.distributed.all_gather(gathered, padded)
        return torch.cat([g[: int(s[0])].cpu() for g, s in zip(gathered, sizes)])


def frechet_distance(real: GaussianStats, fake: GaussianStats) -> float:
    """FID ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` (torch-fidelity's formula)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    (mu_r, cov_r), (mu_f, cov_f) = real.mean_cov(), fake.mean_cov()
    return fid_statistics_to_metric({"mu": mu_r.numpy(), "sigma": cov_r.numpy()},
                                    {"mu": mu_f.numpy(), "sigma": cov_f.numpy()}, verbose=False)[KEY_METRIC_FID]


def kernel_distance(real: Tensor, fake: Tensor, subset_size: int = 1000, subsets: int = 100,
                    seed: int = 2020) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel, mean and
    std over ``subsets`` random subsets of ``min(subset_size, N)`` (torch-fidelity's defaults)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, real.shape[0], fake.shape[0])
    out = kid_features_to_metric(real.double(), fake.double(), kid_subsets=subsets, kid_subset_size=size,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def inception_score(logits: Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS ``exp E_x KL(p(y|x) || p(y))`` over ``splits`` splits, mean and std (Salimans et al. 2016)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits.double(), splits=min(splits, logits.shape[0]), rng_seed=seed)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(real: Tensor, fake: Tensor, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k = ``neighborhood``."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    out = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=neighborhood, prc_batch_size=10000,
                                 save_cpu_ram=False, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


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


def save_stats(path: str | Path, stats: GaussianStats, bank: Tensor, logits: Tensor | None, meta: dict) -> None:
    """Cache real-data statistics (atomic write): tensors, ints and a ``meta`` dict of strings and
    numbers only, so that :func:`load_stats` reads them with ``weights_only=True``."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.part")
    torch.save({"stats": stats.state_dict(), "bank": bank, "logits": logits, "meta": meta}, tmp)
    os.replace(tmp, path)


def load_stats(path: str | Path) -> tuple[GaussianStats, Tensor, Tensor | None, dict]:
    """Read statistics cached by :func:`save_stats` with ``torch.load(weights_only=True)``.

    Raises ValueError naming the file, saying to delete it (the statistics are then recomputed), for
    a file that is no such cache: unreadable, holding objects a safe load refuses, or missing keys.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stats = GaussianStats.from_state(state["stats"])
        bank, logits, meta = state["bank"], state.get("logits"), state.get("meta", {})
        if not isinstance(bank, Tensor) or not (logits is None or isinstance(logits, Tensor)):
            raise TypeError("'bank' / 'logits' are not tensors")
    except Exception as e:  # noqa: BLE001 - any failure: the file is not a cache this version reads
        raise ValueError(f"cached real-data statistics {path} cannot be read safely ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); delete the file: the statistics are "
                         "recomputed from the data on the next run") from e
    return stats, bank, logits, meta


def split_count(total: int, rank: int, world: int) -> int:
    """Rank ``rank``'s share of ``total`` items split over ``world`` ranks (first ranks get one more)."""
    return total // world + (1 if rank < total % world else 0)


__all__ = ["GaussianStats", "FeatureBank", "frechet_distance", "kernel_distance", "inception_score",
           "precision_recall", "energy_distance", "mmd", "save_stats", "load_stats", "split_count"]
