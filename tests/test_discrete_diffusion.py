"""The DiscreteDiffusion LightningModule against exact ground truth: with the Bayes-optimal denoiser its
bits_per_dim is the data's exact NLL (absorbing, continuous time) or a bound just above it (uniform,
T = 1000); a small net trained on an enumerable Markov chain lowers its bound towards the entropy and
samples it; bad input and bad options are refused naming them; and through the CLI a fit resumes
exactly (the importance sampler's history included), with every callback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from tiny import ROOT, shrink_config
from lightning_diffusion.models.discrete_diffusion import DiscreteDiffusion
from lightning_diffusion.nets.categorical import CategoricalUNet, SequenceTransformer
from test_discrete_math import all_states, exact_bound, exact_denoiser, markov_data

pytestmark = pytest.mark.usefixtures("one_thread")

K, L = 3, 4  # 81 data states


class ExactNet(nn.Module):
    """The Bayes-optimal per-position denoiser of the data (X, log_p) as a net of the contract."""

    data_kind = "sequences"

    def __init__(self, process, X, log_p):
        super().__init__()
        self.num_categories = process.num_categories
        self.denoise = exact_denoiser(process, X, log_p)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, y=None):
        return self.denoise(x_t, t.double()).float() + 0 * self.dummy


def _data_draws(log_p: torch.Tensor, X: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return X[torch.multinomial(log_p.exp(), n, replacement=True, generator=torch.Generator().manual_seed(seed))]


def _exact_model(corruption: str, timesteps: int, length: int = L) -> tuple[DiscreteDiffusion, torch.Tensor, torch.Tensor]:
    X, log_p = markov_data(K, length, seed=4)
    model = DiscreteDiffusion(nn.Identity(), num_categories=K, corruption=corruption, timesteps=timesteps,
                              loss="masked_elbo" if timesteps == 0 else "vlb", data_shape=(length,), elbo_samples=64,
                              bpd_chunk=100)
    model.net = ExactNet(model.process, X, log_p)
    return model, X, log_p


def test_bits_per_dim_with_the_exact_denoiser_is_the_exact_nll():
    """Absorbing diffusion in continuous time with the exact conditionals: bits_per_dim of every one of the
    81 states, averaged over 20 calls (64 stratified times each), is -log2 p(x) / L within 4 standard
    errors; the estimator is named."""
    model, X, log_p = _exact_model("absorbing", 0)
    draws = torch.stack([model.bits_per_dim(X, generator=torch.Generator().manual_seed(s)) for s in range(20)]).double()
    exact = -log_p / (L * math.log(2))
    z = ((draws.mean(0) - exact) / (draws.std(0) / math.sqrt(20)).clamp_min(1e-9)).abs()
    assert model.bpd_estimator() == "masked-elbo"
    assert float(z.max()) < 4.5, (float(z.max()), draws.mean(0)[:4], exact[:4])


def test_uniform_bound_with_the_exact_denoiser_sits_just_above_the_entropy():
    """Multinomial diffusion, T = 1000, the exact denoiser: the full bound over 2000 data draws is above the
    data's entropy by less than 0.01 bits/dim (the exact expectation's gap is ~0.0002 at T = 1000, the
    math tests) and not below it by more than 3 standard errors."""
    model, X, log_p = _exact_model("uniform", 1000)
    x = _data_draws(log_p, X, 500, seed=1)
    bpd = model.bits_per_dim(x, generator=torch.Generator().manual_seed(2)).double()
    entropy = float(-(log_p.exp() * log_p).sum()) / (L * math.log(2))
    mean, se = float(bpd.mean()), float(bpd.std() / math.sqrt(len(bpd)))
    assert model.bpd_estimator() == "vlb"
    assert -3 * se < mean - entropy < 0.01 + 3 * se, (mean, entropy, se)


def test_more_draws_per_term_narrow_the_per_sample_bound_around_its_exact_value():
    """Multinomial diffusion (T = 100), the exact denoiser, each of the 9 states (K = 3, L = 2) 128 times:
    bits_per_dim is an
    unbiased estimate of each state's bound (its exact expectation over x_t by enumeration,
    test_discrete_math.exact_bound): the mean of the 128 within 4.5 standard errors, with one draw of x_t per
    term and with four. The per-sample scatter around the exact value (rms) shrinks as 1 / sqrt(draws): four
    draws give about half of one draw's. ``draws`` is checked like every option."""
    from lightning_diffusion.errors import OptionError

    model, X, log_p = _exact_model("uniform", 100, length=2)
    exact = exact_bound(model.process, X, log_p) / (2 * math.log(2))  # [9] bits/dim
    repeats, rms = 128, {}
    for draws in (1, 4):
        bpd = model.bits_per_dim(X.repeat(repeats, 1), generator=torch.Generator().manual_seed(draws),
                                 draws=draws).double().view(repeats, len(X))
        error = bpd - exact
        z = (error.mean(0) / (bpd.std(0) / math.sqrt(repeats)).clamp_min(1e-9)).abs()
        assert float(z.max()) < 4.5, (draws, float(z.max()))
        rms[draws] = float(error.pow(2).mean().sqrt())
    # the terms are heavy-tailed at T = 100 (one draw lies up to several bits/dim above the bound), so the ratio of
    # the rms scatters (1.7 to 2.2 over seeds; 2.19 with these); 1 without the draws' average
    assert 1.6 < rms[1] / rms[4] < 2.5, rms
    for bad in (0, 1.5, True):
        with pytest.raises(OptionError, match="draws"):
            model.bits_per_dim(X[:2], draws=bad)


class LabelTableNet(nn.Module):
    """A class-conditional net whose x0 logits are one row of a table per label, the same at every position,
    time and x_t: ``logits[b, i] = table[y_b]`` (row -1, the last, for the null label and y = None). Under
    absorbing diffusion it is the exact denoiser of data whose positions are i.i.d. ``softmax(table[y])``."""

    data_kind = "sequences"

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.num_categories = table.shape[1]
        self.table = nn.Parameter(table.clone())

    def forward(self, x_t, t, y=None):
        rows = torch.full((x_t.shape[0],), -1) if y is None else y
        assert rows.shape == (x_t.shape[0],), (rows.shape, x_t.shape)
        return self.table[rows].view(x_t.shape[0], *([1] * (x_t.dim() - 1)), -1).expand(*x_t.shape, -1)


def label_table(classes: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random logits [classes + 1, k]: one row per label, the last the null label's."""
    return 1.5 * torch.randn(classes + 1, k, generator=torch.Generator().manual_seed(seed))


def test_the_discrete_time_bound_of_a_class_conditional_model_is_each_sample_s_own_label_s():
    """bits_per_dim(x, y) scores each sample under its own label, also when the bound stacks several timesteps
    per net call (bpd_chunk x B rows: the labels must follow their samples). Ground truth of the label-table net
    (positions i.i.d. softmax(table[y]) under absorbing diffusion, linear schedule, so q(x_T) is the mask):
    at T = 1 the bound is the decoder term alone, exactly ``-sum_i log2 softmax(table[y])[x_i] / L``; at T = 4
    its expectation is the same number, and with the same draws of x_t (same generator, the masks do not
    depend on y) a sample of constant category c scores ``m log(1 / pi_y(c))`` with one mask factor m, so two
    labels' numbers have the exact ratio ``log pi_a(c) / log pi_b(c)`` (in continuous time too: the masked
    ELBO's draws are the same, only the cross-entropy of the masked positions changes)."""
    k, length, classes = 3, 4, 3
    table = label_table(classes, k)
    log_pi = torch.log_softmax(table, -1).double()

    def model(timesteps: int, conditional: bool = True) -> DiscreteDiffusion:
        return DiscreteDiffusion(LabelTableNet(table), num_categories=k, corruption="absorbing", timesteps=timesteps,
                                 loss="vlb", data_shape=(length,), num_classes=classes,
                                 class_conditional=conditional, bpd_chunk=3)

    x = torch.randint(0, k, (6, length), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, -1, 2, 0])
    exact = -log_pi[y][torch.arange(6)[:, None], x].sum(1) / (length * math.log(2))
    torch.testing.assert_close(model(1).bits_per_dim(x, y=y).double(), exact, atol=1e-5, rtol=0)
    unconditional = -log_pi[-1][x].sum(1) / (length * math.log(2))  # y = None: the null label's row
    torch.testing.assert_close(model(1).bits_per_dim(x).double(), unconditional, atol=1e-5, rtol=0)

    four = model(4)  # T = 4, bpd_chunk = 3: net calls of 3 B rows, then B rows
    c = torch.tensor([0, 1, 2])
    constant = c[:, None].expand(3, length)
    a, b = torch.tensor([0, 1, 2]), torch.tensor([1, 2, -1])
    bits_a = four.bits_per_dim(constant, y=a, generator=torch.Generator().manual_seed(2)).double()
    bits_b = four.bits_per_dim(constant, y=b, generator=torch.Generator().manual_seed(2)).double()
    torch.testing.assert_close(bits_a / bits_b, log_pi[a, c] / log_pi[b, c], atol=1e-5, rtol=1e-5)
    # unbiased for the exact value: the mean of 600 samples' one-draw numbers within 4.5 standard errors
    many = four.bits_per_dim(x.repeat(100, 1), y=y.repeat(100), generator=torch.Generator().manual_seed(3)).double()
    many = many.view(100, 6)
    z = (many.mean(0) - exact) / (many.std(0) / 10)
    assert float(z.abs().max()) < 4.5, (many.mean(0), exact)
    # continuous time (the masked ELBO at stratified times, rows = B): the same exact ratio on the same draws
    masked = DiscreteDiffusion(LabelTableNet(table), num_categories=k, corruption="absorbing", timesteps=0,
                               loss="masked_elbo", data_shape=(length,), num_classes=classes, class_conditional=True,
                               elbo_samples=8)
    bits_a, bits_b = (masked.bits_per_dim(constant, y=labels, generator=torch.Generator().manual_seed(4)).double()
                      for labels in (a, b))
    torch.testing.assert_close(bits_a / bits_b, log_pi[a, c] / log_pi[b, c], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not class_conditional"):
        model(4, conditional=False).bits_per_dim(x, y=y)
    with pytest.raises(ValueError, match="5 labels for 6 samples"):
        four.bits_per_dim(x, y=y[:5])


@pytest.mark.parametrize("corruption,timesteps,loss", [("absorbing", 0, "masked_elbo"), ("uniform", 50, "hybrid")])
def test_training_lowers_the_bound_towards_the_entropy_and_samples_the_data(corruption, timesteps, loss):
    """A small SequenceTransformer on an enumerable Markov chain (K = 3, L = 4), 150 Adam steps: the bound on
    held-out draws falls from its initial value by most of the way to the entropy, ends within 0.25
    bits/dim of it (never below by more than 3 standard errors), and the samples' state frequencies are
    close to the data's (total variation < 0.2)."""
    torch.manual_seed(0)
    X, log_p = markov_data(K, L, seed=4)
    net = SequenceTransformer(num_categories=K, max_length=L, dim=32, depth=1, heads=2, dropout=0.0)
    model = DiscreteDiffusion(net, num_categories=K, corruption=corruption, timesteps=timesteps, loss=loss,
                              data_shape=(L,), elbo_samples=16, sample_steps=timesteps or 50)
    test = _data_draws(log_p, X, 500, seed=9)
    entropy = float(-(log_p.exp() * log_p).sum()) / (L * math.log(2))
    before = float(model.bits_per_dim(test, generator=torch.Generator().manual_seed(0)).mean())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        model.train()
        loss_value = model.loss({"x": _data_draws(log_p, X, 128, seed=100 + step)})
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
    bpd = model.bits_per_dim(test, generator=torch.Generator().manual_seed(0)).double()
    after, se = float(bpd.mean()), float(bpd.std() / math.sqrt(len(bpd)))
    assert after - entropy < 0.25 and after - entropy > -3 * se, (before, after, entropy)
    assert before - after > 0.6 * (before - entropy), (before, after, entropy)
    samples = model.sample(2000, generator=torch.Generator().manual_seed(3))
    assert samples.dtype == torch.int64 and samples.shape == (2000, L) and model.last_sample_nfe == (timesteps or 50)
    code = (samples * K ** torch.arange(L - 1, -1, -1)).sum(1)
    freq = torch.bincount(code, minlength=K**L).double() / len(code)
    tv = 0.5 * float((freq - log_p.exp()).abs().sum())
    assert tv < 0.2, tv


def test_images_sample_as_floats_in_the_contract_and_score_as_categories():
    """Digits-shaped data (K = 256): samples are images in [-1, 1] on the 8-bit grid (``k / 127.5 - 1``),
    categories with ``as_categories``; bits_per_dim takes them either way with the same result; the
    bound at the net's zero-initialised output is log2(256) = 8 bits/dim for absorbing in expectation
    (every masked pixel uniform over 256 values) and the loss finite in float32; guidance needs a class-conditional model."""
    torch.manual_seed(0)
    net = CategoricalUNet(num_categories=256, in_channels=1, image_size=8, model_channels=8, num_res_blocks=1,
                          attention_resolutions=(), num_classes=10)
    model = DiscreteDiffusion(net, num_categories=256, corruption="absorbing", timesteps=0, loss="masked_elbo",
                              data_shape=(1, 8, 8), num_classes=10, class_conditional=True, elbo_samples=4)
    x = torch.randint(0, 256, (6, 1, 8, 8))
    loss = model.loss({"x": x, "y": torch.arange(6)})
    assert torch.isfinite(loss)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    as_int = model.bits_per_dim(x, generator=gen())
    as_float = model.bits_per_dim(x.float() / 127.5 - 1, generator=gen())
    torch.testing.assert_close(as_int, as_float)
    model.elbo_samples = 64
    at_init = float(model.bits_per_dim(x.repeat(8, 1, 1, 1), generator=gen()).mean())
    assert abs(at_init - 8.0) < 0.15, at_init
    images = model.sample(4, y=torch.arange(4), guidance_scale=2.0, steps=5, generator=gen())
    assert images.dtype == torch.float32 and images.shape == (4, 1, 8, 8)
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    torch.testing.assert_close(torch.round((images + 1) * 127.5), (images + 1) * 127.5)
    cats = model.sample(4, y=torch.arange(4), steps=5, generator=gen(), as_categories=True)
    assert cats.dtype == torch.int64 and model.last_sample_nfe == 5


def test_sundae_unrolled_training_adds_the_cross_entropy_of_the_model_s_own_samples():
    """unroll_steps = 2 (SUNDAE): the loss is the same bound estimate plus the x0 cross-entropy after one
    feed-back of the model's own sample; at the zero-initialised net that term is log2(K) bits per
    dimension exactly (uniform logits), so the two losses differ by unroll_weight x log2(K)."""
    torch.manual_seed(0)
    net = SequenceTransformer(num_categories=5, max_length=6, dim=16, depth=1, heads=2, dropout=0.0)
    x = torch.randint(0, 5, (32, 6))
    losses = {}
    for unroll in (1, 2):
        model = DiscreteDiffusion(net, num_categories=5, data_shape=(6,), timesteps=10, loss="vlb",
                                  unroll_steps=unroll, unroll_weight=0.5)
        losses[unroll] = float(model.loss({"x": x}, generator=torch.Generator().manual_seed(1)))
    assert abs(losses[2] - losses[1] - 0.5 * math.log2(5)) < 1e-4, losses


def test_bad_input_and_options_are_refused_naming_them():
    net = SequenceTransformer(num_categories=5, max_length=6, dim=16, depth=1, heads=2)
    model = DiscreteDiffusion(net, num_categories=5, data_shape=(6,), timesteps=10)
    with pytest.raises(TypeError, match=r"batch\['x'\].*float32.*categorical: true"):
        model.loss({"x": torch.rand(4, 6)})
    with pytest.raises(ValueError, match=r"batch\['x'\].*\[0, 7\].*outside \[0, 5\)"):
        model.loss({"x": torch.tensor([[0, 1, 2, 3, 4, 7]] * 2)})
    with pytest.raises(ValueError, match="num_categories is not set"):
        DiscreteDiffusion(net, data_shape=(6,))
    with pytest.raises(ValueError, match="masked_elbo is the continuous-time loss"):
        DiscreteDiffusion(net, num_categories=5, data_shape=(6,), timesteps=10, loss="masked_elbo")
    with pytest.raises(ValueError, match="continuous time.*absorbing"):
        DiscreteDiffusion(net, num_categories=5, data_shape=(6,), corruption="uniform", timesteps=0, loss="masked_elbo")
    with pytest.raises(ValueError, match="no num_categories: it is not a categorical net"):
        model.check_net(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_categories=5 but the model.*has 7"):
        DiscreteDiffusion(net, num_categories=7, data_shape=(6,)).check_net(net)
    with pytest.raises(ValueError, match="takes sequences.*images.*use CategoricalUNet"):
        DiscreteDiffusion(net, num_categories=5, data_shape=(1, 8, 8)).check_net(net)
    from lightning_diffusion.errors import OptionError

    for options, match in (({"steps": 11}, "at most timesteps=10"), ({"sampler": "ddim"}, "unknown DiscreteDiffusion"),
                           ({"stpes": 3}, "did you mean steps"), ({"guidance_scale": 2.0}, "class_conditional"),
                           ({"temperature": 0}, "temperature")):
        with pytest.raises(OptionError, match=match):
            model.check_sample_options(**options)
    model.check_sample_options(sampler="sundae", steps=50)  # SUNDAE's steps are not bounded by T


def _tiny_config(path: Path, config: str, *lines: str) -> Path:
    """A packaged config with a small net, few steps per epoch and cheap callbacks; ``lines``
    (``"name=yaml value"``) set the model's options."""
    import yaml

    net = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())["model"]["init_args"]["net"]["init_args"]
    small = dict(model_channels=8, num_res_blocks=1, attention_resolutions=[]) if "model_channels" in net else \
        dict(dim=16, depth=1, heads=2)
    model = {key: yaml.safe_load(value) for key, value in (line.split("=") for line in lines)}
    return shrink_config(config, path, {
        "trainer": dict(max_steps=12, log_every_n_steps=2, check_val_every_n_epoch=1, enable_progress_bar=False),
        "model.init_args.net.init_args": small, "model.init_args": model,
        "data.init_args": dict(batch_size=16, batches_per_epoch=6, num_workers=0)},
        callbacks={"SampleQuality": dict(num_samples=20, batch_size=10, every_n_epochs=2, cache_stats=False,
                                         sample_options={"steps": 4}),
                   "Likelihood": dict(every_n_epochs=2, num_batches=1),
                   "SampleGrid": dict(num_samples=8, sample_options={"steps": 4})},
        add_callbacks=[{"class_path": "WandbSamples", "init_args": {"every_n_epochs": 1, "num_samples": 4,
                                                                    "sample_options": {"steps": 4}}}])


def _fit(tmp_path: Path, config: Path, run: Path, steps: int, *extra: str) -> dict:
    run_cli("fit", "--config", str(config), f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={run}",
            "--trainer.logger=false", *extra, cwd=tmp_path)
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_cli_fit_and_exact_resume_with_importance_sampling(tmp_path):
    """The uniform digits config at T = 20 with importance sampling of t (the vlb loss): 12 steps straight
    and 6 + resume + 6 give the same parameters, Adam moments, EMA averages and the importance sampler's
    loss history, bitwise; every callback ran (samples/final.png, W&B sample PNGs)."""
    config = _tiny_config(tmp_path / "uniform.yaml", "discrete_uniform_digits", "timesteps=20", "loss=vlb",
                          "importance_sampling=true", "sample_steps=4")
    straight = _fit(tmp_path, config, tmp_path / "a", 12)
    _fit(tmp_path, config, tmp_path / "b", 6)
    resumed = _fit(tmp_path, config, tmp_path / "b", 12, f"--ckpt_path={tmp_path}/b/checkpoints/last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 12
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert int(straight["state_dict"]["timestep_sampler.count"].sum()) == 12 * 16  # every draw recorded
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    ema_a, ema_b = (next(v for k, v in c["callbacks"].items() if k.startswith("EMA"))["shadow"] for c in (straight, resumed))
    assert ema_a and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert (tmp_path / "a" / "samples" / "final.png").is_file()
    assert len(list((tmp_path / "a" / "samples").glob("*.png"))) >= 3


def test_text_config_writes_decoded_samples(tmp_path):
    """The words config (needs the text extra) trains a few steps and writes samples/final.txt: one sample a
    line, letters a-z only (the pad symbol ends a word)."""
    pytest.importorskip("wonderwords")
    config = _tiny_config(tmp_path / "words.yaml", "discrete_words", "sample_steps=4")
    _fit(tmp_path, config, tmp_path / "w", 4)
    lines = (tmp_path / "w" / "samples" / "final.txt").read_text().splitlines()
    assert len(lines) == 8 and all(set(line) <= set("abcdefghijklmnopqrstuvwxyz") for line in lines)
