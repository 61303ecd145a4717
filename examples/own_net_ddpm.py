"""Our DDPM and ScoreSDE with your own network, your own Dataset and your own Trainer.

What a user brings: an ``nn.Module`` with the network signature ``net(x, t, y=None) -> Tensor``
shaped like ``x`` (``t`` is a float tensor [B]: the DDPM step index in [0, T), or the score SDE's
continuous time in (0, 1]), and a plain ``torch.utils.data.Dataset`` whose items are dicts
``{"x": tensor}``. What the library adds: the models and the EMA and SampleQuality callbacks.
Logs go where Lightning puts them (``lightning_logs/`` in the working directory).

    python examples/own_net_ddpm.py                      # both models: 1-2 minutes on a 2-core CPU
    python examples/own_net_ddpm.py --max-steps 20       # a smoke test
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_diffusion import DDPM, EMA, VPSDE, SampleQuality, ScoreSDE, evaluation_weights


class Ring(Dataset):
    """Points on a noisy ring of radius 1.5, as batch dicts ``{"x": [2]}``."""

    def __init__(self, num_points: int = 4096, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        angle = 2 * math.pi * torch.rand(num_points, generator=g)
        radius = 1.5 + 0.05 * torch.randn(num_points, generator=g)
        self.points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.points[i]}


class TinyDenoiser(nn.Module):
    """An MLP on ``[x, sin/cos features of t / max_time]`` (max_time: T for a DDPM, 1 for an SDE)."""

    def __init__(self, dim: int = 2, hidden: int = 128, max_time: float = 1.0):
        super().__init__()
        self.max_time, self.freqs = max_time, torch.arange(1, 5) * math.pi
        self.body = nn.Sequential(nn.Linear(dim + 8, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        s = (t.float() / self.max_time).expand(len(x))[:, None] * self.freqs.to(x.device)  # [B, 4]
        return self.body(torch.cat([x, s.sin(), s.cos()], dim=1))


def parser() -> argparse.ArgumentParser:
    """The example's options; the defaults are the settings README.md shows."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-steps", type=int, default=3000, help="optimizer steps per model")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--val-every", type=int, default=1000, help="validate (and evaluate samples) every N steps")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per evaluation, and validation points")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of those samples")
    return p


def fit(model: L.LightningModule, train_data: DataLoader, val_data: DataLoader,
        args: argparse.Namespace) -> tuple[dict[str, float], Tensor]:
    """Train ``model`` with our EMA and SampleQuality callbacks on the user's own Trainer; return the
    last sample quality (``val/energy_distance``, ``val/mmd``: samples on the EMA weights against the
    validation points) and 16 samples drawn with the EMA weights."""
    quality = SampleQuality(num_samples=args.num_samples, batch_size=args.num_samples, real_split="val",
                            sample_options={"sampler": "ddim", "steps": args.sample_steps})
    trainer = L.Trainer(max_steps=args.max_steps, val_check_interval=args.val_every, check_val_every_n_epoch=None,
                        callbacks=[EMA(decay=0.999), quality])
    trainer.fit(model, train_data, val_data)
    with evaluation_weights(trainer, model):  # the EMA averages, in eval mode
        samples = model.sample(16, sampler="ddim", steps=args.sample_steps)  # [16, 2]
    return quality.last_results, samples


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Train a DDPM, then a ScoreSDE, each with the user's net; print and return their sample quality."""
    args = parser().parse_args(argv)
    torch.manual_seed(0)
    train_data = DataLoader(Ring(seed=0), batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_data = DataLoader(Ring(num_points=args.num_samples, seed=1), batch_size=args.num_samples)
    model = DDPM(TinyDenoiser(max_time=1000), timesteps=1000, data_shape=(2,), lr=1e-3, warmup_steps=100)
    sde = ScoreSDE(TinyDenoiser(max_time=1.0), sde=VPSDE(), data_shape=(2,), lr=1e-3, warmup_steps=100)
    results = {}
    for name, generative_model in (("ddpm", model), ("score_sde", sde)):
        results[name], samples = fit(generative_model, train_data, val_data, args)
        metrics = results[name]
        print(f"{name}: energy distance {metrics['val/energy_distance']:.4f}, MMD {metrics['val/mmd']:.4f} "
              f"({args.num_samples} samples, EMA weights); mean radius of 16 samples "
              f"{samples.norm(dim=1).mean():.3f} (data: 1.5)")
    return results


if __name__ == "__main__":
    main()
