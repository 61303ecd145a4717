"""end_process_group (lightning_diffusion/distributed.py) on 2 gloo processes: the ranks leave the
process group together and it is gone afterwards; a rank that never comes to the end is reported
by the others after the timeout instead of hanging them. The repeated multi-process runs are
``tests/test_teardown_repeat.py`` (``-m slow``)."""

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_diffusion.distributed import end_process_group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, ports: tuple[int, int], out) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dist.all_reduce(torch.ones(3))
    dist.broadcast_object_list(["the CLI's last collective"], src=0)  # then straight to the end
    end_process_group()
    out[f"ended{rank}"] = not dist.is_initialized()

    os.environ["MASTER_PORT"] = str(ports[1])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 0:
        try:
            end_process_group(timeout=0.5)
        except RuntimeError as error:
            out["error"] = str(error)
        dist.destroy_process_group()
    else:  # never comes to the end in time
        time.sleep(3)
        dist.destroy_process_group()


def test_ranks_end_together_and_a_missing_rank_is_named():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=((_free_port(), _free_port()), out), nprocs=2, join=True)
    assert out["ended0"] and out["ended1"]
    error = out.get("error", "")
    assert error.startswith("end_process_group: rank 0 of 2: the final barrier failed") and \
        "Ranks 1 failed to pass" in error, error
    end_process_group()  # without a process group: nothing to do
