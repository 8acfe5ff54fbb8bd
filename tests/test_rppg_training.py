"""methods.rppg.training and the label path the rPPG trainers share: the schedules run the way the
official code runs them (learning rate down, weight decay up), and the SCS target of a clip is
built from its label filtered over the whole video, as the official preprocessing does."""

import math

import numpy as np
import pytest
import torch

from methods.common import Run, load_run_checkpoint
from methods.rppg.data import make_set, sample_clips
from methods.rppg.scs import filter_label, label_phase, scs_label
from methods.rppg.training import SCS_TRIM, VideoSetConfig, cosine, scs_target, set_schedule

FS = 30.0


def test_schedules_lower_the_learning_rate_and_raise_the_weight_decay():
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    lrs, wds = [], []
    for step in range(11):
        set_schedule(opt, step, 10, (5e-4, 1e-6), (1e-5, 1e-3))
        lrs.append(opt.param_groups[0]["lr"])
        wds.append(opt.param_groups[0]["weight_decay"])
    assert lrs[0] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(1e-6)
    assert wds[0] == pytest.approx(1e-5) and wds[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and all(a < b for a, b in zip(wds, wds[1:]))
    assert cosine(5, 10, 1.0, 3.0) == pytest.approx(2.0)  # half way: the midpoint


@pytest.mark.parametrize("method", ["byhe", "doha"])
def test_trainers_raise_the_weight_decay(tmp_path, method):
    # after 3 of 3 steps the optimiser holds the last step's decay: cosine(2, 3, 1e-5, 1e-3) = 7.5e-4
    # (it would be 2.6e-4 with the schedule backwards)
    if method == "byhe":
        from methods.byhe.train import TrainConfig as C
        from methods.byhe.train import train

        cfg = C(steps=3, batch=2, clip=30, n_train=2, n_test=1, frames=60, size=32, shrink=4)
    else:
        from methods.doha.train import DOHAConfig as C
        from methods.doha.train import train

        cfg = C(method="pearson", steps=3, per_domain=1, clip=30, n_train=1, n_test=1, frames=60, size=32)
    from dataclasses import asdict

    run = Run(str(tmp_path / method), asdict(cfg))
    train(cfg, run, show_progress=False)
    run.close()
    wd = load_run_checkpoint(str(tmp_path / method))["opt"]["param_groups"][0]["weight_decay"]
    assert wd == pytest.approx(cosine(2, 3, cfg.wd, cfg.wd_max)) and wd > 5e-4


def _clip_starts(vs, clips):
    """The start frame of every clip in its video (clips are cut without flips of the wave)."""
    out = []
    for b in range(clips["wave"].shape[0]):
        i, w = int(clips["index"][b]), clips["wave"][b].numpy()
        L = w.size
        out.append(next(s for s in range(vs.frames - L + 1) if np.array_equal(vs.pulses[i, s : s + L], w)))
    return out


def test_scs_target_is_built_from_the_label_filtered_over_the_whole_video():
    vs = make_set(8, 300, 32, "default", seed=5)
    np.testing.assert_allclose(vs.scs_pulses, filter_label(vs.pulses, FS), rtol=0, atol=1e-5)  # float32 storage
    clips = sample_clips(vs, 24, 70, np.random.default_rng(0), "pulse")
    starts = _clip_starts(vs, clips)
    for b, s in enumerate(starts):
        i = int(clips["index"][b])
        torch.testing.assert_close(clips["scs_wave"][b], torch.from_numpy(vs.scs_pulses[i, s : s + 70]))
    R = scs_target(clips, "clean")
    torch.testing.assert_close(R, scs_label(clips["scs_wave"], "clean", trim=SCS_TRIM))
    # against the map of the whole video's filtered phase, sliced to the clip's samples (s + 13 .. s + 57)
    refs = []
    for b, s in enumerate(starts):
        phi = label_phase(torch.from_numpy(vs.scs_pulses[int(clips["index"][b])]).double()[None], "clean", trim=0)[0]
        ph = phi[s + SCS_TRIM : s + SCS_TRIM + R.shape[1]]  # phi[k] is the phase of sample k + 1
        refs.append(torch.cos(ph[:, None] - ph[None, :]))
    ref = torch.stack(refs).float()
    err_filtered = float((R - ref).abs().mean())
    err_raw = float((scs_label(clips["wave"], "clean", trim=SCS_TRIM) - ref).abs().mean())
    # measured 0.06 against 0.35: the raw clip's harmonics and edges bend its phase
    assert err_filtered < 0.12 < 0.25 < err_raw, (err_filtered, err_raw)


def test_map_trainers_use_the_filtered_label():
    from methods.byhe.losses import byhe_loss
    from methods.byhe.train import TrainConfig, build_model, step_losses
    from methods.doha.losses import instance_losses
    from methods.doha.train import DOHAConfig, batch_losses

    vs = make_set(2, 80, 32, "default", seed=1)
    clips = sample_clips(vs, 2, 70, np.random.default_rng(0), "label")
    cfg = TrainConfig(shrink=4)
    model = build_model(cfg).eval()
    with torch.no_grad():
        got = step_losses(model, cfg, clips)["loss"]
        R_hat, att = model(clips["video"])
        want = byhe_loss(R_hat, scs_label(clips["scs_wave"], trim=SCS_TRIM), att, clips["mask"])["loss"]
        raw = byhe_loss(R_hat, scs_label(clips["wave"], trim=SCS_TRIM), att, clips["mask"])["loss"]
        torch.testing.assert_close(got, want)
        assert abs(float(got - raw)) > 1e-3
        losses, _, _ = batch_losses(DOHAConfig(method="hps"), model, clips)
        torch.testing.assert_close(losses, instance_losses(R_hat, scs_label(clips["scs_wave"], trim=SCS_TRIM))[0])


def test_filter_label_keeps_the_pulse_band_only():
    t = np.arange(600) / FS
    pulse = np.sin(2 * math.pi * 1.2 * t)
    x = pulse + np.sin(2 * math.pi * 0.15 * t) + 0.5 * np.sin(2 * math.pi * 7.0 * t)
    y = filter_label(x, FS, smooth=False)
    mid = slice(150, 450)  # away from filtfilt's edge transients
    assert np.abs(y[mid] - pulse[mid]).max() < 0.05
    # the smoothing keeps the dominant frequency and damps a second in-band tone 1 Hz away by
    # exp(-0.5 (1 / 0.38)^2) ~ 0.03
    z = filter_label(pulse + 0.5 * np.sin(2 * math.pi * 2.2 * t), FS)
    spec = np.abs(np.fft.rfft(z[mid] * np.hanning(300)))
    f = np.fft.rfftfreq(300, 1 / FS)
    assert abs(f[spec.argmax()] - 1.2) < 0.11
    assert spec[np.abs(f - 2.2).argmin()] < 0.1 * spec.max()
    with pytest.raises(ValueError, match="at least 40"):
        filter_label(np.zeros(30), FS)
    with pytest.raises(ValueError, match="NaN"):
        filter_label(np.full(100, np.nan), FS)
    with pytest.raises(ValueError, match="cannot hold"):
        filter_label(np.zeros(100), 6.0)


def test_video_set_config_checks_and_sets():
    cfg = VideoSetConfig(n_train=2, n_test=1, frames=60, test_frames=90, size=32, seed=3)
    train, test = cfg.video_sets("default")
    assert (len(train), train.frames, len(test), test.frames) == (2, 60, 1, 90)
    assert not np.array_equal(train.videos[0, :60], test.videos[0, :60])
    with pytest.raises(ValueError, match="at least 1 training"):
        VideoSetConfig(n_train=0).check_videos(70)
    with pytest.raises(ValueError, match="at least 40 frames"):
        VideoSetConfig(frames=30).check_videos(30)
    with pytest.raises(ValueError, match="clip must be at most"):
        VideoSetConfig(frames=60).check_videos(70)
