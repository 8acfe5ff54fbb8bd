"""One figure per benchmark result file: `python -m benchmarks.figures [RESULT.json ...]`.

For each ``benchmarks/results/<op>_<device>_<mode>.json`` (all of them without arguments) it
writes ``<op>_<device>_<mode>.png`` beside it, two panels per op:

* **speed**: for every case, each baseline's median time over the pyops op's (the native variant,
  ``time / native time`` of the tables): above 1 the pyops op is faster, by that factor;
* **peak memory**: every variant's peak memory per case (MiB, log scale), where it was measured.

`python -m benchmarks.run` calls it on each result file it writes (skipped with a warning when
matplotlib is missing).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cases(rows):
    seen = []
    for r in rows:
        if r["case"] not in seen:
            seen.append(r["case"])
    return seen


def plot_result(path) -> Path:
    """Writes the figure of one result file; returns its path."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    cases = _cases(rows)
    native = {
        r["case"]: r["variant"] for r in rows if r["time_over_native"] == 1.0 and r["variant"].startswith("pyops")
    }
    variants = []
    for r in rows:
        if r["variant"] not in variants:
            variants.append(r["variant"])
    baselines = [v for v in variants if not v.startswith("pyops")]
    colour = {v: f"C{i % 10}" for i, v in enumerate(variants)}  # one colour per variant in both panels
    by = {(r["case"], r["variant"]): r for r in rows}

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(cases) + 4), 4.2))
    width = 0.8 / max(1, len(baselines))
    for i, v in enumerate(baselines):
        xs, ys = [], []
        for k, c in enumerate(cases):
            r = by.get((c, v))
            if r is not None:
                xs.append(k + (i - (len(baselines) - 1) / 2) * width)
                ys.append(r["time_over_native"])
        bars = ax_t.bar(xs, ys, width, label=v, color=colour[v])
        ax_t.bar_label(bars, labels=[f"{y:.2g}x" for y in ys], fontsize=7)
    ax_t.axhline(1.0, color="k", lw=0.8)
    ax_t.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    ax_t.yaxis.set_major_formatter(plain)
    ax_t.yaxis.set_minor_formatter(plain)
    ax_t.tick_params(axis="y", which="minor", labelsize=7)
    ax_t.set_ylabel("baseline time / pyops time (> 1: pyops faster)")
    ax_t.set_title("speed")

    width = 0.8 / max(1, len(variants))
    measured = False
    for i, v in enumerate(variants):
        xs, ys = [], []
        for k, c in enumerate(cases):
            r = by.get((c, v))
            if r is not None and r.get("peak_mb"):
                xs.append(k + (i - (len(variants) - 1) / 2) * width)
                ys.append(r["peak_mb"])
        if ys:
            measured = True
            ax_m.bar(xs, ys, width, label=v, color=colour[v])
    if measured:
        ax_m.set_yscale("log")
        ax_m.yaxis.set_major_formatter(plain)
        ax_m.yaxis.set_minor_formatter(plain)
        ax_m.tick_params(axis="y", which="minor", labelsize=7)
    else:
        ax_m.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax_m.transAxes)
    ax_m.set_ylabel("peak memory (MiB)")
    ax_m.set_title("peak memory")
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(["\n".join(textwrap.wrap(c, 14)) for c in cases], fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    natives = sorted(set(native.values())) or ["pyops"]
    fig.suptitle(
        f"{meta['op']} ({meta['mode']}): {meta['device_name']}, {meta['date']}; ratios against {', '.join(natives)}",
        fontsize=9,
    )
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    paths = list(argv if argv is not None else sys.argv[1:]) or sorted(str(p) for p in RESULTS_DIR.glob("*.json"))
    for p in paths:
        if Path(p).name.startswith("gpu_check"):
            continue  # the GPU check's summary, not a benchmark
        print(plot_result(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
