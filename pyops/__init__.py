"""pyops: C++/CUDA/Triton-accelerated PyTorch ops and the research methods built on them.

Ops (each with a pure-PyTorch twin of the same signature in ``pyops.reference``):

* ``cross_view_kl_entropy``: fused per-row KL both ways, entropies and CE of two views' logits
* ``fused_linear_cross_view``: the same fused with a shared LM head, logits never materialised
* ``fused_linear_cross_view_loss``: a weighted loss of those terms, gradients computed in the forward
* ``knn_patch_search``: exact k nearest patches (global or windowed, multi-scale)
* ``patch_aggregate``: weighted gather of neighbour patches placed back into a map
* ``knn``: exact k nearest neighbours of point sets (the patch search with 1 x 1 patches)
* ``joseph_project`` / ``joseph_backproject``: Joseph PET projection and its exact transpose
  (``pyops.pet``: ``JosephProjector``, ``parallel_beam_2d``, ``ring_scanner``)
* ``harmonize_gradients``: FedGH / PCGrad gradient projections, batched in Gram space
* ``diagonal_stats``: per-lag mean and unbiased std along the diagonals of T x T maps
* ``gr_loss``: the GR loss of single-positive multi-label learning (robust terms, soft
  pseudo-labels, imbalance weight), one fused elementwise pass forward and backward

``pyops.backends()`` tells what was built and which CPU instruction-set path runs;
``pyops.use_backend("triton" | "cuda")`` picks the implementation for CUDA tensors,
``PYOPS_CPU_ISA`` / ``pyops.set_cpu_isa("avx512" | "avx2" | "baseline")`` the CPU kernels' path.
"""

from . import nn, pet, reference
from ._backend import backends, get_backend, get_cpu_isa, set_backend, set_cpu_isa, use_backend
from .cross_view_kl import CrossViewOutput, cross_view_kl_entropy, fused_linear_cross_view, fused_linear_cross_view_loss
from .diagonal_stats import diagonal_stats
from .gr_loss import gr_loss
from .harmonize import HarmonizeStats, harmonize_gradients
from .knn_patch import KNNResult, knn, knn_patch_search, patch_aggregate, patch_grid
from .pet import joseph_backproject, joseph_project

__all__ = [
    "backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "get_cpu_isa",
    "set_cpu_isa",
    "reference",
    "CrossViewOutput",
    "cross_view_kl_entropy",
    "fused_linear_cross_view",
    "fused_linear_cross_view_loss",
    "knn_patch_search",
    "patch_aggregate",
    "patch_grid",
    "knn",
    "KNNResult",
    "pet",
    "joseph_project",
    "joseph_backproject",
    "harmonize_gradients",
    "HarmonizeStats",
    "gr_loss",
    "diagonal_stats",
    "nn",
]
__version__ = "0.1.0"


def __getattr__(name):
    """``pyops.transformers``, the Hugging Face integration (optional extra ``pyops[hf]``), is imported on first use."""
    if name == "transformers":
        import importlib

        return importlib.import_module(".transformers", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
