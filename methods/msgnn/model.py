"""MSGNN (Wang et al., IJCAI 2024): a dense residual deraining network whose four groups are
fused with the outputs of four k-NN patch graphs (scales 1, 1/2, 1/4 and an exemplar image).

Architecture (spec A3, official ``ODE_DerainNet``), C = 32, LReLU = LeakyReLU(0.2):

* ``convert``: conv3x3 3->C; ``body`` groups: ``DenseConnection`` of 12 GCT residual blocks;
* four graph branches: son features = conv3x3 + LReLU + ``Dense(4)`` of the son image; the
  search runs on two embedding CNNs (son, query; [conv3x3 + LReLU] x 3); edge weights =
  ``softmax_k(MLP(per-channel L1 patch difference))``; aggregated son patches (``pyops``);
* ``fuse[g]`` = conv1x1(5C->C) + LReLU + conv1x1 over ``[body, x1, x2, x4, x_exemplar]`` feeds
  group g+1; output = ``O - out(body of the last group)``.

The graph outputs do not depend on the backbone, so they are computed once per forward (the
official code recomputes identical values in each group). Modules the official code builds but
never uses (``fuse[3]``, the last unit's 1x1 conv of every group, the last group's fusion conv,
``knn_downsample``, ``weightnet_lr``) are not built.

Modes:

* ``faithful``: the official behaviour. The embedding CNNs keep their random initialisation (the
  edge features are detached there, so no gradient ever reaches them) and the candidate window
  is the official one (offset for scales 1, 4 and the exemplar at test time; global on 64 x 64
  training crops).
* ``fixed``: the embeddings learn (the edge features carry gradient to them), the windows
  are centred on the query's position in the son grid, and the edge MLP has no output bias
  and no bias on its residual branch's last layer (both only shift all k logits of the
  softmax alike: their gradient is exactly zero; ``WeightNet``).

``graphs=False`` is the no-graph ablation: the same backbone, each group feeding the next.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import graph as G
from .data import pyr_down

MODES = ("faithful", "fixed")


def _lrelu():
    return nn.LeakyReLU(0.2)


class GCT(nn.Module):
    """Gated channel transform, l2 mode: ``x * (1 + tanh(alpha*||x||_hw * gamma / rms_c + beta))``."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.eps = eps

    def forward(self, x):
        emb = (x.pow(2).sum((2, 3), keepdim=True) + self.eps).sqrt() * self.alpha
        norm = self.gamma / (emb.pow(2).mean(1, keepdim=True) + self.eps).sqrt()
        return x * (1.0 + torch.tanh(emb * norm + self.beta))


class ResBlock(nn.Module):
    """``x + conv3x3(LReLU(conv3x3(gate(x))))``; gate = GCT (backbone) or identity (branches)."""

    def __init__(self, c: int, gct: bool):
        super().__init__()
        self.gate = GCT(c) if gct else nn.Identity()
        self.res = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), _lrelu(), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, x):
        return x + self.res(self.gate(x))


class DenseGroup(nn.Module):
    """Units ``tmp_i = RB_i(out (+ input_fusion))``, ``out = LReLU(conv1x1(cat[x, tmp_0..i]))``.

    ``gct=True`` is the backbone's ``DenseConnection`` (returns ``(tmp_last, fusion)``, fusion =
    LReLU(conv1x1(cat tmp_0..last)), None for the last group); ``gct=False`` is the branches'
    ``Dense`` (returns the last ``out``)."""

    def __init__(self, c: int, units: int, gct: bool, fusion: bool):
        super().__init__()
        self.gct = gct
        self.units = nn.ModuleList(ResBlock(c, gct) for _ in range(units))
        n_mix = units - 1 if gct else units  # the backbone's last mixing conv is never used
        self.mix = nn.ModuleList(nn.Sequential(nn.Conv2d((i + 2) * c, c, 1), _lrelu()) for i in range(n_mix))
        self.fusion = nn.Sequential(nn.Conv2d(units * c, c, 1), _lrelu()) if fusion else None

    def forward(self, x, input_fusion=None):
        cat, outs, out = [x], [], x
        for i, unit in enumerate(self.units):
            tmp = unit(out if input_fusion is None else out + input_fusion)
            cat.append(tmp)
            outs.append(tmp)
            if i < len(self.mix):
                out = self.mix[i](torch.cat(cat, 1))
        if not self.gct:
            return out
        return tmp, (self.fusion(torch.cat(outs, 1)) if self.fusion is not None else None)


def embed_cnn(c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, 1, 1), _lrelu(), nn.Conv2d(c, c, 3, 1, 1), _lrelu(), nn.Conv2d(c, c, 3, 1, 1), _lrelu()
    )


class WeightNet(nn.Module):
    """The edge MLP (official ``weightnet_hr``, 1x1 convs = a per-patch MLP): C -> C -> residual
    [LReLU, C -> C] -> 1.

    Its k outputs per query patch feed a softmax over the k neighbours, which ignores a shift
    common to all k. Two biases only add such a shift, so their gradient is exactly zero: the
    output layer's bias, and the bias of the residual branch's last layer (added after the last
    nonlinearity, it reaches the output as the same constant on every neighbour). The official
    code has both (``conv(..., bias=True)``); ``bias=False`` drops them (``fixed`` mode)."""

    def __init__(self, c: int, dead_biases: bool = True):
        super().__init__()
        self.inp = nn.Linear(c, c)
        self.res = nn.Sequential(nn.Linear(c, c), _lrelu(), nn.Linear(c, c, bias=dead_biases))
        self.outp = nn.Linear(c, 1, bias=dead_biases)
        if not dead_biases:
            self._register_load_state_dict_pre_hook(_drop_dead_biases)

    def forward(self, d):
        y = self.inp(d)
        return self.outp(y + self.res(y)).squeeze(-1)


def _drop_dead_biases(state_dict, prefix, *args):
    """Loading a checkpoint written before ``fixed`` mode dropped the two dead biases: they only
    shifted all k logits alike, so leaving them out changes no edge weight."""
    for name in ("res.2.bias", "outp.bias"):
        state_dict.pop(prefix + name, None)


class PatchGraph(nn.Module):
    """One graph: son features, embeddings, search, edge weights, aggregation."""

    def __init__(self, c: int, scale: int, k: int, window: int, mode: str):
        super().__init__()
        self.scale, self.k, self.window, self.mode = scale, k, window, mode
        self.features = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), _lrelu(), DenseGroup(c, 4, gct=False, fusion=False))
        self.embed_son = embed_cnn(c)
        self.embed_query = embed_cnn(c)
        self.weight_net = WeightNet(c, dead_biases=mode == "faithful")
        if mode == "faithful":
            for p in list(self.embed_son.parameters()) + list(self.embed_query.parameters()):
                p.requires_grad_(False)

    def search(self, son: torch.Tensor, query: torch.Tensor):
        """(idx (B, m, k), edge features (B, m, k, C), query padding) for son/query images."""
        grad = self.mode == "fixed" and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            xe, _ = G.pad_to_grid(self.embed_son(son))
            ye, qpad = G.pad_to_grid(self.embed_query(query))
            windows = "faithful" if self.mode == "faithful" else "centred"
            idx = G.knn_search(ye.detach(), xe.detach(), self.k, windows=windows, window=self.window, scale=self.scale)
            diff = G.edge_features(ye, xe, idx)
        return idx, diff, qpad

    def forward(self, son: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        idx, diff, qpad = self.search(son, query)
        w = torch.softmax(self.weight_net(diff), dim=-1)
        feat = self.features(son)
        size = (query.shape[-2] + qpad[0] + qpad[1], query.shape[-1] + qpad[2] + qpad[3])
        return G.aggregate(feat, idx, w, size, qpad)


class MSGNN(nn.Module):
    def __init__(
        self,
        mode: str = "faithful",
        graphs: bool = True,
        channels: int = 32,
        groups: int = 4,
        units: int = 12,
        k: int = 5,
        window: int = 30,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if groups < 1 or units < 1 or channels < 1 or k < 1 or window < 3:
            raise ValueError("groups, units, channels and k must be >= 1 and window >= 3")
        self.mode, self.graphs, self.k = mode, graphs, k
        c = channels
        self.convert = nn.Conv2d(3, c, 3, 1, 1)
        self.body = nn.ModuleList(DenseGroup(c, units, gct=True, fusion=g < groups - 1) for g in range(groups))
        if graphs:
            self.graph = nn.ModuleDict(
                {
                    name: PatchGraph(c, scale, k, window, mode)
                    for name, scale in (("s1", 1), ("s2", 2), ("s4", 4), ("exemplar", 1))
                }
            )
            self.fuse = nn.ModuleList(
                nn.Sequential(nn.Conv2d(5 * c, c, 1), _lrelu(), nn.Conv2d(c, c, 1)) for _ in range(groups - 1)
            )
        self.out = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), _lrelu(), nn.Conv2d(c, 3, 1))

    def check_inputs(self, rainy: torch.Tensor, exemplar) -> None:
        for name, x in (("rainy", rainy), ("exemplar", exemplar)):
            if x is None:
                continue
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(
                    f"MSGNN: {name} must be a (B, 3, H, W) RGB tensor, got "
                    f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                )
            if not x.is_floating_point():
                raise TypeError(f"MSGNN: {name} must be a floating-point tensor in [0, 1], got {x.dtype}")
            if not torch.isfinite(x).all():
                raise ValueError(f"MSGNN: {name} contains NaN or infinite values")
        if self.graphs:
            G.check_image_sizes(rainy.shape[-2], rainy.shape[-1], self.k, "rainy image")
            if exemplar is not None:
                if exemplar.shape[0] != rainy.shape[0]:
                    raise ValueError(
                        f"MSGNN: exemplar batch size {exemplar.shape[0]} != rainy batch size {rainy.shape[0]}"
                    )
                G.check_image_sizes(exemplar.shape[-2], exemplar.shape[-1], self.k, "exemplar", levels=1)

    def graph_features(self, rainy: torch.Tensor, exemplar: torch.Tensor):
        r2 = pyr_down(rainy)
        r4 = pyr_down(r2)
        sons = {"s1": rainy, "s2": r2, "s4": r4, "exemplar": exemplar}
        return [self.graph[name](sons[name], rainy) for name in ("s1", "s2", "s4", "exemplar")]

    def forward(self, rainy: torch.Tensor, exemplar: torch.Tensor | None = None) -> torch.Tensor:
        """Derained image (B, 3, H, W) of a rainy (B, 3, H, W) image in [0, 1]. ``exemplar``: the
        external rainy image of the fourth graph (any size of at least 7 x 7); default: the input."""
        self.check_inputs(rainy, exemplar)
        xs = self.graph_features(rainy, rainy if exemplar is None else exemplar) if self.graphs else None
        temp, fusion = self.convert(rainy), None
        for g, group in enumerate(self.body):
            body, fusion = group(temp, fusion)
            if g < len(self.body) - 1:
                temp = self.fuse[g](torch.cat([body, *xs], 1)) if self.graphs else body
        return rainy - self.out(body)


def count_parameters(model: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


__all__ = ["MODES", "MSGNN", "count_parameters"]
