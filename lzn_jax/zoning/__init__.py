"""The latent zoning solver: pure JAX, no Flax, no I/O (DESIGN.md §4.1).

    latents = zoning.compute_latents(anchors, noise, context=None, solver="dpm_solver++", num_steps=20)
    endpoints, log_probs = zoning.assign(latents, context, solver="euler", num_steps=100, log_weights=None)
    loss = zoning.alignment_loss(log_probs, targets, cut_off=0.2, use_log=False)

Code time convention: anchors at t = 0, the Gaussian at t = 1. The velocity field itself is
``zoning.velocity.velocity(x, t, context)`` (the module keeps its name; it is not re-exported as a function).
"""

from lzn_jax.zoning.align import alignment_loss, class_log_weights, cut_off_step
from lzn_jax.zoning.latents import DEFAULT_EPS, SOLVERS, assign, compute_latents, log_weights_from_weights
from lzn_jax.zoning.sharded import (
    assign_sharded,
    compute_latents_sharded,
    gather_context,
    local_assign,
    local_compute_latents,
)
from lzn_jax.zoning.velocity import DEFAULT_MEMORY_BUDGET_BYTES, posterior_log_probs, time_coefficients

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "SOLVERS",
    "alignment_loss",
    "assign",
    "assign_sharded",
    "class_log_weights",
    "compute_latents",
    "compute_latents_sharded",
    "cut_off_step",
    "gather_context",
    "local_assign",
    "local_compute_latents",
    "log_weights_from_weights",
    "posterior_log_probs",
    "time_coefficients",
]
