"""Shard writers, shard streams and the ShardDataModule."""

from lightning_diffusion.data.shards import ensure_embedded, load_index, verify_shards, write_shards
from lightning_diffusion.data.streams import ShardError

__all__ = ["ShardDataModule", "ShardError", "ensure_embedded", "load_index", "verify_shards", "write_shards"]


def __getattr__(name: str):
    # imported on first use: Lightning is heavy, and spawned DataLoader workers need only the streams
    if name == "ShardDataModule":
        from lightning_diffusion.data.datamodule import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
