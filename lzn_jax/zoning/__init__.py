"""The latent zoning solver: pure JAX, no Flax, no I/O.

    latents = zoning.compute_latents(anchors, noise)                        # (B, D) -> (B, D), DPM-Solver++ 20 steps
    endpoints, log_probs = zoning.assign(latents, context)                  # reverse Euler, 100 steps, (S, B, N)
    loss = zoning.alignment_loss(log_probs, targets, cut_off=0.2, use_log=False)

Code time: anchors at t = 0, the Gaussian at t = 1. Options are one frozen value, ``zoning.SolverOptions``.
docs/method.md states the equations; docs/design.md, "The zoning solver API", the contract.
"""

from lzn_jax.zoning._evaluator import RematPlan, remat_plan
from lzn_jax.zoning.align import alignment_loss, class_log_weights, target_alignment_loss
from lzn_jax.zoning.flows import (
    Assignment,
    TargetAssignment,
    assign,
    assign_targets,
    compute_latents,
    log_weights_from_weights,
)
from lzn_jax.zoning.options import SolverOptions
from lzn_jax.zoning.sharded import (
    LocalLatents,
    assign_sharded,
    assign_targets_sharded,
    compute_latents_sharded,
    local_assign,
    local_assign_targets,
    local_compute_latents,
)
from lzn_jax.zoning.velocity import latent_velocity, posterior_log_probs

__all__ = [
    "Assignment",
    "LocalLatents",
    "RematPlan",
    "SolverOptions",
    "TargetAssignment",
    "alignment_loss",
    "assign",
    "assign_sharded",
    "assign_targets",
    "assign_targets_sharded",
    "class_log_weights",
    "compute_latents",
    "compute_latents_sharded",
    "latent_velocity",
    "local_assign",
    "local_assign_targets",
    "local_compute_latents",
    "log_weights_from_weights",
    "posterior_log_probs",
    "remat_plan",
    "target_alignment_loss",
]
