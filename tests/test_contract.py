"""The model contract (docs/architecture.md, "Contracts: Model" and "Callbacks' view") held by every family
and by a user's own LightningModule, in one process on tiny models (tests/tiny.py): ``sample``'s shape,
range and dtype; a finite ``bits_per_dim`` [B] and the estimator's name; options accepted and refused as
the signatures of ``sample`` and ``bits_per_dim`` say; ``preview_sample_options()`` accepted by
``sample``; a changed ``resume_fixed_hparams`` option refused on resume; the callbacks' runtime-checkable
protocols."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from tiny import UserModule, tiny_latent_model, tiny_model

from lightning_diffusion.callbacks.common import sampling_options
from lightning_diffusion.callbacks.protocol import (GenerativeModule, HasDensity, HasTrajectory, NamesEstimator,
                                                    Reconstructs, estimator_name)
from lightning_diffusion.errors import OptionError, ResumeConflictError
from lightning_diffusion.resume import check_resume

pytestmark = pytest.mark.usefixtures("one_thread")

#: case -> (model builder, fast options of sample, options of bits_per_dim, the optional protocols it has)
CASES = {
    "ddpm": (lambda: tiny_model("ddpm"), {"sampler": "ddim", "steps": 3}, {"steps": 4}, {HasTrajectory}),
    "score_sde": (lambda: tiny_model("score_sde"), {"sampler": "euler_maruyama", "steps": 3}, {"steps": 4},
                  {HasTrajectory}),
    "vae": (lambda: tiny_model("vae"), {}, {"num_importance_samples": 2}, {Reconstructs}),
    "hvae": (lambda: tiny_model("hvae"), {}, {}, {Reconstructs}),
    "vqvae": (lambda: tiny_model("vqvae"), {}, {"chunk_rows": 2}, {Reconstructs}),
    "ebm": (lambda: tiny_model("ebm"), {"steps": 3}, {}, {HasDensity}),
    "discrete": (lambda: tiny_model("discrete"), {"steps": 4}, {}, set()),
    "discrete_text": (lambda: tiny_model("discrete", net=dict(sequence=True), num_categories=5, data_shape=(6,)),
                      {"steps": 4}, {}, set()),
    "latent": (lambda: tiny_latent_model(), {"sampler": "ddim", "steps": 3}, {"steps": 4}, set()),
    "user": (UserModule, {}, {}, set()),
}
OPTIONAL = (Reconstructs, HasTrajectory, HasDensity)


def data(model) -> torch.Tensor:
    """4 samples of the model's data: 8-bit images in [-1, 1], points, or int64 sequences."""
    g, shape = torch.Generator().manual_seed(0), (4, *model.data_shape)
    if len(shape) == 2 and getattr(model, "num_categories", None):
        return torch.randint(0, model.num_categories, shape, generator=g)
    if len(shape) == 4:
        return torch.randint(0, 256, shape, generator=g) / 127.5 - 1
    return torch.randn(shape, generator=g)


def keyword_options(method) -> dict[str, tuple[typing.Any, typing.Any]]:
    """``{name: (annotation, default)}`` of a method's keyword options (not the data, ``y``, ``generator``)."""
    hints = typing.get_type_hints(method)
    return {name: (hints.get(name), p.default) for name, p in inspect.signature(method).parameters.items()
            if p.default is not inspect.Parameter.empty and name not in ("y", "generator")}


def literal_choices(annotation) -> tuple | None:
    """The choices of a ``Literal[...]`` annotation (also inside ``X | None``), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def changed(value):
    """A different value of the same kind (for a changed hyperparameter)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, (tuple, list)):
        return [*value, 1]
    return 1 if value is None else None


@pytest.mark.parametrize("case", list(CASES))
def test_the_model_contract(case):
    torch.manual_seed(0)
    build, fast, bpd_options, protocols = CASES[case]
    model = build().eval()
    ours = case != "user"

    # sample: [n, *data_shape]; images float32 in [-1, 1], sequences int64 categories, points finite floats
    x = model.sample(4, generator=torch.Generator().manual_seed(1), **fast)
    assert x.shape == (4, *model.data_shape)
    if len(model.data_shape) == 3:
        assert x.dtype == torch.float32 and float(x.min()) >= -1 and float(x.max()) <= 1
    elif getattr(model, "num_categories", None):
        assert x.dtype == torch.int64 and 0 <= int(x.min()) and int(x.max()) < model.num_categories
    else:
        assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())

    # bits_per_dim: finite [B], the estimator named (a user's module without bpd_estimator: "bpd")
    bpd = model.bits_per_dim(data(model), **bpd_options)
    assert bpd.shape == (4,) and bool(torch.isfinite(bpd).all()), bpd
    name = estimator_name(model, **bpd_options)
    assert isinstance(name, str) and name and (name != "bpd") == ours

    # the callbacks' view
    assert isinstance(model, GenerativeModule)
    assert isinstance(model, NamesEstimator) == ours
    assert {p for p in OPTIONAL if isinstance(model, p)} == protocols

    # the preview sampler: what the callbacks use when sample_options name neither sampler nor steps
    preview = sampling_options(model, {})
    assert preview == (model.preview_sample_options() if ours else {})
    assert model.sample(2, generator=torch.Generator().manual_seed(2), **preview).shape == (2, *model.data_shape)
    if not ours:
        return

    # options as the signatures say: an unknown one is named; every default is accepted; an unknown sampler
    # is named; a Literal option takes each of its choices and refuses anything else, naming the option
    for method, check, call in ((model.sample, model.check_sample_options, lambda **o: model.sample(2, **o)),
                                (model.bits_per_dim, model.check_bpd_options,
                                 lambda **o: model.bits_per_dim(data(model), **o))):
        with pytest.raises(OptionError, match="no_such_option") as error:
            call(no_such_option=1)
        assert error.value.option == "no_such_option" or "no_such_option" in str(error.value)
        options = keyword_options(method)
        check(**{k: default for k, (_, default) in options.items()})
        if "sampler" in options:  # a sampler registry's name (diffusion/, discrete/, the EBM's)
            with pytest.raises(OptionError, match="sampler"):
                call(sampler="no_such_sampler")
        for option, (annotation, _) in options.items():
            choices = literal_choices(annotation)
            if choices is None:
                continue
            for choice in choices:
                check(**{option: choice})
            with pytest.raises(OptionError, match=option):
                call(**{option: "no_such_choice"})

    # resume: a changed resume_fixed_hparams option is refused, naming it; a changed lr is applied
    old = dict(model.hparams)
    checkpoint = {"hyper_parameters": old, "state_dict": model.state_dict()}
    fixed = [k for k in model.resume_fixed_hparams if k in old]
    assert fixed and "data_shape" in fixed
    for key in fixed:
        with pytest.raises(ResumeConflictError, match=f"model.init_args.{key}:"):
            check_resume(model, {**old, key: changed(old[key])}, checkpoint, "last.ckpt")
    assert list(check_resume(model, {**old, "lr": 0.123}, checkpoint, "last.ckpt")) == ["lr"]


def test_a_users_module_has_nothing_fixed_on_resume_but_its_class():
    """A module without resume_fixed_hparams: its options may change on resume (the weights' shapes are
    still compared), its class may not."""
    model = UserModule()
    old = {**model.hparams, "_class_path": "tiny.UserModule"}
    checkpoint = {"hyper_parameters": old, "state_dict": model.state_dict()}
    assert list(check_resume(model, {**old, "data_shape": (1, 8, 9)}, checkpoint, "last.ckpt")) == ["data_shape"]
    with pytest.raises(ResumeConflictError, match="model.class_path: 'tiny.UserModule' in the checkpoint"):
        check_resume(model, {**old, "_class_path": "my.OtherModule"}, checkpoint, "last.ckpt")
