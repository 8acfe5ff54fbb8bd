"""Acceptance experiment of issue #23 for BYHE: do label delays hurt a network trained with negative
Pearson, while BYHE (SCS maps) and MCC are robust to them?

    python -m methods.byhe.acceptance [--seeds 0 1 2] [--domains default] [--steps 300] [--workers 2]

The same backbone (TS-CAN-like, widths / 2) is trained with each loss on many short videos, once
with the videos' own pulses as labels (zero delay) and once with labels that lag each video by its
own delay, drawn per video from U(0, 0.5) s. With hundreds of videos a network cannot learn each
video's delay by heart. The test videos are longer (10 s) and held out; the HR of the predicted
signal is compared with the label's HR (the delay does not change it).

A loss's rows count only where it learns the zero-delay case (mean MAE <= 3 bpm over the seeds on
that domain). The claim: with delayed labels BYHE and MCC stay within 1.5 bpm of their own
zero-delay MAE while negative Pearson degrades by more than that; the table gives the paired
per-seed differences (delayed minus zero delay) with their mean and 95% interval.

Each (domain, loss, delay, seed) trains in its own worker process (one thread) in a resumable
run folder under --out; a finished job's row is kept there, so a rerun only does what is missing.
Writes results/acceptance.{json,md}, results/acceptance.png and one example figure per loss and
delay (seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from methods.common import format_difference, optional_plots, paired_difference
from methods.common.acceptance import acceptance_meta, cached_result, run_jobs, started_date, write_acceptance
from methods.common.optional import requires
from methods.rppg.training import config_record

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {"pearson": "negative Pearson", "mcc": "negative max cross-covariance (MCC)", "byhe": "BYHE (SCS maps)"}
DELAYS = {"zero": "pulse", "delayed": "label"}  # the row's delay -> TrainConfig.label
VALID_MAE = 3.0  # bpm: a loss must reach this with zero delay for its rows to count
TOLERANCE = 1.5  # bpm: "robust" = delayed MAE within this of the zero-delay MAE


def run_job(job: dict) -> dict:
    folder = os.path.join(job["out"], job["domain"], f"{job['loss']}_{job['delay']}_seed{job['seed']}")
    done = os.path.join(folder, "row.json")
    if job.get("figure") and not os.path.exists(job["figure"]) and os.path.exists(done):
        os.remove(done)  # its figure is missing: evaluate again (the finished run only resumes)
    row = cached_result(done, lambda: _train_and_evaluate(job, folder))
    return {**row, "final_loss": _final_loss(folder)}


def _train_and_evaluate(job: dict, folder: str) -> dict:
    from methods.common import Run
    from methods.rppg.data import evaluation_clips
    from methods.rppg.plots import plot_example

    from .train import TrainConfig, evaluate, train

    cfg = TrainConfig(
        loss=job["loss"], label=DELAYS[job["delay"]], domain=job["domain"], seed=job["seed"], **job["config"]
    )
    t0 = time.perf_counter()
    run = Run(folder, config_record(cfg), name="byhe-acceptance")
    model, test = train(cfg, run, show_progress=False)
    rows = run.rows
    run.close()
    res = evaluate(model, test, cfg.fs)
    if job.get("figure"):
        plot_example(model, next(evaluation_clips(test)), cfg.fs, job["figure"], cfg.scs_mode)
    return {
        "loss": cfg.loss,
        "delay": job["delay"],
        "domain": cfg.domain,
        "seed": cfg.seed,
        "mae": res["MAE_fft"],
        "rmse": res["RMSE_fft"],
        "pearson": res["Pearson_fft"],
        "snr": res["SNR"],
        "mae_peak": res["MAE_peak"],
        "skipped": rows[-1].get("skipped", 0) if rows else 0,
        "minutes": (time.perf_counter() - t0) / 60,
        "final_loss": _final_loss(folder),
        "config": config_record(cfg),
    }


def _final_loss(folder: str) -> float:
    """The training loss of the run's last metrics row (the mean over its last 25 steps)."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return float(json.loads(f.read().strip().splitlines()[-1])["loss"])


def summarize(rows, domains, losses):
    """Per (domain, loss): zero-delay and delayed MAE (mean over seeds), the paired difference, whether
    the loss learns the zero-delay case, and the verdict against the claim."""
    out = []
    for dom in domains:
        for loss in losses:
            zero = {r["seed"]: r for r in rows if r["domain"] == dom and r["loss"] == loss and r["delay"] == "zero"}
            dly = {r["seed"]: r for r in rows if r["domain"] == dom and r["loss"] == loss and r["delay"] == "delayed"}
            seeds = sorted(set(zero) & set(dly))
            if not seeds:
                continue
            z, d = [zero[s]["mae"] for s in seeds], [dly[s]["mae"] for s in seeds]
            diff = paired_difference(d, z)
            snr = paired_difference([dly[s]["snr"] for s in seeds], [zero[s]["snr"] for s in seeds])
            valid = float(np.mean(z)) <= VALID_MAE
            expect = "robust" if loss in ("byhe", "mcc") else "degrades"
            robust = diff["mean"] <= TOLERANCE
            holds = (robust if expect == "robust" else diff["mean"] > TOLERANCE) if valid else None
            out.append(
                {
                    "domain": dom,
                    "loss": loss,
                    "seeds": seeds,
                    "mae_zero": float(np.mean(z)),
                    "mae_delayed": float(np.mean(d)),
                    "diff": diff,
                    "snr_diff": snr,
                    "learns_zero_delay": valid,
                    "expected": expect,
                    "claim_holds": holds,
                }
            )
    return out


def figure(rows, domains, losses, path: str) -> None:
    with requires("methods"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 3.8), dpi=120, squeeze=False)
    for ax, dom in zip(axes[0], domains):
        x = np.arange(len(losses))
        for j, delay in enumerate(DELAYS):
            vals = [
                [r["mae"] for r in rows if r["domain"] == dom and r["loss"] == l and r["delay"] == delay]
                for l in losses
            ]
            pos = x + (j - 0.5) * 0.38
            ax.bar(pos, [np.mean(v) for v in vals], 0.38, label=f"{delay} delay", alpha=0.8)
            for p, v in zip(pos, vals):
                ax.scatter([p] * len(v), v, color="k", s=9, zorder=3)
        ax.axhline(VALID_MAE, color="grey", ls="--", lw=0.8)
        ax.set_xticks(x, [NAMES[l].replace(" (", "\n(") for l in losses], fontsize=8)
        ax.set_ylabel("HR MAE (bpm), per seed (dots)")
        ax.set_title(f"domain `{dom}`")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.byhe.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--domains", nargs="+", default=["default"], help="synthetic domains (methods.rppg.synth.DOMAINS)")
    p.add_argument("--losses", nargs="+", choices=tuple(NAMES), default=list(NAMES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n-train", type=int, default=240, help="training videos")
    p.add_argument("--frames", type=int, default=120, help="frames per training video")
    p.add_argument("--n-test", type=int, default=32, help="test videos")
    p.add_argument("--test-frames", type=int, default=300, help="frames per test video")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join("runs", "byhe_acceptance"), help="run folders")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    from methods.rppg.synth import DOMAINS

    for d in a.domains:
        if d not in DOMAINS:
            p.error(f"unknown domain {d!r}; choose from {sorted(DOMAINS)}")
    os.makedirs(a.results, exist_ok=True)
    date = started_date(a.out)
    config = {
        "steps": a.steps,
        "n_train": a.n_train,
        "frames": a.frames,
        "n_test": a.n_test,
        "test_frames": a.test_frames,
    }
    jobs = [
        {
            "loss": loss,
            "delay": delay,
            "seed": s,
            "domain": dom,
            "out": a.out,
            "config": config,
            "figure": os.path.join(a.results, f"example_{dom}_{loss}_{delay}.png") if s == a.seeds[0] else None,
        }
        for dom in a.domains
        for s in a.seeds
        for loss in a.losses
        for delay in DELAYS
    ]
    rows = run_jobs(
        run_job,
        jobs,
        a.workers,
        lambda r: (
            f"{r['domain']} {r['loss']} {r['delay']} seed {r['seed']}: MAE {r['mae']:.2f} bpm ({r['minutes']:.1f} min)"
        ),
    )
    rows.sort(key=lambda r: (a.domains.index(r["domain"]), a.losses.index(r["loss"]), r["delay"] != "zero", r["seed"]))
    summary = summarize(rows, a.domains, a.losses)
    meta = acceptance_meta(
        "methods.byhe.acceptance", argv, date, a.seeds, a.workers, config=rows[0]["config"], delay_range_s=[0.0, 0.5]
    )
    c = rows[0]["config"]
    lines = [
        f"# BYHE acceptance: label delay (seeds {a.seeds})",
        "",
        f"Command: `{meta['command']}`; started {date}; {a.workers} worker processes of one thread on "
        f"{meta['machine']}.",
        "",
        f"{c['n_train']} training videos of {c['frames']} frames ({c['frames'] / c['fs']:.0f} s) and {c['n_test']} "
        f"test videos of {c['test_frames']} frames ({c['test_frames'] / c['fs']:.0f} s) at {c['size']}x{c['size']}, "
        f"30 fps, per domain and seed. Delayed labels lag their video by U(0, 0.5) s, drawn per video. "
        f"{c['steps']} steps of {c['batch']} clips of {c['clip']} frames; TS-CAN-like backbone, widths / "
        f"{c['shrink']}. HR by periodogram peak (toolbox pipeline, nfft 512: 3.5-bpm bins) of the predicted signal "
        "against the label's. SNR in dB at the label's HR.",
        "",
        "| domain | loss | delay | MAE (bpm) | RMSE | Pearson r | SNR (dB) | MAE per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dom in a.domains:
        for loss in a.losses:
            for delay in DELAYS:
                rs = [r for r in rows if r["domain"] == dom and r["loss"] == loss and r["delay"] == delay]
                if rs:
                    lines.append(
                        f"| {dom} | {NAMES[loss]} | {delay} | {np.mean([r['mae'] for r in rs]):.2f} | "
                        f"{np.mean([r['rmse'] for r in rs]):.2f} | {np.mean([r['pearson'] for r in rs]):.3f} | "
                        f"{np.mean([r['snr'] for r in rs]):.1f} | " + ", ".join(f"{r['mae']:.2f}" for r in rs) + " |"
                    )
    lines += [
        "",
        "Training loss at the end (mean of the last 25 steps; seeds averaged): "
        + "; ".join(
            f"{NAMES[loss]} {np.mean([r['final_loss'] for r in rows if r['loss'] == loss and r['delay'] == 'zero']):.3f} "
            f"(zero delay) / {np.mean([r['final_loss'] for r in rows if r['loss'] == loss and r['delay'] == 'delayed']):.3f} "
            "(delayed)"
            for loss in a.losses
        )
        + ".",
    ]
    lines += [
        "",
        f"Paired per-seed differences, delayed minus zero delay (mean [95% interval]). A loss counts "
        f"only if its zero-delay MAE is <= {VALID_MAE:g} bpm; the claim: BYHE and MCC within "
        f"{TOLERANCE:g} bpm, negative Pearson worse by more than {TOLERANCE:g} bpm.",
        "",
        "| domain | loss | zero-delay MAE | delayed MAE | delayed - zero, MAE (bpm) | delayed - zero, SNR (dB) | "
        "learns zero delay | expected | claim holds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        holds = {True: "yes", False: "**no**", None: "(not counted)"}[s["claim_holds"]]
        lines.append(
            f"| {s['domain']} | {NAMES[s['loss']]} | {s['mae_zero']:.2f} | {s['mae_delayed']:.2f} | "
            f"{format_difference(s['diff'])} | {format_difference(s['snr_diff'], '{:+.1f}')} | "
            f"{'yes' if s['learns_zero_delay'] else 'no'} | {s['expected']} | {holds} |"
        )
    write_acceptance(
        a.results,
        meta,
        [{k: v for k, v in r.items() if k != "config"} for r in rows],
        "\n".join(lines) + "\n",
        summary=summary,
    )
    with optional_plots():
        figure(rows, a.domains, a.losses, os.path.join(a.results, "acceptance.png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
