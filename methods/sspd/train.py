"""SSPD training without labels (spec 2.4), and the supervised reference on the same network.

Each step draws clips of ``clip + 1`` frames, makes the two views (``augment.two_views``), runs
the student on the online view and the EMA teacher (no gradient, kept in training mode: its
batch norm uses batch statistics) on the target view, and minimises ``sspd_losses``. The backbone
learns only through the S3M losses, the predictor only through L_RPD (it sees F.detach()). After
each Adam step the teacher's parameters follow ``theta_t <- m theta_t + (1 - m) theta_o`` with
``m_i = 1 - 0.05 (1 + cos(pi i / I))`` (0.9 -> 1.0 over the I steps).

``supervised=True`` trains the same backbone + predictor end to end on the target view with
negative Pearson against the label wave (the videos' own pulses by default: the supervised
reference at its best, without label delay). Both are resumable; a NaN loss skips its step.
Test: the whole frame resized like the target view, frame differences, backbone + predictor.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.common import Run, progress, seed_everything, worker_seed
from methods.rppg.data import LABELS, make_set, sample_clips
from methods.rppg.synth import DOMAINS

from .augment import CROPS, crop_size, two_views
from .losses import neg_pearson, sspd_losses
from .model import SSPDNet


@dataclass
class SSPDConfig:
    supervised: bool = False
    label: str = "pulse"  # supervised only: pulse (zero delay) | label (delayed)
    steps: int = 150
    batch: int = 4
    clip: int = 150  # frames per view (clip + 1 frames are drawn)
    lr: float = 1e-3
    width: int = 1  # channel-width divisor (1: the code's network)
    spatial_padding: bool = True  # pad space in the convs (frames smaller than 66 x 66)
    crop: str = "fixed"  # fixed | faithful (the code's top-left crop)
    keep: float = 0.7  # Bernoulli keep-probability of the masked difference
    domain: str = "challenging"
    n_train: int = 32
    n_test: int = 16
    frames: int = 300
    size: int = 36
    fs: float = 30.0
    seed: int = 0

    def check(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; choose from {sorted(DOMAINS)}")
        if self.batch < 2 or self.steps < 1:
            raise ValueError(f"need batch >= 2 (batch norm) and steps >= 1, got {self.batch} and {self.steps}")
        if not 32 <= self.clip < self.frames:
            raise ValueError(f"clip must be in [32, frames - 1 = {self.frames - 1}] (the S3M maps need time), "
                             f"got {self.clip}")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"need at least 1 training and 1 test video, got {self.n_train} and {self.n_test}")


def momentum(step: int, total: int) -> float:
    """m_i = 1 - 0.05 (1 + cos(pi i / I)): 0.9 at the start, 1.0 at the end."""
    return 1 - 0.05 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_o, parameters only."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(m).add_(ps.detach(), alpha=1 - m)


def global_view(video: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, T + 1, S, S) 0..255 -> frame differences of the frames resized to size (B, 3, T, c, c)."""
    B, C, T1, H, W = video.shape
    x = F.interpolate(video.float().transpose(1, 2).reshape(B * T1, C, H, W), size=(size, size), mode="bicubic",
                      align_corners=False).reshape(B, T1, C, size, size).transpose(1, 2)
    return x[:, :, 1:] - x[:, :, :-1]


class Inference(nn.Module):
    """Test-time wrapper for ``methods.rppg.evaluation.evaluate``: a clip (1, 3, T, S, S) 0..255 ->
    (the predicted wave (1, T - 1), None)."""

    def __init__(self, net: SSPDNet, size: int):
        super().__init__()
        self.net, self.size = net, crop_size(size)

    def forward(self, video: torch.Tensor):
        return self.net.predict(global_view(video, self.size)), None


def build(cfg: SSPDConfig) -> SSPDNet:
    return SSPDNet(width=cfg.width, spatial_padding=cfg.spatial_padding)


def datasets(cfg: SSPDConfig):
    train = make_set(cfg.n_train, cfg.frames, cfg.size, cfg.domain, seed=worker_seed(cfg.seed, 0), fs=cfg.fs)
    test = make_set(cfg.n_test, cfg.frames, cfg.size, cfg.domain, seed=worker_seed(cfg.seed, 1), fs=cfg.fs)
    return train, test


def step_losses(cfg: SSPDConfig, student: SSPDNet, teacher: SSPDNet, clips: Dict[str, torch.Tensor],
                g: torch.Generator) -> Dict[str, torch.Tensor]:
    if cfg.supervised:
        x = global_view(clips["video"], crop_size(cfg.size))
        y = student.predict(x)
        return {"loss": neg_pearson(y, clips["wave"][:, 1:])}
    online, target = two_views(clips["video"], g, cfg.crop, cfg.keep)
    y_o, maps_o = student(online)
    with torch.no_grad():
        y_t, maps_t = teacher(target)
    return sspd_losses(y_o, y_t, maps_o, maps_t, cfg.fs)


def train(cfg: SSPDConfig, run: Run, device=torch.device("cpu"), show_progress: bool = True,
          checkpoint_every: int = 50, data=None):
    """Returns (the test-time model ``Inference``, the test set)."""
    cfg.check()
    seed_everything(cfg.seed)
    train_set, test_set = data if data is not None else datasets(cfg)
    student = build(cfg).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    config = asdict(cfg)
    state = run.resume(config, student=student, teacher=teacher, opt=opt)
    start = state["step"] + 1 if state else 0
    seconds = state.get("seconds", 0.0) if state else 0.0
    if state is None:
        run.info(f"{'supervised' if cfg.supervised else 'SSPD (no labels)'} on {cfg.domain}: {len(train_set)} training "
                 f"videos, {sum(p.numel() for p in student.parameters())} parameters "
                 f"({sum(p.numel() for p in student.s3m.parameters())} in S3M)")
    bar = progress(range(start, cfg.steps), enabled=show_progress, desc="supervised" if cfg.supervised else "sspd",
                   unit="step", total=cfg.steps, initial=start)
    # the skipped-step counter and the terms of the steps since the last logged row continue from the checkpoint
    t0 = time.perf_counter()
    acc, skipped = (state.get("acc", {}), state.get("skipped", 0)) if state else ({}, 0)
    student.train()
    teacher.train()  # batch statistics, as the code
    for step in bar:
        rng = np.random.default_rng(worker_seed(cfg.seed, 2, step))
        clips = {k: v.to(device) for k, v in sample_clips(train_set, cfg.batch, cfg.clip + 1, rng, cfg.label,
                                                          flip=cfg.supervised).items()}
        g = torch.Generator().manual_seed(worker_seed(cfg.seed, 3, step))
        terms = step_losses(cfg, student, teacher, clips, g)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(terms["loss"]):
            skipped += 1
            run.warning(f"step {step}: non-finite loss ({float(terms['loss'].detach())}), step skipped")
        else:
            terms["loss"].backward()
            opt.step()
            if not cfg.supervised:
                ema_update(teacher, student, momentum(step, cfg.steps))
            for k, v in terms.items():
                acc.setdefault(k, []).append(float(v.detach()))
        last = step + 1 == cfg.steps
        if (step + 1) % 10 == 0 or last:
            row = {"step": step, **{k: float(np.mean(v)) for k, v in acc.items()}, "skipped": skipped,
                   "momentum": momentum(step, cfg.steps), "seconds": seconds + time.perf_counter() - t0}
            run.log_metrics(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}")
            acc = {}
        if (step + 1) % checkpoint_every == 0 or last:
            run.checkpoints.save(step, {"student": student.state_dict(), "teacher": teacher.state_dict(),
                                        "opt": opt.state_dict(), "config": config,
                                        "seconds": seconds + time.perf_counter() - t0, "acc": acc,
                                        "skipped": skipped})
    run.info(f"training done ({cfg.steps} steps, {seconds + time.perf_counter() - t0:.0f} s, {skipped} skipped)")
    return Inference(student, cfg.size), test_set


def load_model(path: str, device=torch.device("cpu")):
    """(Inference model, SSPDConfig) from a run folder or a checkpoint file."""
    from methods.common import load_run_checkpoint

    state = load_run_checkpoint(path)
    cfg = SSPDConfig(**state["config"])
    net = build(cfg).to(device)
    net.load_state_dict(state["student"])
    return Inference(net, cfg.size), cfg
