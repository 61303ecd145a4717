"""Discrete diffusion (DiscreteDiffusion) benchmarks: sample quality against NFE on the 8x8 digits,
binomial diffusion against a Bernoulli VAE on the binarized digits, and bits per character on words.

(a) ``--ckpt PATH`` (repeat; DiscreteDiffusion on ``digits`` as K = 256 categories, e.g.
``configs/discrete_absorbing_digits.yaml`` and ``configs/discrete_uniform_digits.yaml``): the
digits-CNN FID of ``--fid_samples`` samples against the real test split (``SampleQuality(extractor=
"digits", real_split="test")``, the code of ``lightning-diffusion evaluate``) for ancestral sampling
at ``--ancestral_steps`` (10, 20, 50, 100, 1000; a step count above T is skipped for a discrete-time
model, continuous time takes any) and SUNDAE at ``--sundae_steps`` (4, 8, 16) for each
``--sundae_temperature``. Each row has the measured NFE (``model.last_sample_nfe``: net calls per
sample batch) and samples/s of the ``sample`` calls alone (feature extraction not counted). Every
row uses the same sampling seed.

(b) ``--binary_vae PATH --binary_diffusion PATH`` (``configs/vae_binary_digits.yaml``, a Bernoulli
VAE on ``binary_digits`` as floats -1/1; ``configs/discrete_binary_digits.yaml``, binomial diffusion
on the same images as K = 2 categories, checked to be the same pixels): bits per binary pixel on the
180 test images, the diffusion's exact bound (all T terms) next to the VAE's ELBO and IWAE at
``--iwae_k`` (1000, chunked inside ``bits_per_dim``), mean +- standard error over images and the
seconds of each.

(c) ``--text PATH`` (``configs/discrete_words.yaml``): bits per character on the held-out (test)
split of ``words`` (the model's bound: the masked ELBO at ``elbo_samples`` stratified times in
continuous time, the full bound in discrete time; over the 16 positions, pad/end symbols included),
and ``--text_num`` samples (``--text_sampler``, ``--text_steps``, ``--text_temperature``): the share
that are words of the training split, of the test split (real words the model did not see) or
neither, with ``--text_print`` (20) of them printed.

    python benchmarks/bench_discrete.py \\
        --ckpt runs/discrete_absorbing_digits/version_0/checkpoints/last.ckpt \\
        --ckpt runs/discrete_uniform_digits/version_0/checkpoints/last.ckpt \\
        --binary_vae runs/vae_binary_digits/version_0/checkpoints/last.ckpt \\
        --binary_diffusion runs/discrete_binary_digits/version_0/checkpoints/last.ckpt \\
        --text runs/discrete_words/version_0/checkpoints/last.ckpt \\
        --fid_samples 500 --threads 2 --json benchmarks/results/cpu_discrete.json

Any of the three parts runs alone. EMA weights by default (``--weights raw``). With 180 real test
images the FID has a large bias: it ranks samplers, it is not a paper number.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_six_families import fid, fmt_time, score, summarize  # noqa: E402


def load(path: str, args, kind: str):
    from lightning_diffusion.commands import load_model

    if not Path(path).exists():
        raise SystemExit(f"{kind} {path}: no such file")
    model, ckpt, used = load_model(path, args.weights, args.device)
    dataset = (ckpt.get("datamodule_hyper_parameters") or {}).get("dataset")
    return model, {"checkpoint": str(path), "class": type(model).__name__, "weights": used,
                   "global_step": ckpt.get("global_step"), "dataset": dataset}


def split(dataset: str, categorical: bool | None, limit: int | None = None) -> torch.Tensor:
    from lightning_diffusion import ShardDataModule

    dm = ShardDataModule(dataset, batch_size=1000, categorical=categorical)
    dm.setup("test")
    x = torch.cat([batch["x"] for batch in dm.test_dataloader()])
    return x[:limit] if limit else x


# -- (a) sample quality against NFE -------------------------------------------------------------
def nfe_sweep(path: str, args, fid_data) -> dict[str, Any]:
    model, info = load(path, args, "--ckpt")
    if type(model).__name__ != "DiscreteDiffusion" or tuple(model.data_shape) != (1, 8, 8) \
            or model.num_categories != 256:
        raise SystemExit(f"--ckpt {path}: a {type(model).__name__} on data {model.data_shape}; (a) needs a "
                         "DiscreteDiffusion on the 8-bit digits (K = 256)")
    info.update({"corruption": model.corruption, "timesteps": model.timesteps, "schedule": model.schedule})
    print(f"{path}: {model.corruption}, T = {model.timesteps or 'continuous'}, step {info['global_step']}", flush=True)
    grid: list[dict[str, Any]] = []
    for steps in args.ancestral_steps:
        if model.timesteps and steps > model.timesteps:
            print(f"  ancestral {steps} steps: skipped (T = {model.timesteps})")
            continue
        grid.append({"sampler": "ancestral", "steps": steps, "temperature": args.temperature})
    for temperature in args.sundae_temperature:
        for steps in args.sundae_steps:
            options = {"sampler": "sundae", "steps": steps, "temperature": temperature}
            if args.update_fraction is not None:
                options["update_fraction"] = args.update_fraction
            grid.append(options)
    rows = []
    for options in grid:
        row = fid(model, options, args, fid_data)
        rows.append(row)
        print(f"  {options}: FID {row['fid']:.3f}, NFE {row['nfe']}, {row['samples_per_second']:.1f} samples/s "
              f"({row['sample_seconds']:.1f} s sampling)", flush=True)
    return {**info, "rows": rows}


def nfe_table(models: list[dict[str, Any]]) -> str:
    lines = ["| model | sampler | steps | temperature | NFE | FID | samples/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in models:
        name = f"{m['corruption']} (T = {m['timesteps'] or 'cont.'})"
        for row in m["rows"]:
            o = row["sample_options"]
            lines.append(f"| {name} | {o['sampler']} | {o['steps']} | {o['temperature']} | {row['nfe']} | "
                         f"{row['fid']:.2f} | {row['samples_per_second']:.1f} |")
    return "\n".join(lines)


# -- (b) binomial diffusion against a Bernoulli VAE -----------------------------------------------
def binary(args) -> dict[str, Any]:
    x_float, x_cat = split("binary_digits", None, args.num_test), split("binary_digits", True, args.num_test)
    if not torch.equal(((x_float + 1) / 2).round().long(), x_cat):
        raise SystemExit("the categorical binary_digits test split is not the float one's pixels")
    out: dict[str, Any] = {"num_test": len(x_float), "rows": []}
    vae, info = load(args.binary_vae, args, "--binary_vae")
    if type(vae).__name__ not in ("VAE", "HierarchicalVAE"):
        raise SystemExit(f"--binary_vae {args.binary_vae}: a {type(vae).__name__}, not a VAE")
    info["likelihood"] = type(getattr(vae, "likelihood", None)).__name__
    out["vae"] = info
    for k in (args.iwae_k, 1):
        bits, seconds = score(vae, x_float, args.bpd_batch_size, args.seed, num_importance_samples=k)
        mean, se = summarize(bits)
        out["rows"].append({"model": "vae", "estimator": vae.bpd_estimator(num_importance_samples=k),
                            "bits_per_dim": mean, "stderr": se, "n": len(bits), "seconds": seconds})
    diffusion, info = load(args.binary_diffusion, args, "--binary_diffusion")
    if type(diffusion).__name__ != "DiscreteDiffusion" or diffusion.num_categories != 2:
        raise SystemExit(f"--binary_diffusion {args.binary_diffusion}: a {type(diffusion).__name__}; needs a "
                         "DiscreteDiffusion on binary_digits (K = 2)")
    info.update({"corruption": diffusion.corruption, "timesteps": diffusion.timesteps, "schedule": diffusion.schedule})
    out["diffusion"] = info
    bits, seconds = score(diffusion, x_cat, args.bpd_batch_size, args.seed)
    mean, se = summarize(bits)
    out["rows"].insert(0, {"model": "diffusion", "estimator": diffusion.bpd_estimator(), "bits_per_dim": mean,
                           "stderr": se, "n": len(bits), "seconds": seconds})
    for row in out["rows"]:
        print(f"binary digits: {row['model']} {row['estimator']}: {row['bits_per_dim']:.4f} +- {row['stderr']:.4f} "
              f"bits/dim ({row['n']} images, {row['seconds']:.1f} s)", flush=True)
    return out


def binary_table(b: dict[str, Any]) -> str:
    names = {"diffusion": f"binomial diffusion ({b['diffusion']['corruption']}, T = {b['diffusion']['timesteps']}, "
                          f"step {b['diffusion']['global_step']})",
             "vae": f"Bernoulli VAE (step {b['vae']['global_step']})"}
    lines = ["| model | estimator | bits/dim (binary pixel) | eval time |", "| --- | --- | --- | --- |"]
    for row in b["rows"]:
        lines.append(f"| {names[row['model']]} | {row['estimator']} | {row['bits_per_dim']:.4f} +- {row['stderr']:.4f} "
                     f"| {fmt_time(row['seconds'])} |")
    return "\n".join(lines)


# -- (c) text -------------------------------------------------------------------------------------
def text(args) -> dict[str, Any]:
    from lightning_diffusion import ShardDataModule
    from lightning_diffusion.data.sources import decode_text

    model, info = load(args.text, args, "--text")
    if type(model).__name__ != "DiscreteDiffusion" or len(model.data_shape) != 1:
        raise SystemExit(f"--text {args.text}: a {type(model).__name__} on data {model.data_shape}; needs a "
                         "DiscreteDiffusion on sequences (words)")
    dm = ShardDataModule("words", batch_size=1000)
    dm.setup("test")
    x = torch.cat([batch["x"] for batch in dm.test_dataloader()])
    x = x[: args.num_test] if args.num_test else x
    bits, seconds = score(model, x, args.text_batch_size, args.seed)
    mean, se = summarize(bits)
    options = {"sampler": args.text_sampler, "steps": args.text_steps, "temperature": args.text_temperature}
    start = time.perf_counter()
    samples = model.sample(args.text_num, generator=torch.Generator(device=model.device).manual_seed(args.seed),
                           **options)
    sample_seconds, nfe = time.perf_counter() - start, model.last_sample_nfe
    words = decode_text(samples, dm.alphabet)
    train = {w for batch in dm.eval_dataloader("train") for w in decode_text(batch["x"], dm.alphabet)}
    test = set(decode_text(x, dm.alphabet))
    share = lambda which: sum(w in which for w in words) / len(words)  # noqa: E731
    out = {**info, "elbo_samples": model.elbo_samples if model.process.continuous else None,
           "estimator": model.bpd_estimator(), "bits_per_char": mean, "stderr": se, "n": len(bits),
           "seq_length": int(x.shape[1]), "bpd_seconds": seconds, "sample_options": options, "num_samples": len(words),
           "nfe": nfe, "sample_seconds": sample_seconds, "share_train_words": share(train),
           "share_test_words": share(test - train), "share_empty": sum(w == "" for w in words) / len(words),
           "share_unique": len(set(words)) / len(words), "samples": words}
    print(f"words test: {mean:.4f} +- {se:.4f} bits/char ({out['estimator']}, {len(bits)} sequences of "
          f"{out['seq_length']}, {seconds:.1f} s)", flush=True)
    return out


def text_table(t: dict[str, Any]) -> str:
    o = t["sample_options"]
    lines = ["| estimator | bits/char (test) | eval time | sampler | NFE | train words | held-out words | other | unique |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {t['estimator']} | {t['bits_per_char']:.4f} +- {t['stderr']:.4f} | {fmt_time(t['bpd_seconds'])} | "
             f"{o['sampler']} {o['steps']} steps, T {o['temperature']} | {t['nfe']} | {100 * t['share_train_words']:.1f}% | "
             f"{100 * t['share_test_words']:.1f}% | "
             f"{100 * (1 - t['share_train_words'] - t['share_test_words']):.1f}% | {100 * t['share_unique']:.1f}% |"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[], help="(a) DiscreteDiffusion on digits (K = 256); repeat")
    p.add_argument("--binary_vae", help="(b) Bernoulli VAE on binary_digits")
    p.add_argument("--binary_diffusion", help="(b) DiscreteDiffusion on binary_digits (K = 2)")
    p.add_argument("--text", help="(c) DiscreteDiffusion on words")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is; 1 on a busy CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid_samples", type=int, default=500)
    p.add_argument("--fid_batch_size", type=int, default=250)
    p.add_argument("--extractor_weights", default=None, help="digits CNN weights (default $LD_DATA/weights)")
    p.add_argument("--ancestral_steps", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    p.add_argument("--temperature", type=float, default=1.0, help="ancestral sampling temperature")
    p.add_argument("--sundae_steps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--sundae_temperature", type=float, nargs="+", default=[1.0], help="one row set per value")
    p.add_argument("--update_fraction", type=float, default=None, help="SUNDAE share of positions updated (None: model's)")
    p.add_argument("--iwae_k", type=int, default=1000)
    p.add_argument("--bpd_batch_size", type=int, default=180)
    p.add_argument("--num_test", type=int, default=None, help="score only the first N test items (smoke tests)")
    p.add_argument("--text_batch_size", type=int, default=804, help="sequences per bits_per_dim call")
    p.add_argument("--text_num", type=int, default=200, help="text samples drawn")
    p.add_argument("--text_print", type=int, default=20, help="text samples printed")
    p.add_argument("--text_sampler", default="ancestral", choices=("ancestral", "sundae"))
    p.add_argument("--text_steps", type=int, default=100)
    p.add_argument("--text_temperature", type=float, default=1.0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if bool(args.binary_vae) != bool(args.binary_diffusion):
        p.error("(b) needs both --binary_vae and --binary_diffusion")
    if not (args.ckpt or args.binary_vae or args.text):
        p.error("give --ckpt, --binary_vae/--binary_diffusion and/or --text")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"benchmark": "bench_discrete", "threads": torch.get_num_threads(), "seed": args.seed,
                               "device": args.device, "fid_samples": args.fid_samples}

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2))

    tables = []
    if args.ckpt:
        from lightning_diffusion import ShardDataModule

        fid_data = ShardDataModule("digits", batch_size=256, num_workers=0)
        fid_data.setup("test")
        results["nfe_sweep"] = []
        for path in args.ckpt:
            results["nfe_sweep"].append(nfe_sweep(path, args, fid_data))
            save()
        tables.append(f"Sample quality vs NFE, digits ({args.fid_samples} samples, digits-CNN FID vs the test split):\n\n"
                      + nfe_table(results["nfe_sweep"]))
    if args.binary_vae:
        results["binary"] = binary(args)
        save()
        tables.append(f"Binarized digits test split ({results['binary']['num_test']} images):\n\n"
                      + binary_table(results["binary"]))
    if args.text:
        results["text"] = text(args)
        save()
        t = results["text"]
        tables.append(f"Words, held-out test split ({t['n']} sequences of {t['seq_length']} characters; "
                      f"{t['num_samples']} samples):\n\n" + text_table(t) + "\n\nSamples: "
                      + ", ".join(repr(w) for w in t["samples"][: args.text_print]))
    print()
    print("\n\n".join(tables))
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
