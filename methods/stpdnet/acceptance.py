"""Acceptance experiment of issue #7: train LPD, DeepPET and STPDnet (default CPU configurations)
on low-count studies simulated on the fly, then compare them with MLEM (iterations chosen on
validation studies) and KEM-ST on held-out test studies.

    python -m methods.stpdnet.acceptance [--steps 500] [--test-studies 8] [--out runs/stpdnet_acceptance]

Each training run is resumable (its own run folder). Writes results/acceptance.{md,json} and
results/frames.png, results/tacs.png.
"""
import argparse
import datetime as _dt
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m methods.stpdnet.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--models", nargs="+", default=["deeppet", "lpd", "stpdnet"])
    p.add_argument("--test-studies", type=int, default=8)
    p.add_argument("--val-studies", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/stpdnet_acceptance")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    from methods.common import Run, progress

    from .evaluate import evaluate
    from .train import TrainConfig, train

    names = {"lpd": "LPD", "stpdnet": "STPDnet", "deeppet": "DeepPET"}
    ckpts, train_info = {}, {}
    for m in a.models:
        cfg = TrainConfig(model=m, steps=a.steps, seed=a.seed)
        run = Run(os.path.join(a.out, m), {"model": m, "steps": a.steps}, name="stpdnet")
        t0 = time.perf_counter()
        rows = train(cfg, run, show_progress=True)
        run.close()
        secs = rows[-1]["seconds"] if rows else time.perf_counter() - t0
        ckpts[names[m]] = run.checkpoints.latest()
        train_info[names[m]] = {"config": cfg.__dict__, "train_minutes": secs / 60,
                                "final_val_rel_rmse": rows[-1]["val_rel_rmse"] if rows else None}
    res = evaluate(ckpts, test_studies=a.test_studies, val_studies=a.val_studies, figure_dir=a.results,
                   progress_fn=lambda it: progress(it, desc="test studies"))
    cmd = "python -m methods.stpdnet.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res.update(command=cmd.strip(), date=date, seed=a.seed, training=train_info)
    res.pop("figures", None)
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "acceptance.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [
        "# STPDnet acceptance: simulated low-count dynamic PET (64 x 64, 60 views, 24 frames over 60 min)",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {date}; seed {a.seed}; {a.test_studies} test studies, {a.val_studies} validation studies "
        f"(disjoint seeds from training)",
        f"- MLEM: {res['mlem_iterations']} iterations (best on validation); KEM-ST: {res['kem_iterations']} iterations (best on validation)",
        "- per-frame metrics averaged over frames and studies; lesion TAC: mean over frames of |bias| and of the "
        "std across studies of the relative error of the lesion's mean activity",
        "",
        "| method | PSNR (dB) | SSIM | relative RMSE | lesion TAC bias (%) | lesion TAC std (%) | training |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in res["table"].items():
        tr = train_info.get(m)
        tr_s = f"{tr['train_minutes']:.1f} min, {a.steps} steps" if tr else "-"
        lines.append(f"| {m} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['rel_rmse']:.4f} | {r['lesion_bias_pct']:.1f} | "
                     f"{r['lesion_std_pct']:.1f} | {tr_s} |")
    with open(os.path.join(a.results, "acceptance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
