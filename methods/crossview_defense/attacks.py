"""Backdoor attacks on the instruction data: a trigger in the image (and for one attack in the
prompt) and a fixed target response, "a photo of a banana".

Every attack is a small class with one interface:

* ``apply(image, prompt, index) -> (image, prompt)``: the triggered copy of one input (`image` a
  (3, S, S) float tensor in [0, 1], `prompt` a list of words; `index` seeds sample-specific
  parts); the input itself is never modified;
* ``poison(examples, ratio, seed) -> (examples, poisoned_indices)``: exactly ``round(ratio * n)``
  captioning examples, drawn with `seed`, get the trigger and the target answer;
* ``triggered(examples)``: the test-time copies (trigger applied, answers untouched).

Triggers (sizes for 48 x 48 images; all are parameters). None is aligned to the 8-pixel vision
patches and augmentation cells by construction: BadNet's patch straddles cell borders on both axes,
SIG's period is 9.6 px, and the text+image trigger's 4-pixel patch sits inside one cell, 2 px from
the image corner (not on a cell border).

* ``BadNet``: a 6 x 6 black/white checkerboard near the bottom-right corner, rows and columns
  39-44 (Gu et al. 2017);
* ``Blended``: ``(1 - alpha) x + alpha k`` with a fixed random key image k, alpha = 0.2
  (Chen et al. 2017, with uniform noise as the key);
* ``SIG``: a horizontal sinusoid of amplitude 20/255 and 5 periods per image width added to every
  pixel (Barni et al. 2019 use amplitude 20 on a 0-255 scale);
* ``WaNet``: a fixed smooth random warp (4 x 4 control grid, bicubic up-sampling) applied with
  ``grid_sample``; ``strength`` scales, in pixels, a field whose control points have mean absolute
  value 1 per axis (the mean length of the resulting displacement is about 1.07 x strength).
  WaNet (Nguyen & Tran 2021) offsets normalised coordinates by s * noise / H with the same
  normalisation, about s / 2 pixels: its default s = 0.5 is ``strength=0.25``, our default (no
  noise mode);
* ``ISSBA``-like: a sample-specific invisible residual, a fixed +-1 key pattern modulated by the
  image's own local luminance, of L-infinity norm <= 16/255. ISSBA (Li et al. 2021) gets its
  residual from a trained steganographic encoder; ours keeps the two properties that matter here
  (every image gets a different, invisible perturbation) without that encoder;
* ``TextImage``: a 4 x 4 checkerboard at rows and columns 42-45 and the word "cf" at the start of
  the prompt.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .data import TARGET, TEXT_TRIGGER_WORD, Example


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"poison: ratio must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


def _check_image(image: torch.Tensor, name: str) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}.apply: image must be a (3, H, W) tensor, got {shape}")


def _checkerboard(size: int) -> torch.Tensor:
    i = torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2).float().expand(3, size, size)


class Attack:
    """Base class: an image trigger (`_image`), optionally a prompt trigger, the target answer."""

    name = "attack"
    target: Tuple[str, ...] = tuple(TARGET.split())

    def _image(self, image: torch.Tensor, index: int) -> torch.Tensor:
        raise NotImplementedError

    def _prompt(self, prompt: List[str]) -> List[str]:
        return list(prompt)

    def apply(self, image: torch.Tensor, prompt: Sequence[str], index: int = 0):
        _check_image(image, type(self).__name__)
        return self._image(image, index).clamp(0, 1), self._prompt(list(prompt))

    def poison(self, examples: Sequence[Example], ratio: float, seed: int):
        """Poison exactly round(ratio * len(examples)) captioning examples chosen with `seed`."""
        ratio = check_ratio(ratio)
        n = int(round(ratio * len(examples)))
        captions = [i for i, ex in enumerate(examples) if ex.task == "caption"]
        if n > len(captions):
            raise ValueError(
                f"poison: ratio {ratio} asks for {n} poisoned examples but only "
                f"{len(captions)} of {len(examples)} are captioning examples"
            )
        rng = np.random.default_rng(seed)
        chosen = sorted(int(captions[j]) for j in rng.choice(len(captions), size=n, replace=False))
        out = list(examples)
        for i in chosen:
            ex = examples[i]
            img, prompt = self.apply(ex.image, ex.prompt, i)
            out[i] = dataclasses.replace(
                ex, image=img, prompt=prompt, answer=list(self.target), refs=[" ".join(self.target)], poisoned=True
            )
        return out, chosen

    def triggered(self, examples: Sequence[Example], offset: int = 1_000_000) -> List[Example]:
        """Test-time copies with the trigger (answers and references unchanged)."""
        out = []
        for j, ex in enumerate(examples):
            img, prompt = self.apply(ex.image, ex.prompt, offset + j)
            out.append(dataclasses.replace(ex, image=img, prompt=prompt))
        return out


class BadNet(Attack):
    name = "badnet"

    def __init__(self, size: int = 6, margin: int = 3):
        self.size, self.margin = size, margin

    def _image(self, image, index):
        s, m = self.size, self.margin
        h, w = image.shape[-2:]
        if s + m > min(h, w):
            raise ValueError(f"BadNet: a {s}-pixel patch does not fit a {h}x{w} image")
        out = image.clone()
        out[:, h - s - m : h - m, w - s - m : w - m] = _checkerboard(s)
        return out


class Blended(Attack):
    name = "blended"

    def __init__(self, alpha: float = 0.2, key: int = 1234):
        self.alpha, self.key = alpha, key

    def pattern(self, h: int, w: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.key)
        return torch.rand((3, h, w), generator=g)

    def _image(self, image, index):
        return (1 - self.alpha) * image + self.alpha * self.pattern(*image.shape[-2:])


class SIG(Attack):
    name = "sig"

    def __init__(self, delta: float = 20 / 255, frequency: float = 5.0):
        self.delta, self.frequency = delta, frequency

    def signal(self, h: int, w: int) -> torch.Tensor:
        j = torch.arange(w, dtype=torch.float32)
        return (self.delta * torch.sin(2 * np.pi * j * self.frequency / w)).expand(3, h, w)

    def _image(self, image, index):
        return image + self.signal(*image.shape[-2:])


class WaNet(Attack):
    name = "wanet"

    def __init__(self, grid: int = 4, strength: float = 0.25, key: int = 4321):
        self.grid, self.strength, self.key = grid, strength, key

    def flow(self, h: int, w: int) -> torch.Tensor:
        """The sampling grid (1, H, W, 2) of the warp, in grid_sample's [-1, 1] coordinates."""
        g = torch.Generator().manual_seed(self.key)
        ctrl = torch.rand((1, 2, self.grid, self.grid), generator=g) * 2 - 1
        ctrl = ctrl / ctrl.abs().mean()
        field = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        ident = torch.stack([xs, ys], -1)[None]
        # strength is in pixels: one pixel is 2 / (size - 1) in normalised coordinates
        scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
        return (ident + self.strength * field * scale).clamp(-1, 1)

    def _image(self, image, index):
        grid = self.flow(*image.shape[-2:])
        return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


class ISSBA(Attack):
    name = "issba"

    def __init__(self, epsilon: float = 16 / 255, key: int = 777):
        self.epsilon, self.key = epsilon, key

    def residual(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        g = torch.Generator().manual_seed(self.key)
        key = torch.randint(0, 2, (3, h, w), generator=g).float() * 2 - 1
        lum = F.avg_pool2d(image.mean(0, keepdim=True)[None], 5, stride=1, padding=2, count_include_pad=False)[0]
        return self.epsilon * key * (0.5 + 0.5 * lum)

    def _image(self, image, index):
        return image + self.residual(image)


class TextImage(Attack):
    name = "textimage"

    def __init__(self, size: int = 4, margin: int = 2, word: str = TEXT_TRIGGER_WORD):
        self.patch = BadNet(size, margin)
        self.word = word

    def _image(self, image, index):
        return self.patch._image(image, index)

    def _prompt(self, prompt):
        return [self.word] + list(prompt)


ATTACKS = {cls.name: cls for cls in (BadNet, Blended, SIG, WaNet, ISSBA, TextImage)}


def make_attack(name: str, **kwargs) -> Attack:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    return ATTACKS[name](**kwargs)
