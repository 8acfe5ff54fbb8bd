"""Acceptance experiment of SSPD (issue #24): heart rate on held-out synthetic videos of

* SSPD trained without labels on the official schedule (30 epochs of one 300-frame clip per
  training video, batches of 12), tested with the EMA teacher (``sspd_teacher``, the default) and
  with the student (``sspd``);
* the same network trained supervised on the same schedule (negative Pearson against the
  videos' own pulses: supervision at its best, no label delay);
* POS and CHROM (training-free) on the mean colour of each frame's estimated skin pixels
  (``roi="estimated"``, the rows that count), and on the true skin mask (``roi="true"``, for
  continuity with the first acceptance).

    python -m methods.sspd.acceptance [--seeds 0 1 2] [--domains default wild] [--workers 2]

Each training runs in its own worker process (one thread) in a resumable run folder under --out
(a finished run is only re-evaluated). Writes results/acceptance.{json,md}, results/acceptance.png
and, for the first seed, example figures per domain (results/example_<domain>_<method>.png).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from methods.common import format_difference, optional_plots, paired_difference
from methods.common.acceptance import acceptance_meta, run_jobs, started_date, write_acceptance
from methods.common.optional import requires
from methods.rppg.training import config_record

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("sspd_teacher", "sspd", "supervised", "pos", "chrom")
NAMES = {
    "sspd_teacher": "SSPD, EMA teacher (no labels)",
    "sspd": "SSPD, student (no labels)",
    "supervised": "same network, supervised",
    "pos": "POS",
    "chrom": "CHROM",
}
SMOKE = dict(n_train=4, n_test=3, batch=2, clip=40, frames=90, test_frames=90, width=8)
CLAIM_RATIO = 1.5  # "within 1.5x of the supervised network's MAE"


def claim_rows(rows, domain: str, method: str) -> list:
    """The rows of one method on one domain that the claim is tested on (POS / CHROM: the
    estimated skin mask), by seed."""
    return sorted(
        (
            r
            for r in rows
            if r["domain"] == domain and r["method"] == method and r.get("roi", "estimated") == "estimated"
        ),
        key=lambda r: r["seed"],
    )


def _row(method: str, domain: str, seed: int, res: dict, **extra) -> dict:
    return {
        "method": method,
        "domain": domain,
        "seed": seed,
        "mae": res["MAE_fft"],
        "rmse": res["RMSE_fft"],
        "pearson": res["Pearson_fft"],
        "snr": res["SNR"],
        "mae_peak": res["MAE_peak"],
        **extra,
    }


def run_job(job: dict) -> list:
    """One job: a training (``sspd`` or ``supervised``) and its evaluations, or the classic methods;
    returns its rows."""
    from methods.common import Run
    from methods.rppg.data import evaluation_clips
    from methods.rppg.evaluation import evaluate, evaluate_classic
    from methods.rppg.plots import plot_example

    from .train import SSPDConfig, load_model, train

    cfg = SSPDConfig(
        supervised=job["method"] == "supervised",
        seed=job["seed"],
        domain=job["domain"],
        epochs=job["epochs"],
        size=job["size"],
        **job.get("overrides", {}),
    )
    t0 = time.perf_counter()
    if job["method"] == "classic":
        test = cfg.test_set(cfg.domain)
        return [
            _row(
                m,
                cfg.domain,
                cfg.seed,
                evaluate_classic(test, cfg.fs, m, roi=roi),
                roi=roi,
                minutes=(time.perf_counter() - t0) / 60,
            )
            for m in ("pos", "chrom")
            for roi in ("estimated", "true")
        ]
    folder = os.path.join(job["out"], cfg.domain, f"{job['method']}_seed{cfg.seed}")
    run = Run(folder, config_record(cfg), name="sspd-acceptance")
    _, test = train(cfg, run, show_progress=False, checkpoint_every=cfg.iters_per_epoch * 5)
    run.close()
    train_min = (time.perf_counter() - t0) / 60
    losses = [r["loss"] for r in run.rows if "loss" in r]
    nets = {"supervised": "student"} if cfg.supervised else {"sspd_teacher": "teacher", "sspd": "student"}
    rows = []
    for method, net in nets.items():
        model, _ = load_model(folder, net=net)
        res = evaluate(model, test, cfg.fs)
        rows.append(
            _row(
                method,
                cfg.domain,
                cfg.seed,
                res,
                net=net,
                train_minutes=train_min,
                first_loss=losses[0] if losses else None,
                final_loss=losses[-1] if losses else None,
            )
        )
        if job.get("figures"):
            plot_example(
                model,
                next(evaluation_clips(test)),
                cfg.fs,
                os.path.join(job["figures"], f"example_{cfg.domain}_{method}.png"),
                offset=1,
            )
    return rows


def summarize(rows, domains, seeds):
    """Per domain: per-method means, and the paired per-seed differences that test the claim."""
    out = {}
    for d in domains:

        def mae(m):
            by = {r["seed"]: r for r in claim_rows(rows, d, m)}
            return [by[s]["mae"] for s in seeds]

        s = {"n": len(seeds)}
        for a, b in (
            ("sspd_teacher", "supervised"),
            ("sspd", "supervised"),
            ("sspd_teacher", "sspd"),
            ("sspd_teacher", "pos"),
            ("sspd_teacher", "chrom"),
            ("supervised", "pos"),
        ):
            s[f"{a}-{b}"] = paired_difference(mae(a), mae(b))
        # the claim's margin: SSPD's MAE minus 1.5x the supervised MAE, per seed (< 0: within 1.5x)
        s["teacher-1.5sup"] = paired_difference(mae("sspd_teacher"), [CLAIM_RATIO * v for v in mae("supervised")])
        s["ratio"] = float(np.mean(mae("sspd_teacher")) / max(np.mean(mae("supervised")), 1e-9))
        out[d] = s
    return out


def figure(rows, domains, path: str) -> None:
    with requires("methods"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.4), dpi=120, squeeze=False)
    for ax, d in zip(axes[0], domains):
        for i, m in enumerate(METHODS):
            v = [r["mae"] for r in claim_rows(rows, d, m)]
            ax.bar(i, np.mean(v), 0.6, color=f"C{i}", alpha=0.7)
            ax.plot([i] * len(v), v, "k.", ms=5)
        ax.set_xticks(
            range(len(METHODS)), ["SSPD\nteacher", "SSPD\nstudent", "super-\nvised", "POS", "CHROM"], fontsize=8
        )
        ax.set_title(f"{d} (dots: seeds)", fontsize=9)
        ax.set_ylabel("HR MAE (bpm)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(rows, meta, domains, seeds, summ, cfg) -> str:
    lines = [
        f"# SSPD acceptance (seeds {seeds}, domains {', '.join(domains)})",
        "",
        f"Command: `{meta['command']}`; started {meta['date']}; {meta['workers']} worker processes of one "
        f"thread on {meta['machine']}; {meta['minutes']:.0f} min in all.",
        "",
        f"Setup: {cfg['n_train']} training videos of {cfg['frames']} frames and {cfg['n_test']} test videos of "
        f"{cfg['test_frames']} frames per seed and domain, {cfg['size']}x{cfg['size']} px at 30 fps. Training "
        f"(SSPD and supervised alike): {cfg['epochs']} epochs of one {cfg['clip']}-frame-difference clip per "
        f"video in batches of {cfg['batch']} ({cfg['total_steps']} "
        "iterations), Adam 1e-3, the code's network with convs padded in space. Test: whole videos, HR "
        "by the periodogram peak (3.5-bpm bins) of the prediction against the label's. POS / CHROM: the "
        "mean colour of each frame's skin pixels found by colour (YCbCr ranges), not the true mask.",
        "",
        "| domain | method | MAE (bpm) | RMSE | Pearson r | SNR (dB) | MAE, peaks | per-seed MAE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in domains:
        for m in METHODS:
            rs = claim_rows(rows, d, m)
            mean = {k: np.mean([r[k] for r in rs]) for k in ("mae", "rmse", "pearson", "snr", "mae_peak")}
            lines.append(
                f"| {d} | {NAMES[m]} | {mean['mae']:.2f} | {mean['rmse']:.2f} | {mean['pearson']:.2f} | "
                f"{mean['snr']:.1f} | {mean['mae_peak']:.2f} | "
                f"{' / '.join('%.2f' % r['mae'] for r in rs)} |"
            )
    lines += [
        "",
        "POS / CHROM on the true skin mask (the first acceptance's setting; not a claim row):",
        "",
        "| domain | method | MAE (bpm) | SNR (dB) |",
        "|---|---|---|---|",
    ]
    for d in domains:
        for m in ("pos", "chrom"):
            rs = [r for r in rows if r["domain"] == d and r["method"] == m and r.get("roi") == "true"]
            lines.append(
                f"| {d} | {NAMES[m]} | {np.mean([r['mae'] for r in rs]):.2f} | {np.mean([r['snr'] for r in rs]):.1f} |"
            )
    lines += [
        "",
        f"Paired per-seed differences of the MAE (bpm), mean [95% t interval], n = {len(seeds)}; "
        "negative: the first has the lower error.",
        "",
        "| domain | teacher - supervised | teacher - 1.5 x supervised | teacher / supervised (means) | "
        "student - supervised | teacher - student | teacher - POS | teacher - CHROM | supervised - POS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in domains:
        s = summ[d]
        lines.append(
            f"| {d} | {format_difference(s['sspd_teacher-supervised'])} | "
            f"{format_difference(s['teacher-1.5sup'])} | {s['ratio']:.2f} | "
            f"{format_difference(s['sspd-supervised'])} | {format_difference(s['sspd_teacher-sspd'])} | "
            f"{format_difference(s['sspd_teacher-pos'])} | {format_difference(s['sspd_teacher-chrom'])} | "
            f"{format_difference(s['supervised-pos'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.sspd.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--domains", nargs="+", default=["default", "wild"])
    from .train import SSPDConfig

    p.add_argument("--epochs", type=int, default=SSPDConfig.epochs, help="the official schedule's (%(default)s)")
    p.add_argument("--size", type=int, default=SSPDConfig.size, help="frame size (pixels; %(default)s)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join("runs", "sspd_acceptance"), help="run folders")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--smoke", action="store_true", help="tiny videos and network (checks the script, not the method)")
    a = p.parse_args(argv)
    from methods.rppg.synth import DOMAINS

    for d in a.domains:
        if d not in DOMAINS:
            p.error(f"unknown domain {d!r}; choose from {sorted(DOMAINS)}")
    os.makedirs(a.results, exist_ok=True)
    date = started_date(a.out)
    t0 = time.time()
    common = {"epochs": a.epochs, "size": a.size, "out": a.out, "overrides": SMOKE if a.smoke else {}}
    # the longest jobs first: SSPD (~1.5x a supervised run), then supervised, then the classic methods
    jobs = [
        {
            "method": m,
            "seed": s,
            "domain": d,
            **common,
            "figures": a.results if s == a.seeds[0] and m != "classic" else None,
        }
        for m in ("sspd", "supervised", "classic")
        for d in a.domains
        for s in a.seeds
    ]
    results = run_jobs(
        run_job,
        jobs,
        a.workers,
        lambda rs: ", ".join(f"{r['domain']}/{r['method']}/seed {r['seed']}: MAE {r['mae']:.2f}" for r in rs[:2]),
    )
    rows = sorted(
        (r for rs in results for r in rs),
        key=lambda r: (a.domains.index(r["domain"]), METHODS.index(r["method"]), r.get("roi", ""), r["seed"]),
    )
    config = SSPDConfig(epochs=a.epochs, size=a.size, **common["overrides"])
    cfg = {**config_record(config), "total_steps": config.total_steps}
    meta = acceptance_meta(
        "methods.sspd.acceptance",
        argv,
        date,
        a.seeds,
        a.workers,
        domains=a.domains,
        minutes=(time.time() - t0) / 60,
        config=cfg,
    )
    summ = summarize(rows, a.domains, a.seeds)
    text = markdown(rows, meta, a.domains, a.seeds, summ, cfg)
    write_acceptance(a.results, meta, rows, text, differences=summ)
    with optional_plots():
        figure(rows, a.domains, os.path.join(a.results, "acceptance.png"))
    print(text)
    return 0


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
