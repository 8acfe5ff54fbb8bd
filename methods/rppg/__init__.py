"""Shared rPPG pieces of BYHE, DOHA and SSPD (issue #12, in progress): synthetic face videos
with a known, delayed pulse label (``synth``), the rPPG-Toolbox evaluation pipeline
(``pipeline``) and the self-cosine-similarity label (``scs``). The backbones, the losses and BYHE
itself come next."""
