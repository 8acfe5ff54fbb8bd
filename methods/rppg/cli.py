"""The parts the rPPG methods' CLIs (``python -m methods.byhe|doha|sspd``) share: the ``eval``
sub-command and the report a ``train`` run ends with (evaluation, loss curve, example figure,
results tables)."""

from __future__ import annotations

import argparse
from typing import Callable, Dict

from methods.common import plot_curves

from .data import VideoSet, evaluation_clips
from .evaluation import evaluate, results_table, write_results
from .plots import plot_example
from .synth import DOMAINS


def add_eval_parser(sub, domain_help: str) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="evaluate a trained model on a domain's test videos")
    e.add_argument("--model", required=True, help="a train run folder or a checkpoint file")
    e.add_argument("--domain", choices=sorted(DOMAINS), default=None, help=domain_help)
    e.add_argument("--n-test", type=int, default=None, help="test videos (default: the training run's)")
    e.add_argument("--clip", type=int, default=0, help="test clip length in frames (default: whole videos)")
    e.add_argument("--seed", type=int, default=None, help="test-set seed (default: the training run's)")
    e.add_argument("--out", default=None, help="also write results.{md,json} and example.png there")
    e.add_argument("--device", default="auto")
    return e


def report_training(run, model, test: VideoSet, fs: float, title: str, config: Dict, **example) -> Dict:
    """After training: evaluate on ``test``, log the MAE, write loss.png, example.png (``example``:
    ``plot_example``'s options) and results.{md,json} into the run folder."""
    res = evaluate(model, test, fs)
    run.info(f"{title}: HR MAE {res['MAE_fft']:.2f} bpm (FFT), {res['MAE_peak']:.2f} bpm (peaks)")
    rows = run.rows
    plot_curves(
        {"training loss": ([r["step"] + 1 for r in rows], [r.get("loss", float("nan")) for r in rows])},
        run.path("loss.png"),
        xlabel="step",
        ylabel="loss",
        title=title,
    )
    plot_example(model, next(evaluation_clips(test)), fs, run.path("example.png"), **example)
    write_results(run.out, title, res, {"config": config})
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
    --seed ask for another (``make_test(domain, n_test, seed)``); prints or writes the results."""
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
        plot_example(model, next(evaluation_clips(test, a.clip)), fs, f"{a.out}/example.png", **example)
    else:
        print(results_table(title, res))
    return 0
