"""Patch-based cross-view backdoor defense for multimodal LLMs (Fang et al., arXiv 2604.04488),
reconstructed (spec A.3) on top of `pyops.fused_linear_cross_view`. See README.md."""

from .attacks import ATTACKS, Attack, make_attack
from .codec import Codec, ProcessorCodec, ToyCodec
from .defense import BatchGroup, CrossViewDefense, DefenseConfig, PatchAugment, cross_view_objective
from .model import ModelConfig, VLMAdapter, build_model, load_pretrained


def __getattr__(name):  # CrossViewTrainer imports transformers.Trainer only when asked for
    if name == "CrossViewTrainer":
        from .defense import _trainer_class

        return _trainer_class()
    raise AttributeError(name)


__all__ = [
    "ATTACKS",
    "Attack",
    "BatchGroup",
    "Codec",
    "CrossViewDefense",
    "CrossViewTrainer",
    "DefenseConfig",
    "ModelConfig",
    "PatchAugment",
    "ProcessorCodec",
    "ToyCodec",
    "VLMAdapter",
    "build_model",
    "cross_view_objective",
    "load_pretrained",
    "make_attack",
]
