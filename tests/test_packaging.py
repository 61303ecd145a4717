"""Packaging: the package list names every package, the configs ship with the package and
``--config NAME`` finds them from any directory. (The wheel itself is built, installed into a clean
environment and run from outside the checkout by .ci/run.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lightning_diffusion import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_and_the_configs_are_package_data():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lightning_diffusion").rglob("__init__.py")}
    assert found | {"lightning_diffusion.configs"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"lightning_diffusion.configs": "configs"}
    assert setuptools["package-data"]["lightning_diffusion.configs"] == ["*.yaml"]


def test_config_names_resolve_to_the_packaged_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: configs/ is not here
    packaged = cli.packaged_configs_dir()
    assert cli.packaged_configs() == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    for value in ("ddpm_toy2d", "ddpm_toy2d.yaml", "configs/ddpm_toy2d.yaml"):
        assert cli.resolve_config(value) == str(packaged / "ddpm_toy2d.yaml")
    # a file that exists wins; other paths and inline YAML are LightningCLI's
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ddpm_toy2d.yaml").write_text("seed_everything: 1\n")
    assert cli.resolve_config("configs/ddpm_toy2d.yaml") == "configs/ddpm_toy2d.yaml"
    assert cli.resolve_config("/elsewhere/mine.yaml") == "/elsewhere/mine.yaml"
    assert cli.resolve_config("trainer: {max_steps: 3}") == "trainer: {max_steps: 3}"
    with pytest.raises(SystemExit, match=r"--config ddpm_mnist: no such file.*packaged configs: ddpm_cifar10, "):
        cli.resolve_config("ddpm_mnist")
    assert cli._resolve_config_args(["fit", "-c", "vae_toy2d", "--config=sde_vp_toy2d", "--trainer.max_steps=3"]) == [
        "fit", "-c", str(packaged / "vae_toy2d.yaml"), f"--config={packaged / 'sde_vp_toy2d.yaml'}",
        "--trainer.max_steps=3"]


def test_help_names_the_packaged_configs(capsys):
    cli.main(["--help"])
    assert "Configs in the package (--config NAME, also outside a checkout): ddpm_cifar10, " in capsys.readouterr().out


def test_fit_reads_a_packaged_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", "ddpm_toy2d", "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: lightning_diffusion.DDPM" in out and "max_steps: 4000" in out
