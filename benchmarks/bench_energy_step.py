"""Cost of a training step of the ``energy`` parameterization against ``eps``, same UNet, side by side.

Both sides are the DDPM of ``configs/ddpm_digits.yaml`` (its UNet, digits 8x8, batch 128, AdamW with
the config's lr, clipping and warm-up: ``bench_training_step.plain_round``) on the same pre-made
batches: ``eps`` is the config as shipped; ``energy`` wraps the same UNet, from the same initial
weights, in ``EnergyHead`` (``residual``) with ``parameterization: energy``, whose loss takes
``grad_x E`` with a graph and backpropagates through it (a double backward). With ``--checkpoint``
a third side runs the energy UNet under gradient checkpointing (``torch.utils.checkpoint``,
non-reentrant: activations recomputed in the backward passes, less memory for more compute).
After a warm-up, rounds alternate eps, energy(, checkpointed); the median steps/s of each and the
ratio energy / eps are printed, with the FLOPs of one step where ``torch.utils.flop_counter`` can
count them (its module hooks refuse ``autograd.grad``: eps only, on torch 2.14) and, on CUDA, each
side's peak memory.

    python benchmarks/bench_energy_step.py --threads 1 [--steps 10] [--rounds 3] [--checkpoint] \
        [--json benchmarks/results/cpu_energy_step.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training_step import ROOT, build_model, make_batches, plain_round, step_flops  # noqa: E402

from lightning_diffusion import DDPM, EnergyHead  # noqa: E402


class Checkpointed(nn.Module):
    """``net`` whose forward runs under non-reentrant activation checkpointing (double backward
    through it is supported by torch's non-reentrant implementation)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.inner = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, x, t, y, use_reentrant=False)


def energy_model(eps: DDPM, checkpointed: bool) -> DDPM:
    """The eps model's UNet (a copy of its weights) in an EnergyHead, parameterization energy."""
    unet = copy.deepcopy(eps.net)
    net = EnergyHead(Checkpointed(unet) if checkpointed else unet)
    args = {k: v for k, v in eps.hparams.items() if k not in ("parameterization",)}
    return DDPM(net=net, **{**args, "parameterization": "energy"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "ddpm_digits.yaml"))
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--checkpoint", action="store_true", help="also time the energy UNet under gradient checkpointing")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.accelerator)
    config = yaml.safe_load(Path(args.config).read_text())
    torch.manual_seed(0)
    models = {"eps": build_model(config)}
    models["energy"] = energy_model(models["eps"], checkpointed=False)
    batches = make_batches(8, args.batch_size, seed=0, device=device)
    refused = None
    if args.checkpoint:
        checkpointed = energy_model(models["eps"], checkpointed=True).to(device)
        try:
            checkpointed.loss(batches[0]).backward()
            models["energy_checkpointed"] = checkpointed
        except RuntimeError as error:  # torch's checkpoint and autograd.grad: recorded, not hidden
            refused = f"torch {torch.__version__}: {error}"
            print(f"gradient checkpointing refused the double backward: {refused}")
    for model in models.values():
        model.to(device)
    flops = {}
    for name, model in models.items():
        try:
            flops[name] = step_flops(model, batches[0], device, "32-true")
        except RuntimeError as error:  # the flop counter's module hooks refuse autograd.grad (torch 2.14)
            print(f"FLOPs of {name} not counted: {str(error)[:100]}")
    for name, model in models.items():  # warm-up
        plain_round(model, batches, 2, device)
    rates: dict[str, list[float]] = {name: [] for name in models}
    peak: dict[str, float] = {}
    for r in range(args.rounds):
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rates[name].append(plain_round(model, batches, args.steps, device))
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.3f} steps/s" for n, v in rates.items()), flush=True)
    median = {name: statistics.median(v) for name, v in rates.items()}
    ratios = {name: median["eps"] / median[name] for name in models if name != "eps"}
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.accelerator}")
    for name in models:
        extra = f", peak {peak[name]:.0f} MiB" if name in peak else ""
        gflop = f", {flops[name] / 1e9:.2f} GFLOP/step" if name in flops else ""
        print(f"{name:>20}: {median[name]:.3f} steps/s{gflop}{extra}")
    for name, ratio in ratios.items():
        flop_ratio = f" (FLOPs {flops[name] / flops['eps']:.2f}x)" if name in flops else ""
        print(f"time per step {name} / eps: {ratio:.2f}x{flop_ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "benchmark": "energy_step", "config": Path(args.config).name, "steps": args.steps, "rounds": args.rounds,
            "batch_size": args.batch_size, "accelerator": args.accelerator, "threads": torch.get_num_threads(),
            "per_round_steps_per_s": rates, "median_steps_per_s": median, "gflop_per_step": {
                n: f / 1e9 for n, f in flops.items()}, "time_ratio_vs_eps": ratios,
            "peak_mib": peak or None, "checkpointing_refused": refused}, indent=2) + "\n")


if __name__ == "__main__":
    main()
