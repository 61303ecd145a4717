"""The parameterization table (issue 22): one denoiser and one loss for every Gaussian family.

The numbers of the families do not change with the table: the losses, denoised values and DDPM
bounds of every family x parameterization x loss option on a fixed batch and seed
(:mod:`tests.gaussian_pins`) equal those of the code before the table (commit 5e1f749, the PINS
below), and checkpoints written by that code load and give the same loss.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_diffusion import MLP, DDPM, ScoreSDE
from lightning_diffusion.diffusion import parameterization as param
from lightning_diffusion.diffusion import samplers
from lightning_diffusion.diffusion.sde import VESDE, VPSDE
from gaussian_pins import build, ddpm_cases, measure, sde_cases

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"

#: ((loss seed 7, loss seed 8), denoised[:6], DDPM bound of 2 samples at 10 steps) of each case,
#: printed by ``python tests/gaussian_pins.py`` at commit 5e1f749 (before the table)
PINS = {
    "ddpm-eps-simple-snrNone-points": ((1.37733996, 0.979092002),
                                       (0.390686244, -0.079054594, 3.89455652, -2.56893826, 43.6726913, 114.436073),
                                       (23.0436783, 11.0201454)),
    "ddpm-eps-simple-snrNone-images": ((1.29052949, 1.26012874),
                                       (-1.13598585, 1.31533551, -0.752507746, -1.30498242, 1.63855672, -0.29695797),
                                       (8.51694775, 10.0825253)),
    "ddpm-eps-simple-snr5.0-points": ((1.2310245, 0.909379363),
                                      (0.390686244, -0.079054594, 3.89455652, -2.56893826, 43.6726913, 114.436073),
                                      (23.0436783, 11.0201454)),
    "ddpm-eps-simple-snr5.0-images": ((1.19112718, 1.19380569),
                                      (-1.13598585, 1.31533551, -0.752507746, -1.30498242, 1.63855672, -0.29695797),
                                      (8.51694775, 10.0825253)),
    "ddpm-eps-hybrid-snrNone-points": ((1.27523482, 0.756846011),
                                       (0.131894708, -0.534281969, 2.60915685, -4.83002043, 23.5631046, 79.0623016),
                                       (17.979332, 20.8306656)),
    "ddpm-eps-hybrid-snrNone-images": ((1.30284703, 1.30820465),
                                       (-0.977772415, 1.47354901, -0.59429431, -1.14676905, 1.7967701, -0.138744533),
                                       (10.0239639, 21.5208893)),
    "ddpm-eps-hybrid-snr5.0-points": ((1.15405917, 0.708131492),
                                      (0.131894708, -0.534281969, 2.60915685, -4.83002043, 23.5631046, 79.0623016),
                                      (17.979332, 20.8306656)),
    "ddpm-eps-hybrid-snr5.0-images": ((1.21288717, 1.23128617),
                                      (-0.977772415, 1.47354901, -0.59429431, -1.14676905, 1.7967701, -0.138744533),
                                      (10.0239639, 21.5208893)),
    "ddpm-x0-simple-snrNone-points": ((0.579086065, 0.608083487),
                                      (-0.459103525, -0.574457407, -0.467994511, -0.475585938, -0.399969876, -0.520878911),
                                      (435.117554, 2003.1488)),
    "ddpm-x0-simple-snrNone-images": ((0.63001132, 0.563162327),
                                      (0.105838627, -0.220431268, -0.294576406, 0.302802056, -0.552022338, 0.123878032),
                                      (3891.90063, 4130.07617)),
    "ddpm-x0-simple-snr5.0-points": ((0.457376093, 0.758701026),
                                     (-0.459103525, -0.574457407, -0.467994511, -0.475585938, -0.399969876, -0.520878911),
                                     (435.117554, 2003.1488)),
    "ddpm-x0-simple-snr5.0-images": ((0.466261834, 0.891638041),
                                     (0.105838627, -0.220431268, -0.294576406, 0.302802056, -0.552022338, 0.123878032),
                                     (3891.90063, 4130.07617)),
    "ddpm-x0-hybrid-snrNone-points": ((3.91420102, 0.54732877),
                                      (-0.250112593, -0.206831753, -0.25900352, -0.107960314, -0.190978885, -0.153253287),
                                      (368.543488, 2801.15869)),
    "ddpm-x0-hybrid-snrNone-images": ((3.0894928, 0.609705925),
                                      (-0.0219289958, -0.348198861, -0.422344029, 0.175034463, -0.67978996, -0.0038895905),
                                      (5267.43164, 6145.8418)),
    "ddpm-x0-hybrid-snr5.0-points": ((3.84463835, 0.585997164),
                                     (-0.250112593, -0.206831753, -0.25900352, -0.107960314, -0.190978885, -0.153253287),
                                     (368.543488, 2801.15869)),
    "ddpm-x0-hybrid-snr5.0-images": ((3.02313805, 1.14877665),
                                     (-0.0219289958, -0.348198861, -0.422344029, 0.175034463, -0.67978996, -0.0038895905),
                                     (5267.43164, 6145.8418)),
    "ddpm-v-simple-snrNone-points": ((1.05080414, 1.1193471),
                                     (0.286987573, 0.134925723, 0.488099039, 0.327927649, 0.400508404, 0.527796566),
                                     (1.11888778, 2.003546)),
    "ddpm-v-simple-snrNone-images": ((0.733963668, 0.830254257),
                                     (-0.479018271, 0.582953155, -0.211848527, -0.602687836, 0.806433916, -0.153043956),
                                     (7.96136093, 9.62477589)),
    "ddpm-v-simple-snr5.0-points": ((0.247576356, 0.260287434),
                                    (0.286987573, 0.134925723, 0.488099039, 0.327927649, 0.400508404, 0.527796566),
                                    (1.11888778, 2.003546)),
    "ddpm-v-simple-snr5.0-images": ((0.178459674, 0.307962745),
                                    (-0.479018271, 0.582953155, -0.211848527, -0.602687836, 0.806433916, -0.153043956),
                                    (7.96136093, 9.62477589)),
    "ddpm-v-hybrid-snrNone-points": ((0.854827166, 0.804912925),
                                     (0.124394774, -0.151083231, 0.281816781, -0.0349331573, 0.191528708, 0.160190791),
                                     (-0.581726015, 6.55289412)),
    "ddpm-v-hybrid-snrNone-images": ((0.738688171, 0.879311085),
                                     (-0.37961641, 0.682355046, -0.112446636, -0.503285944, 0.905835807, -0.0536420681),
                                     (8.91967201, 20.468914)),
    "ddpm-v-hybrid-snr5.0-points": ((0.241352499, 0.210824534),
                                    (0.124394774, -0.151083231, 0.281816781, -0.0349331573, 0.191528708, 0.160190791),
                                    (-0.581726015, 6.55289412)),
    "ddpm-v-hybrid-snr5.0-images": ((0.207442001, 0.357304841),
                                    (-0.37961641, 0.682355046, -0.112446636, -0.503285944, 0.905835807, -0.0536420681),
                                    (8.91967201, 20.468914)),
    "ddpm-v-simple-cosine-points": ((1.15658522, 1.19419646),
                                    (0.113327257, -0.174529433, 0.475255698, -0.127968818, 0.402950197, 0.571277797),
                                    (1.41559255, 1.95350218)),
    "ddpm-eps-simple-cond-points": ((1.22876203, 0.802712262),
                                    (-0.855865002, -0.669012189, -2.04629159, -4.85664845, -35.2048073, 88.1471405),
                                    (7.97603941, 12.4555073)),
    "sde-vp-eps-sigma2-isFalse-points": ((1.39067829, 1.66074467),
                                         (0.388928413, -0.0798660293, 3.86343098, -2.54824114, 42.4299011, 111.343391)),
    "sde-vp-eps-sigma2-isFalse-images": ((1.15556264, 1.37655926),
                                         (-1.13341022, 1.31242514, -0.75136131, -1.30174351, 1.63445139, -0.296048045)),
    "sde-vp-eps-likelihood-isFalse-points": ((27.9694729, 26.1205368),
                                             (0.388928413, -0.0798660293, 3.86343098, -2.54824114, 42.4299011, 111.343391)),
    "sde-vp-eps-likelihood-isFalse-images": ((20.3150349, 24.0067902),
                                             (-1.13341022, 1.31242514, -0.75136131, -1.30174351, 1.63445139, -0.296048045)),
    "sde-vp-eps-likelihood-isTrue-points": ((33.0058823, 41.2160492),
                                            (0.388928413, -0.0798660293, 3.86343098, -2.54824114, 42.4299011, 111.343391)),
    "sde-vp-eps-likelihood-isTrue-images": ((24.92733, 29.0297661),
                                            (-1.13341022, 1.31242514, -0.75136131, -1.30174351, 1.63445139, -0.296048045)),
    "sde-vp-score-sigma2-isFalse-points": ((1.15691745, 1.00765991),
                                           (-0.617518127, -1.33961892, -1.81081438, -8.30775738, -32.353653, 13.5804367)),
    "sde-vp-score-sigma2-isFalse-images": ((0.870792806, 0.807138681),
                                           (-0.901492417, 0.828818798, -1.39757133, -0.637876272, 0.423651159, -0.0245690811)),
    "sde-vp-score-likelihood-isFalse-points": ((27.6805878, 17.0708828),
                                               (-0.617518127, -1.33961892, -1.81081438, -8.30775738, -32.353653, 13.5804367)),
    "sde-vp-score-likelihood-isFalse-images": ((16.0706291, 14.6179838),
                                               (-0.901492417, 0.828818798, -1.39757133, -0.637876272, 0.423651159, -0.0245690811)),
    "sde-vp-score-likelihood-isTrue-points": ((27.4264202, 25.1563377),
                                              (-0.617518127, -1.33961892, -1.81081438, -8.30775738, -32.353653, 13.5804367)),
    "sde-vp-score-likelihood-isTrue-images": ((20.7663975, 20.4536095),
                                              (-0.901492417, 0.828818798, -1.39757133, -0.637876272, 0.423651159, -0.0245690811)),
    "sde-vp-edm-sigma2-isFalse-points": ((2.5985508, 1.81627202),
                                         (-0.231012478, -0.380178154, -0.226350084, -0.273400515, -0.19992727, -0.259763986)),
    "sde-vp-edm-sigma2-isFalse-images": ((1.63813424, 1.58591259),
                                         (-0.0655034781, 0.0422072113, -0.302661598, 0.0539170653, -0.153391972, 0.0656699091)),
    "sde-vp-edm-likelihood-isFalse-points": ((2.5985508, 1.81627202),
                                             (-0.231012478, -0.380178154, -0.226350084, -0.273400515, -0.19992727, -0.259763986)),
    "sde-vp-edm-likelihood-isFalse-images": ((1.63813424, 1.58591259),
                                             (-0.0655034781, 0.0422072113, -0.302661598, 0.0539170653, -0.153391972, 0.0656699091)),
    "sde-vp-edm-likelihood-isTrue-points": ((1.86596954, 2.32878971),
                                            (-0.231012478, -0.380178154, -0.226350084, -0.273400515, -0.19992727, -0.259763986)),
    "sde-vp-edm-likelihood-isTrue-images": ((1.43196583, 1.85336959),
                                            (-0.0655034781, 0.0422072113, -0.302661598, 0.0539170653, -0.153391972, 0.0656699091)),
    "sde-subvp-eps-sigma2-isFalse-points": ((1.38953173, 1.69920528),
                                            (0.262602001, -0.237986773, 3.82577038, -2.58646822, 42.4277611, 111.340607)),
    "sde-subvp-eps-sigma2-isFalse-images": ((1.11081886, 1.33532214),
                                            (-1.10430062, 1.25172424, -0.832471848, -1.21841657, 1.48247504, -0.261972755)),
    "sde-subvp-eps-likelihood-isFalse-points": ((44.281723, 38.6304092),
                                                (0.262602001, -0.237986773, 3.82577038, -2.58646822, 42.4277611, 111.340607)),
    "sde-subvp-eps-likelihood-isFalse-images": ((27.9075356, 33.3103294),
                                                (-1.10430062, 1.25172424, -0.832471848, -1.21841657, 1.48247504, -0.261972755)),
    "sde-subvp-eps-likelihood-isTrue-points": ((52.1308479, 64.9126968),
                                               (0.262602001, -0.237986773, 3.82577038, -2.58646822, 42.4277611, 111.340607)),
    "sde-subvp-eps-likelihood-isTrue-images": ((38.201046, 41.2307892),
                                               (-1.10430062, 1.25172424, -0.832471848, -1.21841657, 1.48247504, -0.261972755)),
    "sde-subvp-score-sigma2-isFalse-points": ((1.13831878, 1.03256428),
                                              (-0.443108231, -1.12131286, -1.73697591, -8.23281002, -32.3493729, 13.5860348)),
    "sde-subvp-score-sigma2-isFalse-images": ((0.876682639, 0.819183171),
                                              (-0.94168216, 0.9126243, -1.28558779, -0.752919614, 0.633474112, -0.0716144219)),
    "sde-subvp-score-likelihood-isFalse-points": ((45.8831558, 26.1841888),
                                                  (-0.443108231, -1.12131286, -1.73697591, -8.23281002, -32.3493729, 13.5860348)),
    "sde-subvp-score-likelihood-isFalse-images": ((24.4695835, 21.8060608),
                                                  (-0.94168216, 0.9126243, -1.28558779, -0.752919614, 0.633474112, -0.0716144219)),
    "sde-subvp-score-likelihood-isTrue-points": ((41.0069733, 37.6420403),
                                                 (-0.443108231, -1.12131286, -1.73697591, -8.23281002, -32.3493729, 13.5860348)),
    "sde-subvp-score-likelihood-isTrue-images": ((31.9133759, 32.5913239),
                                                 (-0.94168216, 0.9126243, -1.28558779, -0.752919614, 0.633474112, -0.0716144219)),
    "sde-subvp-edm-sigma2-isFalse-points": ((2.34653473, 1.79198599),
                                            (-0.227431744, -0.430115312, -0.225667819, -0.274436146, -0.199923679, -0.259763002)),
    "sde-subvp-edm-sigma2-isFalse-images": ((1.63224852, 1.53450036),
                                            (-0.104972996, 0.11932981, -0.389696062, 0.039270848, -0.115248024, 0.0905385464)),
    "sde-subvp-edm-likelihood-isFalse-points": ((2.34653473, 1.79198599),
                                                (-0.227431744, -0.430115312, -0.225667819, -0.274436146, -0.199923679, -0.259763002)),
    "sde-subvp-edm-likelihood-isFalse-images": ((1.63224852, 1.53450036),
                                                (-0.104972996, 0.11932981, -0.389696062, 0.039270848, -0.115248024, 0.0905385464)),
    "sde-subvp-edm-likelihood-isTrue-points": ((2.80451155, 1.55790377),
                                               (-0.227431744, -0.430115312, -0.225667819, -0.274436146, -0.199923679, -0.259763002)),
    "sde-subvp-edm-likelihood-isTrue-images": ((1.89533567, 1.4248296),
                                               (-0.104972996, 0.11932981, -0.389696062, 0.039270848, -0.115248024, 0.0905385464)),
    "sde-ve-eps-sigma2-isFalse-points": ((1.26873279, 1.67706132),
                                         (-0.0526391491, -0.422641367, 0.939407408, -0.0936875343, 13.123148, 17.7535248)),
    "sde-ve-eps-sigma2-isFalse-images": ((14.6347446, 12.377552),
                                         (-0.644986391, 0.683290184, -0.664027631, -0.623283386, 0.671075225, -0.106132157)),
    "sde-ve-eps-likelihood-isFalse-points": ((21.6120872, 28.5677109),
                                             (-0.0526391491, -0.422641367, 0.939407408, -0.0936875343, 13.123148, 17.7535248)),
    "sde-ve-eps-likelihood-isFalse-images": ((249.2939, 210.844009),
                                             (-0.644986391, 0.683290184, -0.664027631, -0.623283386, 0.671075225, -0.106132157)),
    "sde-ve-eps-likelihood-isTrue-points": ((21.6120872, 28.5677109),
                                            (-0.0526391491, -0.422641367, 0.939407408, -0.0936875343, 13.123148, 17.7535248)),
    "sde-ve-eps-likelihood-isTrue-images": ((249.2939, 210.844009),
                                            (-0.644986391, 0.683290184, -0.664027631, -0.623283386, 0.671075225, -0.106132157)),
    "sde-ve-score-sigma2-isFalse-points": ((5.37187481, 4.71500921),
                                           (-0.119324088, -0.506109834, -1.12349296, -2.18758869, -426.794891, -557.34198)),
    "sde-ve-score-sigma2-isFalse-images": ((5448.12744, 7732.46191),
                                           (-0.629620016, 0.651247442, -0.706844091, -0.579297006, 0.590850234, -0.0881445557)),
    "sde-ve-score-likelihood-isFalse-points": ((91.5065994, 80.3172913),
                                               (-0.119324088, -0.506109834, -1.12349296, -2.18758869, -426.794891, -557.34198)),
    "sde-ve-score-likelihood-isFalse-images": ((92805.5, 131717.734),
                                               (-0.629620016, 0.651247442, -0.706844091, -0.579297006, 0.590850234, -0.0881445557)),
    "sde-ve-score-likelihood-isTrue-points": ((91.5065994, 80.3172913),
                                              (-0.119324088, -0.506109834, -1.12349296, -2.18758869, -426.794891, -557.34198)),
    "sde-ve-score-likelihood-isTrue-images": ((92805.5, 131717.734),
                                              (-0.629620016, 0.651247442, -0.706844091, -0.579297006, 0.590850234, -0.0881445557)),
    "sde-ve-edm-sigma2-isFalse-points": ((2.12434483, 1.6413995),
                                         (-0.155521125, -0.541446745, -0.226581693, -0.305079758, -0.254745334, -0.272088379)),
    "sde-ve-edm-sigma2-isFalse-images": ((1.58158588, 1.38697457),
                                         (-0.543800712, 0.583726466, -0.706685305, -0.452108413, 0.452171266, -0.0319125466)),
    "sde-ve-edm-likelihood-isFalse-points": ((2.12434483, 1.6413995),
                                             (-0.155521125, -0.541446745, -0.226581693, -0.305079758, -0.254745334, -0.272088379)),
    "sde-ve-edm-likelihood-isFalse-images": ((1.58158588, 1.38697457),
                                             (-0.543800712, 0.583726466, -0.706685305, -0.452108413, 0.452171266, -0.0319125466)),
    "sde-ve-edm-likelihood-isTrue-points": ((2.12434483, 1.6413995),
                                            (-0.155521125, -0.541446745, -0.226581693, -0.305079758, -0.254745334, -0.272088379)),
    "sde-ve-edm-likelihood-isTrue-images": ((1.58158588, 1.38697457),
                                            (-0.543800712, 0.583726466, -0.706685305, -0.452108413, 0.452171266, -0.0319125466)),
    "sde-vp-eps-sigma2-cond-points": ((1.22282684, 1.3602767),
                                      (-0.853295863, -0.667682886, -2.02985048, -4.81373882, -33.5459785, 85.2267609)),
}

#: the float32 arithmetic moved: alpha, sigma and the coefficients are float64 until they multiply the
#: data (before: DDPM took sqrt(1 - abar) of a float32 abar, EDM cancelled D - x0 in float32); the
#: largest change measured over the cases is 2.2e-6 relative (the hybrid bound term of x0 at small t)
RTOL = 5e-6

CASES = [("ddpm", name, opts) for name, opts in ddpm_cases()] + [("sde", name, opts) for name, opts in sde_cases()]


@pytest.mark.parametrize("family,name,options", CASES, ids=[name for _, name, _ in CASES])
def test_losses_denoiser_and_bound_equal_those_before_the_table(family, name, options):
    got = measure(family, options)
    pinned = PINS[name]
    assert got["loss"] == pytest.approx(list(pinned[0]), rel=RTOL)
    assert got["denoised"] == pytest.approx(list(pinned[1]), rel=RTOL, abs=1e-6)
    if family == "ddpm":
        assert got["bpd"] == pytest.approx(list(pinned[2]), rel=RTOL)


@pytest.mark.parametrize("path,cls,case", [
    ("ddpm_hybrid_v.ckpt", DDPM, "ddpm-v-hybrid-snrNone-points"),
    ("score_sde_edm.ckpt", ScoreSDE, "sde-vp-edm-sigma2-isFalse-points"),
])
def test_a_checkpoint_written_before_the_table_loads_and_gives_the_same_loss(path, cls, case):
    """tests/data/*.ckpt were saved by the code of commit 5e1f749 (gaussian_pins.build's model of
    ``case``, untrained): their keys and hyperparameters load, and the loss is the pinned one."""
    hybrid = cls is DDPM
    net = MLP(in_channels=2, hidden=16, num_layers=1, time_embed_dim=16, time_scale=1.0 if hybrid else 1000.0,
              out_channels=4 if hybrid else 2)
    model = cls.load_from_checkpoint(DATA / path, net=net, map_location="cpu")
    reference, batch = build("ddpm" if hybrid else "sde", dict(PARAMS[case]))
    assert model.hparams.parameterization == reference.parameterization
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    model.train()
    loss = model.loss(batch, generator=torch.Generator().manual_seed(7)).item()
    assert loss == pytest.approx(PINS[case][0][0], rel=RTOL)


PARAMS = {name: opts for _, name, opts in CASES}


@pytest.mark.parametrize("name", list(param.TABLE))
@pytest.mark.parametrize("process", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_each_row_denoises_its_own_target_to_x0(name, process):
    """``D = c_skip x_t + c_out F*`` is x0 for every row, on a VP and a VE process, in float64."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.98 + 0.01
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    x_t = alpha * x0 + sigma * eps
    target = param.target(name, x0, eps, alpha, sigma)
    assert torch.allclose(param.x0_from_output(name, target, x_t, alpha, sigma), x0, rtol=1e-9, atol=1e-9)
    c = param.scalings(name, alpha, sigma)
    assert torch.allclose(target, (x0 - c.c_skip * x_t) / c.c_out, rtol=1e-6, atol=1e-6)


def test_unknown_parameterization_names_the_table():
    with pytest.raises(ValueError, match="'eps', 'x0', 'v', 'score', 'edm', 'energy'"):
        param.row("logits")


def test_no_module_but_the_table_dispatches_on_a_parameterization():
    """The table is the one place a parameterization is named: no ``== "eps"``-style branch and no
    per-name dict elsewhere in the package (argument defaults aside)."""
    import re

    package = Path(__file__).resolve().parents[1] / "lightning_diffusion"
    pattern = re.compile(r"""parameterization\s*(==|!=|in\b)|["'](x0|score|edm|energy)["']|\{\s*["']eps["']""")
    found = [f"{path.relative_to(package)}:{i}: {line.strip()}"
             for path in package.rglob("*.py") if path.name != "parameterization.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


#: (dtype of the evaluated net's weights, whether the model's ``net`` was the original net) per call;
#: module globals, which the bf16 deep copy of the net shares
CALLS: list[tuple[torch.dtype, bool]] = []
MODEL: dict[str, DDPM] = {}


class Recorder(nn.Module):
    """x0-prediction of 0.5 x that records every call in :data:`CALLS`."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, y=None):
        CALLS.append((self.scale.dtype, MODEL["model"].net is MODEL["net"]))
        return self.scale * x


@pytest.mark.parametrize("precision", ["32", "bf16", "bf16-autocast"])
def test_sampling_passes_the_bf16_net_to_the_denoiser_and_leaves_self_net(precision, monkeypatch):
    """bf16: the bfloat16 copy is evaluated while ``model.net`` stays the original; bf16-autocast (a
    sharded model, where no copy is made): the original net under autocast."""
    recorder = Recorder()
    model = DDPM(recorder, timesteps=20, parameterization="x0", data_shape=(2,))
    MODEL.update(model=model, net=recorder)
    CALLS.clear()
    if precision == "bf16-autocast":
        monkeypatch.setattr(model, "_bf16_copy_of_net", lambda: None)
    x = model.sample(4, sampler="ddim", steps=5, precision=precision.split("-")[0],
                     generator=torch.Generator().manual_seed(0))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert CALLS == [(dtype, True)] * 5 and model.net is recorder and x.dtype == torch.float32
    assert "_trajectory_frames" not in vars(model)


def test_every_sampler_calls_back_once_per_network_evaluation():
    """``callback`` sees each evaluation with x, i, t, sigma (= sigma/alpha) and the denoised estimate."""
    process = VPSDE()
    for name in (n for n, entry in samplers.SAMPLERS.items() if not entry.needs_energy):  # annealed_mcmc: its own test
        steps = {"ode": None, "ancestral": 8, "pc": 8, "euler_maruyama": 8}.get(name, 6)
        seen = []
        out = samplers.sample(name, lambda x, t: 0.5 * x, process, (3, 2), steps=steps,
                              generator=torch.Generator().manual_seed(0), callback=seen.append)
        assert [step["i"] for step in seen] == list(range(out.nfe)), name
        for step in seen:
            assert set(step) == {"x", "i", "t", "sigma", "denoised"} and torch.equal(step["denoised"], 0.5 * step["x"])
            ratio = float(process.ratio(torch.tensor([step["t"]], dtype=torch.float64))[0])
            assert step["sigma"] == pytest.approx(ratio)


def test_sample_trajectory_records_through_the_callback():
    model = DDPM(MLP(hidden=16, num_layers=1), timesteps=10, data_shape=(2,))
    frames = model.sample_trajectory(3, num_frames=4, generator=torch.Generator().manual_seed(0))
    final = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (4, 3, 2) and torch.equal(frames[-1], final)
    assert model.last_sample_nfe == 10 and "_trajectory_frames" not in vars(model)
