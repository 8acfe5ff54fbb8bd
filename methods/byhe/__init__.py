"""BYHE (Sun et al., arXiv 2207.01697, code SWY666/BYHE): heart rate from face video trained
against the self-cosine-similarity map of the label's phase, which makes training immune to the
label's unknown delay (issue #12, in progress: the head and the losses; training, CLI and the
acceptance experiment come next)."""

from .losses import byhe_loss, mask_loss, rowwise_neg_pearson, spectral_sparsity
from .model import BYHEHead, BYHENet

__all__ = ["BYHEHead", "BYHENet", "byhe_loss", "mask_loss", "rowwise_neg_pearson", "spectral_sparsity"]
