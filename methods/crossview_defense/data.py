"""Embedded data: procedurally drawn scenes and the photos that ship with scikit-image, two tasks
(captioning and visual question answering) and a word-level tokenizer built with `tokenizers`.

A sample is an `Example(image, task, prompt, answer, refs)`: `image` a float (3, S, S) tensor in
[0, 1], `prompt` and `answer` lists of words, `refs` every valid caption (the references of
BLEU/CIDEr; for VQA the single accepted answer). Nothing is downloaded.

Scenes: one or two groups of 1-3 identical shapes (circle, square, triangle) in one of six colours
on a grey, black or white background, at random non-overlapping places. Their captions name the
groups and the background ("two red circles and a blue square on a black background"); questions
ask for counts, colours, presence and the background. Photos: 11 scikit-image images under random
crops and flips, each with its own captions and a one-word answer to "what is in the image".
Captions and answers never depend on where things are, so a patch shuffle keeps them valid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from methods.common.text import decode_words, word_tokenizer

IMAGE_SIZE = 48

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
    "yellow": (235, 220, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
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
def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _group_phrase(n: int, colour: str, shape: str, article: bool) -> str:
    word = ("a" if article else "one") if n == 1 else COUNT_WORDS[n]
    return f"{word} {colour} {_plural(shape, n)}"


def scene_captions(groups: Sequence[Tuple[int, str, str]], bg: str) -> List[str]:
    """Every valid caption of a scene (the BLEU/CIDEr references); training draws one of them."""
    desc_a = " and ".join(_group_phrase(n, c, s, True) for n, c, s in groups)
    desc_o = " and ".join(_group_phrase(n, c, s, False) for n, c, s in groups)
    be = "is" if len(groups) == 1 and groups[0][0] == 1 else "are"
    return [
        f"{desc_a} on a {bg} background",
        f"a picture of {desc_a}",
        f"there {be} {desc_o} on a {bg} background",
        f"an image with {desc_a}",
    ]


def _draw(img: np.ndarray, shape: str, cy: int, cx: int, r: int, rgb) -> None:
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
    """A scene image (uint8 HxWx3) with its groups [(count, colour, shape)] and background."""
    n_groups = int(rng.integers(1, 3))
    kinds = []
    while len(kinds) < n_groups:
        k = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if k not in kinds and all(k[1] != s for _, s in kinds):  # one colour per shape
            kinds.append(k)
    groups = [(int(rng.integers(1, 4)), c, s) for c, s in kinds]
    bg = str(rng.choice(list(BACKGROUNDS)))
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[bg]
    img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
    r = max(3, size // 10)
    placed: List[Tuple[int, int]] = []
    for n, c, s in groups:
        for _ in range(n):
            for _attempt in range(200):
                cy, cx = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
                if all((cy - y) ** 2 + (cx - x) ** 2 > (2 * r + 2) ** 2 for y, x in placed):
                    break
            placed.append((cy, cx))
            jitter = rng.integers(-15, 16, 3)
            _draw(img, s, cy, cx, r, tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[c], jitter)))
    return img, groups, bg


def scene_questions(groups, bg, rng: np.random.Generator) -> Tuple[List[str], str]:
    """One question about the scene and its one-word answer."""
    kind = int(rng.integers(0, 4))
    shapes = {s: (n, c) for n, c, s in groups}
    if kind == 0:
        s = str(rng.choice(list(shapes)))
        return ["how", "many", s + "s", "are", "there"], COUNT_WORDS[shapes[s][0]]
    if kind == 1:
        s = str(rng.choice(list(shapes)))
        return ["what", "color", "is", "the", s], shapes[s][1]
    if kind == 2:
        s = str(rng.choice(SHAPES))
        c = shapes[s][1] if (s in shapes and rng.random() < 0.5) else str(rng.choice(list(COLOURS)))
        yes = s in shapes and shapes[s][1] == c
        return ["is", "there", "a", c, s], "yes" if yes else "no"
    return ["what", "is", "the", "background", "color"], bg


# --------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    x = np.asarray(getattr(skimage.data, name)())
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, -1)
    return np.ascontiguousarray(x[..., :3])


def random_photo_crop(name: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A random square crop (60-100% of the short side) of a photo, resized to size x size."""
    from skimage.transform import resize

    x = _photo(name)
    h, w = x.shape[:2]
    side = int(min(h, w) * rng.uniform(0.6, 1.0))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = resize(x[y0:y0 + side, x0:x0 + side], (size, size), anti_aliasing=True, preserve_range=True)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.clip(crop, 0, 255).astype(np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------
def make_examples(n: int, seed: int, vqa_fraction: float = 0.4, photo_fraction: float = 0.15,
                  size: int = IMAGE_SIZE, tasks: Sequence[str] = ("caption", "vqa")) -> List[Example]:
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
                out.append(Example(img, task, list(CAPTION_PROMPT), refs[int(rng.integers(len(refs)))].split(), refs, name))
            else:
                out.append(Example(img, task, ["what", "is", "in", "the", "image"], [word], [word], name))
            continue
        arr, groups, bg = random_scene(rng, size)
        img = to_tensor(arr)
        if task == "caption":
            refs = scene_captions(groups, bg)
            out.append(Example(img, task, list(CAPTION_PROMPT), refs[int(rng.integers(len(refs)))].split(), refs))
        else:
            q, a = scene_questions(groups, bg, rng)
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


def collate(examples: Sequence[Example], n_image_tokens: int, with_answers: bool = True,
            pad_left: bool = False) -> Dict[str, torch.Tensor]:
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
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        sl = slice(width - len(s), width) if pad_left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        lab[i, sl] = torch.tensor(l)
        mask[i, sl] = 1
    imgs = torch.stack([ex.image for ex in examples]) if examples else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab, "pixel_values": pixel_values(imgs)}

