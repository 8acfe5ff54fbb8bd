"""CrossViewTrainer under gradient accumulation: 2 micro-batches of 8 give the gradient of one batch
of 16, for the modes "none", "aug" and "crossview" (uniform weights, per-sample cap), and the
Trainer's logged loss is the full batch's loss. The trainer before the fix (compute_loss ignoring
`num_items_in_batch`) gave about twice the gradient, which one test keeps as evidence.

The gradients are taken as the Trainer's training loop takes them (`_inner_training_loop`): the
micro-batches of one optimizer step and `num_items_in_batch` from `get_batch_samples`,
`current_gradient_accumulation_steps` set to their number, then `training_step(model, batch,
num_items_in_batch)` per micro-batch (forward, the Trainer's scaling, backward); the accumulated
`p.grad` is compared, no optimizer step is needed.

The model runs in float64 (the fused cross-view op and the CE keep float64), so the two paths
differ only by summation order (measured: ~1e-16): a relative tolerance of 1e-9 (of the largest
gradient entry), far below the errors of a mis-scaled loss (here: ~1 for the old trainer, 3e-3 for
sample terms normalised by tokens, 2.5e-4 for a sample count that includes the answerless sample).

The augmentation must be the same for an image whichever micro-batch it is in; the defense draws
it from one generator in batch order, so a batch of 16 and two of 8 would draw differently. The
test wraps the real `PatchAugment` (all three ops) to augment image by image with a generator
seeded from a hash of that image's bytes: the augmentation is a deterministic function of the
image, identical in both paths.
"""

import copy
import dataclasses
import hashlib

import pytest
import torch
from conftest import sgd_step_args

tf = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("skimage")

from methods.crossview_defense import data as D  # noqa: E402
from methods.crossview_defense.defense import CrossViewDefense, DefenseConfig  # noqa: E402
from methods.crossview_defense.hf_trainer import answer_counts, make_trainer_class  # noqa: E402
from methods.crossview_defense.model import ModelConfig, build_model  # noqa: E402

SMALL = ModelConfig(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)
N = 16
N_IMG = (SMALL.image_size // SMALL.patch_size) ** 2  # image tokens of a prompt
RTOL = 1e-9
HEAD_SCALE = 20.0  # the LM head is scaled up so the two views' distributions differ measurably at init


def _uniform():
    """Uniform cross-view weights, under either name of the switch."""
    fields = {f.name for f in dataclasses.fields(DefenseConfig)}
    return {"weighting": "uniform"} if "weighting" in fields else {"uncertainty_weights": False}


# gamma > 0 (the augmented view's CE), an entropy band that is on, no stop-gradient, lambda_cv large enough
# that the (small, at init) divergence weighs in the gradient as much as the CE; kappa is set by
# the `configs` fixture between the smallest and the largest per-sample divergence, so the cap bites
# on some samples only
CROSSVIEW = dict(
    mode="crossview",
    cap="sample",
    gamma=0.5,
    lambda_h=0.5,
    lambda_cv=100.0,
    detach="none",
    softmax_temperature=2.0,
    tau_lo=2.0,
    **_uniform(),
)


class PerImageAugment:
    """The defense's augmentation applied image by image, seeded from the image's bytes."""

    def __init__(self, base):
        self.base = base

    def __call__(self, x, generator=None):
        out = []
        for img in x:
            seed = int.from_bytes(hashlib.sha256(img.detach().cpu().numpy().tobytes()).digest()[:8], "little")
            out.append(self.base(img[None], torch.Generator().manual_seed(seed % 2**63)))
        return torch.cat(out)


def _old_trainer_class():
    """The CrossViewTrainer before the fix (its compute_loss ignored num_items_in_batch)."""

    class OldCrossViewTrainer(tf.Trainer):
        def __init__(self, *args, defense=DefenseConfig(), defense_seed=0, **kwargs):
            super().__init__(*args, **kwargs)
            self.defense = CrossViewDefense(self.model, defense, defense_seed)
            self.last_defense_stats = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.defense.adapter.model = model
            loss, stats = self.defense.loss(inputs)
            self.last_defense_stats = stats
            return (loss, {"loss": loss}) if return_outputs else loss

    return OldCrossViewTrainer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors are tiny: one thread is ~30x faster than OpenMP's threads on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(one_thread):
    torch.manual_seed(0)
    model = build_model(SMALL).double()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_SCALE)
    exs = D.make_examples(N, seed=11)
    # a sample without any answer token: in neither count (nor in the cross-view weights)
    exs[2] = dataclasses.replace(exs[2], answer=[])
    # the two halves must differ in answer tokens, or a per-micro-batch mean would be right by chance
    halves = [answer_counts(D.collate(exs[i : i + N // 2], N_IMG)["labels"]) for i in (0, N // 2)]
    assert halves[0][0] != halves[1][0] and halves[0][1] != halves[1][1], halves
    return model, exs


@pytest.fixture(scope="module")
def configs(setup):
    base, exs = setup
    cv = DefenseConfig(**CROSSVIEW, kappa=1e9)
    defense = CrossViewDefense(copy.deepcopy(base), cv)
    defense.augment = PerImageAugment(defense.augment)
    stats = defense.loss(_double(D.collate(exs, defense.adapter.n_image_tokens)))[1]
    # the mean per-sample divergence: some samples lie above it, some below
    return {
        "none": DefenseConfig(mode="none"),
        "aug": DefenseConfig(mode="aug"),
        "crossview": dataclasses.replace(cv, kappa=stats["div"]),
    }


def _double(batch):
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def accumulated(cls, cfg, setup, accumulation, tmp_path):
    """(Logged loss, accumulated gradients) of one optimizer step over the N examples, in
    `accumulation` micro-batches, as the Trainer's training loop computes them."""
    base, exs = setup
    model = copy.deepcopy(base)
    bs = N // accumulation
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=accumulation,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
    )
    trainer = cls(model=model, args=args, defense=cfg)
    trainer.defense.augment = PerImageAugment(trainer.defense.augment)
    n_img = trainer.defense.adapter.n_image_tokens
    micro = [_double(D.collate(exs[i : i + bs], n_img)) for i in range(0, N, bs)]
    batches, num_items = trainer.get_batch_samples(iter(micro), accumulation, trainer.args.device)
    assert len(batches) == accumulation
    trainer.current_gradient_accumulation_steps = len(batches)
    model.zero_grad(set_to_none=True)
    loss = sum(float(trainer.training_step(model, b, num_items)) for b in batches)
    return loss, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a, b):
    assert a.keys() == b.keys()
    scale = max(float(g.abs().max()) for g in b.values())
    return max(float((a[n] - b[n]).abs().max()) for n in b) / scale


@pytest.mark.parametrize("mode", ["none", "aug", "crossview"])
def test_two_micro_batches_give_the_full_batch_gradient(mode, setup, configs, tmp_path):
    cls = make_trainer_class()
    loss1, full = accumulated(cls, configs[mode], setup, 1, tmp_path)
    loss2, acc = accumulated(cls, configs[mode], setup, 2, tmp_path)
    assert len(full) > 10 and all(torch.isfinite(g).all() for g in full.values())
    err = relative_error(acc, full)
    assert err < RTOL, f"{mode}: accumulated gradient differs from the full batch's by {err:.3e} (relative)"
    assert loss2 == pytest.approx(loss1, rel=RTOL, abs=0)  # the logged loss is the full batch's too


def test_crossview_terms_are_active(setup, configs, tmp_path):
    """The crossview case exercises every term: the cap bites on some samples but not all, the band is on."""
    cls = make_trainer_class()
    base, exs = setup
    cfg = configs["crossview"]
    defense = CrossViewDefense(copy.deepcopy(base), cfg)
    defense.augment = PerImageAugment(defense.augment)
    batch = _double(D.collate(exs, defense.adapter.n_image_tokens))
    loss, stats = defense.loss(batch)
    assert stats["band"] > 0
    assert stats["div_capped"] < stats["div"] - 1e-3 * cfg.kappa  # some samples are capped...
    assert stats["div_capped"] < cfg.kappa * (1 - 1e-3)  # ...and not all
    # the trainer's loss of a batch that is its own accumulated batch is the plain loss
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=N,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
    )
    trainer = cls(model=copy.deepcopy(base), args=args, defense=cfg)
    trainer.defense.augment = PerImageAugment(trainer.defense.augment)
    trainer.model.train()
    tokens, samples = answer_counts(batch["labels"])
    assert stats["answer_tokens"] == tokens and samples == N - 1
    assert float(
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(tokens)).detach()
    ) == pytest.approx(float(loss.detach()), rel=1e-12)
    with pytest.raises(ValueError, match="get_batch_samples"):  # a count of some other accumulated batch
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(2 * tokens))


def test_the_old_compute_loss_was_mis_scaled(setup, configs, tmp_path):
    """The trainer before the fix: LLaVA's forward takes **kwargs, so the Trainer passes
    num_items_in_batch and does not divide by the accumulation steps, and the per-micro-batch means
    add up to about twice the gradient (and weigh the micro-batches' tokens unequally)."""
    cls = _old_trainer_class()
    loss1, full = accumulated(cls, configs["none"], setup, 1, tmp_path)
    loss2, acc = accumulated(cls, configs["none"], setup, 2, tmp_path)
    assert relative_error(acc, full) > 0.3
    assert loss2 / loss1 == pytest.approx(2.0, rel=0.25)


@pytest.mark.parametrize("mode", ["none", "crossview"])
def test_one_step_of_trainer_train(mode, setup, configs, tmp_path):
    """The same through `Trainer.train` (its own loop, data loader and shuffling): one SGD step at
    learning rate 1 moves the parameters by minus the accumulated gradient."""
    base, exs = setup

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(exs)

        def __getitem__(self, i):
            return exs[i]

    def step(accumulation):
        model = copy.deepcopy(base)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = sgd_step_args(tmp_path, accumulation, N)
        trainer = make_trainer_class()(
            model=model,
            args=args,
            train_dataset=Items(),
            defense=configs[mode],
            data_collator=lambda b: _double(D.collate(b, N_IMG)),
        )
        trainer.defense.augment = PerImageAugment(trainer.defense.augment)
        out = trainer.train()
        return out.training_loss, {n: before[n] - p.detach() for n, p in model.named_parameters()}

    loss1, full = step(1)
    loss2, acc = step(2)
    assert relative_error(acc, full) < RTOL
    assert loss2 == pytest.approx(loss1, rel=1e-6)  # the Trainer logs it in float32
