"""ODE likelihood under DDP with 2 processes (gloo): an adaptive solve on each rank's own data runs a
different number of evaluations per rank, so it must use the unwrapped module (no collectives inside);
the fixed grid runs the same number everywhere. The gathered bits/dim equal the single-process value."""

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_diffusion import ScoreSDE
from lightning_diffusion.distributed import end_process_group
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle


class OracleWithParameter(MixtureOracle):
    """The exact eps-net plus one (unused in the output) parameter, so DDP can wrap it."""

    def __init__(self, mix, process):
        super().__init__(mix, process, "eps")
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, t, y=None):
        return super().forward(x, t, y) * self.scale


def _model():
    mix = GaussianMixture.circle()
    model = ScoreSDE(nn.Identity(), data_shape=(2,))
    model.net = OracleWithParameter(mix, model.sde)
    x, _ = mix.sample(64, torch.Generator().manual_seed(0))
    return model, x.float()


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, x = _model()
    wrapped = DistributedDataParallel(model)  # what Lightning trains; evaluation goes to .module
    mine = x[rank::world]
    results = {}
    for mode, steps in (("adaptive", None), ("fixed", 20)):
        bpd = wrapped.module.bits_per_dim(mine, divergence="exact", steps=steps)
        nfe = torch.tensor([wrapped.module.last_likelihood_nfe])
        nfes = [torch.zeros_like(nfe) for _ in range(world)]
        dist.all_gather(nfes, nfe)
        total = torch.stack([bpd.sum(), torch.tensor(float(len(bpd)))])
        dist.all_reduce(total)  # count-weighted mean over ranks
        results[mode] = ((total[0] / total[1]).item(), [int(n) for n in nfes])
    if rank == 0:
        out.update(results)
    end_process_group()


def test_ode_likelihood_two_processes_equals_single_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    model, x = _model()
    for mode, steps in (("adaptive", None), ("fixed", 20)):
        single = model.bits_per_dim(x, divergence="exact", steps=steps).mean().item()
        distributed, nfes = out[mode]
        assert math.isclose(distributed, single, abs_tol=2e-4), (mode, distributed, single)
        if mode == "fixed":
            assert nfes == [80, 80]  # the same on every rank: safe for a sharded model
    assert out["adaptive"][0] < 1.0  # near the mixture's true NLL (0.28 bits/dim), not a broken run
