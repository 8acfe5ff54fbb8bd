"""BEEAR: embedding-space adversarial removal of safety backdoors in instruction-tuned LMs
(Zeng, Sun et al., EMNLP 2024), on a small Llama-style model backdoored locally or on a local
Hugging Face causal LM (``--model``). See README.md."""

from .beear import (
    BEEARConfig,
    decoder_layers,
    decoder_stack,
    hidden_size,
    inner_level,
    lower_activations,
    outer_level,
    perturb_positions,
    perturbation,
    perturbed_ce,
    perturbed_response_ce,
    response_ce,
    upper_stack_only,
)

__all__ = [
    "BEEARConfig",
    "decoder_layers",
    "decoder_stack",
    "hidden_size",
    "inner_level",
    "lower_activations",
    "outer_level",
    "perturb_positions",
    "perturbation",
    "perturbed_ce",
    "perturbed_response_ce",
    "response_ce",
    "upper_stack_only",
]
