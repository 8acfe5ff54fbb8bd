"""Line plots of logged metrics (matplotlib, Agg backend: no screen needed)."""

from typing import Dict, Iterable, Optional, Sequence, Tuple


def plot_curves(
    curves: Dict[str, Tuple[Sequence[float], Sequence[float]]],
    path: str,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    bands: Optional[Dict[str, Tuple[Iterable, Iterable]]] = None,
) -> Optional[str]:
    """One line per entry of `curves` ({label: (x, y)}), optional shaded bands ({label: (lo, hi)}
    over the same x), saved to `path` (PNG). Returns the path. Without matplotlib: a
    `MissingOptionalDependency` (an ImportError; the CLIs draw their plots inside
    ``methods.common.optional_plots``, which turns it into a warning after the results are written)."""
    from pyops._optional import requires

    with requires("methods", "plots"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, (x, y) in curves.items():
        (line,) = ax.plot(list(x), list(y), label=label, lw=1.5)
        if bands and label in bands:
            lo, hi = bands[label]
            ax.fill_between(list(x), list(lo), list(hi), color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
