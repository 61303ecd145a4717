"""VQVAE: its bits/dim is a bound above the exact NLL of its own generative process (enumerated on a
toy), the EMA codebook's fixed point is the k-means centroid, perplexity, codebook statistics equal
over 2 DDP ranks (gloo) and equal to one process's, an exact (bitwise) resume with dead-code restarts
between the halves, and the coloured-digits configs through the CLI."""

from __future__ import annotations

import itertools
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from conftest import ROOT, fit_run
from lightning_diffusion import VAE, VQVAE, ConvVAENet, ConvVQNet
from lightning_diffusion.nets.codebook import EMACodebook, perplexity


def toy_model() -> VQVAE:
    """2x2 one-channel images, a 2x2 grid of K = 3 codes (81 code grids), codes far apart."""
    torch.manual_seed(0)
    net = ConvVQNet(in_channels=1, image_size=2, code_dim=2, channels=[8], num_blocks=1)
    model = VQVAE(net, num_codes=3, data_shape=(1, 2, 2))
    model.codebook.codebook.copy_(torch.tensor([[-3.0, -3.0], [0.0, 0.0], [3.0, 3.0]]))
    return model


def test_bound_is_above_the_exact_nll_of_its_generative_process():
    model = toy_model()
    x = torch.randint(0, 256, (32, 1, 2, 2), generator=torch.Generator().manual_seed(1)) / 127.5 - 1
    grids = torch.tensor(list(itertools.product(range(3), repeat=4))).view(81, 2, 2)  # every code grid
    with torch.no_grad():
        params = model._decoder_params(model.codebook.lookup(grids).movedim(-1, 1))  # [81, P, 2, 2]
        log_px_c = torch.stack([model.likelihood.log_prob(xb.expand(81, -1, -1, -1), params) for xb in x])  # [32, 81]
    log_prior = -4 * math.log(3)
    exact = -(torch.logsumexp(log_px_c, 1) + log_prior)  # -log sum_c p(c) p(x | c), nats
    codes, first_stage = model.encode_latents(x)
    assert torch.equal(model.sample_latents(x), codes)  # what training uses: the codes alone
    assert codes.dtype == torch.int64 and codes.shape == (32, 2, 2) and model.latent_shape == (2, 2)
    assert model.latent_categories == 3
    chosen = (codes.flatten(1) * torch.tensor([27, 9, 3, 1])).sum(1)  # the index of each code grid in `grids`
    assert torch.allclose(first_stage, -log_px_c[torch.arange(32), chosen], atol=1e-4)
    bound = model.bits_per_dim(x) * x[0].numel() * math.log(2)
    assert torch.allclose(bound, first_stage - log_prior, atol=1e-4)  # -log p(x | c*) + h w log K
    assert bool((bound >= exact - 1e-5).all())
    # the gap is -log p(c* | x): the bound is tight where the posterior puts its mass on c*
    posterior = log_px_c[torch.arange(32), chosen] - torch.logsumexp(log_px_c, 1)
    assert torch.allclose(bound - exact, -posterior, atol=1e-4)
    assert (bound - exact).max() > 0.01  # not trivially tight: the bound is not the exact NLL here
    assert model.bpd_estimator() == "vq-uniform-prior"
    assert model.decode_latents(codes, decoder="mean").shape == x.shape
    assert model.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, 1, 2, 2)


def test_ema_fixed_point_is_the_kmeans_centroid_and_perplexity():
    book = EMACodebook(4, 3, decay=0.9, dead_code_steps=0)
    z = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) + 5
    codes = torch.arange(100) % 4  # fixed assignments, 25 vectors each
    for _ in range(400):  # 0.9^400 ~ 5e-19: the start is forgotten
        counts = book.update(z, codes)
    centroids = torch.stack([z[codes == k].mean(0) for k in range(4)])
    assert torch.allclose(book.codebook, centroids, rtol=1e-5, atol=1e-5)
    assert torch.allclose(book.cluster_size, torch.full((4,), 25.0))
    assert torch.equal(counts, torch.full((4,), 25.0)) and int(book.restarts) == 0
    assert perplexity(torch.full((7,), 3.0)).item() == pytest.approx(7.0)
    assert perplexity(torch.tensor([0.0, 5.0, 0.0])).item() == pytest.approx(1.0)
    assert perplexity(torch.tensor([1.0, 1.0, 2.0])).item() == pytest.approx(2 ** 1.5)


def test_dead_codes_restart_at_encoder_outputs():
    book = EMACodebook(6, 2, dead_code_steps=2, seed=0)
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    codes = torch.zeros(10, dtype=torch.long)  # only code 0 is used
    book.update(z, codes)
    assert int(book.restarts) == 0 and book.steps_unused.tolist() == [0, 1, 1, 1, 1, 1]
    book.update(z, codes)
    assert int(book.restarts) == 5 and book.steps_unused.tolist() == [0] * 6
    for k in range(1, 6):  # each restarted code is one of the step's encoder outputs
        assert (book.codebook[k] == z).all(1).any()


def test_codebook_statistics_are_equal_over_ddp_ranks_and_to_one_process():
    """2 processes (gloo), each with half the batch: every buffer equal on both ranks (the EMA statistics
    all-reduced, the restarted codes broadcast from rank 0), and equal to one process on the whole batch."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "scripts"))  # spawned processes inherit sys.path
    from vq_ddp import codebook_run, data, worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
    for name in ("plain", "restarts"):
        for key, value in out[0][name].items():
            assert torch.equal(value, out[1][name][key]), f"{name}: {key} differs between the ranks"
    assert int(out[0]["restarts"]["restarts"]) > 0  # restarts happened, and both ranks took rank 0's
    single = codebook_run(0, data(), 0)
    for key, value in single.items():
        assert torch.allclose(value.double(), out[0]["plain"][key].double(), atol=1e-5), key


def test_refused_options_and_data():
    net = ConvVQNet(in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="VQVAE has no option beta=2.0"):
        VQVAE(net, data_shape=(1, 8, 8), beta=2.0)
    with pytest.raises(ValueError, match="VQVAE takes images"):
        VQVAE(net, data_shape=(2,))
    model = VQVAE(net, num_codes=8, data_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"expected \[B, 4, 4\]"):
        model.decode_latents(torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"int64 in \[0, 8\)"):
        model.decode_latents(torch.full((2, 4, 4), 8))


def test_resume_is_bitwise_exact_with_restarts_between_the_halves(tmp_path):
    from test_resume import CONFIG, assert_same, final_state, fit_here

    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["model"] = {"class_path": "VQVAE", "init_args": {
        "net": {"class_path": "ConvVQNet", "init_args": {"code_dim": 4, "channels": [8, 16], "num_blocks": 1}},
        "num_codes": 32, "dead_code_steps": 2, "lr": 1e-3, "warmup_steps": 5}}
    config["data"]["init_args"].update(num_workers=0)

    def write(name: str, steps: int):
        config["trainer"]["max_steps"] = steps
        (tmp_path / name).write_text(yaml.safe_dump(config))
        return tmp_path / name

    fit_here(write("c14.yaml", 14), tmp_path / "straight")
    split = tmp_path / "split"
    fit_here(write("c8.yaml", 8), split)
    at8 = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    fit_here(write("c14b.yaml", 14), split, f"--ckpt_path={split}/checkpoints/last.ckpt")
    straight, resumed = final_state(tmp_path / "straight"), final_state(split)
    assert_same(straight, resumed)  # parameters, EMA, Adam, scheduler; the state dict holds the codebook buffers
    assert any(k.startswith("codebook.") for k in straight["params"])
    assert int(straight["params"]["codebook.restarts"]) > int(at8["state_dict"]["codebook.restarts"])


def test_colour_digits_configs_fit_and_reload(tmp_path):
    args = ("--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3", "--trainer.check_val_every_n_epoch=1",
            "--trainer.limit_val_batches=2", "--data.init_args.batch_size=16")
    run = fit_run(tmp_path, "vqvae_colour_digits", *args)
    model = VQVAE.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, ConvVQNet) and model.data_shape == (3, 16, 16) and model.latent_shape == (4, 4)
    assert (run / "samples" / "final.png").is_file() and list((run / "samples").glob("reconstructions-*.png"))
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "val/perplexity", "val/codebook_usage"} <= set(header)
    run = fit_run(tmp_path, "vae_colour_digits", *args)
    vae = VAE.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(vae.net, ConvVAENet) and vae.data_shape == (3, 16, 16)
    assert vae.sample(2).shape == (2, 3, 16, 16) and (run / "samples" / "final.png").is_file()


def test_grey_digits_config_fits_and_its_bound_pays_the_uniform_prior(tmp_path):
    """configs/vqvae_digits.yaml (the VQ-VAE row of bench_families_budget) 3 steps through the CLI: a 4x4
    grid of 64 codes over the 1x8x8 digits, so the uniform prior costs exactly 16 log2(64) / 64 = 1.5
    bits/dim, and every image's bound exceeds it by the decoder's -log2 p(x | codes) > 0."""
    run = fit_run(tmp_path, "vqvae_digits", "--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3",
                  "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1",
                  "--data.init_args.batch_size=16")
    model = VQVAE.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, ConvVQNet) and model.data_shape == (1, 8, 8) and model.latent_shape == (4, 4)
    assert model.num_codes == 64 and model.bpd_estimator() == "vq-uniform-prior"
    assert model.prior_nats / (64 * math.log(2)) == pytest.approx(1.5, abs=1e-12)
    x = torch.randint(0, 256, (4, 1, 8, 8)).div(127.5).sub(1)
    bpd = model.bits_per_dim(x)
    assert bpd.shape == (4,) and (bpd > 1.5).all() and torch.isfinite(bpd).all()
    assert model.sample(3).shape == (3, 1, 8, 8) and (run / "samples" / "final.png").is_file()
