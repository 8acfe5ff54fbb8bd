"""The "in the wild" nuisances of the synthetic videos (``Domain.wild``: head motion, talking,
shading, coloured light), the estimated skin mask the classical methods use without the true one,
and ``evaluate_classic``'s ROI choice."""

import dataclasses

import numpy as np
import pytest

from methods.rppg.data import make_set
from methods.rppg.evaluation import evaluate_classic
from methods.rppg.synth import DOMAINS, Domain, skin_mask, skin_mask_estimate, skin_signal_estimated, synth_video

QUIET = Domain(
    name="quiet",
    illumination_drift=0.0,
    flicker=0.0,
    motion_px=0.0,
    specular=0.0,
    noise_std=0.0,
    delay_range=(0.0, 0.0),
)


def test_only_the_wild_domain_uses_the_new_nuisances(monkeypatch):
    assert [n for n, d in DOMAINS.items() if d.wild] == ["wild"]
    assert not Domain().wild
    # the other domains never reach the new code, so their videos are those of before
    import methods.rppg.synth as S

    def boom(*a, **k):
        raise AssertionError("_WildMotion used")

    monkeypatch.setattr(S, "_WildMotion", boom)
    for name, d in DOMAINS.items():
        if name != "wild":
            synth_video(40, 12, domain=d, seed=1, hr=120.0)
    with pytest.raises(AssertionError, match="_WildMotion used"):
        synth_video(40, 12, domain=DOMAINS["wild"], seed=1, hr=120.0)


def test_wild_nuisances_draw_from_their_own_generator():
    """Turning the nuisances on changes the frames, not the pulse, label, heart rate or delay."""
    on = dataclasses.replace(DOMAINS["default"], rotation_deg=5.0, talk_px=1.0, colour_light=0.01)
    a, b = synth_video(90, 16, domain=on, seed=8), synth_video(90, 16, domain=DOMAINS["default"], seed=8)
    for k in ("pulse", "label", "mask"):
        assert np.array_equal(a[k], b[k]), k
    assert a["hr"] == b["hr"] and a["delay"] == b["delay"]
    assert not np.array_equal(a["video"], b["video"])


def test_coloured_light_reaches_the_background_at_its_share():
    """Everything else off and no noise: the frame with coloured light over the one without is
    1 + c(t) on the face and 1 + 0.3 c(t) on the background, per channel (exact but for 8-bit
    rounding: each pixel's ratio is off by at most (0.5 / v_lit + 0.5 / v) ~ 1 / v for a value of
    v levels; the medians over the face centre and the background are taken over pixels of at
    least 40 levels here (asserted), so |error| <= 1 / 40)."""
    lit = dataclasses.replace(QUIET, colour_light=0.3)
    a, b = synth_video(60, 24, domain=lit, seed=4, hr=90.0), synth_video(60, 24, domain=QUIET, seed=4, hr=90.0)
    va, vb = a["video"].astype(np.float64) * 255, b["video"].astype(np.float64) * 255
    face, background = skin_mask(24), ~skin_mask(24)
    box = np.zeros_like(face)
    box[8:16, 8:16] = True
    inner = face & box  # away from the mask's edge, where the warp's interpolation mixes the two
    bright = (vb >= 40).all(axis=(0, 3))  # pixels of >= 40 levels in every frame and channel, unlit
    inner, background = inner & bright, background & bright
    assert inner.sum() >= 16 and background.sum() >= 100
    ratio = va / vb
    r_face = np.median(ratio[:, inner], axis=1) - 1  # (T, 3)
    r_bg = np.median(ratio[:, background], axis=1) - 1
    assert np.abs(r_face).max() > 0.1  # the light did change
    tol = 1 / 40
    np.testing.assert_allclose(r_bg, 0.3 * r_face, atol=tol)
    assert not np.allclose(r_face[:, 0], r_face[:, 1], atol=tol)  # coloured, not white


def test_rotation_turns_the_face_about_the_centre():
    """Rotation only: the face turns about the frame's centre (its centroid moves as the rotation
    says), and the principal axis of the (elongated, upright) skin mask tilts by the angle (the
    masks are pixel sets, so up to a few tenths of a pixel / a few degrees)."""
    turning = dataclasses.replace(QUIET, rotation_deg=20.0)
    v = synth_video(120, 48, domain=turning, seed=3, hr=90.0)["video"]
    import methods.rppg.synth as S

    wm = S._WildMotion(turning, 120, 48, 30.0, np.zeros((120, 2)), 3)
    k = int(np.argmax(np.abs(wm.angle)))
    assert abs(np.rad2deg(wm.angle[k])) > 10

    def axis(mask):
        pts = np.argwhere(mask).astype(np.float64)
        pts -= pts.mean(0)
        w, vec = np.linalg.eigh(pts.T @ pts)
        major = vec[:, 1]  # (dy, dx) of the long axis
        return np.arctan2(major[1], major[0])

    est0 = skin_mask_estimate(synth_video(60, 48, domain=QUIET, seed=3, hr=90.0)["video"][0])
    estk = skin_mask_estimate(v[k])
    # turned about the frame's centre: the face's centroid goes where R(angle) takes it
    c, a = (48 - 1) / 2, wm.angle[k]
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])  # on (y, x)
    expected = c + rot @ (np.argwhere(est0).mean(0) - c)
    assert np.abs(np.argwhere(estk).mean(0) - expected).max() < 0.3
    tilt = np.rad2deg(abs(np.angle(np.exp(1j * (axis(estk) - axis(est0))))))
    tilt = min(tilt, 180 - tilt)
    assert abs(tilt - abs(np.rad2deg(wm.angle[k]))) < 4


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
    res = {roi: evaluate_classic(vs, 30.0, "pos", roi=roi) for roi in ("true", "estimated")}
    for r in res.values():
        assert r["n"] == 2 and np.isfinite(r["MAE_fft"])
    # the two ROIs average different pixels, so their signals differ
    assert res["true"]["records"][0]["snr_db"] != res["estimated"]["records"][0]["snr_db"]
    with pytest.raises(ValueError, match="roi must be"):
        evaluate_classic(vs, 30.0, "pos", roi="box")
