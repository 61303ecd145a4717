"""Our callbacks on your own LightningModule: EMA, SampleQuality, Likelihood and WandbSamples.

The module below subclasses only ``lightning.LightningModule``. It gets every callback because
it implements the contract of :class:`lightning_diffusion.GenerativeModule`:

- ``sample(num_samples, *, y=None, generator=None, **options) -> Tensor`` in data space;
- ``bits_per_dim(x, **options) -> Tensor[B]``, the negative log-likelihood in bits per dimension;
- optionally ``bpd_estimator(**options) -> str``, the name under which Likelihood logs it
  (``reconstruct`` and ``sample_trajectory`` add pictures to WandbSamples).

The callbacks call these in eval mode, without gradients, on the EMA weights; the module needs no
mode switching of its own. The model is a mixture of K diagonal Gaussians fitted by maximum
likelihood to 2-D points, so its samples and its bits/dim are exact.

    python examples/own_module_callbacks.py                     # CSV logs and PNGs in runs/
    python examples/own_module_callbacks.py --wandb offline     # also an offline W&B run
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diffusion import EMA, GenerativeModule, Likelihood, SampleQuality, WandbSamples


class MixtureModel(L.LightningModule):
    """``p(x) = sum_k pi_k N(x; mu_k, diag(sigma_k^2))``, trained by maximum likelihood."""

    def __init__(self, dim: int = 2, num_components: int = 8, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.means = nn.Parameter(torch.randn(num_components, dim, generator=torch.Generator().manual_seed(0)))
        self.log_stds = nn.Parameter(torch.zeros(num_components, dim))

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` in nats, [B]."""
        z = (x[:, None, :] - self.means) / self.log_stds.exp()  # [B, K, D]
        log_normal = (-0.5 * z.pow(2) - self.log_stds - 0.5 * math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(self.logits.log_softmax(0) + log_normal, dim=1)

    # -- the contract the callbacks use ---------------------------------------------------------
    def sample(self, num_samples: int, *, y: Tensor | None = None, generator: torch.Generator | None = None,
               **options) -> Tensor:
        k = torch.multinomial(self.logits.softmax(0), num_samples, replacement=True, generator=generator)
        noise = torch.randn(num_samples, self.means.shape[1], generator=generator, device=self.device)
        return self.means[k] + self.log_stds[k].exp() * noise

    def bits_per_dim(self, x: Tensor, **options) -> Tensor:
        return -self.log_prob(x) / (x.shape[1] * math.log(2))

    def bpd_estimator(self, **options) -> str:
        return "exact"

    # -- ordinary Lightning --------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.bits_per_dim(batch["x"]).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.bits_per_dim(batch["x"]).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Points(TensorDataset):
    """The user's data as batch dicts ``{"x": [2]}``: 8 Gaussian blobs on a circle of radius 2."""

    def __init__(self, num_points: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        angle = 2 * math.pi * torch.randint(0, 8, (num_points,), generator=g) / 8
        centres = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
        super().__init__(centres + 0.1 * torch.randn(num_points, 2, generator=g))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.tensors[0][i]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fit the mixture with our four callbacks; print and return the last logged metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples per SampleQuality evaluation")
    parser.add_argument("--val-every", type=int, default=500, help="validate (and evaluate) every N steps")
    parser.add_argument("--wandb", choices=["off", "offline", "online"], default="off",
                        help="also log to W&B (offline: a local run to `wandb sync` later)")
    parser.add_argument("--out", default="runs/own_module_callbacks", help="run directory")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = MixtureModel()
    assert isinstance(model, GenerativeModule)  # the runtime-checkable contract: sample + bits_per_dim

    callbacks = [
        EMA(decay=0.99),  # validation and the three callbacks below use the averaged weights
        SampleQuality(num_samples=args.num_samples, batch_size=args.num_samples, real_split="val"),
        Likelihood(num_batches=0),  # 0: the whole validation split
        WandbSamples(every_n_epochs=0, num_samples=args.num_samples),  # a scatter plot when training ends
    ]
    loggers = [CSVLogger(args.out, name="csv")]
    if args.wandb != "off":
        loggers.append(WandbLogger(project="lightning-diffusion-examples", save_dir=args.out,
                                   offline=args.wandb == "offline"))
    trainer = L.Trainer(max_steps=args.max_steps, val_check_interval=args.val_every, check_val_every_n_epoch=None,
                        callbacks=callbacks, logger=loggers, default_root_dir=args.out, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    train_data = DataLoader(Points(8192, seed=0), batch_size=256, shuffle=True)
    val_data = DataLoader(Points(args.num_samples, seed=1), batch_size=500)
    trainer.fit(model, train_data, val_data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"bits/dim {metrics['val/bpd_exact']:.3f} (val), energy distance {metrics['val/energy_distance']:.4f}, "
          f"EMA weights: {metrics['val/ema'] == 1}; samples in {callbacks[-1].last_paths['samples']}")
    if args.wandb != "off":
        import wandb

        wandb.finish()
    return metrics


if __name__ == "__main__":
    main()
