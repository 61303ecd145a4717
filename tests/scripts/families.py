"""Every model family on 2 CPU processes (gloo); run by tests/test_distributed.py.

``python families.py fsdp2 OUT FAMILY...``: ModelParallelStrategy (FSDP2: ``fully_shard`` in
``configure_model``). For each family: train 4 steps straight with EMA, SampleQuality, Likelihood and LastCheckpoint
(a sharded checkpoint directory every 2 steps) and sample; for the families in ``RESUMED``, also
train 2 steps, resume from that directory and train 2 more. Every rank writes ``OUT/<family>-rank<r>.pt`` with what the test checks:
the parameter and EMA types and local shapes (sharded?), full parameters and EMA averages of both
runs, the evaluation callbacks' results, a sample batch, and the global steps.

``python families.py ddp OUT FAMILY...``: one DDP step (``FAMILY-fsdp2``: one FSDP2 step) on a fixed global batch of 16 (8 per rank)
with EMA. Every rank writes ``OUT/<family>-ddp-rank<r>.pt`` with its all-reduced gradients and EMA
averages; rank zero adds the single-process reference: the gradient of the mean of the two halves'
losses, each half drawn with the same seed as its rank (so dropout, label dropout and the training
noise are the same draws).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_diffusion import EMA, MLP, EnergyHead, LastCheckpoint, Likelihood, SampleQuality, ShardDataModule, evaluation_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tiny models and trainer
from tiny import tiny_model, tiny_trainer, tiny_unet  # noqa: E402


def build(family: str) -> tuple[L.LightningModule, ShardDataModule, dict, dict]:
    """The model, its data, SampleQuality options and Likelihood options (fixed step counts: every
    rank makes the same number of net calls, as a sharded model needs)."""
    images = ShardDataModule("digits", batch_size=16, num_workers=0, batches_per_epoch=2, shuffle_buffer=64)
    image_quality = {"extractor": "digits", "metrics": ["fid"], "num_samples": 20, "batch_size": 10}
    common = dict(warmup_steps=2, lr=1e-3)
    conditional = dict(num_classes=10, class_conditional=True, label_dropout=0.2)
    if family == "ddpm":
        model = tiny_model("ddpm", net=dict(attention_resolutions=(4,), dropout=0.1, num_classes=10), timesteps=50,
                           **conditional, **common)
        return model, images, {**image_quality, "sample_options": {"sampler": "ddim", "steps": 3}}, {"steps": 3}
    if family == "energy":  # the energy parameterization: the loss backpropagates through grad_x E (double backward)
        model = tiny_model("ddpm", net=EnergyHead(tiny_unet(attention_resolutions=(4,), dropout=0.1, num_classes=10)),
                           timesteps=50, parameterization="energy", **conditional, **common)
        return model, images, {**image_quality, "sample_options": {"sampler": "ddim", "steps": 3}}, {"steps": 3}
    if family == "score_sde":
        points = ShardDataModule("gaussians8", batch_size=32, num_workers=0, batches_per_epoch=2, shuffle_buffer=64)
        model = tiny_model("score_sde", net=MLP(in_channels=2, hidden=32, num_layers=2, time_embed_dim=16),
                           data_shape=(2,), **common)
        return model, points, {"num_samples": 20, "batch_size": 10, "num_real": 256,
                               "sample_options": {"sampler": "euler_maruyama", "steps": 4}}, {"steps": 3}
    if family == "vae":
        model = tiny_model("vae", net=dict(latent_dim=4, channels=(8, 16)), likelihood=None, **common)
        return model, images, image_quality, {"num_importance_samples": 4}
    if family == "hvae":
        model = tiny_model("hvae", net=dict(latent_channels=2, latent_resolutions=(1, 4), groups_per_resolution=(1, 1)),
                           likelihood=None, **common)
        return model, images, image_quality, {"num_importance_samples": 4}
    if family == "vqvae":  # the EMA codebook: buffers moved by all-reduced statistics, not by gradients; a code
        # unused on every rank for 2 steps restarts at an encoder output drawn on rank 0 and broadcast
        model = tiny_model("vqvae", dead_code_steps=2, **common)
        return model, images, image_quality, {}
    if family == "ebm":  # persistent CD: a replay buffer per rank, Langevin chains, quadrature log Z
        points = ShardDataModule("gaussians8", batch_size=32, num_workers=0, batches_per_epoch=2, shuffle_buffer=64)
        return tiny_model("ebm", **common), points, {"num_samples": 20, "batch_size": 10, "num_real": 256,
                                                     "sample_options": {"steps": 3}}, {}
    if family == "ebm_recovery":  # diffusion recovery likelihood: per-rank Langevin negatives on each level's conditional
        from lightning_diffusion import EBM, EnergyMLP

        points = ShardDataModule("gaussians8", batch_size=32, num_workers=0, batches_per_epoch=2, shuffle_buffer=64)
        model = EBM(EnergyMLP(2, 32, 2, time_embed_dim=16), data_shape=(2,), objective="recovery", recovery_steps=3,
                    recovery_step_factor=0.05, quadrature_points=51, **common)
        model.fit_base(tiny_model("ebm").base().sample(256, torch.Generator().manual_seed(1)))  # the tiny EBM's base
        return model, points, {"num_samples": 20, "batch_size": 10, "num_real": 256}, {}
    if family == "discrete":  # absorbing D3PM in discrete time on the digits' 8-bit categories (K = 256)
        # T = 20 with the hybrid loss, not continuous time: it runs the discrete-time code (the
        # importance-sampling buffers, the exact bound over every t in chunks of bpd_chunk = 8 steps per
        # net call, so 8 + 8 + 4, and the respaced ancestral grid); the configs' DDP test covers the
        # continuous-time masked ELBO (discrete_absorbing_digits, discrete_words)
        categories = ShardDataModule("digits", categorical=True, batch_size=16, num_workers=0, batches_per_epoch=2,
                                     shuffle_buffer=64)
        model = tiny_model("discrete", net=dict(num_classes=10, attention_resolutions=(4,), dropout=0.1),
                           importance_sampling=True, **conditional, **common)
        return model, categories, {**image_quality, "sample_options": {"steps": 4}}, {}
    raise ValueError(family)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class OtherCodebookOnRankOne(L.Callback):
    """Rank 1 starts from another codebook, as with a seed per rank (``srun`` and ``seed_everything:
    true``): FSDP2, unlike DDP, broadcasts no buffers, so the VQ-VAE must make rank 0's everyone's."""

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == 1:
            fresh = torch.randn(pl_module.codebook.codebook.shape, generator=torch.Generator().manual_seed(1))
            pl_module.codebook.codebook.copy_(fresh)
            pl_module.codebook.embed_sum.copy_(fresh)


def fit(family: str, root: str, max_steps: int, ckpt_path: str | None = None):
    torch.manual_seed(0)
    model, data, quality_options, bpd_options = build(family)
    ema = EMA(decay=0.9)
    quality = SampleQuality(every_n_epochs=0, every_n_steps=4, cache_stats=False, **quality_options)
    likelihood = Likelihood(every_n_epochs=0, every_n_steps=4, num_batches=1, split="test", bpd_options=bpd_options)
    trainer = tiny_trainer(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                           max_steps=max_steps, enable_checkpointing=True, default_root_dir=root, limit_val_batches=0,
                           callbacks=[ema, quality, likelihood,
                                      LastCheckpoint(dirpath=f"{root}/ck", every_n_train_steps=2),
                                      *([OtherCodebookOnRankOne()] if family == "vqvae" else [])])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, ema, trainer, quality.last_results, likelihood.last_results


STEP_SEED = 1234
# the families whose FSDP2 resume is checked (restoring is family-independent; the suite's time budget
# takes six: the UNet DDPM, the ladder HVAE with its registered bottom_up/top_down, the EBM with
# its per-rank replay buffers, the discrete diffusion with its importance-sampling buffers, the VQ-VAE
# with its codebook buffers and restart generator, and the energy DDPM (a double backward under FSDP2))
RESUMED = ("ddpm", "hvae", "ebm", "discrete", "vqvae", "energy")


class FixedBatch(L.LightningDataModule):
    """Rank r trains on half r of a fixed global batch (no sampler: the split is ours)."""

    def __init__(self, halves: list[dict]):
        super().__init__()
        self.halves = halves

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.halves[self.trainer.global_rank]], batch_size=None)


class Grads(L.Callback):
    """Seeds every rank alike before the step; records the all-reduced, unclipped gradients."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(STEP_SEED)
        self.batch_sum = float(batch["x"].double().sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = float(outputs["loss"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # full(): a sharded (FSDP2) gradient is a DTensor, gathered here
        self.grads = {n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None}


def fixed_halves(family: str) -> list[dict]:
    """16 fixed samples in the batch contract, straight from the sources (the same on every rank)."""
    import numpy as np

    from lightning_diffusion.data.sources import digits, toy2d_points

    if family in ("score_sde", "ebm", "ebm_recovery"):
        x, y = toy2d_points("gaussians8", 16, np.random.default_rng(0))
        batch = {"x": torch.from_numpy(x), "y": torch.from_numpy(y).long()}
    else:
        pool = digits(8).pools["all"]
        images = torch.from_numpy(np.stack([pool[i][0] for i in range(16)])).permute(0, 3, 1, 2)  # uint8 [16,1,8,8]
        # categorical data (discrete diffusion): the 8-bit values themselves, int64 in [0, 256)
        x = images.long() if family == "discrete" else images.float() / 127.5 - 1
        batch = {"x": x, "y": torch.tensor([pool[i][1] for i in range(16)])}
    return [{k: v[h * 8:(h + 1) * 8] for k, v in batch.items()} for h in (0, 1)]


def sampler_history(model) -> dict | None:
    """This rank's importance-sampling history of a discrete diffusion (buffers: count, loss_squared)."""
    sampler = getattr(model, "timestep_sampler", None)
    return None if sampler is None else {k: v.detach().clone() for k, v in sampler.state_dict().items()}


def codebook_state(model) -> dict | None:
    """This rank's EMA codebook of a VQ-VAE (buffers: codebook, cluster sizes, sums, steps unused,
    restarts) and its restart generator's state."""
    book = getattr(model, "codebook", None)
    if book is None:
        return None
    return {**{k: v.detach().clone() for k, v in book.state_dict().items()}, "rng": book.generator.get_state()}


@contextmanager
def single_process():
    """The codebook's all-reduce and broadcast off: the single-process reference runs on rank 0 alone
    (rank 1 would never join the collective)."""
    from lightning_diffusion.nets import codebook

    distributed, codebook._distributed = codebook._distributed, lambda: False
    try:
        yield
    finally:
        codebook._distributed = distributed


def ddp_step(family: str, out: str) -> None:
    """One step of ``family`` on the fixed batch under DDP, or, for ``FAMILY-fsdp2``, under FSDP2
    (ModelParallelStrategy: the gradients gathered from their shards)."""
    name, sharded = family.removesuffix("-fsdp2"), family.endswith("-fsdp2")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "ddp"
    torch.manual_seed(0)
    model, data, _, _ = build(name)
    model.grad_clip = None
    with torch.no_grad():  # zero-initialised output layers would leave every gradient but theirs at zero
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    halves = fixed_halves(name)
    grads, ema = Grads(), EMA(decay=0.5)
    trainer = tiny_trainer(devices=2, strategy=strategy, max_steps=1, limit_val_batches=0, use_distributed_sampler=False,
                           callbacks=[grads, ema])
    trainer.fit(model, datamodule=FixedBatch(halves))
    result = {"grads": grads.grads, "loss": grads.loss, "batch_sum": grads.batch_sum,
              "ema": {n: full(s) for n, s in ema.shadow.items()}, "history": sampler_history(model),
              "codebook": codebook_state(model)}
    if trainer.global_rank == 0:  # the single-process reference, on a fresh copy of the initial model
        torch.manual_seed(0)
        reference, _, _, _ = build(name)
        reference.load_state_dict(init)
        reference.train()
        losses = []
        for rank, half in enumerate(halves):
            torch.manual_seed(STEP_SEED)
            if name in ("ebm", "ebm_recovery"):  # each rank's own replay buffer (cd) and generator (FAMILY-fsdp2 too)
                reference._replay = None
                reference._chain_rng = torch.Generator().manual_seed(reference.chain_seed(rank))
            if family == "discrete":  # each rank draws t from the history it started with (gathered after)
                reference.timestep_sampler.load_state_dict({k[len("timestep_sampler."):]: v for k, v in init.items()
                                                            if k.startswith("timestep_sampler.")})
            if family == "vqvae":  # each rank quantizes with the codebook it started with (updated after)
                reference.codebook.load_state_dict({k[len("codebook."):]: v for k, v in init.items()
                                                    if k.startswith("codebook.")})
            with single_process():
                losses.append(reference.training_step(half, 0))
        (sum(losses) / len(losses)).backward()
        if family == "vqvae":  # one process's EMA step on the whole batch of 16, from the initial codebook
            reference.codebook.load_state_dict({k[len("codebook."):]: v for k, v in init.items()
                                                if k.startswith("codebook.")})
            with torch.no_grad(), single_process():
                z_e, codes, _ = reference._quantize(torch.cat([h["x"] for h in halves]))
                reference.codebook.update(z_e.movedim(1, -1).reshape(-1, z_e.shape[1]), codes.flatten())
            result["reference_codebook"] = codebook_state(reference)
        result["reference_losses"] = [float(l) for l in losses]
        result["half_sums"] = [float(h["x"].double().sum()) for h in halves]
        result["reference"] = {n: p.grad.detach().clone() for n, p in reference.named_parameters()
                               if p.grad is not None}
    torch.save(result, f"{out}/{family}-ddp-rank{trainer.global_rank}.pt")


def fsdp2_runs(family: str, out: str) -> None:
    model, ema, trainer, quality, likelihood = fit(family, f"{out}/{family}-straight", 4)
    straight_replay = getattr(model, "_replay", None)
    straight_history = sampler_history(model)
    straight_codebook = codebook_state(model)
    name, largest = max(model.named_parameters(), key=lambda item: item[1].numel())
    result = {"param_type": type(largest).__name__, "shadow_type": type(ema.shadow[name]).__name__,
              "local_shape": tuple(largest.to_local().shape if hasattr(largest, "to_local") else largest.shape),
              "full_shape": tuple(largest.shape),
              "fsdp_units": sum(type(m).__name__.startswith("FSDP") for m in model.modules()),
              "params": {n: full(p) for n, p in model.named_parameters()},
              "ema": {n: full(s) for n, s in ema.shadow.items()}, "quality": quality, "likelihood": likelihood,
              "step": trainer.global_step}
    with evaluation_weights(trainer, model) as used:  # what validation and the callbacks evaluate
        result["evaluated"] = (used, {n: full(p) for n, p in model.named_parameters()})
    result["after_evaluation"] = {n: full(p) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    options = {"ddpm": {"sampler": "ddim", "steps": 3}, "energy": {"sampler": "ddim", "steps": 3},
               "score_sde": {"sampler": "euler_maruyama", "steps": 4},
               "discrete": {"steps": 4}}
    y = torch.arange(6) % 10 if getattr(model, "class_conditional", False) else None
    result["samples"] = model.sample(6, y=y, generator=g, **options.get(family, {})).detach()
    if family == "score_sde":  # adaptive solvers are refused on a sharded model (they would hang)
        refused = []
        for call in (lambda: model.sample(2, sampler="ode"), lambda: model.bits_per_dim(torch.zeros(2, 2))):
            try:
                call()
            except ValueError as error:
                refused.append(str(error))
        result["refused"] = refused
    if family in RESUMED:
        fit(family, f"{out}/{family}-split", 2)
        model, ema, trainer, _, _ = fit(family, f"{out}/{family}-split", 4,
                                        ckpt_path=f"{out}/{family}-split/ck/last.ckpt")
        result.update(resumed_params={n: full(p) for n, p in model.named_parameters()},
                      resumed_ema={n: full(s) for n, s in ema.shadow.items()}, resumed_step=trainer.global_step)
        if family == "ebm":
            result["replay"] = {k: v.clone() for k, v in straight_replay.items()}
            result["resumed_replay"] = {k: v.clone() for k, v in model._replay.items()}
        if family == "discrete":
            result["history"], result["resumed_history"] = straight_history, sampler_history(model)
        if family == "vqvae":
            result["codebook"], result["resumed_codebook"] = straight_codebook, codebook_state(model)
    torch.save(result, f"{out}/{family}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    mode, out, families = sys.argv[1], sys.argv[2], sys.argv[3:]
    for family in families:
        {"fsdp2": fsdp2_runs, "ddp": ddp_step}[mode](family, out)
    from lightning_diffusion.distributed import end_process_group

    end_process_group()  # every rank leaves the process group together, before the interpreter exits
