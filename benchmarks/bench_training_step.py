"""Training-step overhead of Lightning: DDPM steps/s through ``L.Trainer`` vs a hand-written loop.

Both sides train the same DDPM (UNet and DDPM settings of ``configs/ddpm_digits.yaml``, digits
8x8 grey, batch 128), from the same initial weights, with the same optimizer (AdamW, the config's
lr, gradient-norm clipping at 1.0, linear warm-up LambdaLR stepped every step) on the same
pre-made in-memory batches, so the data pipeline is not measured. The plain loop calls
``model.loss(batch)`` (t uniform, noise, q_sample, eps MSE) and does zero_grad, backward, clip,
optimizer step and scheduler step by hand. After a warm-up of each, rounds alternate
plain, lightning, plain, lightning ... and the median steps/s of each side is reported.

Lightning's time is its training loop (``on_train_start`` .. ``on_train_end``); the whole
``trainer.fit`` call including the trainer's setup is shown too.

Target: lightning / plain >= 0.95.

On a GPU the same comparison runs the paper-scale model: ``--config configs/ddpm_cifar10.yaml``
(Ho et al.'s 35.7M UNet on 3x32x32 batches of random images: throughput does not depend on the
pixels), with ``--precision bf16-mixed`` (Lightning's flag; the plain loop uses the same autocast)
and ``--compile`` (``torch.compile`` of the net on both sides). The FLOPs of one training step are
counted with ``torch.utils.flop_counter`` (forward + backward of the loss), so images/s and model
FLOPs utilisation (MFU = FLOPs/step x steps/s / ``--peak_tflops``; default: the H100/H200 dense
bf16 peak, 989 TFLOP/s) are reported for both sides.

    python benchmarks/bench_training_step.py [--steps 100] [--rounds 3] [--json out.json]
    python benchmarks/bench_training_step.py --config configs/ddpm_cifar10.yaml --accelerator cuda \
        --precision bf16-mixed --compile --steps 50 --json benchmarks/results/h100_training_step_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from lightning_diffusion import DDPM, UNet

ROOT = Path(__file__).resolve().parents[1]


def data_shape(config: dict) -> tuple[int, int, int]:
    """``[C, H, W]`` of the config's data: CIFAR-10 configs 3x32x32, the rest the 8x8 digits."""
    return (3, 32, 32) if "cifar10" in str(config.get("trainer", {}).get("logger", {})) else (1, 8, 8)


def build_model(config: dict) -> DDPM:
    """The DDPM of the config with 10 classes and the config's data shape (what the CLI links in)."""
    model_args = dict(config["model"]["init_args"])
    net_args = dict(model_args.pop("net")["init_args"])
    shape = data_shape(config)
    net = UNet(in_channels=shape[0], image_size=shape[1], num_classes=10, **net_args)
    return DDPM(net=net, data_shape=shape, num_classes=10, **model_args)


def make_batches(num: int, batch_size: int, seed: int, device: torch.device,
                 shape: tuple[int, int, int] = (1, 8, 8)) -> list[dict[str, torch.Tensor]]:
    """``num`` batches of real digits, pixels mapped as in the shards (8-bit, then [-1, 1]); for
    another ``shape``, uniform random images in [-1, 1] with random labels."""
    if shape != (1, 8, 8):
        g = torch.Generator().manual_seed(seed)
        return [{"x": (torch.rand(batch_size, *shape, generator=g) * 2 - 1).to(device),
                 "y": torch.randint(0, 10, (batch_size,), generator=g).to(device)} for _ in range(num)]
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.float32) / 127.5 - 1.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    idx = [torch.randint(0, len(x), (batch_size,), generator=g) for _ in range(num)]
    return [{"x": x[i].to(device), "y": y[i].to(device)} for i in idx]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """The autocast context Lightning's ``precision`` flag sets up, for the plain loop."""
    import contextlib

    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_flops(model: DDPM, batch: dict, device: torch.device, precision: str) -> float:
    """FLOPs of one training step's forward and backward (torch.utils.flop_counter; the optimizer's
    elementwise work is not counted, as MFU conventions have it)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            loss = model.loss(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def plain_round(model: DDPM, batches: list, steps: int, device: torch.device, precision: str = "32-true") -> float:
    """``steps`` hand-written optimizer steps; returns steps/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=model.lr, betas=model.adam_betas, weight_decay=model.weight_decay)
    warmup = model.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
    model.train()
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        with autocast(device, precision):
            loss = model.loss(batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.grad_clip)
        opt.step()
        sched.step()
    sync(device)
    return steps / (time.perf_counter() - start)


class LoopTimer(L.Callback):
    """Wall time of the training loop proper (after setup, before teardown)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, float("nan")

    def on_train_start(self, trainer, pl_module):
        sync(self.device)
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def lightning_round(model: DDPM, batches: list, steps: int, accelerator: str, device: torch.device,
                    precision: str = "32-true") -> tuple[float, float]:
    """``steps`` steps of ``trainer.fit``; returns (loop steps/s, whole-fit steps/s)."""
    # the same in-memory batches, in the same order; batch_size=None hands the dicts through as they are
    loader = DataLoader([batches[i % len(batches)] for i in range(steps)], batch_size=None, shuffle=False)
    timer = LoopTimer(device)
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False, precision=precision,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    whole = time.perf_counter() - start
    return steps / timer.seconds, steps / whole


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "ddpm_digits.yaml"))
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each side (alternating)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each side first")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_batches", type=int, default=8, help="distinct pre-made batches, cycled")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                   help="Lightning's precision flag; the plain loop uses the same autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the net on both sides")
    p.add_argument("--peak_tflops", type=float, default=989.4,
                   help="the device's peak TFLOP/s for MFU (default: H100/H200 SXM dense bf16)")
    p.add_argument("--json", help="write the numbers to this JSON file")
    args = p.parse_args()

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*but have no `val_dataloader`.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.accelerator == "cuda" else "cpu")
    config = yaml.safe_load(Path(args.config).read_text())

    torch.manual_seed(args.seed)
    plain = build_model(config).to(device)
    torch.manual_seed(args.seed)
    lit = build_model(config)  # the Trainer moves it
    same = all(torch.equal(a, b.to(device)) for a, b in zip(plain.state_dict().values(), lit.state_dict().values()))
    shape = data_shape(config)
    batches = make_batches(args.num_batches, args.batch_size, args.seed, device, shape)
    flops = step_flops(plain, batches[0], device, args.precision)
    if args.compile:
        plain.net, lit.net = torch.compile(plain.net), torch.compile(lit.net)
    print(f"DDPM {'x'.join(map(str, shape))}: {sum(q.numel() for q in plain.parameters()):,} parameters, batch "
          f"{args.batch_size}, {args.accelerator}, {args.precision}{', compiled' if args.compile else ''}, "
          f"{torch.get_num_threads()} threads; {flops / 1e9:.1f} GFLOP/step; identical init: {same}")

    torch.manual_seed(args.seed)
    plain_round(plain, batches, args.warmup, device, args.precision)
    lightning_round(lit, batches, args.warmup, args.accelerator, device, args.precision)

    rows = []
    for r in range(args.rounds):
        torch.manual_seed(args.seed + 1 + r)
        p_sps = plain_round(plain, batches, args.steps, device, args.precision)
        torch.manual_seed(args.seed + 1 + r)
        l_sps, l_fit_sps = lightning_round(lit, batches, args.steps, args.accelerator, device, args.precision)
        rows.append({"round": r, "plain": p_sps, "lightning": l_sps, "lightning_fit": l_fit_sps})
        print(f"round {r}: plain {p_sps:8.2f} steps/s   lightning {l_sps:8.2f} steps/s   "
              f"(whole fit() {l_fit_sps:8.2f} steps/s)")

    med = {k: statistics.median(row[k] for row in rows) for k in ("plain", "lightning", "lightning_fit")}
    ratio, ratio_fit = med["lightning"] / med["plain"], med["lightning_fit"] / med["plain"]
    print(f"\n{'':28s}{'median steps/s':>16s}{'vs plain':>10s}")
    print(f"{'plain PyTorch loop':28s}{med['plain']:16.2f}{1.0:10.3f}")
    print(f"{'Lightning (training loop)':28s}{med['lightning']:16.2f}{ratio:10.3f}")
    print(f"{'Lightning (whole fit call)':28s}{med['lightning_fit']:16.2f}{ratio_fit:10.3f}")
    images = {k: v * args.batch_size for k, v in med.items()}
    mfu = {k: flops * v / (args.peak_tflops * 1e12) for k, v in med.items()}
    print(f"images/s: plain {images['plain']:.0f}, Lightning {images['lightning']:.0f}; MFU (of "
          f"{args.peak_tflops:g} TFLOP/s): plain {mfu['plain']:.3%}, Lightning {mfu['lightning']:.3%}")
    print(f"\nlightning / plain = {ratio:.3f}  (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")

    if args.json:
        out = {"benchmark": "training_step", "steps": args.steps, "rounds": args.rounds,
               "batch_size": args.batch_size, "accelerator": args.accelerator, "threads": torch.get_num_threads(),
               "config": Path(args.config).name, "data_shape": list(shape), "precision": args.precision,
               "compile": args.compile, "flops_per_step": flops, "peak_tflops": args.peak_tflops,
               "median_images_per_s": images, "mfu": mfu,
               "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "identical_init": same, "per_round": rows, "median_steps_per_s": med,
               "ratio_lightning_over_plain": ratio, "ratio_fit_over_plain": ratio_fit, "target_ratio": 0.95}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
