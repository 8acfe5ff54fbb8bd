"""The text side of a model: how examples become model inputs and generated ids become answers.

The training loop, the evaluation and the premise statistics talk to one interface, `Codec`, and
never to a tokenizer directly, so the attacks, the defense and the metrics run unchanged on the
small LLaVA of `model.py` and on a local Hugging Face checkpoint (``--model PATH``):

* ``collate(examples, with_answers=True, pad_left=False)`` -> ``input_ids``, ``attention_mask``,
  ``labels`` (the answer tokens and the end-of-sequence token; -100 on the prompt, the image
  tokens and the padding) and ``pixel_values`` (B, 3, S, S) at the vision tower's size S;
  ``pad_left`` (generation) puts the padding first and drops the answers;
* ``decode(ids)`` -> the answer: the generated ids up to the first end-of-sequence token, as
  lower-case words separated by single spaces (the format of the data's captions and answers);
* ``pad_id``, ``eos_id`` (generation), ``answer_budget(words)`` (new tokens for that many words).

`ToyCodec` is the word-level tokenizer of `data.py` (what the pipeline always used). `ProcessorCodec`
wraps the processor of a local checkpoint (LLaVA-1.5 style: a tokenizer with an image token and an
image processor):

* the prompt is the processor's chat template applied to one user turn (the image, then the
  prompt's words) with the generation prompt (LLaVA-1.5: ``USER: <image>\\n... ASSISTANT:``);
  without a chat template, LLaVA-1.5's conversation format;
* the processor expands the image token to the tower's number of image tokens, and its image
  processor makes the pixel values (the embedded 48 x 48 images, triggers included, are resized to
  the tower's size there: for CLIP's image processor a bicubic resize of the short side and a
  centre crop, then its mean / std);
* the answer is the answer's words joined by spaces, tokenized without special tokens, then the
  tokenizer's end-of-sequence token (as LLaVA's SFT labels);
* a generation is decoded by the processor's tokenizer (special tokens skipped) and normalised to
  lower-case words (punctuation dropped), so the metrics compare it with the data's references.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Protocol, Sequence

import torch

from methods.common.text import pad_token_batch

from . import data as D


class Codec(Protocol):
    pad_id: int
    eos_id: int

    def collate(
        self, examples: Sequence[D.Example], with_answers: bool = True, pad_left: bool = False
    ) -> Dict[str, torch.Tensor]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def answer_budget(self, words: int) -> int: ...


class ToyCodec:
    """The word-level tokenizer of `data.py` and its prompt layout (<bos>, one <image> token per image
    token of the tower, the prompt's words, <sep>): `data.collate` and `data.decode_ids`."""

    pad_id, eos_id = D.PAD, D.EOS

    def __init__(self, n_image_tokens: int):
        self.n_image_tokens = int(n_image_tokens)

    def collate(self, examples, with_answers: bool = True, pad_left: bool = False):
        return D.collate(examples, self.n_image_tokens, with_answers=with_answers, pad_left=pad_left)

    def decode(self, ids) -> str:
        return D.decode_ids(ids)

    def answer_budget(self, words: int) -> int:
        return int(words)  # one token per word


_WORD = re.compile(r"[a-z0-9]+")


def normalise(text: str) -> str:
    """Lower-case words separated by single spaces, punctuation dropped ("A red circle." -> "a red circle")."""
    return " ".join(_WORD.findall(text.lower()))


def to_uint8(image: torch.Tensor):
    """A (3, H, W) float image in [0, 1] as the (H, W, 3) uint8 array an image file would hold."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


class ProcessorCodec:
    """The text side of a local Hugging Face vision-language model, through its processor (module doc).
    `image_size`: the vision tower's; `source` names the checkpoint in errors."""

    def __init__(self, processor, image_size: int, source: str = "the processor"):
        tok = getattr(processor, "tokenizer", None)
        if tok is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{source}: its processor has no tokenizer and image processor")
        if tok.eos_token_id is None:
            raise ValueError(f"{source}: the tokenizer has no end-of-sequence token (the answers end with it)")
        self.processor, self.tokenizer, self.source = processor, tok, source
        self.image_size = int(image_size)
        self.eos_id = int(tok.eos_token_id)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.chat = bool(getattr(processor, "chat_template", None))
        # tokens of the longest word of the data (alone or after a space): the budget of one word
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for w in D.vocabulary() for t in (w, " " + w)]
        self.tokens_per_word = max(1, max(lengths, default=1))
        self._check()

    def prompt_text(self, ex: D.Example) -> str:
        text = " ".join(ex.prompt)
        if self.chat:
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        return f"USER: {self.image_token}\n{text} ASSISTANT:"

    def _prompts(self, examples) -> Dict[str, object]:
        """Prompt ids (one list per example, image tokens expanded) and the pixel values, from one call of
        the processor on the batch."""
        texts = [self.prompt_text(ex) for ex in examples]
        bos = self.tokenizer.bos_token
        # a chat template that writes the bos token itself: the tokenizer must not add a second one
        special = not (bos and texts and all(t.startswith(bos) for t in texts))
        out = self.processor(
            text=texts,
            images=[to_uint8(ex.image) for ex in examples],
            padding=True,
            add_special_tokens=special,
            return_tensors="pt",
        )
        ids, mask = out["input_ids"], out["attention_mask"].bool()
        return {"ids": [ids[i][mask[i]].tolist() for i in range(len(texts))], "pixel_values": out["pixel_values"]}

    def collate(self, examples, with_answers: bool = True, pad_left: bool = False):
        if not examples:
            s = self.image_size
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {
                "input_ids": empty,
                "attention_mask": empty,
                "labels": empty,
                "pixel_values": torch.zeros(0, 3, s, s),
            }
        got = self._prompts(examples)
        seqs: List[List[int]] = []
        labels: List[List[int]] = []
        answers: List[Optional[List[int]]] = [None] * len(examples)
        if with_answers:
            texts = [" ".join(ex.answer) for ex in examples]
            toks = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            answers = [list(t) + [self.eos_id] if ex.answer else [] for t, ex in zip(toks, examples)]
        for p, a in zip(got["ids"], answers):
            a = a or []
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        return {**pad_token_batch(seqs, self.pad_id, labels, pad_left), "pixel_values": got["pixel_values"]}

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return normalise(self.tokenizer.decode(ids, skip_special_tokens=True))

    def answer_budget(self, words: int) -> int:
        return int(words) * self.tokens_per_word

    def probe(self) -> Dict[str, object]:
        """The prompt ids and pixel values of one blank image with the caption prompt."""
        ex = D.Example(torch.zeros(3, D.IMAGE_SIZE, D.IMAGE_SIZE), "caption", list(D.CAPTION_PROMPT), ["a"])
        return self._prompts([ex])

    def _check(self) -> None:
        """One probe image through the processor: its pixel values must be the tower's (B, 3, S, S)."""
        try:
            pv = self.probe()["pixel_values"]
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.source}: its processor cannot prepare an image and a prompt ({first})") from e
        s = self.image_size
        if not isinstance(pv, torch.Tensor) or tuple(pv.shape) != (1, 3, s, s):
            shape = tuple(pv.shape) if isinstance(pv, torch.Tensor) else type(pv).__name__
            raise ValueError(
                f"{self.source}: its image processor makes pixel values of shape {shape}, but the vision tower "
                f"takes (1, 3, {s}, {s}) (one image of its image_size); multi-crop processors (LLaVA-NeXT) are "
                "not supported"
            )
