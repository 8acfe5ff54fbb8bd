"""python -m methods.byhe train|eval: heart rate from synthetic face videos with BYHE's SCS-map
training (or the negative-Pearson / max-cross-covariance baselines on the same backbone)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields

from methods.common import add_common_args, pick_device, training_run
from methods.rppg.cli import add_eval_parser, report_training, run_eval
from methods.rppg.data import LABELS
from methods.rppg.scs import MODES
from methods.rppg.synth import DOMAINS

from .train import LOSSES, TrainConfig, datasets, load_model, train


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m methods.byhe",
        description=(
            "BYHE (Sun et al., arXiv 2207.01697): train a TS-CAN-like backbone against the self-cosine-similarity map "
            "of the label's phase, which a label delay does not change, on synthetic face videos whose labels lag "
            "the video by 0-0.5 s. Baselines on the same backbone: negative Pearson and negative max "
            "cross-covariance on the wave."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and evaluate one model")
    t.add_argument("--loss", choices=LOSSES, default=d.loss, help="byhe: SCS maps; pearson / mcc: wave losses")
    t.add_argument(
        "--label",
        choices=LABELS,
        default=d.label,
        help="label: the delayed label waves; pulse: the videos' own pulses (zero delay)",
    )
    t.add_argument("--domain", choices=sorted(DOMAINS), default=d.domain, help="synthetic domain")
    t.add_argument("--scs-mode", choices=MODES, default=d.scs_mode, help="phase unwrap of the SCS label (spec 1.1)")
    for name, help_ in (
        ("steps", "training steps"),
        ("batch", "clips per step"),
        ("clip", "frames per training clip"),
        ("shrink", "backbone width divisor (1: the code's full width)"),
        ("n_train", "training videos"),
        ("n_test", "test videos"),
        ("frames", "frames per training video"),
        ("test_frames", "frames per test video (0: as the training videos)"),
        ("size", "frame size (pixels)"),
    ):
        t.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=f"{help_} (default: %(default)s)"
        )
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the cosine schedule")
    add_common_args(t, default_out="runs/byhe")
    add_eval_parser(sub, "default: the training domain")
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
                model, test = train(
                    cfg, run, device, show_progress=not a.no_progress, checkpoint_every=max(1, a.checkpoint_every) * 100
                )
                report_training(
                    run,
                    model,
                    test,
                    cfg.fs,
                    f"{cfg.loss} trained on {cfg.label} waves ({cfg.domain})",
                    asdict(cfg),
                    scs_mode=cfg.scs_mode,
                )
            return 0
        model, cfg = load_model(a.model, device)
        return run_eval(
            a,
            model,
            asdict(cfg),
            cfg.fs,
            cfg.domain,
            lambda: datasets(cfg)[1],
            lambda d, n, seed: cfg.test_set(d, n, seed),
            cfg.n_test,
            cfg.seed,
            scs_mode=cfg.scs_mode,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
