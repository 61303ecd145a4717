"""Per-attribute conditioning and held-out pairs (issue 23, item 3's data side): the coloured digits'
joint label ``digit * 8 + colour`` as two labels, each dropped on its own; (digit, colour) pairs held
out of the training split; ``configs/ebm_diffusion_colour_digits.yaml`` through the CLI."""

import numpy as np
import pytest
import torch

from lightning_diffusion import DDPM, EnergyHead, ScoreSDE
from lightning_diffusion.data.shards import load_index, write_shards
from lightning_diffusion.data.sources import colour_digits
from lightning_diffusion.encodings import HELD_OUT_PRESETS, attribute_labels, split_colour_digit_label
from lightning_diffusion.models.gaussian_diffusion import GaussianDiffusionModel
from lightning_diffusion.nets.embedding import ClassEmbedding
from lightning_diffusion.resume import ResumeConflictError, check_resume
from conftest import run_cli
from tiny import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

DIAGONALS = [d * 8 + c for d, c in HELD_OUT_PRESETS["diagonals16"]]


def _model(label_dropout: float = 0.3, energy: bool = False, **overrides) -> DDPM:
    net = tiny_unet(in_channels=3, num_classes=[10, 8])
    return DDPM(EnergyHead(net) if energy else net, timesteps=20, parameterization="energy" if energy else "eps",
                class_conditional=True, label_dropout=label_dropout, data_shape=(3, 8, 8), num_classes=80,
                **{"label_attributes": [10, 8], **overrides})


def test_joint_labels_become_digit_and_colour_in_mixed_radix():
    """``attribute_labels`` is :func:`split_colour_digit_label` column-wise for every joint label 0..79,
    -1 (null) becomes [-1, -1], [B, 2] labels pass unchanged, and out-of-range labels are refused."""
    joint = torch.arange(80)
    digit, colour = split_colour_digit_label(joint)
    assert torch.equal(attribute_labels(joint, [10, 8]), torch.stack([digit, colour], 1))
    assert attribute_labels(torch.tensor([-1, 27]), [10, 8]).tolist() == [[-1, -1], [3, 3]]
    given = torch.tensor([[3, -1], [-1, 7]])
    assert torch.equal(attribute_labels(given, [10, 8]), given)
    for bad in (torch.tensor([80]), torch.tensor([[10, 0]]), torch.tensor([[0, 8]]), torch.tensor([[0, 1, 2]])):
        with pytest.raises(ValueError, match="label"):
            attribute_labels(bad, [10, 8])


def test_embedding_per_attribute_sums_one_table_per_attribute_and_single_label_is_unchanged():
    """A list of class counts: the embedding of [d, c] is table_0[d] + table_1[c], a dropped column
    (-1) takes that attribute's own null row (index n_i) and leaves the other's; y=None is both nulls.
    An int keeps the single table ``table`` (state-dict key ``table.weight``, 81 rows for 80 classes),
    so existing checkpoints load."""
    emb = ClassEmbedding([10, 8], 4)
    t0, t1 = emb.tables[0].weight, emb.tables[1].weight
    out = emb(torch.tensor([[3, 5], [3, -1], [-1, 5], [-1, -1]]), 4)
    torch.testing.assert_close(out, torch.stack([t0[3] + t1[5], t0[3] + t1[8], t0[10] + t1[5], t0[10] + t1[8]]))
    torch.testing.assert_close(emb(None, 2), (t0[10] + t1[8]).expand(2, 4))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        emb(torch.tensor([3, 5]), 2)
    single = ClassEmbedding(80, 4)
    assert list(single.state_dict()) == ["table.weight"] and single.table.weight.shape == (81, 4)
    assert list(tiny_unet(num_classes=80).state_dict()).count("class_embed.table.weight") == 1


def test_training_drops_each_attribute_independently():
    """With ``label_dropout`` p = 0.3 each column of [digit, colour] is dropped with probability p on its
    own: over 20000 labels, each column's drop rate is 0.3 and both are dropped at 0.09 = p^2 (within 4
    standard errors); the kept entries are the joint label's digit and colour."""
    model = _model(0.3).train()
    y = torch.arange(20000) % 80
    labels = model.training_labels({"y": y}, torch.Generator().manual_seed(0))
    assert labels.shape == (20000, 2)
    dropped = labels == -1
    for rate, expected in ((dropped[:, 0].float().mean(), 0.3), (dropped[:, 1].float().mean(), 0.3),
                           (dropped.all(1).float().mean(), 0.09)):
        assert abs(float(rate) - expected) < 4 * (expected * (1 - expected) / 20000) ** 0.5, (rate, expected)
    digit, colour = split_colour_digit_label(y)
    assert torch.equal(labels[:, 0][~dropped[:, 0]], digit[~dropped[:, 0]])
    assert torch.equal(labels[:, 1][~dropped[:, 1]], colour[~dropped[:, 1]])
    assert torch.equal(model.eval().training_labels({"y": y[:80]}, None), attribute_labels(y[:80], [10, 8]))


@pytest.mark.parametrize("energy", [False, True])
def test_sample_takes_joint_or_per_attribute_labels_and_guides_with_them(energy):
    """``sample(y=joint)`` draws exactly what ``sample(y=[digit, colour])`` does (same noise), with and
    without guidance; guidance's null is [-1, -1], so w = 0 draws what y all -1 (unconditional) does;
    a dropped column changes the samples (the net sees it)."""
    torch.manual_seed(0)
    model = _model(energy=energy).eval()
    for p in model.net.parameters():  # make the label embedding matter
        p.data.normal_(0, 0.3)
    joint = torch.tensor([3, 27, 40, 79])
    pairs = attribute_labels(joint, [10, 8])

    def draw(y, **o):
        return model.sample(4, y=y, generator=torch.Generator().manual_seed(1), sampler="ddim", steps=4, **o)

    torch.testing.assert_close(draw(joint), draw(pairs), rtol=0, atol=0)
    torch.testing.assert_close(draw(joint, guidance_scale=3.0), draw(pairs, guidance_scale=3.0), rtol=0, atol=0)
    torch.testing.assert_close(draw(pairs, guidance_scale=0.0), draw(torch.full_like(pairs, -1)), rtol=1e-5, atol=1e-5)
    colour_only = pairs.clone()
    colour_only[:, 0] = -1
    assert (draw(colour_only) - draw(pairs)).abs().max() > 1e-3


def test_label_attributes_are_checked():
    """A product other than num_classes, label_attributes without class_conditional, and a net whose
    embedding takes other labels are refused, each naming the option to change."""
    with pytest.raises(ValueError, match=r"label_attributes=\[10, 7\] has 70 joint classes.*num_classes=80"):
        _model(label_attributes=[10, 7])
    with pytest.raises(ValueError, match="class_conditional is false"):
        DDPM(tiny_unet(in_channels=3, num_classes=[10, 8]), timesteps=20, label_attributes=[10, 8],
             data_shape=(3, 8, 8), num_classes=80)
    joint_net = DDPM(tiny_unet(in_channels=3, num_classes=80), timesteps=20, class_conditional=True,
                     label_attributes=[10, 8], data_shape=(3, 8, 8), num_classes=80)
    with pytest.raises(ValueError, match=r"give the net num_classes: \[10, 8\]"):
        joint_net.check_net(joint_net.net)
    no_attributes = DDPM(tiny_unet(in_channels=3, num_classes=[10, 8]), timesteps=20, class_conditional=True,
                         data_shape=(3, 8, 8), num_classes=80)
    with pytest.raises(ValueError, match="give the net num_classes: 80"):
        no_attributes.check_net(no_attributes.net)


@pytest.mark.parametrize("family", [DDPM, ScoreSDE])
def test_a_resume_refuses_a_change_of_label_attributes(family):
    """``label_attributes`` is fixed on resume (the embedding's tables mean something else)."""
    assert "label_attributes" in family.resume_fixed_hparams
    model = _model()
    with pytest.raises(ResumeConflictError, match="label_attributes"):
        check_resume(model, {"label_attributes": [10, 8]}, {"hyper_parameters": {"label_attributes": [8, 10]}}, "x.ckpt")


def test_held_out_pairs_leave_the_train_split_and_are_recorded(tmp_path):
    """``colour_digits(held_out="diagonals16")``: no train sample has one of the 16 pairs, val and test
    keep them (and the other 64), every digit and every colour is still in train; the index records the
    preset, the pairs and the excluded labels; without held_out the index has none of these keys."""
    import tarfile

    index = write_shards(colour_digits(8, colours_per_image=1, held_out="diagonals16"), tmp_path / "h", shard_size=4096)
    assert index["params"]["held_out"] == "diagonals16"
    assert index["extra"]["held_out_pairs"] == [list(p) for p in HELD_OUT_PRESETS["diagonals16"]]
    assert index["split"]["train_excluded_labels"] == sorted(DIAGONALS)
    labels = {}
    for split, info in index["splits"].items():
        with_labels = []
        for shard in info["shards"]:
            with tarfile.open(tmp_path / "h" / shard["name"]) as tar:
                with_labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
        labels[split] = np.asarray(with_labels)
    assert not np.isin(labels["train"], DIAGONALS).any()
    assert np.isin(labels["val"], DIAGONALS).any() and np.isin(labels["test"], DIAGONALS).any()
    assert set(labels["train"] // 8) == set(range(10)) and set(labels["train"] % 8) == set(range(8))
    plain = write_shards(colour_digits(8, colours_per_image=1), tmp_path / "p", shard_size=4096)
    assert "train_excluded_labels" not in plain["split"] and "held_out" not in plain["params"]
    assert plain["splits"]["val"]["count"] == index["splits"]["val"]["count"]  # the same split, train shrunk
    assert index["splits"]["train"]["count"] < plain["splits"]["train"]["count"]
    assert load_index(tmp_path / "h")[0]["split"] == index["split"]


@pytest.mark.parametrize("held_out, message", [
    ("corners", "not a preset"),
    ([[10, 0]], r"pair \[10, 0\] is not a \[digit, colour\]"),
    ([[3, c] for c in range(8)], r"leaves digits \[3\]"),
    ([[d, 2] for d in range(10)], r"colours \['yellow'\] unseen"),
])
def test_bad_held_out_pairs_are_refused(held_out, message):
    with pytest.raises(ValueError, match=message):
        colour_digits(8, colours_per_image=1, held_out=held_out)


def test_ebm_diffusion_colour_digits_config_trains_and_grids_the_held_out_pairs(tmp_path, monkeypatch):
    """``fit --config configs/ebm_diffusion_colour_digits.yaml --trainer.max_steps=3``: trains the energy
    DDPM on the held-out dataset and ends with one grid sampled with the 16 held-out pairs, twice,
    as [digit, colour] labels."""
    drawn = []
    original = GaussianDiffusionModel.draw_samples

    def recording(self, *args, y=None, **kwargs):
        drawn.append(None if y is None else self.condition_labels(y).cpu())
        return original(self, *args, y=y, **kwargs)

    monkeypatch.setattr(GaussianDiffusionModel, "draw_samples", recording)
    run_cli("fit", "--config", "configs/ebm_diffusion_colour_digits.yaml", "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.version=v")
    run = tmp_path / "ebm_diffusion_colour_digits" / "v"
    assert (run / "samples" / "final.png").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    pairs = torch.tensor(HELD_OUT_PRESETS["diagonals16"])
    assert torch.equal(drawn[-1], torch.cat([pairs, pairs]))


def test_the_net_gets_label_attributes_from_the_link_and_a_wrong_factorisation_is_refused(tmp_path):
    """The data's ``num_classes`` (80 joint colour-digit labels) reaches the UNet inside EnergyHead as
    the model's ``label_attributes`` [10, 8]; attributes whose product is not 80 are refused before
    training, naming both options."""
    import yaml

    common = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    run_cli("fit", "--config", "configs/ebm_diffusion_colour_digits.yaml", *common, "--trainer.logger.init_args.version=a")
    hparams = yaml.unsafe_load((tmp_path / "ebm_diffusion_colour_digits" / "a" / "hparams.yaml").read_text())
    assert hparams["net"]["init_args"]["net"]["init_args"]["num_classes"] == [10, 8]
    result = run_cli("fit", "--config", "configs/ebm_diffusion_colour_digits.yaml", *common,
                     "--trainer.logger.init_args.version=b", "--model.init_args.label_attributes=[10, 7]", check=False)
    assert result.returncode != 0
    assert "label_attributes=[10, 7]" in result.stderr and "data.num_classes=80" in result.stderr, result.stderr
    assert not (tmp_path / "ebm_diffusion_colour_digits" / "b" / "checkpoints").exists()
