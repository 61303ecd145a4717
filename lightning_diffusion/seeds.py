"""One derivation of the seeds of evaluation and per-rank noise from a run's seed."""

from __future__ import annotations


def derived_seed(seed: int, major: int, minor: int = 0) -> int:
    """``(seed * 1_000_003 + major * 7919 + minor) mod 2^63``: distinct, reproducible seeds for each
    (batch, rank) of a validation step, each (rank, call) of the Likelihood callback, each rank of an
    EBM's chains, from one seed; two primes keep neighbouring indices' seeds apart, and the modulus
    keeps any seed within ``torch.Generator.manual_seed``'s range."""
    return (seed * 1_000_003 + major * 7919 + minor) % 2**63
