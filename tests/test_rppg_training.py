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


# --- the rPPG CLIs under torchrun: helpers shared by tests/test_method_{byhe,doha,sspd}.py --------------------------
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerances of the DDP equivalence tests (float32 throughout; 2 processes against 1). The same sums are taken in
# another order (GlobalBatchNorm's two-part sums, the per-rank means averaged, the gradients all-reduced), and the
# methods amplify float32 rounding: one process's gradients are 2e-4 (wave losses) to 2e-3 (SCS maps) apart from
# float64's, and Adam moves every coordinate by about lr per step however small its gradient, so a coordinate whose
# gradient is at the level of rounding (the bias of a convolution just before a BatchNorm, which the batch mean
# cancels; the running means that add that bias up) takes a random +-lr step in either run; DOHA's PCGrad projections
# add to it. (Checked once by hand in float64, the trainers' code with float64 tensors: 1 and 2 processes agree to
# 2e-12 for BYHE and for DOHA's hho, hps and doha over 3 steps: the differences are rounding, not the method.)
# * the logged terms (relative): measured 8e-6 (BYHE), 8e-6 (DOHA HHO), 1e-5 (SSPD) -> LOSS_RTOL;
# * Adam's first moments (``exp_avg``, the running mean of the gradients: what DDP's all-reduce must get right),
#   all parameters together: |difference| <= MOMENT_RTOL |exp_avg| (2-norms); measured 5e-4 (BYHE, 3 steps), 6e-3
#   (DOHA HHO, 2 steps), 6e-5 (SSPD, 4 steps);
# * the parameters and buffers: at most SPREAD_FRACTION of the coordinates differ by more than 1e-5 + 1e-4 |value|
#   (measured 0.17% BYHE, 1.7% DOHA HHO, 0 SSPD), none by more than Adam's bound 4 lr per step + 1e-5 +
#   1e-3 |value| (the running mean of the first batch norm, after a convolution of 0-255 frames, is ~30: its inputs'
#   tiny weight differences come out 300 times larger).
LOSS_RTOL = {"methods.byhe": 1e-4, "methods.doha": 1e-4, "methods.sspd": 1e-4}
MOMENT_RTOL = {"methods.byhe": 5e-3, "methods.doha": 3e-2, "methods.sspd": 5e-3}
SPREAD_FRACTION = {"methods.byhe": 0.01, "methods.doha": 0.05, "methods.sspd": 0.01}


def free_port() -> int:
    """A free TCP port (torchrun's --master_port=0 hangs the workers' rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(module: str, argv, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc -m module argv`` from the repository root."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        module,
        *map(str, argv),
    ]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _rows(folder) -> list:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_close_states(a: dict, b: dict, what: str, bound: float, spread: float) -> None:
    """Two state dicts alike: at most ``spread`` of all their float coordinates differ by more than
    1e-5 + 1e-4 |value|, none by more than ``bound`` + 1e-5 + 1e-3 |value|; the integer ones equal."""
    assert a.keys() == b.keys(), what
    off = total = 0
    for k, v in a.items():
        if not v.is_floating_point():
            assert torch.equal(v, b[k]), f"{what}.{k}"
            continue
        d = (v.double() - b[k].double()).abs()
        off += int((d > 1e-5 + 1e-4 * b[k].double().abs()).sum())
        total += v.numel()
        excess = d - bound - 1e-5 - 1e-3 * b[k].double().abs()
        assert float(excess.max()) <= 0, f"{what}.{k}: {float(d.max())} > {bound} + 1e-3 |value|"
    assert off <= spread * total, f"{what}: {off} of {total} coordinates differ"
    print(f"{what}: {off} of {total} coordinates differ by more than 1e-5 + 1e-4 |value|")


def assert_same_training(one, two, module: str, objects, lr: float) -> None:
    """The run folders ``one`` (1 process) and ``two`` (torchrun) end at the same step with the same logged rows
    (loss terms to LOSS_RTOL; counters exactly), Adam moments and parameters (see the tolerances above)."""
    rows_a, rows_b = _rows(one), _rows(two)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    worst = 0.0
    for ra, rb in zip(rows_a, rows_b):
        for k, v in ra.items():
            if k in ("seconds",) or isinstance(v, str):
                continue
            if k in ("skipped", "rejected", "step", "epoch"):
                assert v == rb[k], (k, v, rb[k])
            else:
                assert rb[k] == pytest.approx(v, rel=LOSS_RTOL[module], abs=1e-7), (k, v, rb[k])
                worst = max(worst, abs(rb[k] - v) / max(abs(v), 1e-12))
    print(f"{module}: logged terms differ by at most {worst:.1e} (relative)")
    a, b = load_run_checkpoint(one), load_run_checkpoint(two)
    assert a["step"] == b["step"]
    bound = 4 * lr * (a["step"] + 1)
    for name in objects:
        _assert_close_states(a[name], b[name], name, bound, SPREAD_FRACTION[module])
    m_a = torch.cat([s["exp_avg"].double().flatten() for s in a["opt"]["state"].values()])
    m_b = torch.cat([s["exp_avg"].double().flatten() for s in b["opt"]["state"].values()])
    worst = float((m_a - m_b).norm() / m_a.norm())
    assert worst <= MOMENT_RTOL[module], f"Adam's first moments differ by {worst:.1e} (2-norm, relative)"
    print(f"{module}: Adam's first moments differ by {worst:.1e} (2-norm, relative)")


def assert_written_by_rank0(folder, launches: int, last_step: int) -> None:
    """Only rank 0 wrote: each launch's messages once in the log, each logged step once in the metrics, exactly the
    two kept checkpoints (with their checksums) and no temporary file of a second writer."""
    log = open(os.path.join(folder, "log.txt")).read()
    assert log.count("DDP: 2 process(es)") == launches
    assert log.count("training done") == launches
    steps = [r["step"] for r in _rows(folder)]
    assert steps == sorted(set(steps))
    names = sorted(os.listdir(os.path.join(folder, "checkpoints")))
    want = [f"ckpt_{s:08d}.pt{ext}" for s in (last_step - 1, last_step) if s >= 0 for ext in ("", ".sha256")]
    assert names == want, names


def check_ddp_matches_single_process(
    tmp_path,
    module: str,
    main,
    args,
    *,
    budget: str,
    small: int,
    large: int,
    lr: float,
    objects,
    steps_per_unit: int = 1,
    straight: bool = True,
    indivisible=(),
) -> None:
    """The DDP equivalence test of an rPPG trainer: ``args`` (a tiny config, the dropouts 0: dropout masks are drawn
    per process and cannot equal one process's) trained for ``budget small`` in one process (``main``, in this
    process) and under torchrun with 2 processes end alike (``assert_same_training``), rank 0 alone writing; then
    both continue to ``budget large``: torchrun logs the resume with the larger budget and again ends like one
    process continued the same way, and (``straight``: schedules that do not depend on the budget) like one process
    that trained for ``large`` from the start. ``indivisible``: flags whose global batch 2 processes cannot share: a
    one-line error and a non-zero exit."""
    common = ["train", *map(str, args), "--device", "cpu", "--no-progress", "--checkpoint-every", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main([*common, budget, str(small), "--out", one]) == 0
    r = torchrun(module, [*common, budget, small, "--out", two])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_training(one, two, module, objects, lr)
    assert_written_by_rank0(two, 1, small * steps_per_unit - 1)

    r = torchrun(module, [*common, budget, large, "--out", two])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"with a larger budget ({budget[2:]} {small} -> {large})" in open(os.path.join(two, "log.txt")).read()
    assert main([*common, budget, str(large), "--out", one]) == 0
    assert_same_training(one, two, module, objects, lr)
    assert_written_by_rank0(two, 2, large * steps_per_unit - 1)
    if straight:
        ref = str(tmp_path / "straight")
        assert main([*common, budget, str(large), "--out", ref]) == 0
        a, b = load_run_checkpoint(ref), load_run_checkpoint(two)
        for name in objects:
            bound = 4 * lr * large * steps_per_unit
            _assert_close_states(a[name], b[name], f"{name} (straight run)", bound, SPREAD_FRACTION[module])

    if indivisible:
        r = torchrun(module, [*common, *indivisible, "--out", tmp_path / "bad"])
        assert r.returncode != 0
        # each rank says it in one line; the two share the pipe, so their lines may run into each other
        assert len(re.findall(r"error: [^\n]*?must be divisible by the 2 processes of torchrun", r.stderr)) == 2, (
            r.stderr
        )
        assert not re.search(r'File ".*methods/', r.stderr), r.stderr  # no traceback from the methods
