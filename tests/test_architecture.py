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


#: the pure-math folders (no Lightning) and what of ours each may import besides itself and errors.py
PURE_MATH = {"likelihoods": (), "diffusion": ("likelihoods", "sampling", "options", "mcmc"),
             "discrete": ("likelihoods", "sampling", "options"), "mcmc": ("likelihoods", "options")}
#: modules that import nothing of ours and no Lightning, so that every layer may use them
LEAVES = ("errors", "modes", "encodings", "paths", "sampling")
#: the families that are not Gaussian diffusion: none of them imports diffusion/
NON_DIFFUSION_FAMILIES = ("vae", "hvae", "vqvae", "latent_variable", "ebm", "discrete_diffusion")
#: the only imports of data/ from callbacks/ or metrics/, each (importer, imported): the DataModule
#: class, to train the digits feature net on the embedded digits' split in the writer's order
DATA_EDGES = {("lightning_diffusion.metrics.features", "lightning_diffusion.data.datamodule")}


def _rule(module: str) -> tuple[tuple[str, ...] | None, tuple[str, ...], bool]:
    """(of ours only these may be imported (None: any but the forbidden), forbidden, Lightning allowed)."""
    ld = "lightning_diffusion"
    folder = module.split(".")[1] if module.count(".") else ""
    if folder in PURE_MATH:  # pure math: its own folder, the error classes and the pure modules it builds on
        return (f"{ld}.{folder}", f"{ld}.errors", *(f"{ld}.{m}" for m in PURE_MATH[folder])), (), False
    if module in (f"{ld}.{m}" for m in LEAVES):
        return (), (), False
    if module == f"{ld}.data.streams":  # DataLoader workers import it: of ours only the encodings, no Lightning
        return (f"{ld}.encodings",), (), False
    if _in(module, f"{ld}.nets"):
        return (f"{ld}.nets", f"{ld}.errors"), (), True  # plain nn.Modules: no schedule, no model
    if _in(module, f"{ld}.data"):  # knows no model
        return (f"{ld}.data", f"{ld}.errors", f"{ld}.encodings", f"{ld}.paths", f"{ld}.distributed"), (), True
    if _in(module, f"{ld}.callbacks"):  # the model contract and metrics/, never a family's internals
        return None, (f"{ld}.diffusion", f"{ld}.discrete", f"{ld}.mcmc", f"{ld}.likelihoods", f"{ld}.models",
                      f"{ld}.data", f"{ld}.cli", f"{ld}.commands"), True
    if _in(module, f"{ld}.metrics"):  # features and torchmetrics Metrics: no model, no callback
        return None, (f"{ld}.models", f"{ld}.callbacks", f"{ld}.data", f"{ld}.cli", f"{ld}.commands"), True
    never = (f"{ld}.callbacks", f"{ld}.cli", f"{ld}.commands", f"{ld}.data")  # a model trains without callbacks or data/
    if module == f"{ld}.models.base":  # the thin base: no family's math, so an EBM can sit on it
        return None, (*never, f"{ld}.diffusion", f"{ld}.discrete", f"{ld}.mcmc"), True
    if module in (f"{ld}.models.{m}" for m in NON_DIFFUSION_FAMILIES):  # their likelihood math is likelihoods/
        return None, (*never, f"{ld}.diffusion"), True
    if _in(module, f"{ld}.models"):
        return None, never, True
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
    bad = sorted(m for m in ours if (module, m) not in DATA_EDGES and (
        _in(m, *forbidden) or (allowed is not None and not _in(m, *allowed))))
    assert not bad, f"{module} imports {bad}: see 'Who may import whom' in docs/architecture.md"
    if not lightning:
        light = sorted(m for m in imported if m.split(".")[0] in LIGHTNING)
        assert not light, f"{module} imports {light}, but must run without Lightning"


def test_callbacks_and_metrics_reach_data_only_through_the_listed_edges():
    """DATA_EDGES is exact: each edge is still used (a stale exception would let a new import in unseen)
    and what it reaches of data/ is the DataModule class alone."""
    found = {(m, i) for m, p in MODULES.items() if _in(m, "lightning_diffusion.callbacks", "lightning_diffusion.metrics")
             for i in _ours(_imports(p)) if _in(i, "lightning_diffusion.data")}
    assert found == DATA_EDGES
    from lightning_diffusion.data.datamodule import ShardDataModule

    for importer, imported in DATA_EDGES:
        tree = ast.parse(MODULES[importer].read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == imported
                 for alias in node.names}
        assert names == {ShardDataModule.__name__}, f"{importer} takes {sorted(names)} from {imported}"


def test_moved_helpers_keep_one_definition_and_their_old_import_paths():
    """Issue 22 moved helpers to their own homes; the old paths are re-exports of the same objects."""
    import importlib

    homes = {
        "lightning_diffusion.likelihoods": {
            "lightning_diffusion.diffusion.distributions": ("DecoderLikelihood", "log_mean_exp", "RunningLogMeanExp",
                                                            "soft_clamp", "diagonal_gaussian_sample"),
            "lightning_diffusion.diffusion.vlb": ("normal_kl", "gaussian_log_likelihood", "nats_to_bits_per_dim",
                                                  "discretized_gaussian_log_likelihood", "sum_over_dims"),
            "lightning_diffusion.diffusion.likelihood": ("dequantize", "bits_per_dim_discrete"),
            "lightning_diffusion.mcmc": ("log_mean_exp",)},
        "lightning_diffusion.sampling": {"lightning_diffusion.diffusion": ("SamplerOutput",),
                                         "lightning_diffusion.discrete": ("SamplerOutput",),
                                         "lightning_diffusion": ("SamplerOutput",)},
        "lightning_diffusion.encodings": {
            "lightning_diffusion.data.streams": ("images_from_categories", "categories_from_images"),
            "lightning_diffusion.data.sources": ("decode_text", "encode_text", "ALPHABET", "COLOURS",
                                                 "split_colour_digit_label", "colour_digit_label")},
        "lightning_diffusion.paths": {"lightning_diffusion.data.shards": ("data_cache_dir", "sha256_file")},
        "lightning_diffusion.distributed": {"lightning_diffusion.data.datamodule": ("rank_world",)},
    }
    for home, old_paths in homes.items():
        new = importlib.import_module(home)
        for old, names in old_paths.items():
            module = importlib.import_module(old)
            for name in names:
                assert getattr(module, name) is getattr(new, name), f"{old}.{name} is not {home}.{name}"


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
    from lightning_diffusion import DDPM, VAE, VQVAE, HierarchicalVAE, ScoreSDE
    from lightning_diffusion.callbacks.protocol import HasTrajectory
    from lightning_diffusion.models import GaussianDiffusionModel, GenerativeModel, LatentVariableModel
    from lightning_diffusion.models.vae import LatentVariableModel as from_vae

    assert from_vae is LatentVariableModel
    for family, layer in ((DDPM, GaussianDiffusionModel), (ScoreSDE, GaussianDiffusionModel),
                          (VAE, LatentVariableModel), (HierarchicalVAE, LatentVariableModel),
                          (VQVAE, LatentVariableModel)):
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
