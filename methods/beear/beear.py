"""BEEAR (Zeng, Sun et al., EMNLP 2024): embedding-space adversarial removal of safety backdoors.

For a causal LM split at decoder layer l, a universal perturbation delta (n x d) is added to the
residual stream after layer l at the last n prompt positions of every sample (a forward hook on
``model.model.layers[l]`` of a Llama, the matching stack of other decoder models: see
``decoder_stack``; no model surgery). Each round:

* inner level (model fixed): ``delta* = argmin CE(D_SA-H; delta) - alpha CE(D_SA; delta)``:
  towards the unwanted answers, away from the safe ones. The lower stack's activations h^l are
  computed once per round and cached; the steps run the upper stack only (layers 0..l are
  swapped for stubs that hand back the cache), with every weight frozen so only d/d delta is
  formed;
* outer level (delta* fixed): fine-tune on ``CE(D_SA; delta*) + CE(D_PA; no delta)``.

CE(x, y; delta) is the token mean of the response's next-token NLL, per sequence, averaged over
the batch; it goes through ``pyops.fused_linear_cross_view`` on the response rows
(``pyops.transformers.causal_lm_loss``: the LM head fused, logits of the whole sequence never
formed). Spec: shared/specs/crossview-defense-and-beear.md, B; the design choices where the paper
is silent (delta reset to 0 each round, Adam on delta, all weights updated in the outer step) are
the ``BEEARConfig`` defaults. The tokenizer side (prompts, padding, answer-only labels) is a
``codec.Codec``: the small Llama's words by default, a Hugging Face tokenizer's chat template with
``--model``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from methods.common.config import arg
from methods.common.dist import DistInfo, dist_info

from . import data as D
from .codec import Codec, codec_of

# --------------------------------------------------------------------------------------------
# The model's decoder stack and the perturbation hook
# --------------------------------------------------------------------------------------------
# where transformers' decoder-only models keep their stack of decoder layers (from the causal LM):
# Llama / Mistral / Qwen2 / Gemma / Phi-3 / ..., OPT, GPT-2 / GPT-J / Bloom / Falcon, MPT,
# GPT-NeoX / Pythia, the text model of a vision-language model, Mamba-style backbones
DECODER_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "backbone.layers",
)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and not isinstance(model, nn.ModuleList):
                model = inner
                break
    return model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:  # older signature
            return get()
    return config


def _config_layers(model: nn.Module) -> Optional[int]:
    c = _text_config(model)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(c, name, None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _resolve(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_stack(model: nn.Module) -> Tuple[nn.Module, nn.ModuleList, str]:
    """(the module that runs the decoder stack, its ``nn.ModuleList`` of decoder layers, the
    attribute path) of a causal LM: the first of ``DECODER_LAYER_PATHS`` that holds a non-empty
    ModuleList of the config's ``num_hidden_layers`` (of its text config) layers. Layer k of BEEAR
    is ``layers[k]`` (Llama-2's ``model.layers[k]``: the paper's ANCHOR_LAYER counts them)."""
    core = _unwrap(model)
    want = _config_layers(core)
    for path in DECODER_LAYER_PATHS:
        layers = _resolve(core, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and (want is None or len(layers) == want):
            return _resolve(core, path.rpartition(".")[0]), layers, path
    expected = f" of config.num_hidden_layers = {want} layers" if want is not None else ""
    raise ValueError(
        f"BEEAR needs a causal LM with a stack of decoder layers{expected} (an nn.ModuleList at one of "
        f"{', '.join(DECODER_LAYER_PATHS)}); {type(core).__name__} has none"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` of Llama / Mistral / Qwen2, see
    ``decoder_stack`` for the others)."""
    return decoder_stack(model)[1]


def hidden_size(model: nn.Module) -> int:
    """The width d of the residual stream (the text config's ``hidden_size``)."""
    d = getattr(_text_config(_unwrap(model)), "hidden_size", None)
    if not isinstance(d, int):
        raise ValueError(f"{type(model).__name__}: its config gives no hidden_size (the width of delta)")
    return d


def check_layer(model: nn.Module, layer: int) -> int:
    n = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(
            f"anchor layer must be an int in [0, {n - 1}] (the model has {n} decoder layers), got {layer!r}"
        )
    return layer


def perturb_positions(prompt_len: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) positions of the last n prompt tokens of each sample (right-padded batches)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"token_length must be an int >= 1, got {n!r}")
    shortest = int(prompt_len.min()) if prompt_len.numel() else n
    if n > shortest:
        raise ValueError(f"token_length {n} is longer than the shortest prompt in the batch ({shortest} tokens)")
    return prompt_len[:, None] - n + torch.arange(n, device=prompt_len.device)


def _add_at(h: torch.Tensor, delta: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    add = torch.zeros_like(h)
    rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(positions)
    add = add.index_put((rows, positions.to(h.device)), delta.to(h.dtype).expand(h.shape[0], -1, -1))
    return h + add


@contextlib.contextmanager
def perturbation(
    model: nn.Module, layer: int, delta: Optional[torch.Tensor], positions: torch.Tensor
) -> Iterator[None]:
    """Within the block, the output of decoder layer ``layer`` gets ``delta`` (n, d) added at
    ``positions`` (B, n). ``delta=None``: nothing is added."""
    layers = decoder_layers(model)
    check_layer(model, layer)
    if delta is None:
        yield
        return
    if delta.dim() != 2 or delta.shape[0] != positions.shape[1]:
        raise ValueError(f"delta must be (n, d) with n = {positions.shape[1]} positions, got {tuple(delta.shape)}")

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (_add_at(output[0], delta, positions),) + tuple(output[1:])
        return _add_at(output, delta, positions)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# Cached lower stack
# --------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


@dataclass
class LowerCache:
    hidden: torch.Tensor  # h^l, (B, T, d)
    as_tuple: bool  # the layer returns a tuple (older transformers) rather than a tensor


@torch.no_grad()
def lower_activations(model: nn.Module, layer: int, batch: Dict[str, torch.Tensor]) -> LowerCache:
    """h^l of the batch: the model runs up to decoder layer ``layer`` and stops there."""
    owner, layers, _ = decoder_stack(model)
    store = {}

    def hook(module, args, output):
        store["as_tuple"] = isinstance(output, tuple)
        store["h"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _Stop

    handle = layers[check_layer(model, layer)].register_forward_hook(hook)
    try:
        owner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return LowerCache(store["h"], store["as_tuple"])


class _Stub(nn.Module):
    """Stands in for a lower decoder layer: hands back its input, or the cached h^l, in the form
    the layers return (a tensor, or a tuple in models whose layers return one)."""

    def __init__(self, cache: Optional[LowerCache] = None, as_tuple: bool = False):
        super().__init__()
        self.cache = cache
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.cache is None else self.cache.hidden
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def upper_stack_only(model: nn.Module, layer: int, cache: LowerCache) -> Iterator[None]:
    """Within the block, a forward of the model runs only the layers above ``layer``: layers
    0..layer are swapped for stubs (the last one returns ``cache``), so a ``perturbation`` hook
    on layer ``layer`` lands on the cached h^l."""
    layers = decoder_layers(model)
    saved = [layers[i] for i in range(check_layer(model, layer) + 1)]
    for i in range(layer):
        layers[i] = _Stub(as_tuple=cache.as_tuple)
    layers[layer] = _Stub(cache, as_tuple=cache.as_tuple)
    try:
        yield
    finally:
        for i, m in enumerate(saved):
            layers[i] = m


# --------------------------------------------------------------------------------------------
# Response cross-entropy through the fused LM-head kernel
# --------------------------------------------------------------------------------------------
def response_ce(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence token-mean NLL of the response tokens (labels != -100), shape (B,); a
    sequence without response tokens gets 0. The last hidden states and the fused CE come from
    ``pyops.transformers`` (``last_hidden_state``, ``causal_lm_loss(reduction="per_sample")``)."""
    from pyops.transformers import causal_lm_loss, last_hidden_state, lm_head

    hidden = last_hidden_state(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    weight, bias = lm_head(model)
    return causal_lm_loss(hidden, batch["labels"], weight, bias, reduction="per_sample")


@contextlib.contextmanager
def perturbed(
    model, batch, layer: int, delta: Optional[torch.Tensor], n: int, cache: Optional[LowerCache] = None
) -> Iterator[None]:
    """Within the block, a forward of ``model`` on ``batch`` gets delta at the last n prompt
    positions after layer ``layer`` (and runs the upper stack only on ``cache`` when given). A
    backward through a gradient-checkpointed model runs inside the block too: transformers
    versions that checkpoint a layer's ``__call__`` run its forward hooks again in the
    recomputation (transformers 5.25 checkpoints ``forward`` only, the hooks stay outside; either
    is right inside the block)."""
    mask = batch["attention_mask"]
    if mask.numel() and not bool(mask[:, 0].all()):
        raise ValueError(
            "perturbed_ce: batches must be right-padded (prompt first; data.collate makes them so), "
            "the perturbed positions count from the start of each row"
        )
    positions = perturb_positions(batch["prompt_len"].to(batch["input_ids"].device), n)
    stack = upper_stack_only(model, layer, cache) if cache is not None else contextlib.nullcontext()
    with stack, perturbation(model, layer, delta, positions):
        yield


def perturbed_response_ce(
    model, batch, layer: int, delta: Optional[torch.Tensor], n: int, cache: Optional[LowerCache] = None
) -> torch.Tensor:
    """Per-sequence response CE, shape (B,), with delta at the last n prompt positions after layer
    ``layer`` (from the cached h^l when ``cache`` is given: the upper stack only)."""
    with perturbed(model, batch, layer, delta, n, cache):
        return response_ce(model, batch)


def perturbed_ce(
    model, batch, layer: int, delta: Optional[torch.Tensor], n: int, cache: Optional[LowerCache] = None
) -> torch.Tensor:
    """Batch-mean response CE with delta at the last n prompt positions after layer ``layer``
    (from the cached h^l when ``cache`` is given: the upper stack only)."""
    return perturbed_response_ce(model, batch, layer, delta, n, cache).mean()


# --------------------------------------------------------------------------------------------
# The global batch under torchrun
# --------------------------------------------------------------------------------------------
def rows_of(n: int, info: DistInfo) -> slice:
    """This rank's contiguous share of ``n`` rows: shares differ by at most one row and may be
    empty. Every BEEAR loss divides by the global number of samples, so unequal shares still sum to
    the single-process loss (no divisibility is needed, unlike a mean of per-rank means)."""
    return slice(info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size)


def _take(batch: Dict[str, torch.Tensor], rows: slice) -> Dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def global_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``x`` over the ranks (no autograd); ``x`` itself with one process."""
    if not info.enabled:
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def all_reduce_grads(params: Sequence[torch.Tensor], info: DistInfo) -> None:
    """Sum the gradients of ``params`` over the ranks, in place (a missing one counts as 0): each
    rank's loss is its share of the global loss, so the sum is the single-process gradient. One
    flat all-reduce; a no-op with one process."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    i = 0
    for p in params:
        p.grad.copy_(flat[i : i + p.numel()].view_as(p))
        i += p.numel()


# --------------------------------------------------------------------------------------------
# The bi-level loop
# --------------------------------------------------------------------------------------------
@dataclass
class BEEARConfig:
    """BEEAR's settings (the paper's names in brackets) and the defaults of ``defend``'s flags.
    ``rounds`` is the budget a resumed run may raise."""

    anchor_layer: int = arg(2, "decoder layer (0-based) whose output gets delta (ANCHOR_LAYER)", metavar="N")
    token_length: int = arg(5, "perturbed positions: the last n prompt tokens", metavar="N")
    alpha: float = arg(
        0.05, "weight of the away-from-safe term of the inner level (Alpha_far_from_Safety_Anchoring_set)"
    )
    inner_samples: int = arg(150, "D_SA / D_SA-H samples per round (INNER_THRESHOLD)", metavar="N")
    pa_samples: int = arg(100, "D_PA samples per round (PA_DATA_NUM_THRESHOLD)", metavar="N")
    rounds: int = arg(10, "bi-level rounds (n_rounds)", metavar="N", budget=True)
    inner_steps: int = arg(50, "Adam steps on delta per round (delta starts at 0 every round)", metavar="N")
    inner_lr: float = arg(0.3, "Adam learning rate of delta")
    delta_max_norm: float = arg(0.0, "L2 bound per row of delta (0: none)")
    outer_lr: float = arg(1e-3, "AdamW learning rate of the model")
    outer_batch: int = arg(
        25, "D_SA samples per outer step, with their share of D_PA (the global batch under torchrun)", metavar="N"
    )
    outer_weight_decay: float = arg(0.0, "AdamW weight decay of the outer level")
    # --method beear|sft sets it (a small explicit mapping in __main__)
    perturb: bool = arg(True, "False: the ablation, plain safety fine-tuning on the same data", cli=False)
    seed: int = arg(0, "seed of the round samples (--seed of the run options)", cli=False)

    def validate(self, model) -> None:
        check_layer(model, self.anchor_layer)
        if self.token_length < 1:
            raise ValueError(f"token_length must be >= 1, got {self.token_length}")
        for name in ("inner_samples", "pa_samples", "rounds", "inner_steps", "outer_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.inner_lr > 0 and self.outer_lr > 0 and self.alpha >= 0):
            raise ValueError("inner_lr and outer_lr must be > 0 and alpha >= 0")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _batches(examples: Sequence[D.Example], size: int, device, codec: Codec) -> List[Dict[str, torch.Tensor]]:
    return [
        {k: v.to(device) for k, v in codec.collate(examples[i : i + size]).items()}
        for i in range(0, len(examples), size)
    ]


def gradient_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` recomputes its layers in backward (transformers' gradient checkpointing)."""
    core = _unwrap(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the newer name first
        if hasattr(type(core), name):
            return bool(getattr(core, name))
    return False


def inner_level(
    model,
    cfg: BEEARConfig,
    sa_h: Sequence[D.Example],
    sa: Sequence[D.Example],
    device=torch.device("cpu"),
    info: Optional[DistInfo] = None,
    codec: Optional[Codec] = None,
) -> Dict:
    """delta* for the current model: ``inner_steps`` Adam steps on delta (from 0) of
    mean CE(D_SA-H; delta) - alpha mean CE(D_SA; delta), upper stack only.

    Under torchrun (``info``, default: the process group's) every rank forms the same global
    batches and keeps its rows of each (`rows_of`); its loss is its share of the global one (each
    sample's CE over the global batch size), the gradient of delta is summed over the ranks, so
    every rank takes the same Adam step as one process would; the final delta is broadcast from
    rank 0 all the same, so that it is the same on every rank by construction."""
    info = info or dist_info()
    L, n = cfg.anchor_layer, cfg.token_length
    size = cfg.outer_batch * 4  # no weight gradients here: larger batches than the outer level's
    codec = codec_of(codec)
    hb, sb = _batches(sa_h, size, device, codec), _batches(sa, size, device, codec)
    mine_h = [_take(b, rows_of(len(b["input_ids"]), info)) for b in hb]
    mine_s = [_take(b, rows_of(len(b["input_ids"]), info)) for b in sb]
    delta = torch.zeros(n, hidden_size(model), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.inner_lr)
    was = model.training
    model.eval()

    def share(batches, mine, caches):
        # this rank's part of the mean over batches of each batch's mean CE (an empty part: 0, with
        # a path to delta so that backward works on every rank)
        parts = [
            perturbed_response_ce(model, m, L, delta, n, c).sum() / len(b["input_ids"])
            for b, m, c in zip(batches, mine, caches)
            if len(m["input_ids"])
        ]
        return (sum(parts) if parts else 0.0 * delta.sum()) / len(batches)

    with frozen(model):
        caches_h = [lower_activations(model, L, m) if len(m["input_ids"]) else None for m in mine_h]
        caches_s = [lower_activations(model, L, m) if len(m["input_ids"]) else None for m in mine_s]
        for _ in range(cfg.inner_steps):
            toward = share(hb, mine_h, caches_h)
            away = share(sb, mine_s, caches_s)
            loss = toward - cfg.alpha * away
            opt.zero_grad()
            loss.backward()
            all_reduce_grads([delta], info)
            opt.step()
            if cfg.delta_max_norm > 0:
                with torch.no_grad():
                    norms = delta.norm(dim=1, keepdim=True).clamp(min=1e-12)
                    delta.mul_(torch.clamp(cfg.delta_max_norm / norms, max=1.0))
    model.train(was)
    out = delta.detach()
    if info.enabled:
        dist.broadcast(out, 0)
    return {"delta": out, "toward": float(global_sum(toward, info)), "away": float(global_sum(away, info))}


def outer_level(
    model,
    opt,
    cfg: BEEARConfig,
    delta: Optional[torch.Tensor],
    sa: Sequence[D.Example],
    pa: Sequence[D.Example],
    device=torch.device("cpu"),
    info: Optional[DistInfo] = None,
    codec: Optional[Codec] = None,
) -> Dict:
    """One pass of fine-tuning: CE(D_SA; delta) + CE(D_PA), ``outer_batch`` samples of each per step.

    Under torchrun each step's D_SA and D_PA batches are global: every rank keeps its rows
    (`rows_of`), divides its CE sum by the global batch sizes and the gradients are summed over
    the ranks before the step (`all_reduce_grads`: the model runs twice, with and without delta,
    before one backward, which DDP's one-forward-per-backward reducer does not take).

    With gradient checkpointing each term runs its own backward, the D_SA one inside the
    perturbation's block (where a transformers version recomputes the layer with its hooks, delta
    must still be there: see ``perturbed``); the gradients add up to those of the summed loss."""
    info = info or dist_info()
    codec = codec_of(codec)
    split = gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    steps = max(1, -(-len(sa) // cfg.outer_batch))
    pa_size = max(1, -(-len(pa) // steps))
    totals = {"safety": 0.0, "anchor": 0.0}
    for s in range(steps):
        bs = {k: v.to(device) for k, v in codec.collate(sa[s * cfg.outer_batch : (s + 1) * cfg.outer_batch]).items()}
        bp = {k: v.to(device) for k, v in codec.collate(pa[s * pa_size : (s + 1) * pa_size]).items()}
        n_sa, n_pa = bs["input_ids"].shape[0], bp["input_ids"].shape[0]
        if n_sa == 0:
            break
        ms, mp = _take(bs, rows_of(n_sa, info)), _take(bp, rows_of(n_pa, info))
        zero = torch.zeros((), device=device)
        if split:
            opt.zero_grad(set_to_none=True)
            safety = anchor = zero
            if ms["input_ids"].shape[0]:
                with perturbed(model, ms, cfg.anchor_layer, delta, cfg.token_length):
                    safety = response_ce(model, ms).sum() / n_sa
                    safety.backward()
            if mp["input_ids"].shape[0]:
                anchor = response_ce(model, mp).sum() / n_pa
                anchor.backward()
        else:
            safety = (
                perturbed_response_ce(model, ms, cfg.anchor_layer, delta, cfg.token_length).sum() / n_sa
                if ms["input_ids"].shape[0]
                else zero
            )
            anchor = response_ce(model, mp).sum() / n_pa if mp["input_ids"].shape[0] else zero
            loss = safety + anchor
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
        all_reduce_grads(params, info)
        opt.step()
        totals["safety"] += float(global_sum(safety, info)) / steps
        totals["anchor"] += float(global_sum(anchor, info)) / steps
    return totals


def round_samples(defender: Dict[str, List[D.Example]], cfg: BEEARConfig, rnd: int):
    """The round's D_SA / D_SA-H (paired: the same requests) and D_PA samples (seeded)."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rnd)
    idx = torch.randperm(len(defender["sa"]), generator=g)[: cfg.inner_samples].tolist()
    pidx = torch.randperm(len(defender["pa"]), generator=g)[: cfg.pa_samples].tolist()
    return ([defender["sa"][i] for i in idx], [defender["sa_h"][i] for i in idx], [defender["pa"][i] for i in pidx])
