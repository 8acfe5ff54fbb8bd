"""The small Llama-style causal LM that gets backdoored (randomly initialised from a
`transformers` config; nothing is downloaded), greedy generation and response perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch

from methods.common.config import arg
from methods.common.optional import requires

from . import data as D


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
def generate(model, instructions: Sequence[str], max_new_tokens: int = 24, batch: int = 128) -> List[str]:
    """Greedy responses (strings) to the instructions (left-padded batches)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out_texts = []
    for s in range(0, len(instructions), batch):
        prompts = [D.prompt_ids(t) for t in instructions[s : s + batch]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), D.PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=D.PAD,
            eos_token_id=D.EOS,
        )
        out_texts += [D.decode(row[width:].tolist()) for row in out]
    model.train(was)
    return out_texts


@torch.no_grad()
def response_perplexity(model, examples: Sequence[D.Example], batch: int = 128) -> float:
    """exp of the mean next-token NLL over all response tokens (and <eos>)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch):
        b = D.collate(examples[s : s + batch])
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        labels = b["labels"][:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((labels != -100).sum())
    model.train(was)
    return math.exp(total / max(1, count))
