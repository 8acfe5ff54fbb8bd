"""methods.rppg foundations (issue #12, in progress): the evaluation pipeline against
hand-computed values and scipy, and the SCS label (faithful and clean modes)."""

import math

import numpy as np
import pytest
import torch

from methods.rppg import pipeline as P
from methods.rppg.scs import analytic_signal, label_phase, scs_label

FS = 30.0


def pulse(hr_bpm, seconds=20.0, fs=FS, phase=0.0, harmonic=0.35):
    t = np.arange(int(seconds * fs)) / fs
    w = 2 * np.pi * hr_bpm / 60 * t + phase
    return np.sin(w) + harmonic * np.sin(2 * w - 0.8)


@pytest.mark.parametrize("hr", [52.0, 75.0, 96.0, 130.0])
def test_heart_rate_recovered(hr):
    # a weak harmonic: a strong one makes extra local maxima, which plain peak counting (the
    # toolbox's find_peaks without settings) counts as beats
    x = P.preprocess(pulse(hr, 30.0, harmonic=0.1) + 0.3 * np.linspace(0, 1, 900), FS)  # plus a drift
    assert abs(P.hr_peaks(x, FS) - hr) < 1.0
    # the FFT peak is within half a bin of the periodogram (nfft = 1024 at 30 fps: 1.76 bpm)
    assert abs(P.hr_fft(x, FS) - hr) <= 0.5 * 60 * FS / 1024 + 1e-9


def test_hr_fft_picks_the_in_band_bin():
    n = 256
    f_bin = 20  # exactly on a bin of nfft = 256: 20 * 30 / 256 Hz
    x = np.sin(2 * np.pi * f_bin * np.arange(n) / n) + 5 * np.sin(2 * np.pi * 2 * np.arange(n) / n)  # strong 0.23 Hz
    assert P.hr_fft(x, FS) == pytest.approx(60 * f_bin * FS / n)


def test_hr_peaks_by_hand():
    x = np.zeros(100)
    x[[10, 40, 70]] = 1.0  # peaks every 30 samples at 30 fps: 60 bpm
    assert P.hr_peaks(x, FS) == pytest.approx(60.0)


def test_detrend_removes_a_ramp_and_keeps_the_pulse():
    x = pulse(80, 10.0) + np.linspace(0, 5, 300)
    d = P.detrend(x)
    assert abs(np.polyfit(np.arange(300), d, 1)[0]) < 1e-3
    assert np.corrcoef(d, pulse(80, 10.0))[0, 1] > 0.95


def test_metrics_by_hand():
    res = P.WindowResult(
        hr_pred=[60.0, 80.0, 100.0, 70.0],
        hr_label=[62.0, 80.0, 95.0, 75.0],
        snr=[1.0, 3.0, 2.0, 2.0],
        macc=[0.5, 0.7, 0.9, 0.7],
    )
    m = P.summarize(res)
    err = np.array([-2.0, 0.0, 5.0, -5.0])
    assert m["MAE"] == pytest.approx(3.0)
    assert m["RMSE"] == pytest.approx(math.sqrt((4 + 0 + 25 + 25) / 4))
    assert m["MAPE"] == pytest.approx(100 * np.mean(np.abs(err) / np.array([62, 80, 95, 75])))
    assert m["Pearson"] == pytest.approx(np.corrcoef(res.hr_pred, res.hr_label)[0, 1])
    assert m["SNR"] == pytest.approx(2.0) and m["MACC"] == pytest.approx(0.7) and m["windows"] == 4


def test_macc_equals_the_roll_loop():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(64), rng.standard_normal(64)
    loop = max(abs(np.corrcoef(x, np.roll(y, lag))[0, 1]) for lag in range(63))
    assert P.macc(x, y) == pytest.approx(loop, rel=1e-10)
    assert P.macc(x, np.roll(x, 7)) == pytest.approx(1.0)


def test_snr_of_a_clean_pulse_is_high_and_of_noise_low():
    x = P.preprocess(pulse(75, 20.0, harmonic=0.0), FS)
    noise = P.preprocess(np.random.default_rng(0).standard_normal(600), FS)
    assert P.snr_db(x, 75.0, FS) > 10 > P.snr_db(noise, 75.0, FS)


def test_evaluate_windows_end_to_end():
    preds = [pulse(70, 20.0, phase=0.4) + 0.05 * np.random.default_rng(1).standard_normal(600), pulse(110, 20.0)]
    labels = [pulse(70, 20.0), pulse(110, 20.0, phase=1.0)]
    m = P.evaluate_windows(preds, labels, FS, window_s=10.0, method="peak")
    assert m["windows"] == 4 and m["MAE"] < 1.0 and m["MACC"] > 0.9
    m = P.evaluate_windows(preds, labels, FS, window_s=0)  # whole videos
    assert m["windows"] == 2


@pytest.mark.parametrize(
    "call,msg",
    [
        (
            lambda: P.evaluate_windows([np.zeros(100)], [np.zeros(100)], FS, window_s=10.0),
            "shorter than the 10.0 s window",
        ),
        (lambda: P.hr_fft(np.r_[np.zeros(10), np.nan, np.zeros(10)], FS), "NaN or infinite sample .first at index 10"),
        (lambda: P.hr_fft(np.zeros(64), 4.0), "cannot hold the band"),
        (lambda: P.bandpass(np.zeros(64), -1.0), "sampling rate must be"),
        (lambda: P.evaluate_windows([np.zeros(9)], [np.zeros(9)], FS, method="svd"), "method must be"),
    ],
)
def test_bad_inputs(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


# ---- SCS label ----------------------------------------------------------------------------
def test_analytic_signal_matches_scipy():
    from scipy.signal import hilbert

    for n in (49, 70):
        x = np.random.default_rng(n).standard_normal((3, n))
        np.testing.assert_allclose(analytic_signal(torch.tensor(x)).numpy(), hilbert(x), atol=1e-12)


def test_clean_scs_is_delay_invariant_on_a_sinusoid_and_rank_two():
    t = torch.arange(72, dtype=torch.float64) / FS
    f = 1.25  # 2 whole periods in the 48 trimmed samples: the FFT Hilbert transform is exact
    waves = torch.stack([torch.sin(2 * math.pi * f * (t - d)) for d in (0.0, 0.13, 0.31)])
    R = scs_label(waves, "clean")
    assert R.shape == (3, 47, 47) and R.dtype == torch.float64
    torch.testing.assert_close(R[1], R[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(R[2], R[0], atol=1e-10, rtol=0)
    tt = t[13:60]
    torch.testing.assert_close(R[0], torch.cos(2 * math.pi * f * (tt[:, None] - tt[None, :])), atol=1e-10, rtol=0)
    assert torch.linalg.matrix_rank(R[0]).item() == 2


def test_faithful_mode_follows_the_code_loop():
    from scipy.signal import hilbert

    rng = np.random.default_rng(0)
    t = np.arange(70) / FS
    b = np.sin(2 * np.pi * 1.3 * t + 0.4) + 0.2 * rng.standard_normal(70)
    z = hilbert(b[12:58])
    psi = np.array([math.atan(zi.imag / zi.real) if zi.real != 0 else math.copysign(1.57, zi.imag) for zi in z])
    acc, phi = 0.0, [psi[0]]
    for i in range(1, len(psi)):
        if psi[i] < psi[i - 1]:
            acc += psi[i - 1] - psi[i]
        phi.append(psi[i] + acc)
    phi = np.array(phi)[1:]
    ours = label_phase(torch.tensor(b), "faithful").numpy()
    np.testing.assert_allclose(ours, phi, atol=1e-10)
    R = scs_label(torch.tensor(b), "faithful").numpy()
    np.testing.assert_allclose(R, np.cos(phi[:, None] - phi[None, :]), atol=1e-10)


def test_scs_bad_inputs():
    with pytest.raises(ValueError, match="fewer than 2 phases"):
        scs_label(torch.zeros(20))
    with pytest.raises(ValueError, match="mode"):
        scs_label(torch.zeros(70), "exact")
    with pytest.raises(ValueError, match="NaN"):
        scs_label(torch.full((70,), float("nan")))


# ---- synthetic videos ---------------------------------------------------------------------
from methods.rppg.synth import DOMAINS, Domain, chrom, pos, skin_signal, synth_video  # noqa: E402

CLEAN = Domain(
    name="clean", illumination_drift=0, flicker=0, motion_px=0, specular=0, noise_std=0, delay_range=(0.0, 0.0)
)


@pytest.mark.parametrize("hr", [72.0, 95.0, 128.0])
def test_video_carries_the_heart_rate(hr):
    v = synth_video(900, 24, domain=CLEAN, seed=int(hr), hr=hr)
    x = P.preprocess(pos(skin_signal(v["video"], v["mask"]), FS), FS)
    assert abs(P.hr_peaks(x, FS) - v["hr"]) < 1.0
    assert abs(v["hr"] - hr) < 0.1 * hr  # the simulator's variability around the requested rate
    c = P.preprocess(chrom(skin_signal(v["video"], v["mask"]), FS), FS)
    assert abs(P.hr_fft(c, FS) - P.hr_fft(P.preprocess(v["label"], FS), FS)) < 1e-9  # the same periodogram bin


def test_classic_evaluation_and_bad_input():
    from methods.rppg.data import make_set
    from methods.rppg.evaluation import evaluate_classic

    vs = make_set(2, 240, 24, CLEAN, seed=1)
    for m in ("pos", "chrom"):
        res = evaluate_classic(vs, FS, m)
        assert res["n"] == 2 and res["MAE_fft"] < 1.0, (m, res["MAE_fft"])
    with pytest.raises(ValueError, match="method must be one of"):
        evaluate_classic(vs, FS, "green")
    with pytest.raises(ValueError, match="CHROM needs at least"):
        chrom(np.ones((10, 3)), FS)


def test_video_shapes_delay_and_seeding():
    v = synth_video(120, 20, domain=DOMAINS["default"], seed=3)
    assert v["video"].shape == (120, 20, 20, 3) and v["video"].dtype == np.float32
    assert 0.0 <= v["video"].min() and v["video"].max() <= 1.0
    np.testing.assert_allclose(v["video"] * 255, np.round(v["video"] * 255), atol=1e-3)  # 8-bit levels
    k = int(round(v["delay"] * FS))
    assert 0 <= v["delay"] <= 0.5 and k > 0
    # label(t) = pulse(t - delay): the label is the pulse shifted right by k frames
    w = synth_video(120 + 0, 20, domain=DOMAINS["default"], seed=3)
    np.testing.assert_array_equal(v["video"], w["video"])  # seeded
    np.testing.assert_allclose(v["label"][k:], v["pulse"][:-k], atol=1e-6)
    assert synth_video(60, 20, domain=DOMAINS["no-delay"], seed=3)["delay"] == 0.0
    with pytest.raises(ValueError, match="n_frames >= 2"):
        synth_video(1, 20)


# ---- losses -------------------------------------------------------------------------------
from methods.rppg.losses import neg_max_cross_cov, neg_pearson, neg_snr  # noqa: E402


def _waves(hr=75.0, seconds=10.0, delay=0.0, B=3):
    t = torch.arange(int(seconds * FS), dtype=torch.float64) / FS
    return torch.stack([torch.sin(2 * math.pi * hr / 60 * (t - delay) + 0.3 * b) for b in range(B)])


def test_neg_pearson_invariances():
    y = _waves()
    x = y + 0.1 * torch.randn_like(y)
    base = neg_pearson(x, y)
    torch.testing.assert_close(neg_pearson(3 * x + 7, y), base)  # scale and offset
    assert neg_pearson(y, y).abs() < 1e-12
    assert neg_pearson(_waves(delay=0.2), y) > 0.5  # a 0.2 s delay at 75 bpm: r = cos(90 deg) ~ 0


def test_neg_mcc_is_delay_robust():
    y = _waves(seconds=8.0)
    aligned = neg_max_cross_cov(y, y, FS)
    for delay in (0.1, 0.2, 0.4):
        shifted = neg_max_cross_cov(_waves(seconds=8.0, delay=delay), y, FS)
        assert abs(shifted - aligned) < 0.1 * abs(aligned)
    torch.testing.assert_close(neg_max_cross_cov(5 * y + 1, y, FS), aligned)  # scale and offset
    noise = torch.randn_like(y)
    assert neg_max_cross_cov(noise, y, FS) > aligned + 0.3
    x = y.clone().requires_grad_()
    neg_max_cross_cov(x + 0.1 * noise, y, FS).backward()
    assert torch.isfinite(x.grad).all()


def test_neg_snr_prefers_a_clean_pulse_at_the_label_rate():
    y = _waves(hr=90.0)
    hr = torch.full((3,), 90.0, dtype=torch.float64)
    assert neg_snr(y, hr, FS) < neg_snr(torch.randn_like(y), hr, FS) - 10
    assert neg_snr(y, hr, FS) < neg_snr(_waves(hr=130.0), hr, FS)
    with pytest.raises(ValueError, match="one heart rate per wave"):
        neg_snr(y, torch.tensor([90.0]), FS)
    with pytest.raises(ValueError, match="labels must have"):
        neg_pearson(y, y[:, :-1])


# ---- backbones ----------------------------------------------------------------------------
from methods.rppg.backbones import PhysNet, TSCANLike, diff_normalized  # noqa: E402


def test_tscan_like_shapes_gradients_and_bad_input():
    m = TSCANLike()
    assert 0.3e6 < sum(p.numel() for p in m.parameters()) < 0.4e6  # the code's ~0.35 M
    x = torch.rand(2, 3, 70, 36, 36) * 255
    feats, mask = m(x)
    assert feats.shape == (2, 8, 55) and mask.shape[:2] == (2, 69)  # T' = L - 15
    assert ((mask > 0) & (mask < 1)).all()
    feats.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    small = TSCANLike(shrink=4)
    assert small(torch.rand(1, 3, 20, 32, 32))[0].shape == (1, 8, 5)
    with pytest.raises(ValueError, match="T >= 17"):
        m(torch.rand(1, 3, 10, 36, 36))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        m(torch.rand(1, 70, 36, 36))


def test_physnet_and_diff_normalized():
    p = PhysNet(16)
    assert p(torch.rand(2, 3, 64, 24, 24)).shape == (2, 64)
    with pytest.raises(ValueError, match="divisible by 4"):
        p(torch.rand(1, 3, 30, 24, 24))
    v = torch.rand(2, 3, 10, 8, 8) + 0.5
    d = diff_normalized(v)
    assert d.shape == (2, 3, 9, 8, 8)
    torch.testing.assert_close(d.flatten(1).std(1), torch.ones(2))
