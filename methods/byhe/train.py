"""Training and evaluation of BYHE and of the wave-loss baselines on the same backbone.

``TrainConfig.loss`` picks the objective:

* ``"byhe"``: BYHENet (TS-CAN-like backbone + SCS-map head) against the SCS map of the label's
  phase, ``0.8 L_PC + 1.0 MSE + 0.2 L_mask + 0.1 L_spec`` (spec 3);
* ``"pearson"``: TSCANWave against the label wave, negative Pearson (PhysNet's loss);
* ``"mcc"``: TSCANWave, negative max cross-covariance (Gideon & Stent), delay-robust.

``TrainConfig.label`` trains on the delayed label waves (``"label"``: each video's label lags it
by its delay, 0-0.5 s by default) or on the videos' own pulses (``"pulse"``: zero delay).

Settings follow the code (spec 3): Adam, cosine learning rate 5e-4 -> 1e-6 and cosine weight
decay 1e-5 -> 1e-3 per step, batch 6, clips of L = 70 frames with random flips. Evaluation runs
whole test videos (300 frames): the heart rate of the predicted signal (BYHE: the diagonal-mean
wave of R_hat; baselines: the wave) against the heart rate of the video's label, both by the
toolbox pipeline (detrend, band-pass 0.75-2.5 Hz, periodogram peak; peak counting too).
Training is resumable from the run folder's checkpoints; a NaN loss skips its step (logged).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np
import torch

from methods.common import Run, progress, seed_everything, worker_seed
from methods.rppg.backbones import WAVE_OFFSET, TSCANWave
from methods.rppg.data import LABELS, make_set, sample_clips
from methods.rppg.evaluation import evaluate, predict_signal
from methods.rppg.losses import neg_max_cross_cov, neg_pearson
from methods.rppg.scs import MODES, scs_label

from .losses import byhe_loss
from .model import BYHENet

LOSSES = ("byhe", "pearson", "mcc")
SCS_TRIM = 12  # label samples dropped at both ends before the Hilbert transform (N = L - 25)
MIN_CLIP = 30  # N = 5 windows: the spectral prior needs a wave of 4 lags


@dataclass
class TrainConfig:
    loss: str = "byhe"  # byhe | pearson | mcc
    label: str = "label"  # label (delayed) | pulse (zero delay)
    steps: int = 500
    batch: int = 6
    clip: int = 70
    lr: float = 5e-4
    lr_min: float = 1e-6
    wd: float = 1e-5
    wd_max: float = 1e-3
    shrink: int = 2  # backbone width divisor (1: the code's 0.34 M parameters)
    scs_mode: str = "clean"  # faithful | clean (spec 1.1)
    domain: str = "default"
    n_train: int = 48
    n_test: int = 16
    frames: int = 300
    size: int = 36
    fs: float = 30.0
    seed: int = 0

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")
        if self.scs_mode not in MODES:
            raise ValueError(f"scs_mode must be one of {MODES}, got {self.scs_mode!r}")
        if self.clip < MIN_CLIP or self.clip > self.frames:
            raise ValueError(f"clip must be in [{MIN_CLIP}, frames={self.frames}] frames (the SCS map needs "
                             f"N = clip - 25 >= 5 windows), got {self.clip}")
        if self.steps < 1 or self.batch < 2:
            raise ValueError(f"need steps >= 1 and batch >= 2 (BatchNorm), got {self.steps} and {self.batch}")


def cosine(step: int, total: int, start: float, end: float) -> float:
    """start -> end along half a cosine over ``total`` steps."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    return BYHENet(shrink=cfg.shrink) if cfg.loss == "byhe" else TSCANWave(shrink=cfg.shrink)


def datasets(cfg: TrainConfig):
    """(train, test) video sets: disjoint seeds, one domain."""
    train = make_set(cfg.n_train, cfg.frames, cfg.size, cfg.domain, seed=worker_seed(cfg.seed, 0), fs=cfg.fs)
    test = make_set(cfg.n_test, cfg.frames, cfg.size, cfg.domain, seed=worker_seed(cfg.seed, 1), fs=cfg.fs)
    return train, test


def wave_target(wave: torch.Tensor, n_out: int) -> torch.Tensor:
    """The label samples aligned with TSCANWave's output."""
    return wave[:, WAVE_OFFSET:WAVE_OFFSET + n_out]


def step_losses(model, cfg: TrainConfig, clips: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The objective's terms on one batch of clips and their total ``loss``."""
    if cfg.loss == "byhe":
        R_hat, att = model(clips["video"])
        R = scs_label(clips["wave"], cfg.scs_mode, trim=SCS_TRIM)
        return byhe_loss(R_hat, R, att, clips["mask"])
    wave, _ = model(clips["video"])
    y = wave_target(clips["wave"], wave.shape[1])
    fn = neg_pearson(wave, y) if cfg.loss == "pearson" else neg_max_cross_cov(wave, y, cfg.fs)
    return {"loss": fn}


def train(cfg: TrainConfig, run: Run, device=torch.device("cpu"), show_progress: bool = True,
          checkpoint_every: int = 100, data=None):
    """Train ``cfg``'s model; returns (model, test set). ``data``: prebuilt (train, test) sets."""
    cfg.check()
    seed_everything(cfg.seed)
    train_set, test_set = data if data is not None else datasets(cfg)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    config = asdict(cfg)
    state = run.resume(config, model=model, opt=opt)
    start = state["step"] + 1 if state else 0
    seconds = state.get("seconds", 0.0) if state else 0.0
    if state is None:
        run.info(f"{cfg.loss} on {cfg.label} waves: {len(train_set)} training videos (delays "
                 f"{train_set.delays.min():.2f}-{train_set.delays.max():.2f} s), {len(test_set)} test videos, "
                 f"{sum(p.numel() for p in model.parameters())} parameters")
    bar = progress(range(start, cfg.steps), enabled=show_progress, desc=f"{cfg.loss}/{cfg.label}", unit="step",
                   total=cfg.steps, initial=start)
    # the skipped-step counter and the terms of the steps since the last logged row continue from the checkpoint
    t0 = time.perf_counter()
    acc, skipped = (state.get("acc", {}), state.get("skipped", 0)) if state else ({}, 0)
    model.train()
    for step in bar:
        rng = np.random.default_rng(worker_seed(cfg.seed, 2, step))
        clips = {k: v.to(device) for k, v in sample_clips(train_set, cfg.batch, cfg.clip, rng, cfg.label).items()}
        for g in opt.param_groups:
            g["lr"] = cosine(step, cfg.steps, cfg.lr, cfg.lr_min)
            g["weight_decay"] = cosine(step, cfg.steps, cfg.wd_max, cfg.wd)  # rises from wd to wd_max
        terms = step_losses(model, cfg, clips)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            skipped += 1
            run.warning(f"step {step}: non-finite loss ({float(loss.detach())}), step skipped")
            opt.zero_grad(set_to_none=True)
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in terms.items():
                acc.setdefault(k, []).append(float(v.detach()))
        last = step + 1 == cfg.steps
        if (step + 1) % 25 == 0 or last:
            row = {"step": step, **{k: float(np.mean(v)) for k, v in acc.items()}, "skipped": skipped,
                   "lr": opt.param_groups[0]["lr"], "seconds": seconds + time.perf_counter() - t0}
            run.log_metrics(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}")
            acc = {}
        if (step + 1) % checkpoint_every == 0 or last:
            run.checkpoints.save(step, {"model": model.state_dict(), "opt": opt.state_dict(), "config": config,
                                        "seconds": seconds + time.perf_counter() - t0, "acc": acc,
                                        "skipped": skipped})
    run.info(f"training done ({cfg.steps} steps, {seconds + time.perf_counter() - t0:.0f} s)")
    return model, test_set


def load_model(path: str, device=torch.device("cpu")):
    """A model saved by ``train`` (a checkpoint file or a run folder): (model, TrainConfig)."""
    from methods.common import load_run_checkpoint

    state = load_run_checkpoint(path)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    return model, cfg


__all__ = ["LOSSES", "TrainConfig", "build_model", "datasets", "evaluate", "load_model", "predict_signal", "train"]
