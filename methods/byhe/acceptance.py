"""Acceptance experiment of issue #12: the same backbone (TS-CAN-like, width /2) trained on
synthetic face videos with negative Pearson, with negative max cross-covariance (MCC) and with
BYHE's SCS-map training, each on the delayed label waves (random delays 0-0.5 s per video) and
on the videos' own pulses (zero delay); HR MAE / RMSE on held-out videos.

    python -m methods.byhe.acceptance [--seeds 0] [--steps 300] [--domain challenging] [--workers 2]

Each (loss, label, seed) trains in its own worker process (one thread) in a resumable run folder
under --out. Writes results/acceptance_<domain>.{md,json}, results/acceptance_<domain>.png (MAE per
run) and one example figure per run (results/example_<domain>_<loss>_<label>.png).
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
NAMES = {"pearson": "negative Pearson", "mcc": "negative max cross-covariance", "byhe": "BYHE (SCS maps)"}
LABEL_NAMES = {"label": "delayed labels (0-0.5 s)", "pulse": "zero delay"}


def run_job(job: dict) -> dict:
    from methods.common import Run
    from methods.rppg.data import evaluation_clips

    from methods.rppg.plots import plot_example
    from .train import TrainConfig, evaluate, train

    cfg = TrainConfig(loss=job["loss"], label=job["label"], steps=job["steps"], seed=job["seed"], domain=job["domain"])
    folder = os.path.join(job["out"], f"{cfg.loss}_{cfg.label}_seed{cfg.seed}")
    t0 = time.perf_counter()
    run = Run(folder, asdict(cfg), name="byhe-acceptance")
    model, test = train(cfg, run, show_progress=False)
    run.close()
    res = evaluate(model, test, cfg.fs)
    minutes = (time.perf_counter() - t0) / 60
    if job.get("figure"):
        plot_example(model, next(evaluation_clips(test)), cfg.fs, job["figure"], cfg.scs_mode)
    return {"loss": cfg.loss, "label": cfg.label, "seed": cfg.seed, "minutes": minutes, "config": asdict(cfg), **res}


def figure(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    x = np.arange(len(NAMES))
    for ax, m in zip(axes, ("fft", "peak")):
        for j, (lab, name) in enumerate(LABEL_NAMES.items()):
            vals = [np.mean([r[f"MAE_{m}"] for r in results if r["loss"] == loss and r["label"] == lab]) for loss in NAMES]
            ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=name)
        ax.set_xticks(x, [NAMES[k].replace(" (", "\n(") for k in NAMES], fontsize=8)
        ax.set_ylabel(f"HR MAE (bpm), {'periodogram peak' if m == 'fft' else 'peak counting'}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.byhe.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--domain", default="challenging", help="synthetic domain (methods.rppg.synth.DOMAINS)")
    p.add_argument("--losses", nargs="+", choices=tuple(NAMES), default=list(NAMES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="run folders (default: runs/byhe_acceptance/<domain>)")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    a.out = a.out or os.path.join("runs", "byhe_acceptance", a.domain)
    started = time.time()
    jobs = [{"loss": loss, "label": lab, "seed": s, "steps": a.steps, "out": a.out, "domain": a.domain,
             "figure": os.path.join(a.results, f"example_{a.domain}_{loss}_{lab}.png") if s == a.seeds[0] else None}
            for s in a.seeds for loss in a.losses for lab in LABEL_NAMES]
    with ProcessPoolExecutor(max_workers=a.workers, initializer=single_thread_worker) as pool:
        results = list(pool.map(run_job, jobs))
    minutes = (time.time() - started) / 60
    import torch

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m methods.byhe.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "date": date, "seeds": a.seeds, "workers": a.workers, "minutes": minutes,
            "machine": cpu_name(), "torch": torch.__version__}
    with open(os.path.join(a.results, f"acceptance_{a.domain}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    c = results[0]["config"]
    lines = [f"# BYHE acceptance: label delay, `{a.domain}` domain (seeds {a.seeds})", "",
             f"Command: `{meta['command']}`; date {date}; {a.workers} worker processes of one thread on "
             f"{meta['machine']}; {minutes:.1f} min in all.", "",
             f"Synthetic videos (`{c['domain']}` domain of `methods.rppg.synth.DOMAINS`): {c['n_train']} training and {c['n_test']} test videos of "
             f"{c['frames']} frames at {c['size']}x{c['size']}, 30 fps, HR 50-140 bpm. Training: {c['steps']} steps "
             f"of {c['batch']} clips of {c['clip']} frames, TS-CAN-like backbone with widths / {c['shrink']}. Test: "
             "whole 10-s videos; the HR of the predicted signal (baselines: the wave; BYHE: the diagonal-mean "
             "wave of R_hat) against the HR of the label, both by the toolbox pipeline (detrend, band-pass "
             "0.75-2.5 Hz, then periodogram peak with nfft 512 = 3.5-bpm bins, or peak counting). SNR: dB at "
             "the label's HR and its harmonic against the rest of the band.", "",
             "| loss | training labels | MAE (FFT) | RMSE (FFT) | MAE (peaks) | RMSE (peaks) | SNR (dB) | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for loss in a.losses:
        for lab in LABEL_NAMES:
            rs = [r for r in results if r["loss"] == loss and r["label"] == lab]

            def cell(k, fmt="{:.2f}"):
                v = np.array([r[k] for r in rs])
                return fmt.format(v.mean()) + (f" ({fmt.format(v.min())}-{fmt.format(v.max())})" if len(v) > 1 else "")
            lines.append(f"| {NAMES[loss]} | {LABEL_NAMES[lab]} | {cell('MAE_fft')} | {cell('RMSE_fft')} | "
                         f"{cell('MAE_peak')} | {cell('RMSE_peak')} | {cell('SNR', '{:.1f}')} | "
                         f"{max(r['minutes'] for r in rs):.1f} |")
    with open(os.path.join(a.results, f"acceptance_{a.domain}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    figure(results, os.path.join(a.results, f"acceptance_{a.domain}.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
