"""Composition of concepts never seen together (issue 23): from a checkpoint of
``configs/ebm_diffusion_colour_digits.yaml`` (an energy DDPM with per-attribute labels, digit and
colour, trained without the held-out (digit, colour) pairs), draw every held-out and every seen pair by

(a) the conditional product ``E(x | digit) + E(x | colour) - E(x)``
    (:func:`lightning_diffusion.models.compose.conditional_product`) with score-sum samplers, no
    correction (``--score_sum_samplers``, default ancestral);
(b) the same product with ``annealed_mcmc``: MALA and HMC moves on the summed energy at every noise
    level (``--kernels``, ``--mcmc_steps``, ``--step_scale``);
(c) the joint conditional, both attributes given to the one net (``sample(y=[digit, colour])``),
    on the seen pairs (the comparison) and on the held-out ones (what the summed label embeddings
    generalise to);

and judge each sample with :func:`lightning_diffusion.metrics.features.colour_digit_accuracy` (the
digits CNN reads the digit, the nearest named colour the colour). Digit, colour and both accuracy are
reported for held-out and seen pairs separately, with the NFE, the seconds and MALA/HMC's mean
acceptance; the real test images of the same pairs are scored by the same readers as reference.
Chance: 0.1, 0.125, 0.0125. The held-out pairs are read from the checkpoint's dataset index
(``extra.held_out_pairs``), so the benchmark evaluates exactly what training left out.

    OMP_NUM_THREADS=1 python benchmarks/colour_digits_composition.py \\
        --ckpt runs/ebm_diffusion_colour_digits/version_0/checkpoints/last.ckpt \\
        [--per_pair 10] [--steps 100] [--json benchmarks/results/colour_digits_composition.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_diffusion.commands import load_model
from lightning_diffusion.data.datamodule import ShardDataModule
from lightning_diffusion.encodings import colour_digit_label
from lightning_diffusion.metrics.features import DigitsFeatures, colour_digit_accuracy
from lightning_diffusion.models.compose import conditional_product

RESULTS = Path(__file__).resolve().parent / "results" / "colour_digits_composition.json"


def pair_labels(pairs: list[tuple[int, int]], per_pair: int) -> torch.Tensor:
    """``[len(pairs) * per_pair, 2]`` int64 labels ``[digit, colour]``, pair by pair."""
    return torch.tensor(pairs, dtype=torch.long).repeat_interleave(per_pair, dim=0)


def draw(model, labels: torch.Tensor, method: dict, batch_size: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Samples for ``labels`` [N, 2] by ``method`` (``{"kind": "product" | "joint", "sampler": ..., **options}``),
    in batches of ``batch_size`` from one seeded generator; with the NFE per sample, the seconds and
    the mean acceptance of an MCMC-corrected sampler."""
    options = {k: v for k, v in method.items() if k not in ("kind", "name")}
    generator = torch.Generator().manual_seed(seed)
    chunks, nfe, acceptance, start = [], 0, [], time.perf_counter()
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size]
        if method["kind"] == "joint":
            with torch.no_grad():
                chunks.append(model.sample(len(y), y=y, generator=generator, **options))
            source = model
        else:  # E(x | digit) + E(x | colour) - E(x): the digit with the colour dropped, and the other way round
            digit, colour = y.clone(), y.clone()
            digit[:, 1], colour[:, 0] = -1, -1
            product = conditional_product(model, [digit, colour], null=torch.full_like(y, -1))
            if options.get("sampler") == "annealed_mcmc":  # the moves differentiate the energy
                chunks.append(product.sample(len(y), generator=generator, **options).detach())
            else:
                with torch.no_grad():
                    chunks.append(product.sample(len(y), generator=generator, **options))
            source = product
        nfe = getattr(source, "last_sample_nfe", None) or 0
        acceptance += list(getattr(source, "last_sample_acceptance", None) or [])
    stats = {"nfe": nfe, "seconds": time.perf_counter() - start}
    if acceptance:
        stats["acceptance"] = sum(acceptance) / len(acceptance)
    return torch.cat(chunks), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint of configs/ebm_diffusion_colour_digits.yaml")
    parser.add_argument("--dataset", help="the held-out dataset (default: the checkpoint's data.dataset)")
    parser.add_argument("--per_pair", type=int, default=10, help="samples per (digit, colour) pair")
    parser.add_argument("--steps", type=int, default=100, help="grid points of every sampler")
    parser.add_argument("--score_sum_samplers", nargs="+", default=["ancestral"],
                        help="samplers of the product's summed score, no correction (also the joint's)")
    parser.add_argument("--kernels", nargs="*", default=["mala", "hmc"], help="annealed_mcmc kernels")
    parser.add_argument("--mcmc_steps", type=int, default=2, help="MCMC moves per noise level")
    parser.add_argument("--step_scale", type=float, default=0.1, help="annealed_mcmc's step, in sigma_t^2")
    parser.add_argument("--max_pairs", type=int, help="only the first this many pairs of each group (a quick check)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ckpt, used = load_model(args.ckpt, args.weights)
    if getattr(model, "label_attributes", None) != [10, 8]:
        raise SystemExit(f"{args.ckpt}: not a model with per-attribute labels [10, 8] (digit, colour); train "
                         "configs/ebm_diffusion_colour_digits.yaml")
    dataset = args.dataset or (ckpt.get("datamodule_hyper_parameters") or {}).get("dataset")
    if dataset is None:
        raise SystemExit(f"{args.ckpt} names no dataset; pass --dataset")
    data = ShardDataModule(dataset, batch_size=20_000)
    held_out = [tuple(p) for p in (data.index.get("extra") or {}).get("held_out_pairs", [])]
    if not held_out:
        raise SystemExit(f"dataset {dataset!r} holds no (digit, colour) pair out of training (index extra.held_out_pairs); "
                         "composition needs one written with held_out (e.g. colour_digits8_held_out)")
    groups = {"held_out": held_out, "seen": [(d, c) for d in range(10) for c in range(8) if (d, c) not in held_out]}
    if args.max_pairs:
        groups = {name: pairs[:args.max_pairs] for name, pairs in groups.items()}

    methods = [{"name": f"product/{s}", "kind": "product", "sampler": s, "steps": args.steps}
               for s in args.score_sum_samplers]
    methods += [{"name": f"product/annealed_mcmc-{k}", "kind": "product", "sampler": "annealed_mcmc", "steps": args.steps,
                 "kernel": k, "mcmc_steps": args.mcmc_steps, "step_scale": args.step_scale} for k in args.kernels]
    methods += [{"name": f"joint/{args.score_sum_samplers[0]}", "kind": "joint", "sampler": args.score_sum_samplers[0],
                 "steps": args.steps}]

    digits = DigitsFeatures()
    real = next(iter(data.eval_dataloader("test")))
    results = {"ckpt": str(args.ckpt), "global_step": ckpt.get("global_step"), "weights": used, "dataset": dataset,
               "held_out_pairs": [list(p) for p in groups["held_out"]], "per_pair": args.per_pair, "steps": args.steps,
               "seed": args.seed, "real_test": {}, "methods": {}}
    for group, pairs in groups.items():
        joint = torch.tensor([colour_digit_label(d, c) for d, c in pairs])
        keep = torch.isin(real["y"], joint)
        results["real_test"][group] = {**colour_digit_accuracy(real["x"][keep], real["y"][keep], digits),
                                       "count": int(keep.sum())}
    for method in methods:
        results["methods"][method["name"]] = entry = {"options": {k: v for k, v in method.items() if k not in ("name",)}}
        for group, pairs in groups.items():
            labels = pair_labels(pairs, args.per_pair)
            x, stats = draw(model, labels, method, args.batch_size, args.seed)
            entry[group] = {**colour_digit_accuracy(x, labels[:, 0] * 8 + labels[:, 1], digits), **stats}
            print(f"{method['name']:32s} {group:8s} " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in entry[group].items()), flush=True)

    print(f"\n{args.ckpt} (step {results['global_step']}, {used} weights), {args.per_pair} samples per pair, "
          f"{args.steps} steps; {len(groups['held_out'])} held-out and {len(groups['seen'])} seen pairs")
    print("| method | held-out digit | colour | both | seen digit | colour | both | NFE | acceptance |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, entry in results["methods"].items():
        h, s = entry["held_out"], entry["seen"]
        acc = entry["seen"].get("acceptance")
        print(f"| {name} | {h['digit']:.3f} | {h['colour']:.3f} | {h['both']:.3f} | {s['digit']:.3f} | {s['colour']:.3f} "
              f"| {s['both']:.3f} | {s['nfe']} | {'' if acc is None else f'{acc:.2f}'} |")
    h, s = results["real_test"]["held_out"], results["real_test"]["seen"]
    print(f"| real test images | {h['digit']:.3f} | {h['colour']:.3f} | {h['both']:.3f} | {s['digit']:.3f} "
          f"| {s['colour']:.3f} | {s['both']:.3f} | | |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
