"""Bits/dim of trained VAE / HierarchicalVAE checkpoints on the digits test split: the ELBO and the
IWAE bound at K = 1, 10, 100, 1000, the KL per latent group, seconds per estimate and the peak
memory of K = 1000 against K = 1.

Each (model, K) runs in a fresh subprocess (``--worker``) that loads the checkpoint and the test
split, records its peak resident memory (``ru_maxrss``) before and after ``bits_per_dim``, and
prints one JSON line; the parent collects them into a table. The same posterior-noise seed is used
for every K. Peak memory is compared twice: the whole process (torch included) and the increment
over the state after loading (what the evaluation itself needs). Target: K = 1000 within 1.5x the
peak memory of K = 1.

    python benchmarks/bench_vae_bpd.py --vae runs/vae_digits/version_0/checkpoints/last.ckpt \\
        --hvae runs/hvae_digits/version_0/checkpoints/last.ckpt [--threads 1] [--json out.json] [--grids DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

KS = (1, 10, 100, 1000)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load(kind: str, ckpt: str):
    import lightning_diffusion as ld

    model = {"vae": ld.VAE, "hvae": ld.HierarchicalVAE}[kind].load_from_checkpoint(ckpt, map_location="cpu")
    model.eval()
    return model


def test_images(dataset: str):
    import torch

    from lightning_diffusion import ShardDataModule

    dm = ShardDataModule(dataset, batch_size=1000)
    return torch.cat([batch["x"] for batch in dm.test_dataloader()])


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = load(args.kind, args.ckpt)
    x = test_images(args.dataset)
    baseline = peak_rss_mib()
    start = time.perf_counter()
    bits = model.bits_per_dim(x, args.k, generator=torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - start
    out = {"kind": args.kind, "k": args.k, "estimator": model.bpd_estimator(args.k), "n": len(bits),
           "bits_per_dim": bits.mean().item(), "stderr": (bits.std() / math.sqrt(len(bits))).item(),
           "seconds": seconds, "rss_before_mib": baseline, "rss_peak_mib": peak_rss_mib()}
    if args.k == 1:  # the ELBO's decomposition, averaged over the test images, bits/dim
        with torch.no_grad():
            terms = model._terms({"x": x}, torch.Generator().manual_seed(args.seed))
        out["recon"], out["kl"] = terms["recon"].item(), terms["kl"].item()
        out["kl_groups"] = [k.item() for k in terms["kl_groups"]]
        out["active_units"] = None
        model._accumulate_units(terms["means"])
        out["active_units"] = model.active_units()
    print("RESULT " + json.dumps(out), flush=True)


def run_worker(kind: str, ckpt: str, k: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--kind", kind, "--ckpt", ckpt, "--k", str(k), "--threads",
           str(args.threads), "--seed", str(args.seed), "--dataset", args.dataset]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {kind} K={k} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def save_grids(kind: str, ckpt: str, args) -> None:
    import torch

    from lightning_diffusion.callbacks.samples import save_image_grid

    model = load(kind, ckpt)
    x = test_images(args.dataset)[:32]
    recon = model.reconstruct(x, generator=torch.Generator().manual_seed(0))
    pairs = torch.stack([x, recon], 1).flatten(0, 1)  # original, reconstruction, ...
    save_image_grid(pairs, Path(args.grids) / f"{kind}_reconstructions.png", nrow=8)
    for t in (1.0, 0.8):
        samples = model.sample(64, generator=torch.Generator().manual_seed(0), temperature=t)
        save_image_grid(samples, Path(args.grids) / f"{kind}_samples_t{t}.png", nrow=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", help="checkpoint of a VAE trained on digits")
    parser.add_argument("--hvae", help="checkpoint of a HierarchicalVAE trained on digits")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--grids", help="also save reconstruction and sample grids (PNG) into this folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    models = [(kind, ckpt) for kind, ckpt in (("vae", args.vae), ("hvae", args.hvae)) if ckpt]
    if not models:
        parser.error("give --vae and/or --hvae checkpoints")
    results = {"dataset": args.dataset, "threads": args.threads, "seed": args.seed, "models": {}}
    print(f"{'model':6} {'estimator':>10} {'bits/dim':>18} {'seconds':>8} {'peak RSS MiB':>13} {'eval MiB':>9}")
    for kind, ckpt in models:
        rows = []
        for k in args.ks:
            row = run_worker(kind, ckpt, k, args)
            rows.append(row)
            print(f"{kind:6} {row['estimator']:>10} {row['bits_per_dim']:10.3f} +- {row['stderr']:.3f} "
                  f"{row['seconds']:8.1f} {row['rss_peak_mib']:13.0f} {row['rss_peak_mib'] - row['rss_before_mib']:9.1f}",
                  flush=True)
        by_k = {row["k"]: row for row in rows}
        summary = {"checkpoint": ckpt, "rows": rows}
        if 1 in by_k:
            first = by_k[1]
            print(f"{kind}: recon {first['recon']:.3f} + KL {first['kl']:.3f} bits/dim; KL per group (bits/dim) "
                  + ", ".join(f"{v:.3f}" for v in first["kl_groups"]) + f"; active units {first['active_units']}")
        if 1 in by_k and max(by_k) > 1:
            top = by_k[max(by_k)]
            total = top["rss_peak_mib"] / by_k[1]["rss_peak_mib"]
            eval_one = max(by_k[1]["rss_peak_mib"] - by_k[1]["rss_before_mib"], 1e-9)
            increment = (top["rss_peak_mib"] - top["rss_before_mib"]) / eval_one
            summary["peak_rss_ratio"], summary["eval_rss_ratio"] = total, increment
            verdict = "meets" if total <= 1.5 else "misses"
            print(f"{kind}: peak memory K={max(by_k)} / K=1 = {total:.3f} (process), {increment:.2f} (evaluation "
                  f"increment) -> {verdict} the 1.5x target")
        results["models"][kind] = summary
        if args.grids:
            save_grids(kind, ckpt, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
