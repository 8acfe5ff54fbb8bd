"""The small Llama-style causal LM that gets backdoored (randomly initialised from a
`transformers` config; nothing is downloaded), or a local Hugging Face causal LM (``--model``:
loading, gradient checkpointing, export), greedy generation and response perplexity."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from methods.common.config import arg
from methods.common.hf import DTYPE_HELP, DTYPES, WEIGHT_FILES
from methods.common.optional import requires

from . import data as D
from .codec import Codec, HFCodec, codec_of


@dataclass
class ModelConfig:
    """The Llama's size. It has no dropout (``LlamaConfig.attention_dropout`` stays 0, and Llama has
    no other dropout), so nothing random differs between the ranks of a torchrun run."""

    hidden: int = arg(128, "model width d (the backdoored Llama)", metavar="N")
    layers: int = arg(6, "decoder layers", metavar="N")
    heads: int = arg(4, "attention heads (hidden must be divisible by them)", metavar="N")
    intermediate: int = arg(384, "MLP width", metavar="N")

    def validate(self) -> None:
        for name in ("hidden", "layers", "heads", "intermediate"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --heads {self.heads}")


def build_model(cfg: ModelConfig = ModelConfig()):
    cfg.validate()
    with requires("hf"):
        from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(
        vocab_size=D.build_tokenizer().get_vocab_size(),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=96,
        pad_token_id=D.PAD,
        bos_token_id=D.BOS,
        eos_token_id=D.EOS,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(c)
    model.generation_config.pad_token_id = D.PAD
    model.generation_config.eos_token_id = D.EOS
    model.generation_config.bos_token_id = D.BOS
    return model


@torch.no_grad()
def generate(
    model, instructions: Sequence[str], max_new_tokens: int = 24, batch: int = 128, codec: Optional[Codec] = None
) -> List[str]:
    """Greedy responses (strings) to the instructions (left-padded batches), prompts and decoding
    by ``codec`` (default: the small Llama's words)."""
    codec = codec_of(codec)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out_texts = []
    for s in range(0, len(instructions), batch):
        ids, mask = codec.prompt_batch(instructions[s : s + batch])
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=codec.pad_id,
            eos_token_id=codec.eos_for_generate,
        )
        out_texts += [codec.decode(row[width:].tolist()) for row in out]
    model.train(was)
    return out_texts


@torch.no_grad()
def response_perplexity(model, examples: Sequence[D.Example], batch: int = 128, codec: Optional[Codec] = None) -> float:
    """exp of the mean next-token NLL over all response tokens (and the answer's end). With a real
    vocabulary (an ``HFCodec``) the NLL goes through the fused LM-head loss: no (B, T, V) logits."""
    codec = codec_of(codec)
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch):
        b = codec.collate(examples[s : s + batch])
        labels = b["labels"][:, 1:].to(device)
        if codec.small_vocab:
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            )
        else:
            nll = fused_nll_sum(model, {k: v.to(device) for k, v in b.items()})
        total += float(nll)
        count += int((labels != -100).sum())
    model.train(was)
    return math.exp(total / max(1, count))


def fused_nll_sum(model, batch) -> torch.Tensor:
    """The summed next-token NLL of the labelled tokens, through ``pyops.transformers`` (the LM
    head fused with the loss on the labelled rows: logits of the whole sequence never formed)."""
    from pyops.transformers import causal_lm_loss, last_hidden_state, lm_head

    hidden = last_hidden_state(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    weight, bias = lm_head(model)
    return causal_lm_loss(hidden, batch["labels"], weight, bias, reduction="sum")


# --------------------------------------------------------------------------------------------
# A local Hugging Face causal LM (--model PATH)
# --------------------------------------------------------------------------------------------
@dataclass
class HFOptions:
    """How a local Hugging Face model (``--model PATH``) is loaded and prompted (nothing is
    downloaded). ``dtype`` and ``system_prompt`` apply to such a model only, gradient
    checkpointing to the small Llama too. ``model`` is ``backdoor``'s flag (``defend`` and
    ``eval`` have their own ``--model``, which also takes run folders)."""

    model: Optional[str] = arg(
        None,
        "a local Hugging Face causal LM folder (save_pretrained's: config.json, weights, tokenizer) to fine-tune "
        "with the poisoned data, instead of training the small Llama from scratch; its size flags are then ignored",
        metavar="PATH",
    )
    dtype: str = arg(
        "auto", DTYPE_HELP + " (--model only; backdoor and defend refuse float16: no loss scaling)", choices=DTYPES
    )
    gradient_checkpointing: bool = arg(
        False,
        "recompute each decoder layer's activations in backward (less memory, about a third more time; the "
        "perturbation hook stays in place through the recomputation)",
    )
    system_prompt: Optional[str] = arg(
        None,
        "system message of every prompt (--model with a chat template; e.g. the one the BEEAR backdoored models were "
        "trained with); default: none, or the one recorded with the model",
        metavar="TEXT",
    )


BEEAR_JSON = "beear.json"  # next to a model exported here: the trigger (for evaluation) and the system prompt


def is_hf_model_dir(path) -> bool:
    """A folder that save_pretrained wrote (or meant to: weights without a config count, so that
    ``model_dir`` names what is missing), as opposed to a run folder or a checkpoint file."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        return False
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            return "model_type" in json.loads(cfg.read_text())
        except (OSError, ValueError):
            return False
    return any((p / w).is_file() for w in WEIGHT_FILES) or (p / "tokenizer_config.json").is_file()


def load_hf(path, opts: HFOptions, device=torch.device("cpu")) -> Tuple[Any, Any]:
    """(model, tokenizer) of the local folder ``path`` (``methods.common.hf``), its decoder layers
    found (else a ValueError naming the folder), gradient checkpointing on where asked."""
    from methods.common.hf import load_causal_lm

    from .beear import decoder_layers

    model, tok = load_causal_lm(path, dtype=opts.dtype, device=str(device))
    try:
        decoder_layers(model)
    except ValueError as e:
        raise ValueError(f"--model {path}: {e}") from e
    if opts.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"--model {path}: {type(model).__name__} does not support gradient checkpointing")
        enable_checkpointing(model)
    return model, tok


def enable_checkpointing(model) -> None:
    """transformers' activation (gradient) checkpointing, non-reentrant (delta's gradient and the
    hooks need it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name (transformers 5.x)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def hf_codec(model, tok, system_prompt: Optional[str]) -> HFCodec:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return HFCodec(tok, system_prompt, eos)


def read_beear_json(path) -> Dict[str, Any]:
    p = Path(os.path.expanduser(str(path))) / BEEAR_JSON
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object")
    return data


def export_hf(model, tok, out: str, info: Dict[str, Any]) -> str:
    """``save_pretrained`` of the model and its tokenizer into ``out`` (safetensors), with
    ``beear.json`` (``info``: the trigger, the system prompt, where it came from): a folder that
    ``--model`` takes again, and any Hugging Face tool."""
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    with open(os.path.join(out, BEEAR_JSON), "w") as f:
        json.dump(info, f, indent=2)
    return out
