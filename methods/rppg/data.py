"""Sets of synthetic videos and the clips that training draws from them.

A ``VideoSet`` holds n videos of one domain as 8-bit frames with their label waves (delayed by
each video's label delay), the pulses the skin really carries (the zero-delay labels), heart
rates, delays and skin masks. A real dataset's set (``methods.rppg.datasets.load_split``) holds
the chunks of its recordings the same way (its frames memory-mapped from the cache, label and
pulse the same wave, delays 0). ``make_set`` builds one from a seed: video i of a set uses the
seed ``worker_seed(seed, i)``, so sets of different sizes share their first videos.
``sample_clips`` draws training clips (random start, random flips); ``evaluation_clips`` cuts whole
videos into clips for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from methods.common import worker_seed

from .synth import DOMAINS, Domain, synth_video

LABELS = ("label", "pulse")  # the delayed label wave, or the video's own pulse (zero delay)


@dataclass
class VideoSet:
    videos: np.ndarray  # (n, T, H, W, 3) uint8
    labels: np.ndarray  # (n, T) float32: the label waves, each behind its video by `delays`
    pulses: np.ndarray  # (n, T) float32: the pulses the videos carry (labels without delay)
    hr: np.ndarray  # (n,) realised heart rate, bpm
    delays: np.ndarray  # (n,) s
    masks: np.ndarray  # (n, H, W) bool skin masks
    domain: str
    fs: float
    # the label waves and pulses filtered over the whole video as the official code filters its labels
    # (``methods.rppg.scs.filter_label``): the SCS maps are built from clips of these
    scs_labels: Optional[np.ndarray] = None
    scs_pulses: Optional[np.ndarray] = None
    # the videos' names (real datasets: ``<recording>#<chunk>``, see ``methods.rppg.datasets``); None: synthetic
    names: Optional[List[str]] = None
    # the labels are first differences (a real dataset's ``--label-type diff-normalized``): the evaluation
    # integrates them (cumsum) before reading their heart rate, as the toolbox's ``diff_flag``
    diff_labels: bool = False

    def __post_init__(self):
        from .scs import filter_label

        if self.scs_labels is None:
            self.scs_labels = filter_label(self.labels, self.fs).astype(np.float32)
        if self.scs_pulses is None:
            self.scs_pulses = filter_label(self.pulses, self.fs).astype(np.float32)

    def __len__(self) -> int:
        return self.videos.shape[0]

    @property
    def frames(self) -> int:
        return self.videos.shape[1]

    def waves(self, which: str, filtered: bool = False) -> np.ndarray:
        """The delayed label waves (``"label"``) or the pulses (``"pulse"``); ``filtered``: as
        filtered for the SCS map."""
        if which not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {which!r}")
        if filtered:
            return self.scs_labels if which == "label" else self.scs_pulses
        return self.labels if which == "label" else self.pulses


def get_domain(domain: Union[str, Domain]) -> Domain:
    if isinstance(domain, Domain):
        return domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {sorted(DOMAINS)}")
    return DOMAINS[domain]


def make_set(
    n: int, frames: int = 300, size: int = 36, domain: Union[str, Domain] = "default", seed: int = 0, fs: float = 30.0
) -> VideoSet:
    """n synthetic videos of ``frames`` frames at ``size`` x ``size`` from one domain."""
    dom = get_domain(domain)
    if n < 1:
        raise ValueError(f"domain {dom.name!r}: a video set needs at least 1 video, got n={n}")
    vids = [synth_video(frames, size, fs, dom, seed=worker_seed(seed, i)) for i in range(n)]
    return VideoSet(
        videos=np.stack([np.round(v["video"] * 255).astype(np.uint8) for v in vids]),
        labels=np.stack([v["label"] for v in vids]),
        pulses=np.stack([v["pulse"] for v in vids]),
        hr=np.array([v["hr"] for v in vids]),
        delays=np.array([v["delay"] for v in vids]),
        masks=np.stack([v["mask"] for v in vids]),
        domain=dom.name,
        fs=fs,
    )


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 in 0..255 (the backbones' input)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 4, 1, 2, 3).float()


def sample_clips(
    vs: VideoSet,
    batch: int,
    length: int,
    rng: np.random.Generator,
    label: str = "label",
    flip: bool = True,
    index: Optional[np.ndarray] = None,
) -> Dict[str, torch.Tensor]:
    """``batch`` clips of ``length`` frames from random videos (or the videos ``index``) at random
    starts, each flipped horizontally / vertically with probability 1/2 (mask too):
    video (B, 3, L, H, W) 0..255, wave (B, L), scs_wave (B, L) (the same samples of the wave
    filtered over the whole video, for the SCS map), mask (B, H, W), hr (B,), video index (B,)."""
    if length > vs.frames:
        raise ValueError(f"clips of {length} frames from videos of {vs.frames} frames")
    idx = rng.integers(0, len(vs), batch) if index is None else np.asarray(index)
    start = rng.integers(0, vs.frames - length + 1, len(idx))
    waves, filtered = vs.waves(label), vs.waves(label, filtered=True)
    v = np.stack([vs.videos[i, s : s + length] for i, s in zip(idx, start)])
    m = vs.masks[idx].copy()
    if flip:
        for b in range(len(idx)):
            if rng.random() < 0.5:
                v[b], m[b] = v[b, :, :, ::-1], m[b, :, ::-1]
            if rng.random() < 0.5:
                v[b], m[b] = v[b, :, ::-1], m[b, ::-1]
    w = np.stack([waves[i, s : s + length] for i, s in zip(idx, start)])
    wf = np.stack([filtered[i, s : s + length] for i, s in zip(idx, start)])
    return {
        "video": _to_tensor(v),
        "wave": torch.from_numpy(w),
        "scs_wave": torch.from_numpy(wf),
        "mask": torch.from_numpy(m),
        "hr": torch.from_numpy(vs.hr[idx]),
        "index": torch.from_numpy(idx),
    }


def evaluation_clips(vs: VideoSet, length: int = 0, label: str = "label"):
    """Non-overlapping clips of ``length`` frames (0: whole videos), video by video: yields
    dicts like ``sample_clips`` with B = 1."""
    L = vs.frames if length <= 0 else length
    if L > vs.frames:
        raise ValueError(f"test clips of {L} frames from videos of {vs.frames} frames")
    waves, filtered = vs.waves(label), vs.waves(label, filtered=True)
    for i in range(len(vs)):
        for s in range(0, vs.frames - L + 1, L):
            yield {
                "video": _to_tensor(vs.videos[i : i + 1, s : s + L]),
                "wave": torch.from_numpy(waves[i : i + 1, s : s + L]),
                "scs_wave": torch.from_numpy(filtered[i : i + 1, s : s + L]),
                "mask": torch.from_numpy(vs.masks[i : i + 1]),
                "hr": torch.from_numpy(vs.hr[i : i + 1]),
                "index": torch.tensor([i]),
            }


__all__ = ["LABELS", "VideoSet", "get_domain", "make_set", "sample_clips", "evaluation_clips"]
