"""pyops.transformers: the fused LM-head losses on tiny random transformers models (Llama, Qwen2,
Mistral, LLaVA with a CLIP tower; built from configs, nothing downloaded) against the unfused
computation (the model's full logits, then torch's cross_entropy / log_softmax), exact gradient
accumulation through a real `transformers.Trainer`, and the refusals.

Everything runs in float64: the fused op keeps float64 end to end, so fused and unfused differ
only by summation order (measured ~1e-16 relative). RTOL = 1e-9 (relative to the largest value or
gradient entry) is far above that and far below every error a wrong normalisation makes (the
naive trainers below are off by ~1e-2 to ~1).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import sgd_step_args

tf = pytest.importorskip("transformers")

from pyops.transformers import (  # noqa: E402
    LOGIT_TRANSFORMS,
    CrossViewWeights,
    FusedLMLossMixin,
    answer_counts,
    causal_lm_loss,
    check_lm_head,
    cross_view_loss,
    last_hidden_state,
    lm_head,
    unwrap_model,
    verify_lm_head,
)

V, H = 97, 32  # vocabulary, hidden size
IMAGE = V - 1  # LLaVA's image token id
N_IMG = 4  # image tokens of a prompt (16 x 16 image, 8 x 8 patches)
RTOL = 1e-9
HEAD_SCALE = 10.0  # larger logits: distributions far from uniform, views that differ measurably
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors are tiny: one thread is much faster than OpenMP's threads on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def text_config(kind, **kw):
    common = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[kind]
    return cls(**{**common, **kw})


def build(kind, seed=0):
    """A tiny float64 model: "llama", "llama_bias" (an LM head with a bias), "qwen2", "mistral", "llava"."""
    torch.manual_seed(seed)
    if kind == "llava":
        vc = tf.CLIPVisionConfig(
            hidden_size=H, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
        )
        cfg = tf.LlavaConfig(
            vision_config=vc,
            text_config=text_config("llama"),
            image_token_index=IMAGE,
            image_seq_length=N_IMG,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model = tf.LlavaForConditionalGeneration(cfg)
    else:
        base = kind.split("_")[0]
        cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM}[base]
        model = cls(text_config(base))
        if kind == "llama_bias":
            model.lm_head = nn.Linear(H, V, bias=True)
    model = model.double()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_SCALE)
        if model.get_output_embeddings().bias is not None:
            model.get_output_embeddings().bias.normal_()
    return model.train()


def examples(n, seed, image=False, view_b=False):
    """n samples with prompts of 2-5 tokens and answers of 0-6 tokens (sample 1 has none): dicts of
    1-D input_ids / labels (-100 on the prompt), with a second view whose first prompt token differs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 6, (), generator=g))
        a = 0 if i == 1 else int(torch.randint(1, 7, (), generator=g))
        ids = torch.randint(3, V - 1, (p + a,), generator=g)
        if image:
            ids = torch.cat([torch.full((N_IMG,), IMAGE), ids])
        labels = ids.clone()
        labels[: len(ids) - a] = -100
        ex = {"input_ids": ids, "labels": labels}
        if view_b:
            alt = ids.clone()
            alt[N_IMG if image else 0] = (alt[N_IMG if image else 0] + 7) % (V - 4) + 3
            ex["alt_ids"] = alt
        if image:
            ex["pixel_values"] = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
            ex["pixel_values_b"] = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
        out.append(ex)
    return out


def collate(exs, view_b=False):
    """Right-padded batch (pad id 0); with `view_b`, the second view of each sample."""
    L = max(len(e["input_ids"]) for e in exs)

    def pad(key, value):
        return torch.stack([F.pad(e[key], (0, L - len(e[key])), value=value) for e in exs])

    mask = torch.stack(
        [F.pad(torch.ones(len(e["input_ids"]), dtype=torch.long), (0, L - len(e["input_ids"]))) for e in exs]
    )
    b = {"input_ids": pad("input_ids", 0), "attention_mask": mask, "labels": pad("labels", -100)}
    if "pixel_values" in exs[0]:
        b["pixel_values"] = torch.stack([e["pixel_values"] for e in exs])
    if view_b:
        b["view_b"] = (
            {"pixel_values": torch.stack([e["pixel_values_b"] for e in exs])}
            if "pixel_values" in exs[0]
            else {"input_ids": pad("alt_ids", 0)}
        )
    return b


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "view_b")}


def params(model):
    return [p for p in model.parameters() if p.requires_grad]


def grads(loss, model, retain_graph=False):
    return torch.autograd.grad(
        loss, params(model), allow_unused=True, materialize_grads=True, retain_graph=retain_graph
    )


def assert_close_rel(got, want, rtol=RTOL, what=""):
    """max |got - want| <= rtol * max |want| over a tensor or a sequence of tensors."""
    got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
    scale = max(float(w.abs().max()) for w in want if w.numel())
    err = max(float((g - w).abs().max()) for g, w in zip(got, want) if w.numel())
    assert scale > 0 and err <= rtol * scale, f"{what}: error {err:.3e} vs scale {scale:.3e}"


def unfused_rows(logits, labels):
    """Per-position CE (B, L - 1) of full logits, 0 where ignored."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")


KINDS = ["llama", "llama_bias", "qwen2", "mistral", "llava"]


@pytest.fixture(scope="module")
def models():
    return {k: build(k) for k in KINDS}


def batch_for(kind, n=6, seed=3, view_b=False):
    return collate(examples(n, seed, image=kind == "llava", view_b=view_b), view_b=view_b)


# --------------------------------------------------------------------------------------------
# Hidden states and head
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_hidden_states_and_head_give_the_models_logits(kind, models):
    model = models[kind]
    batch = batch_for(kind)
    assert verify_lm_head(model, model_inputs(batch)) < 1e-12
    if kind != "llava":
        assert verify_lm_head(model) < 1e-12  # its own random tokens
    with torch.no_grad():
        h = last_hidden_state(model, **batch)  # labels are dropped, not passed to the model
        ref = model(**model_inputs(batch), output_hidden_states=True).hidden_states[-1]
    assert h.shape == (*batch["input_ids"].shape, H)
    torch.testing.assert_close(h, ref, rtol=0, atol=0)
    w, b = lm_head(model)
    assert w is model.get_output_embeddings().weight and (b is None) == (kind != "llama_bias")


def test_wrapped_models_are_unwrapped(models):
    model = models["llama"]
    dp = nn.DataParallel(model)  # on a CPU-only machine its forward calls the module
    assert unwrap_model(dp) is model
    batch = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(last_hidden_state(dp, **batch), last_hidden_state(model, **batch), rtol=0, atol=0)
    check_lm_head(dp)


# --------------------------------------------------------------------------------------------
# Causal LM loss
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_causal_lm_loss_matches_the_unfused_loss(kind, models):
    model = models[kind]
    batch = batch_for(kind)
    labels = batch["labels"]
    keep = labels[:, 1:] != -100
    n_tok = int(keep.sum())
    assert n_tok > 0 and not bool(keep[1].any())  # sample 1 has no answer token
    w, b = lm_head(model)
    ref_rows = unfused_rows(model(**model_inputs(batch)).logits, labels)
    refs = {
        "mean": ref_rows.sum() / n_tok,
        "sum": ref_rows.sum(),
        "none": ref_rows,
        "per_sample": ref_rows.sum(1) / keep.sum(1).clamp(min=1),
        "items": ref_rows.sum() / 50,
    }
    for red, ref in refs.items():
        h = last_hidden_state(model, **batch)
        kw = {"num_items_in_batch": torch.tensor(50)} if red == "items" else {"reduction": red}
        got = causal_lm_loss(h, labels, w, b, **kw)
        assert got.dtype == torch.float64 and got.shape == ref.shape
        assert_close_rel(got.detach(), ref.detach(), what=f"{kind} {red} value")
        weights = torch.randn(ref.shape, dtype=torch.float64)  # a generic cotangent for the unreduced ones
        assert_close_rel(
            grads((got * weights).sum(), model),
            grads((ref * weights).sum(), model, retain_graph=True),
            what=f"{kind} {red} gradients",
        )
    # transformers' own loss (computed from float32 logits)
    own = model(**model_inputs(batch), labels=labels).loss
    assert float(refs["mean"].detach()) == pytest.approx(float(own.detach()), rel=1e-6)


def test_shift_labels_and_ignore_index(models):
    model = models["llama"]
    batch = batch_for("llama")
    w, b = lm_head(model)
    with torch.no_grad():
        h = last_hidden_state(model, **batch)
        shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # shift_labels: aligned with the positions
        a = causal_lm_loss(h, batch["labels"], w, b, reduction="sum")
        assert float(causal_lm_loss(h, shifted, w, b, reduction="sum", shift=False)) == pytest.approx(
            float(a), rel=1e-14
        )
        other = batch["labels"].masked_fill(batch["labels"] == -100, -1)
        assert float(causal_lm_loss(h, other, w, b, reduction="sum", ignore_index=-1)) == pytest.approx(
            float(a), rel=1e-14
        )
    assert answer_counts(batch["labels"]) == (int((batch["labels"][:, 1:] != -100).sum()), 5)


def test_batch_without_answer_tokens_gives_a_zero_that_backpropagates(models):
    model = models["llama"]
    batch = batch_for("llama")
    batch["labels"] = torch.full_like(batch["labels"], -100)
    w, b = lm_head(model)
    for red in ("mean", "sum", "per_sample", "none"):
        loss = causal_lm_loss(last_hidden_state(model, **batch), batch["labels"], w, b, reduction=red)
        assert loss.requires_grad and not bool(loss.any())
        assert all(not bool(g.any()) for g in grads(loss.sum(), model))
    out = cross_view_loss(*(last_hidden_state(model, **batch),) * 2, batch["labels"], w, b)
    assert float(out.loss.detach()) == 0 and out.tokens == 0 and out.loss.requires_grad


# --------------------------------------------------------------------------------------------
# Two views
# --------------------------------------------------------------------------------------------
def unfused_cross_view(model, inputs_a, inputs_b, labels, cw, token_total=None, sample_total=None):
    """The loss of `cross_view_loss` from the model's full logits, in plain PyTorch. A detached
    view's logits in the KL and entropy terms are the head applied to its detached last hidden
    states (the stop-gradient is on the hidden states: the shared head still gets both views')."""
    out_a = model(**inputs_a, output_hidden_states=True)
    out_b = model(**inputs_b, output_hidden_states=True)
    w, b = model.get_output_embeddings().weight, model.get_output_embeddings().bias
    keep = labels[:, 1:] != -100
    za, zb, y = out_a.logits[:, :-1][keep], out_b.logits[:, :-1][keep], labels[:, 1:][keep]
    sample = torch.arange(labels.shape[0])[:, None].expand_as(keep)[keep]
    T = cw.temperature
    ka = F.linear(out_a.hidden_states[-1][:, :-1][keep].detach(), w, b) if cw.detach == "a" else za
    kb = F.linear(out_b.hidden_states[-1][:, :-1][keep].detach(), w, b) if cw.detach == "b" else zb
    lp, lq = (ka / T).log_softmax(-1), (kb / T).log_softmax(-1)
    rows = {
        "kl_ab": (lp.exp() * (lp - lq)).sum(-1),
        "kl_ba": (lq.exp() * (lq - lp)).sum(-1),
        "entropy_a": -(lp.exp() * lp).sum(-1),
        "entropy_b": -(lq.exp() * lq).sum(-1),
        "ce_a": F.cross_entropy(za, y, reduction="none"),
        "ce_b": F.cross_entropy(zb, y, reduction="none"),
    }
    count = torch.zeros(labels.shape[0], dtype=za.dtype).index_add(0, sample, torch.ones_like(y, dtype=za.dtype))
    has = count > 0
    loss = 0.0
    for name, v in rows.items():
        if name in cw.per_sample:
            means = torch.zeros_like(count).index_add(0, sample, v)[has] / count[has]
            term = means.sum() / (int(has.sum()) if sample_total is None else sample_total)
        else:
            term = v.sum() / (len(y) if token_total is None else token_total)
        loss = loss + getattr(cw, name) * term
    return loss


CROSS = CrossViewWeights(
    ce_a=1.0,
    ce_b=0.5,
    kl_ab=3.0,
    kl_ba=-2.0,
    entropy_a=0.7,
    entropy_b=-0.4,
    temperature=2.0,
    per_sample=("kl_ab", "entropy_b", "ce_b"),
)


@pytest.mark.parametrize("kind,detach", [("llava", None), ("llava", "b"), ("llama", None), ("qwen2", "a")])
def test_cross_view_loss_matches_the_unfused_loss(kind, detach, models):
    model = models[kind]
    cw = CrossViewWeights(**{**CROSS.__dict__, "detach": detach})
    batch = batch_for(kind, view_b=True)
    b_inputs = {**model_inputs(batch), **batch["view_b"]}
    w, b = lm_head(model)
    h_a, h_b = last_hidden_state(model, **batch), last_hidden_state(model, **b_inputs)
    out = cross_view_loss(h_a, h_b, batch["labels"], w, b, cw)
    ref = unfused_cross_view(model, model_inputs(batch), b_inputs, batch["labels"], cw)
    assert_close_rel(out.loss.detach(), ref.detach(), what="value")
    assert set(out.terms) == {"ce_a", "ce_b", "kl_ab", "kl_ba", "entropy_a", "entropy_b"}
    assert float(out.terms["kl_ab"].detach()) > 1e-3  # the views really differ
    assert out.tokens == int((batch["labels"][:, 1:] != -100).sum()) and out.samples == 5
    assert_close_rel(grads(out.loss, model), grads(ref, model), what="gradients")


def test_cross_view_micro_batches_add_up_to_the_full_batch(models):
    """token_total / sample_total: the losses (and so the gradients) of two halves add up to the whole."""
    model = models["llava"]
    exs = examples(8, 5, image=True, view_b=True)
    w, b = lm_head(model)

    def loss(part, **totals):
        batch = collate(part, view_b=True)
        h_a = last_hidden_state(model, **batch)
        h_b = last_hidden_state(model, **{**model_inputs(batch), **batch["view_b"]})
        return cross_view_loss(h_a, h_b, batch["labels"], w, b, CROSS, **totals).loss

    tokens, samples = answer_counts(collate(exs)["labels"])
    full = loss(exs)
    halves = loss(exs[:4], token_total=tokens, sample_total=samples) + loss(
        exs[4:], token_total=tokens, sample_total=samples
    )
    assert_close_rel(halves.detach(), full.detach(), what="value")
    assert_close_rel(grads(halves, model), grads(full, model), what="gradients")
    plain = float((loss(exs[:4]) + loss(exs[4:])).detach()) / 2  # the mean of the halves' own means is not it
    assert abs(plain - float(full.detach())) > 1e-3 * abs(float(full.detach()))


# --------------------------------------------------------------------------------------------
# Trainer: gradient accumulation
# --------------------------------------------------------------------------------------------
N = 16


class Items(torch.utils.data.Dataset):
    def __init__(self, exs):
        self.exs = exs

    def __len__(self):
        return len(self.exs)

    def __getitem__(self, i):
        return self.exs[i]


class FusedTrainer(FusedLMLossMixin, tf.Trainer):
    pass


class NaiveTrainer(tf.Trainer):
    """The per-micro-batch mean. Llama's forward takes **kwargs, so the Trainer passes
    num_items_in_batch and takes the loss as already scaled: about `accumulation` x the gradient."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        w, b = lm_head(model)
        loss = causal_lm_loss(last_hidden_state(model, **inputs), inputs["labels"], w, b)
        return (loss, {"loss": loss}) if return_outputs else loss


class NaiveDividedTrainer(NaiveTrainer):
    """The per-micro-batch mean divided by the number of micro-batches: wrong with uneven answers."""

    loss_is_scaled_for_ga = False


def train_args(tmp_path, accumulation, **kw):
    return sgd_step_args(tmp_path, accumulation, N, **kw)


def one_step(cls, base, exs, accumulation, tmp_path, view_b=False, **kw):
    """(logged training loss, parameter update) of one SGD step at learning rate 1 over the N
    examples in `accumulation` micro-batches: the update is minus the accumulated gradient."""
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = cls(
        model=model,
        args=train_args(tmp_path, accumulation),
        train_dataset=Items(exs),
        data_collator=lambda b: collate(b, view_b=view_b),
        **kw,
    )
    out = trainer.train()
    return out.training_loss, [before[n] - p.detach() for n, p in model.named_parameters()]


@pytest.fixture(scope="module")
def train_data():
    exs = examples(N, 11, view_b=True)
    # the halves differ in answer tokens and in samples with one, or a per-micro-batch mean would be right by chance
    halves = [answer_counts(collate(exs[i : i + N // 2])["labels"]) for i in (0, N // 2)]
    assert halves[0][0] != halves[1][0] and halves[0][1] != halves[1][1]
    return exs


@pytest.mark.parametrize("cross_view", [False, True])
def test_accumulation_2x8_equals_1x16_through_trainer_train(cross_view, models, train_data, tmp_path):
    base = models["llama"]
    kw = {"view_b": True, "cross_view": CROSS} if cross_view else {}
    loss1, full = one_step(FusedTrainer, base, train_data, 1, tmp_path, **kw)
    loss2, acc = one_step(FusedTrainer, base, train_data, 2, tmp_path, **kw)
    assert sum(float(u.abs().sum()) for u in full) > 0
    assert_close_rel(acc, full, what="parameter update")
    assert loss2 == pytest.approx(loss1, rel=1e-6)  # the Trainer logs it in float32
    # the full batch's update is minus the gradient of the unfused loss
    model = copy.deepcopy(base)
    batch = collate(train_data, view_b=cross_view)
    if cross_view:
        ref = unfused_cross_view(
            model, model_inputs(batch), {**model_inputs(batch), **batch["view_b"]}, batch["labels"], CROSS
        )
    else:
        ref = (
            unfused_rows(model(**model_inputs(batch)).logits, batch["labels"]).sum() / answer_counts(batch["labels"])[0]
        )
    assert_close_rel(full, grads(ref, model), what="update vs unfused gradient")


def test_naive_compute_loss_fails_the_accumulation_check(models, train_data, tmp_path):
    """The check above can fail: the per-micro-batch mean, as the Trainer scales it (about twice the
    gradient), and divided by the number of micro-batches (uneven answers weigh wrongly)."""
    base = models["llama"]
    _, full = one_step(NaiveTrainer, base, train_data, 1, tmp_path)
    _, acc = one_step(NaiveTrainer, base, train_data, 2, tmp_path)
    scale = max(float(u.abs().max()) for u in full)
    assert max(float((a - f).abs().max()) for a, f in zip(acc, full)) > 0.3 * scale
    _, acc_div = one_step(NaiveDividedTrainer, base, train_data, 2, tmp_path)
    err = max(float((a - f).abs().max()) for a, f in zip(acc_div, full)) / scale
    assert err > 1e-4, err  # > 1e5 x RTOL


def test_compute_loss_outside_the_training_loop(models, train_data, tmp_path):
    base = models["llama"]
    trainer = FusedTrainer(
        model=copy.deepcopy(base),
        args=train_args(tmp_path, 1, per_device_eval_batch_size=N),
        eval_dataset=Items(train_data),
        data_collator=collate,
    )
    batch = collate(train_data)
    tokens = answer_counts(batch["labels"])[0]
    model = trainer.model.train()
    w, b = lm_head(model)
    with torch.no_grad():
        mean = causal_lm_loss(last_hidden_state(model, **batch), batch["labels"], w, b)
    # a batch that is its own accumulated batch
    got = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(tokens))
    assert float(got.detach()) == pytest.approx(float(mean), rel=1e-12) and trainer.loss_is_scaled_for_ga
    assert trainer.last_loss_stats["token_total"] == tokens
    with pytest.raises(ValueError, match="get_batch_samples"):  # a count of some other accumulated batch
        trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(2 * tokens))
    got = trainer.compute_loss(model, batch)  # no count: the batch's mean, for the Trainer to divide
    assert float(got.detach()) == pytest.approx(float(mean), rel=1e-12) and not trainer.loss_is_scaled_for_ga
    metrics = trainer.evaluate()  # one batch of 16: the eval loss is its mean CE
    assert metrics["eval_loss"] == pytest.approx(float(mean), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------
def gemma2(softcap):
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=softcap,
    )
    return tf.Gemma2ForCausalLM(cfg).double()


def test_soft_capped_gemma2_is_refused(tmp_path, train_data):
    model = gemma2(30.0)
    for call in (
        lambda: check_lm_head(model),
        lambda: lm_head(model),
        lambda: FusedTrainer(model=model, args=train_args(tmp_path, 1)),
    ):
        with pytest.raises(ValueError, match=r"config\.final_logit_softcapping = 30\.0 \(logits = c \* tanh"):
            call()
    # the numerical check sees it too (logits of size ~1: the cap changes them by ~1e-4 relative)
    with pytest.raises(ValueError, match="differ from lm_head"):
        verify_lm_head(model)
    plain = gemma2(None)  # without the cap the fused loss is the model's
    check_lm_head(plain)
    assert verify_lm_head(plain) < 1e-12


def test_cohere_and_granite_logit_scales_are_refused():
    torch.manual_seed(0)
    small = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    cohere = tf.CohereForCausalLM(tf.CohereConfig(**small)).double()  # logit_scale = 0.0625 by default
    with pytest.raises(ValueError, match=r"config\.logit_scale = 0\.0625"):
        check_lm_head(cohere)
    with pytest.raises(ValueError, match="differ from lm_head"):
        verify_lm_head(cohere)
    granite = tf.GraniteForCausalLM(tf.GraniteConfig(**small, logits_scaling=4.0)).double()
    with pytest.raises(ValueError, match=r"config\.logits_scaling = 4\.0"):
        check_lm_head(granite)
    granite.config.logits_scaling = 1.0  # neutral
    check_lm_head(granite)
    assert verify_lm_head(granite) < 1e-12


@pytest.mark.parametrize("t", LOGIT_TRANSFORMS, ids=lambda t: t.field)
def test_every_logit_transform_field_is_refused(t, models):
    model = copy.deepcopy(models["llava"])  # the field on the text config of a VLM
    check_lm_head(model)
    setattr(model.config.text_config, t.field, 3)
    with pytest.raises(ValueError, match=rf"config\.text_config\.{t.field} = 3 "):
        check_lm_head(model)
    setattr(model.config.text_config, t.field, t.neutral[-1])
    check_lm_head(model)


def test_heads_and_models_that_are_not_a_plain_linear_head_are_refused(models):
    class ScaledHead(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = copy.deepcopy(models["llama"])
    model.lm_head = ScaledHead(H, V, bias=False)
    with pytest.raises(ValueError, match="ScaledHead, not a plain torch.nn.Linear"):
        check_lm_head(model)
    model.lm_head = nn.Sequential(nn.Linear(H, V))
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        lm_head(model)
    with pytest.raises(ValueError, match="has no LM head"):
        check_lm_head(models["llama"].model)  # the base model
    model = copy.deepcopy(models["llama"])
    model.config.model_type = "chameleon"
    with pytest.raises(ValueError, match="image tokens"):
        check_lm_head(model)
    bart = tf.BartForConditionalGeneration(
        tf.BartConfig(
            vocab_size=V,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
        )
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        check_lm_head(bart)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(models, tmp_path):
    model = models["llama"]
    batch = batch_for("llama")
    w, b = lm_head(model)
    with torch.no_grad():
        h = last_hidden_state(model, **batch)
    y = batch["labels"]
    cases = [
        (lambda: causal_lm_loss(h, y[:, 1:], w, b), ValueError, r"labels must have the shape \(B, L\) = \(6, "),
        (lambda: causal_lm_loss(h, y.double(), w, b), TypeError, "labels must be integer token ids"),
        (lambda: causal_lm_loss(h[0], y, w, b), ValueError, r"hidden must be floating hidden states \(B, L, H\)"),
        (lambda: causal_lm_loss(h, y, w[:, :-1], b), ValueError, r"weight must be the LM head's \(V, H\)"),
        (lambda: causal_lm_loss(h, y, w, torch.zeros(3, dtype=h.dtype)), ValueError, r"bias must be None or \(97,\)"),
        (lambda: causal_lm_loss(h, y, w, b, reduction="avg"), ValueError, "reduction must be one of"),
        (
            lambda: causal_lm_loss(h, y, w, b, reduction="sum", num_items_in_batch=3),
            ValueError,
            "num_items_in_batch normalises the 'mean' reduction",
        ),
        (lambda: causal_lm_loss(h, y, w, b, num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0"),
        (
            lambda: causal_lm_loss(h, y.masked_fill(y == y[0, -1], V + 3), w, b),
            ValueError,
            rf"labels\[0, \d+\] = {V + 3} is neither a token id in \[0, {V}\) nor ignore_index",
        ),
        (lambda: cross_view_loss(h, h[:, 1:], y, w, b), ValueError, "hidden_b must match hidden_a"),
        (lambda: cross_view_loss(h, h, y, w, b, {"kl_ab": 1.0}), TypeError, "weights must be a CrossViewWeights"),
        (
            lambda: cross_view_loss(h, h, y, w, b, CrossViewWeights(kl_ab=float("nan"))),
            ValueError,
            "kl_ab must be a finite number",
        ),
        (lambda: CrossViewWeights(temperature=0.0).validate(), ValueError, "temperature must be a finite number > 0"),
        (lambda: CrossViewWeights(detach="c").validate(), ValueError, "detach must be None, 'a' or 'b'"),
        (lambda: CrossViewWeights(per_sample=("kl",)).validate(), ValueError, "per_sample must be a tuple of term"),
        (lambda: cross_view_loss(h, h, y, w, b, sample_total=-1), ValueError, "sample_total must be > 0"),
        (lambda: answer_counts(y[0]), ValueError, r"labels must be a \(B, L\) tensor"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
    trainer = FusedTrainer(model=copy.deepcopy(model), args=train_args(tmp_path, 1))
    with pytest.raises(ValueError, match="the batch has no 'labels'"):
        trainer.compute_loss(trainer.model, model_inputs(batch))
    with pytest.raises(ValueError, match="no cross_view=CrossViewWeights"):
        trainer.compute_loss(trainer.model, {**batch, "view_b": {"input_ids": batch["input_ids"]}})
    with pytest.raises(TypeError, match="cross_view must be None or a CrossViewWeights"):
        FusedTrainer(model=trainer.model, args=train_args(tmp_path, 1), cross_view={"kl_ab": 1.0})
    trainer = FusedTrainer(model=trainer.model, args=train_args(tmp_path, 1), cross_view=CROSS)
    with pytest.raises(ValueError, match=r"inputs\['view_b'\] must be a non-empty dict"):
        trainer.compute_loss(trainer.model, {**batch, "view_b": batch["input_ids"]})
    with pytest.raises(ValueError, match="the views' hidden states differ in shape"):
        trainer.compute_loss(
            trainer.model,
            {
                **batch,
                "view_b": {"input_ids": batch["input_ids"][:, :-1], "attention_mask": batch["attention_mask"][:, :-1]},
            },
        )


# --------------------------------------------------------------------------------------------
# Optional import
# --------------------------------------------------------------------------------------------
def test_import_is_lazy_and_a_missing_transformers_says_how_to_install():
    code = (
        "import sys\n"
        "import pyops\n"
        "assert 'pyops.transformers' not in sys.modules and 'transformers' not in sys.modules\n"
        "assert callable(pyops.transformers.causal_lm_loss) and 'transformers' in sys.modules\n"
        "for m in [m for m in sys.modules if m.split('.')[0] == 'transformers' or m == 'pyops.transformers']:\n"
        "    del sys.modules[m]\n"
        "del pyops.transformers\n"
        "sys.modules['transformers'] = None  # not installed\n"
        "try:\n"
        "    pyops.transformers\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'pyops[hf]'\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
