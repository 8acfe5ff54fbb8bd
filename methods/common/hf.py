"""Loading a Hugging Face model that is already on this machine: a folder written by
``save_pretrained`` (or a snapshot of the hub's files), with its tokenizer or processor.

Nothing is downloaded: every ``from_pretrained`` call gets ``local_files_only=True``, and a folder
whose model needs code from the hub (``trust_remote_code``) is refused rather than run. Errors name
the flag and the folder: no such folder, no ``config.json``, no weights, no tokenizer, a model of
the wrong kind (a causal LM where a vision-language model is needed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from .optional import requires

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = (
    "dtype the --model weights are loaded in: 'auto' keeps the checkpoint's own (its config's dtype), "
    "else float32 / bfloat16 / float16"
)
WEIGHT_FILES = (  # one of them makes a folder a model folder
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def model_dir(path, flag: str = "--model") -> Path:
    """`path` as a folder with a ``config.json`` and weights (see the module doc for the errors)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(
            f"{flag} {p}: no such folder (a local Hugging Face model folder; nothing is downloaded)"
        )
    if not p.is_dir():
        raise NotADirectoryError(f"{flag} {p}: not a folder (give the folder that save_pretrained wrote)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {p}: no config.json, so this is not a Hugging Face model folder")
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise FileNotFoundError(f"{flag} {p}: no weights ({', '.join(WEIGHT_FILES)})")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {p / 'config.json'}: unreadable ({e})") from e
    if cfg.get("auto_map"):
        raise ValueError(
            f"{flag} {p}: the model needs its own code from the hub (config.json has auto_map); "
            "only models that transformers implements are loaded"
        )
    return p


def torch_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def _unreadable_weights() -> Tuple[type, ...]:
    """What a truncated or corrupt weight file raises (an interrupted download or copy of a shard)."""
    import pickle

    errors: Tuple[type, ...] = (pickle.UnpicklingError, EOFError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


def _load(loader, p: Path, flag: str, what: str, **kw):
    try:
        return loader.from_pretrained(str(p), local_files_only=True, trust_remote_code=False, **kw)
    except (OSError, ValueError, KeyError, *_unreadable_weights()) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{flag} {p}: cannot load its {what} ({first})") from e


def load_tokenizer(path, flag: str = "--model"):
    """The folder's tokenizer (fast when the folder has one). A tokenizer without a pad token gets
    its eos token as pad (batched generation and loss masks need one)."""
    p = model_dir(path, flag)
    with requires("hf"):
        from transformers import AutoTokenizer
    tok = _load(AutoTokenizer, p, flag, "tokenizer")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{flag} {p}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path, *, dtype: str = "auto", device: Optional[str] = None, flag: str = "--model"
) -> Tuple[Any, Any]:
    """(model, tokenizer) of a local causal-LM folder (Llama-2-chat, Mistral, Qwen, ...)."""
    p = model_dir(path, flag)
    with requires("hf"):
        from transformers import AutoModelForCausalLM
    tok = load_tokenizer(p, flag)
    model = _load(AutoModelForCausalLM, p, flag, "causal LM", dtype=torch_dtype(dtype))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    return model, tok


def load_vlm(path, *, dtype: str = "auto", device: Optional[str] = None, flag: str = "--model") -> Tuple[Any, Any]:
    """(model, processor) of a local image-text-to-text folder (LLaVA-1.5, ...); the processor
    carries the tokenizer (``processor.tokenizer``) and the image processor."""
    p = model_dir(path, flag)
    with requires("hf"):
        from transformers import AutoModelForImageTextToText, AutoProcessor
    proc = _load(AutoProcessor, p, flag, "processor")
    tok = getattr(proc, "tokenizer", None)
    if tok is None or getattr(proc, "image_processor", None) is None:
        raise ValueError(
            f"{flag} {p}: its processor has no tokenizer and image processor (is it a vision-language model?)"
        )
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{flag} {p}: the processor's tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    model = _load(AutoModelForImageTextToText, p, flag, "vision-language model", dtype=torch_dtype(dtype))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    return model, proc
