"""SSPD's physical-prior embedded augmentation (spec 2.1): two views of the same span of T + 1
frames, both as raw frame differences (no intensity normalisation; the network starts with
BatchNorm).

* online ("local", masked difference): a c x c crop (c = round(128 / 151 of the frame), as the
  code's 128 of 151), independent horizontal / vertical flips (p = 1/2, whole clip), frame
  differences, and a Bernoulli(0.7) keep-mask per (t, h, w) shared by the colour channels;
* target ("global", original difference): the whole frame resized to c x c (bicubic), its own
  flips, frame differences, no mask.

``crop="fixed"`` draws the crop's offset at random; ``crop="faithful"`` keeps the code's
default-argument bug, which always takes the top-left corner.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

CROPS = ("fixed", "faithful")
KEEP = 0.7  # the code's Bernoulli keep-probability of the masked difference


def crop_size(size: int) -> int:
    return max(1, int(round(size * 128 / 151)))


def _draw_flips(g: torch.Generator) -> Tuple[bool, bool]:
    """(along W, along H), each with probability 1/2 (drawn in that order)."""
    along_w = bool(torch.rand((), generator=g) < 0.5)
    along_h = bool(torch.rand((), generator=g) < 0.5)
    return along_w, along_h


def _apply_flips(x: torch.Tensor, along_w: bool, along_h: bool) -> torch.Tensor:
    """x (..., H, W) flipped along W, then along H, as drawn."""
    if along_w:
        x = x.flip(-1)
    if along_h:
        x = x.flip(-2)
    return x


def two_views(
    frames: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    crop: str = "fixed",
    keep: float = KEEP,
    rows: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """frames (B, 3, T + 1, S, S) (0..255) -> (online, target), each (B, 3, T, c, c). ``rows``
    (start, stop): only those clips' views, (stop - start, 3, T, c, c), with the random draws of
    the whole batch (a DDP rank's share of the views of the global batch: the draws of every clip
    advance the generator as they do in one process)."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if frames.dim() != 5 or frames.shape[1] != 3 or frames.shape[2] < 2:
        raise ValueError(f"frames must be (B, 3, T + 1, S, S) with T >= 1, got {tuple(frames.shape)}")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    g = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    B, _, T1, H, W = frames.shape
    start, stop = (0, B) if rows is None else rows
    if not 0 <= start < stop <= B:
        raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= {B}, got {rows}")
    c = crop_size(min(H, W))
    online, target = [], []
    for b in range(B):  # every clip's draws, in the one-process order; the views of the clips in rows
        mine = start <= b < stop
        x = frames[b].float()
        if crop == "fixed":
            i = int(torch.randint(H - c + 1, (), generator=g))
            j = int(torch.randint(W - c + 1, (), generator=g))
        else:
            i = j = 0
        flips = _draw_flips(g)
        mask = torch.rand((1, T1 - 1, c, c), generator=g) < keep
        if mine:
            o = _apply_flips(x[:, :, i : i + c, j : j + c], *flips)
            o = o[:, 1:] - o[:, :-1]
            online.append(o * mask.to(o.dtype))
        flips = _draw_flips(g)
        if mine:
            t = F.interpolate(x.transpose(0, 1), size=(c, c), mode="bicubic", align_corners=False).transpose(0, 1)
            t = _apply_flips(t, *flips)
            target.append(t[:, 1:] - t[:, :-1])
    return torch.stack(online), torch.stack(target)
