"""The codebook of a VQ-VAE: K code vectors kept by exponential moving averages of the encoder
outputs assigned to them (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019), nearest-code
quantization, dead-code restarts, and the perplexity of a code usage. An ``nn.Module`` of buffers
(no parameters: gradients do not move it) that needs only torch and, under a process group,
``torch.distributed``: the statistics of every rank are all-reduced so all ranks hold one codebook.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn


def perplexity(counts: Tensor) -> Tensor:
    """``exp(H(p))`` of the code usage ``p = counts / sum(counts)`` (van den Oord et al.; Razavi et
    al.): K for a uniform usage of K codes, 1 when one code takes everything; 0-d float64."""
    p = counts.double() / counts.double().sum().clamp(min=1e-300)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-300))).sum())


def _distributed() -> bool:
    """True inside a process group of more than one rank (DDP, FSDP2, a raw torch.distributed run)."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


class EMACodebook(nn.Module):
    """K code vectors of dimension D, moved by exponential moving averages of their assigned encoder
    outputs (van den Oord et al. 2017, appendix A.1; Razavi et al. 2019: decay 0.99), with
    Laplace-smoothed counts and dead-code restarts.

    Update, per training step with assignments ``c_n`` of the encoder outputs ``z_n``:
    ``N_k <- d N_k + (1 - d) n_k``, ``m_k <- d m_k + (1 - d) sum_{c_n = k} z_n``,
    ``e_k = m_k / Ñ_k`` with ``Ñ_k = (N_k + eps) / (N + K eps) N`` (Laplace smoothing, ``N = sum N_k``).
    On fixed assignments its fixed point is the k-means centroid of each code's vectors (up to eps).
    ``n_k`` and the sums are all-reduced over ranks first, so every rank applies the same update.

    Dead codes: a code assigned no vector (on any rank) for ``dead_code_steps`` consecutive training
    steps is restarted at a random encoder output of the step's batch (Dhariwal et al. 2020's
    Jukebox restarts; ``N_k = 1``, ``m_k = e_k``); rank 0 draws them with its own generator and
    broadcasts them, so ranks agree. The buffers (codebook, ``N``, ``m``, steps unused, restarts)
    are in the state dict; the generator's state goes into the checkpoint through the model.

    Args:
        num_codes: K.
        code_dim: D.
        decay: the EMA decay d (Razavi et al.: 0.99).
        epsilon: Laplace smoothing of the counts (1e-5).
        dead_code_steps: restart a code unused for this many training steps; 0: never.
        seed: seed of the restart generator.
    """

    def __init__(self, num_codes: int, code_dim: int, decay: float = 0.99, epsilon: float = 1e-5,
                 dead_code_steps: int = 100, seed: int = 0) -> None:
        super().__init__()
        self.num_codes, self.code_dim, self.decay, self.epsilon = num_codes, code_dim, decay, epsilon
        self.dead_code_steps = dead_code_steps
        codebook = torch.randn(num_codes, code_dim)
        self.register_buffer("codebook", codebook)
        # N_k starts at 1 with m_k = e_k, so a code no vector has reached keeps its vector (N_k = 0
        # would make e_k = m_k / eps explode on the first update)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))
        self.generator = torch.Generator().manual_seed(seed)

    def quantize(self, z: Tensor) -> Tensor:
        """Nearest code of each row of ``z`` [N, D] (squared Euclidean distance): int64 [N]."""
        distances = (z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t().to(z.dtype)
                     + self.codebook.pow(2).sum(1).to(z.dtype))
        return distances.argmin(1)

    def lookup(self, codes: Tensor) -> Tensor:
        """Code vectors of int64 ``codes`` [*S] -> [*S, D]."""
        if codes.dtype != torch.long or (codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes)):
            raise ValueError(f"VQVAE: codes must be int64 in [0, {self.num_codes}) (num_codes), got "
                             f"{codes.dtype} in [{codes.min().item() if codes.numel() else '-'}, "
                             f"{codes.max().item() if codes.numel() else '-'}]")
        return self.codebook[codes]

    @torch.no_grad()
    def update(self, z: Tensor, codes: Tensor) -> Tensor:
        """One EMA step on the encoder outputs ``z`` [N, D] assigned ``codes`` [N]; returns the counts
        ``n_k`` [K] (float, summed over ranks) of this step."""
        z = z.detach().float()
        one_hot = torch.nn.functional.one_hot(codes, self.num_codes).float()
        counts, sums = one_hot.sum(0), one_hot.t() @ z
        if _distributed():
            stats = torch.cat([counts[:, None], sums], 1)
            torch_dist.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_codes * self.epsilon) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_steps > 0:
            self._restart(z, self.steps_unused >= self.dead_code_steps)
        return counts

    def _restart(self, z: Tensor, dead: Tensor) -> None:
        """Move the ``dead`` codes to random rows of ``z`` (rank 0's, broadcast)."""
        index = dead.nonzero().squeeze(1)
        if index.numel() == 0:
            return
        picks = torch.randint(z.shape[0], (index.numel(),), generator=self.generator).to(z.device)
        fresh = z[picks].clone()
        if _distributed():
            torch_dist.broadcast(fresh, src=0)
        self.codebook[index] = fresh.to(self.codebook.dtype)
        self.embed_sum[index] = fresh.to(self.embed_sum.dtype)
        self.cluster_size[index] = 1.0
        self.steps_unused[index] = 0
        self.restarts.add_(index.numel())
