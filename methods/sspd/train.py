"""SSPD training without labels (spec 2.4), and the supervised reference on the same network.

The schedule is the official one: ``epochs`` epochs, each drawing one random clip of ``clip + 1``
frames from every training video in a shuffled order, in batches of ``batch`` (the last one
smaller, as the code's ``drop_last=False``): 30 epochs x 3 iterations (12, 12, 6 clips of 300
frame differences) for 30 videos. ``steps`` > 0 stops (or goes on) after that many iterations of
the same sampler.

Each step makes the two views (``augment.two_views``), runs the student on the online view and
the EMA teacher (no gradient, kept in training mode: its batch norm uses batch statistics and
accumulates its running statistics on the target view) on the target view, and minimises
``sspd_losses``. The backbone learns only through the S3M losses, the predictor only through
L_RPD (it sees F.detach()). After each Adam step the teacher's parameters follow
``theta_t <- m theta_t + (1 - m) theta_o`` with ``m_i = 1 - 0.05 (1 + cos(pi i / I))`` (0.9 -> 1.0
over the I steps).

``supervised=True`` trains the same backbone + predictor end to end on the target view with
negative Pearson against the label wave (the videos' own pulses by default: the supervised
reference at its best, without label delay). Both are resumable; a NaN loss skips its step.

Test: the whole frame resized like the target view, frame differences, backbone + predictor of
``eval_net``, in eval mode. The student's batch-norm running statistics come from masked online
views (30 % zeros, a crop) and so do not match the unmasked test input; the teacher's come from
the target view, which is the test view. The official ``test.py`` loads a released state dict of
the inference network without saying which of the two nets it was cut from (``train.py`` saves
both), so that is not determined; the default is the teacher (as in DINO, whose training
utilities the code uses), and the acceptance reports both.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.common import Run, seed_everything, worker_seed
from methods.rppg.data import LABELS, sample_clips
from methods.rppg.synth import DOMAINS
from methods.rppg.training import VideoSetConfig, train_loop

from .augment import CROPS, crop_size, two_views
from .losses import neg_pearson, sspd_losses
from .model import SSPDNet

NETS = ("teacher", "student")


@dataclass
class SSPDConfig(VideoSetConfig):
    supervised: bool = False
    label: str = "pulse"  # supervised only: pulse (zero delay) | label (delayed)
    epochs: int = 30  # one clip per training video per epoch (the code: 30)
    steps: int = 0  # 0: epochs x ceil(n_train / batch); else this many iterations of the same sampler
    batch: int = 12
    clip: int = 300  # frame differences per view (clip + 1 frames are drawn)
    lr: float = 1e-3
    width: int = 1  # channel-width divisor (1: the code's network)
    spatial_padding: bool = True  # pad space in the convs (frames smaller than 66 x 66)
    crop: str = "fixed"  # fixed | faithful (the code's top-left crop)
    keep: float = 0.7  # Bernoulli keep-probability of the masked difference
    eval_net: str = "teacher"  # teacher | student: the network tested (SSPD; supervised tests the student)
    domain: str = "wild"
    n_train: int = 30  # the code's 30 UBFC training subjects
    frames: int = 450  # 15-s training videos, so 301-frame clips start anywhere in 5 s
    test_frames: int = 300  # 10-s test videos, evaluated whole
    size: int = 36

    @property
    def iters_per_epoch(self) -> int:
        return -(-self.n_train // self.batch)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps > 0 else self.epochs * self.iters_per_epoch

    def batch_index(self, step: int) -> np.ndarray:
        """The training videos of iteration ``step``: epoch ``step // iters_per_epoch`` shuffles
        them (its own seed), iteration k of the epoch takes places [k B, (k + 1) B)."""
        epoch, k = divmod(step, self.iters_per_epoch)
        order = np.random.default_rng(worker_seed(self.seed, 4, epoch)).permutation(self.n_train)
        return order[k * self.batch : (k + 1) * self.batch]

    def check(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; choose from {sorted(DOMAINS)}")
        if self.eval_net not in NETS:
            raise ValueError(f"eval_net must be one of {NETS}, got {self.eval_net!r}")
        if self.batch < 2 or self.epochs < 1 or self.steps < 0:
            raise ValueError(
                f"need batch >= 2 (batch norm), epochs >= 1 and steps >= 0, got {self.batch}, "
                f"{self.epochs} and {self.steps}"
            )
        if not 32 <= self.clip < self.frames:
            raise ValueError(
                f"clip must be in [32, frames - 1 = {self.frames - 1}] (the S3M maps need time), got {self.clip}"
            )
        self.check_videos(self.clip + 1)


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
    x = (
        F.interpolate(
            video.float().transpose(1, 2).reshape(B * T1, C, H, W),
            size=(size, size),
            mode="bicubic",
            align_corners=False,
        )
        .reshape(B, T1, C, size, size)
        .transpose(1, 2)
    )
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
    return cfg.video_sets(cfg.domain)


def step_losses(
    cfg: SSPDConfig, student: SSPDNet, teacher: SSPDNet, clips: Dict[str, torch.Tensor], g: torch.Generator
) -> Dict[str, torch.Tensor]:
    if cfg.supervised:
        x = global_view(clips["video"], crop_size(cfg.size))
        y = student.predict(x)
        return {"loss": neg_pearson(y, clips["wave"][:, 1:])}
    online, target = two_views(clips["video"], g, cfg.crop, cfg.keep)
    y_o, maps_o = student(online)
    with torch.no_grad():
        y_t, maps_t = teacher(target)
    return sspd_losses(y_o, y_t, maps_o, maps_t, cfg.fs)


def train(
    cfg: SSPDConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = 50,
    data=None,
):
    """Returns (the test-time model ``Inference``, the test set)."""
    cfg.check()
    seed_everything(cfg.seed)
    train_set, test_set = data if data is not None else datasets(cfg)
    student = build(cfg).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=0.0)

    total = cfg.total_steps

    def step_fn(step, rng, counts):
        clips = {
            k: v.to(device)
            for k, v in sample_clips(
                train_set, cfg.batch, cfg.clip + 1, rng, cfg.label, flip=cfg.supervised, index=cfg.batch_index(step)
            ).items()
        }
        g = torch.Generator().manual_seed(worker_seed(cfg.seed, 3, step))
        terms = step_losses(cfg, student, teacher, clips, g)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(terms["loss"]):
            return None, f"non-finite loss ({float(terms['loss'].detach())})"
        terms["loss"].backward()
        opt.step()
        if not cfg.supervised:
            ema_update(teacher, student, momentum(step, total))
        return {k: v.detach() for k, v in terms.items()}, None

    student.train()
    teacher.train()  # batch statistics, as the code
    out = train_loop(
        run,
        asdict(cfg),
        {"student": student, "teacher": teacher, "opt": opt},
        total,
        cfg.seed,
        step_fn,
        desc="supervised" if cfg.supervised else "sspd",
        show_progress=show_progress,
        checkpoint_every=checkpoint_every,
        log_every=cfg.iters_per_epoch,
        row_extra=lambda step: {"epoch": step // cfg.iters_per_epoch, "momentum": momentum(step, total)},
        intro=lambda: (
            f"{'supervised' if cfg.supervised else 'SSPD (no labels)'} on {cfg.domain}: {len(train_set)} "
            f"training videos, {sum(p.numel() for p in student.parameters())} parameters "
            f"({sum(p.numel() for p in student.s3m.parameters())} in S3M)"
        ),
    )
    run.info(f"training done ({total} steps, {out['seconds']:.0f} s, {out['skipped']} skipped)")
    return Inference(teacher if resolve_net(cfg) == "teacher" else student, cfg.size), test_set


def resolve_net(cfg: SSPDConfig, net: Optional[str] = None) -> str:
    """The network a test evaluates: ``net``, by default ``cfg.eval_net``; a supervised run's is
    the student (its teacher never trains)."""
    which = net or ("student" if cfg.supervised else cfg.eval_net)
    if which not in NETS:
        raise ValueError(f"net must be one of {NETS}, got {which!r}")
    if cfg.supervised and which == "teacher":
        raise ValueError("a supervised run trains only the student; evaluate net='student'")
    return which


def load_model(path: str, device=torch.device("cpu"), net: Optional[str] = None):
    """(Inference model, SSPDConfig) from a run folder or a checkpoint file: the network ``net``
    (teacher | student; default: the run's ``eval_net``, the student for a supervised run)."""
    from methods.common import load_run_checkpoint

    state = load_run_checkpoint(path)
    # runs saved before the teacher became the default were tested with the student
    cfg = SSPDConfig(**{"eval_net": "student", **state["config"]})
    model = build(cfg).to(device)
    model.load_state_dict(state[resolve_net(cfg, net)])
    return Inference(model, cfg.size), cfg
