"""Shared rPPG pieces of BYHE, DOHA and SSPD (issue #12, in progress): synthetic face videos
with a known, delayed pulse label (``synth``), the rPPG-Toolbox evaluation pipeline
(``pipeline``), the self-cosine-similarity label (``scs``), the wave losses (``losses``:
negative Pearson, negative max cross-covariance, negative SNR) and the backbones
(``backbones``: the TS-CAN-like model of the official code, PhysNet). BYHE itself (the SCS-map
head and its losses, training, CLI, acceptance) comes next."""
