"""Acceptance experiment of issue #10: test mAP of every loss (GR, the eleven baselines and the
full-label BCE upper bound) on Yeast and on digit mosaics, over 3 seeds, and the per-epoch
trajectory of k-hat and v of one GR run.

    python -m methods.grloss.acceptance [--datasets yeast digits] [--seeds 0 1 2] [--workers 2]

Protocol: every loss trains with the same model, optimiser, budget and early-stopping rule
(train.py). Hyperparameters: a small grid per loss that has one (GR: beta / alpha / q; AN-LS:
epsilon; EM: alpha; EM+APL: beta; LL-*: delta) is run first with seed 0 and the setting with the
best *validation* mAP (full validation labels, as the reference's model selection) is used for
all seeds; losses without a hyperparameter run as they are. Runs go to --workers processes of
one thread each. Writes results/acceptance.{md,json} and results/gr_trajectory.png.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from methods.common import cpu_name, single_thread_worker

HERE = os.path.dirname(os.path.abspath(__file__))

GR_GRID = {  # name -> (beta, alpha, q)
    "voc": ((0.0, 2.0, -2.0, -2.0), (0.5, 2.0, 0.8, 0.5), (0.01, 1.0)),
    "k-steeper": ((0.0, 4.0, -2.0, -2.0), (0.5, 2.0, 0.8, 0.5), (0.01, 1.0)),
    "k-rising": ((0.0, 2.0, -3.0, -1.0), (0.5, 2.0, 0.8, 0.5), (0.01, 1.0)),
    "v-mu0.5": ((0.0, 2.0, -2.0, -2.0), (0.5, 2.0, 0.5, 0.5), (0.01, 1.0)),
    "v-wide": ((0.0, 2.0, -2.0, -2.0), (0.5, 2.0, 0.8, 1.0), (0.01, 1.0)),
    "v-flat": ((0.0, 2.0, -2.0, -2.0), (0.5, 2.0, 0.5, 2.0), (0.01, 1.0)),
    "q3-0.5": ((0.0, 2.0, -2.0, -2.0), (0.5, 2.0, 0.8, 0.5), (0.01, 0.5)),
    "q2-0.3": ((0.0, 2.0, -2.0, -2.0), (0.5, 2.0, 0.8, 0.5), (0.3, 1.0)),
    # the paper's guidance for the initial k-hat: the share of false negatives among the
    # unobserved labels, (E[#pos] - 1) / (C - 1) from the training labels: b = logit of it
    "k-prior": ((0.0, 2.0, "prior", "prior"), (0.5, 2.0, 0.8, 0.5), (0.01, 1.0)),
    "k-prior-steeper": ((0.0, 4.0, "prior", "prior"), (0.5, 2.0, 0.8, 0.5), (0.01, 1.0)),
    "k-prior-v-wide": ((0.0, 2.0, "prior", "prior"), (0.5, 2.0, 0.8, 1.0), (0.01, 1.0)),
}


def resolve_beta(beta, data) -> tuple:
    """GR_GRID's "prior": b = logit((E[#pos] - 1) / (C - 1)) of the training labels."""
    f = (data.expected_num_pos - 1) / (data.num_classes - 1)
    prior = float(np.log(f / (1 - f)))
    return tuple(prior if v == "prior" else float(v) for v in beta)
BASELINE_GRID = {
    "an-ls": {"ls_coef": [0.05, 0.1, 0.2]},
    "em": {"alpha": [0.05, 0.1, 0.2]},
    "em-apl": {"beta": [0.05, 0.2, 0.5]},
    "ll-r": {"delta": [0.002, 0.004, 0.01]},
    "ll-ct": {"delta": [0.001, 0.002, 0.005]},
    "ll-cp": {"delta": [0.001, 0.002, 0.005]},
}
ORDER = ["full", "an", "an-ls", "wan", "epr", "role", "em", "em-apl", "ll-r", "ll-ct", "ll-cp", "hill", "gr"]
LABELS = {"full": "full-label BCE (upper bound)", "an": "AN", "an-ls": "AN-LS", "wan": "WAN", "epr": "EPR",
          "role": "ROLE", "em": "EM", "em-apl": "EM+APL", "ll-r": "LL-R", "ll-ct": "LL-Ct", "ll-cp": "LL-Cp",
          "hill": "Hill", "gr": "GR (ours: pyops.gr_loss)"}

_DATA = {}


def run_job(job: dict) -> dict:
    """One training run (in a worker): job = {dataset, loss, seed, setting, gr?, loss_args?}."""
    from methods.common import Run

    from .data import load
    from .train import TrainConfig, train

    ds = job["dataset"]
    if ds not in _DATA:
        _DATA[ds] = load(ds)
    kw = {}
    if job.get("gr"):
        beta, alpha, q = job["gr"]
        kw = dict(gr_beta=resolve_beta(beta, _DATA[ds]), gr_alpha=alpha, gr_q=q)
    cfg = TrainConfig(dataset=ds, loss=job["loss"], seed=job["seed"], loss_args=job.get("loss_args", {}), **kw)
    folder = tempfile.mkdtemp(prefix="grloss_acc_")
    try:
        run = Run(folder, {}, name="grloss-acceptance")
        run.logger.handlers = [h for h in run.logger.handlers if not hasattr(h, "stream") or h.stream is not sys.stderr]
        t0 = time.perf_counter()
        res = train(cfg, run, show_progress=False, data=_DATA[ds])
        wall = time.perf_counter() - t0
        run.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = {**{k: v for k, v in job.items()}, "val_map": res["val_map"], "test_map": res["test_map"],
           "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"], "seconds": wall}
    if job["loss"] == "gr" and job.get("trajectory"):
        out["history"] = [{k: r[k] for k in ("epoch", "w", "b", "mu", "sigma", "val_map")} for r in res["history"]]
    return out


def grid_jobs(dataset: str, losses) -> list:
    jobs = []
    for loss in losses:
        if loss == "gr":
            jobs += [dict(dataset=dataset, loss="gr", seed=0, setting=name, gr=g) for name, g in GR_GRID.items()]
        elif loss in BASELINE_GRID:
            (key, values), = BASELINE_GRID[loss].items()
            jobs += [dict(dataset=dataset, loss=loss, seed=0, setting=f"{key}={v}", loss_args={key: v}) for v in values]
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.grloss.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["yeast", "digits"], choices=["yeast", "digits", "mnist"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", default=ORDER, choices=ORDER)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-grid", action="store_true", help="skip the validation grid (default settings)")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    started = time.time()
    with ProcessPoolExecutor(max_workers=a.workers, initializer=single_thread_worker) as pool:
        grid = [] if a.no_grid else [j for ds in a.datasets for j in grid_jobs(ds, a.losses)]
        grid_res = list(pool.map(run_job, grid))
        chosen = {}
        for ds in a.datasets:
            for loss in a.losses:
                cands = [r for r in grid_res if r["dataset"] == ds and r["loss"] == loss]
                if cands:
                    best = max(cands, key=lambda r: r["val_map"])
                    chosen[(ds, loss)] = {k: best[k] for k in ("setting", "gr", "loss_args") if k in best}
                    print(f"[select] {ds} {loss}: {best['setting']} (val mAP {best['val_map']:.2f})", flush=True)
        final = []
        for ds in a.datasets:
            for loss in a.losses:
                for seed in a.seeds:
                    job = {"dataset": ds, "loss": loss, "seed": seed, "setting": "default",
                           **chosen.get((ds, loss), {})}
                    job["trajectory"] = loss == "gr" and seed == a.seeds[0]
                    final.append(job)
        final_res = []
        for r in pool.map(run_job, final):
            final_res.append(r)
            print(f"[run] {r['dataset']} {r['loss']} seed {r['seed']} ({r['setting']}): test mAP {r['test_map']:.2f}, "
                  f"val {r['val_map']:.2f}, {r['epochs_run']} epochs, {r['seconds']:.0f} s", flush=True)
    minutes = (time.time() - started) / 60

    table = {}
    for ds in a.datasets:
        for loss in a.losses:
            rs = [r for r in final_res if r["dataset"] == ds and r["loss"] == loss]
            t = np.array([r["test_map"] for r in rs])
            table.setdefault(loss, {})[ds] = {"mean": float(t.mean()), "std": float(t.std(ddof=1)) if len(t) > 1 else 0.0,
                                              "per_seed": t.tolist(), "setting": rs[0]["setting"],
                                              "max_seconds": max(r["seconds"] for r in rs)}
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m methods.grloss.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    import torch

    from .plots import plot_schedule

    meta = {"command": cmd.strip(), "date": date, "seeds": a.seeds, "workers": a.workers, "minutes": minutes,
            "machine": cpu_name(), "torch": torch.__version__}
    with open(os.path.join(a.results, "acceptance.json"), "w") as f:
        json.dump({"meta": meta, "table": table, "grid": grid_res,
                   "runs": [{k: v for k, v in r.items() if k != "history"} for r in final_res]}, f, indent=1)

    sp = [loss for loss in a.losses if loss not in ("full",)]
    lines = [f"# GR loss acceptance: test mAP (mean +- std over seeds {a.seeds})", "",
             f"Command: `{meta['command']}`; date {date}; {a.workers} worker processes of one thread on "
             f"{meta['machine']}; {minutes:.1f} min in all.", "",
             "| loss | " + " | ".join(a.datasets) + " |", "|---|" + "---|" * len(a.datasets)]
    for loss in a.losses:
        cells = []
        for ds in a.datasets:
            c = table[loss][ds]
            others = [table[o][ds]["mean"] for o in sp if o != loss]
            mark = "**" if loss in sp and others and c["mean"] >= max(others) else ""
            cells.append(f"{mark}{c['mean']:.2f} +- {c['std']:.2f}{mark}")
        lines.append(f"| {LABELS[loss]} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the best single-positive loss on that dataset.", "",
              "Settings (chosen by validation mAP on seed 0 where a grid exists) and the longest run:", "",
              "| loss | " + " | ".join(f"{ds} setting | {ds} max s" for ds in a.datasets) + " |",
              "|---|" + "---|---|" * len(a.datasets)]
    for loss in a.losses:
        lines.append(f"| {LABELS[loss]} | " + " | ".join(
            f"{table[loss][ds]['setting']} | {table[loss][ds]['max_seconds']:.0f}" for ds in a.datasets) + " |")
    if grid_res:
        lines += ["", "Validation grid (seed 0): val mAP / test mAP", ""]
        for ds in a.datasets:
            for loss in a.losses:
                rs = [r for r in grid_res if r["dataset"] == ds and r["loss"] == loss]
                if rs:
                    lines.append(f"- {ds} {LABELS[loss]}: " + "; ".join(
                        f"{r['setting']} {r['val_map']:.2f} / {r['test_map']:.2f}" for r in rs))
    with open(os.path.join(a.results, "acceptance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    traj = [r for r in final_res if r.get("history")]
    if traj:
        r = max(traj, key=lambda r: r["epochs_run"])  # the longest GR run shows the most of the schedule
        plot_schedule(r["history"], os.path.join(a.results, "gr_trajectory.png"),
                          f"GR on {r['dataset']}, seed {r['seed']} ({r['setting']}): k-hat and v per epoch "
                          f"(early stop after epoch {r['epochs_run']})")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
