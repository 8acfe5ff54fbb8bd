"""Acceptance experiment of issue #23 for DOHA: leave one domain out over three synthetic domains
(``lab``, ``dark-moving``, ``flicker``: skin tones, lighting, motion, in-band flicker and label
delays differ). HR MAE / RMSE / Pearson r on the unseen domain for plain multi-domain training
(negative Pearson), BYHE-style training, and DOHA (HPS only, HHO only, both), 3 seeds; HHO
harmonizes 4 instances per source domain and step (``--per-domain``).

    python -m methods.doha.acceptance [--seeds 0 1 2] [--steps 60] [--per-domain 4] [--size 32] [--workers 2]

Each (method, held-out domain, seed) trains in its own worker process (one thread) in a
resumable run folder under --out; a finished job's row is kept there, so a rerun only does what is
missing. Writes results/acceptance.{md,json} (rows ``method, heldout, seed, mae, rmse, pearson``
and the paired per-seed differences per held-out domain) and results/acceptance.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from methods.common import format_difference, optional_plots, paired_difference
from methods.common.acceptance import acceptance_meta, cached_result, run_jobs, started_date, write_acceptance
from methods.common.optional import requires
from methods.rppg.training import config_record

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {
    "pearson": "multi-domain, negative Pearson",
    "byhe": "BYHE (SCS maps)",
    "hps": "DOHA: HPS only",
    "hho": "DOHA: HHO only",
    "doha": "DOHA: HPS + HHO",
}


def run_job(job: dict) -> dict:
    folder = os.path.join(job["out"], f"{job['method']}_to_{job['target']}_seed{job['seed']}")
    return cached_result(os.path.join(folder, "row.json"), lambda: _train_and_evaluate(job, folder))


def _train_and_evaluate(job: dict, folder: str) -> dict:
    from methods.common import Run

    from .train import LODO_DOMAINS, DOHAConfig, evaluate, train

    sources = tuple(d for d in LODO_DOMAINS if d != job["target"])
    cfg = DOHAConfig(
        method=job["method"],
        sources=sources,
        target=job["target"],
        steps=job["steps"],
        per_domain=job["per_domain"],
        size=job["size"],
        seed=job["seed"],
    )
    t0 = time.perf_counter()
    run = Run(folder, config_record(cfg), name="doha-acceptance")
    model, test = train(cfg, run, show_progress=False)
    rows = run.rows
    run.close()
    res = evaluate(model, test, cfg.fs)
    return {
        "method": cfg.method,
        "heldout": cfg.target,
        "seed": cfg.seed,
        "mae": res["MAE_fft"],
        "rmse": res["RMSE_fft"],
        "pearson": res["Pearson_fft"],
        "mae_peak": res["MAE_peak"],
        "snr": res["SNR"],
        "minutes": (time.perf_counter() - t0) / 60,
        "rejected": rows[-1].get("rejected", 0),
        "skipped": rows[-1].get("skipped", 0),
        "config": config_record(cfg),
    }


def figure(results, targets, methods, path: str) -> None:
    with requires("methods"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=120)
    w = 0.8 / len(methods)
    x = np.arange(len(targets) + 1)
    for j, m in enumerate(methods):
        vals = [np.mean([r["mae"] for r in results if r["method"] == m and r["heldout"] == t]) for t in targets]
        ax.bar(x + (j - (len(methods) - 1) / 2) * w, vals + [np.mean(vals)], w, label=NAMES[m])
    ax.set_xticks(x, [f"unseen: {t}" for t in targets] + ["mean"])
    ax.set_ylabel("HR MAE (bpm), periodogram peak")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


COMPARISONS = (
    ("hps", "pearson"),
    ("hho", "pearson"),
    ("doha", "pearson"),
    ("doha", "hps"),
    ("byhe", "pearson"),
    ("hps", "byhe"),
)


def main(argv=None) -> int:
    from .train import LODO_DOMAINS, DOHAConfig

    p = argparse.ArgumentParser(prog="python -m methods.doha.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--size", type=int, default=32, help="frame size (pixels; 32 is the backbone's smallest)")
    p.add_argument(
        "--per-domain", type=int, default=DOHAConfig.per_domain, help="clips per source domain and step (%(default)s)"
    )
    p.add_argument("--methods", nargs="+", choices=tuple(NAMES), default=list(NAMES))
    p.add_argument("--targets", nargs="+", choices=LODO_DOMAINS, default=list(LODO_DOMAINS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/doha_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    os.makedirs(a.results, exist_ok=True)
    date = started_date(a.out)
    jobs = [
        {
            "method": m,
            "target": t,
            "seed": s,
            "steps": a.steps,
            "per_domain": a.per_domain,
            "size": a.size,
            "out": a.out,
        }
        for s in a.seeds
        for t in a.targets
        for m in a.methods
    ]
    # the slow (harmonized) runs first, so the two workers finish together
    jobs.sort(key=lambda j: j["method"] not in ("hho", "doha"))
    results = run_jobs(
        run_job,
        jobs,
        a.workers,
        lambda r: f"{r['method']} -> {r['heldout']} seed {r['seed']}: MAE {r['mae']:.2f} bpm ({r['minutes']:.1f} min)",
    )
    results.sort(key=lambda r: (a.methods.index(r["method"]), a.targets.index(r["heldout"]), r["seed"]))
    pairs = []
    for x, y in COMPARISONS:
        if x not in a.methods or y not in a.methods:
            continue
        for t in a.targets + ["mean"]:

            def mae(m, s):
                rs = [
                    r["mae"]
                    for r in results
                    if r["method"] == m and r["seed"] == s and (t == "mean" or r["heldout"] == t)
                ]
                return float(np.mean(rs))

            pairs.append(
                {
                    "a": x,
                    "b": y,
                    "heldout": t,
                    "seeds": a.seeds,
                    **paired_difference([mae(x, s) for s in a.seeds], [mae(y, s) for s in a.seeds]),
                }
            )
    meta = acceptance_meta("methods.doha.acceptance", argv, date, a.seeds, a.workers, config=results[0]["config"])
    c = results[0]["config"]
    lines = [
        f"# DOHA acceptance: leave one domain out (seeds {a.seeds})",
        "",
        f"Command: `{meta['command']}`; started {date}; {a.workers} worker processes of one thread on "
        f"{meta['machine']}.",
        "",
        f"Synthetic domains {', '.join(f'`{t}`' for t in a.targets)} (`methods.rppg.synth.DOMAINS`); each run "
        f"trains on the other two ({c['n_train']} videos of {c['frames']} frames at {c['size']}x{c['size']} "
        f"each, {c['per_domain']} clips of {c['clip']} frames per domain and step, {c['steps']} steps, "
        f"TS-CAN-like backbone with widths / {c['shrink']}) and is tested on {c['n_test']} videos of the "
        "held-out domain: HR of the predicted signal against the label's, both by the toolbox pipeline "
        "(periodogram peak, 3.5-bpm bins). Cells: MAE (min-max over seeds) / RMSE / Pearson r, mean over seeds.",
        "",
        "| method | " + " | ".join(f"unseen {t}" for t in a.targets) + " | mean MAE | minutes |",
        "|---|" + "---|" * (len(a.targets) + 2),
    ]
    for m in a.methods:
        cells, maes = [], []
        for t in a.targets:
            rs = [r for r in results if r["method"] == m and r["heldout"] == t]
            mae = np.array([r["mae"] for r in rs])
            maes.append(mae.mean())
            cells.append(
                f"{mae.mean():.2f} ({mae.min():.2f}-{mae.max():.2f}) / {np.mean([r['rmse'] for r in rs]):.2f} / "
                f"{np.mean([r['pearson'] for r in rs]):.2f}"
            )
        mins = max(r["minutes"] for r in results if r["method"] == m)
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + f" | {np.mean(maes):.2f} | {mins:.1f} |")
    lines += [
        "",
        "Paired per-seed differences of the MAE (bpm), A minus B: mean [95% interval] over the seeds "
        "(negative: A is better).",
        "",
        "| A - B | " + " | ".join(f"unseen {t}" for t in a.targets) + " | mean over held-out domains |",
        "|---|" + "---|" * (len(a.targets) + 1),
    ]
    for x, y in COMPARISONS:
        cells = [format_difference(q) for q in pairs if q["a"] == x and q["b"] == y]
        if cells:
            lines.append(f"| {x} - {y} | " + " | ".join(cells) + " |")
    rej = {m: sum(r["rejected"] for r in results if r["method"] == m) for m in ("hho", "doha") if m in a.methods}
    if rej:
        lines += ["", "Instances rejected over all runs: " + ", ".join(f"{k} {v}" for k, v in rej.items()) + "."]
    write_acceptance(
        a.results,
        meta,
        [{k: v for k, v in r.items() if k != "config"} for r in results],
        "\n".join(lines) + "\n",
        paired=pairs,
    )
    with optional_plots():
        figure(results, a.targets, a.methods, os.path.join(a.results, "acceptance.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
