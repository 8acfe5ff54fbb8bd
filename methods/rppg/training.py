"""Training plumbing the rPPG methods (BYHE, DOHA, SSPD) share:

* ``VideoSetConfig``: the video-set fields of every trainer's config (training / test videos,
  frames, frame size, sampling rate, seed) and the seeded sets built from them;
* ``cosine`` and ``set_schedule``: the official code's per-step cosine schedules (learning rate
  falling, weight decay rising);
* ``SCS_TRIM``, ``scs_target``, ``wave_target``: the targets a clip gives a map model and a wave
  model, aligned with their outputs;
* ``train_loop``: the loop skeleton: resume from the run folder's checkpoint, one seeded clip draw
  per step, a step that reports a non-finite loss is skipped and logged, the loss terms averaged
  into a metrics row every ``log_every`` steps, checkpoints (the running counters and the terms of
  the steps since the last row included, so a resumed run logs the same rows).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch

from methods.common import Run, progress, worker_seed

from .data import VideoSet, make_set
from .scs import scs_label

SCS_TRIM = 12  # label samples dropped at both ends before the Hilbert transform: N = L - 25 (spec 1.1)


@dataclass
class VideoSetConfig:
    """The video-set fields of an rPPG trainer's config. ``test_frames`` 0: as long as the
    training videos."""

    n_train: int = 48
    n_test: int = 16
    frames: int = 300
    test_frames: int = 0
    size: int = 36
    fs: float = 30.0
    seed: int = 0

    @property
    def test_length(self) -> int:
        return self.test_frames or self.frames

    def check_videos(self, clip: int) -> None:
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(
                f"need at least 1 training and 1 test video, got n_train={self.n_train}, n_test={self.n_test}"
            )
        if self.frames < 40 or (self.test_frames != 0 and self.test_frames < 40):
            raise ValueError(
                f"videos need at least 40 frames (the label filter), got frames={self.frames}, "
                f"test_frames={self.test_frames}"
            )
        if clip > self.frames:
            raise ValueError(f"clip must be at most frames={self.frames}, got {clip}")

    def video_sets(self, domain: str) -> Tuple[VideoSet, VideoSet]:
        """(training, test) sets of one domain, from disjoint seeds."""
        train = make_set(self.n_train, self.frames, self.size, domain, seed=worker_seed(self.seed, 0), fs=self.fs)
        return train, self.test_set(domain)

    def test_set(self, domain: str, n: Optional[int] = None, seed: Optional[int] = None) -> VideoSet:
        seed = self.seed if seed is None else seed
        return make_set(
            self.n_test if n is None else n, self.test_length, self.size, domain, seed=worker_seed(seed, 1), fs=self.fs
        )

    def domain_set(self, domain: str, role: int, n: int, frames: int) -> VideoSet:
        """A set of one of several domains: the seed depends on the domain's name and the role
        (0 training, 1 test), so the domains' videos differ."""
        return make_set(
            n,
            frames,
            self.size,
            domain,
            fs=self.fs,
            seed=worker_seed(self.seed, role, sum(map(ord, domain)) * 131 + len(domain)),
        )


def cosine(step: int, total: int, start: float, end: float) -> float:
    """start -> end along half a cosine over ``total`` steps."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def set_schedule(
    opt: torch.optim.Optimizer, step: int, total: int, lr: Tuple[float, float], weight_decay: Tuple[float, float]
) -> None:
    """The official BYHE / DOHA schedules, per step: the learning rate falls along a cosine from
    lr[0] to lr[1], the weight decay rises along one from weight_decay[0] to weight_decay[1]."""
    for g in opt.param_groups:
        g["lr"] = cosine(step, total, *lr)
        g["weight_decay"] = cosine(step, total, *weight_decay)


def wave_target(wave: torch.Tensor, n_out: int) -> torch.Tensor:
    """The label samples aligned with TSCANWave's output (``backbones.WAVE_OFFSET``)."""
    from .backbones import WAVE_OFFSET

    return wave[:, WAVE_OFFSET : WAVE_OFFSET + n_out]


def scs_target(clips: Mapping[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The SCS map of a batch of clips, from their label filtered over the whole video
    (``scs_wave``), as the official preprocessing does: (B, L - 25, L - 25)."""
    return scs_label(clips["scs_wave"], mode, trim=SCS_TRIM)


StepFn = Callable[[int, np.random.Generator, Dict[str, int]], Tuple[Optional[Dict[str, float]], Optional[str]]]


def train_loop(
    run: Run,
    config: Dict,
    objects: Mapping,
    steps: int,
    seed: int,
    step_fn: StepFn,
    *,
    desc: str,
    show_progress: bool = True,
    checkpoint_every: int = 100,
    log_every: int = 25,
    counters: Iterable[str] = (),
    row_extra: Optional[Callable[[int], Dict]] = None,
    intro: Optional[Callable[[], str]] = None,
) -> Dict:
    """Run ``step_fn(step, rng, counts)`` for the steps not yet done. ``rng`` is the step's own
    generator (``worker_seed(seed, 2, step)``: the clip draw does not depend on where a run
    resumed); ``counts`` holds ``skipped`` and the ``counters`` (the step may add to them).
    ``step_fn`` returns (terms, None) after its update, or (None, why) when it skipped it.
    ``objects`` (name -> object with ``state_dict``) are checkpointed and restored by name.
    Returns {"seconds": training time, **counts}."""
    state = run.resume(config, **objects)
    start = state["step"] + 1 if state else 0
    if state is None and intro is not None:
        run.info(intro())
    state = state or {}
    seconds = state.get("seconds", 0.0)
    acc = state.get("acc", {})
    counts = {k: state.get(k, 0) for k in ("skipped", *counters)}
    bar = progress(range(start, steps), enabled=show_progress, desc=desc, unit="step", total=steps, initial=start)
    t0 = time.perf_counter()
    for step in bar:
        rng = np.random.default_rng(worker_seed(seed, 2, step))
        terms, why = step_fn(step, rng, counts)
        if why is not None:
            counts["skipped"] += 1
            run.warning(f"step {step}: {why}, step skipped")
        else:
            for k, v in terms.items():
                acc.setdefault(k, []).append(float(v))
        last = step + 1 == steps
        if (step + 1) % log_every == 0 or last:
            row = {
                "step": step,
                **{k: float(np.mean(v)) for k, v in acc.items()},
                **counts,
                **(row_extra(step) if row_extra else {}),
                "seconds": seconds + time.perf_counter() - t0,
            }
            run.log_metrics(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}")
            acc = {}
        if (step + 1) % checkpoint_every == 0 or last:
            run.checkpoints.save(
                step,
                {
                    **{k: o.state_dict() for k, o in objects.items()},
                    "config": config,
                    "seconds": seconds + time.perf_counter() - t0,
                    "acc": acc,
                    **counts,
                },
            )
    return {"seconds": seconds + time.perf_counter() - t0, **counts}


__all__ = ["SCS_TRIM", "StepFn", "VideoSetConfig", "cosine", "scs_target", "set_schedule", "train_loop", "wave_target"]
