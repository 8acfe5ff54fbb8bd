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
the full batch's. The totals come from `get_batch_samples`, which the Trainer's loop calls once
per optimizer step on the micro-batches of that step: token_total counts labels[:, 1:] != -100
(the causal shift, as the defense and the Trainer count them), sample_total the samples with at
least one such token. Such a loss is "scaled for gradient accumulation": the Trainer must not
divide it again (`loss_is_scaled_for_ga`; `model_accepts_loss_kwargs` is forced on so that the
Trainer counts `num_items_in_batch` and, on versions without `loss_is_scaled_for_ga`, skips the
division exactly when it passes a count).

Without a count (`num_items_in_batch=None`) and in evaluation the loss is the batch's own mean, as
before (the Trainer then divides it by the number of micro-batches in training).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch

from .defense import CrossViewDefense, DefenseConfig


def answer_counts(labels: torch.Tensor) -> Tuple[int, int]:
    """(answer tokens, samples with at least one answer token) of a (B, L) label tensor, after the
    causal shift: the positions the defense's loss averages over."""
    keep = labels[:, 1:] != -100
    return int(keep.sum()), int(keep.any(1).sum())


@lru_cache(maxsize=None)
def make_trainer_class():
    from transformers import Trainer

    class CrossViewTrainer(Trainer):
        """A `transformers.Trainer` whose `compute_loss` is the defense's loss. Pass
        ``defense=DefenseConfig(...)`` (and ``defense_seed``) to the constructor; batches are dicts
        with input_ids, attention_mask, labels and pixel_values, as `data.collate` makes them.
        Gradient accumulation gives the gradient of the whole accumulated batch (module doc)."""

        def __init__(self, *args, defense: DefenseConfig = DefenseConfig(), defense_seed: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.defense = CrossViewDefense(self.model, defense, defense_seed)
            self.last_defense_stats: Dict[str, float] = {}
            # The Trainer counts `num_items_in_batch` only for models that take loss kwargs; we need the
            # count (and the skipped division that goes with it on versions without loss_is_scaled_for_ga)
            self.model_accepts_loss_kwargs = True
            self._window: Optional[Tuple[object, int, int]] = None  # (num_items_in_batch, tokens, samples)
            self._loss_scaled = False

        # read by Trainer.training_step (transformers >= 5): whether the last compute_loss already
        # normalised over the accumulated batch, so that it must not be divided by the accumulation steps
        @property
        def loss_is_scaled_for_ga(self) -> bool:
            return self._loss_scaled

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
            self._window = None
            if num_items_in_batch is not None:
                counts = [answer_counts(b["labels"]) for b in batch_samples]
                tokens, samples = sum(c[0] for c in counts), sum(c[1] for c in counts)
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    # as the Trainer does for num_items_in_batch (the loss is then scaled by the number of
                    # processes in compute_loss, which DDP's gradient averaging divides out again)
                    t = torch.tensor([tokens, samples], device=device)
                    tokens, samples = (int(v) for v in self.accelerator.gather(t[None]).sum(0))
                self._window = (num_items_in_batch, tokens, samples)
            return batch_samples, num_items_in_batch

        def _totals(self, model, inputs, num_items_in_batch) -> Optional[Tuple[int, int]]:
            """(token_total, sample_total) of the accumulated batch `inputs` belongs to, or None for
            the batch's own means."""
            if num_items_in_batch is None or not model.training or not torch.is_grad_enabled():
                return None
            w = self._window
            if w is not None and (w[0] is num_items_in_batch or (not torch.is_tensor(w[0])
                                                                  and w[0] == num_items_in_batch)):
                return w[1], w[2]
            # not from the latest get_batch_samples: only a batch that is its own accumulated batch is known
            tokens, samples = answer_counts(inputs["labels"])
            if int(num_items_in_batch) != tokens:
                raise ValueError(
                    f"CrossViewTrainer.compute_loss: num_items_in_batch={int(num_items_in_batch)} does not come "
                    f"from the latest get_batch_samples and is not this batch's {tokens} answer tokens; the "
                    "sample count of the accumulated batch is unknown. Get the micro-batches and the count "
                    "from trainer.get_batch_samples, as the Trainer's training loop does")
            return tokens, samples

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.defense.adapter.model = model  # the Trainer may have wrapped it
            totals = self._totals(model, inputs, num_items_in_batch)
            if totals is None:
                loss, stats = self.defense.loss(inputs)
            else:
                tokens, samples = totals
                loss, stats = self.defense.loss(inputs, token_total=max(tokens, 1), sample_total=max(samples, 1))
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    loss = loss * self.accelerator.num_processes  # totals are global; DDP averages gradients
                stats = {**stats, "token_total": tokens, "sample_total": samples}
            self._loss_scaled = totals is not None
            self.last_defense_stats = stats
            return (loss, {"loss": loss}) if return_outputs else loss

    return CrossViewTrainer
