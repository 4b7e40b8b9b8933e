"""Latent alignment (SPEC.md §1.9): soft zone assignment, max over the later reverse steps, and class weights."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def cut_off_step(num_steps: int, cut_off: float) -> int:
    """First step kept by the early-step cut-off: ``floor(num_steps * cut_off)`` (20 of 100, 4 of 20)."""
    first = int(math.floor(num_steps * cut_off))
    if not 0 <= first < num_steps:
        raise ValueError(f"cut_off={cut_off} keeps no step out of {num_steps}; it must lie in [0, 1)")
    return first


def alignment_loss(
    log_probs: jax.Array,
    targets: jax.Array | None,
    *,
    cut_off: float = 0.2,
    use_log: bool = False,
) -> jax.Array:
    """Alignment loss: ``-mean_b max_{s >= u} P[s, b, k_b]`` (or of its log with ``use_log``).

    Args:
      log_probs: (S, B, N) normalised log posteriors from :func:`assign`, with targets (B,) int; or the
        (S, B) target column already (``assign(..., targets=...)``), with targets None.
      cut_off: fraction of the first (near-Gaussian) steps ignored.
      use_log: paper Eq. 5 (case study 2); computed from log-probabilities, so it never becomes -inf from an
        underflowing probability.
    Returns:
      scalar loss. The gradient flows through the arg-max step of each sample only (first one on ties).
    """
    if targets is None:
        if log_probs.ndim != 2:
            raise ValueError(f"without targets, log_probs must be the (S, B) target column, got {log_probs.shape}")
        target_log_probs = log_probs
    else:
        if log_probs.ndim != 3 or targets.shape != log_probs.shape[1:2]:
            raise ValueError(f"log_probs (S, B, N) and targets (B,) disagree: {log_probs.shape} vs {targets.shape}")
        target_log_probs = jnp.take_along_axis(log_probs, targets[None, :, None], axis=2)[..., 0]
    kept = target_log_probs[cut_off_step(target_log_probs.shape[0], cut_off):]
    best_step = jnp.argmax(kept, axis=0)
    best = jnp.take_along_axis(kept, best_step[None], axis=0)[0]
    return -jnp.mean(best) if use_log else -jnp.mean(jnp.exp(best))


def class_log_weights(labels: jax.Array, num_classes: int, *, axis_name=None) -> jax.Array:
    """Log class frequencies of a batch, the label-flow mixture weights of SPEC.md §1.5.

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
