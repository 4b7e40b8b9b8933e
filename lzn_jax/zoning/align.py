"""Latent alignment: soft zone assignment, max over the later reverse steps, and class weights.

docs/method.md, "Alignment loss" and "Reverse flow and soft assignment".
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def cut_off_step(num_steps: int, cut_off: float) -> int:
    """First step kept by the early-step cut-off: ``floor(num_steps * cut_off)`` (20 of 100, 4 of 20)."""
    first = int(math.floor(num_steps * cut_off))
    if not 0 <= first < num_steps:
        raise ValueError(f"cut_off={cut_off} keeps no step out of {num_steps}; it must lie in [0, 1)")
    return first


def target_alignment_loss(target_log_probs: jax.Array, *, cut_off: float = 0.2, use_log: bool = False) -> jax.Array:
    """Alignment loss from each row's target log posterior: ``-mean_b max_{s >= u} P[s, b]`` (or of its log).

    Args:
      target_log_probs: (S, B) from :func:`assign_targets`.
      cut_off: fraction of the first (near-Gaussian) steps ignored: u = floor(S * cut_off).
      use_log: the log variant (paper Eq. 5, case study 2); computed from log-probabilities, so it never becomes
        infinite from an underflowing probability.
    Returns:
      scalar loss. The gradient flows through the arg-max step of each row only (the first one on ties).
    """
    if target_log_probs.ndim != 2:
        raise ValueError(f"target_log_probs must be (steps, batch), got shape {target_log_probs.shape}")
    return _max_over_kept_steps(target_log_probs, cut_off_step(target_log_probs.shape[0], cut_off), use_log)


@functools.partial(jax.jit, static_argnames=("first", "use_log"))
def _max_over_kept_steps(target_log_probs, first: int, use_log: bool):
    kept = target_log_probs[first:]
    best_step = jnp.argmax(kept, axis=0)
    best = jnp.take_along_axis(kept, best_step[None], axis=0)[0]
    return -jnp.mean(best) if use_log else -jnp.mean(jnp.exp(best))


def alignment_loss(log_probs: jax.Array, targets: jax.Array, *, cut_off: float = 0.2,
                   use_log: bool = False) -> jax.Array:
    """Alignment loss ``-mean_b max_{s >= u} P[s, b, k_b]`` (paper Eq. 2; Eq. 5 with ``use_log``).

    Args:
      log_probs: (S, B, N) normalised log posteriors from :func:`assign`; targets: (B,) int target anchors.
      cut_off, use_log: as in :func:`target_alignment_loss`.
    Returns:
      scalar loss.
    """
    if log_probs.ndim != 3 or targets.shape != log_probs.shape[1:2]:
        raise ValueError(f"log_probs (S, B, N) and targets (B,) disagree: {log_probs.shape} vs {targets.shape}")
    return target_alignment_loss(_target_column(log_probs, targets), cut_off=cut_off, use_log=use_log)


@jax.jit
def _target_column(log_probs, targets):
    return jnp.take_along_axis(log_probs, targets[None, :, None], axis=2)[..., 0]


def class_log_weights(labels: jax.Array, num_classes: int, *, axis_name=None) -> jax.Array:
    """Log class frequencies of a batch, the label flow's mixture weights (docs/method.md).

    Args:
      labels: (B,) int labels of the local batch.
      axis_name: inside ``shard_map``, the mesh axis (or axes) to sum counts over, so the weights are those
        of the global batch.
    Returns:
      (num_classes,) ``log(count_k / total)``; ``-inf`` for classes absent from the batch.
    """
    # float64 under x64, so weighted label flows keep float64 precision there.
    counts = jnp.sum(jax.nn.one_hot(labels, num_classes, dtype=jnp.result_type(float)), axis=0)
    if axis_name is not None:
        counts = jax.lax.psum(counts, axis_name)
    return jnp.log(counts) - jnp.log(jnp.sum(counts))
