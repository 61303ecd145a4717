"""Fixed cases for tests/test_parameterization.py: tiny nets, a fixed batch and seed per case.

Run as a script (``python tests/gaussian_pins.py``) it prints the losses, denoised values and bound
of every case with the code on PYTHONPATH; the test holds the numbers printed by the code before the
parameterization table (issue 22) and checks the code of today against them.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_diffusion import MLP, DDPM, ScoreSDE
from lightning_diffusion.diffusion.sde import VESDE, VPSDE, SubVPSDE


class TinyConv(nn.Module):
    """A 3x3 convolution plus a time embedding: the smallest image net ``net(x, t, y)``."""

    def __init__(self, channels: int = 1, out_channels: int = 1, time_scale: float = 1.0):
        super().__init__()
        self.out_channels, self.time_scale = out_channels, time_scale
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.time = nn.Linear(1, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.conv(x) + torch.sin(self.time(t.float()[:, None] * self.time_scale / 1000))[:, :, None, None]


def ddpm_cases() -> list[tuple[str, dict]]:
    cases = []
    for param in ("eps", "x0", "v"):
        for loss_type in ("simple", "hybrid"):
            for gamma in (None, 5.0):
                for data in ("points", "images"):
                    cases.append((f"ddpm-{param}-{loss_type}-snr{gamma}-{data}",
                                  dict(parameterization=param, loss_type=loss_type, min_snr_gamma=gamma, data=data)))
    cases.append(("ddpm-v-simple-cosine-points", dict(parameterization="v", beta_schedule="cosine", data="points")))
    cases.append(("ddpm-eps-simple-cond-points", dict(parameterization="eps", class_conditional=True, data="points")))
    return cases


def sde_cases() -> list[tuple[str, dict]]:
    cases = []
    for sde in ("vp", "subvp", "ve"):
        for param in ("eps", "score", "edm"):
            for weighting, importance in (("sigma2", False), ("likelihood", False), ("likelihood", True)):
                for data in ("points", "images"):
                    cases.append((f"sde-{sde}-{param}-{weighting}-is{importance}-{data}",
                                  dict(sde=sde, parameterization=param, weighting=weighting,
                                       importance_sampling=importance, data=data)))
    cases.append(("sde-vp-eps-sigma2-cond-points", dict(sde="vp", parameterization="eps", class_conditional=True,
                                                         data="points")))
    return cases


def batch(data: str, conditional: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    if data == "points":
        x = torch.randn(16, 2, generator=g)
    else:  # 8-bit images in [-1, 1]
        x = torch.randint(0, 256, (16, 1, 4, 4), generator=g).float() / 127.5 - 1
    out = {"x": x}
    if conditional:
        out["y"] = torch.randint(0, 3, (16,), generator=g)
    return out


def build(family: str, options: dict):
    """(model, batch) of one case; the net's weights come from seed 0."""
    options = dict(options)
    data, conditional = options.pop("data"), options.get("class_conditional", False)
    torch.manual_seed(0)
    out_mult = 2 if options.get("loss_type") == "hybrid" else 1
    scale = 1000.0 if family == "sde" else 1.0
    if data == "points":
        net = MLP(in_channels=2, hidden=16, num_layers=1, time_embed_dim=16, time_scale=scale,
                  out_channels=2 * out_mult, num_classes=3 if conditional else None)
        shape = (2,)
    else:
        net = TinyConv(1, out_mult, time_scale=scale)
        shape = (1, 4, 4)
    if family == "sde":
        options["sde"] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}[options["sde"]]()
        model = ScoreSDE(net, data_shape=shape, num_classes=3 if conditional else None, **options)
    else:
        model = DDPM(net, data_shape=shape, num_classes=3 if conditional else None, **options)
    return model, batch(data, conditional)


def measure(family: str, options: dict) -> dict[str, list[float]]:
    """Two losses (train mode, seeds 7 and 8), the denoised estimate at three times, and for a DDPM
    the bound of the first two samples with 10 respaced steps."""
    model, b = build(family, options)
    model.train()
    losses = [model.loss(b, generator=torch.Generator().manual_seed(s)).item() for s in (7, 8)]
    model.eval()
    process = model.process
    t = torch.tensor([0.3, 0.6, 0.95], dtype=torch.float64) * float(process.t_max) + float(process.t_min) * 0.05
    x = b["x"][:3]
    y = b["y"][:3] if "y" in b else None
    with torch.no_grad():
        denoised = model.denoise(x.float(), t.float(), y).flatten().tolist()
    out = {"loss": losses, "denoised": denoised[:6]}
    if family == "ddpm":
        with torch.no_grad():
            bound = model.bits_per_dim(b["x"][:2], steps=10, y=None if y is None else b["y"][:2],
                                       generator=torch.Generator().manual_seed(3))
        out["bpd"] = bound.tolist()
    return out


if __name__ == "__main__":
    import json

    pins = {name: measure(family, opts) for family, cases in (("ddpm", ddpm_cases()), ("sde", sde_cases()))
            for name, opts in cases}
    print(json.dumps(pins, indent=None))
