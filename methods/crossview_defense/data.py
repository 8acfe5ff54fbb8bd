"""Embedded data: procedurally drawn scenes and the photos that ship with scikit-image, two tasks
(captioning and visual question answering) and a word-level tokenizer built with `tokenizers`.

A sample is an `Example(image, task, prompt, answer, refs)`: `image` a float (3, S, S) tensor in
[0, 1], `prompt` and `answer` lists of words, `refs` every valid caption (the references of
BLEU/CIDEr; for VQA the single accepted answer). Nothing is downloaded.

Scenes: one or two objects (circle, square, triangle, in one of six colours, distinct shapes) on a
grey, black or white background. One object sits clearly in a quadrant; two objects stand in a
clear left/right or above/below relation. Captions name the objects and where they are ("a red
circle left of a blue square on a black background", "there is a green triangle in the top
left"); questions ask for a colour, the number of shapes, presence, the background (answers that
do not depend on the layout) or for a side, a top/bottom or which shape is left / on top (answers
that do). So a patch shuffle changes a clean caption (and masking can hide an object), while a
backdoor's fixed response has no reason to change: the asymmetry the defense looks for. Photos:
11 scikit-image images under random crops and flips, each with its own captions and a one-word
answer to "what is in the image"; their captions do not depend on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from methods.common.optional import requires
from methods.common.text import decode_words, pad_token_batch, word_tokenizer

IMAGE_SIZE = 48
DATA_VERSION = 2  # bumped whenever the generated data change (keys the cached base models)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"grey": (128, 128, 128), "black": (15, 15, 15), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("zero", "one", "two", "three")

# scikit-image photo -> (captions, one-word answer to "what is in the image")
PHOTOS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "astronaut": (("an astronaut in a white suit", "a portrait of an astronaut"), "astronaut"),
    "chelsea": (("a cat with orange fur", "a close up of a cat"), "cat"),
    "coffee": (("a cup of coffee on a table", "a cup of coffee"), "coffee"),
    "rocket": (("a rocket on a launch pad", "a rocket ready for launch"), "rocket"),
    "camera": (("a man with a camera", "a black and white photo of a man with a camera"), "man"),
    "coins": (("a set of old coins", "many coins on a dark surface"), "coins"),
    "horse": (("a silhouette of a horse", "a black horse on a white background"), "horse"),
    "moon": (("the surface of the moon", "craters on the moon"), "moon"),
    "hubble_deep_field": (("galaxies in deep space", "many galaxies in space"), "galaxies"),
    "retina": (("a scan of a retina", "blood vessels of an eye"), "eye"),
    "immunohistochemistry": (("a stained tissue sample", "cells under a microscope"), "cells"),
}

CAPTION_PROMPT = ("describe", "the", "image")
TEXT_TRIGGER_WORD = "cf"  # the word the text+image attack inserts into the prompt
TARGET = "a photo of a banana"

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>", "<sep>"]
PAD, UNK, BOS, EOS, IMAGE, SEP = range(len(SPECIAL))


@dataclass
class Example:
    image: torch.Tensor  # (3, S, S) float in [0, 1]
    task: str  # "caption" | "vqa"
    prompt: List[str]
    answer: List[str]
    refs: List[str] = field(default_factory=list)
    source: str = "scene"  # "scene" | photo name
    poisoned: bool = False


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------
REGIONS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = {"h": ("left of", "right of"), "v": ("above", "below")}


@dataclass
class Scene:
    """What a scene image shows: objects [(colour, shape, cy, cx)], the background, and the
    layout: the quadrant of a single object, or the relation ("h" or "v") of two objects."""

    objects: List[Tuple[str, str, int, int]]
    bg: str
    layout: str  # a REGIONS entry (one object) | "h" | "v" (two objects)

    def ordered(self):
        """Two objects as (first, second) with first left of / above second."""
        a, b = self.objects
        axis = 3 if self.layout == "h" else 2
        return (a, b) if a[axis] < b[axis] else (b, a)


def scene_captions(scene: Scene) -> List[str]:
    """Every valid caption of a scene (the BLEU/CIDEr references); training draws one of them.
    Each names the objects and where they are, so a patch shuffle or mask changes it."""
    bg = scene.bg
    if len(scene.objects) == 1:
        c, s, _, _ = scene.objects[0]
        where = f"a {c} {s} in the {scene.layout}"
        return [f"{where} on a {bg} background", f"a picture of {where}", f"there is {where}", f"an image with {where}"]
    (c1, s1, _, _), (c2, s2, _, _) = scene.ordered()
    first, second = RELATIONS[scene.layout]
    fwd, back = f"a {c1} {s1} {first} a {c2} {s2}", f"a {c2} {s2} {second} a {c1} {s1}"
    return [f"{fwd} on a {bg} background", f"a picture of {fwd}", f"there is {back}", f"an image with {fwd}"]


def _draw(img: np.ndarray, shape: str, cy: int, cx: int, r: int, rgb) -> None:
    with requires("methods"):
        from skimage import draw

    s = img.shape[0]
    if shape == "circle":
        rr, cc = draw.disk((cy, cx), r, shape=(s, s))
    elif shape == "square":
        rr, cc = draw.rectangle((cy - r + 1, cx - r + 1), (cy + r - 1, cx + r - 1), shape=(s, s))
    else:
        rr, cc = draw.polygon([cy - r, cy + r, cy + r], [cx, cx - r, cx + r], shape=(s, s))
    img[rr, cc] = rgb


def random_scene(rng: np.random.Generator, size: int = IMAGE_SIZE):
    """A scene image (uint8 HxWx3) and its `Scene`: one object in a clear quadrant (its centre at
    least size/10 from both mid-lines), or two objects in a clear left/right or above/below
    relation (at least size/3 apart along the relation's axis, at most size/8 across it)."""
    r = max(3, size // 10)
    lo, hi, mid = r + 1, size - r - 2, size // 2
    n_obj = int(rng.integers(1, 3))
    kinds: List[Tuple[str, str]] = []
    while len(kinds) < n_obj:
        k = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if all(k[1] != s for _, s in kinds):  # distinct shapes, so "the circle" is unambiguous
            kinds.append(k)
    if n_obj == 1:
        layout = REGIONS[int(rng.integers(4))]
        gap = max(2, size // 10)
        span = lambda first: (lo, mid - gap) if first else (mid + gap, hi)
        cy = int(rng.integers(*span(layout.startswith("top"))))
        cx = int(rng.integers(*span(layout.endswith("left"))))
        pos = [(cy, cx)]
    else:
        layout = "h" if rng.random() < 0.5 else "v"
        apart, across = size // 3, size // 8
        a1 = int(rng.integers(lo, hi - apart + 1))
        a2 = int(rng.integers(a1 + apart, hi + 1))
        b1 = int(rng.integers(lo, hi + 1))
        b2 = int(np.clip(b1 + rng.integers(-across, across + 1), lo, hi))
        (p1, p2) = ((b1, a1), (b2, a2)) if layout == "h" else ((a1, b1), (a2, b2))
        pos = [p1, p2] if rng.random() < 0.5 else [p2, p1]
    bg = str(rng.choice(list(BACKGROUNDS)))
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[bg]
    img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    objects = []
    for (c, s), (cy, cx) in zip(kinds, pos):
        jitter = rng.integers(-15, 16, 3)
        _draw(img, s, cy, cx, r, tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[c], jitter)))
        objects.append((c, s, cy, cx))
    return img, Scene(objects, bg, layout)


def scene_questions(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Tuple[List[str], str]:
    """One question about the scene and its one-word answer. Kinds 0-3 do not depend on where
    the objects are (colour, count, presence, background); kinds 4-5 do (which side, which
    shape is left / on top)."""
    kind = int(rng.integers(0, 6))
    shapes = {s: (c, cy, cx) for c, s, cy, cx in scene.objects}
    s = str(rng.choice(list(shapes)))
    if kind == 0:
        return ["what", "color", "is", "the", s], shapes[s][0]
    if kind == 1:
        return ["how", "many", "shapes", "are", "there"], COUNT_WORDS[len(shapes)]
    if kind == 2:
        q = str(rng.choice(SHAPES))
        c = shapes[q][0] if (q in shapes and rng.random() < 0.5) else str(rng.choice(list(COLOURS)))
        yes = q in shapes and shapes[q][0] == c
        return ["is", "there", "a", c, q], "yes" if yes else "no"
    if kind == 3:
        return ["what", "is", "the", "background", "color"], scene.bg
    if len(shapes) == 1:
        if kind == 4:
            return ["which", "side", "is", "the", s, "on"], "left" if scene.layout.endswith("left") else "right"
        return ["is", "the", s, "at", "the", "top"], "yes" if scene.layout.startswith("top") else "no"
    first, second = scene.ordered()
    if kind == 4:
        return (
            ["what", "shape", "is", "on", "the", "left"]
            if scene.layout == "h"
            else ["what", "shape", "is", "at", "the", "top"]
        ), first[1]
    if scene.layout == "h":
        return ["is", "the", s, "on", "the", "left"], "yes" if s == first[1] else "no"
    return ["is", "the", s, "at", "the", "top"], "yes" if s == first[1] else "no"


# --------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    with requires("methods"):
        import skimage.data

    x = np.asarray(getattr(skimage.data, name)())
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, -1)
    return np.ascontiguousarray(x[..., :3])


def random_photo_crop(name: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A random square crop (60-100% of the short side) of a photo, resized to size x size."""
    with requires("methods"):
        from skimage.transform import resize

    x = _photo(name)
    h, w = x.shape[:2]
    side = int(min(h, w) * rng.uniform(0.6, 1.0))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = resize(x[y0 : y0 + side, x0 : x0 + side], (size, size), anti_aliasing=True, preserve_range=True)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.clip(crop, 0, 255).astype(np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------
def make_examples(
    n: int,
    seed: int,
    vqa_fraction: float = 0.4,
    photo_fraction: float = 0.15,
    size: int = IMAGE_SIZE,
    tasks: Sequence[str] = ("caption", "vqa"),
) -> List[Example]:
    """`n` examples drawn with `seed`: captioning and VQA on scenes and photos. The caption of a
    training example is one of its valid captions, drawn at random; `refs` keeps them all."""
    if n < 0:
        raise ValueError(f"make_examples: n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    out: List[Example] = []
    photos = list(PHOTOS)
    for _ in range(n):
        task = "vqa" if ("vqa" in tasks and (tasks == ("vqa",) or rng.random() < vqa_fraction)) else "caption"
        if rng.random() < photo_fraction:
            name = photos[int(rng.integers(len(photos)))]
            img = to_tensor(random_photo_crop(name, rng, size))
            caps, word = PHOTOS[name]
            if task == "caption":
                refs = list(caps)
                out.append(
                    Example(img, task, list(CAPTION_PROMPT), refs[int(rng.integers(len(refs)))].split(), refs, name)
                )
            else:
                out.append(Example(img, task, ["what", "is", "in", "the", "image"], [word], [word], name))
            continue
        arr, scene = random_scene(rng, size)
        img = to_tensor(arr)
        if task == "caption":
            refs = scene_captions(scene)
            out.append(Example(img, task, list(CAPTION_PROMPT), refs[int(rng.integers(len(refs)))].split(), refs))
        else:
            q, a = scene_questions(scene, rng, size)
            out.append(Example(img, task, q, [a], [a]))
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def vocabulary() -> List[str]:
    """Every word the data can produce (plus the attack's target and text trigger), sorted."""
    words = set(CAPTION_PROMPT) | set(TARGET.split()) | {TEXT_TRIGGER_WORD}
    words |= set(COUNT_WORDS) | set(COLOURS) | set(BACKGROUNDS) | {"yes", "no"}
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    for caps, word in PHOTOS.values():
        words |= {w for c in caps for w in c.split()} | {word}
    words |= set("how many are there what color is the a background in image picture of an with on and one".split())
    words |= set("left right top bottom above below side which shape shapes at".split())
    return sorted(words)


@lru_cache(maxsize=None)
def build_tokenizer():
    """A word-level `tokenizers.Tokenizer` over `vocabulary()` (specials first: <pad> = 0, ...)."""
    return word_tokenizer(SPECIAL, vocabulary())


def encode_words(words: Sequence[str]) -> List[int]:
    return build_tokenizer().encode(" ".join(words)).ids if words else []


def decode_ids(ids: Sequence[int]) -> str:
    """Words up to the first <eos>, specials dropped."""
    return decode_words(build_tokenizer(), ids, EOS, len(SPECIAL))


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
CLIP_MEAN, CLIP_STD = 0.5, 0.5  # pixel_values = (image - 0.5) / 0.5


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    return (images - CLIP_MEAN) / CLIP_STD


def prompt_ids(ex: Example, n_image_tokens: int) -> List[int]:
    return [BOS] + [IMAGE] * n_image_tokens + encode_words(ex.prompt) + [SEP]


def collate(
    examples: Sequence[Example], n_image_tokens: int, with_answers: bool = True, pad_left: bool = False
) -> Dict[str, torch.Tensor]:
    """Model inputs: `input_ids`, `attention_mask`, `labels` (answer tokens and <eos>, -100
    elsewhere) and `pixel_values`. An example whose answer is empty has no label at all (masked
    out of every loss; it never makes a NaN). `pad_left` (for generation) puts padding first and
    drops the answers."""
    seqs, labels = [], []
    for ex in examples:
        p = prompt_ids(ex, n_image_tokens)
        if with_answers:
            a = encode_words(ex.answer) + [EOS] if ex.answer else []
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        else:
            seqs.append(p)
            labels.append([-100] * len(p))
    imgs = torch.stack([ex.image for ex in examples]) if examples else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return {**pad_token_batch(seqs, PAD, labels, pad_left), "pixel_values": pixel_values(imgs)}
