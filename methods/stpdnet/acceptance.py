"""Acceptance experiment (issues #7 and #25): train DeepPET, LPD and STPDnet (default CPU
configurations) with several training seeds on low-count studies simulated on the fly, then
compare them with MLEM (iteration count chosen on validation studies) and KEM-ST on the same
held-out test studies.

    python -m methods.stpdnet.acceptance [--seeds 0 1 2] [--steps 500] [--test-studies 8] [--workers 2]

Every training run is resumable (its own run folder under --out) and runs in one of --workers
single-thread processes; the evaluation then runs in this process. MLEM and KEM-ST have no
training seed (one deterministic reconstruction per study): their rows carry ``seed: null``.
The spread over training seeds is the std and range of the per-seed means, and every claim "A
beats B" is the paired per-seed difference with its 95% t interval. Writes
results/acceptance.{md,json} and results/frames.png, results/tacs.png (seed 0's networks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

import numpy as np

from methods.common import format_difference, optional_plots, paired_difference, seed_values
from methods.common.acceptance import acceptance_meta, run_jobs, started_date, write_acceptance

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {"deeppet": "DeepPET", "lpd": "LPD", "stpdnet": "STPDnet"}
FIXED = ["MLEM", "KEM-ST"]
METRICS = {
    "psnr": ("PSNR (dB)", "{:.2f}", +1),
    "ssim": ("SSIM", "{:.3f}", +1),
    "rmse": ("relative RMSE", "{:.4f}", -1),
    "tac_bias": ("lesion TAC bias (%)", "{:.1f}", -1),
}


def run_folder(out: str, model: str, seed: int) -> str:
    return os.path.join(out, f"{model}_seed{seed}")


def train_job(job: Dict) -> Dict:
    """One training run in a worker: job = {model, seed, steps, out}."""
    from methods.common import Run

    from .train import TrainConfig, train

    cfg = TrainConfig(model=job["model"], steps=job["steps"], seed=job["seed"])
    run = Run(job["folder"], {"model": cfg.model, "steps": cfg.steps, "seed": cfg.seed}, name="stpdnet")
    t0 = time.perf_counter()
    rows = train(cfg, run, show_progress=False)
    run.close()
    return {
        **job,
        "checkpoint": run.checkpoints.latest(),
        "config": cfg.__dict__,
        "train_minutes": (rows[-1]["seconds"] if rows else time.perf_counter() - t0) / 60,
        "final_val_rel_rmse": rows[-1]["val_rel_rmse"] if rows else None,
    }


def result_rows(table: Dict[str, Dict], runs: List[Dict]) -> List[Dict]:
    """The issue's rows {method, seed, psnr, ssim, rmse, tac_bias} (+ tac_std) from evaluate's table,
    whose trained entries are keyed '<method> seed <s>'."""
    rows = []
    for m in FIXED:
        r = table[m]
        rows.append(
            {
                "method": m,
                "seed": None,
                "psnr": r["psnr"],
                "ssim": r["ssim"],
                "rmse": r["rel_rmse"],
                "tac_bias": r["lesion_bias_pct"],
                "tac_std": r["lesion_std_pct"],
            }
        )
    for j in runs:
        name = NAMES[j["model"]]
        r = table[f"{name} seed {j['seed']}"]
        rows.append(
            {
                "method": name,
                "seed": j["seed"],
                "psnr": r["psnr"],
                "ssim": r["ssim"],
                "rmse": r["rel_rmse"],
                "tac_bias": r["lesion_bias_pct"],
                "tac_std": r["lesion_std_pct"],
                "train_minutes": j["train_minutes"],
            }
        )
    return rows


def summarize(rows: List[Dict], seeds: List[int]) -> Dict:
    """Per method: mean, std and range over seeds of each metric; the paired per-seed differences
    STPDnet - each other network, and each network - KEM-ST / - MLEM (their values are the same for
    every seed, so those intervals are the seed spread of the network alone)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def values(m, k):
        return seed_values(rows, seeds, k, method=m)

    per = {}
    for m in methods:
        per[m] = {}
        for k in METRICS:
            v = np.array(values(m, k), dtype=np.float64)
            per[m][k] = {
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if m not in FIXED and v.size > 1 else 0.0,
                "min": float(v.min()),
                "max": float(v.max()),
            }
    pairs = {}
    nets = sorted((m for m in methods if m not in FIXED), key=lambda m: m != "STPDnet")
    for a in nets:
        others = [b for b in nets if b != a and a == "STPDnet"] + FIXED
        for b in others:
            pairs[f"{a} - {b}"] = {k: paired_difference(values(a, k), values(b, k)) for k in METRICS}
    return {"per_method": per, "paired": pairs}


def per_study_differences(per_study: Dict[str, Dict[str, List[float]]], seeds: List[int]) -> Dict:
    """The test-set extra: per test study, STPDnet (averaged over the training seeds) minus each
    other method (a network likewise averaged), and its mean and 95% t interval over the studies.
    This interval reflects the spread over test studies, which the per-seed intervals against MLEM
    and KEM-ST (one deterministic value each) leave out."""

    def study_means(method):
        keys = [method] if method in FIXED else [f"{method} seed {s}" for s in seeds]
        if any(k not in per_study for k in keys):
            return None
        return {k: np.mean([per_study[key][k] for key in keys], axis=0) for k in ("psnr", "ssim", "rel_rmse")}

    a = study_means("STPDnet")
    out = {}
    if a is None:
        return out
    for b in ["LPD", "DeepPET"] + FIXED:
        vb = study_means(b)
        if vb is not None:
            out[f"STPDnet - {b}"] = {("rmse" if k == "rel_rmse" else k): paired_difference(a[k], vb[k]) for k in a}
    return out


def markdown(meta: Dict, summary: Dict, settings: Dict) -> str:
    per, pairs = summary["per_method"], summary["paired"]
    lines = [
        "# STPDnet acceptance: simulated low-count dynamic PET (64 x 64, 60 views, 24 frames over 60 min)",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; machine: {meta['machine']}; training seeds {meta['seeds']}; "
        f"{meta['workers']} single-thread training workers; training {settings['worker_minutes']:.0f} worker-minutes "
        f"in all (the runs' own times); this invocation {meta['minutes']:.1f} min (runs already trained are resumed, "
        "not retrained)",
        f"- {settings['test_studies']} test studies and {settings['val_studies']} validation studies (seeds disjoint "
        f"from training), the same for every method and seed; {settings['steps']} training steps per network",
        f"- MLEM: {settings['mlem_iterations']} iterations, KEM-ST: {settings['kem_iterations']} iterations "
        "(each the best on the validation studies); no training seed, so no spread",
        "- per-frame metrics averaged over frames and test studies, then mean ± std (min-max) over training seeds; "
        "lesion TAC bias: mean over frames of |bias| of the lesion's mean activity",
        "",
        "| method | " + " | ".join(v[0] for v in METRICS.values()) + " | training (min, max over seeds) |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for m, d in per.items():
        cells = []
        for k, (_, fmt, _) in METRICS.items():
            s = d[k]
            if m in FIXED:
                cells.append(fmt.format(s["mean"]))
            else:
                cells.append(
                    f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"
                )
        tr = settings["train_minutes"].get(m)
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {tr:.1f} |"
            if tr is not None
            else f"| {m} | " + " | ".join(cells) + " | - |"
        )
    lines += [
        "",
        "Paired per-seed differences A - B, mean [95% t interval] over the training seeds "
        "(better for A: positive PSNR / SSIM, negative RMSE / bias):",
        "",
        "| A - B | " + " | ".join(v[0] for v in METRICS.values()) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name, d in pairs.items():
        cells = [format_difference(d[k], "{:+.4f}" if k in ("ssim", "rmse") else "{:+.2f}") for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if summary.get("per_study"):
        ps = summary["per_study"]
        n = next(iter(ps.values()))["psnr"]["n"]
        lines += [
            "",
            f"Per test study ({n} studies; training seeds averaged), STPDnet - B, mean [95% t interval] over "
            "the studies (the test-set spread, which the per-seed intervals against MLEM / KEM-ST leave out):",
            "",
            "| A - B | PSNR (dB) | SSIM | relative RMSE |",
            "|---|---|---|---|",
        ]
        for name, d in ps.items():
            lines.append(
                f"| {name} | {format_difference(d['psnr'])} | {format_difference(d['ssim'], '{:+.4f}')} | "
                f"{format_difference(d['rmse'], '{:+.4f}')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m methods.stpdnet.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--models", nargs="+", default=["stpdnet", "lpd", "deeppet"], choices=list(NAMES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--test-studies", type=int, default=8)
    p.add_argument("--val-studies", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/stpdnet_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    from methods.common import progress

    from .evaluate import evaluate, figures

    t0 = time.time()
    date = started_date(a.out)
    # the longest runs first, so that the two workers finish together
    jobs = [
        {"model": m, "seed": s, "steps": a.steps, "folder": run_folder(a.out, m, s)} for m in a.models for s in a.seeds
    ]
    done = run_jobs(
        train_job,
        jobs,
        a.workers,
        lambda r: (
            f"{NAMES[r['model']]} seed {r['seed']}: {r['train_minutes']:.1f} min, "
            f"val rel RMSE {r['final_val_rel_rmse']}"
        ),
    )
    done.sort(key=lambda r: (a.models.index(r["model"]), r["seed"]))
    ckpts = {f"{NAMES[r['model']]} seed {r['seed']}": r["checkpoint"] for r in done}
    first = [f"{NAMES[m]} seed {a.seeds[0]}" for m in reversed(a.models)]
    example = {}
    res = evaluate(
        ckpts,
        test_studies=a.test_studies,
        val_studies=a.val_studies,
        example=example,
        figure_methods=FIXED + first,
        progress_fn=lambda it: progress(it, desc="test studies"),
    )
    rows = result_rows(
        res["table"], sorted(done, key=lambda r: (list(reversed(a.models)).index(r["model"]), r["seed"]))
    )
    summary = summarize(rows, a.seeds)
    summary["per_study"] = per_study_differences(res["per_study"], a.seeds)
    meta = acceptance_meta(
        "methods.stpdnet.acceptance", argv, date, a.seeds, a.workers, minutes=(time.time() - t0) / 60
    )
    settings = {
        "steps": a.steps,
        "test_studies": a.test_studies,
        "val_studies": a.val_studies,
        "mlem_iterations": res["mlem_iterations"],
        "kem_iterations": res["kem_iterations"],
        "train_minutes": {NAMES[m]: max(r["train_minutes"] for r in done if r["model"] == m) for m in a.models},
        "worker_minutes": sum(r["train_minutes"] for r in done),
        "configs": {f"{NAMES[r['model']]} seed {r['seed']}": r["config"] for r in done},
    }
    text = markdown(meta, summary, settings)
    write_acceptance(a.results, meta, rows, text, summary=summary, settings=settings)
    print(text)
    with optional_plots():  # results/frames.png and results/tacs.png, after the results
        figures(example["study"], example["recs"], a.results)


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
