"""Where a DDPM's (or a latent DDPM's) bits/dim come from: the bound's terms, per sample, averaged.

For a ``DDPM`` checkpoint: ``L_T``, the decoder ``L_0`` and the KL terms summed over step ranges, in bits
per data dimension (:meth:`DDPM.bound_terms`), and the RMS error of x0_hat at a few steps against
``sigma_t / alpha_t`` (an eps-predicting net's x0_hat errs by about that at small t; an x0-predicting
net that errs more is charged ``coef1_t^2 e^2 / (2 var_t)`` nats per error e, ~1e4 e^2 at t = 0). For a
``LatentDiffusion`` checkpoint with a DDPM prior: LSGM's bound split into the first stage's nats
``-log p(x | z) + log q(z | x)``, the prior's VLB of ``s z`` (its terms as above) and the Jacobian
``-d log s``, all in bits per data dimension, and the first stage's own ELBO (``N(0, I)`` in place of the
prior) on the same draw of z.

    OMP_NUM_THREADS=1 python benchmarks/bound_terms.py --ckpt runs/ddpm_colour_digits/version_0/checkpoints/last.ckpt \\
        --dataset colour_digits --images 16
"""

from __future__ import annotations

import argparse
import math

import torch

RANGES = ((1, 10), (10, 100), (100, 500), (500, None))


def report_terms(model, x: torch.Tensor, y: torch.Tensor | None, per_data_dim: int, label: str) -> float:
    """Print the DDPM ``model``'s bound terms of ``x`` in bits per ``per_data_dim`` dimensions; return the total."""
    terms = model.bound_terms(x, generator=torch.Generator().manual_seed(0), y=y).double().mean(1)
    to_bits = 1 / (per_data_dim * math.log(2))
    total = terms.sum().item() * to_bits
    parts = {"L_T": terms[0].item(), "L_0": terms[1].item()}
    for lo, hi in RANGES:
        hi = len(terms) - 1 if hi is None else hi
        parts[f"KL[{lo},{hi})"] = terms[1 + lo:1 + hi].sum().item()
    print(f"{label}: {total:.3f} bits/dim = " + " + ".join(f"{k} {v * to_bits:.3f}" for k, v in parts.items()))
    return total


def report_x0_error(model, x: torch.Tensor, steps=(0, 1, 5, 20, 100, 500)) -> None:
    """RMS error of the net's x0_hat (clipped for images) at ``steps`` against sigma_t / alpha_t."""
    from lightning_diffusion.diffusion import parameterization as param

    schedule, generator = model.schedule, torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for step in steps:
            t = torch.full((len(x),), step)
            x_t = schedule.q_sample(x.double(), t, noise)
            output = param.row(model.parameterization).output(model.net, x_t.float(), t.float(), None)
            x0_hat = schedule.predict_x0(model.parameterization, output.double(), x_t, t)
            if model.is_image:
                x0_hat = x0_hat.clamp(-1, 1)
            rms = (x0_hat - x.double()).pow(2).mean().sqrt().item()
            ratio = math.sqrt(1 / schedule.alphas_cumprod[step].item() - 1)
            print(f"  t={step:4d}: rms(x0_hat - x0) {rms:.4f}   sigma_t / alpha_t {ratio:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a DDPM or LatentDiffusion (DDPM prior) checkpoint")
    parser.add_argument("--dataset", required=True, help="the test split's dataset (digits, colour_digits, ...)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--labels", action="store_true", help="score -log p(x | y) (class-conditional models)")
    parser.add_argument("--weights", default="ema")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lightning_diffusion import DDPM, LatentDiffusion, ShardDataModule
    from lightning_diffusion.commands import load_model

    batch = next(iter(ShardDataModule(args.dataset, batch_size=args.images).eval_dataloader("test")))
    x, y = batch["x"], batch["y"] if args.labels else None
    model, _, weights = load_model(args.ckpt, args.weights)
    print(f"{args.ckpt} ({weights} weights), {len(x)} test images of {args.dataset}")
    if isinstance(model, DDPM):
        print(f"parameterization {model.parameterization}, variance {model.variance}")
        report_terms(model, x, y, x[0].numel(), "vlb")
        report_x0_error(model, x)
        return
    if not (isinstance(model, LatentDiffusion) and isinstance(model.prior, DDPM)):
        raise SystemExit(f"{args.ckpt}: a DDPM or a LatentDiffusion with a DDPM prior, got {type(model).__name__}")
    prior, s, dims = model.prior, model.scale(), x[0].numel()
    latent_dims, to_bits = math.prod(model.latent_shape), 1 / (dims * math.log(2))
    with torch.no_grad():
        z, first = model.first_stage.encode_latents(x, torch.Generator().manual_seed(0))
    latents = model.to_prior(z, x.dtype)
    print(f"prior parameterization {prior.parameterization}, scale s {s:.4f}, std of s z {latents.std().item():.3f}")
    first_bits = first.double().mean().item() * to_bits
    jacobian_bits = -latent_dims * math.log(s) * to_bits
    prior_bits = report_terms(prior, latents, y if model.class_conditional else None, dims,
                              "prior vlb of s z (bits per data dim)")
    standard = -torch.distributions.Normal(0.0, 1.0).log_prob(z.double()).sum(1).mean().item() * to_bits
    print(f"first stage {first_bits:.3f} + prior {prior_bits:.3f} + Jacobian -d log s {jacobian_bits:.3f} = "
          f"{first_bits + prior_bits + jacobian_bits:.3f} bits/dim; the first stage's ELBO (N(0, I) prior, same z): "
          f"{first_bits + standard:.3f}")
    report_x0_error(prior, latents)


if __name__ == "__main__":
    main()
