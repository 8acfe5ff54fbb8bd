"""STPDnet dynamic PET reconstruction: simulation (simulate.py, kinetics.py), MLEM (recon.py),
KEM-ST (kem.py), LPD / STPDnet / DeepPET (models.py), training (train.py), evaluation
(evaluate.py), CLI (__main__.py) and the acceptance script. See README.md."""

from .kinetics import DEFAULT_FRAMES_S, REGIONS, Kinetics, feng_input, frame_edges, region_tacs, tissue_curve
from .recon import forward_model, mlem, poisson_loglik
from .simulate import COUNT_PRESETS, LABELS, Scanner, Study, brain_phantom, shepp_logan_labels, simulate_study

__all__ = [
    "COUNT_PRESETS",
    "DEFAULT_FRAMES_S",
    "Kinetics",
    "LABELS",
    "REGIONS",
    "Scanner",
    "Study",
    "brain_phantom",
    "feng_input",
    "forward_model",
    "frame_edges",
    "mlem",
    "poisson_loglik",
    "region_tacs",
    "shepp_logan_labels",
    "simulate_study",
    "tissue_curve",
]
