"""The energy-based model ``p(x) = exp(-E(x)) / Z``, trained by contrastive divergence, NCE,
denoising score matching or diffusion recovery likelihood, sampled with true Langevin/MALA, scored
with a named ``log Z``.

The energy net is any ``nn.Module`` mapping ``x [B, ...]`` to ``E [B]`` (nats):
:class:`~lightning_diffusion.nets.energy.EnergyMLP`, :class:`~lightning_diffusion.nets.energy.EnergyConvNet`
or :class:`~lightning_diffusion.nets.energy.ScalarEnergy` around another net. The MCMC is
:mod:`lightning_diffusion.mcmc` (no Lightning there).

Objectives (``objective``):

- ``cd``: maximum likelihood, whose gradient is ``E_data[grad E] - E_model[grad E]``, with the
  model expectation from persistent chains (a replay buffer of ``buffer_size`` states, each draw
  re-initialised from the base with probability ``reinit_prob``; Du & Mordatch 2019), ``mcmc_steps``
  MCMC steps per update, plus ``energy_l2 * (E(x+)^2 + E(x-)^2)`` to keep the energies near 0.
  ``short_run=True``: chains from the base every step, no buffer (Nijkamp et al. 2019).
- ``nce``: noise-contrastive estimation (Gutmann & Hyvärinen 2010) against the Gaussian base
  ``q`` with ``noise_ratio`` noise samples per data sample; ``log p(x) = -E(x) - c`` with ``c`` a
  learned parameter (``normalizer``), which estimates ``log Z`` at the optimum.
- ``dsm``: denoising score matching (Vincent 2011) of the score ``-grad E``:
  ``sigma^2 ||-grad E(x + sigma eps) + eps / sigma||^2 / 2`` at noise levels ``dsm_sigmas``.
- ``recovery``: diffusion recovery likelihood (Gao et al. 2021; :mod:`lightning_diffusion.mcmc.recovery`):
  a ladder of ``recovery_levels`` noise levels, one energy per level ``E(y, t) = net(y, t) / s_t^2``
  (the net conditioned on the level; ``s_t`` the level's Langevin step, the reference code's
  parameterization, so the net's output stays O(1) at every level), trained by maximum likelihood of
  each level's conditional EBM ``p(x_t | x_{t+1})``, with ``recovery_steps`` short-run Langevin steps
  from ``x_{t+1}`` as the negatives. ``sample`` walks the ladder down from N(0, I);
  ``bits_per_dim`` is the ladder's variational bound with each conditional's log normaliser by AIS
  (``recovery-ais``, :meth:`EBM.recovery_nll`).

The *base* is the Gaussian fitted to the first training batch (over every rank): a full covariance
for points, per-dimension for images. Fresh chains start from it, NCE contrasts with it, and AIS
anneals from it. It is in the state dict, so a resumed or reloaded model has the same one.
"""

from __future__ import annotations

import math
import functools
import logging
from typing import Annotated, Any, Callable, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_diffusion.models.base import GenerativeModel, full_precision
from lightning_diffusion.models.rng_state import gather_per_rank
from lightning_diffusion.modes import evaluating
from lightning_diffusion.errors import OptionError
from lightning_diffusion.options import Bound, Choices, Positive, PositiveInt, check_number, refuse_unknown, registered
from lightning_diffusion.seeds import derived_seed

_log = logging.getLogger(__name__)

Objective = Literal["cd", "nce", "dsm", "recovery"]
#: the options of ``objective="recovery"`` alone, and the options it refuses away from their defaults
RECOVERY_OPTIONS = ("recovery_levels", "recovery_steps", "recovery_step_factor", "recovery_loss_rescale",
                    "recovery_sample_step_factor")
NOT_RECOVERY_OPTIONS = ("mcmc_steps", "buffer_size", "reinit_prob", "short_run", "energy_l2", "noise_ratio",
                        "dsm_sigmas", "whiten_chains", "base_tilt")
#: ``bits_per_dim(estimator=...)`` of ``objective="recovery"``: the ladder's bound (the default) and the
#: lowest level's marginal energy with a log Z from the base (the old estimate)
RECOVERY_ESTIMATOR, LEVEL0_ESTIMATOR = "recovery-ais", "level0"
#: the AIS of :meth:`EBM.recovery_nll` when ``bits_per_dim`` leaves them None (ours: enough for the
#: exact Gaussian ladder of the tests to 0.01 nats; on a trained digits model the upper levels converge
#: at these settings and level 0 does not: README, Diffusion recovery likelihood)
RECOVERY_AIS_DEFAULTS = {"recovery_ais_chains": 16, "recovery_ais_steps": 100, "recovery_ais_step_size": 0.5}
#: the model samplers (the training negatives' MCMC) that the recovery objective takes
RECOVERY_CHAIN_SAMPLERS = ("langevin", "mala")
#: where ``sample`` starts its chains
SampleInit = Annotated[Literal["base", "buffer"], Choices("'base' (fresh chains from the base) or 'buffer' "
                                                          "(replay-buffer states, objective cd after training)")]


class ChainSampler(NamedTuple):
    """An MCMC sampler of the EBM (:data:`CHAIN_SAMPLERS`): ``run(model, energy, x, steps, step_size,
    generator, **options)`` and the model option that sets its step, named when its chains diverge;
    ``options``: the :meth:`EBM.sample` options that are this sampler's own (passed to ``run`` when
    given; another sampler refuses them); ``chains``: whether it runs chains from given states (the CD
    negatives, ``init="buffer"``) rather than drawing its own start from the base."""

    run: Callable[..., Any]
    step_option: str
    options: tuple[str, ...] = ()
    chains: bool = True


def _langevin(model: EBM, energy: Callable, x: Tensor, steps: int, step_size: float,
              generator: torch.Generator | None, metropolis: bool = False):
    from lightning_diffusion import mcmc

    return mcmc.langevin(energy, x, step_size=step_size, steps=steps, metropolis=metropolis,
                         grad_clip=model.chain_grad_clip, generator=generator)


def _decoupled(model: EBM, energy: Callable, x: Tensor, steps: int, step_size: float,
               generator: torch.Generator | None):
    """IGEBM/JEM's update with the model's ``decoupled_step_size`` and ``decoupled_noise_std``."""
    from lightning_diffusion import mcmc

    return mcmc.decoupled_langevin(energy, x, step_size=model.decoupled_step_size, noise_std=model.decoupled_noise_std,
                                   steps=steps, grad_clip=model.chain_grad_clip, generator=generator)


def _smc(model: EBM, energy: Callable, x: Tensor, steps: int, step_size: float, generator: torch.Generator | None,
         islands: int = 8, ess_threshold: float = 0.5, moves_per_temperature: int = 1, particles_per_sample: int = 4):
    """Sequential Monte Carlo from the base along AIS's path (:func:`~lightning_diffusion.mcmc.smc`)
    with ``steps`` temperatures and ``particles_per_sample * len(x)`` particles, then ``len(x)``
    unweighted samples by one systematic resampling of the final weights (each particle's count
    within 1 of ``len(x)`` times its weight); ``x`` gives only the number (the particles start at the
    base's own draws). Why more particles than samples: a mode whose share of the path's bridges is
    small midway (a narrow mode: its share of ``q^(1-b) exp(-b E)`` scales like its width^(D (1 - b)))
    gets its final weight from the descendants of the few particles it held there, so the SMC
    estimate of its weight varies more than n independent draws' would (README, Energy-based models).
    ``model.last_sample_diagnostics``: log Z, its stderr, the ESS and resampling history."""
    from lightning_diffusion import mcmc

    size = max(2, math.ceil(particles_per_sample * x.shape[0] / islands))
    out = mcmc.smc(energy, model._chain_base(), islands * size, step_size=step_size, betas=steps,
                   moves_per_beta=moves_per_temperature, ess_threshold=ess_threshold, islands=islands,
                   grad_clip=model.chain_grad_clip, generator=generator)
    pick = mcmc.systematic_resample(out.log_weights[None], generator, num=x.shape[0])[0]
    pick = pick[torch.randperm(pick.numel(), generator=generator, device=pick.device)]
    model.last_sample_diagnostics = {"sampler": "smc", "log_z": out.log_z + model._chain_log_det(), "stderr": out.stderr,
                                     "ess": out.ess, "resampled": out.resampled, "acceptance": out.acceptance,
                                     "step_size": out.step_size, "particles": islands * size}
    return mcmc.MCMCResult(out.x[pick], torch.full((x.shape[0],), float("nan")), float(out.acceptance.mean()), float("nan"),
                           out.nfe)


def _parallel_tempering(model: EBM, energy: Callable, x: Tensor, steps: int, step_size: float,
                        generator: torch.Generator | None, replicas: int = 8, max_temperature: float = 20.0):
    """Parallel tempering (:func:`~lightning_diffusion.mcmc.parallel_tempering`): ``replicas``
    temperatures ``geometric_ladder(1, max_temperature)``, every replica of chain b starting at
    ``x[b]``, ``steps`` rounds of a MALA move and a swap; returns the T = 1 replica. The swap rates
    per neighbour pair are kept in ``model.last_sample_diagnostics`` (:meth:`EBM.sample` logs them)."""
    from lightning_diffusion import mcmc

    ladder = mcmc.geometric_ladder(1.0, max_temperature, replicas)
    out = mcmc.parallel_tempering(energy, x.expand(replicas, *x.shape).contiguous(), ladder, step_size=step_size,
                                  steps=steps, grad_clip=model.chain_grad_clip, generator=generator)
    model.last_sample_diagnostics = {"sampler": "parallel_tempering", "temperatures": ladder,
                                     "swap_rate": out.swap_rate, "acceptance": out.acceptance}
    return mcmc.MCMCResult(out.x, out.energy, float(out.acceptance[0]), out.grad_norm, out.nfe)


def _recovery(model: EBM, energy: Callable, x: Tensor, steps: int, step_size: float,
              generator: torch.Generator | None):
    """The recovery ladder walked down (:func:`~lightning_diffusion.mcmc.recovery_sample`): ``x_L ~
    N(0, I)``, then at each level ``t = L - 1, ..., 0`` ``steps`` Langevin (the model's ``sampler``
    ``mala``: MALA) steps on the conditional EBM from the level above's sample; ``step_size`` is the
    factor ``b`` of the steps ``s_t``. ``x`` gives only the number and shape."""
    from lightning_diffusion import mcmc

    top = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mcmc.recovery_sample(model.level_energy, top, model.ladder, step_factor=step_size, steps=steps,
                                metropolis=model.sampler == "mala", grad_clip=model.chain_grad_clip,
                                generator=generator)


def _summary(diagnostics: dict[str, Any]) -> str:
    """One line of a sampler's diagnostics: numbers rounded, tensors as lists (SMC's history summed up)."""
    if diagnostics["sampler"] == "smc":
        return (f"log Z {diagnostics['log_z']:.4f} +- {diagnostics['stderr']:.4f} nats, "
                f"{int(diagnostics['resampled'].sum())} island resamplings over {len(diagnostics['ess'])} temperatures, "
                f"final acceptance {float(diagnostics['acceptance'][-1]):.2f}")
    return (f"temperatures {[round(t, 3) for t in diagnostics['temperatures']]}, swap rates "
            f"{[round(r, 3) for r in diagnostics['swap_rate'].tolist()]}, acceptance "
            f"{[round(a, 3) for a in diagnostics['acceptance'].tolist()]}")


#: the EBM's samplers by name: a new sampler is one entry
CHAIN_SAMPLERS: dict[str, ChainSampler] = {
    "langevin": ChainSampler(_langevin, "step_size"),
    "mala": ChainSampler(functools.partial(_langevin, metropolis=True), "step_size"),
    "decoupled": ChainSampler(_decoupled, "decoupled_step_size"),
    "smc": ChainSampler(_smc, "step_size", ("islands", "ess_threshold", "moves_per_temperature", "particles_per_sample"),
                        chains=False),
    "parallel_tempering": ChainSampler(_parallel_tempering, "step_size", ("replicas", "max_temperature")),
    "recovery": ChainSampler(_recovery, "recovery_step_factor", chains=False),
}
#: the default of :meth:`EBM.sample`: draws the model's distribution with its mode weights (a chain
#: from the base keeps the base's mode weights: README, Energy-based models); ``recovery``'s default
#: is its ladder (:data:`RECOVERY_SAMPLE_SAMPLER`)
DEFAULT_SAMPLE_SAMPLER = "smc"
RECOVERY_SAMPLE_SAMPLER = "recovery"
#: :meth:`EBM.sample`'s options that every sampler takes
SAMPLE_COMMON_OPTIONS = ("steps", "init", "sampler", "step_size")
#: the registry's names, as the CLI's type of ``EBM(sampler=...)``
SamplerName = Literal[tuple(CHAIN_SAMPLERS)]


class LogNormalizer(nn.Module):
    """The learned ``c`` of NCE's ``log p(x) = -E(x) - c`` (nats): a module of its own, so that FSDP2
    shards it (and reduces its gradient) like every other parameter."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(1))

    def forward(self) -> Tensor:
        return self.value[0]


class EBM(GenerativeModel):
    """Energy-based model over any data shape (see the module docstring).

    Logs in training: ``train/loss``, ``train/energy_gap`` (``mean E(data) - mean E(negatives)``:
    near 0 at equilibrium, ever more negative when the chains fall behind), and for ``cd``
    ``train/chain_grad_norm``, ``train/acceptance`` (MALA), ``train/buffer_age`` (mean MCMC steps a
    buffer state has run since it was drawn from the base); for ``nce`` ``train/log_normalizer``; for
    ``recovery`` ``train/chain_grad_norm``, ``train/acceptance`` and ``train/energy_gap`` (nats, the
    conditional energies' part ``E(y, t)``, over the batch's mixed levels).
    A divergence guard stops a run whose energies leave ``[-max_energy, max_energy]`` or turn
    non-finite, or whose MCMC chain states turn non-finite (then naming ``step_size``), naming the
    step and the last checkpoint, before the parameters take the step. With ``recovery`` it bounds
    the net's outputs ``net(y, t) = s_t^2 E(y, t)`` (the energies in nats grow as 1 / s_t^2) and names
    ``recovery_step_factor``.
    """

    #: the energy net for each kind of data, named by :meth:`~lightning_diffusion.models.base.GenerativeModel.check_net`
    data_nets = {"images": ("EnergyConvNet", "EnergyConvNet"), "points": ("EnergyMLP", "EnergyMLP")}
    #: what the last :meth:`sample` learnt besides the samples (``smc``: log Z, stderr, ESS history;
    #: ``parallel_tempering``: swap rates); None after any other sampler
    last_sample_diagnostics: dict[str, Any] | None = None
    #: ``objective="recovery"``: the last ``bits_per_dim``'s bound: ``bpd`` (the batch mean) and its
    #: ``stderr_bpd`` over the batch (with the top level's log Z error), and :meth:`recovery_nll`'s diagnostics
    last_bound: dict[str, Any] | None = None

    def __init__(
        self,
        net: nn.Module,
        objective: Objective = "cd",
        sampler: SamplerName = "langevin",
        step_size: float = 0.01,
        mcmc_steps: int = 40,
        chain_grad_clip: float | None = None,
        decoupled_step_size: float = 10.0,
        decoupled_noise_std: float = 0.005,
        buffer_size: int = 10000,
        reinit_prob: float = 0.05,
        short_run: bool = False,
        energy_l2: float = 0.1,
        noise_ratio: float = 1.0,
        dsm_sigmas: tuple[float, ...] = (0.1,),
        sample_steps: int = 500,
        ais_chains: int = 256,
        ais_steps: int = 1000,
        ais_step_size: float | None = None,
        quadrature_points: int = 401,
        max_energy: float = 1e4,
        whiten_chains: bool = False,
        base_tilt: bool = False,
        recovery_levels: int = 6,
        recovery_steps: int = 30,
        recovery_step_factor: float = 0.01414213562373095,
        recovery_loss_rescale: bool = True,
        recovery_sample_step_factor: float | None = None,
        spectral_norm: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            net: the energy net, ``net(x [B, ...]) -> E [B]`` in nats (with ``base_tilt``, the
                energy's correction to the base's).
            objective: ``cd`` (persistent contrastive divergence), ``nce``, ``dsm`` or ``recovery``
                (diffusion recovery likelihood; the net must take the level, ``net(y, t)``).
            sampler: MCMC of the CD negatives and of :meth:`sample`: ``langevin`` (ULA,
                ``x <- x - (eps^2/2) grad E + eps xi``), ``mala`` (the same, Metropolis-adjusted: exact
                for exp(-E) at any eps) or ``decoupled`` (IGEBM/JEM's ``x - step grad E + noise xi``:
                NOT a sampler of exp(-E), its temperature is ``noise^2 / (2 step)``; for comparison).
            step_size: ``eps`` of Langevin/MALA, the noise std per step in data units.
            mcmc_steps: MCMC steps per CD update (K).
            chain_grad_clip: clip each chain's ||grad E|| to this (None: off).
            decoupled_step_size: the gradient step of ``sampler="decoupled"`` (IGEBM: 10).
            decoupled_noise_std: the noise std of ``sampler="decoupled"`` (IGEBM: 0.005).
            buffer_size: states in each rank's replay buffer (``cd``).
            reinit_prob: probability that a drawn buffer state restarts from the base (IGEBM: 0.05).
            short_run: ``cd`` with chains from the base every update and no buffer.
            energy_l2: weight of the L2 penalty on the net's energies of data and negatives (``cd``; with
                ``base_tilt`` on the net's part only, the base's energy is no parameter's).
            noise_ratio: noise samples per data sample (``nce``), nu.
            dsm_sigmas: noise levels of ``dsm`` (data units); each sample draws one uniformly.
            sample_steps: MCMC steps of :meth:`sample` from fresh chains.
            ais_chains: AIS chains for ``log Z`` of data that are not 2-D points.
            ais_steps: intermediate distributions of the AIS path.
            ais_step_size: MALA step of the AIS transitions; None: ``step_size`` (``recovery``: the
                lowest level's Langevin step ``s_0 / a_1`` in data units).
            quadrature_points: grid points per axis of the quadrature ``log Z`` (2-D points).
            max_energy: the divergence guard's bound on ``|E|`` (nats).
            whiten_chains: run every chain (CD negatives, :meth:`sample`, AIS) in the base's whitened
                coordinates ``z = L^-1 (x - mean)``: Langevin/MALA preconditioned by the base's
                covariance, which leaves exp(-E) invariant (a constant preconditioner) and lets one
                step size serve pixels whose spread differs by 100x (the digits' always-black
                corners against their strokes). ``step_size`` is then in units of the base's std.
            base_tilt: ``E(x) = net(x) - log q(x)`` with ``q`` the base Gaussian fitted to the data:
                the model is q tilted by ``exp(-net)``, so its tails are the base's Gaussian tails
                wherever the net stays bounded, instead of whatever the net does where no chain (and
                no data) ever goes, which an exact NLL over the whole space counts.
            recovery_levels: ``recovery``: levels L of the noise ladder (Gao et al.: 6); the net gets
                the level index ``t`` in 0 .. L - 1 as its time.
            recovery_steps: ``recovery``: Langevin steps K per level, in training and in :meth:`sample`
                (Gao et al.: 30).
            recovery_step_factor: ``recovery``: ``b`` of the Langevin steps ``s_t = b sigma_{t+1}
                sqrt(sigmabar_t / sigmabar_0)`` (data units; Gao et al.: ``b^2 = 2e-4``). It also fixes
                the energy's scale ``E = net / s_t^2``, so a resume may not change it.
            recovery_loss_rescale: ``recovery``: weight level t's term by ``sigma_1 / sigma_{t+1}`` on
                the net's scale, ``s_t^2 sigma_1 / sigma_{t+1} (E(y+, t) - E(y-, t))`` (the reference
                code's loss); False: the plain sum of the levels' conditional log-likelihoods, whose
                gradient is dominated by the lowest level (weights 1 / s_t^2).
            recovery_sample_step_factor: ``recovery``: ``b`` of :meth:`sample`'s ladder (its default
                ``step_size``; data units as ``recovery_step_factor``); None: ``recovery_step_factor``. The
                chains of training are short-run ones; at sampling a larger step at the same NFE mixes
                further (digits, 30 CPU minutes at b = 0.05: digits-CNN FID on the validation split 35.0 /
                32.4 at b = 0.05, 29.8 / 29.0 at 0.07, 25.5 / 27.6 at 0.1, two seeds; see
                ``configs/ebm_recovery_digits.yaml``).
            spectral_norm: put ``torch.nn.utils.parametrizations.spectral_norm`` on every Linear and
                Conv layer of the net (Miyato et al. 2018; Gao et al. use it); refused for a net built
                with its own ``spectral_norm``.
            **kwargs: :class:`~lightning_diffusion.models.base.GenerativeModel`'s (``lr``, ``warmup_steps``, ...).
        """
        super().__init__(**kwargs)
        self.save_hyperparameters_except("net")
        if objective not in ("cd", "nce", "dsm", "recovery"):
            raise ValueError(f"EBM: objective={objective!r}; choose cd, nce, dsm or recovery")
        if sampler not in CHAIN_SAMPLERS:
            raise ValueError(f"EBM: sampler={sampler!r}; choose one of {list(CHAIN_SAMPLERS)}")
        if not CHAIN_SAMPLERS[sampler].chains and objective == "cd":
            raise ValueError(f"EBM: sampler={sampler!r} draws its own start from the base, so it cannot run the CD "
                             "negatives' chains; choose langevin, mala, decoupled or parallel_tempering (sample() "
                             "uses smc by default whatever this option says)")
        for name, value, least, integer in (("step_size", step_size, 0, False), ("mcmc_steps", mcmc_steps, 1, True),
                                            ("buffer_size", buffer_size, 1, True), ("noise_ratio", noise_ratio, 0, False),
                                            ("sample_steps", sample_steps, 1, True), ("ais_chains", ais_chains, 2, True),
                                            ("ais_steps", ais_steps, 1, True), ("quadrature_points", quadrature_points, 3, True),
                                            ("max_energy", max_energy, 0, False)):
            check_number(f"EBM.{name}", value, least=least, integer=integer, above=not integer)
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"EBM: reinit_prob must be in [0, 1], got {reinit_prob}")
        if not dsm_sigmas or min(dsm_sigmas) <= 0:
            raise ValueError(f"EBM: dsm_sigmas must be positive noise levels, got {dsm_sigmas}")
        self._check_recovery_options(net, objective, sampler, locals())
        if spectral_norm:
            from torch.nn.utils import parametrize

            from lightning_diffusion.nets.energy import apply_spectral_norm

            if any(parametrize.is_parametrized(m) for m in net.modules()):
                raise ValueError("EBM: spectral_norm=True, but the net already has parametrized layers (built with its "
                                 "own spectral_norm=True?): set one of the two")
            apply_spectral_norm(net)
        self.net = net
        self.objective, self.sampler = objective, sampler
        self.step_size, self.mcmc_steps, self.chain_grad_clip = step_size, mcmc_steps, chain_grad_clip
        self.decoupled_step_size, self.decoupled_noise_std = decoupled_step_size, decoupled_noise_std
        self.buffer_size, self.reinit_prob, self.short_run = buffer_size, reinit_prob, short_run
        self.energy_l2, self.noise_ratio, self.dsm_sigmas = energy_l2, noise_ratio, tuple(dsm_sigmas)
        self.sample_steps, self.max_energy = sample_steps, max_energy
        self.ais_chains, self.ais_steps, self.ais_step_size = ais_chains, ais_steps, ais_step_size
        self.quadrature_points, self.whiten_chains, self.base_tilt = quadrature_points, whiten_chains, base_tilt
        self.recovery_levels, self.recovery_steps = recovery_levels, recovery_steps
        self.recovery_step_factor, self.recovery_loss_rescale = recovery_step_factor, recovery_loss_rescale
        self.recovery_sample_step_factor = recovery_sample_step_factor
        self.ladder = None  #: ``recovery``: the :class:`~lightning_diffusion.mcmc.RecoveryLadder` (float64, CPU)
        if objective == "recovery":
            from lightning_diffusion.mcmc import recovery_ladder

            self.ladder = recovery_ladder(recovery_levels)
            # the energy's scale and the loss weights are the ladder's: a resume may not change them
            self.resume_fixed_hparams = ("data_shape", "objective", "recovery_levels", "recovery_step_factor")
        if objective == "nce":
            self.normalizer = LogNormalizer()  #: c of log p = -E - c (nats)
        shape = self.require_data_shape()
        dim = math.prod(shape)
        # the base Gaussian: fitted once, on the first training batch (base_fitted flips to 1)
        self.register_buffer("base_mean", torch.zeros(shape))
        self.register_buffer("base_scale", torch.eye(dim) if self._full_base else torch.ones(shape))
        self.register_buffer("base_fitted", torch.zeros((), dtype=torch.long))
        self._replay: dict[str, Tensor] | None = None  # {"x": [N, ...], "age": [N]}: per rank, in the checkpoint
        self._chain_rng: torch.Generator | None = None  # the training chains' noise: per rank, in the checkpoint
        self._pending_replay: list[dict[str, Any]] | None = None
        self._log_z_cache: tuple[Any, tuple[float, float, str]] | None = None

    @staticmethod
    def _check_recovery_options(net: nn.Module, objective: str, sampler: str, given: dict[str, Any]) -> None:
        """Refuse the options that make no sense with the objective: the ``recovery_*`` options away from
        their defaults under another objective; under ``recovery`` the other objectives' options away
        from theirs, a training sampler other than Langevin/MALA and a net that takes no level."""
        import inspect

        defaults = {k: p.default for k, p in inspect.signature(EBM.__init__).parameters.items()}
        if objective != "recovery":
            for name in RECOVERY_OPTIONS:
                if given[name] != defaults[name]:
                    raise ValueError(f"EBM: {name}={given[name]!r} is an option of objective='recovery'; this model's "
                                     f"objective is {objective!r}: leave {name} out")
            return
        for name in NOT_RECOVERY_OPTIONS:
            if given[name] != defaults[name] and not (name == "dsm_sigmas" and tuple(given[name]) == defaults[name]):
                raise ValueError(f"EBM: {name}={given[name]!r} has no meaning for objective='recovery' (its negatives "
                                 "are recovery_steps Langevin steps from the noisier level, with no buffer, base "
                                 f"tilt or whitening): leave {name} out")
        if sampler not in RECOVERY_CHAIN_SAMPLERS:
            raise ValueError(f"EBM: sampler={sampler!r} cannot run objective='recovery''s negatives, which are chains on "
                             f"each level's conditional EBM: choose one of {list(RECOVERY_CHAIN_SAMPLERS)}")
        for name, value, least, integer in (("recovery_levels", given["recovery_levels"], 2, True),
                                            ("recovery_steps", given["recovery_steps"], 1, True),
                                            ("recovery_step_factor", given["recovery_step_factor"], 0, False),
                                            ("recovery_sample_step_factor", given["recovery_sample_step_factor"], 0,
                                             False)):
            if value is not None:
                check_number(f"EBM.{name}", value, least=least, integer=integer, above=not integer)
        if given["recovery_levels"] > 501:
            raise ValueError(f"EBM: recovery_levels={given['recovery_levels']} is more than the 501 levels that the "
                             "ladder's 1000-step chain can be cut into")
        if getattr(net, "time_conditioned", True) is False:
            raise ValueError(f"EBM: objective='recovery' conditions the energy on the noise level, net(y, t), but the "
                             f"net {type(net).__name__} was built without a time input: build it with time_embed_dim "
                             "(e.g. 64), or use an EnergyHead around a UNet or MLP")

    # -- the base Gaussian ---------------------------------------------------------------------
    def base(self):
        """The :class:`~lightning_diffusion.mcmc.GaussianBase` fitted to the data."""
        from lightning_diffusion.mcmc import GaussianBase

        if self._full_base:
            return GaussianBase(self.base_mean, scale_tril=self.base_scale)
        return GaussianBase(self.base_mean, std=self.base_scale)

    @property
    def _full_base(self) -> bool:
        """Points get a full covariance (``base_scale`` is its Cholesky factor [D, D]); images a
        per-dimension std (``base_scale`` shaped like a sample)."""
        return len(self.require_data_shape()) == 1

    def fit_base(self, x: Tensor) -> None:
        """Fit the base Gaussian to ``x`` [N, ...] (moments; full covariance for points)."""
        from lightning_diffusion.mcmc import gaussian_base

        fitted = gaussian_base(x.detach().float(), full=self._full_base)
        self.base_mean.copy_(fitted.mean.reshape(self.base_mean.shape))
        self.base_scale.copy_((fitted.scale_tril if fitted.scale_tril is not None else fitted.std).reshape(self.base_scale.shape))
        self.base_fitted.fill_(1)

    # -- energies --------------------------------------------------------------------------------
    def energy(self, x: Tensor) -> Tensor:
        """``E(x)`` [B] (nats) of data ``x`` [B, ...]; with ``recovery`` the lowest level's marginal
        energy ``E(a_1 x, 0)`` (:meth:`level_energy`), the model's density of ``x_0`` (the data with
        noise of std sigmabar_0 = 0.01) up to its normaliser, which the training never sees."""
        if self.ladder is not None:
            level = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self.level_energy(float(self.ladder.y_scale[0]) * x, level)
        return self._tilt(self.net(x), x)

    def level_energy(self, y: Tensor, level: Tensor) -> Tensor:
        """``recovery``: ``E(y, t) = net(y, t) / s_t^2`` [B] (nats) of ``y = a_{t+1} x_t`` [B, ...] at
        levels ``t`` [B] (int64), with ``s_t`` the level's Langevin step at ``recovery_step_factor``."""
        return self._level_net(y, level) / self._level_step(level, y).pow(2)

    def _level_net(self, y: Tensor, level: Tensor) -> Tensor:
        return self.net(y, level.to(y.dtype))

    def _level_step(self, level: Tensor, like: Tensor) -> Tensor:
        """``s_t`` [B] of the model's ``recovery_step_factor`` at ``level`` [B]."""
        return self.recovery_step_factor * self.ladder.langevin_step.to(like.device)[level].to(like.dtype)

    def _tilt(self, f: Tensor, x: Tensor) -> Tensor:
        """The energy from the net's output ``f`` at ``x``: ``f``, or ``f - log q(x)`` with ``base_tilt``."""
        return f + self.base().energy(x).to(f.dtype) if self.base_tilt else f

    def _guard(self, *energies: Tensor, chains: Tensor | None = None) -> None:
        """The divergence guard: stop before a step whose MCMC chain states (``chains``, the
        negatives) are no longer finite, naming the chains' step size, or whose energies exploded."""
        if chains is not None and not bool(torch.isfinite(chains).all()):
            recovery = self.ladder is not None
            option = "recovery_step_factor" if recovery else CHAIN_SAMPLERS[self.sampler].step_option
            size = getattr(self, option)
            raise FloatingPointError(
                f"EBM: the MCMC chains diverged at global step {self.global_step}: non-finite chain states after "
                f"{self.recovery_steps if recovery else self.mcmc_steps} {self.sampler} steps of {option}={size:g}"
                + (" (in units of the base's std: whiten_chains)" if self.whiten_chains else "")
                + f"; the parameters before this step are intact ({self._checkpoint_note()}). Lower model.{option} "
                "(by 10x at a time)")
        # torch's max keeps a NaN (Python's max of floats may drop it, depending on the order)
        worst = float(torch.stack([e.detach().abs().max() for e in energies if e.numel()]).max()) \
            if any(e.numel() for e in energies) else 0.0
        if not math.isfinite(worst) or worst > self.max_energy:
            what = "net(y, t)" if self.ladder is not None else "E"
            raise FloatingPointError(
                f"EBM: the energies diverged at global step {self.global_step} (max |{what}| = {worst:.4g} > "
                f"max_energy={self.max_energy:g}); the parameters before this step are intact "
                f"({self._checkpoint_note()}). Lower "
                + ("model.lr or model.recovery_step_factor, set model.chain_grad_clip, or set model.spectral_norm"
                   if self.ladder is not None else
                   "model.lr or model.step_size, raise model.energy_l2, set model.chain_grad_clip, or use "
                   "spectral_norm in the net"))

    def chain_seed(self, rank: int) -> int:
        """The seed of rank ``rank``'s training generator: from the run's seed (``torch.initial_seed()``,
        which ``seed_everything`` sets) and the rank, so that every rank's chains and noise differ
        (the global RNG is the same on every rank)."""
        return derived_seed(torch.initial_seed(), rank + 1)

    def training_generator(self) -> torch.Generator:
        """This rank's generator of the training noise: buffer draws and re-initialisations, the
        chains' noise, NCE's noise samples, DSM's noise."""
        if self._chain_rng is None:
            self._chain_rng = torch.Generator(device=self.device).manual_seed(self.chain_seed(self.global_rank))
        return self._chain_rng

    def _mcmc(self, x: Tensor, steps: int, generator: torch.Generator | None = None, options: dict[str, Any] | None = None,
              **override: Any):
        """Run ``override["sampler"]`` (default ``self.sampler``) from ``x`` with its own ``options``."""
        sampler = CHAIN_SAMPLERS[override.get("sampler", self.sampler)]
        step_size = override.get("step_size", self.step_size)
        energy, to_x = self.energy, None
        if self.whiten_chains:
            base, energy, to_x = self._whitened()
            x = base._whiten(x).reshape(x.shape)
        out = sampler.run(self, energy, x, steps, step_size, generator, **(options or {}))
        return out if to_x is None else out._replace(x=to_x(out.x))

    def _chain_base(self):
        """The base in the chains' coordinates: N(0, I) with ``whiten_chains``, else :meth:`base`."""
        from lightning_diffusion.mcmc import GaussianBase

        return GaussianBase(torch.zeros_like(self.base_mean), std=1.0) if self.whiten_chains else self.base()

    def _chain_log_det(self) -> float:
        """``log Z_x - log Z_chains`` (nats): ``log det L`` with ``whiten_chains`` (x = mean + L z), else 0."""
        return float(self.base()._log_det_half) if self.whiten_chains else 0.0

    def _whitened(self):
        """``(base, E(x(z)), x(z))`` for chains in the base's whitened coordinates, ``x = mean + L z``
        (a linear map: its constant Jacobian changes neither the samples nor the AIS path's shape,
        and adds ``log det L`` to log Z)."""
        base = self.base()

        def to_x(z: Tensor) -> Tensor:
            flat = z.flatten(1)
            flat = flat * base.std if base.std is not None else flat @ base.scale_tril.T
            return base.mean + flat.reshape(z.shape)

        return base, (lambda z: self.energy(to_x(z))), to_x

    # -- training --------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The objective's loss of a batch (scalar); ``generator`` fixes its noise (validation)."""
        x = batch["x"]
        if generator is None:
            generator = self.training_generator()
        if self.is_image:
            # 8-bit images: the density is fitted to uniformly dequantized pixels, the data whose NLL
            # bits_per_dim scores (a density on the 256 exact values alone would have no finite NLL)
            from lightning_diffusion.likelihoods import dequantize

            x = dequantize(x, generator)
        if not int(self.base_fitted):
            self.fit_base(self.all_gather(x).reshape(-1, *x.shape[1:]) if self._trainer is not None else x)
        if self.objective == "cd":
            return self._cd_loss(x, generator)
        if self.objective == "nce":
            return self._nce_loss(x, generator)
        if self.objective == "recovery":
            return self._recovery_loss(x, generator)
        return self._dsm_loss(x, generator)

    def _negatives_init(self, batch: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
        """Chain starts: base samples (short-run, validation) or buffer states with re-initialisation."""
        base = self.base()
        if self.short_run or not self.training:
            return base.sample(batch, generator).to(self.base_mean), None
        if self._replay is None:
            self._replay = {"x": base.sample(self.buffer_size, generator).to(self.base_mean),
                            "age": torch.zeros(self.buffer_size, dtype=torch.long, device=self.device)}
        index = torch.randint(0, self.buffer_size, (batch,), device=self.device, generator=generator)
        start = self._replay["x"][index]
        fresh = torch.rand(batch, device=self.device, generator=generator) < self.reinit_prob
        start = torch.where(fresh.reshape(-1, *[1] * (start.dim() - 1)), base.sample(batch, generator).to(start), start)
        self._replay["age"][index] = torch.where(fresh, 0, self._replay["age"][index])
        return start, index

    def _cd_loss(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        start, index = self._negatives_init(x.shape[0], generator)
        chains = self._mcmc(start, self.mcmc_steps, generator)
        negatives = chains.x.detach()
        if index is not None:
            self._replay["x"][index] = negatives
            self._replay["age"][index] += self.mcmc_steps
        f_pos, f_neg = self.net(x), self.net(negatives)  # the net's part: the base's adds no gradient
        e_pos, e_neg = self._tilt(f_pos, x), self._tilt(f_neg, negatives)
        self._guard(e_pos, e_neg, chains=negatives)
        if self.training:
            stats = {"energy_gap": e_pos.mean() - e_neg.mean(), "chain_grad_norm": chains.grad_norm,
                     "acceptance": chains.acceptance}
            if index is not None:
                stats["buffer_age"] = self._replay["age"].float().mean()
            self._log_stats(stats, x.shape[0])
        return f_pos.mean() - f_neg.mean() + self.energy_l2 * (f_pos.pow(2).mean() + f_neg.pow(2).mean())

    def _nce_loss(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        base = self.base()
        num_noise = max(1, round(self.noise_ratio * x.shape[0]))
        noise = base.sample(num_noise, generator).to(x)
        log_nu = math.log(num_noise / x.shape[0])
        e_pos, e_noise = self.energy(x), self.energy(noise)
        self._guard(e_pos, e_noise)

        def logit(samples: Tensor, e: Tensor) -> Tensor:  # log p_model - log(nu q)
            return -e - log_c - base.log_prob(samples).to(e) - log_nu

        log_c = self.normalizer()
        loss = -(F.logsigmoid(logit(x, e_pos)).mean() + num_noise / x.shape[0] * F.logsigmoid(-logit(noise, e_noise)).mean())
        if self.training:
            self._log_stats({"energy_gap": e_pos.mean() - e_noise.mean(), "log_normalizer": log_c.detach()},
                            x.shape[0])
        return loss

    def _dsm_loss(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        levels = torch.tensor(self.dsm_sigmas, device=x.device, dtype=x.dtype)
        pick = torch.randint(0, len(levels), (x.shape[0],), generator=generator, device=x.device)
        sigma = levels[pick].reshape(-1, *[1] * (x.dim() - 1))
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        train = torch.is_grad_enabled()  # the loss is differentiated: the score's graph is kept
        with torch.enable_grad():
            noisy = (x + sigma * eps).requires_grad_(True)
            e = self.energy(noisy)
            (grad,) = torch.autograd.grad(e.sum(), noisy, create_graph=train)
        self._guard(e)
        # sigma^2 || s(x~) - grad log q(x~ | x) ||^2 / 2 with s = -grad E and grad log q = -eps / sigma
        loss = 0.5 * (eps - sigma * grad).pow(2).flatten(1).sum(1).mean()
        if self.training:
            self._log_stats({"energy_gap": self.energy(x).detach().mean() - e.detach().mean()}, x.shape[0])
        return loss

    def _recovery_loss(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Maximum likelihood of each level's conditional EBM (Gao et al. 2021, eq. 9): a level ``t`` per
        sample, the pair ``(x_t, x_{t+1})``, negatives from ``recovery_steps`` Langevin steps on
        ``p(x_t | x_{t+1})`` started at ``x_{t+1}``; the loss ``w_t (E(y+, t) - E(y-, t))`` with
        ``y = a_{t+1} x_t`` (the conditional's Gaussian term has no parameter and drops out)."""
        from lightning_diffusion import mcmc

        ladder = self.ladder
        level = torch.randint(0, ladder.levels, (x.shape[0],), generator=generator, device=x.device)
        x_t, x_next = mcmc.recovery_pairs(x, level, ladder, generator)
        chains = mcmc.recovery_langevin(self.level_energy, x_next, level, ladder, step_factor=self.recovery_step_factor,
                                        steps=self.recovery_steps, metropolis=self.sampler == "mala",
                                        grad_clip=self.chain_grad_clip, generator=generator)
        negatives = chains.x.detach()
        y_scale = ladder.y_scale.to(x.device)[level].to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        g_pos, g_neg = self._level_net(y_scale * x_t, level), self._level_net(y_scale * negatives, level)
        self._guard(g_pos, g_neg, chains=negatives)
        step2 = self._level_step(level, x).pow(2)
        if self.recovery_loss_rescale:  # the reference code's: sigma_1 / sigma_{t+1} on the net's scale
            sigma = ladder.step_noise.to(x.device).to(x.dtype)
            weight = sigma[0] / sigma[level] * step2
        else:
            weight = torch.ones_like(step2)
        e_pos, e_neg = g_pos / step2, g_neg / step2
        if self.training:
            self._log_stats({"energy_gap": (e_pos - e_neg).detach().mean(), "chain_grad_norm": chains.grad_norm,
                             "acceptance": chains.acceptance}, x.shape[0])
        return (weight * (e_pos - e_neg)).mean()

    def _log_stats(self, stats: dict[str, Any], batch_size: int) -> None:
        if self._trainer is None:
            return
        for name, value in stats.items():
            self.log(f"train/{name}", torch.as_tensor(value, dtype=torch.float32).detach(), batch_size=batch_size)

    # -- the replay buffer in the checkpoint (per rank) -------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        replay = {k: v.detach().cpu() for k, v in (self._replay or {}).items()}
        if self._chain_rng is not None:
            replay["rng"] = self._chain_rng.get_state()
        # per rank: {"x", "age"} (cd) and "rng" (the training generator)
        checkpoint["ebm_replay_buffers"] = gather_per_rank(replay)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._pending_replay = checkpoint.get("ebm_replay_buffers")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._pending_replay:
            saved = dict(self._pending_replay[self.global_rank % len(self._pending_replay)] or {})
            rng = saved.pop("rng", None)
            self._replay = {k: v.to(self.device) for k, v in saved.items()} or None
            if rng is not None:
                self._chain_rng = torch.Generator(device=self.device)
                self._chain_rng.set_state(rng)
        self._pending_replay = None

    # -- the contract ------------------------------------------------------------------------------
    def check_option_rules(self, options: dict[str, Any]) -> None:
        """``sampler``: one of :data:`CHAIN_SAMPLERS` (default :data:`DEFAULT_SAMPLE_SAMPLER`); each
        sampler's own options (``islands``, ``replicas``, ...) only with that sampler; ``init="buffer"``
        only with a sampler that runs chains from given states."""
        name = options.get("sampler") or self._default_sampler(options.get("init", "base"))
        entry = registered(CHAIN_SAMPLERS, name, "EBM sampler")
        if name == RECOVERY_SAMPLE_SAMPLER and self.ladder is None:
            raise OptionError("sampler", name, f"the recovery ladder exists only for objective='recovery' (this model's "
                              f"is {self.objective!r})", "use smc (the default), mala or langevin")
        if options.get("init") == "buffer" and self.ladder is not None:
            raise OptionError("init", "buffer", "objective='recovery' keeps no replay buffer",
                              "use init='base' (the default: the recovery ladder from N(0, I))")
        for option, value in options.items():
            owners = [n for n, e in CHAIN_SAMPLERS.items() if option in e.options]
            if value is not None and owners and option not in entry.options:
                refuse_unknown(option, value, f"the {name} sampler", list(SAMPLE_COMMON_OPTIONS + entry.options))
        if options.get("init") == "buffer" and not entry.chains:
            raise OptionError("init", "buffer", f"the {name} sampler draws its own start from the base",
                              "use init='base', or a chain sampler (sampler='mala', 'langevin', 'parallel_tempering')")

    def _default_sampler(self, init: str) -> str:
        """:meth:`sample`'s sampler when none is named: ``recovery`` for a recovery model, else ``smc`` from
        the base; from the buffer the model's chain sampler (the buffer's states are its chains' states,
        which it continues)."""
        if init == "buffer":
            return self.sampler
        return RECOVERY_SAMPLE_SAMPLER if self.ladder is not None else DEFAULT_SAMPLE_SAMPLER

    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               steps: PositiveInt | None = None, init: SampleInit = "base", sampler: str | None = None,
               step_size: Positive | None = None, islands: PositiveInt | None = None,
               ess_threshold: Annotated[float, Bound(0, 1)] | None = None, moves_per_temperature: PositiveInt | None = None,
               particles_per_sample: PositiveInt | None = None, replicas: PositiveInt | None = None,
               max_temperature: Positive | None = None,
               **options: Any) -> Tensor:
        """``num_samples`` samples of exp(-E); images are clipped to [-1, 1].

        Args:
            sampler: one of :data:`CHAIN_SAMPLERS`; for ``objective="recovery"`` the default is
                ``recovery``, the ladder walked down from N(0, I) (``steps`` Langevin steps per level,
                default ``recovery_steps``; ``step_size`` the factor b, default ``recovery_sample_step_factor``
                or else ``recovery_step_factor``),
                and the others sample the lowest level's marginal ``exp(-E(a_1 x, 0))``. Otherwise
                the default is ``smc`` (:data:`DEFAULT_SAMPLE_SAMPLER`),
                which draws the model's distribution with its mode weights (with ``init="buffer"``:
                the model's ``sampler``, continuing the buffer's chains). ``langevin``, ``mala``,
                ``decoupled``: chains of ``steps`` steps from the base or the buffer (each chain stays in
                the mode nearest its start). ``parallel_tempering``: ``replicas`` chains per sample at
                ``geometric_ladder(1, max_temperature)``, ``steps`` rounds, the T = 1 chain returned.
                The model's ``sampler`` option is the CD negatives' MCMC, not this default.
            steps: ``smc``: the number of temperatures of AIS's sigmoid schedule (each with
                ``moves_per_temperature`` MALA moves, adapted step); chain samplers: MCMC steps;
                ``parallel_tempering``: rounds of a move and a swap. Default ``sample_steps``.
            init: ``base`` (fresh chains) or ``buffer`` (replay-buffer states; chain samplers only).
            step_size: the (initial, for ``smc``) MALA step; default the model's ``step_size``.
            islands: ``smc``: independent populations, for log Z's standard error (default 8).
            ess_threshold: ``smc``: resample a population when its ESS falls below this fraction (0.5).
            moves_per_temperature: ``smc``: MALA moves at each temperature (1).
            particles_per_sample: ``smc``: particles per returned sample (4: the mode weights of the
                n returned samples then vary less than n independent draws'; 1 or 2 do not).
            replicas: ``parallel_tempering``: temperatures in the ladder (8).
            max_temperature: ``parallel_tempering``: the hottest temperature (20).

        ``last_sample_diagnostics`` afterwards: ``smc``'s log Z (nats, in data units), its stderr, the
        ESS and resampling history; ``parallel_tempering``'s swap rates (also logged).
        """
        own = {k: v for k, v in (("islands", islands), ("ess_threshold", ess_threshold),
                                 ("moves_per_temperature", moves_per_temperature),
                                 ("particles_per_sample", particles_per_sample), ("replicas", replicas),
                                 ("max_temperature", max_temperature)) if v is not None}
        self.check_sample_options(steps=steps, init=init, sampler=sampler, step_size=step_size, **own, **options)
        if y is not None:
            raise ValueError("EBM is unconditional: sample(y=...) is not supported")
        override = {"sampler": sampler or self._default_sampler(init)}
        if step_size is not None:
            override["step_size"] = step_size
        elif override["sampler"] == RECOVERY_SAMPLE_SAMPLER:
            override["step_size"] = self.recovery_sample_step_factor or self.recovery_step_factor
        if steps is None and override["sampler"] == RECOVERY_SAMPLE_SAMPLER:
            steps = self.recovery_steps
        with evaluating(self):
            if init == "buffer":
                if self._replay is None:
                    raise ValueError("EBM.sample(init='buffer'): there is no replay buffer (objective cd, after training)")
                pick = torch.randint(0, self._replay["x"].shape[0], (num_samples,), generator=generator,
                                     device=self._replay["x"].device)
                start = self._replay["x"][pick]
            else:
                start = self.base().sample(num_samples, generator).to(self.base_mean)
            self.last_sample_diagnostics = None
            x = self._mcmc(start, steps or self.sample_steps, generator, own, **override).x
        if self.last_sample_diagnostics is not None:
            _log.info("EBM.sample(sampler=%r): %s", override["sampler"], _summary(self.last_sample_diagnostics))
        return x.clamp(-1, 1) if self.is_image else x

    def log_partition(self, generator: torch.Generator | None = None) -> tuple[float, float, str]:
        """``(log Z, its standard error, method)`` in nats for the current weights (cached until they change).

        2-D points: quadrature on a grid over the base's mean +- 8 standard deviations per axis
        (``quadrature_points`` per axis), ``method="quadrature"``, exact up to the grid's error (the
        stderr is 0). Otherwise forward AIS from the base (``ais_chains`` chains, ``ais_steps``
        distributions, MALA), ``method="ais"``: a stochastic *lower* bound of log Z, so the NLL it gives
        errs low (optimistic); the stderr is the Monte Carlo error of the estimate, not its bias.
        """
        from lightning_diffusion import mcmc

        # the weights and the base as they are now: every in-place update (an optimizer step, an EMA
        # swap, a refit of the base) bumps a tensor's version
        key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), self.base_mean, self.base_scale))
        if self._log_z_cache is not None and self._log_z_cache[0] == key:
            return self._log_z_cache[1]
        with evaluating(self):
            if self.data_shape == (2,):
                # 8 standard deviations of the base on each axis: the row norms of its Cholesky factor
                spread = 8 * self.base_scale.pow(2).sum(1).sqrt().clamp_min(1e-3)
                lo, hi = (self.base_mean - spread).tolist(), (self.base_mean + spread).tolist()
                grid = mcmc.log_density_grid(self.energy, ((lo[0], hi[0]), (lo[1], hi[1])), num=self.quadrature_points,
                                             device=self.device, dtype=self.base_mean.dtype)
                result = (grid.log_z, 0.0, "quadrature")
            else:
                energy, base, log_det = self.energy, self.base(), 0.0
                if self.whiten_chains:  # AIS for z = L^-1 (x - mean) from N(0, I); log Z_x = log Z_z + log det L
                    white, energy, _ = self._whitened()
                    base, log_det = mcmc.GaussianBase(torch.zeros_like(self.base_mean), std=1.0), float(white._log_det_half)
                out = mcmc.ais(energy, base, self.ais_chains, step_size=self.ais_step_size or self._ais_default_step(),
                               betas=self.ais_steps, generator=generator)
                result = (out.log_z + log_det, out.stderr, "ais")
        self._log_z_cache = (key, result)
        return result

    def _ais_default_step(self) -> float:
        """AIS's MALA step when ``ais_step_size`` is None: ``step_size``; for ``recovery`` the lowest
        level's Langevin step in data units, ``s_0 / a_1`` (the scale its energy ``net / s_0^2`` was
        trained at: a step of ``step_size`` may be far off it)."""
        if self.ladder is None:
            return self.step_size
        return float(self.recovery_step_factor * self.ladder.langevin_step[0] / self.ladder.y_scale[0])

    def density_grid(self, bounds: tuple[tuple[float, float], tuple[float, float]], num: int = 201):
        """The normalised log density ``-E - log Z`` of 2-D points on a ``num`` x ``num`` grid over
        ``bounds`` (log Z by quadrature over that box): a :class:`~lightning_diffusion.mcmc.DensityGrid`."""
        from lightning_diffusion import mcmc

        if self.data_shape != (2,):
            raise ValueError(f"EBM.density_grid needs 2-D points; the data have shape {self.data_shape}")
        with evaluating(self):
            return mcmc.log_density_grid(self.energy, bounds, num=num, device=self.device, dtype=self.base_mean.dtype)

    def bpd_estimator(self, *, estimator: str | None = None, **_: Any) -> str:
        """``exact-quadrature`` for 2-D points, ``ais-logZ`` otherwise (see :meth:`log_partition`); for
        ``objective="recovery"`` ``recovery-ais`` (the ladder's bound, :data:`RECOVERY_ESTIMATOR`, the
        default) or, with ``estimator="level0"``, the old name with ``-level0`` appended: the lowest
        level's marginal energy alone."""
        name = "exact-quadrature" if self.data_shape == (2,) else "ais-logZ"
        if self.ladder is None:
            return name
        return name + "-level0" if estimator == LEVEL0_ESTIMATOR else RECOVERY_ESTIMATOR

    def check_bpd_options(self, **options: Any) -> None:
        """Also: ``estimator`` only for ``objective="recovery"`` (``recovery-ais`` or ``level0``), and
        the ``recovery_ais_*`` options only with ``recovery-ais``."""
        super().check_bpd_options(**options)
        estimator = options.get("estimator")
        if estimator is not None and self.ladder is None:
            raise OptionError("estimator", estimator, f"the EBM of objective={self.objective!r} has one estimator",
                              "leave estimator out")
        if estimator not in (None, RECOVERY_ESTIMATOR, LEVEL0_ESTIMATOR):
            raise OptionError("estimator", estimator, "unknown estimator",
                              f"choose {RECOVERY_ESTIMATOR!r} (the default) or {LEVEL0_ESTIMATOR!r}")
        if self.ladder is None or estimator == LEVEL0_ESTIMATOR:
            for name in RECOVERY_AIS_DEFAULTS:
                if options.get(name) is not None:
                    raise OptionError(name, options[name], f"is an option of estimator={RECOVERY_ESTIMATOR!r} "
                                      "(objective='recovery')", "leave it out")

    @full_precision
    def bits_per_dim(self, x: Tensor, *, num_dequantizations: PositiveInt = 1, estimator: str | None = None,
                     recovery_ais_chains: PositiveInt | None = None, recovery_ais_steps: PositiveInt | None = None,
                     recovery_ais_step_size: Positive | None = None, generator: torch.Generator | None = None,
                     **options: Any) -> Tensor:
        """``(E(x) + log Z) / (D ln 2)`` [B]: the NLL in bits per dimension with ``log Z`` from
        :meth:`log_partition`. 8-bit images are uniformly dequantized (``num_dequantizations`` draws,
        averaged) and scored as discrete data (+7 bits/dim for the 1/128 bins), like the other families.

        ``objective="recovery"``: by default (``estimator="recovery-ais"``) the ladder's variational
        bound, :meth:`recovery_nll` (``recovery_ais_chains``, ``recovery_ais_steps``,
        ``recovery_ais_step_size``: its AIS, defaults :data:`RECOVERY_AIS_DEFAULTS`); its Monte Carlo
        standard error over the batch is in ``last_bound``. ``estimator="level0"``: the old estimate,
        ``E`` the lowest level's marginal energy ``E(a_1 x, 0)`` (:meth:`energy`) with its normaliser by
        AIS from the base (``ais-logZ-level0``) or quadrature for 2-D points
        (``exact-quadrature-level0``). That energy is steep (``net / s_0^2``) and AIS from the base
        needs far more than ``ais_steps=1000`` to approach its log Z: results below 0 bits/dim for 8-bit
        images were measured, AIS's error, not the model's; it is kept for comparison.

        Args:
            x: data [B, ...].
            num_dequantizations: uniform dequantization draws per image (averaged).
            estimator: ``recovery`` only: ``recovery-ais`` (None: the default) or ``level0``.
            recovery_ais_chains: AIS chains per conditional and sample (None: 16).
            recovery_ais_steps: AIS bridges per conditional (None: 100).
            recovery_ais_step_size: MALA step of the AIS moves, in units of each conditional's AIS base std (None: 0.5).
            generator: the noise (forward chain, dequantization, AIS); None: seeded with ``val_seed``.
        """
        from lightning_diffusion import likelihoods

        self.check_bpd_options(num_dequantizations=num_dequantizations, estimator=estimator,
                               recovery_ais_chains=recovery_ais_chains, recovery_ais_steps=recovery_ais_steps,
                               recovery_ais_step_size=recovery_ais_step_size, **options)
        dims = math.prod(self.require_data_shape())
        if self.ladder is not None and estimator != LEVEL0_ESTIMATOR:
            given = {"chains": recovery_ais_chains, "steps": recovery_ais_steps, "step_size": recovery_ais_step_size}
            chosen = {k: RECOVERY_AIS_DEFAULTS[f"recovery_ais_{k}"] if v is None else v for k, v in given.items()}
            if generator is None:
                generator = torch.Generator(device=x.device).manual_seed(self.val_seed)
            with evaluating(self):
                x = x.to(self.base_mean)
                draws = [likelihoods.dequantize(x, generator) if self.is_image else x
                         for _ in range(num_dequantizations if self.is_image else 1)]
                bounds = [self.recovery_nll(d, generator=generator, **chosen) for d in draws]
            nll = torch.stack([b[0] for b in bounds]).mean(0)
            bpd = likelihoods.bits_per_dim_discrete(nll, dims) if self.is_image else \
                likelihoods.nats_to_bits_per_dim(nll, dims)
            top = sum(b[1]["log_z_top_stderr"] for b in bounds) / len(bounds)  # one constant per draw: errors add
            spread = float(bpd.std() / math.sqrt(bpd.numel())) if bpd.numel() > 1 else float("nan")
            self.last_bound = {**bounds[0][1], "bpd": float(bpd.mean()),
                               "stderr_bpd": math.sqrt(spread**2 + (top / (dims * math.log(2)))**2)}
            return bpd.to(x.dtype)
        log_z, _, _ = self.log_partition(generator)
        with evaluating(self):
            x = x.to(self.base_mean)
            if not self.is_image:
                return likelihoods.nats_to_bits_per_dim(self.energy(x) + log_z, dims)
            nll = torch.stack([self.energy(likelihoods.dequantize(x, generator)) + log_z
                               for _ in range(num_dequantizations)]).mean(0)
            return likelihoods.bits_per_dim_discrete(nll, dims)

    def _recovery_ais_bases(self, x_next: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """The AIS bases of :meth:`recovery_nll` in y (mean, std, shaped like ``x_next``): the Gaussian
        that the conditional would be if the data were the model's base Gaussian (per dimension: the
        base's diagonal): the forward process's marginal of ``y = c_t x_t``, ``N(c abar_t m, c^2
        (abar_t^2 s^2 + sigmabar_t^2))``, times the conditional's Gaussian part ``N(x_{t+1}, sigma^2)``
        (the top level: the marginal alone)."""
        ladder = self.ladder
        shape = (-1, *[1] * len(self.require_data_shape()))

        def at(values: Tensor) -> Tensor:
            return values.to(x_next.device)[level].to(x_next.dtype).reshape(shape)

        var = self.base_scale.pow(2).sum(1) if self._full_base else self.base_scale.pow(2)
        c, abar, sigmabar = at(ladder.y_scale), at(ladder.signal), at(ladder.noise)
        prior_mean = c * abar * self.base_mean.to(x_next)
        prior_var = c**2 * (abar**2 * var.reshape(self.base_mean.shape).to(x_next) + sigmabar**2)
        gauss = at(ladder.conditional) / at(ladder.step_noise).pow(2)  # 0 at the top level
        precision = 1 / prior_var + gauss
        return (prior_mean / prior_var + gauss * x_next) / precision, precision.rsqrt().expand_as(x_next)

    def recovery_nll(self, x: Tensor, *, chains: PositiveInt = RECOVERY_AIS_DEFAULTS["recovery_ais_chains"],
                     steps: PositiveInt = RECOVERY_AIS_DEFAULTS["recovery_ais_steps"],
                     step_size: Positive = RECOVERY_AIS_DEFAULTS["recovery_ais_step_size"],
                     generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        """``objective="recovery"``: the ladder's variational bound on ``-log p(x_0 = x)`` (nats) [B]
        and its diagnostics (Gao et al. 2021, Sec. 3; as Sohl-Dickstein et al. 2015's bound):

            -log p(x_0) <= E_q[-log p(x_{L-1}) - sum_{t<L-1} log p(x_t | x_{t+1}) + sum_{t<L-1} log q(x_{t+1} | x_t)]

        with one draw of the forward chain ``x_{t+1} = a_{t+1} x_t + sigma_{t+1} eps`` from ``x_0 = x``,
        ``p(x_t | x_{t+1}) = a^D exp(-E(a x_t, t) - ||a x_t - x_{t+1}||^2 / (2 sigma^2)) / Z_t(x_{t+1})``
        (a = a_{t+1}, D = dimensions; the quadratic term cancels against ``log q``'s) and the top level
        the marginal EBM ``exp(-E(x_{L-1}, L-1)) / Z_{L-1}``: the model's top level has no Gaussian
        term (the reference code's ``is_recovery[-1] = 0``), so ``x_L`` is only the sampler's start
        and drops out (including it with the prior N(0, I) would only add ``KL(q(x_L | x_{L-1}) ||
        N(0, I)) >= 0`` of slack). The reference code has no likelihood code (its T6 setting); the
        paper estimates the normalisers by AIS, as here.

        Each ``log Z_t(x_{t+1})`` comes from ``chains`` AIS chains (:func:`~lightning_diffusion.mcmc.recovery_log_normalizers`,
        ``steps`` bridges, MALA of ``step_size`` in units of the base's std) from a Gaussian that is the
        conditional's Gaussian part ``N(x_{t+1}, sigma^2 I)`` times the forward process's marginal of
        ``a x_t`` under the model's base Gaussian (:meth:`_recovery_ais_bases`: for the pixels that
        the data never move, the conditional is ~30x narrower than its Gaussian part at level 0, which
        AIS from the Gaussian part alone would have to shrink through); ``log Z_{L-1}`` from those
        chains of every sample pooled (one constant). Which side it errs on: AIS is unbiased in Z, so
        every ``log Z`` is biased *low* in expectation, and the estimate errs low against the bound it
        estimates (optimistic); the bound itself lies above the true NLL by the forward chain's slack
        (0 when the conditionals are the forward process's posteriors). Convergence: run more ``steps``
        until the estimate stops rising; on a model trained with short-run chains the level-0
        conditional can hold its mass far from ``x_1`` (its energy ``net / s_0^2`` falls ~4000x faster
        than the net where no chain went), and AIS then needs far more bridges (measured on the
        digits after 300 steps: the level-0 term 788 nats at 100 bridges, 1437 at 400). Diagnostics: ``log_z_top`` and
        its ``log_z_top_stderr`` (nats), per-level mean terms ``level_nats`` [L], the mean per-sample
        AIS stderr of the conditionals ``conditional_stderr`` (nats), ``acceptance`` and ``nfe``."""
        from lightning_diffusion import mcmc
        from lightning_diffusion.mcmc.ais import log_mean_stderr

        if self.ladder is None:
            raise ValueError(f"EBM.recovery_nll needs objective='recovery'; this model's is {self.objective!r}")
        ladder, size, levels = self.ladder, x.shape[0], self.ladder.levels
        dims = math.prod(self.require_data_shape())
        with torch.no_grad():
            xs = [x]
            for t in range(levels - 1):
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                xs.append(float(ladder.step_scale[t]) * xs[-1] + float(ladder.step_noise[t]) * eps)
            level = torch.arange(levels, device=x.device).repeat_interleave(size)
            x_next = torch.cat([*xs[1:], torch.zeros_like(x)])  # the top level has no x_{t+1}
            mean, std = self._recovery_ais_bases(x_next, level)
        out = mcmc.recovery_log_normalizers(self.level_energy, x_next, level, ladder, chains=chains, step_size=step_size,
                                            betas=steps, base_mean=mean, base_std=std, generator=generator)
        log_z = out.log_z.reshape(levels, size)
        top_w = out.log_weights.reshape(levels, -1)[-1]
        log_z_top = float(mcmc.log_mean_exp(top_w, dim=-1) + std[-1].double().log().sum())
        with torch.no_grad():
            terms = []
            for t in range(levels):
                c = float(ladder.y_scale[t])
                e = self.level_energy(c * xs[t], torch.full((size,), t, device=x.device, dtype=torch.long)).double()
                if t == levels - 1:
                    terms.append(e + log_z_top)
                else:  # -log p(x_t | x_{t+1}) + log q(x_{t+1} | x_t), the quadratic terms cancelled
                    sigma2 = float(ladder.step_noise[t]) ** 2
                    terms.append(e + log_z[t] - dims * math.log(c) - 0.5 * dims * math.log(2 * math.pi * sigma2))
            terms = torch.stack(terms)
        return terms.sum(0), {"log_z_top": log_z_top, "log_z_top_stderr": log_mean_stderr(top_w),
                              "level_nats": terms.mean(1).tolist(), "conditional_stderr": float(out.stderr[:-size].mean()),
                              "acceptance": out.acceptance, "nfe": out.nfe}
