"""Where an SSPD run's heart rate is lost: for every test video, the HR read off

* the predicted wave (backbone + predictor: what the acceptance scores);
* the diagonal-mean wave of each of the three S3M self-similarity maps (what the
  self-distillation makes periodic; the lag axis read at the video's frame rate);

against the label's, for the EMA teacher and the student of each SSPD run of an acceptance.
If the maps carry the pulse and the predicted wave does not, the predictor fails to decode it;
if the maps do not either, the backbone's features never caught the pulse. A video counts as a
hit when the HR is within 5 bpm, as a harmonic lock when it is within 5 bpm of twice or half the
label's.

    python -m methods.sspd.diagnostics [--out runs/sspd_acceptance] [--results methods/sspd/results]

Writes results/diagnostics.{json,md}.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
HIT_BPM = 5.0
SOURCES = ("wave", "map1", "map2", "map3")


@torch.no_grad()
def video_hrs(net, video: torch.Tensor, size: int, fs: float) -> Dict[str, float]:
    """HR (bpm) of the predicted wave and of the three maps' diagonal-mean waves for one clip."""
    import pyops
    from methods.rppg import pipeline as P

    from .augment import crop_size
    from .train import global_view

    y, maps = net(global_view(video, crop_size(size)))
    out = {}
    for name, sig in [("wave", y[0])] + [(f"map{i + 1}", pyops.diagonal_stats(m)[0][0]) for i, m in enumerate(maps)]:
        try:
            out[name] = P.signal_hr(sig.double().numpy(), fs, "fft")
        except ValueError:
            out[name] = float("nan")
    return out


def diagnose_run(folder: str) -> List[Dict]:
    """Per-video records for the teacher and the student of one SSPD run folder."""
    from methods.rppg import pipeline as P
    from methods.rppg.data import evaluation_clips

    from .train import load_model

    recs = []
    for net_name in ("teacher", "student"):
        model, cfg = load_model(folder, net=net_name)
        net = model.net.eval()
        for c in evaluation_clips(cfg.test_set(cfg.domain)):
            label = P.signal_hr(c["wave"][0].double().numpy(), cfg.fs, "fft")
            recs.append(
                {
                    "domain": cfg.domain,
                    "seed": cfg.seed,
                    "net": net_name,
                    "video": int(c["index"][0]),
                    "hr_label": label,
                    **video_hrs(net, c["video"], cfg.size, cfg.fs),
                }
            )
    return recs


def summarize(recs: List[Dict]) -> List[Dict]:
    rows = []
    keys = sorted({(r["domain"], r["net"]) for r in recs})
    for d, n in keys:
        rs = [r for r in recs if r["domain"] == d and r["net"] == n]
        label = np.array([r["hr_label"] for r in rs])
        row = {"domain": d, "net": n, "videos": len(rs)}
        for s in SOURCES:
            hr = np.array([r[s] for r in rs])
            err = np.abs(hr - label)
            harm = (np.abs(hr - 2 * label) <= HIT_BPM) | (np.abs(hr - label / 2) <= HIT_BPM)
            row[f"{s}_mae"] = float(np.nanmean(err))
            row[f"{s}_hits"] = float(np.mean(err <= HIT_BPM))
            row[f"{s}_harmonic"] = float(np.mean(harm & (err > HIT_BPM)))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m methods.sspd.diagnostics", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "sspd_acceptance"), help="the acceptance's run folders")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    folders = sorted(glob.glob(os.path.join(a.out, "*", "sspd_seed*")))
    if not folders:
        print(f"error: no SSPD run folders under {a.out}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    recs = [r for f in folders for r in diagnose_run(f)]
    rows = summarize(recs)
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "diagnostics.json"), "w") as f:
        json.dump(
            {
                "command": "python -m methods.sspd.diagnostics " + " ".join(argv if argv is not None else sys.argv[1:]),
                "runs": folders,
                "rows": rows,
                "records": recs,
            },
            f,
            indent=1,
        )
    lines = [
        "# SSPD diagnostics: where the heart rate is lost",
        "",
        f"{len(folders)} SSPD runs ({', '.join(os.path.relpath(f, a.out) for f in folders)}); per test video, "
        f"the HR of the predicted wave and of each S3M map's diagonal-mean wave against the label's. Hit: within "
        f"{HIT_BPM:g} bpm; harmonic: within {HIT_BPM:g} bpm of twice or half the label's HR (and not a hit).",
        "",
        "| domain | net | videos | " + " | ".join(f"{s}: MAE / hits / harmonic" for s in SOURCES) + " |",
        "|---|---|---|" + "---|" * len(SOURCES),
    ]
    for r in rows:
        lines.append(
            f"| {r['domain']} | {r['net']} | {r['videos']} | "
            + " | ".join(
                f"{r[f'{s}_mae']:.1f} / {100 * r[f'{s}_hits']:.0f}% / {100 * r[f'{s}_harmonic']:.0f}%" for s in SOURCES
            )
            + " |"
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.results, "diagnostics.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    from methods.common import cli_main

    sys.exit(cli_main(main)())  # one-line errors for bad arguments
