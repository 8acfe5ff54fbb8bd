"""Diagnostic for the BYHE acceptance: on how many test videos does each trained model read the
heart rate off the pulse's second harmonic (predicted HR within 6% of twice the label's HR)?

    python -m methods.byhe.harmonics [--out runs/byhe_acceptance] [--losses pearson mcc byhe] [--workers 2]

Re-evaluates every finished run under --out (its last checkpoint, its own test set) and writes
results/harmonics.{json,md}. Each run's records are cached in its folder (harmonics.json), so a
rerun only evaluates new runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from methods.common.acceptance import cached_result, run_jobs
from methods.rppg.pipeline import BAND
from methods.rppg.training import config_record

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 0.06  # relative distance to 2x the label's HR that counts as a harmonic lock (two 3.5-bpm bins at 60 bpm)


def locks(records, tol: float = TOL):
    """(second-harmonic locks, other errors of more than one periodogram bin, > 4 bpm) among the records."""
    harm = sum(abs(r["hr_pred_fft"] - 2 * r["hr_label_fft"]) <= tol * 2 * r["hr_label_fft"] for r in records)
    other = sum(abs(r["hr_pred_fft"] - r["hr_label_fft"]) > 4 for r in records) - harm
    return int(harm), int(other)


def _records(folder: str) -> dict:
    """The run's config and the records of its evaluation on its own test set."""
    from methods.rppg.evaluation import evaluate

    from .train import load_model

    model, cfg = load_model(folder)
    res = evaluate(model, cfg.test_set(cfg.domain), cfg.fs)
    return {"config": config_record(cfg), "records": res["records"]}


def diagnose(folder: str) -> dict:
    data = cached_result(os.path.join(folder, "harmonics.json"), lambda: _records(folder))
    recs, c = data["records"], data["config"]
    harm, other = locks(recs)
    low = [r for r in recs if 2 * r["hr_label_fft"] <= 60 * BAND[1]]  # videos whose 2nd harmonic is in the band
    return {
        "loss": c["loss"],
        "delay": "zero" if c["label"] == "pulse" else "delayed",
        "domain": c["domain"],
        "seed": c["seed"],
        "videos": len(recs),
        "harmonic_locks": harm,
        "other_errors": other,
        "videos_harmonic_in_band": len(low),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.byhe.harmonics", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "byhe_acceptance"))
    p.add_argument("--losses", nargs="+", default=["pearson", "mcc", "byhe"], help="runs of these losses only")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    folders = sorted(
        os.path.dirname(f)
        for f in glob.glob(os.path.join(a.out, "*", "*", "row.json"))
        if os.path.basename(os.path.dirname(f)).split("_")[0] in a.losses
    )
    if not folders:
        p.error(f"no finished acceptance runs under {a.out}")
    rows = run_jobs(
        diagnose,
        folders,
        a.workers,
        lambda r: f"{r['loss']} {r['delay']} seed {r['seed']}: {r['harmonic_locks']} harmonic locks",
    )
    rows.sort(key=lambda r: (r["domain"], r["loss"], r["delay"] != "zero", r["seed"]))
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "harmonics.json"), "w") as f:
        json.dump({"tolerance": TOL, "rows": rows}, f, indent=1)
    lines = [
        "# BYHE acceptance: heart rates read off the second harmonic",
        "",
        f"Test videos whose predicted HR is within {TOL:.0%} of twice the label's HR (harmonic locks), and "
        "the other errors above 4 bpm (more than one 3.5-bpm bin), per run (`python -m methods.byhe.harmonics`). Only videos with a label "
        f"HR up to {30 * BAND[1]:g} bpm have their second harmonic inside the {60 * BAND[0]:g}-{60 * BAND[1]:g} "
        "bpm band.",
        "",
        "| domain | loss | delay | seed | videos | harmonic in band | harmonic locks | other errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['domain']} | {r['loss']} | {r['delay']} | {r['seed']} | {r['videos']} | "
            f"{r['videos_harmonic_in_band']} | {r['harmonic_locks']} | {r['other_errors']} |"
        )
    tot = {}
    for r in rows:
        k = (r["loss"], r["delay"])
        tot[k] = tot.get(k, 0) + r["harmonic_locks"]
    lines += ["", "Harmonic locks summed over seeds: " + "; ".join(f"{l} {d} {n}" for (l, d), n in tot.items()) + "."]
    with open(os.path.join(a.results, "harmonics.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
