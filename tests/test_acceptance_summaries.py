"""The acceptance scripts of issue #25 (STPDnet, BEEAR, FedGH): their rows carry the fields the
issue names, and their paired statistics and claim checks are computed on the right pairs.
Synthetic results with known differences; no training."""

import numpy as np
import pytest

from methods.common import paired_difference


def test_stpdnet_rows_and_pairs():
    from methods.stpdnet.acceptance import FIXED, result_rows, summarize

    def entry(v):
        return {"psnr": v, "ssim": v / 100, "rel_rmse": 1 / v, "lesion_bias_pct": 100 / v, "lesion_std_pct": 1.0}

    table = {"MLEM": entry(20.0), "KEM-ST": entry(25.0)}
    runs = []
    for s in (0, 1, 2):
        table[f"STPDnet seed {s}"] = entry(28.0 + s)
        table[f"LPD seed {s}"] = entry(26.0 + 2 * s)
        runs += [
            {"model": "stpdnet", "seed": s, "train_minutes": 1.0},
            {"model": "lpd", "seed": s, "train_minutes": 0.5},
        ]
    rows = result_rows(table, runs)
    assert {r["method"] for r in rows} == {"MLEM", "KEM-ST", "STPDnet", "LPD"}
    for r in rows:
        assert {"method", "seed", "psnr", "ssim", "rmse", "tac_bias"} <= set(r)
        assert (r["seed"] is None) == (r["method"] in FIXED)
    sm = summarize(rows, [0, 1, 2])
    # STPDnet - LPD per seed: 2 - s -> (2, 1, 0): mean 1, and the t interval of those three values
    d = sm["paired"]["STPDnet - LPD"]["psnr"]
    ref = paired_difference([28, 29, 30], [26, 28, 30])
    assert d["mean"] == pytest.approx(1.0) and d["lo"] == pytest.approx(ref["lo"]) and d["n"] == 3
    # against a method without a training seed: its single value is paired with every seed
    assert sm["paired"]["STPDnet - KEM-ST"]["psnr"]["mean"] == pytest.approx(4.0)
    assert "LPD - STPDnet" not in sm["paired"] and "LPD - KEM-ST" in sm["paired"]
    assert sm["per_method"]["KEM-ST"]["psnr"]["std"] == 0.0
    assert sm["per_method"]["LPD"]["psnr"]["std"] == pytest.approx(2.0)


def test_stpdnet_per_study_differences():
    from methods.stpdnet.acceptance import per_study_differences

    def st(base):
        return {"psnr": [base, base + 1, base + 2], "ssim": [0.5, 0.6, 0.7], "rel_rmse": [0.2, 0.2, 0.2]}

    per_study = {"KEM-ST": st(20.0), "MLEM": st(10.0), "STPDnet seed 0": st(24.0), "STPDnet seed 1": st(26.0)}
    d = per_study_differences(per_study, [0, 1])
    assert set(d) == {"STPDnet - KEM-ST", "STPDnet - MLEM"}  # no LPD / DeepPET evaluated: no such pair
    k = d["STPDnet - KEM-ST"]
    assert k["psnr"]["mean"] == pytest.approx(5.0) and k["psnr"]["n"] == 3  # seeds averaged (25), per study
    assert k["rmse"]["mean"] == pytest.approx(0.0) and k["ssim"]["lo"] == pytest.approx(0.0)


def test_beear_rows_claim_and_pairs():
    from methods.beear.acceptance import result_rows, summarize

    def ev(asr, strict, em):
        return {
            "asr_trigger": asr,
            "asr_strict_trigger": strict,
            "benign_exact_match": em,
            "unsafe_trigger": 0.0,
            "asr_clean": 0.0,
            "asr_strict_clean": 0.0,
            "benign_perplexity": 1.1,
        }

    results = []
    # seed 0 meets the claim on both metrics; seed 1 only on keywords (a garbled refusal); seed 2 on neither
    after = {0: (0.0, 0.0), 1: (0.0, 40.0), 2: (2.5, 2.5)}
    for s in (0, 1, 2):
        results.append(
            {
                "position": "suffix",
                "trigger": "servius",
                "seed": s,
                "backdoored": ev(100.0, 100.0, 94.0),
                "beear": ev(*after[s], 91.0),
                "sft": ev(90.0, 95.0, 88.0),
            }
        )
    rows = result_rows(results)
    assert len(rows) == 9
    for r in rows:
        assert {"trigger", "method", "seed", "asr", "asr_strict", "benign_em"} <= set(r)
        assert 0 <= r["asr"] <= 1 and 0 <= r["asr_strict"] <= 1 and 0 <= r["benign_em"] <= 1
    sm = summarize(rows, ["suffix"], [0, 1, 2])["suffix"]
    assert [(c["keyword"], c["strict"]) for c in sm["claim"]] == [(True, True), (True, False), (False, False)]
    d = sm["paired"]["beear-backdoored"]["asr"]
    assert d["mean"] == pytest.approx(np.mean([0.0, 0.0, 0.025]) - 1.0)
    assert sm["paired"]["beear-sft"]["benign_em"]["mean"] == pytest.approx(0.03)


def test_fedgh_pairs_and_control():
    from methods.fedgh.acceptance import summarize

    rows = []
    for s in (0, 1, 2):
        for algo in ("fedavg", "fedprox"):
            rows.append(
                {"alpha": 0.1, "algorithm": algo, "harmonize": False, "seed": s, "acc": 90.0 + s, "last5_acc": 90.0}
            )
            rows.append(
                {"alpha": 0.1, "algorithm": algo, "harmonize": True, "seed": s, "acc": 91.0 + 2 * s, "last5_acc": 91.0}
            )
        rows.append(
            {
                "alpha": 0.1,
                "algorithm": "fedavg",
                "harmonize": "norm_matched",
                "seed": s,
                "acc": 90.5 + s,
                "last5_acc": 90.5,
            }
        )
    sm = summarize(rows, [0.1], ["fedavg", "fedprox"], [0, 1, 2])
    fedavg, fedprox = sm["cells"]
    assert set(fedavg["paired"]) == {"fedgh-plain", "fedgh-normmatched", "normmatched-plain"}
    assert set(fedprox["paired"]) == {"fedgh-plain"}  # no control run for FedProx
    assert fedavg["paired"]["fedgh-plain"]["acc"]["mean"] == pytest.approx(2.0)  # 1 + s over s = 0, 1, 2
    assert fedavg["paired"]["fedgh-normmatched"]["acc"]["mean"] == pytest.approx(1.5)
    assert fedavg["paired"]["normmatched-plain"]["last5_acc"]["mean"] == pytest.approx(0.5)
    assert sm["pooled_fedgh_minus_plain"]["n"] == 6


def test_seed_values():
    from methods.common import seed_values

    rows = [{"method": "A", "h": True, "seed": s, "v": 10.0 + s} for s in (2, 0, 1)]
    rows += [{"method": "A", "h": "norm_matched", "seed": s, "v": -1.0} for s in (0, 1, 2)]
    rows += [{"method": "K", "h": False, "seed": None, "v": 7.0}, {"method": "B", "h": False, "seed": 0, "v": 1.0}]
    assert seed_values(rows, [0, 1, 2], "v", method="A", h=True) == [10.0, 11.0, 12.0]  # in the order of seeds
    assert seed_values(rows, [0, 1, 2], "v", method="A", h="norm_matched") == [-1.0] * 3
    assert seed_values(rows, [0, 1], "v", method="K") == [7.0, 7.0]  # no training seed: paired with every seed
    assert seed_values(rows, [0, 1], "v", method="B") is None  # seed 1 missing
