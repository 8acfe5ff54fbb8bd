"""Shared rPPG pieces of BYHE, DOHA and SSPD (issue #12, in progress): the rPPG-Toolbox
evaluation pipeline (``pipeline``) and the self-cosine-similarity label (``scs``). The synthetic
video generator, the backbones and the losses come next."""
