"""The MSGNN acceptance (methods/msgnn/acceptance.py): its rows and paired statistics on synthetic
evaluations with known differences, and the seeded crop test set (the same items for every model,
deterministic) with a tiny untrained model. The end-to-end --smoke run is marked slow."""

import json
import os

import numpy as np
import pytest
import torch

from methods.common import paired_difference
from methods.msgnn import acceptance as A
from methods.msgnn import data as D
from methods.msgnn.evaluate import crop_positions, evaluate_crops, held_out_crops
from methods.msgnn.model import MSGNN

SEEDS = [0, 1, 2]
CROPS, DRAWS = 4, 2


def fake_eval(model, seed, base):
    """An eval_job result whose per-item PSNR is base[preset] + 0.1 * crop (crop = item // DRAWS) and
    SSIM base / 100; the draw adds nothing, so per-seed means are base + 0.15."""
    items = {}
    for preset, b in base.items():
        crop = [c for c in range(CROPS) for _ in range(DRAWS)]
        p = [b + 0.1 * c for c in crop]
        items[preset] = {
            "psnr": p,
            "ssim": [v / 100 for v in p],
            "crop": crop,
            "draw": [d for _ in range(CROPS) for d in range(DRAWS)],
        }
    return {"model": model, "seed": seed, "items": items}


def synthetic():
    evals = [fake_eval("input", None, {"light": 20.0, "heavy": 12.0})]
    trained = {}
    for s in SEEDS:
        evals.append(fake_eval("no_graph", s, {"light": 28.0 + s, "heavy": 22.0}))
        evals.append(fake_eval("faithful", s, {"light": 29.0 + 2 * s, "heavy": 21.0 + 0.1 * s}))
        evals.append(fake_eval("fixed", s, {"light": 28.5 + s, "heavy": 22.5}))
        for m in ("no_graph", "faithful", "fixed"):
            trained[(m, s)] = {"train_minutes": 1.0 + s}
    items = {}
    for preset in A.PRESETS:
        items[preset] = {"crop": evals[0]["items"][preset]["crop"], "draw": evals[0]["items"][preset]["draw"]}
        for e in evals:
            key = "input" if e["model"] == "input" else f"{e['model']} seed {e['seed']}"
            items[preset][key] = {k: e["items"][preset][k] for k in ("psnr", "ssim")}
    return evals, trained, items


def test_rows_and_paired_differences_on_the_right_pairs():
    evals, trained, items = synthetic()
    rows = A.result_rows(evals, trained)
    assert len(rows) == 2 * (1 + 3 * len(SEEDS))
    for r in rows:
        assert {"rain", "model", "seed", "psnr", "ssim"} <= set(r)
        assert r["rain"] in ("light", "heavy") and r["model"] in ("input", "no_graph", "faithful", "fixed")
        assert (r["seed"] is None) == (r["model"] == "input") and r["n"] == CROPS * DRAWS
        assert ("train_minutes" in r) == (r["model"] != "input")
    light = {(r["model"], r["seed"]): r for r in rows if r["rain"] == "light"}
    assert light[("faithful", 2)]["psnr"] == pytest.approx(33.15)  # 29 + 2 * 2 + mean(0.1 * crop)
    assert light[("faithful", 2)]["ssim"] == pytest.approx(0.3315)

    sm = A.summarize(rows, SEEDS, items)
    assert set(sm) == {"light", "heavy"}
    pairs = sm["light"]["paired"]
    assert set(pairs) == {
        "faithful - no_graph",
        "fixed - no_graph",
        "fixed - faithful",
        "no_graph - input",
        "faithful - input",
        "fixed - input",
    }
    # faithful - no_graph per seed: 1 + s -> (1, 2, 3): mean 2, but with 3 seeds the interval
    # (2 -/+ 4.30 / sqrt(3)) holds 0
    d = pairs["faithful - no_graph"]["psnr"]
    ref = paired_difference([29.15, 31.15, 33.15], [28.15, 29.15, 30.15])
    assert (
        d["mean"] == pytest.approx(2.0) and d["lo"] == pytest.approx(ref["lo"]) and d["hi"] == pytest.approx(ref["hi"])
    )
    assert d["n"] == 3 and d["per_seed"] == pytest.approx([1.0, 2.0, 3.0])
    assert d["lo"] < 0 < d["hi"] and d["verdict"] == "unresolved"
    # fixed - no_graph: +0.5 on every seed (zero spread: the interval is a point above 0)
    assert pairs["fixed - no_graph"]["psnr"]["mean"] == pytest.approx(0.5)
    assert pairs["fixed - no_graph"]["psnr"]["verdict"] == "A > B"
    # fixed - faithful: -0.5 - s -> (-0.5, -1.5, -2.5)
    assert pairs["fixed - faithful"]["psnr"]["per_seed"] == pytest.approx([-0.5, -1.5, -2.5])
    assert pairs["fixed - faithful"]["psnr"]["verdict"] == "unresolved"
    # SSIM is paired the same way (values / 100)
    assert pairs["faithful - no_graph"]["ssim"]["mean"] == pytest.approx(0.02)
    # the input has no training seed: its single value is paired with every seed, and has no spread
    assert pairs["no_graph - input"]["psnr"]["per_seed"] == pytest.approx([8.0, 9.0, 10.0])
    assert sm["light"]["per_model"]["input"]["psnr"]["std"] == 0.0
    assert sm["light"]["per_model"]["no_graph"]["psnr"]["std"] == pytest.approx(1.0)
    # heavy: faithful - no_graph = -1 + 0.1 s -> (-1, -0.9, -0.8)
    h = sm["heavy"]["paired"]["faithful - no_graph"]["psnr"]
    assert h["mean"] == pytest.approx(-0.9) and h["verdict"] == "A < B"
    # the per-crop extra: seeds and draws averaged per crop, then the interval over the crops
    pc = pairs["faithful - no_graph"]["psnr"]["per_crop"]
    assert pc["n"] == CROPS and pc["mean"] == pytest.approx(2.0) and pc["lo"] == pytest.approx(2.0)

    settings = {
        "training": {
            "steps": 10,
            "batch": 8,
            "crop": 48,
            "channels": 8,
            "groups": 4,
            "units": 8,
            "train_draws": 3,
            "lr": 5e-4,
            "milestones": [6, 8],
        },
        "test": {
            "size": 112,
            "per_image": 8,
            "draws": DRAWS,
            "seed": 0,
            "images": ["chelsea"],
            "crops": CROPS,
            "items": CROPS * DRAWS,
        },
        "parameters": {"no_graph": 10, "faithful": 20, "fixed": 30},
        "train_minutes": {"no_graph": 1.0, "faithful": 2.0, "fixed": 3.0},
    }
    meta = {
        "command": "python -m methods.msgnn.acceptance",
        "date": "today",
        "machine": "cpu",
        "seeds": SEEDS,
        "workers": 2,
        "minutes": 1.0,
    }
    timing = {
        "image": "481 x 321",
        "threads": 1,
        "repeats": 3,
        "windows": {"faithful": {"pyops": 0.5, "reference": 2.0, "speedup": 4.0, "index_agreement": 0.9996}},
    }
    text = A.markdown(meta, sm, settings, timing)
    assert "| MSGNN faithful - no-graph ablation | +2.00 [" in text and "(+1.00, +2.00, +3.00)" in text
    assert "| rainy input | 20.15 | 0.2015 | - | - |" in text and "4.00x" in text


def test_summary_with_two_seeds_and_a_missing_model():
    evals, trained, _ = synthetic()
    rows = A.result_rows([e for e in evals if e["model"] != "fixed" and e["seed"] != 2], trained)
    sm = A.summarize(rows, [0, 1])
    assert set(sm["light"]["paired"]) == {"faithful - no_graph", "no_graph - input", "faithful - input"}
    assert sm["light"]["paired"]["faithful - no_graph"]["psnr"]["n"] == 2
    assert "per_crop" not in sm["light"]["paired"]["faithful - no_graph"]["psnr"]


def test_crop_positions_do_not_overlap_and_stay_inside():
    rng = np.random.default_rng(0)
    pos = crop_positions(300, 451, 112, 8, rng)
    assert len(set(pos)) == 8
    for i, (y, x) in enumerate(pos):
        assert 0 <= y <= 300 - 112 and 0 <= x <= 451 - 112
        for y2, x2 in pos[i + 1 :]:
            assert abs(y - y2) >= 112 or abs(x - x2) >= 112
    with pytest.raises(ValueError, match="only 8 non-overlapping"):
        crop_positions(300, 451, 112, 9, rng)


def tiny(mode, seed):
    torch.manual_seed(seed)
    return MSGNN(mode, graphs=True, channels=4, groups=1, units=1).eval()


def test_crop_test_set_is_deterministic_and_shared_by_every_model():
    build = held_out_crops.__wrapped__  # bypass the per-process cache
    kw = dict(size=48, per_image=2, draws=2, seed=0)
    a, b = build("light", **kw), build("light", **kw)
    assert len(a) == len(D.TEST_IMAGES) * 2 * 2 and a.rainy.shape == (len(a), 3, 48, 48)
    assert torch.equal(a.rainy, b.rainy) and torch.equal(a.exemplar, b.exemplar) and a.names == b.names
    assert a.crop == [i * 2 + c for i in range(3) for _ in range(2) for c in range(2)]
    assert all(n.split("@")[0] in D.TEST_IMAGES for n in a.names)  # held-out images only
    # draws of one crop: the same clean patch and exemplar, different rain
    assert torch.equal(a.clean[0], a.clean[2]) and torch.equal(a.exemplar[0], a.exemplar[2])
    assert not torch.equal(a.rainy[0], a.rainy[2])
    # light and heavy rain share the crop positions, not the rain
    h = build("heavy", **kw)
    assert [n.split("/")[0] for n in h.names] == [n.split("/")[0] for n in a.names] and torch.equal(h.clean, a.clean)
    assert (h.rainy - h.clean).abs().mean() > (a.rainy - a.clean).abs().mean()
    # another test seed moves the crops
    assert build("light", size=48, per_image=2, draws=2, seed=1).names != a.names

    # two models (and the input) are scored on the same items, deterministically
    m1, m2 = tiny("faithful", 0), tiny("fixed", 1)
    r1, r1b, r2 = evaluate_crops(m1, a, batch=5), evaluate_crops(m1, b, batch=3), evaluate_crops(m2, a)
    assert r1 == r1b and len(r1["psnr"]) == len(r2["psnr"]) == len(a)
    assert r1["psnr"] != r2["psnr"]
    inp = evaluate_crops(None, a)
    assert np.mean(inp["psnr"]) > 20 and all(0 < s <= 1 for s in inp["ssim"])


def test_eval_job_keeps_a_finished_evaluation(tmp_path):
    settings = dict(size=48, per_image=1, draws=1, seed=0)
    job = {
        "model": "input",
        "seed": None,
        "folder": None,
        "checkpoint": None,
        "settings": settings,
        "presets": ["light"],
        "cache": str(tmp_path / "eval_input.json"),
    }
    r = A.eval_job(job)
    assert not r["cached"] and len(r["items"]["light"]["psnr"]) == 3
    again = A.eval_job(job)
    assert again["cached"] and again["items"] == json.loads(json.dumps(r["items"]))
    other = A.eval_job({**job, "settings": {**settings, "seed": 1}})  # other settings: evaluated again
    assert not other["cached"]


def test_smoke_settings_and_defaults():
    a = A.parse([])
    assert (a.steps, a.seeds, a.channels, a.groups, a.units, a.crop, a.batch) == (1800, [0, 1, 2], 8, 4, 8, 48, 8)
    assert (a.test_crop, a.crops_per_image, a.draws, a.workers) == (112, 8, 3, 2)
    assert a.out == "runs/msgnn_acceptance_v2" and a.results.endswith(os.path.join("msgnn", "results"))
    s = A.parse(["--smoke", "--steps", "3"])
    assert s.steps == 3 and s.channels == A.SMOKE["channels"] and s.results == os.path.join(s.out, "results")


@pytest.mark.slow
def test_smoke_acceptance_end_to_end(tmp_path):
    res = A.main(["--smoke", "--workers", "1", "--out", str(tmp_path / "runs")])
    assert {(r["rain"], r["model"]) for r in res["rows"]} == {
        (p, m) for p in A.PRESETS for m in ("input", "no_graph", "faithful", "fixed")
    }
    out = tmp_path / "runs" / "results"
    for f in ("acceptance.json", "acceptance.md", "crops_light.png", "crops_heavy.png", "training.png"):
        assert (out / f).exists()
    saved = json.loads((out / "acceptance.json").read_text())
    assert set(saved["meta"]) >= {"command", "date", "machine", "seeds"} and saved["rows"] == res["rows"]
