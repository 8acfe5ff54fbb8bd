"""DOHA (Sun et al., ACM MM 2023, arXiv 2404.07855, code SWY666/rPPG-DOHA): domain-generalizable
heart-rate measurement. HPS trains against the label's SCS map (a delay-free label, from BYHE) with
a Toeplitz regularizer; HHO harmonizes per-instance and per-domain gradients with PCGrad projections
and rejects outlier instances."""

from .hho import InstanceRejector, harmonize, per_instance_grads
from .losses import instance_losses, per_instance_neg_pearson, toeplitz_reg

__all__ = [
    "InstanceRejector",
    "harmonize",
    "instance_losses",
    "per_instance_grads",
    "per_instance_neg_pearson",
    "toeplitz_reg",
]
