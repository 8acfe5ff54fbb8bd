"""GR loss for single-positive multi-label learning (Chen et al., IJCAI 2024) and its baselines.

``GRLoss`` (the loss with its per-epoch k-hat / v schedules, on top of the fused op
``pyops.gr_loss``), the baselines (``build_loss``), single-positive data from package-bundled
multi-label data (``data``), the training protocol (``train``) and the CLI
(``python -m methods.grloss``). See README.md.
"""

from .data import DATASETS, single_positive
from .losses import LOSSES, GRLoss, build_loss
from .metrics import mean_average_precision

__all__ = ["LOSSES", "GRLoss", "build_loss", "DATASETS", "single_positive", "mean_average_precision"]
