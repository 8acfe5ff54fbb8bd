"""The benchmark runner's per-case output and its figures (benchmarks/common.py, benchmarks/figures.py)."""

import json

import pytest

from benchmarks import common, figures


def _rows():
    rows = []
    for case, peaks in (("row N=7", (3.0, 40.0, 12.0)), ("linear N=5 H=3", (None, None, None))):
        for variant, ratio, peak in zip(("pyops", "eager", "compiled"), (1.0, 4.0, 0.8), peaks):
            rows.append(
                dict(
                    case=case,
                    variant=variant,
                    median_ms=ratio,
                    p20_ms=ratio,
                    p80_ms=ratio,
                    reps=3,
                    time_over_native=ratio,
                    peak_mb=peak,
                    native_peak_over_this=None,
                )
            )
    return rows


def test_figure_per_result_file(tmp_path):
    pytest.importorskip("matplotlib")
    meta = dict(op="toy", device="cpu", device_name="a CPU (2 threads)", mode="quick", date="2026-12-07 06:00 UTC")
    path = tmp_path / "toy_cpu_quick.json"
    path.write_text(json.dumps(dict(meta=meta, rows=_rows())))
    out = figures.plot_result(path)
    assert out == tmp_path / "toy_cpu_quick.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no peak measured anywhere (--no-memory): still a figure
    for r in (rows := _rows()):
        r["peak_mb"] = None
    path.write_text(json.dumps(dict(meta=meta, rows=rows)))
    assert figures.plot_result(path).stat().st_size > 1000
    # main() draws every result file given and passes over the GPU check's summary
    (tmp_path / "gpu_check_cuda.json").write_text("{}")
    assert figures.main([str(path), str(tmp_path / "gpu_check_cuda.json")]) == 0


def test_run_cases_reports_each_case_as_it_finishes():
    seen = []
    cases = [
        common.Case(f"case{k}", dict(k=k), lambda device: {"pyops": lambda: None, "eager": lambda: None})
        for k in range(3)
    ]
    rows = common.run_cases("toy", cases, "cpu", reps=2, quick=True, memory=False, on_case=seen.append)
    assert [[r["case"] for r in part] for part in seen] == [["case0"] * 2, ["case1"] * 2, ["case2"] * 2]
    assert [r for part in seen for r in part] == rows
