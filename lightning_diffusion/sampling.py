"""What every sampler of a diffusion family returns: :class:`SamplerOutput` ``(x, nfe)``, one type for
the Gaussian samplers (``diffusion/samplers.py``: float samples, by custom the last denoised
estimate) and the discrete ones (``discrete/samplers.py``: int64 categories). It imports nothing of
ours and no Lightning, so both pure-math folders can use it.
"""

# No `from __future__ import annotations` here: the fields of the NamedTuple must be evaluated types,
# or the API reference (pdoc) cannot resolve them (it looks in the namedtuple's namespace).
from typing import NamedTuple

from torch import Tensor


class SamplerOutput(NamedTuple):
    """What every sampler returns."""

    x: Tensor  # samples of the requested shape: floats (Gaussian samplers) or int64 categories in [0, K) (discrete)
    nfe: int  # number of denoiser calls (network function evaluations)
