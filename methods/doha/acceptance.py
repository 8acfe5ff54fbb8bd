"""Acceptance experiment of issue #13 (DOHA): leave-one-domain-out over three synthetic domains
(``lab``, ``dark-moving``, ``flicker``: skin tones, lighting, motion, in-band flicker and label
delays differ), HR MAE / RMSE on the unseen domain for plain multi-domain training (negative
Pearson), BYHE-style training, and DOHA (HPS only, HHO only, both), 2 seeds.

    python -m methods.doha.acceptance [--seeds 0 1] [--steps 120] [--workers 2]

Each (method, held-out domain, seed) trains in its own worker process (one thread) in a
resumable run folder under --out. Writes results/acceptance.{md,json} and results/acceptance.png.
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
NAMES = {"pearson": "multi-domain, negative Pearson", "byhe": "BYHE (SCS maps)", "hps": "DOHA: HPS only",
         "hho": "DOHA: HHO only", "doha": "DOHA: HPS + HHO"}


def run_job(job: dict) -> dict:
    from methods.common import Run

    from .train import DOHAConfig, LODO_DOMAINS, evaluate, train

    sources = tuple(d for d in LODO_DOMAINS if d != job["target"])
    cfg = DOHAConfig(method=job["method"], sources=sources, target=job["target"], steps=job["steps"], seed=job["seed"])
    folder = os.path.join(job["out"], f"{cfg.method}_to_{cfg.target}_seed{cfg.seed}")
    t0 = time.perf_counter()
    run = Run(folder, asdict(cfg), name="doha-acceptance")
    model, test = train(cfg, run, show_progress=False)
    rows = run.rows
    run.close()
    res = evaluate(model, test, cfg.fs)
    res.pop("records")
    return {"method": cfg.method, "target": cfg.target, "seed": cfg.seed, "minutes": (time.perf_counter() - t0) / 60,
            "rejected": rows[-1].get("rejected", 0), "skipped": rows[-1].get("skipped", 0), "config": asdict(cfg), **res}


def figure(results, targets, methods, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=120)
    w = 0.8 / len(methods)
    x = np.arange(len(targets) + 1)
    for j, m in enumerate(methods):
        vals = [np.mean([r["MAE_fft"] for r in results if r["method"] == m and r["target"] == t]) for t in targets]
        ax.bar(x + (j - (len(methods) - 1) / 2) * w, vals + [np.mean(vals)], w, label=NAMES[m])
    ax.set_xticks(x, [f"unseen: {t}" for t in targets] + ["mean"])
    ax.set_ylabel("HR MAE (bpm), periodogram peak")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    from .train import LODO_DOMAINS

    p = argparse.ArgumentParser(prog="python -m methods.doha.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--methods", nargs="+", choices=tuple(NAMES), default=list(NAMES))
    p.add_argument("--targets", nargs="+", choices=LODO_DOMAINS, default=list(LODO_DOMAINS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/doha_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    started = time.time()
    jobs = [{"method": m, "target": t, "seed": s, "steps": a.steps, "out": a.out}
            for s in a.seeds for t in a.targets for m in a.methods]
    # the slow (harmonized) runs first, so the two workers finish together
    jobs.sort(key=lambda j: j["method"] not in ("hho", "doha"))
    with ProcessPoolExecutor(max_workers=a.workers, initializer=single_thread_worker) as pool:
        results = list(pool.map(run_job, jobs))
    minutes = (time.time() - started) / 60
    import torch

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m methods.doha.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "date": date, "seeds": a.seeds, "workers": a.workers, "minutes": minutes,
            "machine": cpu_name(), "torch": torch.__version__}
    with open(os.path.join(a.results, "acceptance.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    c = results[0]["config"]
    lines = [f"# DOHA acceptance: leave one domain out (seeds {a.seeds})", "",
             f"Command: `{meta['command']}`; date {date}; {a.workers} worker processes of one thread on "
             f"{meta['machine']}; {minutes:.1f} min in all.", "",
             f"Synthetic domains {', '.join(f'`{t}`' for t in a.targets)} (`methods.rppg.synth.DOMAINS`); each run "
             f"trains on the other two ({c['n_train']} videos of {c['frames']} frames at {c['size']}x{c['size']} "
             f"each, {c['per_domain']} clips of {c['clip']} frames per domain and step, {c['steps']} steps, "
             f"TS-CAN-like backbone with widths / {c['shrink']}) and is tested on {c['n_test']} videos of the "
             "held-out domain: HR of the predicted signal against the label's, both by the toolbox pipeline "
             "(periodogram peak, 3.5-bpm bins). Cells: MAE / RMSE in bpm, mean over seeds (min-max of the MAE).", "",
             "| method | " + " | ".join(f"unseen {t}" for t in a.targets) + " | mean MAE | mean MAE (peaks) | minutes |",
             "|---|" + "---|" * (len(a.targets) + 3)]
    for m in a.methods:
        cells, maes, peaks = [], [], []
        for t in a.targets:
            rs = [r for r in results if r["method"] == m and r["target"] == t]
            mae, rmse = np.array([r["MAE_fft"] for r in rs]), np.array([r["RMSE_fft"] for r in rs])
            maes.append(mae.mean())
            peaks.append(np.mean([r["MAE_peak"] for r in rs]))
            rng = f" ({mae.min():.2f}-{mae.max():.2f})" if len(rs) > 1 else ""
            cells.append(f"{mae.mean():.2f}{rng} / {rmse.mean():.2f}")
        mins = max(r["minutes"] for r in results if r["method"] == m)
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + f" | {np.mean(maes):.2f} | {np.mean(peaks):.2f} | {mins:.1f} |")
    rej = {m: sum(r["rejected"] for r in results if r["method"] == m) for m in ("hho", "doha") if m in a.methods}
    if rej:
        lines += ["", "Instances rejected over all runs: " + ", ".join(f"{k} {v}" for k, v in rej.items()) + "."]
    with open(os.path.join(a.results, "acceptance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    figure(results, a.targets, a.methods, os.path.join(a.results, "acceptance.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
