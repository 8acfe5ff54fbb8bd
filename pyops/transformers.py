"""Hugging Face ``transformers`` integration: language-model losses through the fused LM head.

``pyops.fused_linear_cross_view`` computes per-row CE, KL both ways and entropies from hidden rows
and an LM head's weight and bias, chunk by chunk, without ever holding the (rows, vocabulary)
logits. This module connects it to ``transformers`` causal LMs and LLaVA-style vision-language
models. It needs the optional extra ``pip install pyops[hf]`` and is imported on first use
(``import pyops.transformers``, or the attribute ``pyops.transformers``).

* **The head.** ``lm_head(model)`` returns ``(weight, bias)`` of ``model.get_output_embeddings()``
  after ``check_lm_head(model)``, which refuses models whose logits are not
  ``hidden @ weight.T + bias``: a config field of ``LOGIT_TRANSFORMS`` set to a non-neutral value
  (soft-capping, logit scales, muP output multipliers, vocabulary slicing), read on the config,
  its ``text_config`` and its text (decoder) config; an encoder-decoder; a model type of
  ``LOGIT_TRANSFORMING_MODEL_TYPES``; a head that is not a plain ``torch.nn.Linear``.
  ``verify_lm_head(model, inputs)`` checks the same numerically on one forward.
* **Hidden states.** ``last_hidden_state(model, **inputs)`` runs the model (wrappers included:
  DDP, PEFT, ``torch.compile``) and returns the last hidden states (B, L, H), the tensor the head
  reads: the output ``last_hidden_state`` of ``model.base_model``, caught by a forward hook while
  the whole model runs with ``logits_to_keep=1`` (the head then sees one position per sample:
  the full logits are never made). The whole model is called rather than ``model.model``, so
  that the wrappers' forward logic (DDP's gradient bookkeeping, accelerate's autocast) runs.
  Models without a separate base model are run with ``output_hidden_states=True``
  (``hidden_states[-1]``, which transformers sets to the normed last hidden state).
* **Losses.** ``causal_lm_loss`` (shifted CE, reductions "mean", "sum", "none", "per_sample", or
  normalised by ``num_items_in_batch``) and ``cross_view_loss`` (CE of two views, KL(p||q),
  KL(q||p), entropies, with the weights, temperature, stop-gradient and per-sample reductions of
  ``CrossViewWeights``) take hidden states, labels and the head.
* **Trainer.** ``FusedLMLossMixin`` (``class MyTrainer(FusedLMLossMixin, transformers.Trainer)``)
  gives ``compute_loss`` = these losses with exact gradient accumulation (see its docstring).

Labels follow transformers: ``labels[:, t]`` is the token at position t, predicted by position
t - 1 (the shift is done here), -100 (``ignore_index``) marks positions without a target;
``shift=False`` (or a batch key ``shift_labels``) takes labels already aligned with the positions.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._optional import requires

with requires("hf", "pyops.transformers (the Hugging Face integration)"):
    import transformers as _hf

from ._validation import acc_dtype
from .cross_view_kl import fused_linear_cross_view

__all__ = [
    "LOGIT_TRANSFORMS",
    "LOGIT_TRANSFORMING_MODEL_TYPES",
    "LogitTransform",
    "check_lm_head",
    "lm_head",
    "verify_lm_head",
    "unwrap_model",
    "last_hidden_state",
    "answer_counts",
    "causal_lm_loss",
    "CrossViewWeights",
    "CrossViewLoss",
    "cross_view_loss",
    "BatchTotals",
    "FusedLMLossMixin",
]

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# What may happen to the logits after the LM head
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogitTransform:
    """A config field that makes a model's logits differ from ``lm_head(last hidden state)``.
    The field is harmless when absent or equal to one of ``neutral``."""

    field: str
    effect: str
    models: str
    neutral: Tuple[Any, ...] = (None,)


# Found in the modeling files of transformers 5.25 (models/*/modeling_*.py): what each ForCausalLM /
# ForConditionalGeneration forward does between the base model's output and the returned logits.
LOGIT_TRANSFORMS: Tuple[LogitTransform, ...] = (
    LogitTransform(
        "final_logit_softcapping",
        "logits = c * tanh(logits / c)",
        "Gemma 2, Gemma 3, Gemma 3n, Gemma 4, VaultGemma, PaliGemma (text config), T5Gemma, "
        "Mistral Large 4, NanoChat, Beam, DiffusionGemma, Inkling2, MuseSpark / MuseGlimmer",
    ),
    LogitTransform(
        "logit_softcapping",
        "a soft cap c * tanh(logits / c) (the field's other spelling)",
        "none in transformers 5.25; refused for remote-code models that use it",
    ),
    LogitTransform("logits_soft_cap", "logits = c * tanh(logits / c)", "RecurrentGemma"),
    LogitTransform("output_logit_soft_cap", "logits = c * tanh(logits / c)", "xLSTM"),
    LogitTransform(
        "logit_scale",
        "logits = logits * s",
        "Cohere, Cohere2, Cohere2-MoE, CohereCompass, Aya Vision (text config); MPT has the field "
        "(unused by its transformers forward)",
        (None, 1, 1.0),
    ),
    LogitTransform(
        "logits_scaling",
        "logits = logits / s (Granite), logits * s (HyperCLOVAX), the head reads "
        "last_hidden_state / s (MiniCPM3, s = hidden_size / dim_model_base)",
        "Granite, Granite-SWA, GraniteMoE (-SWA, -Hybrid, -Shared), Granite4-Vision and "
        "GraniteDocling (text config), HyperCLOVAX (+ vision v2, text config), MiniCPM3",
        (None, 1, 1.0),
    ),
    LogitTransform(
        "output_multiplier",
        "logits = logits * m (before the soft cap)",
        "MuseSpark, MuseGlimmer (text config)",
        (None, 1, 1.0),
    ),
    LogitTransform("lm_head_multiplier", "logits = lm_head(h) * m (muP)", "Falcon-H1", (None, 1, 1.0)),
    LogitTransform(
        "logits_mup_width_multiplier", "the head reads last_hidden_state / m (muP)", "Inkling", (None, 1, 1.0)
    ),
    LogitTransform("unpadded_vocab_size", "logits = logits[..., :n] (padded head rows cut off)", "Inkling"),
)

# Transforms with no config field: the model type is refused.
LOGIT_TRANSFORMING_MODEL_TYPES: Dict[str, str] = {
    "chameleon": "ChameleonForConditionalGeneration sets the logits of the image tokens to the dtype's minimum",
    "neomme": "NeoMMEForMaskedLM multiplies the hidden states by unembedding_projection before the head",
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside ``model``: unwraps DistributedDataParallel / DataParallel
    (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT (``.get_base_model()``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, _hf.PreTrainedModel):
            break
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            break
    return model


def _configs(config) -> Sequence[Tuple[str, Any]]:
    """(name, config) of the model config and its text / decoder sub-configs."""
    out, seen = [], set()

    def add(name, c):
        if c is not None and id(c) not in seen:
            seen.add(id(c))
            out.append((name, c))

    add("config", config)
    add("config.text_config", getattr(config, "text_config", None))
    add("config.decoder", getattr(config, "decoder", None))
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text(decoder=True)
        except TypeError:  # older signature
            text = get_text()
        add("config.get_text_config()", text)
    return out


def _is_neutral(value, neutral) -> bool:
    return any(value is n or (n is not None and value is not None and value == n) for n in neutral)


def _head_module(model: nn.Module, fn: str) -> nn.Linear:
    core = unwrap_model(model)
    get = getattr(core, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = type(core).__name__
    if head is None:
        raise ValueError(
            f"{fn}: {name} has no LM head (get_output_embeddings() gives None); a causal LM or a "
            "vision-language model with an LM head (a ...ForCausalLM / ...ForConditionalGeneration) "
            "is needed"
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(
            f"{fn}: the LM head of {name} is a {type(head).__name__}, not a plain torch.nn.Linear: its "
            "logits need not be hidden @ weight.T + bias (a learned logit scale, quantisation, an "
            "adapter such as LoRA on the head), which is all the fused op computes"
        )
    w, b = head.weight, head.bias
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or (b is not None and b.shape != (w.shape[0],)):
        raise ValueError(
            f"{fn}: the LM head of {name} must have a weight (V, H) and a bias (V,) or None, got "
            f"weight {tuple(getattr(w, 'shape', ()))} and bias "
            f"{None if b is None else tuple(b.shape)}"
        )
    return head


def check_lm_head(model: nn.Module) -> None:
    """Raises ValueError unless ``model``'s logits are ``lm_head(last hidden state)`` with
    ``lm_head = model.get_output_embeddings()`` a plain ``nn.Linear``: the message names the
    config field (of ``LOGIT_TRANSFORMS``, on the config, ``text_config`` or the text / decoder
    config) or the reason that rules the model out. Reads the config only; ``verify_lm_head``
    checks numerically."""
    _checked_head(model)


def _checked_head(model: nn.Module) -> nn.Linear:
    """The LM head module of ``model`` after the checks of ``check_lm_head``."""
    fn = "check_lm_head"
    core = unwrap_model(model)
    name = type(core).__name__
    config = getattr(core, "config", None)
    if config is None:
        raise ValueError(f"{fn}: {name} has no config; a transformers PreTrainedModel is needed")
    head = _head_module(core, fn)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{fn}: {name} is an encoder-decoder model (config.is_encoder_decoder): its labels are not "
            "shifted against its inputs (and Bart-style models add final_logits_bias to the logits); "
            "only decoder-only causal LMs and vision-language models are supported"
        )
    model_type = getattr(config, "model_type", None)
    if model_type in LOGIT_TRANSFORMING_MODEL_TYPES:
        raise ValueError(
            f"{fn}: {name} (model_type {model_type!r}) changes its logits after the LM head: "
            f"{LOGIT_TRANSFORMING_MODEL_TYPES[model_type]}; the fused loss would not be the model's"
        )
    vocab = head.weight.shape[0]
    for where, cfg in _configs(config):
        for t in LOGIT_TRANSFORMS:
            value = getattr(cfg, t.field, None)
            if _is_neutral(value, t.neutral):
                continue
            if t.field == "unpadded_vocab_size" and isinstance(value, int) and value >= vocab:
                continue
            raise ValueError(
                f"{fn}: {name} transforms its logits after the LM head: {where}.{t.field} = {value!r} "
                f"({t.effect}; models: {t.models}). The fused loss computes softmax(hidden @ W.T + b) "
                f"and would not be this model's loss; pyops.transformers refuses such models"
            )
    return head


def lm_head(model: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight (V, H), bias (V,) or None)`` of ``model.get_output_embeddings()``, after
    ``check_lm_head(model)``. The tensors are the parameters themselves (gradients reach them)."""
    head = _checked_head(model)
    return head.weight, head.bias


def _default_tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2)


@torch.no_grad()
def verify_lm_head(
    model: nn.Module, inputs: Optional[Mapping[str, Any]] = None, *, rtol: Optional[float] = None
) -> float:
    """Numerical self-check: runs ``model`` once in eval mode on ``inputs`` (default: 8 random
    token ids; vision-language models need their ``inputs``), with the full logits, and compares
    them with ``hidden @ weight.T + bias`` computed from ``last_hidden_state(model, **inputs)``
    and the head's parameters. Returns the largest absolute difference divided by the largest
    absolute logit; raises ValueError when it exceeds ``rtol`` (default by dtype: 1e-10 float64,
    1e-4 float32, 2e-2 otherwise). Independent of ``check_lm_head``'s config reading, and only
    as sensitive as the logits' size allows: a soft cap c * tanh(z / c) changes logits z << c by
    about z^3 / (3 c^2), so small random models may pass in low precision."""
    core = unwrap_model(model)
    if inputs is None and getattr(core.config, "vision_config", None) is not None:
        raise ValueError("verify_lm_head: a vision-language model needs its `inputs` (pixel_values etc.)")
    head = _head_module(core, "verify_lm_head")
    if inputs is None:
        device = next(core.parameters()).device
        inputs = {"input_ids": torch.randint(0, head.weight.shape[0], (1, 8), device=device)}
    kw = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    was_training = model.training
    model.eval()
    try:
        logits = model(**{**kw, "use_cache": False}).logits
        hidden = last_hidden_state(model, **kw)
    finally:
        model.train(was_training)
    ours = nn.functional.linear(hidden, head.weight, head.bias)
    if ours.shape != logits.shape:
        raise ValueError(
            f"verify_lm_head: the model's logits have shape {tuple(logits.shape)}, "
            f"lm_head(last hidden state) {tuple(ours.shape)}"
        )
    err = float((ours.double() - logits.double()).abs().max()) / max(float(logits.double().abs().max()), 1e-30)
    tol = _default_tolerance(logits.dtype) if rtol is None else rtol
    if not err <= tol:
        raise ValueError(
            f"verify_lm_head: {type(core).__name__}'s logits differ from lm_head(last hidden state) by "
            f"{err:.3e} (relative to the largest logit; tolerance {tol:.1e}): the model transforms its "
            "logits after the head, and the fused losses would not be its losses"
        )
    return err


# --------------------------------------------------------------------------------------------
# Hidden states
# --------------------------------------------------------------------------------------------
# batch keys that are no model inputs: the labels, the Trainer's count, the second view
_NOT_MODEL_INPUTS = ("labels", "shift_labels", "num_items_in_batch", "view_b")


def _forward_params(core: nn.Module) -> Tuple[set, bool]:
    params = inspect.signature(core.forward).parameters
    return set(params), any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def last_hidden_state(model: nn.Module, /, **inputs: Any) -> Tensor:
    """Last-layer hidden states (B, L, H) of ``model`` on ``inputs`` (``input_ids``,
    ``attention_mask``, ``pixel_values``, ...; the keys ``labels``, ``shift_labels``,
    ``num_items_in_batch`` and ``view_b`` are dropped): the tensor the LM head reads in the
    models ``check_lm_head`` accepts.

    The model (wrapped or not) runs with ``use_cache=False`` and ``logits_to_keep=1`` (or
    ``num_logits_to_keep=1``) where its forward takes them, and the hidden states are the
    ``last_hidden_state`` output of its ``base_model``, caught by a forward hook. A model with no
    separate base model runs with ``output_hidden_states=True`` instead (``hidden_states[-1]``).
    A forward that takes neither keyword computes the full logits (a warning says so)."""
    kw = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
    if isinstance(model, nn.DataParallel) and len(model.device_ids or ()) > 1:
        # its replicas share the base model's hooks: the hook would catch one replica's slice of the batch
        raise ValueError(
            "last_hidden_state: torch.nn.DataParallel over several GPUs is not supported; use "
            "DistributedDataParallel (torchrun) instead"
        )
    core = unwrap_model(model)
    names, var_kw = _forward_params(core)
    if "use_cache" in names or var_kw:
        kw.setdefault("use_cache", False)
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in names), None)
    if keep is not None:
        kw[keep] = 1
    else:
        warnings.warn(
            f"last_hidden_state: {type(core).__name__}.forward takes no logits_to_keep: the full logits are "
            "computed (and dropped)",
            stacklevel=2,
        )
    base = getattr(core, "base_model", core)
    if not isinstance(base, nn.Module) or base is core:
        out = model(**kw, output_hidden_states=True)
        hidden = out.hidden_states[-1]
    else:
        caught = []
        handle = base.register_forward_hook(lambda module, args, output: caught.append(output))
        try:
            model(**kw)
        finally:
            handle.remove()
        if not caught:
            raise RuntimeError(
                f"last_hidden_state: the forward of {type(core).__name__} did not call its base model "
                f"{type(base).__name__}"
            )
        out = caught[-1]
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise RuntimeError(
            f"last_hidden_state: expected hidden states (B, L, H) from {type(core).__name__}, got "
            f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}"
        )
    return hidden


# --------------------------------------------------------------------------------------------
# Answer rows
# --------------------------------------------------------------------------------------------
def _check_labels(hidden: Tensor, labels: Tensor, fn: str, name: str = "hidden") -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{fn}: {name} must be floating hidden states (B, L, H), got {got}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: labels must be integer token ids, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{fn}: labels must have the shape (B, L) = {tuple(hidden.shape[:2])} of {name}, got {tuple(labels.shape)}"
        )


def _targets(labels: Tensor, shift: bool) -> Tensor:
    """(B, L') targets of the (B, L') positions used: labels[:, 1:] for positions 0..L-2 (shift)."""
    return labels[:, 1:] if shift else labels


def answer_counts(labels: Tensor, *, shift: bool = True, ignore_index: int = -100) -> Tuple[int, int]:
    """(answer tokens, samples with at least one answer token) of (B, L) labels: the positions
    whose (shifted, with ``shift``) target is not ``ignore_index``, as the losses here count them."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"answer_counts: labels must be a (B, L) tensor, got {got}")
    keep = _targets(labels, shift) != ignore_index
    return int(keep.sum()), int(keep.any(1).sum())


@dataclass
class _Rows:
    rows: Tensor  # (N, H) hidden rows with a target
    targets: Tensor  # (N,) int64
    sample: Tensor  # (N,) sample index of each row
    keep: Tensor  # (B, L') bool


def _answer_rows(hidden: Tensor, labels: Tensor, vocab: int, shift: bool, ignore_index: int, fn: str) -> _Rows:
    y = _targets(labels, shift).to(hidden.device)
    h = hidden[:, :-1] if shift else hidden
    keep = y != ignore_index
    targets = y[keep].long()
    bad = (targets < 0) | (targets >= vocab)
    if bool(bad.any()):
        pos = keep.nonzero()[int(bad.nonzero()[0, 0])].tolist()
        at = [pos[0], pos[1] + 1] if shift else pos
        raise ValueError(
            f"{fn}: labels[{at[0]}, {at[1]}] = {int(targets[bad][0])} is neither a token id in "
            f"[0, {vocab}) nor ignore_index ({ignore_index})"
        )
    sample = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(keep)[keep]
    return _Rows(h[keep], targets, sample, keep)


def _check_head(weight: Tensor, bias: Optional[Tensor], hidden: Tensor, fn: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{fn}: weight must be the LM head's (V, H) with H = {hidden.shape[-1]}, got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{fn}: bias must be None or ({weight.shape[0]},), got {got}")


def _count(value, name: str, fn: str) -> Optional[float]:
    """A positive count (int, float or one-element tensor) as a float; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{fn}: {name} must be None, a number or a one-element tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{fn}: {name} must be > 0, got {value!r}")
    return float(value)


def _zero_like_graph(hidden: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero that depends on hidden and weight (backward works and gives zero gradients)."""
    return (hidden.sum() * 0.0 + weight.sum() * 0.0).to(dtype)


def _ce_rows(rows: Tensor, targets: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_size) -> Tensor:
    """Per-row CE through the fused op (the same rows as both views, the second detached)."""
    return fused_linear_cross_view(rows, rows.detach(), weight, bias, targets, chunk_size=chunk_size).ce_a


REDUCTIONS = ("mean", "sum", "none", "per_sample")


def causal_lm_loss(
    hidden: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: Union[int, float, Tensor, None] = None,
    ignore_index: int = -100,
    shift: bool = True,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Next-token cross-entropy of hidden states (B, L, H) under the LM head ``(weight, bias)``,
    computed by ``pyops.fused_linear_cross_view`` on the rows that have a target (logits never
    materialised; the op evaluates the head twice per row, once per view).

    With ``shift`` (default) position t predicts ``labels[:, t + 1]``, as transformers' causal LM
    loss; ``shift=False`` takes ``labels[:, t]`` as position t's target (``shift_labels``).
    Targets equal to ``ignore_index`` are left out. Reductions:

    * ``"mean"``: sum over the targets / their number, or / ``num_items_in_batch`` when given (the
      Trainer's token count of the whole accumulated batch, as transformers' ``ForCausalLMLoss``);
    * ``"sum"``; ``"none"``: (B, L - 1) per position (B, L without shift), 0 where ignored;
    * ``"per_sample"``: (B,), each sequence's mean over its targets (0 for a sequence without).

    A batch without any target gives a zero loss ("mean", "sum") that backward accepts. The
    result is float32 (float64 for float64 hidden states), like the op's outputs.
    """
    fn = "causal_lm_loss"
    _check_labels(hidden, labels, fn)
    _check_head(weight, bias, hidden, fn)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"{fn}: num_items_in_batch normalises the 'mean' reduction; got reduction={reduction!r}")
    denom = _count(num_items_in_batch, "num_items_in_batch", fn)
    r = _answer_rows(hidden, labels, weight.shape[0], shift, ignore_index, fn)
    acc = acc_dtype(hidden)
    n = r.rows.shape[0]
    if n == 0:  # zeros that backward accepts
        zero = _zero_like_graph(hidden, weight, acc)
        shape = {"mean": (), "sum": (), "none": tuple(r.keep.shape), "per_sample": (hidden.shape[0],)}[reduction]
        return zero + torch.zeros(shape, dtype=acc, device=hidden.device)
    ce = _ce_rows(r.rows, r.targets, weight, bias, chunk_size)
    if reduction == "mean":
        return ce.sum() / (n if denom is None else denom)
    if reduction == "sum":
        return ce.sum()
    if reduction == "none":
        return torch.zeros(r.keep.shape, dtype=ce.dtype, device=ce.device).masked_scatter(r.keep, ce)
    sums = torch.zeros(hidden.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, r.sample, ce)
    return sums / r.keep.sum(1).clamp(min=1).to(ce.dtype)


# --------------------------------------------------------------------------------------------
# Two views
# --------------------------------------------------------------------------------------------
TERMS = ("ce_a", "ce_b", "kl_ab", "kl_ba", "entropy_a", "entropy_b")


@dataclass(frozen=True)
class CrossViewWeights:
    """Weights of the per-token terms of ``cross_view_loss`` (any finite value; negative ones
    maximise their term) and how they are computed.

    ``p = softmax(z_a / temperature)``, ``q = softmax(z_b / temperature)`` with ``z = h W^T + b``
    of view a and view b at the same answer position. ``ce_a`` / ``ce_b``: CE of each view's
    logits at temperature 1; ``kl_ab`` = KL(p || q), ``kl_ba`` = KL(q || p); ``entropy_a`` = H(p),
    ``entropy_b`` = H(q). ``detach``: None, or "a" / "b": that view's hidden states are a fixed
    target in the KL and entropy terms (no gradient reaches the model below the head through
    them; its CE still trains it). The LM head is shared: its weight and bias get the gradient
    of both views' logits in every term, as with ``pyops.fused_linear_cross_view`` on detached rows.
    ``per_sample``: terms averaged over each sample's answer tokens first, then over the samples
    that have one (the others are means over all answer tokens)."""

    ce_a: float = 1.0
    ce_b: float = 0.0
    kl_ab: float = 0.0
    kl_ba: float = 0.0
    entropy_a: float = 0.0
    entropy_b: float = 0.0
    temperature: float = 1.0
    detach: Optional[str] = None
    per_sample: Tuple[str, ...] = ()

    def validate(self) -> "CrossViewWeights":
        for t in TERMS:
            v = getattr(self, t)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"CrossViewWeights: {t} must be a finite number, got {v!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise ValueError(f"CrossViewWeights: temperature must be a finite number > 0, got {t!r}")
        if self.detach not in (None, "a", "b"):
            raise ValueError(f"CrossViewWeights: detach must be None, 'a' or 'b', got {self.detach!r}")
        if isinstance(self.per_sample, str) or any(p not in TERMS for p in self.per_sample):
            raise ValueError(
                f"CrossViewWeights: per_sample must be a tuple of term names from {TERMS}, got {self.per_sample!r}"
            )
        return self

    def weights(self) -> Dict[str, float]:
        return {t: float(getattr(self, t)) for t in TERMS}


@dataclass
class CrossViewLoss:
    """``loss`` = sum over the terms of weight x term; ``terms``: each computed term (name of
    ``TERMS``), reduced as in the loss (token or per-sample mean, or its share of the given
    totals) and unweighted; ``tokens`` / ``samples``: answer tokens and samples with one in this
    batch."""

    loss: Tensor
    terms: Dict[str, Tensor]
    tokens: int
    samples: int


def cross_view_loss(
    hidden_a: Tensor,
    hidden_b: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    weights: CrossViewWeights = CrossViewWeights(),
    *,
    token_total: Union[int, float, Tensor, None] = None,
    sample_total: Union[int, float, Tensor, None] = None,
    ignore_index: int = -100,
    shift: bool = True,
    chunk_size: Optional[int] = None,
) -> CrossViewLoss:
    """The weighted sum of ``weights``' terms over the answer positions of two views that share
    the labels (e.g. the same prompt and answer with an original and an augmented image): hidden
    states (B, L, H) of view a and view b, labels (B, L) (shifted as in ``causal_lm_loss``), the LM
    head ``(weight, bias)``. One call of ``pyops.fused_linear_cross_view`` gives the KL terms,
    the entropies and ``ce_a``; ``ce_b`` (and ``ce_a`` when view a is detached) takes one more.

    Gradient accumulation: with ``token_total`` (answer tokens of the accumulated batch), token
    terms are sums over this batch's answer tokens / token_total; with ``sample_total`` (samples
    with an answer token in the accumulated batch), per-sample terms are sums of this batch's
    per-sample means / sample_total; micro-batch losses then add up to the full batch's. None: this
    batch's own counts. A batch without answer tokens gives a zero loss that backward accepts."""
    fn = "cross_view_loss"
    if not isinstance(weights, CrossViewWeights):
        raise TypeError(f"{fn}: weights must be a CrossViewWeights, got {type(weights).__name__}")
    weights.validate()
    _check_labels(hidden_a, labels, fn, "hidden_a")
    if not isinstance(hidden_b, torch.Tensor) or hidden_b.shape != hidden_a.shape or hidden_b.dtype != hidden_a.dtype:
        got = (tuple(hidden_b.shape), hidden_b.dtype) if isinstance(hidden_b, torch.Tensor) else type(hidden_b).__name__
        raise ValueError(f"{fn}: hidden_b must match hidden_a {tuple(hidden_a.shape)} ({hidden_a.dtype}), got {got}")
    _check_head(weight, bias, hidden_a, fn)
    tok_den = _count(token_total, "token_total", fn)
    smp_den = _count(sample_total, "sample_total", fn)
    r = _answer_rows(hidden_a, labels, weight.shape[0], shift, ignore_index, fn)
    ra = r.rows
    rb = (hidden_b[:, :-1] if shift else hidden_b)[r.keep]
    n, n_batch = ra.shape[0], hidden_a.shape[0]
    w = weights.weights()
    acc = acc_dtype(hidden_a)
    if n == 0:
        zero = _zero_like_graph(hidden_a, weight, acc) + hidden_b.sum().to(acc) * 0.0
        return CrossViewLoss(zero, {}, 0, 0)
    rows: Dict[str, Tensor] = {}
    need_div = any(w[t] != 0 for t in ("kl_ab", "kl_ba", "entropy_a", "entropy_b"))
    if need_div or (w["ce_a"] != 0 and weights.detach != "a"):
        # without weighted KL / entropy terms only ce_a is used: no gradient needs to reach view b
        pa = ra.detach() if weights.detach == "a" else ra
        pb = rb.detach() if weights.detach == "b" or not need_div else rb
        target = None if weights.detach == "a" else r.targets
        out = fused_linear_cross_view(
            pa, pb, weight, bias, target, temperature=float(weights.temperature), chunk_size=chunk_size
        )
        rows.update(kl_ab=out.kl_ab, kl_ba=out.kl_ba, entropy_a=out.entropy_a, entropy_b=out.entropy_b)
        if out.ce_a is not None:
            rows["ce_a"] = out.ce_a
    if w["ce_a"] != 0 and "ce_a" not in rows:
        rows["ce_a"] = _ce_rows(ra, r.targets, weight, bias, chunk_size)
    if w["ce_b"] != 0:
        rows["ce_b"] = _ce_rows(rb, r.targets, weight, bias, chunk_size)
    count = torch.zeros(n_batch, dtype=acc, device=ra.device).index_add_(
        0, r.sample, torch.ones(n, dtype=acc, device=ra.device)
    )
    has = count > 0
    n_samples = int(has.sum())
    terms: Dict[str, Tensor] = {}
    for name, v in rows.items():
        if name in weights.per_sample:
            means = torch.zeros(n_batch, dtype=v.dtype, device=v.device).index_add(0, r.sample, v)[has] / count[has]
            terms[name] = means.sum() / (n_samples if smp_den is None else smp_den)
        else:
            terms[name] = v.sum() / (n if tok_den is None else tok_den)
    loss = None
    for t in TERMS:
        if w[t] != 0:
            loss = w[t] * terms[t] if loss is None else loss + w[t] * terms[t]
    if loss is None:  # every weight is 0
        loss = _zero_like_graph(ra, weight, acc)
    return CrossViewLoss(loss, terms, n, n_samples)


# --------------------------------------------------------------------------------------------
# Trainer mixin
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchTotals:
    """Answer tokens and samples with an answer token of a whole accumulated batch (all its
    micro-batches; all processes with ``average_tokens_across_devices``)."""

    tokens: int
    samples: int


def _batch_counts(batch: Mapping[str, Any]) -> Tuple[int, int]:
    if "shift_labels" in batch:
        return answer_counts(batch["shift_labels"], shift=False)
    return answer_counts(batch["labels"])


def _model_inputs(inputs: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}


def two_view_hidden_states(model: nn.Module, inputs: Mapping[str, Any]) -> Tuple[Tensor, Tensor]:
    """Last hidden states of the batch's two views: view a from the batch's model inputs, view b
    from the same inputs updated with ``inputs["view_b"]`` (a dict, e.g. ``{"pixel_values": ...}``).
    When every tensor input of the two views has the same shape, both run in one forward of the
    concatenated batch (2B); otherwise in two forwards."""
    view_b = inputs.get("view_b")
    if not isinstance(view_b, Mapping) or not view_b:
        raise ValueError(
            "two_view_hidden_states: inputs['view_b'] must be a non-empty dict of the model inputs that "
            "differ in the second view (e.g. {'pixel_values': augmented})"
        )
    a = _model_inputs(inputs)
    b = {**a, **view_b}
    same = a.keys() == b.keys() and all(
        (
            isinstance(a[k], torch.Tensor)
            and isinstance(b[k], torch.Tensor)
            and a[k].shape == b[k].shape
            and a[k].dim() > 0
        )
        or a[k] is b[k]
        for k in a
    )
    if same:
        both = {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) and a[k].dim() > 0 else a[k] for k in a}
        h = last_hidden_state(model, **both)
        n = h.shape[0] // 2
        h_a, h_b = h[:n], h[n:]
    else:
        h_a, h_b = last_hidden_state(model, **a), last_hidden_state(model, **b)
    if h_a.shape != h_b.shape:
        raise ValueError(
            f"two_view_hidden_states: the views' hidden states differ in shape, {tuple(h_a.shape)} and "
            f"{tuple(h_b.shape)}: the two views must have the same positions (the labels are shared)"
        )
    return h_a, h_b


class FusedLMLossMixin:
    """``compute_loss`` for a ``transformers.Trainer`` through the fused LM head, with exact
    gradient accumulation: ``class MyTrainer(FusedLMLossMixin, transformers.Trainer)``.

    Constructor: the Trainer's arguments, plus ``cross_view=CrossViewWeights(...)`` (optional).
    The model must pass ``check_lm_head`` (checked in ``__init__``). A batch is a dict of model
    inputs plus ``labels`` (or ``shift_labels``); with ``cross_view`` set, a batch that carries
    ``view_b`` (the inputs that differ in the second view) gets ``cross_view_loss``, any other
    batch the CE of ``causal_lm_loss``. Pass ``remove_unused_columns=False`` to keep ``view_b``.

    Gradient accumulation. The Trainer splits an optimizer step's batch into micro-batches and
    adds their gradients; a per-micro-batch mean weighs micro-batches with few answer tokens as
    much as ones with many, and, when the Trainer passes ``num_items_in_batch`` (for models
    whose forward takes ``**kwargs``; this mixin forces ``model_accepts_loss_kwargs`` on so that
    it always counts), the Trainer does not divide the loss by the number of micro-batches. Here
    every micro-batch's loss is normalised by the totals of its accumulated batch (token terms:
    sum / answer tokens, per-sample terms: sum of sample means / samples with an answer token),
    which ``get_batch_samples`` (called by the training loop once per optimizer step on that
    step's micro-batches) counts and gathers across processes when
    ``args.average_tokens_across_devices``; the loss is then multiplied by the number of
    processes, which DDP's gradient averaging divides out. Such a loss is scaled for gradient
    accumulation: ``loss_is_scaled_for_ga`` (read by ``training_step`` on transformers >= 5) is
    True, and on older versions the Trainer skips its division because it passed a count. With
    no count, in evaluation, or without gradients the loss is the batch's own mean (the Trainer
    then divides it by the number of micro-batches when training). The Trainer counts only
    batches that carry ``labels``: with ``shift_labels`` alone every micro-batch gets its own
    mean, exact only when the micro-batches hold equal numbers of answer tokens. Tested with
    transformers 5.25 (``tests/test_transformers_integration.py``).

    Subclasses can replace the loss by overriding ``compute_fused_loss(model, inputs, totals)``,
    which returns ``(loss, stats)`` and receives ``BatchTotals`` or None (the batch's own means).
    """

    def __init__(self, *args, cross_view: Optional[CrossViewWeights] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if cross_view is not None and not isinstance(cross_view, CrossViewWeights):
            raise TypeError(
                f"{type(self).__name__}: cross_view must be None or a CrossViewWeights, got {type(cross_view).__name__}"
            )
        self.cross_view = None if cross_view is None else cross_view.validate()
        if self.model is not None:  # None with model_init: checked in compute_loss
            check_lm_head(self.model)
        # The Trainer counts `num_items_in_batch` only for models that take loss kwargs; we need the count (and
        # the skipped division that goes with it on versions without loss_is_scaled_for_ga)
        self.model_accepts_loss_kwargs = True
        self.last_loss_stats: Dict[str, Any] = {}
        self._window: Optional[Tuple[Any, BatchTotals]] = None  # (num_items_in_batch, totals)
        self._loss_scaled = False

    # read by Trainer.training_step (transformers >= 5): whether the last compute_loss already normalised
    # over the accumulated batch, so that it must not be divided by the number of micro-batches
    @property
    def loss_is_scaled_for_ga(self) -> bool:
        return self._loss_scaled

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        # transformers before 4.50 calls it without the device
        args = (epoch_iterator, num_batches) if device is None else (epoch_iterator, num_batches, device)
        batch_samples, num_items_in_batch = super().get_batch_samples(*args)
        self._window = None
        if num_items_in_batch is not None:
            counts = [_batch_counts(b) for b in batch_samples]
            tokens, samples = sum(c[0] for c in counts), sum(c[1] for c in counts)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                t = torch.tensor([tokens, samples], device=self.args.device if device is None else device)
                tokens, samples = (int(v) for v in self.accelerator.gather(t[None]).sum(0))
            self._window = (num_items_in_batch, BatchTotals(tokens, samples))
        return batch_samples, num_items_in_batch

    def accumulation_totals(self, model, inputs, num_items_in_batch) -> Optional[BatchTotals]:
        """Totals of the accumulated batch ``inputs`` belongs to, or None for the batch's own means
        (no count, evaluation, or no gradients)."""
        if num_items_in_batch is None or not model.training or not torch.is_grad_enabled():
            return None
        w = self._window
        if w is not None and (w[0] is num_items_in_batch or (not torch.is_tensor(w[0]) and w[0] == num_items_in_batch)):
            return w[1]
        # not from the latest get_batch_samples: only a batch that is its own accumulated batch is known
        tokens, samples = _batch_counts(inputs)
        if int(num_items_in_batch) != tokens:
            raise ValueError(
                f"{type(self).__name__}.compute_loss: num_items_in_batch={int(num_items_in_batch)} does not come from "
                f"the latest get_batch_samples and is not this batch's {tokens} answer tokens; the sample count of "
                "the accumulated batch is unknown. Get the micro-batches and the count from "
                "trainer.get_batch_samples, as the Trainer's training loop does"
            )
        return BatchTotals(tokens, samples)

    def compute_fused_loss(self, model, inputs, totals: Optional[BatchTotals]) -> Tuple[Tensor, Dict[str, Any]]:
        """(loss, stats) of a batch: ``cross_view_loss`` when ``self.cross_view`` is set and the
        batch has ``view_b``, else the mean CE of ``causal_lm_loss``; normalised by ``totals``
        (None: this batch's own counts). Stats: the unweighted terms (detached) and the counts."""
        if "labels" not in inputs and "shift_labels" not in inputs:
            raise ValueError(
                f"{type(self).__name__}.compute_loss: the batch has no 'labels' (or 'shift_labels'); "
                f"its keys are {sorted(inputs)}"
            )
        shift = "shift_labels" not in inputs
        labels = inputs["labels"] if shift else inputs["shift_labels"]
        weight, bias = lm_head(model)
        if "view_b" in inputs:
            if self.cross_view is None:
                raise ValueError(
                    f"{type(self).__name__}.compute_loss: the batch has a second view ('view_b') but the "
                    "trainer has no cross_view=CrossViewWeights(...)"
                )
            h_a, h_b = two_view_hidden_states(model, inputs)
            out = cross_view_loss(
                h_a,
                h_b,
                labels,
                weight,
                bias,
                self.cross_view,
                shift=shift,
                token_total=None if totals is None else max(totals.tokens, 1),
                sample_total=None if totals is None else max(totals.samples, 1),
            )
            stats = {**{k: v.detach() for k, v in out.terms.items()}, "answer_tokens": out.tokens}
            return out.loss, stats
        hidden = last_hidden_state(model, **inputs)
        loss = causal_lm_loss(
            hidden,
            labels,
            weight,
            bias,
            shift=shift,
            num_items_in_batch=None if totals is None else max(totals.tokens, 1),
        )
        return loss, {"ce_a": loss.detach()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        totals = self.accumulation_totals(model, inputs, num_items_in_batch)
        loss, stats = self.compute_fused_loss(model, inputs, totals)
        if totals is not None:
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # totals are global; DDP averages gradients
            stats = {**stats, "token_total": totals.tokens, "sample_total": totals.samples}
        self._loss_scaled = totals is not None
        self.last_loss_stats = stats
        return (loss, {"loss": loss}) if return_outputs else loss
