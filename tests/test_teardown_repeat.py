"""Multi-process runs end cleanly, every time: each distributed path of the CLI runs ``REPEATS``
(default 20, ``$LD_TEARDOWN_REPEATS``) times in a row, and every run must exit 0 with no process
aborting at its end (``terminate called ...``, SIGABRT; see lightning_diffusion/distributed.py).

- ``ddp``: ``fit --trainer.strategy=ddp --trainer.devices=2`` (Lightning's subprocess launcher starts
  rank 1, whose output shares the launcher's), with SampleQuality and Likelihood every 3 steps;
- ``fsdp2``: the same with ``ModelParallelStrategy`` (FSDP2; a sharded checkpoint folder);
- ``slurm``: the two-node path of tests/test_slurm.py (2 ranks placed by SLURM's variables).

``pytest -m slow tests/test_teardown_repeat.py -s`` prints the count of each path. About 10 s a run
on 2 idle cores.
"""

from __future__ import annotations

import os
import time

import pytest

from conftest import ROOT, assert_ended_cleanly, run_cli
from test_slurm import CONFIG, TINY, _free_port_pair, two_node_ranks

REPEATS = int(os.environ.get("LD_TEARDOWN_REPEATS", "20"))
# the evaluation callbacks' collectives, at the last of 3 steps (points: energy distance and MMD, no extractor)
EVALUATION = ["--trainer.callbacks+=SampleQuality", "--trainer.callbacks.num_samples=20",
              "--trainer.callbacks.batch_size=10", "--trainer.callbacks.every_n_epochs=0",
              "--trainer.callbacks.every_n_steps=3", "--trainer.callbacks.num_real=256",
              "--trainer.callbacks.cache_stats=false", "--trainer.callbacks.sample_options={sampler: ddim, steps: 3}",
              "--trainer.callbacks+=Likelihood", "--trainer.callbacks.every_n_epochs=0",
              "--trainer.callbacks.every_n_steps=3", "--trainer.callbacks.num_batches=1",
              "--trainer.callbacks.split=train", "--trainer.callbacks.bpd_options={steps: 3}"]
STRATEGIES = {
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp2": ["--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
              "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1"],
}


def _cli_run(strategy: str, run_dir) -> list[tuple[int, str, str]]:
    """One 2-process CLI fit: (exit status, output, what) of the launcher and the rank it started."""
    proc = run_cli("fit", "--config", str(CONFIG), *TINY, *STRATEGIES[strategy], "--trainer.devices=2",
                   "--trainer.max_steps=3", "--data.init_args.batches_per_epoch=3",
                   f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
                   *EVALUATION, separate_process=True, check=False, timeout=300)
    return [(proc.returncode, proc.stdout + proc.stderr, f"{strategy} fit (both ranks)")]


def _slurm_run(run_dir) -> list[tuple[int, str, str]]:
    return [(code, out, f"slurm rank {rank}") for rank, (code, out) in
            enumerate(two_node_ranks(run_dir, _free_port_pair(), timeout=300))]


RUNS = {"ddp": lambda d: _cli_run("ddp", d), "fsdp2": lambda d: _cli_run("fsdp2", d), "slurm": _slurm_run}


@pytest.mark.slow
@pytest.mark.parametrize("path", list(RUNS))
def test_multi_process_runs_end_cleanly_every_time(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")  # an abort prints its Python stacks too
    monkeypatch.chdir(ROOT)
    failures, start = [], time.perf_counter()
    for i in range(REPEATS):  # every run, even after a failure: the count is the result
        for code, output, what in RUNS[path](tmp_path / f"run{i}"):
            try:
                assert_ended_cleanly(code, output, f"run {i}, {what}")
            except AssertionError as failure:
                failures.append(str(failure))
    seconds = time.perf_counter() - start
    print(f"\n{path}: {REPEATS} runs in {seconds:.0f} s, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {REPEATS} {path} runs failed:\n" + "\n".join(failures)
