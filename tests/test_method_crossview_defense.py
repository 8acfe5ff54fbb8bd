"""methods.crossview_defense: data, tokenizer, attacks, patch augmentation, the objective (fused
against eager), the model adapter on two architectures, the Trainer subclass, metrics and the CLI."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("skimage")

import pyops  # noqa: E402
from methods.crossview_defense import attacks as A  # noqa: E402
from methods.crossview_defense import data as D  # noqa: E402
from methods.crossview_defense import defense as DF  # noqa: E402
from methods.crossview_defense import metrics as M  # noqa: E402
from methods.crossview_defense.model import ModelConfig, VLMAdapter, build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)


@pytest.fixture(scope="module")
def examples():
    return D.make_examples(120, seed=3)


def _image(seed=0, lo=0.2, hi=0.8):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand((3, D.IMAGE_SIZE, D.IMAGE_SIZE), generator=g)


# --------------------------------------------------------------------------------------------
# data and tokenizer
# --------------------------------------------------------------------------------------------
def test_examples_are_valid_and_the_tokenizer_knows_every_word(examples):
    tasks = {ex.task for ex in examples}
    assert tasks == {"caption", "vqa"}
    assert any(ex.source != "scene" for ex in examples)  # photos are mixed in
    for ex in examples:
        assert ex.image.shape == (3, D.IMAGE_SIZE, D.IMAGE_SIZE) and 0 <= ex.image.min() and ex.image.max() <= 1
        ids = D.encode_words(ex.prompt + ex.answer)
        assert D.UNK not in ids and len(ids) == len(ex.prompt) + len(ex.answer)
        assert D.decode_ids(D.encode_words(ex.answer)) == " ".join(ex.answer)
        if ex.task == "caption":
            assert " ".join(ex.answer) in ex.refs
    assert D.make_examples(5, 1)[0].answer == D.make_examples(5, 1)[0].answer  # seeded


def test_scene_answers_match_the_drawn_scene():
    rng = np.random.default_rng(0)
    for _ in range(40):
        img, groups, bg = D.random_scene(rng)
        assert len({s for _, _, s in groups}) == len(groups)  # one colour per shape
        q, a = D.scene_questions(groups, bg, np.random.default_rng(1))
        if q[:2] == ["how", "many"]:
            assert a == D.COUNT_WORDS[{s + "s": n for n, _, s in groups}[q[2]]]
        caps = D.scene_captions(groups, bg)
        assert all(c for c in caps) and len(set(caps)) == 4


def test_collate_masks_prompts_and_empty_answers(examples):
    exs = [examples[0], dataclasses.replace(examples[1], answer=[])]
    b = D.collate(exs, 36)
    lab, ids = b["labels"], b["input_ids"]
    n_prompt = 1 + 36 + len(exs[0].prompt) + 1
    assert (lab[0, :n_prompt] == -100).all()
    assert lab[0, n_prompt:n_prompt + len(exs[0].answer) + 1].tolist() == D.encode_words(exs[0].answer) + [D.EOS]
    assert (lab[1] == -100).all()  # no answer: nothing to learn from
    assert (ids[:, 1:37] == D.IMAGE).all() and b["pixel_values"].shape == (2, 3, 48, 48)
    left = D.collate(exs, 36, with_answers=False, pad_left=True)
    assert (left["input_ids"][:, -1] == D.SEP).all()


# --------------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------------
def test_badnet_changes_only_its_corner():
    x = _image()
    y, p = A.BadNet().apply(x, ["describe", "the", "image"])
    diff = (y != x).any(0)
    assert diff[-7:-1, -7:-1].any() and not diff[:-7].any() and not diff[:, :-7].any() and not diff[-1].any()
    assert p == ["describe", "the", "image"]
    assert torch.equal(x, _image())  # the input is never modified


def test_blended_sig_issba_bounded_and_deterministic():
    x = _image()
    y, _ = A.Blended(alpha=0.15).apply(x, [])
    assert (y - x).abs().max() <= 0.15 + 1e-6 and (y - x).abs().mean() > 0.01
    assert torch.equal(y, A.Blended(alpha=0.15).apply(x, [])[0])
    s = A.SIG()
    y, _ = s.apply(x, [])
    torch.testing.assert_close(y - x, s.signal(48, 48))  # no clamping for an image in [0.2, 0.8]
    torch.testing.assert_close((y - x)[:, 0], (y - x)[:, 17], rtol=0, atol=1e-6)  # the same in every row
    eps = 8 / 255
    r1 = A.ISSBA(eps).apply(x, [])[0] - x
    r2 = A.ISSBA(eps).apply(_image(1), [])[0] - _image(1)
    assert r1.abs().max() <= eps + 1e-6 and r1.abs().max() > eps / 3
    assert not torch.allclose(r1, r2)  # sample-specific


def test_wanet_is_a_small_warp():
    x = _image()
    assert torch.allclose(A.WaNet(strength=0.0).apply(x, [])[0], x, atol=1e-5)
    flat = torch.full((3, 48, 48), 0.4)
    assert torch.allclose(A.WaNet().apply(flat, [])[0], flat, atol=1e-6)  # a warp moves pixels, nothing else
    y = A.WaNet(strength=2.0).apply(x, [])[0]
    assert 0 < (y - x).abs().mean() < 0.3


def test_text_image_trigger_touches_prompt_start_and_corner():
    x = _image()
    y, p = A.TextImage().apply(x, ["describe", "the", "image"])
    assert p == ["cf", "describe", "the", "image"]
    diff = (y != x).any(0)
    assert diff[-5:-1, -5:-1].any() and not diff[:-5].any() and not diff[:, :-5].any()


@pytest.mark.parametrize("name", sorted(A.ATTACKS))
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.05, 0.1])
def test_poisoning_is_exact_and_seeded(examples, name, ratio):
    atk = A.make_attack(name)
    out, idx = atk.poison(examples, ratio, seed=7)
    assert len(idx) == round(ratio * len(examples)) and len(set(idx)) == len(idx)
    assert idx == atk.poison(examples, ratio, seed=7)[1]
    for i, ex in enumerate(out):
        if i in idx:
            assert ex.poisoned and ex.task == "caption" and " ".join(ex.answer) == D.TARGET
            assert not torch.equal(ex.image, examples[i].image)
        else:
            assert ex is examples[i]
    if ratio == 0.1:
        assert idx != atk.poison(examples, ratio, seed=8)[1]


def test_bad_poisoning_ratio_and_images(examples):
    for r in (-0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="ratio"):
            A.BadNet().poison(examples, r, 0)
    with pytest.raises(ValueError, match="captioning"):
        A.BadNet().poison(examples, 1.0, 0)  # more than the captioning examples
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        A.SIG().apply(torch.rand(48, 48), [])
    with pytest.raises(ValueError, match="unknown attack"):
        A.make_attack("nope")


# --------------------------------------------------------------------------------------------
# patch augmentation
# --------------------------------------------------------------------------------------------
def _cells(x, c):
    b, ch, s, _ = x.shape
    g = s // c
    return x.reshape(b, ch, g, c, g, c).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)


@pytest.mark.parametrize("op", ["shuffle", "swap", "mask"])
@pytest.mark.parametrize("cell", [1, 2])
def test_patch_augment_works_on_whole_vision_patches(op, cell):
    x = torch.rand(5, 3, 48, 48)
    aug = DF.PatchAugment(48, 8, cell=cell, ops=(op,), mask_ratio=0.3, swaps=2)
    y = aug(x, torch.Generator().manual_seed(0))
    cx, cy = _cells(x, 8 * cell), _cells(y, 8 * cell)
    assert not torch.equal(x, y)
    for b in range(5):
        if op == "mask":
            fill = x[b].mean((1, 2))
            changed = ~(cx[b] == cy[b]).all(-1)
            k = max(1, round(0.3 * cx.shape[1]))
            assert int(changed.sum()) == k
            torch.testing.assert_close(cy[b, changed].reshape(k, 3, -1), fill[None, :, None].expand(k, 3, (8 * cell) ** 2))
        else:  # a permutation of whole cells
            match = (cy[b][:, None] == cx[b][None]).all(-1)
            assert (match.sum(1) >= 1).all()
            assert torch.equal(cy[b].sort(0).values, cx[b].sort(0).values)
            if op == "swap":
                assert int((cx[b] != cy[b]).any(-1).sum()) <= 4


def test_patch_augment_bad_sizes():
    with pytest.raises(ValueError, match="multiple of the cell size"):
        DF.PatchAugment(48, 8, cell=4)
    aug = DF.PatchAugment(48, 8)
    with pytest.raises(ValueError, match=r"\(B, C, 48, 48\)"):
        aug(torch.rand(2, 3, 32, 32))
    assert aug(torch.rand(0, 3, 48, 48)).shape == (0, 3, 48, 48)


# --------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------
def _objective_inputs(b=5, length=9, h=16, v=23, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(b, length, h, generator=g, dtype=dtype, requires_grad=True)
    hb = (ha.detach() + 0.3 * torch.randn(b, length, h, generator=g, dtype=dtype)).requires_grad_()
    w = (0.5 * torch.randn(v, h, generator=g, dtype=dtype)).requires_grad_()
    labels = torch.full((b, length), -100)
    for i in range(b):
        n = i % 4  # sample 0 has no answer tokens
        labels[i, length - n:] = torch.randint(0, v, (n,), generator=g)
    return ha, hb, w, labels


CONFIGS = [
    DF.DefenseConfig(),
    DF.DefenseConfig(divergence="reverse", cap="batch", kappa=50.0, tau_hi=0.5),
    DF.DefenseConfig(divergence="symmetric", uncertainty_weights=False, gamma=0.5, tau_lo=2.5, tau_hi=0.5,
                     softmax_temperature=2.5),
    DF.DefenseConfig(detach="original", kappa=50.0, weight_temperature=0.2, lambda_h=1.0, tau_lo=3.0),
    DF.DefenseConfig(detach="augmented", kappa=50.0, softmax_temperature=0.7, tau_lo=3.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_fused_objective_matches_eager_and_reaches_both_views(cfg, monkeypatch):
    calls = []
    real = pyops.fused_linear_cross_view
    monkeypatch.setattr(pyops, "fused_linear_cross_view", lambda *a, **k: calls.append(1) or real(*a, **k))
    ha, hb, w, labels = _objective_inputs()
    loss, stats = DF.cross_view_objective(ha, hb, labels, w, None, cfg)
    assert calls, "the fused op is not used"
    zeros = lambda gs: [torch.zeros_like(x) if g is None else g for g, x in zip(gs, (ha, hb, w))]
    grads = zeros(torch.autograd.grad(loss, (ha, hb, w), allow_unused=True))
    loss_e, stats_e = DF.cross_view_objective(ha, hb, labels, w, None, cfg, eager=True)
    grads_e = zeros(torch.autograd.grad(loss_e, (ha, hb, w), allow_unused=True))
    torch.testing.assert_close(loss, loss_e.to(loss.dtype), rtol=1e-6, atol=1e-8)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge.to(g.dtype), rtol=1e-5, atol=1e-8)
    assert stats["answer_tokens"] == int((labels[:, 1:] != -100).sum())
    if cfg.detach == "none":  # both views get gradients
        assert grads[1].abs().sum() > 0 and grads[0].abs().sum() > 0
    else:  # the detached view gets exactly its CE's gradient (none for the augmented view)
        ha2, hb2 = ha.detach().requires_grad_(), hb.detach().requires_grad_()
        ce_only = dataclasses.replace(cfg, lambda_cv=0.0, lambda_h=0.0)
        l2, _ = DF.cross_view_objective(ha2, hb2, labels, w, None, ce_only)
        g2 = torch.autograd.grad(l2, (ha2, hb2), allow_unused=True)
        i = 0 if cfg.detach == "original" else 1
        want = g2[i] if g2[i] is not None else torch.zeros_like(ha)
        torch.testing.assert_close(grads[i], want, rtol=1e-6, atol=1e-10)
    assert grads[0][0].abs().sum() == 0  # the sample without answer tokens gets none


def test_objective_is_minus_the_capped_divergence():
    ha, hb, w, labels = _objective_inputs()
    base = DF.DefenseConfig(lambda_cv=0.0, lambda_h=0.0)
    ce, _ = DF.cross_view_objective(ha, hb, labels, w, None, base)
    pushed, st = DF.cross_view_objective(ha, hb, labels, w, None, dataclasses.replace(base, lambda_cv=2.0, kappa=1e9))
    torch.testing.assert_close(ce - pushed, torch.tensor(2.0 * st["div"], dtype=ce.dtype))
    capped, _ = DF.cross_view_objective(ha, hb, labels, w, None,
                                        dataclasses.replace(base, lambda_cv=2.0, kappa=1e-3, cap="batch"))
    torch.testing.assert_close(ce - capped, torch.tensor(2e-3, dtype=ce.dtype))


def test_empty_answers_give_zero_loss_never_nan():
    ha, hb, w, labels = _objective_inputs()
    labels[:] = -100
    loss, stats = DF.cross_view_objective(ha, hb, labels, w, None, DF.DefenseConfig())
    loss.backward()
    assert loss.item() == 0 and stats["answer_tokens"] == 0 and torch.isfinite(ha.grad).all()


def test_defense_config_rejects_bad_values():
    for kw, msg in [({"mode": "x"}, "mode"), ({"divergence": "jsd2"}, "divergence"), ({"kappa": -1.0}, "kappa"),
                    ({"mask_ratio": 1.5}, "mask_ratio"), ({"weight_temperature": 0.0}, "weight_temperature"),
                    ({"ops": ("rotate",)}, "ops"), ({"lambda_cv": float("nan")}, "lambda_cv"), ({"cap": "x"}, "cap")]:
        with pytest.raises(ValueError, match=msg):
            DF.DefenseConfig(**kw).validate()


# --------------------------------------------------------------------------------------------
# the model, the adapter, training
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(SMALL)


def _batch(examples, n=6, n_img=36):
    return D.collate(examples[:n], n_img)


def test_adapter_hidden_states_are_what_the_lm_head_reads(small_model, examples):
    ad = VLMAdapter(small_model)
    assert (ad.image_size, ad.patch_size, ad.n_image_tokens) == (48, 8, 36)
    b = _batch(examples)
    small_model.eval()
    with torch.no_grad():
        h = ad.hidden_states(b)
        logits = small_model(**{k: v for k, v in b.items() if k != "labels"}).logits
    w, bias = ad.head()
    torch.testing.assert_close(torch.nn.functional.linear(h, w, bias), logits, rtol=1e-4, atol=1e-5)
    small_model.train()


@pytest.mark.parametrize("mode", DF.MODES)
def test_modes_backpropagate_through_the_model(small_model, examples, mode):
    d = DF.CrossViewDefense(small_model, DF.DefenseConfig(mode=mode), seed=0)
    small_model.zero_grad()
    loss, stats = d.loss(_batch(examples))
    loss.backward()
    assert torch.isfinite(loss) and stats["answer_tokens"] > 0
    g = small_model.get_output_embeddings().weight.grad
    assert g is not None and g.abs().sum() > 0
    vision = [p.grad for n, p in small_model.named_parameters() if "vision" in n and p.grad is not None]
    assert vision and sum(float(v.abs().sum()) for v in vision) > 0


def test_divergence_gradient_reaches_the_model(small_model, examples):
    """The cross-view term alone (no CE, no band) has a gradient: the views really differ. The
    untrained model's two views differ by ~4e-7 nats, close to float32 rounding of a KL (a few
    ulp of log V), so the objective is evaluated in float64 on the views' hidden states."""
    d = DF.CrossViewDefense(small_model, DF.DefenseConfig(lambda_h=0.0), seed=0)
    b = _batch(examples, 8)
    with torch.no_grad():
        h_a, h_b = (h.double() for h in d.two_views(b))
    w, bias = d.adapter.head()
    w, bias = w.detach().double(), None if bias is None else bias.detach().double()
    _, st = DF.cross_view_objective(h_a, h_b, b["labels"], w, bias, d.cfg)
    assert st["div"] > 1e-10  # float64 error: ~1e-15
    ha_leaf, hb_leaf = h_a.detach().requires_grad_(), h_b.detach().requires_grad_()
    cfg = dataclasses.replace(d.cfg, lambda_cv=1.0)
    loss, st2 = DF.cross_view_objective(ha_leaf, hb_leaf, b["labels"], w, bias, cfg)
    (loss - st2["ce"]).backward()
    assert hb_leaf.grad.abs().sum() > 0 and ha_leaf.grad.abs().sum() > 0


def test_wrong_image_size_is_a_clear_error(small_model, examples):
    d = DF.CrossViewDefense(small_model, DF.DefenseConfig())
    b = _batch(examples)
    b["pixel_values"] = torch.rand(6, 3, 32, 32)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, 48, 48\)"):
        d.loss(b)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model(dataclasses.replace(SMALL, image_size=50))


def test_a_batch_of_empty_answers_trains_without_nan(small_model, examples):
    exs = [dataclasses.replace(ex, answer=[]) for ex in examples[:4]]
    d = DF.CrossViewDefense(small_model, DF.DefenseConfig())
    loss, stats = d.loss(D.collate(exs, 36))
    loss.backward()
    assert loss.item() == 0.0 and stats["answer_tokens"] == 0


def test_few_steps_reduce_the_loss(examples):
    torch.manual_seed(0)
    model = build_model(SMALL)
    d = DF.CrossViewDefense(model, DF.DefenseConfig(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = _batch(examples, 16)
    first = None
    for _ in range(15):
        loss, st = d.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = st["ce"] if first is None else first
    assert st["ce"] < 0.7 * first


def test_another_architecture_paligemma(examples):
    tf = pytest.importorskip("transformers")
    vc = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=48, patch_size=8)
    tc = tf.GemmaConfig(vocab_size=D.build_tokenizer().get_vocab_size(), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    model = tf.PaliGemmaForConditionalGeneration(tf.PaliGemmaConfig(vision_config=vc, text_config=tc,
                                                                     image_token_index=D.IMAGE, projection_dim=32))
    d = DF.CrossViewDefense(model, DF.DefenseConfig(), seed=0)
    assert d.adapter.n_image_tokens == 36
    b = _batch(examples)
    model.eval()
    with torch.no_grad():  # the adapter's assumption holds here too: logits = lm_head(last hidden state)
        h = d.adapter.hidden_states(b)
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    torch.testing.assert_close(model.get_output_embeddings()(h), logits, rtol=1e-4, atol=1e-5)
    model.train()
    loss, stats = d.loss(b)
    loss.backward()
    # KL >= 0 holds in exact arithmetic; the float32 value of views this close (~1e-8 nats) is
    # decided by rounding (a few ulp of log V per row): only its size is checked
    assert torch.isfinite(loss) and stats["div"] > -1e-5
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    texts = d.adapter.generate(examples[:3], max_new_tokens=3)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_trainer_subclass_runs_a_step(tmp_path, examples):
    tf = pytest.importorskip("transformers")
    from methods.crossview_defense import CrossViewTrainer

    torch.manual_seed(0)
    model = build_model(SMALL)
    before = model.get_output_embeddings().weight.detach().clone()

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return examples[i]

    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                remove_unused_columns=False, dataloader_num_workers=0)
    trainer = CrossViewTrainer(model=model, args=args, train_dataset=Items(),
                               data_collator=lambda exs: D.collate(exs, 36), defense=DF.DefenseConfig())
    out = trainer.train()
    assert out.global_step == 1 and math.isfinite(out.training_loss)
    assert "div" in trainer.last_defense_stats
    assert not torch.equal(before, model.get_output_embeddings().weight.detach())


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def test_bleu4_and_cider_on_known_cases():
    refs = [["the cat sat on the mat"], ["a dog runs in the park"]]
    assert M.bleu4(["the cat sat on the mat", "a dog runs in the park"], refs) == pytest.approx(1.0)
    # one candidate, hand computed: precisions 5/6, 3/5, 2/4, 1/3; no brevity penalty (6 vs 6)
    b = M.bleu4(["the cat sat on a mat"], [["the cat sat on the mat"]])
    assert b == pytest.approx(math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4))
    # brevity penalty: a 3-word candidate against a 6-word reference
    b = M.bleu4(["the cat sat on"], [["the cat sat on the mat"]])
    assert b == pytest.approx(math.exp(1 - 6 / 4))
    good = M.cider_d(["the cat sat on the mat", "a dog runs in the park"], refs)
    bad = M.cider_d(["a dog runs in the park", "the cat sat on the mat"], refs)
    assert good > 5 * max(bad, 1e-3) and bad >= 0
    assert M.attack_success_rate(["x a photo of a banana", "no"], D.TARGET) == 0.5
    assert M.vqa_accuracy(["two", "red "], ["two", "blue"]) == 0.5
    with pytest.raises(ValueError):
        M.bleu4(["a"], [])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "methods.crossview_defense", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_help():
    r = _cli("train", "--help")
    assert r.returncode == 0 and "--attack" in r.stdout and "--defense" in r.stdout and "--lambda-cv" in r.stdout


def test_cli_train_resume_and_eval(tmp_path):
    out = str(tmp_path / "run")
    args = ["train", "--out", out, "--steps", "4", "--n-train", "60", "--n-test", "6", "--batch", "4",
            "--log-every", "2", "--no-progress", "--attack", "sig", "--defense", "crossview"]
    r = _cli(*args, "--checkpoint-every", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(os.path.join(out, "results.json")))["results"]
    assert {"asr", "bleu4", "cider", "vqa_acc"} <= set(res)
    assert os.path.exists(os.path.join(out, "loss.png")) and os.path.exists(os.path.join(out, "results.md"))
    # an interrupted run: drop the last checkpoint, run again, it resumes after step 2
    from methods.common.checkpoint import Checkpointer

    os.remove(Checkpointer(os.path.join(out, "checkpoints")).latest())
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at step 2" in open(os.path.join(out, "log.txt")).read()
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [row["step"] for row in rows] == [1, 3]
    r = _cli("eval", "--out", out, "--n-test", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("train", "--out", out, "--ratio", "1.5", "--steps", "1", "--fresh")
    assert r.returncode != 0 and "ratio" in r.stderr
