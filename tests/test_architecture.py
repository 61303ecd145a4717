"""docs/architecture.md stays true: its import rules, checked on every module's imports (parsed
with ``ast``, imports inside functions included), and the layers of the model classes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import lightning_diffusion

PACKAGE = Path(lightning_diffusion.__file__).parent
LIGHTNING = ("lightning", "pytorch_lightning")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module
    of ours, else ``a``), relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in MODULES:
                    found.add(candidate)
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _ours(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "lightning_diffusion" or m.startswith("lightning_diffusion.")}


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _rule(module: str) -> tuple[tuple[str, ...] | None, tuple[str, ...], bool]:
    """(of ours only these may be imported (None: any but the forbidden), forbidden, Lightning allowed)."""
    ld = "lightning_diffusion"
    if _in(module, f"{ld}.diffusion", f"{ld}.mcmc", f"{ld}.discrete"):
        own = f"{ld}.{module.split('.')[1]}"
        return (own, f"{ld}.errors", f"{ld}.options"), (), False  # pure math: its own folder, the error classes, the option checks
    if module == f"{ld}.data.streams":
        return (), (), False  # DataLoader workers import it: nothing of ours, no Lightning
    if _in(module, f"{ld}.nets"):
        return (f"{ld}.nets", f"{ld}.errors"), (), True  # plain nn.Modules: no schedule, no model
    if _in(module, f"{ld}.data"):
        return (f"{ld}.data", f"{ld}.errors"), (), True  # knows no model
    if _in(module, f"{ld}.callbacks"):  # the model contract and metrics/, never a family's internals
        return None, (f"{ld}.diffusion", f"{ld}.discrete", f"{ld}.mcmc", f"{ld}.models", f"{ld}.cli", f"{ld}.commands"), True
    if module == f"{ld}.models.base":  # the thin base: no family's math, so an EBM can sit on it
        return None, (f"{ld}.callbacks", f"{ld}.cli", f"{ld}.commands", f"{ld}.diffusion", f"{ld}.discrete",
                      f"{ld}.mcmc"), True
    if _in(module, f"{ld}.models"):  # a model trains without any callback
        return None, (f"{ld}.callbacks", f"{ld}.cli", f"{ld}.commands"), True
    if module in (f"{ld}.errors", f"{ld}.modes"):
        return (), (), False  # leaves that every layer may import
    if module == f"{ld}.options":
        return (f"{ld}.errors",), (), False  # the option checks of every layer: the error classes only
    if module == f"{ld}.checkpoints":
        return (f"{ld}.errors",), (), False  # the safe checkpoint reader: torch and the error classes
    if module in (f"{ld}.cli", f"{ld}.__main__"):
        return None, (), True
    return None, (f"{ld}.cli",), True  # nothing imports the CLI


@pytest.mark.parametrize("module", sorted(MODULES))
def test_import_rules(module):
    allowed, forbidden, lightning = _rule(module)
    imported = _imports(MODULES[module])
    ours = _ours(imported) - {"lightning_diffusion"} if module != "lightning_diffusion.__main__" else set()
    bad = sorted(m for m in ours if _in(m, *forbidden)
                 or (allowed is not None and not _in(m, *allowed)))
    assert not bad, f"{module} imports {bad}: see 'Who may import whom' in docs/architecture.md"
    if not lightning:
        light = sorted(m for m in imported if m.split(".")[0] in LIGHTNING)
        assert not light, f"{module} imports {light}, but must run without Lightning"


def test_the_top_package_imports_its_public_names_lazily():
    assert not _ours(_imports(MODULES["lightning_diffusion"], top_level_only=True))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_imports_form_a_dag():
    """At module level and inside functions alike (a deferred import is still a dependency)."""
    graph = {m: {i for i in _ours(_imports(p)) if i in MODULES and i != m}
             for m, p in MODULES.items() if not m.endswith("__main__")}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_callback_modules_import_each_other_in_one_direction():
    callbacks = {m: p for m, p in MODULES.items() if _in(m, "lightning_diffusion.callbacks")
                 and m != "lightning_diffusion.callbacks"}
    graph = {m: {i for i in _imports(p) if i in callbacks and i != m} for m, p in callbacks.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


# -- the model layers ---------------------------------------------------------------------------------
def test_model_layers():
    from lightning_diffusion import DDPM, VAE, HierarchicalVAE, ScoreSDE
    from lightning_diffusion.callbacks.protocol import HasTrajectory
    from lightning_diffusion.models import GaussianDiffusionModel, GenerativeModel, LatentVariableModel
    from lightning_diffusion.models.vae import LatentVariableModel as from_vae

    assert from_vae is LatentVariableModel
    for family, layer in ((DDPM, GaussianDiffusionModel), (ScoreSDE, GaussianDiffusionModel),
                          (VAE, LatentVariableModel), (HierarchicalVAE, LatentVariableModel)):
        assert issubclass(family, layer) and layer.__bases__ == (GenerativeModel,)
    diffusion_only = ("denoise", "guided_denoiser", "draw_samples", "sample_trajectory", "_sampler_steps")
    assert not [name for name in diffusion_only if hasattr(GenerativeModel, name)]
    assert not issubclass(LatentVariableModel, HasTrajectory) and issubclass(GaussianDiffusionModel, HasTrajectory)


def test_evaluating_sets_eval_mode_and_no_grad_and_restores_the_flag():
    from lightning_diffusion.modes import evaluating

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with evaluating(module):
        assert not module.training and not module[1].training and not torch.is_grad_enabled()
    assert module.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), evaluating(module):
        raise RuntimeError("inside")
    assert module.training
    module.eval()
    with evaluating(module, no_grad=False):
        assert torch.is_grad_enabled()
    assert not module.training
