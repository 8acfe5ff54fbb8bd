"""SSPD (Zhang, Sun et al., IEEE TMM 2024, arXiv 2311.05100, code LinXi1C/SSPD): unsupervised
remote heart-rate measurement by self-similarity prior distillation: two physically plausible
views of a clip, a student whose S3M module produces self-similarity maps at three scales, an EMA
teacher, and hierarchical losses on maps, their waves and the predicted rPPG wave."""

from .augment import two_views
from .losses import sspd_losses
from .model import S3M, SSPDNet

__all__ = ["S3M", "SSPDNet", "sspd_losses", "two_views"]
