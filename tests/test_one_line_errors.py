"""Issue 21, item 5: the last vague errors of `fit` become one line naming the option and what to do.

Parser errors run with ``--print_config``: a command line that parsed would print the config and
exit 0 (the assertion on the exit status then fails), so nothing here trains.
"""

from __future__ import annotations

import pytest

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(*args: str) -> str:
    """Run ``fit ARGS --print_config``; assert exit status 1 and one error line (+ the --debug hint); return it."""
    proc = run_cli("fit", *args, "--print_config", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 2 and lines[1].startswith("(--debug"), proc.stderr[-3000:]
    assert lines[0].startswith("lightning-diffusion fit: error: "), lines[0]
    return lines[0][len("lightning-diffusion fit: error: "):]


@pytest.mark.parametrize(("override", "expected"), [
    ("--model.init_args.timestep=10",
     "model.init_args.timestep: DDPM has no option 'timestep' (did you mean timesteps?); its options are net, "
     "timesteps, beta_schedule,"),
    ("--data.init_args.batchsize=4",
     "data.init_args.batchsize: ShardDataModule has no option 'batchsize' (did you mean batch_size?); its options "
     "are dataset,"),
    ("--model.init_args.net.init_args.model_chanels=4",
     "model.init_args.net.init_args.model_chanels: UNet has no option 'model_chanels' (did you mean model_channels?)"),
    ("--trainer.max_stesp=5",
     "--trainer.max_stesp: no such option (did you mean --trainer.max_steps?); `lightning-diffusion fit --help` lists"),
])
def test_an_unknown_option_names_the_closest(override, expected):
    assert one_line_error("--config", "configs/ddpm_digits.yaml", override).startswith(expected)


def test_an_unknown_option_of_a_callback_and_in_a_config_file(tmp_path):
    out = one_line_error("--config", "configs/ddpm_digits.yaml", "--trainer.callbacks+=SampleGrid",
                         "--trainer.callbacks.num_sample=3")
    assert out.startswith("trainer.callbacks.init_args.num_sample: SampleGrid has no option 'num_sample' "
                          "(did you mean num_samples?)"), out
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_stesp: 3\n")
    out = one_line_error("--config", "configs/ddpm_digits.yaml", "--config", str(typo))
    assert out.startswith("trainer.max_stesp (in a config file): no such option (did you mean trainer.max_steps?)"), out
    typo.write_text("model:\n  init_args:\n    timestep: 10\n")
    out = one_line_error("--config", "configs/ddpm_digits.yaml", "--config", str(typo))
    assert out.startswith("model.init_args.timestep: DDPM has no option 'timestep' (did you mean timesteps?)"), out


def test_an_abbreviated_option_applies():
    """argparse takes a unique prefix of an option (allow_abbrev): `--trainer.max_step=5` is max_steps,
    applied, not dropped."""
    proc = run_cli("fit", "--config", "configs/ddpm_digits.yaml", "--trainer.max_step=5", "--print_config")
    assert "  max_steps: 5\n" in proc.stdout


def test_other_parser_errors_keep_the_parsers_message():
    proc = run_cli("fit", "--config", "configs/ddpm_digits.yaml", "--model.init_args.timesteps=abc", "--print_config",
                   check=False)
    assert proc.returncode == 2 and "Expected a <class 'int'>. Got value: abc" in proc.stderr, proc.stderr[-2000:]
    assert "usage: " in proc.stderr and " fit --help" in proc.stderr  # the subcommand's usage, as before


def test_an_unimportable_class_path_is_named():
    out = one_line_error("--config", "configs/ddpm_toy2d.yaml", "--model.init_args.net.class_path=my_own_nets.MyNet")
    assert out.startswith("model.init_args.net.class_path='my_own_nets.MyNet': the class cannot be imported "
                          "(No module named 'my_own_nets'); install or import the module that defines it "
                          "(add its folder to PYTHONPATH"), out
