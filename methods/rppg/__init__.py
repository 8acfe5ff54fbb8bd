"""Shared rPPG pieces of BYHE, DOHA and SSPD (issue #12, in progress): synthetic face videos
with a known, delayed pulse label (``synth``), the rPPG-Toolbox evaluation pipeline
(``pipeline``), the self-cosine-similarity label (``scs``) and the wave losses (``losses``:
negative Pearson, negative max cross-covariance, negative SNR). The backbones and BYHE itself
come next."""
