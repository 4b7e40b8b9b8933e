"""Training losses composed from the models and the zoning solver: rectified flow, LZN generation (with the label
alignment of case study 3) and LZN contrastive representation learning (docs/method.md, "Training")."""

from lzn_jax.objectives.contrastive import ContrastiveOutputs, contrastive_loss
from lzn_jax.objectives.generation import GenerationOutputs, generation_loss
from lzn_jax.objectives.latents import latents_of, target_log_probs_of
from lzn_jax.objectives.rectified_flow import rectified_flow_loss, rectified_flow_pair

__all__ = [
    "ContrastiveOutputs",
    "GenerationOutputs",
    "contrastive_loss",
    "generation_loss",
    "latents_of",
    "rectified_flow_loss",
    "rectified_flow_pair",
    "target_log_probs_of",
]
