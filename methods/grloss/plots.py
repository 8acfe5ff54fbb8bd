"""The figure of GR's per-epoch schedule: k-hat(p) and v(p) for every epoch run, and the
schedule parameters w, b, mu, sigma against the epoch (the CLI's schedule.png and the
acceptance run's gr_trajectory.png)."""

from __future__ import annotations

from typing import Dict, List, Optional


def plot_schedule(history: List[Dict], path: str, title: str = "") -> Optional[str]:
    """``history``: rows with epoch, w, b, mu, sigma. Returns the path; without matplotlib a
    `MissingOptionalDependency` (the CLI draws it inside ``optional_plots``)."""
    import numpy as np

    from pyops._optional import requires

    with requires("methods", "plots"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = np.linspace(0, 1, 101)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=120)
    cmap = plt.get_cmap("viridis")
    n = len(history)
    for i, r in enumerate(history):
        c = cmap(i / max(1, n - 1))
        lab = f"epoch {r['epoch']}" if i in (0, n - 1) else None
        axes[0].plot(p, 1 / (1 + np.exp(-(r["w"] * p + r["b"]))), color=c, lw=1.2, label=lab)
        axes[1].plot(p, np.exp(-((p - r["mu"]) ** 2) / (2 * r["sigma"] ** 2)), color=c, lw=1.2, label=lab)
    e = [r["epoch"] for r in history]
    for key in ("w", "b", "mu", "sigma"):
        axes[2].plot(e, [r[key] for r in history], marker="o", ms=3, label=key)
    axes[0].set(xlabel="p", ylabel="k-hat(p)", title="soft pseudo-label k-hat(p; beta_e)")
    axes[1].set(xlabel="p", ylabel="v(p)", title="weight v(p; alpha_e)")
    axes[2].set(xlabel="epoch", title="schedule parameters")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
