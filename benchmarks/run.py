"""Benchmark runner: `python -m benchmarks.run [--quick] [--only OP] [--device cpu|cuda]`.

Runs every op's benchmark (native pyops op vs eager and compiled pure-PyTorch references),
prints one table per op and writes JSON + markdown to benchmarks/results/ (file names carry the
device kind and the mode; the device name is inside). `make bench` runs the quick mode.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from . import common

BENCHES = {
    "cross_view_kl": "benchmarks.bench_cross_view_kl",
    "knn_patch": "benchmarks.bench_knn_patch",
    "knn_points": "benchmarks.bench_knn_points",
    "harmonize": "benchmarks.bench_harmonize",
    "pet": "benchmarks.bench_pet",
    "gr_loss": "benchmarks.bench_gr_loss",
    "diagonal_stats": "benchmarks.bench_diagonal_stats",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (make bench)")
    p.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only these ops")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--probe", metavar="MODULE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.probe:  # peak memory of every variant of one module, in this (fresh) process
        common.probe_all(args.probe, args.quick, args.device)
        return 0

    reps = args.reps or (3 if args.quick else 5)
    bw = common.copy_bandwidth_gbps(args.device)
    exp_ceiling = common.exp_ceiling(args.device)
    exp_text = "" if exp_ceiling is None else f"; exp ceiling {exp_ceiling / 1e9:.2f} G exp/s"
    print(
        f"device: {common.device_name(args.device)}; measured copy bandwidth {bw:.1f} GB/s{exp_text}; "
        f"mode: {'quick' if args.quick else 'full'}; {reps} interleaved repetitions",
        flush=True,
    )
    for op in args.only or sorted(BENCHES):
        module = BENCHES[op]
        mod = importlib.import_module(module)
        print(f"\n## {op}", flush=True)

        def show(case_rows):
            for r in case_rows:
                if "gbps" in r:
                    r["fraction_of_copy_bandwidth"] = r["gbps"] / bw
                if "exp_rate" in r and exp_ceiling:
                    r["fraction_of_exp_ceiling"] = r["exp_rate"] / exp_ceiling
            print(common.format_table(case_rows), flush=True)

        rows = common.run_cases(
            module,
            mod.cases(args.quick, args.device),
            args.device,
            reps,
            args.quick,
            memory=not args.no_memory,
            on_case=show,
        )
        extra = dict(copy_bandwidth_gbps=bw)
        if exp_ceiling is not None:
            extra["exp_ceiling_per_s"] = exp_ceiling
        jpath, mpath = common.write_results(op, args.device, args.quick, rows, extra)
        written = f"{jpath} and {mpath}"
        try:
            from .figures import plot_result

            written += f", figure {plot_result(jpath)}"
        except ImportError as e:
            print(f"warning: figure skipped ({e})", file=sys.stderr)
        print(f"(written to {written})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
