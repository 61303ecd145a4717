"""The rank body of test_vqvae's DDP test: imports torch and the codebook only (no Lightning), so the
two spawned processes start in about a second each."""

import os

import torch
import torch.distributed as dist

from lightning_diffusion.nets.codebook import EMACodebook


def codebook_run(dead_code_steps: int, z: torch.Tensor, seed: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """``steps`` EMA updates of a 64-code codebook (initial vectors from seed 0) on ``z``: its state dict."""
    torch.manual_seed(0)
    book = EMACodebook(64, 3, dead_code_steps=dead_code_steps, seed=seed)
    for _ in range(steps):
        book.update(z, book.quantize(z))
    return {k: v.clone() for k, v in book.state_dict().items()}


def data() -> torch.Tensor:
    return torch.randn(64, 3, generator=torch.Generator().manual_seed(1)) * 0.5  # not the codebook's draw


def worker(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mine = data()[rank::world]
    # the restart generators differ per rank on purpose: rank 0's draws must win on both
    out[rank] = {"plain": codebook_run(0, mine, rank), "restarts": codebook_run(1, mine, rank)}
    dist.destroy_process_group()
