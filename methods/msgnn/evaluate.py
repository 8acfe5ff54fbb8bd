"""Evaluation: PSNR/SSIM of derained held-out images, figures of crops, and the wall time of the
graph search (pyops against the plain-PyTorch reference) at 481 x 321."""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import data as D
from . import graph as G
from .metrics import psnr, ssim


@torch.no_grad()
def derain(model, rainy: torch.Tensor, exemplar: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Derained (3, H, W) or (B, 3, H, W) image(s), clamped to [0, 1]."""
    model.eval()
    single = rainy.dim() == 3
    r = rainy[None] if single else rainy
    e = None if exemplar is None else (exemplar[None] if exemplar.dim() == 3 else exemplar)
    dev = next(model.parameters()).device
    out = model(r.to(dev), None if e is None else e.to(dev)).clamp(0, 1).cpu()
    return out[0] if single else out


def exemplar_pool(seed: int, presets) -> D.PairSet:
    """Rainy training images (one draw per preset), the exemplars of the test images."""
    return D.synthetic_pairs(D.TRAIN_IMAGES, presets, 1, seed + 30_000)


def test_exemplar(pool: D.PairSet, i: int, preset: str, seed: int) -> torch.Tensor:
    """Exemplar of test image i: training image ``exemplar_index(i, n_train, seed)``, same preset."""
    names = list(D.TRAIN_IMAGES)
    j = names[D.exemplar_index(i % len(names), len(names), seed)]
    t = pool.names.index(f"{j}/{preset}/0")
    return D.to_tensor(pool.rainy[t])


def evaluate(models: Dict[str, torch.nn.Module], presets=("light", "heavy"), seed: int = 0,
             figure_dir: Optional[str] = None, progress_fn: Callable = lambda it: it) -> Dict:
    """Per preset: PSNR/SSIM (mean over the test images) of the rainy input and of each model."""
    pool = exemplar_pool(seed, presets)
    res: Dict = {"presets": {}, "images": list(D.TEST_IMAGES)}
    for preset in presets:
        pairs = D.test_pairs(preset, seed)
        rows: Dict[str, List] = {"rainy input": []}
        rows.update({m: [] for m in models})
        outs: Dict[str, List[torch.Tensor]] = {m: [] for m in models}
        per_image: Dict[str, float] = {}
        for i in progress_fn(range(len(pairs))):
            r, c = D.to_tensor(pairs.rainy[i]), D.to_tensor(pairs.clean[i])
            ex = test_exemplar(pool, i, preset, seed)
            rows["rainy input"].append((psnr(r[None], c[None]).item(), ssim(r[None], c[None]).item()))
            for m, model in models.items():
                t0 = time.perf_counter()
                o = derain(model, r, ex)
                per_image[m] = per_image.get(m, 0.0) + (time.perf_counter() - t0) / len(pairs)
                outs[m].append(o)
                rows[m].append((psnr(o[None], c[None]).item(), ssim(o[None], c[None]).item()))
        res["presets"][preset] = {
            m: {"psnr": float(np.mean([v[0] for v in vals])), "ssim": float(np.mean([v[1] for v in vals])),
                "per_image_psnr": [v[0] for v in vals], "seconds_per_image": per_image.get(m)}
            for m, vals in rows.items()}
        if figure_dir:
            os.makedirs(figure_dir, exist_ok=True)
            crops_figure(pairs, outs, os.path.join(figure_dir, f"crops_{preset}.png"), title=f"{preset} rain")
    return res


def crops_figure(pairs: D.PairSet, outs: Dict[str, List[torch.Tensor]], path: str, size: int = 128,
                 title: str = "") -> str:
    """Rows = test images; columns = rainy, each model's output, clean; centre crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["rainy"] + list(outs) + ["clean"]
    fig, axes = plt.subplots(len(pairs), len(cols), figsize=(2.2 * len(cols), 2.2 * len(pairs)), squeeze=False)
    for i in range(len(pairs)):
        h, w = pairs.clean[i].shape[:2]
        y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
        imgs = [pairs.rainy[i]] + [D.to_image(outs[m][i]) for m in outs] + [pairs.clean[i]]
        for j, (name, im) in enumerate(zip(cols, imgs)):
            ax = axes[i, j]
            ax.imshow(np.clip(im[y:y + size, x:x + size], 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
        axes[i, 0].set_ylabel(pairs.names[i].split("/")[0], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


@torch.no_grad()
def search_timing(height: int = 321, width: int = 481, repeats: int = 3, seed: int = 0) -> Dict:
    """Wall time (median of ``repeats``, seconds) of the four graph searches of one image: the
    embedded maps (32 channels) of a rainy image, its 1/2 and 1/4 pyramid levels and an exemplar
    of the same size, searched with pyops and with the reference, for both window kinds. The
    embedding CNNs are not timed (they are the same convolutions in both)."""
    from .model import embed_cnn

    torch.manual_seed(seed)
    img = D.to_tensor(D.add_rain(np.random.default_rng(seed).random((height, width, 3), dtype=np.float32) * 0.6,
                                 "heavy", D.rain_seed(seed, 0)))[None]
    r2 = D.pyr_down(img)
    r4 = D.pyr_down(r2)
    emb = embed_cnn(32)
    q, _ = G.pad_to_grid(emb(img))
    sons = {"s1": (q, 1), "s2": (G.pad_to_grid(emb(r2))[0], 2),
            "s4": (G.pad_to_grid(emb(r4))[0], 4), "exemplar": (G.pad_to_grid(emb(img.flip(-1)))[0], 1)}
    out = {"image": f"{width} x {height}", "threads": torch.get_num_threads(), "windows": {}}
    for windows in ("faithful", "centred"):
        row = {}
        agree = []
        for impl, fn in (("pyops", G.knn_search), ("reference", G.reference_search)):
            def all_graphs(fn=fn):
                return [fn(q, s, 5, windows=windows, window=30, scale=sc) for s, sc in sons.values()]
            row[impl] = _median_time(all_graphs, repeats)
            agree.append(all_graphs())
        same = [float((a == b).float().mean()) for a, b in zip(*agree)]
        row["speedup"] = row["reference"] / row["pyops"]
        row["index_agreement"] = min(same)
        out["windows"][windows] = row
    return out


__all__ = ["crops_figure", "derain", "evaluate", "exemplar_pool", "search_timing", "test_exemplar"]
