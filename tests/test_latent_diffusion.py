"""LatentDiffusion against ground truth and through the CLI: with an exact first stage (probabilistic
PCA's linear-Gaussian encoder and decoder) and an exact prior, the two-stage bound is the data's exact
NLL; a first-stage checkpoint with a missing key is refused naming it and the file before training; the
latent scale is in the checkpoint and unchanged by a resume; the first stage stays frozen."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import Tensor, nn

from lightning_diffusion import LatentDiffusion, ScoreSDE, VPSDE
from lightning_diffusion.diffusion.mixture import GaussianMixture, MixtureOracle
from lightning_diffusion.errors import CheckpointError
from lightning_diffusion.models.first_stage import FirstStage

ROOT = Path(__file__).resolve().parents[1]


class LinearGaussianStage(L.LightningModule):
    """A test-only exact first stage of probabilistic-PCA data ``x = W z + mu + sigma eps``, ``z ~ N(0, I)``:
    the latent is ``z' = c z``, the encoder the exact posterior ``q(z' | x)`` (full covariance) and the
    decoder ``p(x | z') = N(W z' / c + mu, sigma^2 I)``, so ``log p(x) = log p(x | z') + log p(z') - log q(z' | x)``
    for every z' with ``p(z') = N(0, c^2 I)``."""

    latent_categories = None

    def __init__(self, weight: list, mu: list, sigma: float, c: float, data_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("w", torch.tensor(weight, dtype=torch.float64))
        self.register_buffer("mu", torch.tensor(mu, dtype=torch.float64))
        self.sigma, self.c = sigma, c
        self.data_shape = (self.w.shape[0],)
        self.latent_shape = (self.w.shape[1],)

    def posterior(self, x: Tensor) -> torch.distributions.MultivariateNormal:
        w, d = self.w, self.w.shape[1]
        m = w.T @ w + self.sigma ** 2 * torch.eye(d, dtype=w.dtype)
        m_inv = torch.linalg.inv(m)
        mean = (x.double() - self.mu) @ w @ m_inv.T
        return torch.distributions.MultivariateNormal(self.c * mean, self.c ** 2 * self.sigma ** 2 * m_inv)

    def sample_latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        q = self.posterior(x)
        eps = torch.randn(q.mean.shape, generator=generator, dtype=torch.float64)
        return q.mean + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        q = self.posterior(x)
        z = self.sample_latents(x, generator)
        decoder = torch.distributions.Normal(z / self.c @ self.w.T + self.mu, self.sigma)
        return z, -decoder.log_prob(x.double()).sum(1) + q.log_prob(z)

    def decode_latents(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return z.double() / self.c @ self.w.T + self.mu

    def data_log_prob(self, x: Tensor) -> Tensor:
        cov = self.w @ self.w.T + self.sigma ** 2 * torch.eye(self.w.shape[0], dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.mu, cov).log_prob(x.double())


def save_stage(stage: L.LightningModule, path: Path, drop: str | None = None) -> Path:
    """A checkpoint of ``stage`` as ``lightning-diffusion fit`` writes one (its class path in the
    hyperparameters), without the key ``drop``."""
    state = {k: v for k, v in stage.state_dict().items() if k != drop}
    hparams = {**stage.hparams, "_class_path": f"{type(stage).__module__}.{type(stage).__qualname__}"}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__}, path)
    return path


def ppca_stage() -> LinearGaussianStage:
    g = torch.Generator().manual_seed(0)
    return LinearGaussianStage(weight=torch.randn(4, 2, generator=g).tolist(), mu=[0.5, -1.0, 0.0, 2.0],
                               sigma=0.3, c=3.0)


def exact_prior(dim: int) -> ScoreSDE:
    """A ScoreSDE whose score is N(0, I)'s exactly (the one-component mixture's oracle)."""
    mix = GaussianMixture(torch.zeros(1, dim, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    prior = ScoreSDE(nn.Identity(), sde=VPSDE(), parameterization="score", data_shape=(dim,))
    prior.net = MixtureOracle(mix, prior.sde, "score")
    return prior


def test_a_linear_gaussian_stage_is_a_first_stage():
    assert isinstance(ppca_stage(), FirstStage)


def test_two_stage_bound_equals_the_exact_nll_with_an_exact_first_stage_and_prior(tmp_path):
    stage = ppca_stage()
    model = LatentDiffusion(str(save_stage(stage, tmp_path / "stage.ckpt")), exact_prior(2), data_shape=(4,))
    model.latent_scale.fill_(1 / stage.c)  # the latents' exact scale: s z' ~ N(0, I), which the prior is
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200, 2, generator=g, dtype=torch.float64)
    x = (z @ stage.w.T + stage.mu + stage.sigma * torch.randn(200, 4, generator=g, dtype=torch.float64)).float()
    bpd = model.bits_per_dim(x, divergence="exact", generator=torch.Generator().manual_seed(2)).double()
    exact = -stage.data_log_prob(x) / (4 * math.log(2))
    # every draw of z gives the exact NLL (the encoder is the exact posterior): only the ODE's error remains
    assert abs(bpd.mean().item() - exact.mean().item()) < 0.005
    assert (bpd - exact).abs().max().item() < 0.03
    assert model.bpd_estimator(divergence="exact") == "elbo+ode-exact"
    # the prior's number alone (bits per latent dimension of s z) is not the data's NLL
    prior_only = model.prior.bits_per_dim((stage.encode_latents(x, torch.Generator().manual_seed(2))[0] / stage.c).float(),
                                          divergence="exact")
    assert abs(prior_only.mean().item() - exact.mean().item()) > 0.3


@pytest.mark.parametrize("parameterization", ["x0", "eps"])
def test_the_two_stage_bound_with_a_ddpm_prior_is_the_exact_nll_plus_the_ddpm_bounds_own_gap(tmp_path, parameterization):
    """The DDPM prior's path (the configs' prior) on continuous latents, against closed forms: with the exact first
    stage and the exact denoiser of the scaled latents s z' ~ N(0, I), the first stage's nats, -log p_prior(s z)
    and the Jacobian -d log s add up to -log p(x) plus the DDPM VLB's own gap over N(0, I), whose expectation is
    analytic (test_ddpm_vlb.expected_gaussian_bound: fixed variances, a Gaussian L_0 of std sqrt(beta-tilde_1)).
    The latents' scale c = 3 makes the Jacobian d log c = 2.2 nats (0.79 bits/dim): a wrong sign is off by 1.6."""
    from lightning_diffusion import DDPM
    from lightning_diffusion.diffusion.sde import DiscreteVP
    from test_ddpm_vlb import expected_gaussian_bound

    stage = ppca_stage()
    prior = DDPM(nn.Identity(), parameterization=parameterization, data_shape=(2,))
    prior.net = MixtureOracle(GaussianMixture(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64)),
                              DiscreteVP(prior.schedule), parameterization)
    model = LatentDiffusion(str(save_stage(stage, tmp_path / "stage.ckpt")), prior, data_shape=(4,))
    model.latent_scale.fill_(1 / stage.c)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x = (z @ stage.w.T + stage.mu + stage.sigma * torch.randn(4000, 4, generator=g, dtype=torch.float64)).float()
    bpd = model.bits_per_dim(x, generator=torch.Generator().manual_seed(2)).double()
    assert model.bpd_estimator() == "elbo+vlb"
    exact = -stage.data_log_prob(x) / (4 * math.log(2))
    # the DDPM bound's expected excess over N(0, I)'s entropy, bits per latent dimension (0.166), times d / D
    gap = expected_gaussian_bound(prior.schedule, 0.0, 1.0, "fixedlarge") - 0.5 * math.log2(2 * math.pi * math.e)
    expected = exact.mean().item() + gap * 2 / 4
    se = (bpd - exact).std().item() / math.sqrt(len(bpd))
    # observed: x0 and eps oracle alike, bound - exact NLL 0.075 +- 0.012 bits/dim against the analytic 0.082
    assert abs(bpd.mean().item() - expected) < 4 * se + 0.01, (bpd.mean().item(), expected, se)
    assert 0.05 < gap < 0.3


def test_a_first_stage_checkpoint_with_a_missing_key_is_refused_naming_the_key_and_the_file(tmp_path):
    path = save_stage(ppca_stage(), tmp_path / "stage.ckpt", drop="mu")
    with pytest.raises(CheckpointError) as error:
        LatentDiffusion(str(path), exact_prior(2), data_shape=(4,))
    assert "missing keys ['mu']" in str(error.value) and str(path) in str(error.value)


def test_a_first_stage_of_other_data_is_refused(tmp_path):
    path = save_stage(ppca_stage(), tmp_path / "stage.ckpt")
    with pytest.raises(ValueError, match=r"trained on data of shape \[4\].*the data are \[3\]"):
        LatentDiffusion(str(path), exact_prior(2), data_shape=(3,))
    with pytest.raises(ValueError, match=r"prior's data_shape \[3\] is not the first stage's latent_shape \[2\]"):
        LatentDiffusion(str(path), exact_prior(3), data_shape=(4,))


# -- through the CLI: a tiny VAE first stage, then the latent config on it, then a resume -------------
VAE_CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": 3, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                "callbacks": [{"class_path": "LastCheckpoint", "init_args": {"every_n_train_steps": 3}}]},
    "model": {"class_path": "VAE", "init_args": {
        "net": {"class_path": "ConvVAENet", "init_args": {"latent_dim": 32, "channels": [8, 16], "num_blocks": 1}},
        "likelihood": "discretized_logistic", "lr": 1e-3, "warmup_steps": 1}},
    "data": {"class_path": "ShardDataModule", "init_args": {"dataset": "colour_digits", "batch_size": 16,
                                                            "batches_per_epoch": 4, "num_workers": 0}},
}


def fit_here(config: Path, run: Path, *extra: str) -> None:
    from lightning_diffusion.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["fit", "--config", str(config), f"--trainer.default_root_dir={run}",
              f"--trainer.callbacks.dirpath={run}/checkpoints", *extra])
    finally:
        torch.set_num_threads(threads)


def latent_config(path: Path, first_stage: Path | None = None, max_steps: int = 4) -> Path:
    """configs/latent_ddpm_colour_digits.yaml, shrunk (a small MLP, 50 steps, a few training steps),
    with EMA, LastCheckpoint, the guided SampleGrid and a Likelihood callback."""
    config = yaml.safe_load((ROOT / "configs" / "latent_ddpm_colour_digits.yaml").read_text())
    config["trainer"].update(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             check_val_every_n_epoch=1, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu")
    callbacks = config["trainer"]["callbacks"]  # LastCheckpoint last: --trainer.callbacks.dirpath sets the last one's
    callbacks.sort(key=lambda callback: callback["class_path"] == "LastCheckpoint")
    for callback in callbacks:
        if callback["class_path"] == "LastCheckpoint":
            callback["init_args"]["every_n_train_steps"] = 2
        if callback["class_path"] == "SampleGrid":
            callback["init_args"]["sample_options"] = {"sampler": "ddim", "steps": 3}
    config["trainer"]["callbacks"].insert(0, {"class_path": "Likelihood", "init_args": {"num_batches": 1, "bpd_options": {"steps": 5}}})
    prior = config["model"]["init_args"]["prior"]["init_args"]
    prior["net"]["init_args"].update(hidden=32, num_layers=1)
    prior["timesteps"] = 50
    if first_stage is not None:
        config["model"]["init_args"]["first_stage_ckpt"] = str(first_stage)
    config["data"]["init_args"].update(batch_size=16, batches_per_epoch=2)
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_first_stage(run: Path) -> Path:
    """Train :data:`VAE_CONFIG` (3 steps, in this process) into ``run``; its ``last.ckpt``."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "vae.yaml").write_text(yaml.safe_dump(VAE_CONFIG))
    fit_here(run / "vae.yaml", run)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory) -> Path:
    return tiny_first_stage(tmp_path_factory.mktemp("vae"))


def test_latent_config_fits_on_a_vae_first_stage_and_a_resume_keeps_the_scale(vae_checkpoint, tmp_path, capsys):
    from lightning_diffusion.checkpoints import load_checkpoint
    from lightning_diffusion.commands import load_model

    config = latent_config(tmp_path / "latent.yaml", max_steps=4)
    # dotted overrides into the prior's config reach it (jsonargparse hands them over beside its class_path)
    width = "--model.init_args.prior.init_args.net.init_args.hidden=24"
    fit_here(config, tmp_path / "run", f"--model.init_args.first_stage_ckpt={vae_checkpoint}", width)
    first = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert first["state_dict"]["prior.net.time_embed.0.weight"].shape[0] == 24
    vae = load_checkpoint(vae_checkpoint)["state_dict"]
    scale = first["state_dict"]["latent_scale"]
    assert torch.isfinite(scale) and 0.05 < float(scale) < 20
    # the first stage is frozen: its weights are the VAE checkpoint's, in this checkpoint too (self-contained)
    for key, value in vae.items():
        assert torch.equal(first["state_dict"][f"first_stage.{key}"], value), key
    # the optimizer and the EMA hold the prior's parameters only
    prior_params = [k for k in first["state_dict"] if k.startswith("prior.") and "net" in k]
    assert sum(len(g["params"]) for g in first["optimizer_states"][0]["param_groups"]) == len(prior_params)
    ema = next(v for k, v in first["callbacks"].items() if k.startswith("EMA"))
    assert ema["shadow"] and all(name.startswith("prior.") for name in ema["shadow"])
    # the grid of digits x colours was drawn (guided) and a bound was logged under both parts' names
    assert (tmp_path / "run" / "samples" / "final.png").exists()

    # a resume that changes what the weights mean is refused before training, naming the option: a prior's
    # fixed option (its own resume_fixed_hparams: the same shapes, so only the rule can tell), its net's width,
    # another first-stage file (its weights would be ignored: the checkpoint's are used)
    latent_config(config, max_steps=6)
    other = tmp_path / "other.ckpt"
    other.write_bytes(vae_checkpoint.read_bytes())
    for change, named in ((("--model.init_args.prior.init_args.beta_schedule=cosine",),
                           "model.init_args.prior.init_args.beta_schedule: 'linear' in the checkpoint, 'cosine' now"),
                          (("--model.init_args.prior.init_args.net.init_args.hidden=16",),
                           "model.init_args.prior.init_args.net.init_args.hidden: 24 in the checkpoint, 16 now"),
                          ((f"--model.init_args.first_stage_ckpt={other}",),
                           f"model.init_args.first_stage_ckpt: '{vae_checkpoint}' in the checkpoint, '{other}' now")):
        first_stage = () if "first_stage_ckpt" in change[0] else (f"--model.init_args.first_stage_ckpt={vae_checkpoint}",)
        width_now = () if "hidden" in change[0] else (width,)
        with pytest.raises(SystemExit) as exited:
            fit_here(config, tmp_path / "run", *first_stage, *width_now, *change, "--ckpt_path=last")
        assert exited.value.code == 1 and named in capsys.readouterr().err, change
        assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4
    # a resume continues with the checkpoint's scale (not re-estimated from its first batch); a change of
    # the prior's label dropout (no weight's meaning) applies
    fit_here(config, tmp_path / "run", f"--model.init_args.first_stage_ckpt={vae_checkpoint}", width, "--ckpt_path=last",
             "--model.init_args.prior.init_args.label_dropout=0.2")
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6 and torch.equal(resumed["state_dict"]["latent_scale"], scale)
    assert resumed["hyper_parameters"]["prior"]["init_args"]["label_dropout"] == 0.2

    # the checkpoint alone rebuilds the model (no first-stage file) and samples images
    vae_checkpoint.rename(vae_checkpoint.with_suffix(".moved"))
    try:
        model, _, _ = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    finally:
        vae_checkpoint.with_suffix(".moved").rename(vae_checkpoint)
    assert model.latent_scale.item() == scale.item()
    images = model.sample(4, y=torch.tensor([0, 9, 40, 79]), guidance_scale=3.0, sampler="ddim", steps=3,
                          generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    x = torch.rand(2, 3, 16, 16).mul(255).round().div(127.5).sub(1)
    bpd = model.bits_per_dim(x, y=torch.tensor([1, 2]), steps=10)
    assert bpd.shape == (2,) and torch.isfinite(bpd).all() and model.bpd_estimator(steps=10) == "elbo+vlb-respaced-10"


def test_the_cli_refuses_a_first_stage_checkpoint_with_a_missing_key_before_training(vae_checkpoint, tmp_path, capsys):
    from lightning_diffusion.checkpoints import load_checkpoint

    ckpt = load_checkpoint(vae_checkpoint)
    dropped = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    del ckpt["state_dict"][dropped]
    broken = tmp_path / "broken.ckpt"
    torch.save(ckpt, broken)
    config = latent_config(tmp_path / "latent.yaml", max_steps=2)
    with pytest.raises(SystemExit) as exited:
        fit_here(config, tmp_path / "run", f"--model.init_args.first_stage_ckpt={broken}")
    line = capsys.readouterr().err.strip().splitlines()[-2]
    assert exited.value.code == 1
    assert line.startswith("lightning-diffusion fit: error: ") and str(broken) in line and f"missing keys ['{dropped}']" in line
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_the_vae_first_stage_nats_with_a_standard_normal_prior_are_its_elbo():
    """VAE.encode_latents: ``-log p(x | z) + log q(z | x) - log N(z; 0, I)`` averaged over draws of z is the
    negative ELBO that VAE.bits_per_dim computes with the KL in closed form."""
    from lightning_diffusion import VAE, ConvVAENet

    torch.manual_seed(0)
    vae = VAE(ConvVAENet(in_channels=1, image_size=8, latent_dim=4, channels=[8, 16], num_blocks=1),
              data_shape=(1, 8, 8)).eval()
    assert isinstance(vae, FirstStage) and vae.latent_shape == (4,) and vae.latent_categories is None
    x = torch.randint(0, 256, (3, 1, 8, 8)).float().div(127.5).sub(1)
    draws = 4000
    with torch.no_grad():
        z, nats = vae.encode_latents(x.repeat(draws, 1, 1, 1), torch.Generator().manual_seed(1))
        # what training draws (the encoder alone): the same z from the same generator
        assert torch.equal(vae.sample_latents(x.repeat(draws, 1, 1, 1), torch.Generator().manual_seed(1)), z)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        two_stage = ((nats - prior) / (64 * math.log(2))).view(draws, 3)
        elbo = torch.stack([vae.bits_per_dim(x, generator=torch.Generator().manual_seed(i)) for i in range(200)]).mean(0)
    error = two_stage.std(0) / math.sqrt(draws) + 0.01
    assert ((two_stage.mean(0) - elbo).abs() < 4 * error).all(), (two_stage.mean(0), elbo)
    assert vae.decode_latents(z[:2]).shape == (2, 1, 8, 8)


def test_the_scale_is_one_over_the_latents_std_set_once_and_every_prior_sampler_decodes(tmp_path):
    stage = ppca_stage()
    model = LatentDiffusion(str(save_stage(stage, tmp_path / "stage.ckpt")), exact_prior(2), data_shape=(4,))
    assert math.isnan(model.latent_scale.item()) and model.scale() == 1.0  # before the first training batch
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4000, 2, generator=g, dtype=torch.float64) @ stage.w.T + stage.mu
         + stage.sigma * torch.randn(4000, 4, generator=g, dtype=torch.float64)).float()
    # the aggregate posterior of exact PPCA is N(0, I), so the latents z' = c z have std c = 3
    assert abs(model.estimate_scale(x) - 1 / stage.c) < 0.01
    first = model.latent_scale.item()
    model.estimate_scale(x[:10] * 5)  # set once: a later batch does not change it
    assert model.latent_scale.item() == first
    # the prior's samplers (its options checked by the prior), decoded: the decoder's mean W z + mu
    cov = stage.w @ stage.w.T
    for options in ({"sampler": "ddim", "steps": 25}, {"sampler": "heun", "steps": 15}, {}):
        samples = model.sample(2000, generator=torch.Generator().manual_seed(4), **options).double()
        assert (torch.cov(samples.T) - cov).abs().max() < 0.25 * cov.abs().max(), options
        assert (samples.mean(0) - stage.mu).abs().max() < 0.15, options
    from lightning_diffusion.errors import OptionError

    with pytest.raises(OptionError, match="steps"):
        model.sample(2, sampler="ddim", steps=0)
    with pytest.raises(OptionError, match="guidance_scale"):
        model.check_sample_options(guidance_scale=3.0)  # the prior is not class-conditional


class BinningStage(L.LightningModule):
    """A test-only VQ-like first stage of points in {0, ..., 7}^2: the codes ``c = x // 2`` (K = 4,
    deterministic: ``log q = 0``), the decoder uniform on ``{2c, 2c + 1}`` per position, so
    ``first_stage_nats = 2 log 2`` and ``p(x) = p(c) / 4`` exactly."""

    latent_categories = 4
    latent_shape = (2,)

    def __init__(self, data_shape: tuple[int, ...] = (2,)):
        super().__init__()
        self.save_hyperparameters()
        self.data_shape = tuple(data_shape)

    def sample_latents(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.div(x, 2, rounding_mode="floor").long()

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.sample_latents(x), torch.full((x.shape[0],), 2 * math.log(2))

    def decode_latents(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return (2 * z + torch.randint(0, 2, z.shape, generator=generator)).float()


def test_a_discrete_prior_over_codes_gives_the_two_stage_bound_of_the_codes(tmp_path):
    from lightning_diffusion import DiscreteDiffusion, SequenceTransformer

    prior = DiscreteDiffusion(SequenceTransformer(num_categories=4, max_length=2, dim=16, depth=1, heads=2, dropout=0.0),
                              num_categories=4, corruption="uniform", timesteps=10, data_shape=(2,))
    model = LatentDiffusion(str(save_stage(BinningStage(), tmp_path / "vq.ckpt")), prior, data_shape=(2,))
    assert model.latent_scale.item() == 1.0 and model.bpd_estimator() == "vq+vlb"
    # an enumerable toy: the codes' joint law is known, so is the data's entropy (bits per dimension)
    table = torch.tensor([[0.4, 0.1, 0.0, 0.0], [0.05, 0.3, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.05]])
    g = torch.Generator().manual_seed(0)
    codes = torch.multinomial(table.flatten(), 512, replacement=True, generator=g)
    c = torch.stack([codes // 4, codes % 4], 1)
    x = (2 * c + torch.randint(0, 2, c.shape, generator=g)).float()
    entropy = (-(table[table > 0] * table[table > 0].log2()).sum() + 2) / 2  # H(c) + 2 bits of the bins, per dim
    optimizer = torch.optim.Adam(model.prior.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        batch = torch.randint(0, 512, (64,), generator=g)
        loss = model.loss({"x": x[batch]})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bpd = model.bits_per_dim(x, generator=torch.Generator().manual_seed(1)).double()
    prior_bpd = model.prior.bits_per_dim(c, generator=torch.Generator().manual_seed(1)).double()
    # the bound composes exactly: the codes' bound (2 positions) plus the 2 bits of the bins, over 2 dimensions
    assert torch.allclose(bpd, (prior_bpd * 2 + 2) / 2, atol=1e-5)
    # a bound on the data's NLL: its mean over the data is no less than the data's entropy (cross-entropy >= entropy)
    assert bpd.mean().item() >= entropy.item() - 3 * bpd.std().item() / math.sqrt(len(bpd))
    assert bpd.mean().item() < entropy.item() + 0.6  # and the trained prior is near it
    samples = model.sample(8, generator=torch.Generator().manual_seed(2))
    assert samples.shape == (8, 2) and ((samples >= 0) & (samples <= 7)).all()


def test_a_class_conditional_discrete_prior_scores_and_samples_each_label_exactly(tmp_path):
    """LatentDiffusion with a class-conditional DiscreteDiffusion prior over the codes of the binning stage, its
    net the label table (test_discrete_diffusion.LabelTableNet: codes i.i.d. ``pi_y = softmax(table[y])``).
    bits_per_dim(x, y) is the exact two-stage bound of each sample's own label (T = 1 absorbing: the prior's
    bound is ``-log p(c | y)`` itself; T = 3 with 2 timesteps per net call: the ratio of two labels' numbers on
    the same draws of x_t), y = None (and an unconditional prior) the null row's; guided sampling draws each
    code from ``softmax(w log pi_y + (1 - w) log pi_null)`` (classifier-free guidance in log space)."""
    from lightning_diffusion import DiscreteDiffusion
    from test_discrete_diffusion import LabelTableNet, label_table

    classes, table = 3, label_table(3, 4, seed=5)
    log_pi = torch.log_softmax(table, -1).double()
    stage = str(save_stage(BinningStage(), tmp_path / "vq.ckpt"))

    def model(timesteps: int, conditional: bool = True) -> LatentDiffusion:
        prior = DiscreteDiffusion(LabelTableNet(table), num_categories=4, corruption="absorbing", timesteps=timesteps,
                                  loss="vlb", num_classes=classes, class_conditional=conditional, bpd_chunk=2,
                                  data_shape=(2,))
        return LatentDiffusion(stage, prior, data_shape=(2,), num_classes=classes)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 8, (5, 2), generator=g).float()
    c, y = torch.div(x, 2, rounding_mode="floor").long(), torch.tensor([2, 0, 1, -1, 1])
    exact = (-log_pi[y][torch.arange(5)[:, None], c].sum(1) + 2 * math.log(2)) / (2 * math.log(2))
    one = model(1)
    assert one.class_conditional and one.bpd_estimator() == "vq+vlb"
    torch.testing.assert_close(one.bits_per_dim(x, y=y).double(), exact, atol=1e-5, rtol=0)
    null = (-log_pi[-1][c].sum(1) + 2 * math.log(2)) / (2 * math.log(2))
    torch.testing.assert_close(one.bits_per_dim(x).double(), null, atol=1e-5, rtol=0)
    # an unconditional prior (the null row at every call) ignores the labels
    torch.testing.assert_close(model(1, conditional=False).bits_per_dim(x, y=y).double(), null, atol=1e-5, rtol=0)

    three = model(3)
    constant = torch.tensor([[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]])  # codes (0, 0), (1, 1), (3, 3)
    codes = torch.tensor([0, 1, 3])
    a, b = torch.tensor([0, 1, 2]), torch.tensor([2, -1, 0])
    bits = [three.bits_per_dim(constant, y=labels, generator=torch.Generator().manual_seed(1)).double() * 2 - 2
            for labels in (a, b)]  # the prior's nats / ln 2 (2 positions), the bins' 2 bits taken off
    torch.testing.assert_close(bits[0] / bits[1], log_pi[a, codes] / log_pi[b, codes], atol=1e-5, rtol=1e-5)

    n, w = 4000, 2.5
    samples = one.sample(n, y=torch.full((n,), 1), guidance_scale=w, generator=torch.Generator().manual_seed(2))
    assert samples.shape == (n, 2) and one.last_sample_nfe == 1
    observed = torch.bincount(torch.div(samples, 2, rounding_mode="floor").long().flatten(), minlength=4).double()
    expected = torch.softmax(w * log_pi[1] + (1 - w) * log_pi[-1], 0) * 2 * n
    from test_discrete_math import chi2_z

    assert chi2_z(observed, expected)[2] < 3.5, (observed, expected)
    # the guidance changes the law: the conditional model's own law is far from these counts
    assert chi2_z(observed, torch.exp(log_pi[1]) * 2 * n)[2] > 10


def test_latent_discrete_config_fits_on_a_vq_first_stage_and_draws_the_guided_grid(tmp_path):
    """configs/vqvae_colour_digits.yaml trained 3 steps through the CLI, then
    configs/latent_discrete_colour_digits.yaml (shrunk: a small transformer, few sampling steps) for 3 steps on
    its checkpoint: the prior is the class-conditional absorbing DiscreteDiffusion over the 16 codes, the bound
    is named vq+masked-elbo and finite, the guided digits x colours grid is drawn, and the checkpoint alone
    samples images of guided labels."""
    from lightning_diffusion import DiscreteDiffusion
    from lightning_diffusion.commands import load_model
    from conftest import fit_run

    stage = fit_run(tmp_path, "vqvae_colour_digits", "--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3",
                    "--data.init_args.batch_size=16", "--trainer.limit_val_batches=0",
                    "--trainer.enable_progress_bar=false",
                    '--trainer.callbacks=[{"class_path": "LastCheckpoint", "init_args": {"every_n_train_steps": 3}}]')
    vq = stage / "checkpoints" / "last.ckpt"
    assert vq.is_file()
    config = yaml.safe_load((ROOT / "configs" / "latent_discrete_colour_digits.yaml").read_text())
    config["trainer"].update(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             check_val_every_n_epoch=1, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu")
    callbacks = config["trainer"]["callbacks"]
    callbacks.sort(key=lambda callback: callback["class_path"] == "LastCheckpoint")
    for callback in callbacks:
        if callback["class_path"] == "LastCheckpoint":
            callback["init_args"]["every_n_train_steps"] = 3
        if callback["class_path"] == "SampleGrid":
            callback["init_args"]["sample_options"] = {"steps": 4}
    callbacks.insert(0, {"class_path": "Likelihood", "init_args": {"num_batches": 1}})
    prior = config["model"]["init_args"]["prior"]["init_args"]
    prior["net"]["init_args"].update(dim=32, depth=1, heads=2)
    prior["elbo_samples"] = 4
    config["model"]["init_args"]["first_stage_ckpt"] = str(vq)
    config["data"]["init_args"].update(batch_size=16, batches_per_epoch=2)
    path = tmp_path / "latent_discrete.yaml"
    path.write_text(yaml.safe_dump(config))
    fit_here(path, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "samples" / "final.png").exists()
    model, _, _ = load_model(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.prior, DiscreteDiffusion) and model.prior.data_shape == (16,)
    assert model.class_conditional and model.latent_scale.item() == 1.0 and model.bpd_estimator() == "vq+masked-elbo"
    x = torch.randint(0, 256, (3, 3, 16, 16)).float().div(127.5).sub(1)
    bpd = model.bits_per_dim(x, y=torch.tensor([0, 41, 79]))
    assert bpd.shape == (3,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    images = model.sample(3, y=torch.tensor([0, 41, 79]), guidance_scale=3.0, steps=4,
                          generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_a_tiny_latent_model_fits_with_every_callback(tmp_path):
    """tests/tiny.py's LatentDiffusion (a class-conditional DDPM prior over a tiny VAE written to tmp_path) in a
    2-epoch fit on the digits with EMA, SampleGrid (guided), SampleQuality, Likelihood, WandbSamples (CSV) and
    LastCheckpoint: the bound is logged under the two-stage estimator's name, the quality of guided samples
    in the JSON lines, the grid and the checkpoint written; EMA averages the prior alone."""
    import json

    from lightning_diffusion import EMA, LastCheckpoint, Likelihood, SampleGrid, SampleQuality, ShardDataModule, WandbSamples
    from tiny import tiny_latent_model, tiny_trainer

    torch.manual_seed(0)
    model = tiny_latent_model(tmp_path, num_classes=10, class_conditional=True, warmup_steps=1)
    assert (tmp_path / "first_stage.ckpt").is_file() and model.latent_shape == (4,)
    sample_options = {"sampler": "ddim", "steps": 3}
    callbacks = [EMA(decay=0.9),
                 SampleGrid(num_samples=10, guidance_scale=2.0, sample_options=sample_options),
                 SampleQuality(num_samples=20, extractor="digits", batch_size=20, every_n_epochs=1, metrics=["fid"],
                               sample_options={**sample_options, "guidance_scale": 2.0}),
                 Likelihood(every_n_epochs=1, num_batches=1, bpd_options={"steps": 4}),
                 WandbSamples(every_n_epochs=0, num_samples=4, sample_options=sample_options),
                 LastCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2)]
    trainer = tiny_trainer(max_epochs=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="q"), callbacks=callbacks,
                           limit_val_batches=1, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(model, datamodule=ShardDataModule("digits", batch_size=16, num_workers=0, batches_per_epoch=2))
    run = tmp_path / "q" / "version_0"
    bpd = [json.loads(line) for line in (run / "metrics" / "likelihood.jsonl").read_text().splitlines()]
    # (large: the DDPM prior's Gaussian decoder at t = 0 is narrow, and 4 steps of an untrained net miss the latents)
    assert bpd[-1]["estimator"] == "elbo+vlb-respaced-4" and 0 < bpd[-1]["bpd"] < math.inf
    quality = [json.loads(line) for line in (run / "metrics" / "sample_quality.jsonl").read_text().splitlines()]
    assert len(quality) == 2 and quality[-1]["weights"] == "ema" and quality[-1]["fid"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and list(tmp_path.rglob("final.png"))
    ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
    assert ema.state_dict()["shadow"] and all(name.startswith("prior.") for name in ema.state_dict()["shadow"])


def test_grey_digits_latent_config_fits_on_the_vae_digits_config_named_from_the_command_line(tmp_path):
    """configs/vae_digits.yaml, then configs/latent_ddpm_digits.yaml (the latent row of
    bench_families_budget) on it, 3 steps each through the CLI, the first stage's path given on the
    command line: the checkpoint carries the VAE's weights unchanged, a 16-dimensional latent, and gives
    images and a finite two-stage bound under its name."""
    from conftest import fit_run

    from lightning_diffusion.checkpoints import load_checkpoint
    from lightning_diffusion.commands import load_model

    small = ("--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3", "--data.init_args.batch_size=16",
             "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false")
    vae_run = fit_run(tmp_path, "vae_digits", *small)
    vae_ckpt = vae_run / "checkpoints" / "last.ckpt"
    run = fit_run(tmp_path, "latent_ddpm_digits", *small, f"--model.init_args.first_stage_ckpt={vae_ckpt}",
                  "--model.init_args.prior.init_args.timesteps=50",
                  "--trainer.callbacks.init_args.sample_options={sampler: ddim, steps: 3}")
    latent = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert latent["global_step"] == 3 and latent["hyper_parameters"]["first_stage_ckpt"] == str(vae_ckpt)
    for key, value in load_checkpoint(vae_ckpt)["state_dict"].items():
        assert torch.equal(latent["state_dict"][f"first_stage.{key}"], value), key
    model, _, _ = load_model(run / "checkpoints" / "last.ckpt")
    assert tuple(model.latent_shape) == (16,) and tuple(model.data_shape) == (1, 8, 8)
    images = model.sample(2, sampler="ddim", steps=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    x = torch.randint(0, 256, (2, 1, 8, 8)).div(127.5).sub(1)
    bpd = model.bits_per_dim(x, steps=5)
    assert torch.isfinite(bpd).all() and model.bpd_estimator(steps=5) == "elbo+vlb-respaced-5"
