"""Evaluation: PSNR/SSIM of derained held-out images (full images, or a fixed set of seeded test
crops with several rain draws each) or of every pair of a real data set's split, figures of
crops, and the wall time of the graph search (pyops against the plain-PyTorch reference) at
481 x 321."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from methods.common.optional import requires

from . import data as D
from . import graph as G
from .metrics import metric_fns, psnr, ssim


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


def evaluate(
    models: Dict[str, torch.nn.Module],
    presets=tuple(D.PRESETS),
    seed: int = 0,
    progress_fn: Callable = lambda it: it,
    outputs: Optional[Dict] = None,
    metric: str = "rgb",
) -> Dict:
    """Per preset: PSNR/SSIM (mean over the test images) of the rainy input and of each model.
    ``outputs`` (a dict), when given, receives per preset ``(pairs, {model: derained images})``,
    what `crops_figure` draws (the CLI draws them after writing the results). ``metric``: ``rgb``
    or ``y`` (`metrics.metric_fns`)."""
    psnr, ssim = metric_fns(metric)
    pool = exemplar_pool(seed, presets)
    res: Dict = {"presets": {}, "images": list(D.TEST_IMAGES), "metric": metric}
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
            m: {
                "psnr": float(np.mean([v[0] for v in vals])),
                "ssim": float(np.mean([v[1] for v in vals])),
                "per_image_psnr": [v[0] for v in vals],
                "seconds_per_image": per_image.get(m),
            }
            for m, vals in rows.items()
        }
        if outputs is not None:
            outputs[preset] = (pairs, outs)
    return res


def evaluate_pairs(
    models: Dict[str, torch.nn.Module],
    pairs,
    seed: int = 0,
    metric: str = "rgb",
    progress_fn: Callable = lambda it: it,
    keep: int = 0,
) -> Tuple[Dict, Optional[Tuple[D.PairSet, Dict[str, List[torch.Tensor]]]]]:
    """PSNR/SSIM of the rainy input and of each model on every pair of a real data set split
    (`datasets.FilePairs`, read one pair at a time), full images.

    The exemplar of pair i is another rainy image of the same split, by the seeded rule of training
    (`data.exemplar_table`: a fixed other image, never another rainy version of the same clean
    image). Returns ``(results, figure)``: results hold the means and, per pair, its name and
    values; ``figure`` is ``(PairSet, {model: outputs})`` of the first ``keep`` pairs (None when
    ``keep`` is 0), for `crops_figure`."""
    pfn, sfn = metric_fns(metric)
    ex = D.exemplar_table(pairs.names, seed)
    names = ["rainy input", *models]
    vals: Dict[str, List[Tuple[float, float]]] = {m: [] for m in names}
    secs: Dict[str, float] = {m: 0.0 for m in models}
    kept_r, kept_c, outs = [], [], {m: [] for m in models}
    for i in progress_fn(range(len(pairs))):
        r_img, c_img = pairs.rainy(i), pairs.clean(i)
        r, c = D.to_tensor(r_img), D.to_tensor(c_img)
        e = D.to_tensor(pairs.rainy(ex[i]))
        vals["rainy input"].append((pfn(r[None], c[None]).item(), sfn(r[None], c[None]).item()))
        for m, model in models.items():
            t0 = time.perf_counter()
            o = derain(model, r, e)
            secs[m] += time.perf_counter() - t0
            vals[m].append((pfn(o[None], c[None]).item(), sfn(o[None], c[None]).item()))
            if i < keep:
                outs[m].append(o)
        if i < keep:
            kept_r.append(r_img)
            kept_c.append(c_img)
    n = len(pairs)
    res = {
        "dataset": pairs.title,
        "split": pairs.split,
        "folder": pairs.folder,
        "layout": pairs.layout,
        "metric": metric,
        "seed": seed,
        "pairs": n,
        "skipped": [str(e) for e in pairs.skipped],
        "models": {
            m: {
                "psnr": float(np.mean([v[0] for v in vals[m]])),
                "ssim": float(np.mean([v[1] for v in vals[m]])),
                "seconds_per_image": secs[m] / n if m in secs else None,
            }
            for m in names
        },
        "per_pair": [
            {"name": pairs.names[i], "exemplar": pairs.names[ex[i]], **{m: list(vals[m][i]) for m in names}}
            for i in range(n)
        ],
    }
    figure = (D.PairSet(kept_c, kept_r, pairs.names[: len(kept_r)]), outs) if keep else None
    return res, figure


# ------------------------------------------------------------------------------------------
# Seeded test crops (the acceptance's test set)
# ------------------------------------------------------------------------------------------
@dataclass
class CropSet:
    """Test items of one rain preset: ``rainy``, ``clean``, ``exemplar`` (N, 3, S, S) and, per item,
    its ``crop`` id (the same for every rain draw of one crop position), ``draw`` and ``name``."""

    preset: str
    rainy: torch.Tensor
    clean: torch.Tensor
    exemplar: torch.Tensor
    crop: List[int]
    draw: List[int]
    names: List[str]

    def __len__(self):
        return len(self.names)


def crop_positions(h: int, w: int, size: int, n: int, rng: np.random.Generator) -> List[Tuple[int, int]]:
    """``n`` non-overlapping ``size`` x ``size`` crops of an (h, w) image: the image is cut into a
    grid of (h // size) x (w // size) cells, ``n`` cells are picked by ``rng`` (row-major order) and
    each crop sits at a random offset inside its cell."""
    rows, cols = h // size, w // size
    if rows * cols < n:
        raise ValueError(
            f"a {h} x {w} image holds only {rows * cols} non-overlapping {size} x {size} crops, {n} were asked for"
        )
    ch, cw = h // rows, w // cols
    out = []
    for cell in sorted(int(c) for c in rng.choice(rows * cols, n, replace=False)):
        r, c = divmod(cell, cols)
        out.append((r * ch + int(rng.integers(0, ch - size + 1)), c * cw + int(rng.integers(0, cw - size + 1))))
    return out


@functools.lru_cache(maxsize=4)
def held_out_crops(
    preset: str,
    size: int = 112,
    per_image: int = 8,
    draws: int = 3,
    seed: int = 0,
    images: Sequence[str] = D.TEST_IMAGES,
) -> CropSet:
    """The held-out crop test set of one rain preset, a function of its arguments only (cached per
    process: do not modify the tensors).

    - ``per_image`` non-overlapping crops per test image (``crop_positions``), at positions seeded
      by (seed, image) only, so light and heavy rain share them;
    - ``draws`` rain draws per image, each drawn on the full image and then cropped, seeded by
      (seed, image, preset, draw) and disjoint from the training rain (seeds 40,000 up);
    - the exemplar of every item: a crop of the same size, at a seeded position, of the test
      image's exemplar training image under the same preset (the rule and rainy pool of
      ``evaluate``: ``exemplar_index`` and seed + 30,000), the same for every draw. A same-size
      crop, as in training, rather than the full training image that ``evaluate`` uses.
    """
    if preset not in D.PRESETS:
        raise ValueError(f"unknown rain preset {preset!r}; one of {tuple(D.PRESETS)}")
    if draws < 1 or per_image < 1:
        raise ValueError("draws and per_image must be >= 1")
    if set(images) & set(D.TRAIN_IMAGES):
        raise ValueError(
            f"test crops must come from held-out images; {sorted(set(images) & set(D.TRAIN_IMAGES))} "
            "are training images"
        )
    pidx = list(D.PRESETS).index(preset)  # stable whatever presets the caller evaluates
    train = list(D.TRAIN_IMAGES)
    rs, cs, es, crop_ids, draw_ids, names = [], [], [], [], [], []
    for i, name in enumerate(images):
        img = D.skimage_image(name)
        rng = D.rain_seed(seed + 50_000, i)
        pos = crop_positions(img.shape[0], img.shape[1], size, per_image, rng)
        j = D.exemplar_index(i % len(train), len(train), seed)  # the rule of test_exemplar
        ex_img = D.add_rain(D.skimage_image(train[j]), preset, D.rain_seed(seed + 30_000, j, pidx, 0))
        eh, ew = ex_img.shape[:2]
        if min(eh, ew) < size:
            raise ValueError(f"exemplar image {train[j]} ({eh} x {ew}) is smaller than the {size} x {size} crops")
        ex_pos = [(int(rng.integers(0, eh - size + 1)), int(rng.integers(0, ew - size + 1))) for _ in pos]
        for d in range(draws):
            rainy = D.add_rain(img, preset, D.rain_seed(seed + 40_000, i, pidx, d))
            for c, ((y, x), (ey, ex)) in enumerate(zip(pos, ex_pos)):
                rs.append(D.to_tensor(rainy[y : y + size, x : x + size]))
                cs.append(D.to_tensor(img[y : y + size, x : x + size]))
                es.append(D.to_tensor(ex_img[ey : ey + size, ex : ex + size]))
                crop_ids.append(i * per_image + c)
                draw_ids.append(d)
                names.append(f"{name}@{y},{x}/{preset}/{d}")
    return CropSet(preset, torch.stack(rs), torch.stack(cs), torch.stack(es), crop_ids, draw_ids, names)


@torch.no_grad()
def evaluate_crops(model: Optional[torch.nn.Module], crops: CropSet, batch: int = 8) -> Dict[str, List[float]]:
    """Per-item PSNR and SSIM of a model's output on a CropSet (``model=None``: of the rainy input)."""
    ps, ss = [], []
    for a in range(0, len(crops), batch):
        r, c = crops.rainy[a : a + batch], crops.clean[a : a + batch]
        o = r if model is None else derain(model, r, crops.exemplar[a : a + batch])
        ps += psnr(o, c).tolist()
        ss += ssim(o, c).tolist()
    return {"psnr": ps, "ssim": ss}


def crops_figure(
    pairs: D.PairSet, outs: Dict[str, List[torch.Tensor]], path: str, size: int = 128, title: str = ""
) -> str:
    """Rows = test images; columns = rainy, each model's output, clean; centre crops."""
    with requires("methods"):
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
            ax.imshow(np.clip(im[y : y + size, x : x + size], 0, 1))
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
    img = D.to_tensor(
        D.add_rain(
            np.random.default_rng(seed).random((height, width, 3), dtype=np.float32) * 0.6,
            "heavy",
            D.rain_seed(seed, 0),
        )
    )[None]
    r2 = D.pyr_down(img)
    r4 = D.pyr_down(r2)
    emb = embed_cnn(32)
    q, _ = G.pad_to_grid(emb(img))
    sons = {
        "s1": (q, 1),
        "s2": (G.pad_to_grid(emb(r2))[0], 2),
        "s4": (G.pad_to_grid(emb(r4))[0], 4),
        "exemplar": (G.pad_to_grid(emb(img.flip(-1)))[0], 1),
    }
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


__all__ = [
    "CropSet",
    "crop_positions",
    "crops_figure",
    "derain",
    "evaluate",
    "evaluate_crops",
    "evaluate_pairs",
    "exemplar_pool",
    "held_out_crops",
    "search_timing",
    "test_exemplar",
]
