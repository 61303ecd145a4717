"""Shard writers and the ShardDataModule."""

from lightning_diffusion.data.datamodule import ShardDataModule, ShardError
from lightning_diffusion.data.shards import ensure_embedded, load_index, verify_shards, write_shards

__all__ = ["ShardDataModule", "ShardError", "ensure_embedded", "load_index", "verify_shards", "write_shards"]
