"""The benchmark machinery's memory probe: one fresh process measures every variant of a module."""

from __future__ import annotations

import textwrap

import pytest

from benchmarks import common

FAKE = textwrap.dedent(
    """
    import torch
    from benchmarks.common import Case

    MIB = 1 << 20

    def _setup(device):
        def alloc():  # 64 MiB written, then freed
            x = torch.empty(64 * MIB // 4)
            x.fill_(1.0)
            return float(x[-1])

        def nothing():
            return 0

        def fails():
            raise ValueError("broken variant")

        return {"alloc": alloc, "nothing": nothing, "fails": fails}

    def _setup_small(device):
        return {"alloc16": lambda: torch.ones(16 * MIB // 4).sum()}

    def cases(quick, device):
        return [Case("big", {}, _setup, native="alloc"), Case("small one", {}, _setup_small, native="alloc16")]
    """
)


@pytest.mark.skipif(not common.Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_probe_memory_measures_every_variant_in_one_process(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_bench_mod.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    peaks = common.probe_memory("fake_bench_mod", quick=True, device="cpu")
    mib = 1 << 20
    # the variant that writes 64 MiB has a resident peak of about that much: the pages it touched,
    # give or take what the interpreter frees or allocates meanwhile (a few MiB at most)
    assert 56 * mib <= peaks[("big", "alloc")] < 96 * mib
    assert peaks[("big", "nothing")] < 8 * mib
    assert 12 * mib <= peaks[("small one", "alloc16")] < 48 * mib  # a case name with a space
    # the failing variant is left out and reported; the others were still measured
    assert ("big", "fails") not in peaks
    err = capsys.readouterr().err
    assert "memory probe failed for big/fails" in err and "broken variant" in err


def test_exp_ceiling():
    """The exp ceiling the row kernels are reported against: a rate on the CPU, none elsewhere."""
    rate = common.exp_ceiling("cpu")
    # at least one exp per 100 ns on 2 threads: any x86-64 core evaluates a vector of them faster
    assert rate is not None and 1e7 < rate < 1e13
    assert common.exp_ceiling("cuda") is None
