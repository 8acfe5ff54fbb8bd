"""python -m methods.byhe train|eval: heart rate from synthetic face videos with BYHE's SCS-map
training (or the negative-Pearson / max-cross-covariance baselines on the same backbone)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, fields

from methods.common import add_common_args, pick_device, plot_curves, training_run, worker_seed
from methods.rppg.data import LABELS, evaluation_clips, make_set
from methods.rppg.evaluation import evaluate, results_table, write_results
from methods.rppg.scs import MODES
from methods.rppg.synth import DOMAINS

from .plots import plot_example
from .train import LOSSES, TrainConfig, datasets, load_model, train


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m methods.byhe", description=(
        "BYHE (Sun et al., arXiv 2207.01697): train a TS-CAN-like backbone against the self-cosine-similarity map "
        "of the label's phase, which a label delay does not change, on synthetic face videos whose labels lag "
        "the video by 0-0.5 s. Baselines on the same backbone: negative Pearson and negative max "
        "cross-covariance on the wave."))
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and evaluate one model")
    t.add_argument("--loss", choices=LOSSES, default=d.loss, help="byhe: SCS maps; pearson / mcc: wave losses")
    t.add_argument("--label", choices=LABELS, default=d.label,
                   help="label: the delayed label waves; pulse: the videos' own pulses (zero delay)")
    t.add_argument("--domain", choices=sorted(DOMAINS), default=d.domain, help="synthetic domain")
    t.add_argument("--scs-mode", choices=MODES, default=d.scs_mode, help="phase unwrap of the SCS label (spec 1.1)")
    for name, help_ in (("steps", "training steps"), ("batch", "clips per step"), ("clip", "frames per training clip"),
                        ("shrink", "backbone width divisor (1: the code's full width)"),
                        ("n_train", "training videos"), ("n_test", "test videos"), ("frames", "frames per video"),
                        ("size", "frame size (pixels)")):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=f"{help_} (default: %(default)s)")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the cosine schedule")
    add_common_args(t, default_out="runs/byhe")
    e = sub.add_parser("eval", help="evaluate a trained model on test videos")
    e.add_argument("--model", required=True, help="a train run folder or a checkpoint file")
    e.add_argument("--domain", choices=sorted(DOMAINS), default=None, help="default: the training domain")
    e.add_argument("--n-test", type=int, default=None, help="default: the training run's")
    e.add_argument("--clip", type=int, default=0, help="test clip length in frames (default: whole videos)")
    e.add_argument("--seed", type=int, default=None, help="test-set seed (default: the training run's)")
    e.add_argument("--out", default=None, help="also write results.{md,json} and example.png there")
    e.add_argument("--device", default="auto")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    device = pick_device(a.device)
    try:
        if a.command == "train":
            names = {f.name for f in fields(TrainConfig)}
            cfg = TrainConfig(**{k: v for k, v in vars(a).items() if k in names})
            cfg.check()
            with training_run(a.out, vars(a), fresh=a.fresh, name="byhe") as run:
                model, test = train(cfg, run, device, show_progress=not a.no_progress,
                                    checkpoint_every=max(1, a.checkpoint_every) * 100)
                rows = run.rows
                res = evaluate(model, test, cfg.fs)
                run.info(f"test: HR MAE {res['MAE_fft']:.2f} bpm (FFT), {res['MAE_peak']:.2f} bpm (peaks)")
            plot_curves({"training loss": ([r["step"] + 1 for r in rows], [r["loss"] for r in rows])},
                        os.path.join(a.out, "loss.png"), xlabel="step", ylabel="loss", title=f"{cfg.loss} / {cfg.label}")
            plot_example(model, next(evaluation_clips(test)), cfg.fs, os.path.join(a.out, "example.png"), cfg.scs_mode)
            write_results(a.out, f"{cfg.loss} trained on {cfg.label} waves ({cfg.domain})", res, {"config": asdict(cfg)})
            return 0
        model, cfg = load_model(a.model, device)
        domain = a.domain or cfg.domain
        n_test = a.n_test if a.n_test is not None else cfg.n_test
        if a.seed is None and domain == cfg.domain and n_test == cfg.n_test:
            test = datasets(cfg)[1]
        else:
            seed = cfg.seed if a.seed is None else a.seed
            test = make_set(n_test, cfg.frames, cfg.size, domain, seed=worker_seed(seed, 1), fs=cfg.fs)
        res = evaluate(model.to(device), test, cfg.fs, a.clip)
        title = f"{a.model} on {domain} test videos"
        if a.out:
            write_results(a.out, title, res, {"config": asdict(cfg), "domain": domain})
            plot_example(model, next(evaluation_clips(test, a.clip)), cfg.fs, os.path.join(a.out, "example.png"), cfg.scs_mode)
        else:
            print(results_table(title, res))
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
