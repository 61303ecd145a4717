"""The one option mechanism (``lightning_diffusion.options``): a callable's options are checked from its
signature, and a sampler registered in one entry is taken by ``sample`` and the checks with its defaults."""

from __future__ import annotations

import functools
from typing import Literal

import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_diffusion import DDPM, EBM, MLP, DiscreteDiffusion
from lightning_diffusion.diffusion import samplers
from lightning_diffusion.discrete import samplers as discrete_samplers
from lightning_diffusion.errors import OptionError
from lightning_diffusion.models import ebm
from lightning_diffusion.nets.categorical import SequenceTransformer
from lightning_diffusion.nets.energy import EnergyMLP
from lightning_diffusion.options import Fraction, Positive, PositiveInt, check_call


def _decorated(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return method(*args, **kwargs)
    return wrapper


@_decorated  # the check reads through functools.wraps, as through @full_precision
def estimate(x: torch.Tensor, *, mode: Literal["fast", "exact"] = "fast", order: Literal[1, 2, 3] = 2,
             antithetic: bool = False, draws: PositiveInt = 1, tolerance: Positive | None = None,
             share: Fraction = 0.5, scale: float = 1.0, generator: torch.Generator | None = None) -> None:
    """A likelihood estimator's signature: its options are its keyword parameters."""


def refusal(**options) -> str:
    with pytest.raises(OptionError) as caught:
        check_call(estimate, options, "estimate", skip=("x", "generator"))
    return str(caught.value)


def test_options_are_checked_from_the_signature():
    assert refusal(drwas=4) == ("drwas=4: estimate has no option 'drwas' (did you mean draws?); its options are "
                                "mode, order, antithetic, draws, tolerance, share, scale")
    assert refusal(generator=None).startswith("generator=None: estimate has no option 'generator'")  # an argument
    assert refusal(mode="slow") == "mode='slow': must be one of ['fast', 'exact']"
    assert refusal(order=True) == "order=True: must be one of [1, 2, 3]"  # True == 1, but is no order
    assert refusal(antithetic=1) == "antithetic=1: must be true or false"
    for draws in (0, True, 2.0, None):
        assert refusal(draws=draws) == f"draws={draws!r}: must be an integer >= 1"
    assert refusal(tolerance=0) == "tolerance=0: must be a number > 0 or None"
    assert refusal(tolerance="1e-5") == ("tolerance='1e-5': must be a number > 0 or None; write it as a number "
                                         "(YAML reads 1e-5 as text: write 1.0e-5)")
    assert refusal(share=0) == "share=0: must be a number in (0, 1]"
    assert refusal(share=1.5) == "share=1.5: must be a number in (0, 1]"
    assert refusal(scale=False) == "scale=False: must be a number"
    accepted = dict(mode="exact", order=3, antithetic=True, draws=4, tolerance=None, share=1, scale=-2)
    assert check_call(estimate, accepted, "estimate", skip=("x", "generator")) == {}
    assert check_call(estimate, {"draws": 2, "eta": 0.5}, "estimate", rest=True) == {"eta": 0.5}  # for **options


def test_the_annotations_stay_type_hints_that_jsonargparse_reads():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(estimate.__wrapped__, skip={"x", "generator"})
    parsed = parser.parse_args(["--draws=3", "--mode=exact", "--share=0.25"])
    assert (parsed.draws, parsed.mode, parsed.share) == (3, "exact", 0.25)
    with pytest.raises(Exception, match="mode"):
        parser.parse_args(["--mode=slow"])


def first_order(denoise_fn: samplers.Denoiser, process, shape: tuple[int, ...], *, steps: int | None = None,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                clip: tuple[float, float] | None = None, callback: samplers.Callback | None = None,
                damping: Positive = 1.0) -> samplers.SamplerOutput:
    """A new sampler: DDIM's deterministic update, ``x0_hat`` scaled by ``damping``, on its registered grid."""
    den = samplers.CountedDenoiser(denoise_fn, process, clip, callback)
    times = samplers.sampler_grid("first_order", process, steps)
    x = process.prior_sampling(tuple(shape), generator=generator, device=device)
    for t, s in zip(times[:-1], times[1:]):
        step = samplers.transition(process, t, s)
        x0 = damping * den(x, t)
        x = step.alpha_s * x0 + (step.sigma_s / step.sigma_t) * (x - step.alpha_t * x0)
    return samplers.SamplerOutput(den(x, times[-1]), den.nfe)


def test_a_sampler_registered_in_one_entry_is_taken_with_its_defaults(monkeypatch):
    monkeypatch.setitem(samplers.SAMPLERS, "first_order", samplers.SamplerEntry(first_order, 7, samplers.uniform_grid))
    model = DDPM(MLP(in_channels=2, hidden=8, num_layers=1), timesteps=10, data_shape=(2,))
    model.check_sample_options(sampler="first_order", damping=0.5)
    x = model.sample(3, sampler="first_order", generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 2) and torch.isfinite(x).all()
    assert model.last_sample_nfe == 7  # its default: 7 grid times, 6 updates and the last x0_hat
    model.sample(3, sampler="first_order", steps=4)
    assert model.last_sample_nfe == 4
    for options, message in (({"damping": 0}, "damping=0: must be a number > 0"),
                             ({"dampin": 2.0}, "dampin=2.0: the first_order sampler has no option 'dampin' (did you mean damping?); "
                                               "its options are steps, sampler, guidance_scale, clip, precision, damping"),
                             ({"steps": 11}, "steps=11: steps must be an integer in [2, 10]")):
        with pytest.raises(OptionError) as caught:
            model.check_sample_options(sampler="first_order", **options)
        assert str(caught.value).startswith(message), caught.value
    monkeypatch.setitem(samplers.SAMPLERS, "first_order", samplers.SamplerEntry(first_order, 12, samplers.uniform_grid))
    with pytest.raises(OptionError, match="the default of 12 steps is out of range"):  # the entry's default, checked
        model.check_sample_options(sampler="first_order")


def test_discrete_and_ebm_samplers_are_registry_entries_too(monkeypatch):
    def argmax_once(denoiser, process, shape, *, steps=None, temperature=1.0, generator=None, device=None,
                    keep: bool = False):
        """One net call from the prior, the most likely category everywhere."""
        x = process.sample_prior(shape, generator, device)
        t = torch.ones(shape[0], device=x.device)
        return discrete_samplers.SamplerOutput(denoiser(x, t).argmax(-1), 1)

    monkeypatch.setitem(discrete_samplers.SAMPLERS, "argmax_once",
                        discrete_samplers.SamplerEntry(argmax_once, lambda process: 1, lambda process: None))
    net = SequenceTransformer(num_categories=5, max_length=6, dim=16, depth=1, heads=2, dropout=0.0)
    model = DiscreteDiffusion(net, num_categories=5, data_shape=(6,), timesteps=10)
    out = model.sample(2, sampler="argmax_once", keep=True)
    assert out.shape == (2, 6) and model.last_sample_nfe == 1
    with pytest.raises(OptionError, match="keep=1: must be true or false"):
        model.check_sample_options(sampler="argmax_once", keep=1)
    with pytest.raises(OptionError, match="the sundae sampler has no option 'keep'"):  # the chosen sampler's options
        model.check_sample_options(sampler="sundae", keep=True)
    with pytest.raises(OptionError, match="update_fraction=0.3: the ancestral sampler has no option 'update_fraction'"):
        model.sample(2, sampler="ancestral", update_fraction=0.3)  # sundae's: no longer silently ignored
    model.sample(2, sampler="sundae", steps=2, update_fraction=0.3)

    calls = []

    def frozen(model, energy, x, steps, step_size, generator):
        calls.append(steps)
        return ebm.CHAIN_SAMPLERS["langevin"].run(model, energy, x, 0, step_size, generator)

    monkeypatch.setitem(ebm.CHAIN_SAMPLERS, "frozen", ebm.ChainSampler(frozen, "step_size"))
    energy_model = EBM(EnergyMLP(2, 16, 1), data_shape=(2,))
    energy_model.fit_base(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
    assert energy_model.sample(4, sampler="frozen", steps=3).shape == (4, 2) and calls == [3]
    with pytest.raises(OptionError, match=r"unknown EBM sampler 'frozn'; choose one of \['decoupled', 'frozen'"):
        energy_model.sample(4, sampler="frozn")
