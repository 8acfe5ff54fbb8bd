"""Shared rPPG pieces of BYHE, DOHA and SSPD: synthetic face videos with a known, delayed pulse
label and their domains (``synth``), video sets and clip samplers (``data``), the real datasets
UBFC-rPPG and PURE with the toolbox's preprocessing, splits and cache (``datasets``), the rPPG-Toolbox
evaluation pipeline (``pipeline``) and model evaluation (``evaluation``), the self-cosine-similarity
label (``scs``), the wave losses (``losses``: negative Pearson, negative max cross-covariance,
negative SNR) and the backbones (``backbones``: the TS-CAN-like model of the official code, PhysNet).
See README.md."""
