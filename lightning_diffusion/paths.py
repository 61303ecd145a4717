"""Where the package keeps what it makes once and reuses (embedded datasets, feature-extractor
weights, real-data statistics), and how a file is fingerprinted. Imports nothing of ours and no
Lightning, so ``data/``, ``metrics/`` and ``callbacks/`` share it without importing each other.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def data_cache_dir() -> Path:
    """Where embedded datasets are cached: ``$LD_DATA``, default ``~/.cache/lightning_diffusion``."""
    return Path(os.environ.get("LD_DATA", Path.home() / ".cache" / "lightning_diffusion"))


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
