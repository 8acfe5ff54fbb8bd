"""Acceptance experiment of issue #13 (SSPD): HR MAE / RMSE on held-out synthetic videos of SSPD
trained without labels, of the same network trained supervised (negative Pearson against the
videos' own pulses: supervision at its best, no label delay), and of the training-free POS and
CHROM on the mean skin colour.

    python -m methods.sspd.acceptance [--seeds 0] [--steps 150] [--domain challenging] [--workers 2]

Each training runs in its own worker process (one thread) in a resumable run folder under --out.
Writes results/acceptance_<domain>.{md,json}, results/acceptance_<domain>.png and an example figure
per training (results/example_<domain>_<method>.png).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import numpy as np

from methods.common import cpu_name, single_thread_worker

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {"sspd": "SSPD (no labels)", "supervised": "same network, supervised (negative Pearson, zero-delay labels)",
         "pos": "POS (training-free)", "chrom": "CHROM (training-free)"}


def run_job(job: dict) -> dict:
    from methods.rppg.plots import plot_example
    from methods.common import Run
    from methods.rppg.data import evaluation_clips
    from methods.rppg.evaluation import evaluate, evaluate_classic

    from .train import SSPDConfig, datasets, train

    cfg = SSPDConfig(supervised=job["method"] == "supervised", steps=job["steps"], seed=job["seed"],
                     domain=job["domain"])
    t0 = time.perf_counter()
    if job["method"] in ("pos", "chrom"):
        res = evaluate_classic(datasets(cfg)[1], cfg.fs, job["method"])
    else:
        run = Run(os.path.join(job["out"], f"{job['method']}_seed{cfg.seed}"), asdict(cfg), name="sspd-acceptance")
        model, test = train(cfg, run, show_progress=False)
        run.close()
        res = evaluate(model, test, cfg.fs)
        if job.get("figure"):
            plot_example(model, next(evaluation_clips(test)), cfg.fs, job["figure"], offset=1)
    res.pop("records")
    return {"method": job["method"], "seed": cfg.seed, "minutes": (time.perf_counter() - t0) / 60,
            "config": asdict(cfg), **res}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.sspd.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--domain", default="challenging")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="run folders (default: runs/sspd_acceptance/<domain>)")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    a.out = a.out or os.path.join("runs", "sspd_acceptance", a.domain)
    started = time.time()
    jobs = [{"method": m, "seed": s, "steps": a.steps, "domain": a.domain, "out": a.out,
             "figure": os.path.join(a.results, f"example_{a.domain}_{m}.png") if s == a.seeds[0] else None}
            for s in a.seeds for m in NAMES]
    with ProcessPoolExecutor(max_workers=a.workers, initializer=single_thread_worker) as pool:
        results = list(pool.map(run_job, jobs))
    minutes = (time.time() - started) / 60
    import torch

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m methods.sspd.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "date": date, "seeds": a.seeds, "workers": a.workers, "minutes": minutes,
            "machine": cpu_name(), "torch": torch.__version__}
    with open(os.path.join(a.results, f"acceptance_{a.domain}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    c = results[0]["config"]
    lines = [f"# SSPD acceptance, `{a.domain}` domain (seeds {a.seeds})", "",
             f"Command: `{meta['command']}`; date {date}; {a.workers} worker processes of one thread on "
             f"{meta['machine']}; {minutes:.1f} min in all.", "",
             f"Synthetic videos (`{c['domain']}` domain): {c['n_train']} training and {c['n_test']} test videos of "
             f"{c['frames']} frames at {c['size']}x{c['size']}, 30 fps. Training: {c['steps']} steps of {c['batch']} "
             f"clips of {c['clip']} frame differences, the code's network (width / {c['width']}, convs padded in "
             "space for the small frames). Test: whole 10-s videos, HR of the predicted wave against the label's, "
             "both by the toolbox pipeline (periodogram peak with 3.5-bpm bins, or peak counting).", "",
             "| method | MAE (FFT) | RMSE (FFT) | MAE (peaks) | RMSE (peaks) | SNR (dB) | minutes |",
             "|---|---|---|---|---|---|---|"]
    for m in NAMES:
        rs = [r for r in results if r["method"] == m]

        def cell(k, fmt="{:.2f}"):
            v = np.array([r[k] for r in rs])
            return fmt.format(v.mean()) + (f" ({fmt.format(v.min())}-{fmt.format(v.max())})" if len(v) > 1 else "")
        lines.append(f"| {NAMES[m]} | {cell('MAE_fft')} | {cell('RMSE_fft')} | {cell('MAE_peak')} | "
                     f"{cell('RMSE_peak')} | {cell('SNR', '{:.1f}')} | {max(r['minutes'] for r in rs):.1f} |")
    with open(os.path.join(a.results, f"acceptance_{a.domain}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=120)
    vals = [[np.mean([r[f"MAE_{k}"] for r in results if r["method"] == m]) for m in NAMES] for k in ("fft", "peak")]
    x = np.arange(len(NAMES))
    ax.bar(x - 0.2, vals[0], 0.4, label="periodogram peak")
    ax.bar(x + 0.2, vals[1], 0.4, label="peak counting")
    ax.set_xticks(x, ["SSPD\n(no labels)", "supervised", "POS", "CHROM"])
    ax.set_ylabel("HR MAE (bpm)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(a.results, f"acceptance_{a.domain}.png"))
    plt.close(fig)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
