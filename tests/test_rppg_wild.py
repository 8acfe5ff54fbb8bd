"""The "in the wild" nuisances of the synthetic videos (``Domain.wild``: head motion, talking,
shading, coloured light), the estimated skin mask the classical methods use without the true one,
and ``evaluate_classic``'s ROI choice."""
import dataclasses

import numpy as np
import pytest

from methods.rppg.data import make_set
from methods.rppg.evaluation import evaluate_classic
from methods.rppg.synth import DOMAINS, Domain, skin_mask, skin_mask_estimate, skin_signal_estimated, synth_video

QUIET = Domain(name="quiet", illumination_drift=0.0, flicker=0.0, motion_px=0.0, specular=0.0, noise_std=0.0,
               delay_range=(0.0, 0.0))


def test_only_the_wild_domain_uses_the_new_nuisances():
    assert [n for n, d in DOMAINS.items() if d.wild] == ["wild"]
    assert not Domain().wild


def test_coloured_light_reaches_the_background_at_its_share():
    """Everything else off and no noise: the frame with coloured light over the one without is
    1 + c(t) on the face and 1 + 0.3 c(t) on the background, per channel (exact but for 8-bit
    rounding: |error| <= 0.5 / value on each frame, values here >= 30 levels)."""
    lit = dataclasses.replace(QUIET, colour_light=0.3)
    a, b = synth_video(60, 24, domain=lit, seed=4), synth_video(60, 24, domain=QUIET, seed=4)
    ratio = a["video"].astype(np.float64) / b["video"]
    face, background = skin_mask(24), ~skin_mask(24)
    inner = face.copy()  # away from the mask's edge, where the warp's interpolation mixes the two
    inner[:, :] = False
    inner[8:16, 8:16] = True
    r_face = np.median(ratio[:, inner], axis=1) - 1  # (T, 3)
    r_bg = np.median(ratio[:, background], axis=1) - 1
    assert np.abs(r_face).max() > 0.1  # the light did change
    tol = 2 * 0.5 / 30
    np.testing.assert_allclose(r_bg, 0.3 * r_face, atol=tol)
    assert not np.allclose(r_face[:, 0], r_face[:, 1], atol=tol)  # coloured, not white


def test_head_motion_moves_and_turns_the_face():
    moving = dataclasses.replace(QUIET, rotation_deg=10.0, scale=0.05, motion_px=2.0, jitter_px=0.5)
    v = synth_video(150, 32, domain=moving, seed=2)["video"]
    still = synth_video(150, 32, domain=QUIET, seed=2)["video"]
    centroids = np.array([np.argwhere(skin_mask_estimate(f)).mean(0) for f in v])
    assert np.ptp(centroids, axis=0).max() > 1.0  # pixels
    assert np.ptp([np.argwhere(skin_mask_estimate(f)).mean(0) for f in still], axis=0).max() < 1e-9
    # the pulse still modulates the face: same frame count, values in range
    assert v.shape == still.shape and v.min() >= 0 and v.max() <= 1


def test_talking_moves_only_the_lower_face():
    talking = dataclasses.replace(QUIET, talk_px=2.0)
    a = synth_video(120, 32, domain=talking, seed=6)["video"].astype(np.float64)
    b = synth_video(120, 32, domain=QUIET, seed=6)["video"].astype(np.float64)
    d = np.abs(a - b).max(axis=(0, 3))  # (H, W)
    assert d[20:, 10:22].max() > 5 / 255  # mouth and jaw move
    assert d[:12].max() < 1e-9  # the forehead does not


def test_estimated_skin_mask_finds_the_face():
    f = synth_video(60, 40, domain=QUIET, seed=1, hr=120.0)
    est, true = skin_mask_estimate(f["video"][0]), f["mask"]
    iou = (est & true).sum() / (est | true).sum()
    assert iou > 0.9
    assert not est[0, 0] and not est[-1, -1]  # the grey background is not skin
    sig = skin_signal_estimated(f["video"])
    np.testing.assert_allclose(sig[0], f["video"][0][est].mean(0))
    # a frame without skin keeps the last mask; the first such frame uses the whole frame
    grey = np.full((3, 8, 8, 3), 0.4)
    np.testing.assert_allclose(skin_signal_estimated(grey), np.full((3, 3), 0.4))


def test_evaluate_classic_roi():
    vs = make_set(2, 90, 24, "wild", seed=3)
    for roi in ("true", "estimated"):
        r = evaluate_classic(vs, 30.0, "pos", roi=roi)
        assert r["n"] == 2 and np.isfinite(r["MAE_fft"])
    with pytest.raises(ValueError, match="roi must be"):
        evaluate_classic(vs, 30.0, "pos", roi="box")
