"""The acceptance scripts' statistics: paired per-seed differences and BYHE's verdict rules."""

import math

import pytest

from methods.byhe.acceptance import summarize
from methods.common import format_difference, paired_difference


def test_paired_difference_by_hand():
    p = paired_difference([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) * sd / sqrt(n)
    assert p["n"] == 3 and p["mean"] == pytest.approx(2.0)
    assert (p["lo"], p["hi"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert format_difference(p) == f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}]"
    one = paired_difference([1.0], [0.5])
    assert one["mean"] == 0.5 and math.isnan(one["lo"]) and format_difference(one) == "+0.50"
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([], [])


def _rows(loss, zero, delayed):
    return [
        {"domain": "d", "loss": loss, "delay": "zero", "seed": s, "mae": m, "snr": 0.0} for s, m in enumerate(zero)
    ] + [
        {"domain": "d", "loss": loss, "delay": "delayed", "seed": s, "mae": m, "snr": 0.0}
        for s, m in enumerate(delayed)
    ]


def test_byhe_verdicts():
    rows = (
        _rows("pearson", [1.0, 2.0, 1.5], [9.0, 12.0, 7.0])
        + _rows("byhe", [0.2, 0.2, 0.5], [0.5, 1.0, 0.2])
        + _rows("mcc", [20.0, 25.0, 22.0], [21.0, 24.0, 23.0])
    )
    s = {r["loss"]: r for r in summarize(rows, ["d"], ["pearson", "mcc", "byhe"])}
    assert s["pearson"]["claim_holds"] is True and s["pearson"]["diff"]["mean"] == pytest.approx(23.5 / 3)
    assert s["byhe"]["claim_holds"] is True and s["byhe"]["expected"] == "robust"
    assert s["mcc"]["learns_zero_delay"] is False and s["mcc"]["claim_holds"] is None  # not counted
    rows = _rows("pearson", [1.0, 1.0, 1.0], [1.5, 2.0, 1.0]) + _rows("byhe", [1.0, 1.0, 1.0], [4.0, 3.0, 5.0])
    s = {r["loss"]: r for r in summarize(rows, ["d"], ["pearson", "byhe"])}
    assert s["pearson"]["claim_holds"] is False and s["byhe"]["claim_holds"] is False
