"""`CrossViewTrainer`: a `transformers.Trainer` whose `compute_loss` is the defense's loss, with
exact gradient accumulation.

The defense's loss of a batch is a mean over its answer tokens (the CE of one or both views, the
entropy band) plus a mean over its samples (the capped cross-view divergence). The Trainer splits
an optimizer step's batch into `gradient_accumulation_steps` micro-batches and adds up their
gradients, so a per-micro-batch mean is wrong twice over: micro-batches with few answer tokens
(or samples) weigh as much as ones with many, and, on transformers >= 4.46, the Trainer does not
divide the loss by the number of micro-batches when it passes `num_items_in_batch` (it then takes
the loss as normalised over the whole accumulated batch, as the models' own losses are) -- which
it does for every model whose forward takes ``**kwargs`` (LLaVA does), so the old
`compute_loss` gave about `gradient_accumulation_steps` times the gradient.

Here every micro-batch's loss is normalised by the totals of its whole accumulated batch,

    token terms:   sum over the micro-batch's answer tokens / token_total
    sample terms:  sum over the micro-batch's samples      / sample_total

(`CrossViewDefense.loss(inputs, token_total=..., sample_total=...)`; see there for the terms that
do not split exactly: weights computed from the batch and cap="batch"), so the accumulated gradient is
the full batch's. The machinery is `pyops.transformers.FusedLMLossMixin`'s, of which
`CrossViewTrainer` is a thin subclass that replaces the loss (`compute_fused_loss`): the totals
come from `get_batch_samples`, which the Trainer's loop calls once per optimizer step on the
micro-batches of that step: token_total counts labels[:, 1:] != -100 (the causal shift, as the
defense and the Trainer count them), sample_total the samples with at least one such token. Such
a loss is "scaled for gradient accumulation": the Trainer must not divide it again
(`loss_is_scaled_for_ga`; `model_accepts_loss_kwargs` is forced on so that the Trainer counts
`num_items_in_batch` and, on versions without `loss_is_scaled_for_ga`, skips the division exactly
when it passes a count).

Without a count (`num_items_in_batch=None`) and in evaluation the loss is the batch's own mean, as
before (the Trainer then divides it by the number of micro-batches in training).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch

from methods.common.optional import requires

from .defense import CrossViewDefense, DefenseConfig


def answer_counts(labels: torch.Tensor) -> Tuple[int, int]:
    """(answer tokens, samples with at least one answer token) of a (B, L) label tensor, after the
    causal shift: the positions the defense's loss averages over (`pyops.transformers.answer_counts`)."""
    from pyops.transformers import answer_counts as counts

    return counts(labels)


@lru_cache(maxsize=None)
def make_trainer_class():
    with requires("hf"):
        from transformers import Trainer

    from pyops.transformers import FusedLMLossMixin

    class CrossViewTrainer(FusedLMLossMixin, Trainer):
        """A `transformers.Trainer` whose `compute_loss` is the defense's loss. Pass
        ``defense=DefenseConfig(...)`` (and ``defense_seed``) to the constructor; batches are dicts
        with input_ids, attention_mask, labels and pixel_values, as `data.collate` makes them (or the
        ``collate`` of a `codec.Codec`: ``data_collator=codec.collate`` for a ``--model`` checkpoint).
        Gradient accumulation gives the gradient of the whole accumulated batch (module doc);
        `last_defense_stats` holds the latest batch's statistics."""

        def __init__(self, *args, defense: DefenseConfig = DefenseConfig(), defense_seed: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.defense = CrossViewDefense(self.model, defense, defense_seed)
            self.last_defense_stats = {}

        def compute_fused_loss(self, model, inputs, totals):
            self.defense.adapter.model = model  # the Trainer may have wrapped it
            if totals is None:
                loss, stats = self.defense.loss(inputs)
            else:
                loss, stats = self.defense.loss(
                    inputs, token_total=max(totals.tokens, 1), sample_total=max(totals.samples, 1)
                )
                stats = {**stats, "token_total": totals.tokens, "sample_total": totals.samples}
            self.last_defense_stats = stats
            return loss, stats

    return CrossViewTrainer
