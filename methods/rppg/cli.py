"""The parts the rPPG methods' CLIs (``python -m methods.byhe|doha|sspd``) share: the ``train``
sub-command's options (the config dataclass's flags and the run options, ``--checkpoint-every``
in steps), the command itself (alone or as one rank under torchrun), the ``eval`` sub-command and
the report a ``train`` run ends with (evaluation and results tables first, then the loss curve
and the example figure, which a missing matplotlib only skips)."""

from __future__ import annotations

import argparse
from typing import Callable, Dict

from methods.common import (
    add_common_args,
    add_dataclass_args,
    init_distributed,
    optional_plots,
    plot_curves,
    run_options,
    training_run,
)

from .data import VideoSet, evaluation_clips
from .evaluation import evaluate, results_table, write_results
from .plots import plot_example
from .synth import DOMAINS


def add_train_args(t: argparse.ArgumentParser, cfg_cls, *, default_out: str, checkpoint_every: int) -> None:
    """The ``train`` sub-command's flags: one per field of ``cfg_cls`` (``--seed`` is a run
    option), then the run options (``--out``, ``--seed``, ``--device``, ``--fresh``,
    ``--checkpoint-every`` in steps, ``--tensorboard``, ``--config``, ...)."""
    add_dataclass_args(t, cfg_cls, title="training")
    add_common_args(t, default_out=default_out, unit="steps", checkpoint_every=checkpoint_every)


def train_command(a, cfg, device, name: str, train: Callable, title: str, config: Dict, **example) -> int:
    """``train``: ``train(cfg, run, device, show_progress=, checkpoint_every=)`` in the run folder
    ``a.out`` (one process, or every rank under torchrun: rank 0 alone then evaluates and writes
    the report); ``title`` and ``config`` go to the report, ``example`` to ``plot_example``."""
    info = init_distributed(device)
    with training_run(a.out, run_options(a), fresh=a.fresh, name=name, tensorboard=a.tensorboard) as run:
        model, test = train(cfg, run, device, show_progress=not a.no_progress, checkpoint_every=a.checkpoint_every)
        if info.is_main:
            report_training(run, model, test, cfg.fs, title, config, **example)
    return 0


def add_eval_parser(sub, domain_help: str) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="evaluate a trained model on a domain's test videos")
    e.add_argument("--model", required=True, help="a train run folder or a checkpoint file")
    e.add_argument("--domain", choices=sorted(DOMAINS), default=None, help=domain_help)
    e.add_argument("--n-test", type=int, default=None, help="test videos (default: the training run's)")
    e.add_argument("--clip", type=int, default=0, help="test clip length in frames (default: whole videos)")
    e.add_argument("--seed", type=int, default=None, help="test-set seed (default: the training run's)")
    e.add_argument("--out", default=None, help="also write results.{md,json} and example.png there")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    return e


def report_training(run, model, test: VideoSet, fs: float, title: str, config: Dict, **example) -> Dict:
    """After training: evaluate on ``test``, log the MAE, write results.{md,json} into the run
    folder, then loss.png and example.png (``example``: ``plot_example``'s options; without
    matplotlib a warning in the log instead)."""
    res = evaluate(model, test, fs)
    run.info(f"{title}: HR MAE {res['MAE_fft']:.2f} bpm (FFT), {res['MAE_peak']:.2f} bpm (peaks)")
    write_results(run.out, title, res, {"config": config})
    rows = run.rows
    with optional_plots(run.warning):
        plot_curves(
            {"training loss": ([r["step"] + 1 for r in rows], [r.get("loss", float("nan")) for r in rows])},
            run.path("loss.png"),
            xlabel="step",
            ylabel="loss",
            title=title,
        )
        plot_example(model, next(evaluation_clips(test)), fs, run.path("example.png"), **example)
    return res


def run_eval(
    a,
    model,
    config: Dict,
    fs: float,
    default_domain: str,
    default_test: Callable[[], VideoSet],
    make_test: Callable[[str, int, int], VideoSet],
    default_n_test: int,
    default_seed: int,
    **example,
) -> int:
    """The ``eval`` sub-command: the training run's own test set unless --domain / --n-test /
    --seed ask for another (``make_test(domain, n_test, seed)``); prints or writes the results
    (results.{md,json}, then example.png, skipped with a warning without matplotlib)."""
    if a.n_test is not None and a.n_test < 1:
        raise ValueError(f"--n-test must be at least 1, got {a.n_test}")
    if a.clip < 0:
        raise ValueError(f"--clip must be 0 (whole videos) or a positive number of frames, got {a.clip}")
    domain = a.domain or default_domain
    n_test = a.n_test if a.n_test is not None else default_n_test
    if a.seed is None and domain == default_domain and n_test == default_n_test:
        test = default_test()
    else:
        test = make_test(domain, n_test, default_seed if a.seed is None else a.seed)
    res = evaluate(model, test, fs, a.clip)
    title = f"{a.model} on {domain} test videos"
    if a.out:
        write_results(a.out, title, res, {"config": config, "domain": domain})
        with optional_plots():
            plot_example(model, next(evaluation_clips(test, a.clip)), fs, f"{a.out}/example.png", **example)
    else:
        print(results_table(title, res))
    return 0
