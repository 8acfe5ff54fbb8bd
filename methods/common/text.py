"""Word-level tokenizers (the `tokenizers` library) for the methods' synthetic text data."""

from typing import Iterable, List, Sequence

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
