"""python -m methods.doha train|eval: multi-domain rPPG training (DOHA or a baseline) on synthetic
source domains, evaluated on a held-out target domain."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from methods.common import add_common_args, pick_device, training_run
from methods.rppg.cli import add_eval_parser, report_training, run_eval
from methods.rppg.scs import MODES
from methods.rppg.synth import DOMAINS

from .train import METHODS, DOHAConfig, domain_sets, load_model, train


def build_parser() -> argparse.ArgumentParser:
    d = DOHAConfig()
    p = argparse.ArgumentParser(
        prog="python -m methods.doha",
        description=(
            "DOHA (Sun et al., ACM MM 2023): train on several synthetic source domains, test on an unseen one. "
            "Methods: pearson (plain multi-domain, negative Pearson), byhe (SCS maps), hps (SCS maps + DOHA's "
            "Toeplitz-regularized loss), hho (per-instance / per-domain PCGrad on the wave loss, outlier "
            "rejection), doha (both)."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the source domains, evaluate on the target domain")
    t.add_argument("--method", choices=METHODS, default=d.method)
    t.add_argument("--sources", nargs="+", choices=sorted(DOMAINS), default=list(d.sources))
    t.add_argument("--target", choices=sorted(DOMAINS), default=d.target)
    t.add_argument("--scs-mode", choices=MODES, default=d.scs_mode)
    for name, help_ in (
        ("steps", "training steps"),
        ("per_domain", "clips per source domain per step"),
        ("clip", "frames per training clip"),
        ("shrink", "backbone width divisor"),
        ("n_train", "training videos per source domain"),
        ("n_test", "target-domain test videos"),
        ("frames", "frames per training video"),
        ("test_frames", "frames per test video (0: as the training videos)"),
        ("size", "frame size (pixels)"),
        ("reject_window", "FIFO length of the instance rejection"),
    ):
        t.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=f"{help_} (default: %(default)s)"
        )
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--no-instance-level", action="store_true", help="hho/doha: no instance-level PCGrad")
    t.add_argument("--no-domain-level", action="store_true", help="hho/doha: no domain-level PCGrad")
    add_common_args(t, default_out="runs/doha")
    add_eval_parser(sub, "default: the run's target domain")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    device = pick_device(a.device)
    try:
        if a.command == "train":
            cfg = DOHAConfig(
                method=a.method,
                sources=tuple(a.sources),
                target=a.target,
                steps=a.steps,
                per_domain=a.per_domain,
                clip=a.clip,
                lr=a.lr,
                shrink=a.shrink,
                scs_mode=a.scs_mode,
                reject_window=a.reject_window,
                instance_level=not a.no_instance_level,
                domain_level=not a.no_domain_level,
                n_train=a.n_train,
                n_test=a.n_test,
                frames=a.frames,
                test_frames=a.test_frames,
                size=a.size,
                seed=a.seed,
            )
            cfg.check()
            with training_run(a.out, vars(a), fresh=a.fresh, name="doha") as run:
                model, test = train(
                    cfg, run, device, show_progress=not a.no_progress, checkpoint_every=max(1, a.checkpoint_every) * 50
                )
                report_training(
                    run,
                    model,
                    test,
                    cfg.fs,
                    f"{cfg.method}: {'+'.join(cfg.sources)} -> {cfg.target}",
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
            cfg.target,
            lambda: domain_sets(cfg)[1],
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
