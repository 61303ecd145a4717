"""Every model family on 2 CPU processes (gloo), through Lightning's own launcher
(``tests/scripts/families.py``):

- DDP: one step on a fixed global batch gives every rank the gradient of the single-process mean
  loss over that batch (each half drawn with its rank's seed), and the same EMA averages;
- ModelParallelStrategy (FSDP2, ``configure_model``): parameters and EMA averages are sharded
  DTensors; SampleQuality, Likelihood and ``sample`` run on the sharded model; a resume from the
  sharded checkpoint directory ends bitwise equal to the straight run;
- the VQ-VAE's EMA codebook (buffers, not parameters: never sharded) is one codebook on every rank,
  moved by the all-reduced statistics of the global batch, under both.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import tiny_model
from conftest import assert_ended_cleanly

FAMILIES = ["ddpm", "score_sde", "vae", "hvae", "vqvae", "ebm", "discrete"]
POINTS = ("score_sde", "ebm", "ebm_recovery")
#: and a DDPM of parameterization energy (its loss backpropagates through grad_x E: a double backward),
#: whose one-step gradients are also checked under FSDP2 ("energy-fsdp2")
#: and the EBM's recovery objective (one DDP step and one FSDP2 step, "ebm_recovery-fsdp2": the per-rank
#: Langevin negatives of each level's conditional), which also trains, evaluates (its ladder bound by AIS
#: on the sharded net) and samples under FSDP2
DDP_FAMILIES = [*FAMILIES, "energy", "energy-fsdp2", "ebm_recovery", "ebm_recovery-fsdp2"]
FSDP2_FAMILIES = [*FAMILIES, "energy", "ebm_recovery"]
SCRIPT = Path(__file__).parent / "scripts" / "families.py"


def run_families(mode: str, out: Path, families: list[str] = FAMILIES) -> None:
    from lightning_diffusion.metrics import get_extractor

    get_extractor("digits")  # train the digits classifier once, before the ranks race for it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), *families], env=env, capture_output=True,
                          text=True, timeout=400)
    # the output is both ranks' (rank 1 is the launcher's child): neither may abort at its end
    assert_ended_cleanly(proc.returncode, proc.stdout + proc.stderr, f"families.py {mode}")


def load(out: Path, name: str) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1))


def test_ddp_gradients_equal_single_process_on_a_fixed_batch(tmp_path):
    """Also for ``energy``, a DDPM whose net is an EnergyHead (parameterization energy): its loss
    backpropagates through grad_x E (create_graph, a double backward) and DDP still gives every rank
    the single-process gradient of the global batch; so does FSDP2 (``energy-fsdp2``: measured, the
    largest difference 4.5e-8 of gradients up to 0.42)."""
    run_families("ddp", tmp_path, DDP_FAMILIES)
    for family in DDP_FAMILIES:
        rank0, rank1 = load(tmp_path, f"{family}-ddp")
        reference = rank0["reference"]
        assert set(rank0["grads"]) == set(reference), family
        assert sum(bool(g.abs().sum() > 0) for g in reference.values()) >= 0.9 * len(reference), \
            f"{family}: most gradients are zero; the comparison would prove little"
        for name, ref in reference.items():
            # observed: bitwise equal on CPU; asserted to float32 round-off
            torch.testing.assert_close(rank0["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=f"{family} {name}")
            assert torch.equal(rank0["grads"][name], rank1["grads"][name]), f"{family} {name}: ranks differ"
        assert rank0["loss"] != rank1["loss"], f"{family}: both ranks saw the same loss (same half?)"
        for name, average in rank0["ema"].items():
            assert torch.equal(average, rank1["ema"][name]), f"{family} EMA {name}: ranks differ"
        if family == "discrete":  # the importance-sampling history holds both ranks' 8 terms, on each rank
            assert all(torch.equal(v, rank1["history"][k]) for k, v in rank0["history"].items())
            assert int(rank0["history"]["count"].sum()) == 16
        if family == "vqvae":  # one EMA step on the statistics of both halves: one process's on all 16 images
            single = rank0["reference_codebook"]
            for name, value in rank0["codebook"].items():
                assert torch.equal(value, rank1["codebook"][name]), f"vqvae codebook {name}: ranks differ"
                # observed: equal to 1.2e-7 (the all-reduce sums the two halves' sums in another order)
                torch.testing.assert_close(value, single[name], rtol=1e-5, atol=1e-6, msg=f"vqvae codebook {name}")
            # N_k = 0.99 N_k + 0.01 n_k from N_k = 1: the counts n_k of both ranks' 16 images x 4x4 codes
            assert float(rank0["codebook"]["cluster_size"].sum()) == pytest.approx(0.99 * 16 + 0.01 * 16 * 4 * 4)


def test_every_family_trains_evaluates_samples_and_resumes_exactly_under_fsdp2(tmp_path):
    run_families("fsdp2", tmp_path, FSDP2_FAMILIES)
    for family in FSDP2_FAMILIES:
        rank0, rank1 = load(tmp_path, family)
        assert rank0["param_type"] == rank0["shadow_type"] == "DTensor", family
        assert rank0["fsdp_units"] >= 2, family  # the net (and its blocks, a VAE's head) are units
        full, local = rank0["full_shape"], rank0["local_shape"]  # of the largest parameter
        assert local == (math.ceil(full[0] / 2), *full[1:]), family  # rank 0 holds the first half of dim 0
        assert rank0["step"] == 4
        for name, value in rank0["params"].items():
            assert torch.equal(value, rank1["params"][name]), f"{family} {name}: ranks disagree"
        if family in ("ddpm", "hvae", "ebm", "discrete", "vqvae", "energy"):  # families.RESUMED
            assert rank0["resumed_step"] == 4
            for name, value in rank0["params"].items():
                assert torch.equal(value, rank0["resumed_params"][name]), f"{family} {name}: resume not exact"
            for name, value in rank0["ema"].items():
                assert torch.equal(value, rank0["resumed_ema"][name]), f"{family} EMA {name}: resume not exact"
        if family == "ebm":  # each rank's own replay buffer, restored from the sharded checkpoint
            for rank in (rank0, rank1):
                assert all(torch.equal(rank["replay"][k], rank["resumed_replay"][k]) for k in ("x", "age"))
            assert not torch.equal(rank0["replay"]["x"], rank1["replay"]["x"])  # per rank
        if family == "discrete":  # the importance-sampling history (buffers), restored from the sharded checkpoint
            for rank in (rank0, rank1):
                assert all(torch.equal(rank["history"][k], rank["resumed_history"][k]) for k in rank["history"])
            # every rank records every rank's terms (gathered), so p_t is the same on each: 4 steps x 2 x 16
            assert all(torch.equal(rank0["history"][k], rank1["history"][k]) for k in rank0["history"])
            assert int(rank0["history"]["count"].sum()) == 4 * 2 * 16
        if family == "vqvae":  # rank 1 built another codebook (families.OtherCodebookOnRankOne): rank 0's is
            # broadcast before training, then the all-reduced EMA statistics and rank 0's restarts keep one
            for name, value in rank0["codebook"].items():
                assert torch.equal(value, rank1["codebook"][name]), f"vqvae codebook {name}: ranks differ"
                for rank in (rank0, rank1):  # the buffers and the restart generator, from the sharded checkpoint
                    assert torch.equal(rank["codebook"][name], rank["resumed_codebook"][name]), f"vqvae {name}"
            assert int(rank0["codebook"]["restarts"]) > 0  # dead codes restarted at rank 0's draws
        assert any(not torch.equal(v, rank0["params"][n]) for n, v in rank0["ema"].items()), family
        # evaluation runs on the EMA averages (swapped into the sharded parameters), then swaps back
        used, evaluated = rank0["evaluated"]
        assert used == "ema" and all(torch.equal(evaluated[n], v) for n, v in rank0["ema"].items()), family
        assert all(torch.equal(rank0["after_evaluation"][n], v) for n, v in rank0["params"].items()), family
        samples = rank0["samples"]
        assert torch.isfinite(samples).all() and torch.equal(samples, rank1["samples"]), family
        assert samples.shape == ((6, 2) if family in POINTS else (6, 1, 8, 8)), family
        quality, likelihood = rank0["quality"], rank0["likelihood"]
        if family == "score_sde":
            assert len(rank0["refused"]) == 2 and all("sharded (FSDP) model" in m for m in rank0["refused"])
        if family in POINTS:
            assert quality["val/energy_distance"] > 0 and math.isfinite(quality["val/mmd"])
        else:
            assert quality["val/fid_num_samples"] == 20 and math.isfinite(quality["val/fid"]), family
            if family != "discrete":  # checked last, below
                assert 0 < quality["val/fid"] < 1000, family
        # the recovery EBM's ladder bound after 4 steps: 269 bits/dim (measured; E = net / s_0^2 scales the
        # untrained net's output by ~4000 at level 0)
        assert likelihood["val/bpd_num_samples"] > 0 and 0 < likelihood["val/bpd"] < (1000 if family == "ebm_recovery" else 20), family
        assert quality == rank1["quality"] and likelihood == rank1["likelihood"], family

    # the sharded checkpoint folder as one file: full weights, EMA averages and optimizer state
    from lightning_diffusion.callbacks.ema import ema_state_from_checkpoint
    from lightning_diffusion.commands import consolidate

    rank0, _ = load(tmp_path, "ddpm")
    folder = tmp_path / "ddpm-split" / "ck" / "last.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file()
    ckpt = torch.load(consolidate(ckpt_path=str(folder)), weights_only=False)
    assert ckpt["global_step"] == 4 and len(ckpt["optimizer_states"]) == 1
    assert set(ckpt["state_dict"]) >= set(rank0["resumed_params"])
    for name, value in rank0["resumed_params"].items():
        assert torch.equal(ckpt["state_dict"][name], value), name
    for name, value in ema_state_from_checkpoint(ckpt).items():
        assert torch.equal(value, rank0["resumed_ema"][name]), name

    # last, so that it hides none of the checks above: the discrete family's FID compares its samples
    # (floats in [-1, 1]) with real images that must be on the same scale
    fid = load(tmp_path, "discrete")[0]["quality"]["val/fid"]
    assert 0 < fid < 1000, (f"discrete: FID {fid:.4g}; SampleQuality's real statistics of categorical data "
                            "(int64 8-bit categories in [0, 256)) must be taken as images in [-1, 1], like the samples")


def test_tensor_parallel_is_refused_with_a_clear_error():
    from lightning_diffusion import DDPM, UNet

    model = tiny_model("ddpm", net=dict(model_channels=8, channel_mult=(1,), dropout=0.1), timesteps=1000)

    class Mesh:  # the names and sizes of a 1 x 2 (data x tensor) mesh, without a process group
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return type("Sub", (), {"size": lambda self: 2 if name == "tensor_parallel" else 1})()

    model._device_mesh = Mesh()
    with pytest.raises(ValueError, match="tensor parallelism is not supported"):
        model.configure_model()


def _ddp_overrides(config: Path) -> list[str]:
    """Tiny settings that keep a config's model family, net class and callbacks."""
    import yaml

    text = yaml.safe_load(config.read_text())
    model = text["model"]["class_path"]
    args = ["--trainer.max_steps=2", "--data.init_args.batches_per_epoch=2", "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=8", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    if "cifar10" in config.name:  # no CIFAR-10 here: the same model on the 32x32 digits, narrower
        args += ["--data.init_args.dataset=digits32"]
        args += (["--model.init_args.net.init_args.width=16"] if model == "HierarchicalVAE" else
                 ["--model.init_args.net.init_args.model_channels=32"])
    if model == "DDPM":
        args += ["--model.init_args.timesteps=50"]  # >= the configs' DDIM steps
    if model == "ScoreSDE":
        args += ["--model.init_args.sample_steps=3"]
    if model == "EBM" and text["model"]["init_args"].get("objective") == "recovery":  # no buffer: refused there
        args += ["--model.init_args.recovery_steps=2", "--model.init_args.quadrature_points=51"]
    elif model == "EBM":
        args += ["--model.init_args.sample_steps=3", "--model.init_args.mcmc_steps=2",
                 "--model.init_args.buffer_size=32", "--model.init_args.quadrature_points=51"]
    if model == "DiscreteDiffusion":  # timesteps stays (T = 1000: the process the config defines); fewer
        # sampler steps (SampleGrid's final samples) and bound times. One validation batch at the end of
        # the one epoch (val/loss and the val/ terms reduced over ranks); the Likelihood callbacks (every
        # 30+ epochs) do not run in 2 steps, so the full 1000-step bound is not computed here
        args += ["--model.init_args.sample_steps=3", "--model.init_args.elbo_samples=2",
                 "--trainer.check_val_every_n_epoch=1"]
    return args


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_config_trains_under_ddp(config, tmp_path):
    """``--trainer.strategy=ddp --trainer.devices=2`` on CPU (gloo), each shipped config, through the
    CLI: 2 steps, validation, its callbacks and the final samples (tiny settings)."""
    from conftest import ROOT, run_cli

    path = ROOT / "configs" / config
    extra = []
    if "latent" in config:  # a first stage first: the tiny VAE of test_latent_diffusion, one process
        from test_latent_diffusion import tiny_first_stage

        extra = [f"--model.init_args.first_stage_ckpt={tiny_first_stage(tmp_path / 'first_stage')}",
                 "--model.init_args.prior.init_args.timesteps=50"]
    run_cli("fit", "--config", str(path), "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            *_ddp_overrides(path), *extra, separate_process=True, timeout=900)
    ckpt = next(p for p in tmp_path.rglob("last.ckpt") if "first_stage" not in str(p))
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    if "latent" in config:  # the scale of the first batch, all-reduced over both ranks' batches
        assert torch.isfinite(torch.load(ckpt, weights_only=False)["state_dict"]["latent_scale"])
