"""Evaluation on held-out simulated studies: PSNR, SSIM and relative RMSE per frame (mean over
frames and studies) and the lesion time-activity curve's bias and standard deviation, for MLEM
(iteration count chosen on validation studies), KEM-ST and any trained networks; figures."""

from typing import Dict, List, Optional

import numpy as np
import torch

from methods.common.optional import requires

from .kem import KemConfig, kem_st
from .models import corrected_sinograms, reconstruct
from .recon import mlem
from .simulate import LABELS, Scanner, simulate_study
from .train import TEST_SEED0, VAL_SEED0, EvalConfig, load_trained, rel_rmse


def frame_metrics(x: torch.Tensor, truth: torch.Tensor) -> Dict[str, np.ndarray]:
    with requires("methods"):
        from skimage.metrics import structural_similarity

    x, truth = x.double().cpu().numpy(), truth.double().cpu().numpy()
    psnr, ssim = [], []
    for a, t in zip(x, truth):
        rng = float(t.max() - t.min()) or 1.0
        mse = float(((a - t) ** 2).mean())
        psnr.append(10 * np.log10(rng**2 / max(mse, 1e-30)))
        ssim.append(structural_similarity(a, t, data_range=rng))
    rr = rel_rmse(torch.from_numpy(x), torch.from_numpy(truth)).numpy()
    return {"psnr": np.array(psnr), "ssim": np.array(ssim), "rel_rmse": rr}


def region_tac(x: torch.Tensor, labels: torch.Tensor, region: str) -> np.ndarray:
    m = labels == LABELS[region]
    return x[:, m].mean(1).double().cpu().numpy()


def choose_iterations(method, studies, A, candidates: List[int]) -> int:
    """The iteration count (among candidates) with the lowest mean rel RMSE on `studies`."""
    best, best_err = candidates[0], float("inf")
    for it in candidates:
        errs = [rel_rmse(method(st, it), st.frames).mean().item() for st in studies]
        if np.mean(errs) < best_err:
            best, best_err = it, float(np.mean(errs))
    return best


def evaluate(
    checkpoints: Dict[str, str],
    *,
    n: int = EvalConfig.n,
    views: int = EvalConfig.views,
    counts=EvalConfig.counts,
    test_studies: int = EvalConfig.test_studies,
    val_studies: int = EvalConfig.val_studies,
    mlem_iters=(1, 2, 3, 5, 10, 20, 30, 50, 80),
    kem_iters=(10, 20, 30, 50),
    figure_dir: Optional[str] = None,
    progress_fn=None,
    figure_methods: Optional[List[str]] = None,
    device=None,
    example: Optional[Dict] = None,
) -> Dict:
    """The table over ``test_studies`` held-out studies for MLEM, KEM-ST and every network in
    ``checkpoints`` (name -> checkpoint file or run folder; the networks run on ``device``, MLEM
    and KEM-ST on the CPU). The figures show the first test study, with the columns
    ``figure_methods`` (default: all): drawn into ``figure_dir`` when given, or, with ``example``
    (a dict), left there as ``{"study", "recs"}`` for `figures` (the CLI draws them after writing
    the results)."""
    sc = Scanner(n=n, views=views)
    A = sc.projector()
    val = [simulate_study(VAL_SEED0 + i, sc, counts=counts, projector=A) for i in range(val_studies)]
    run_mlem = lambda st, it: mlem(st.sinograms, A, st.attenuation, st.background, st.scale, it)
    run_kem = lambda st, it: kem_st(st.sinograms, A, st.attenuation, st.background, st.scale, it, KemConfig())
    it_mlem = choose_iterations(run_mlem, val, A, list(mlem_iters))
    it_kem = choose_iterations(run_kem, val, A, list(kem_iters))
    nets = {}
    for name, path in checkpoints.items():
        model, cfg, op = load_trained(path, device if device is not None else torch.device("cpu"))
        if (cfg.n, cfg.views) != (n, views):
            raise ValueError(f"{path}: trained on n={cfg.n}, views={cfg.views}, evaluating n={n}, views={views}")
        nets[name] = (model, op)
    names = ["MLEM", "KEM-ST", *nets]
    per = {m: {"psnr": [], "ssim": [], "rel_rmse": [], "lesion_err": []} for m in names}
    first = None
    studies = range(test_studies)
    for i in progress_fn(studies) if progress_fn else studies:
        st = simulate_study(TEST_SEED0 + i, sc, counts=counts, projector=A)
        recs = {"MLEM": run_mlem(st, it_mlem), "KEM-ST": run_kem(st, it_kem)}
        with torch.no_grad():
            for name, (model, op) in nets.items():
                dev = next(model.parameters()).device
                data = (t.to(dev) for t in (st.sinograms, st.attenuation, st.background, st.scale))
                yc = corrected_sinograms(*data, op)
                recs[name] = reconstruct(model, yc).clamp_min(0).cpu()
        true_les = region_tac(st.frames, st.labels, "lesion")
        for m, x in recs.items():
            fm = frame_metrics(x, st.frames)
            for k, v in fm.items():
                per[m][k].append(v)
            per[m]["lesion_err"].append((region_tac(x, st.labels, "lesion") - true_les) / true_les)
        if first is None:
            first = (st, recs)
    table = {}
    for m in names:
        les = np.array(per[m]["lesion_err"])  # (studies, T)
        table[m] = {
            "psnr": float(np.mean(per[m]["psnr"])),
            "ssim": float(np.mean(per[m]["ssim"])),
            "rel_rmse": float(np.mean(per[m]["rel_rmse"])),
            "lesion_bias_pct": float(100 * np.abs(les.mean(0)).mean()),
            "lesion_std_pct": float(100 * les.std(0).mean()),
        }
    # per test study (mean over frames), for paired differences over the studies
    per_study = {m: {k: [float(np.mean(v)) for v in per[m][k]] for k in ("psnr", "ssim", "rel_rmse")} for m in names}
    out = {
        "table": table,
        "per_study": per_study,
        "mlem_iterations": it_mlem,
        "kem_iterations": it_kem,
        "test_studies": test_studies,
        "val_studies": val_studies,
        "n": n,
        "views": views,
        "counts": counts,
    }
    if first is not None:
        recs = first[1] if figure_methods is None else {m: first[1][m] for m in figure_methods}
        if example is not None:
            example.update(study=first[0], recs=recs)
        if figure_dir is not None:
            out["figures"] = figures(first[0], recs, figure_dir)
    return out


def figures(st, recs: Dict[str, torch.Tensor], out_dir: str, frames=(5, 13, 23)) -> List[str]:
    import os

    with requires("methods"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    cols = {"truth": st.frames, **recs}
    fig, axes = plt.subplots(len(frames), len(cols), figsize=(2.2 * len(cols), 2.2 * len(frames)), dpi=110)
    mid = 0.5 * (st.edges_min[:-1] + st.edges_min[1:])
    for r, t in enumerate(frames):
        vmax = float(st.frames[t].max())
        for c, (name, x) in enumerate(cols.items()):
            ax = axes[r, c]
            ax.imshow(x[t].cpu().numpy(), cmap="hot", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"frame {t + 1}\n{mid[t]:.1f} min", fontsize=8)
    fig.tight_layout()
    p1 = os.path.join(out_dir, "frames.png")
    fig.savefig(p1)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    for ax, region in zip(axes, ("lesion", "grey")):
        for name, x in cols.items():
            ax.plot(
                mid,
                region_tac(x, st.labels, region),
                "k-" if name == "truth" else "-",
                label=name,
                lw=2 if name == "truth" else 1,
            )
        ax.set_title(f"{region} time-activity curve")
        ax.set_xlabel("time (min)")
        ax.set_ylabel("kBq/ml")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p2 = os.path.join(out_dir, "tacs.png")
    fig.savefig(p2)
    plt.close(fig)
    return [p1, p2]
