"""The scripts in examples/ run, with tiny settings, in this process (each is a ``main(argv)``:
no subprocess start-up), and the README's "Use as a library" code is a part of one of them."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    """examples/<name>.py as a module (its ``main`` not yet run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_net_ddpm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example logs where Lightning does by default: ./lightning_logs
    results = load("own_net_ddpm").main(["--max-steps", "12", "--val-every", "6", "--batch-size", "64",
                                         "--num-samples", "64", "--sample-steps", "5"])
    for family in ("ddpm", "score_sde"):  # SampleQuality evaluated each on the user's net
        assert math.isfinite(results[family]["val/energy_distance"]) and math.isfinite(results[family]["val/mmd"])
    records = {run: (tmp_path / "lightning_logs" / run / "metrics" / "sample_quality.jsonl").read_text().splitlines()
               for run in ("version_0", "version_1")}
    assert all(len(lines) == 2 and all('"weights": "ema"' in line for line in lines) for lines in records.values())


def test_own_module_callbacks(tmp_path, offline_wandb):
    metrics = load("own_module_callbacks").main(["--max-steps", "20", "--val-every", "10", "--num-samples", "200",
                                                 "--wandb", "offline", "--out", str(tmp_path)])
    assert metrics["val/ema"] == 1.0
    assert metrics["val/bpd_num_samples"] == 200 and metrics["val/bpd_exact"] == metrics["val/bpd"]
    assert metrics["val/energy_distance"] >= 0
    assert list(tmp_path.glob("csv/version_0/samples/samples-step0000020.png"))
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_shard_datamodule(tmp_path):
    metrics = load("shard_datamodule").main(["--max-steps", "40", "--batches-per-epoch", "20", "--out", str(tmp_path)])
    assert (tmp_path / "shards" / "index.json").is_file()
    assert metrics["val/accuracy"] > 0.5  # three classes: chance is 1/3


def test_readme_library_example_is_a_part_of_an_example():
    """Every line of the README's "Use as a library" code is a line of examples/own_net_ddpm.py, whose
    options (``args.max_steps`` ...) are written out with their defaults."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("## Use as a library", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    example = load("own_net_ddpm")
    defaults = vars(example.parser().parse_args([]))
    source = re.sub(r"args\.(\w+)", lambda m: repr(defaults[m.group(1)]), (EXAMPLES / "own_net_ddpm.py").read_text())
    lines = {line.strip() for line in source.splitlines()}
    missing = [line for line in code.splitlines() if line.strip() and line.strip() not in lines]
    assert not missing, f"README lines that are not in examples/own_net_ddpm.py: {missing}"
