"""A callback for tests/test_slurm.py: each rank writes what it saw of the cluster (with the SLURM node it
ran on and its network namespace), and a digest of its trained parameters, to ``OUT/rank<global
rank>.json`` when training ends. Used by class path
(``--trainer.callbacks+=slurm_ranks.RankReport``) with this folder on PYTHONPATH."""

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import torch


class RankReport(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer.strategy.cluster_environment
        digest = hashlib.sha256()
        for name, param in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().to(torch.float64).numpy().tobytes())
        report = {
            "environment": type(env).__name__,
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "num_nodes": trainer.num_nodes,
            "main_address": env.main_address,
            "main_port": env.main_port,
            "dist_world_size": torch.distributed.get_world_size(),
            "dist_rank": torch.distributed.get_rank(),
            "global_step": trainer.global_step,
            "log_dir": trainer.logger.log_dir if trainer.logger is not None else None,  # no collective
            "params": digest.hexdigest(),
            "pid": os.getpid(),
            "slurm_node": os.environ.get("SLURMD_NODENAME"),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "netns": os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
