"""Feature extractors for FID-style metrics, by name.

- ``inception-v3-compat``: torch-fidelity's InceptionV3, the TensorFlow FID network that papers
  use (2048-d pool features, 1008 logits for IS). Without network access it takes a local
  ``weights_path`` whose SHA-256 is checked before loading; ``lightning-diffusion features
  fetch-inception --out PATH`` downloads and checks the file on a machine with network.
- ``digits``: a small CNN classifier of the 8x8 digits (64-d features, 10 logits), trained by
  ``lightning-diffusion features train-digits`` (or on first use) from the embedded digits' train
  split, deterministically (fixed seed, one thread, fixed order), weights cached in ``$LD_DATA``.
  FID on it is comparable between our runs, not with papers.

Every extractor maps images in [-1, 1], ``[N, C, H, W]``, to ``(features [N, d], logits [N, k])``.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_diffusion.encodings import COLOURS, split_colour_digit_label
from lightning_diffusion.paths import data_cache_dir
from lightning_diffusion.paths import sha256_file as sha256_of

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# The release names the file with its SHA-256 prefix (torch.hub's convention); the full digest of
# that file is pinned here once known, the prefix is checked always.
INCEPTION_SHA256_PREFIX = "6726825d"
DIGITS_FILE = "digits-cnn-v1.pt"


def weights_dir() -> Path:
    """``$LD_DATA/weights`` (default ``~/.cache/lightning_diffusion/weights``)."""
    return data_cache_dir() / "weights"


class FeatureExtractor(nn.Module):
    """Base: ``forward(x) -> (features, logits)`` for images in [-1, 1]; frozen, eval mode."""

    name: str = ""
    num_features: int = 0
    num_logits: int = 0

    def freeze(self) -> "FeatureExtractor":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":  # always in eval mode
        return super().train(False)


# -- InceptionV3 (torch-fidelity) ---------------------------------------------------------------
class InceptionV3Features(FeatureExtractor):
    """torch-fidelity's ``inception-v3-compat``: 2048-d pool3 features and the 1008 unbiased logits.

    Images in [-1, 1] are quantized to uint8 as torch-fidelity expects (grey images repeated to
    RGB) and resized to 299 x 299 inside the network (TF1-compatible bilinear).
    """

    name = "inception-v3-compat"
    num_features, num_logits = 2048, 1008

    def __init__(self, weights_path: str | None = None):
        """
        Args:
            weights_path: local copy of ``weights-inception-2015-12-05-6726825d.pth``; None looks in
                ``$LD_DATA/weights/``. Its SHA-256 must start with ``6726825d``.
        """
        super().__init__()
        path = Path(weights_path) if weights_path else weights_dir() / INCEPTION_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"the InceptionV3 weights are not at {path}: run `lightning-diffusion features fetch-inception "
                f"--out {path}` (on a machine with network; then copy the file here), or pass the file's location "
                "as weights_path")
        digest = sha256_of(path)
        if not digest.startswith(INCEPTION_SHA256_PREFIX):
            raise ValueError(f"{path}: SHA-256 {digest} does not start with {INCEPTION_SHA256_PREFIX}; not the "
                             f"inception-v3-compat weights (re-fetch from {INCEPTION_URL})")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path))
        self.freeze()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        features, logits = self.net(images)
        return features, logits


def fetch_inception(out: str | Path) -> Path:
    """Download the inception-v3-compat weights to ``out`` and check their SHA-256 prefix."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    urllib.request.urlretrieve(INCEPTION_URL, tmp)
    digest = sha256_of(tmp)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        tmp.unlink()
        raise ValueError(f"downloaded file has SHA-256 {digest}, expected prefix {INCEPTION_SHA256_PREFIX}")
    os.replace(tmp, out)
    return out


# -- digits CNN -----------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """8x8 grey digit classifier: three 3x3 convolutions (32, 64, 64 channels), global average
    pooling to the 64-d feature, a linear layer to 10 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return features, self.head(features)


def to_digit_input(x: Tensor) -> Tensor:
    """Images in [-1, 1] of any size and channel count as the CNN's [N, 1, 8, 8] input: RGB
    becomes its per-pixel maximum (a tinted digit on black keeps its shape), larger images are
    average-pooled to 8 x 8."""
    x = x.float()
    if x.shape[1] != 1:
        x = x.amax(dim=1, keepdim=True)
    if x.shape[-1] != 8 or x.shape[-2] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return x


def nearest_colour(x: Tensor, palette: Tensor | None = None) -> Tensor:
    """Index of the named colour closest to each image's foreground colour (a colour classifier
    for tinted digits on black).

    The background is the per-channel median ``b`` of the image (a digit covers less than half of
    it); the foreground colour is the weighted mean ``c = sum_p w_p (rgb_p - b) / sum_p w_p`` with
    ``w_p = max(0, max_channel(rgb_p) - max_channel(b))`` (pixels in [0, 1]), normalized by its
    largest channel, so that a digit drawn at any intensity in colour ``k`` on black (or on a grey
    haze) gives exactly ``palette[k] / 255``; the nearest palette colour (Euclidean, in [0, 1]^3)
    wins.

    Args:
        x: RGB images in [-1, 1], ``[N, 3, H, W]``.
        palette: colours ``[K, 3]`` in 0..255; default the ``colour_digits`` colours
            (:data:`lightning_diffusion.encodings.COLOURS`).

    Returns:
        int64 ``[N]``: indices into the palette.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"nearest_colour: expected RGB images [N, 3, H, W], got shape {tuple(x.shape)}")
    if palette is None:
        palette = torch.tensor([rgb for _, rgb in COLOURS])
    rgb = (x.float().clamp(-1, 1) + 1) / 2
    background = rgb.flatten(2).median(dim=2).values[:, :, None, None]
    weight = (rgb.amax(dim=1, keepdim=True) - background.amax(dim=1, keepdim=True)).clamp_min(0)
    mean = (weight * (rgb - background)).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1e-8)
    mean = mean / mean.amax(dim=1, keepdim=True).clamp_min(1e-8)
    return torch.cdist(mean, palette.to(mean) / 255.0).argmin(dim=1)


def colour_digit_accuracy(x: Tensor, y: Tensor, digits: DigitsFeatures | None = None) -> dict[str, float]:
    """How often coloured-digit images show their joint label ``y = digit * 8 + colour``
    (``colour_digits``): the fraction whose digit the :class:`DigitsFeatures` classifier reads
    (on the per-pixel channel maximum, pooled to 8 x 8), whose :func:`nearest_colour` is the
    colour, and both. Chance: 1/10, 1/8 and 1/80.

    Args:
        x: RGB images in [-1, 1], ``[N, 3, H, W]``.
        y: joint labels ``[N]`` (int64).
        digits: the digit classifier; None loads (or trains) the cached one.

    Returns:
        ``{"digit": ..., "colour": ..., "both": ...}``, fractions in [0, 1].
    """
    if y.shape != x.shape[:1]:
        raise ValueError(f"colour_digit_accuracy: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    digit, colour = split_colour_digit_label(y.cpu())
    with torch.no_grad():
        predicted_digit = (digits or DigitsFeatures())(x.cpu())[1].argmax(1)
    predicted_colour = nearest_colour(x.cpu())
    return {"digit": (predicted_digit == digit).float().mean().item(),
            "colour": (predicted_colour == colour).float().mean().item(),
            "both": ((predicted_digit == digit) & (predicted_colour == colour)).float().mean().item()}


def train_digits_classifier(out: str | Path | None = None, epochs: int = 25, seed: int = 0) -> Path:
    """Train :class:`DigitsCNN` on the embedded digits' train split and save it to ``out``
    (default ``$LD_DATA/weights/digits-cnn-v1.pt``) with its validation accuracy.

    Deterministic: fixed seed, one thread, the split read in shard order, a fixed permutation per
    epoch (Adam, lr 1e-3, batch 64, ``epochs`` epochs); the validation accuracy is saved with the weights.
    The caller's global RNG state is restored afterwards.
    """
    # The DataModule is the one edge from metrics/ into data/ (tests/test_architecture.py allows it):
    # its eval_dataloader is the narrowest reader of the embedded digits that gives the shard writer's
    # split in its order, which the weights (and every FID on them) depend on.
    from lightning_diffusion.data.datamodule import ShardDataModule

    out = Path(out) if out is not None else weights_dir() / DIGITS_FILE
    data = ShardDataModule("digits", batch_size=512, num_workers=0)
    data.setup("fit")

    def load(split: str) -> tuple[Tensor, Tensor]:
        batches = list(data.eval_dataloader(split))
        return torch.cat([b["x"] for b in batches]), torch.cat([b["y"] for b in batches])

    (x, y), (xv, yv) = load("train"), load("val")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # the run's global RNG is left as it was: a fit that trains the classifier (a fresh $LD_DATA) and one
    # that loads it must draw the same numbers after setup, or a first run would differ from its repeat
    try:  # may run inside a validation loop: training needs autograd back
        with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            g = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            net = DigitsCNN()
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            x, y = x.clone(), y.clone()  # ordinary tensors, not inference-mode ones
            for _ in range(epochs):
                perm = torch.randperm(x.shape[0], generator=g)
                for i in range(0, x.shape[0], 64):
                    idx = perm[i:i + 64]
                    loss = F.cross_entropy(net(x[idx])[1], y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            accuracy = (net(xv)[1].argmax(1) == yv).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    torch.save({"state_dict": net.state_dict(), "val_accuracy": accuracy, "epochs": epochs, "seed": seed}, tmp)
    os.replace(tmp, out)
    return out


class DigitsFeatures(FeatureExtractor):
    """The :class:`DigitsCNN`'s 64-d pooled features and 10 logits, for the embedded digits."""

    name = "digits"
    num_features, num_logits = 64, 10

    def __init__(self, weights_path: str | None = None):
        """
        Args:
            weights_path: the classifier's weights; None uses ``$LD_DATA/weights/digits-cnn-v1.pt``,
                training it first (deterministically, ~10 s) if it is not there.
        """
        super().__init__()
        path = Path(weights_path) if weights_path else weights_dir() / DIGITS_FILE
        if not path.is_file():
            if weights_path:
                raise FileNotFoundError(f"the digits classifier weights are not at {path}: run `lightning-diffusion "
                                        f"features train-digits --out {path}` to make them, or leave weights_path "
                                        "unset to train them on first use")
            import fcntl

            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.parent / ".digits.lock", "w") as lock:  # DDP ranks: one trains, the others wait
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.is_file():
                    train_digits_classifier(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net = DigitsCNN()
        self.net.load_state_dict(state["state_dict"])
        self.val_accuracy = float(state.get("val_accuracy", float("nan")))
        self.freeze()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(to_digit_input(x))


EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    InceptionV3Features.name: InceptionV3Features,
    DigitsFeatures.name: DigitsFeatures,
}


def get_extractor(name: str, weights_path: str | None = None) -> FeatureExtractor:
    """The feature extractor called ``name`` (:data:`EXTRACTORS`), loaded from ``weights_path``."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {sorted(EXTRACTORS)} "
                         "(2-D point data needs none: it gets energy distance and MMD)")
    return EXTRACTORS[name](weights_path)
