"""Word-level tokenizers (the `tokenizers` library) for the methods' synthetic text data, and the
padding of token lists into a batch."""

from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .optional import requires


def word_tokenizer(special: Sequence[str], words: Iterable[str], unk: str = "<unk>"):
    """A `tokenizers.Tokenizer` with a whitespace pre-tokenizer and a WordLevel model: the
    special tokens first (ids 0, 1, ...), then the words in the given order."""
    with requires("hf"):
        from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(special)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def decode_words(tok, ids: Sequence[int], eos: int, num_special: int) -> str:
    """The words of ``ids`` up to the first ``eos``, special tokens (ids < num_special) dropped."""
    words: List[str] = []
    for i in ids:
        i = int(i)
        if i == eos:
            break
        if i >= num_special:
            words.append(tok.id_to_token(i))
    return " ".join(words)


def pad_token_batch(
    seqs: Sequence[Sequence[int]],
    pad: int,
    labels: Optional[Sequence[Sequence[int]]] = None,
    pad_left: bool = False,
) -> Dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (and ``labels`` when given, -100 on the padding) of token
    lists, padded with `pad` to the longest: on the right, or on the left (``pad_left``, generation)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = None if labels is None else torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if pad_left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
        if lab is not None:
            lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    return out
