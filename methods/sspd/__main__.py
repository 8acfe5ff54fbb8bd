"""python -m methods.sspd train|eval: unsupervised rPPG (SSPD) on synthetic face videos, or the
supervised reference on the same network."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from methods.common import add_common_args, pick_device, training_run
from methods.rppg.cli import add_eval_parser, report_training, run_eval
from methods.rppg.data import LABELS
from methods.rppg.synth import DOMAINS

from .augment import CROPS
from .train import NETS, SSPDConfig, datasets, load_model, resolve_net, train


def build_parser() -> argparse.ArgumentParser:
    d = SSPDConfig()
    p = argparse.ArgumentParser(
        prog="python -m methods.sspd",
        description=(
            "SSPD (Zhang et al., IEEE TMM 2024): heart rate from face video learned without labels, by "
            "self-similarity prior distillation from an EMA teacher (two augmented views, S3M self-similarity "
            "maps, hierarchical losses). --supervised trains the same network on the labels instead."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (without labels unless --supervised) and evaluate")
    t.add_argument("--supervised", action="store_true", help="negative Pearson on the labels instead of SSPD")
    t.add_argument(
        "--label", choices=LABELS, default=d.label, help="--supervised: pulse (zero delay) or label (delayed)"
    )
    t.add_argument("--domain", choices=sorted(DOMAINS), default=d.domain)
    t.add_argument(
        "--crop", choices=CROPS, default=d.crop, help="faithful: the code's top-left crop of the online view"
    )
    t.add_argument("--keep", type=float, default=d.keep, help="keep-probability of the masked difference")
    t.add_argument(
        "--eval-net",
        choices=NETS,
        default=d.eval_net,
        help="the SSPD network tested: the EMA teacher (batch-norm statistics of the unmasked view) or "
        "the student (of the masked view)",
    )
    for name, help_ in (
        ("epochs", "epochs (one clip per training video each)"),
        ("steps", "iterations (0: epochs x ceil(n_train / batch))"),
        ("batch", "clips per step"),
        ("clip", "frame differences per view"),
        ("width", "channel-width divisor (1: the code's network)"),
        ("n_train", "training videos"),
        ("n_test", "test videos"),
        ("frames", "frames per training video"),
        ("test_frames", "frames per test video (0: as the training videos)"),
        ("size", "frame size (pixels)"),
    ):
        t.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=f"{help_} (default: %(default)s)"
        )
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument(
        "--no-spatial-padding", action="store_true", help="the code's time-only padding (frames of at least 66 x 66)"
    )
    add_common_args(t, default_out="runs/sspd")
    e = add_eval_parser(sub, "default: the training domain")
    e.add_argument(
        "--net",
        choices=NETS,
        default=None,
        help="the network to test (default: the run's --eval-net; the student for a supervised run)",
    )
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    device = pick_device(a.device)
    try:
        if a.command == "train":
            cfg = SSPDConfig(
                supervised=a.supervised,
                label=a.label,
                epochs=a.epochs,
                steps=a.steps,
                batch=a.batch,
                clip=a.clip,
                lr=a.lr,
                width=a.width,
                spatial_padding=not a.no_spatial_padding,
                crop=a.crop,
                keep=a.keep,
                eval_net=a.eval_net,
                domain=a.domain,
                n_train=a.n_train,
                n_test=a.n_test,
                frames=a.frames,
                test_frames=a.test_frames,
                size=a.size,
                seed=a.seed,
            )
            cfg.check()
            with training_run(a.out, vars(a), fresh=a.fresh, name="sspd") as run:
                model, test = train(
                    cfg,
                    run,
                    device,
                    show_progress=not a.no_progress,
                    checkpoint_every=max(1, a.checkpoint_every) * cfg.iters_per_epoch,
                )
                net = resolve_net(cfg)
                report_training(
                    run,
                    model,
                    test,
                    cfg.fs,
                    f"{'supervised' if cfg.supervised else 'SSPD (no labels)'} on {cfg.domain}, the {net}",
                    {**asdict(cfg), "tested_net": net},
                    offset=1,
                )
            return 0
        model, cfg = load_model(a.model, device, a.net)
        return run_eval(
            a,
            model,
            {**asdict(cfg), "tested_net": resolve_net(cfg, a.net)},
            cfg.fs,
            cfg.domain,
            lambda: datasets(cfg)[1],
            lambda d, n, seed: cfg.test_set(d, n, seed),
            cfg.n_test,
            cfg.seed,
            offset=1,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
