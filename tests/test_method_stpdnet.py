"""methods.stpdnet (simulation and MLEM so far): kinetics, seeded studies, the data model, MLEM."""
import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("skimage")

from methods.stpdnet.kinetics import (DEFAULT_FRAMES_S, REGIONS, feng_input, frame_edges, region_tacs,  # noqa: E402
                                      tissue_curve)
from methods.stpdnet.recon import forward_model, mlem, poisson_loglik  # noqa: E402
from methods.stpdnet.simulate import LABELS, Scanner, shepp_logan_labels, simulate_study  # noqa: E402

SCANNER = Scanner(n=32, views=24)
A = SCANNER.projector()


def test_feng_input_shape():
    t = np.linspace(0, 60, 3601)
    cp = feng_input(t)
    assert cp[0] == pytest.approx(0.0, abs=1e-9)
    assert 0.15 < t[cp.argmax()] < 0.5 and 80 < cp.max() < 130  # bolus peak of ~100 kBq/ml at ~17 s
    assert cp[-1] < cp.max() / 5 and (cp[t > 5] > 0).all()


def test_two_tissue_model_matches_direct_convolution():
    t = np.arange(0, 30, 1 / 600)
    cp = feng_input(t)
    k = REGIONS["grey"]
    s = k.k2 + k.k3 + k.k4
    d = np.sqrt(s * s - 4 * k.k2 * k.k4)
    a1, a2 = (s - d) / 2, (s + d) / 2
    h = k.K1 / (a2 - a1) * ((k.k3 + k.k4 - a1) * np.exp(-a1 * t) + (a2 - k.k3 - k.k4) * np.exp(-a2 * t))
    direct = (1 - k.vB) * np.convolve(cp, h)[: len(t)] / 600 + k.vB * cp
    assert np.abs(tissue_curve(k, t, cp) - direct).max() < 1e-3 * direct.max()


def test_region_curves_are_plausible():
    tac = region_tacs(frame_edges(DEFAULT_FRAMES_S), REGIONS)
    assert len(tac["grey"]) == 24
    assert (np.diff(tac["grey"][8:]) > 0).all()  # FDG keeps accumulating (k3 >> k4)
    assert tac["lesion"][-1] > tac["grey"][-1] > tac["white"][-1] > 0
    np.testing.assert_allclose(tac["blood"], tac["plasma"])


def test_study_is_reproducible_and_seeded():
    a = simulate_study(3, SCANNER, projector=A)
    b = simulate_study(3, SCANNER, projector=A)
    c = simulate_study(4, SCANNER, projector=A)
    assert torch.equal(a.sinograms, b.sinograms) and torch.equal(a.frames, b.frames)
    assert not torch.equal(a.labels, c.labels)
    assert a.sinograms.shape == (24, 24, SCANNER.bins) and a.frames.shape == (24, 32, 32)
    assert set(a.labels.unique().tolist()) == {0, 1, 2, 3, 4}


def test_noiseless_sinogram_is_the_projection_of_the_truth():
    st = simulate_study(0, SCANNER, projector=A, counts=1e7)
    model = forward_model(A, st.frames, st.attenuation, st.background, st.scale)
    torch.testing.assert_close(st.expected, model, rtol=1e-5, atol=1e-6)
    assert st.expected.sum().item() == pytest.approx(1e7, rel=1e-4)
    bg_share = st.background.sum() / st.expected.sum()
    assert float(bg_share) == pytest.approx(0.2, rel=1e-4)
    # noise: Poisson around the means
    assert float(st.sinograms.sum()) == pytest.approx(1e7, rel=0.01)
    assert torch.equal(st.sinograms, st.sinograms.round())


def test_shepp_logan_phantom():
    lab = shepp_logan_labels(64)
    counts = np.bincount(lab.ravel(), minlength=5)
    assert (counts[1:] > 0).all()
    st = simulate_study(0, Scanner(n=64, views=16), phantom="shepp_logan")
    assert st.mask("blood").sum() == counts[LABELS["blood"]]


def test_mlem_increases_the_likelihood_and_approaches_the_truth():
    st = simulate_study(1, SCANNER, projector=A, counts="high")
    ll = []
    x = mlem(st.sinograms, A, st.attenuation, st.background, st.scale, 25,
             callback=lambda i, x: ll.append(poisson_loglik(st.sinograms, forward_model(A, x, st.attenuation,
                                                                                         st.background, st.scale))))
    ll = torch.stack(ll)  # (iterations, T)
    assert (ll[1:] >= ll[:-1] - 1e-3 * ll[:-1].abs()).all()
    assert (x >= 0).all()
    late = slice(12, 24)
    err = ((x[late] - st.frames[late]).norm() / st.frames[late].norm()).item()
    assert err < 0.5


@pytest.mark.parametrize("kw,msg", [
    (dict(counts=0), "counts"), (dict(counts=-5.0), "counts"), (dict(counts="medium"), "counts"),
    (dict(frames_s=[60, 0, 60]), "frame durations"), (dict(frames_s=[60, float("nan")]), "frame durations"),
    (dict(phantom="zubal"), "phantom"), (dict(background_fraction=1.0), "background_fraction"),
])
def test_bad_simulation_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        simulate_study(0, SCANNER, projector=A, **kw)


def test_bad_reconstruction_input():
    st = simulate_study(0, SCANNER, projector=A)
    y = st.sinograms.clone()
    y[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mlem(y, A, st.attenuation, st.background, st.scale, 1)
    other = Scanner(n=32, views=20).projector()
    with pytest.raises(ValueError, match="mismatch"):
        mlem(st.sinograms[:, :20], other, st.attenuation, st.background, st.scale, 1)
    with pytest.raises(ValueError, match="lines"):
        mlem(st.sinograms, other, st.attenuation, st.background, st.scale, 1)
    with pytest.raises(ValueError, match=">= 0"):
        mlem(-st.sinograms, A, st.attenuation, st.background, st.scale, 1)
