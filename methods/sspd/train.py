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
A larger ``epochs`` (or ``steps``) continues a finished run: epoch e's order of the videos
depends on (seed, e) only, so the new epochs draw as a longer run would; the EMA momentum is a
cosine over the total steps, so the continued run follows the cosine of the new total from the
step it resumes at (the momentum drops back below 1 there: not the run a start with that budget
would have made). Under torchrun (DDP) ``batch`` is the global batch: every process draws the
same clips and views (the augmentations' draws of the whole batch) and keeps its share; batch
norm (student and teacher) runs over the global batch. The result equals one process's up to
float rounding.

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
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.common import (
    DistInfo,
    Run,
    arg,
    budget_fields,
    convert_batchnorm,
    dist_info,
    prepare_ddp,
    seed_everything,
    shard,
    shard_bounds,
    worker_seed,
)
from methods.rppg.data import LABELS, sample_clips
from methods.rppg.synth import DOMAINS
from methods.rppg.training import (
    SingleSourceConfig,
    all_finite,
    config_record,
    describe_set,
    global_mean,
    recorded_config,
    train_loop,
)

from .augment import CROPS, KEEP, crop_size, two_views
from .losses import neg_pearson, sspd_losses
from .model import SSPDNet

DOMAIN_NAMES = ", ".join(sorted(DOMAINS))
NETS = ("teacher", "student")


@dataclass
class SSPDConfig(SingleSourceConfig):
    supervised: bool = arg(False, "negative Pearson on the labels instead of SSPD (the supervised reference)")
    label: str = arg(
        "pulse", "--supervised: pulse (the videos' own pulses, zero delay) or label (delayed)", choices=LABELS
    )
    epochs: int = arg(30, "epochs: one clip per training video each (the code: 30)", budget=True)
    steps: int = arg(
        0, "iterations (0: epochs x ceil(n_train / batch); else this many of the same sampler)", budget=True
    )
    batch: int = arg(12, "clips per step (the global batch under torchrun: each process takes its share)")
    clip: int = arg(300, "frame differences per view (clip + 1 frames are drawn)")
    lr: float = arg(1e-3, "learning rate (Adam, constant)")
    width: int = arg(1, "channel-width divisor (1: the code's network)")
    spatial_padding: bool = arg(
        True, "pad space in the convs, for frames smaller than 66 x 66 (--no-spatial-padding: the code's time-only)"
    )
    crop: str = arg(
        "fixed", "fixed: a random crop of the online view; faithful: the code's top-left one", choices=CROPS
    )
    keep: float = arg(KEEP, "Bernoulli keep-probability of the masked difference")
    eval_net: str = arg(
        "teacher",
        "the SSPD network tested: the EMA teacher (batch-norm statistics of the unmasked view) or the student (of "
        "the masked view); a supervised run tests the student",
        choices=NETS,
    )
    domain: str = arg(
        "wild", f"synthetic domain (--dataset synthetic): {DOMAIN_NAMES}", choices=sorted(DOMAINS), metavar="DOMAIN"
    )
    n_train: int = arg(
        30,
        "training videos (the code's 30 UBFC training subjects; a real dataset: its training chunks, set on loading)",
    )
    frames: int = arg(450, "frames per training video (15 s: 301-frame clips start anywhere in 5 s)")
    test_frames: int = arg(300, "frames per test video (10 s, evaluated whole; 0: as the training videos)")

    @property
    def iters_per_epoch(self) -> int:
        return -(-self.n_train // self.batch)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps > 0 else self.epochs * self.iters_per_epoch

    @property
    def batch_sizes(self) -> Tuple[int, ...]:
        """The sizes of an epoch's batches that occur: ``batch``, and the smaller last one."""
        full = min(self.batch, self.n_train)
        last = self.n_train - (self.iters_per_epoch - 1) * self.batch
        return (full,) if last == full else (full, last)

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

    def regresses_wave(self) -> bool:
        return self.supervised


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


def datasets(cfg: SSPDConfig, warn=None, info=None):
    """(train, test) video sets: synthetic ones of one domain, or a real dataset's split
    (``--dataset``, ``--test-dataset``: ``methods.rppg.datasets``)."""
    return cfg.video_sets(cfg.domain, warn, info)


def step_losses(
    cfg: SSPDConfig,
    student: nn.Module,
    teacher: SSPDNet,
    clips: Dict[str, torch.Tensor],
    g: torch.Generator,
    info: DistInfo = DistInfo(),
) -> Dict[str, torch.Tensor]:
    """The step's loss terms on this rank's share of the global batch ``clips`` (all of it in
    one process): the views are drawn for the global batch (``g``), then cut to the share.
    ``student``: the network called for the gradient (supervised: its prediction path, see
    ``Predict``; under DDP, wrapped)."""
    if cfg.supervised:
        x = global_view(shard(clips["video"], info), crop_size(cfg.size))
        y = student(x)
        return {"loss": neg_pearson(y, shard(clips["wave"], info)[:, 1:])}
    rows = shard_bounds(clips["video"].shape[0], info)
    online, target = two_views(clips["video"], g, cfg.crop, cfg.keep, rows=rows)
    y_o, maps_o = student(online)
    with torch.no_grad():
        y_t, maps_t = teacher(target)
    return sspd_losses(y_o, y_t, maps_o, maps_t, cfg.fs)


class Predict(nn.Module):
    """The supervised training's forward: ``net.predict`` (backbone + predictor, end to end) as a
    module's ``forward``, so that DDP sees it."""

    def __init__(self, net: SSPDNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.predict(x)


SCHEDULES = "the EMA momentum (a cosine over the total steps)"
CHECKPOINT_EVERY = 10  # steps: 9 checkpoints in a default run of 90 steps (30 epochs of 3)


def train(
    cfg: SSPDConfig,
    run: Run,
    device=torch.device("cpu"),
    show_progress: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    data=None,
):
    """Returns (the test-time model ``Inference``, the test set). Under torchrun (a process group
    started) every rank draws the global batch and its views and trains on its share (the
    student through DDP; batch norm over the global batch in the student and the teacher)."""
    cfg.check()
    info = dist_info()
    train_set = test_set = None
    if data is not None:
        train_set, test_set = data
    elif cfg.uses_real_data():
        train_set, test_set = datasets(cfg, run.warning, run.info)
    if train_set is not None and train_set.names is not None and cfg.n_train != len(train_set):
        # a real dataset: an epoch draws one clip from each of its training chunks
        cfg = dataclasses.replace(cfg, n_train=len(train_set))
    for n in cfg.batch_sizes:
        if n % info.world_size:
            raise ValueError(
                f"--batch {cfg.batch} with --n-train {cfg.n_train} makes batches of {' and '.join(map(str, cfg.batch_sizes))} "
                f"clips; each must be divisible by the {info.world_size} processes of torchrun"
            )
    seed_everything(cfg.seed)
    if train_set is None:
        train_set, test_set = datasets(cfg, run.warning, run.info)
    student = build(cfg).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.supervised and info.enabled:  # S3M gets no gradient there: DDP must not wait for one
        for p in student.s3m.parameters():
            p.requires_grad_(False)
    net = prepare_ddp(Predict(student) if cfg.supervised else student, device)
    if info.enabled:
        convert_batchnorm(teacher)
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
        terms = step_losses(cfg, net, teacher, clips, g, info)
        opt.zero_grad(set_to_none=True)
        if not all_finite(terms["loss"]):
            return None, f"non-finite loss ({float(global_mean(terms['loss']))})"
        terms["loss"].backward()
        opt.step()
        if not cfg.supervised:
            ema_update(teacher, student, momentum(step, total))
        return {k: v.detach() for k, v in terms.items()}, None

    student.train()
    teacher.train()  # batch statistics, as the code
    out = train_loop(
        run,
        config_record(cfg),
        {"student": student, "teacher": teacher, "opt": opt},
        total,
        cfg.seed,
        step_fn,
        desc="supervised" if cfg.supervised else "sspd",
        show_progress=show_progress,
        checkpoint_every=checkpoint_every,
        budget=budget_fields(SSPDConfig),
        schedules=SCHEDULES,
        videos=train_set.names,
        log_every=cfg.iters_per_epoch,
        row_extra=lambda step: {"epoch": step // cfg.iters_per_epoch, "momentum": momentum(step, total)},
        intro=lambda: (
            f"{'supervised' if cfg.supervised else 'SSPD (no labels)'} on "
            + (
                f"{cfg.domain}: {len(train_set)} training videos"
                if train_set.names is None
                else f"{train_set.domain}: {describe_set(train_set, 'training')}"
            )
            + f", {sum(p.numel() for p in student.parameters())} parameters "
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
    from methods.common import config_from_checkpoint, load_run_checkpoint

    state = load_run_checkpoint(path)
    # runs saved before the teacher became the default were tested with the student
    cfg = config_from_checkpoint(SSPDConfig, {"eval_net": "student", **(recorded_config(state) or {})}, path)
    model = build(cfg).to(device)
    model.load_state_dict(state[resolve_net(cfg, net)])
    return Inference(model, cfg.size), cfg
