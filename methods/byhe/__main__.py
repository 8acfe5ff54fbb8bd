"""python -m methods.byhe train|eval: heart rate from face videos (synthetic, or the real UBFC-rPPG
and PURE datasets: ``--dataset``) with BYHE's SCS-map training (or the negative-Pearson /
max-cross-covariance baselines on the same backbone).

``train`` under ``torchrun --nproc_per_node N -m methods.byhe train ...`` trains with DDP: --batch
stays the global batch (divisible by N)."""

from __future__ import annotations

import argparse
import sys

from methods.common import cli_main, from_args, parse_args, pick_device
from methods.rppg.cli import add_eval_parser, add_train_args, run_eval, source_name, train_command
from methods.rppg.training import config_record

from .train import CHECKPOINT_EVERY, TrainConfig, load_model, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m methods.byhe",
        description=(
            "BYHE (Sun et al., arXiv 2207.01697): train a TS-CAN-like backbone against the self-cosine-similarity map "
            "of the label's phase, which a label delay does not change, on synthetic face videos whose labels lag "
            "the video by 0-0.5 s, or on a real dataset (--dataset ubfc-rppg | pure --data-dir PATH). Baselines on the "
            "same backbone: negative Pearson and negative max cross-covariance on the wave."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="train and evaluate one model",
        description="Train and evaluate one model. A larger --steps continues a finished run in --out; the "
        "cosine learning rate and weight decay then follow the new budget from the step it resumes at.",
    )
    add_train_args(t, TrainConfig, default_out="runs/byhe", checkpoint_every=CHECKPOINT_EVERY)
    add_eval_parser(sub, "default: the training domain")
    return p


def _main(argv=None) -> int:
    a = parse_args(build_parser(), argv)
    device = pick_device(a.device)
    if a.command == "train":
        cfg = from_args(TrainConfig, a)
        cfg.check()
        title = f"{cfg.loss} trained on {cfg.label} waves ({source_name(cfg)})"
        return train_command(a, cfg, device, "byhe", train, title, config_record(cfg), scs_mode=cfg.scs_mode)
    model, cfg = load_model(a.model, device)
    return run_eval(
        a,
        model,
        config_record(cfg),
        cfg.fs,
        cfg.domain if cfg.test_source == "synthetic" else cfg.test_source,
        lambda: cfg.eval_set(cfg.domain),
        lambda d, n, seed: cfg.test_set(d, n, seed),
        cfg.n_test,
        cfg.seed,
        settings=cfg,
        scs_mode=cfg.scs_mode,
    )


main = cli_main(_main)


if __name__ == "__main__":
    sys.exit(main())
