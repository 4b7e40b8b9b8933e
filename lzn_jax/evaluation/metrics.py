"""The numbers behind FID, sFID, Inception Score and improved precision/recall, computed from features
(docs/evaluation.md, "Metrics"). Fréchet distances and scores in float64 NumPy/SciPy; k-NN distances in float32 JAX.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from scipy.special import log_softmax

# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D): numpy's `cov(rowvar=False)`."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need features (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) between two Gaussians, in float64.

    The matrix square root is SciPy's `sqrtm` of the product, as in the TTUR/pytorch-fid/clean-fid formula that the
    published numbers use: when it is not finite, `eps` is added to both diagonals and it is retried; an imaginary
    part (round-off of a nearly singular product) is dropped when its diagonal is below 1e-3, else it is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"Fréchet distance needs matching statistics, got means {mu1.shape} / {mu2.shape} and covariances "
            f"{sigma1.shape} / {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular covariance product, adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(
                f"Fréchet distance: the square root has an imaginary part of {np.abs(covmean.imag).max():.3g}; the "
                "covariances are not positive semi-definite (too few samples or non-finite features?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------


def inception_score(logits: np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal consecutive parts of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits).

    logits (N, K). Each part uses its own marginal p(y), as in the original Inception Score code; parts are
    rows [i N / splits, (i + 1) N / splits). Computed in float64 with log-softmax (no log of a rounded zero).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"Inception Score needs logits (N >= splits = {splits}, K), got shape {logits.shape}")
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        log_p = log_softmax(logits[i * n // splits : (i + 1) * n // splits], axis=1)
        log_marginal = np.log(np.mean(np.exp(log_p), axis=0))
        kl = np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019)
# ----------------------------------------------------------------------------------------------------------------


def _squared_distances(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """(R, D), (C, D) -> (R, C) squared Euclidean distances, |u|^2 - 2 u.v + |v|^2 clamped at 0, float32."""
    dots = jnp.dot(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
    squared = jnp.sum(rows * rows, axis=1)[:, None] - 2.0 * dots + jnp.sum(cols * cols, axis=1)[None, :]
    return jnp.maximum(squared, 0.0)


@functools.partial(jax.jit, static_argnames=("count",))
def _merge_smallest(best: jax.Array, rows: jax.Array, cols: jax.Array, col_valid: jax.Array, count: int):
    """The `count` smallest distances of each row over `best` (R, count) and this column block, ascending."""
    distances = jnp.where(col_valid[None, :], _squared_distances(rows, cols), jnp.inf)
    merged = jnp.concatenate([best, distances], axis=1)
    return -jax.lax.top_k(-merged, count)[0]


@jax.jit
def _covered(status: jax.Array, rows: jax.Array, cols: jax.Array, col_radii: jax.Array, col_valid: jax.Array):
    """status (R,) |= any column j (valid) with |row - col_j|^2 <= col_radii[j]."""
    inside = (_squared_distances(rows, cols) <= col_radii[None, :]) & col_valid[None, :]
    return status | jnp.any(inside, axis=1)


def _blocks(features: np.ndarray, block_size: int):
    """Yields (start, block (block_size, D) float32 zero-padded, valid (block_size,) bool) over the rows."""
    for start in range(0, features.shape[0], block_size):
        block = features[start : start + block_size]
        valid = np.zeros(block_size, bool)
        valid[: block.shape[0]] = True
        padded = np.zeros((block_size, features.shape[1]), np.float32)
        padded[: block.shape[0]] = block
        yield start, padded, valid


def manifold_radii(features: np.ndarray, *, k: int = 3, block_size: int = 10_000) -> np.ndarray:
    """(N,) float32 squared distance from each row of features (N, D) to its k-th nearest other row.

    The row itself is among the candidates at distance 0, so the k-th neighbour is the (k + 1)-th smallest distance,
    as in the reference implementation (a duplicate row counts as a neighbour at distance 0).
    """
    features = np.asarray(features, np.float32)
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} feature vectors, got {n}")
    block_size = min(block_size, n)
    radii = np.empty(n, np.float32)
    for start, rows, row_valid in _blocks(features, block_size):
        best = jnp.full((block_size, k + 1), jnp.inf, jnp.float32)
        for _, cols, col_valid in _blocks(features, block_size):
            best = _merge_smallest(best, rows, cols, col_valid, k + 1)
        radii[start : start + row_valid.sum()] = np.asarray(best[:, k])[row_valid]
    return radii


def coverage(queries: np.ndarray, features: np.ndarray, radii: np.ndarray, *, block_size: int = 10_000) -> np.ndarray:
    """(Q,) bool: whether each query row lies inside some ball (features[j], squared radius radii[j])."""
    queries, features = np.asarray(queries, np.float32), np.asarray(features, np.float32)
    radii = np.asarray(radii, np.float32)
    block_size = min(block_size, max(queries.shape[0], features.shape[0]))
    out = np.empty(queries.shape[0], bool)
    for start, rows, row_valid in _blocks(queries, block_size):
        status = jnp.zeros(block_size, bool)
        for col_start, cols, col_valid in _blocks(features, block_size):
            col_radii = np.zeros(block_size, np.float32)
            col_radii[: col_valid.sum()] = radii[col_start : col_start + col_valid.sum()]
            status = _covered(status, rows, cols, col_radii, col_valid)
        out[start : start + row_valid.sum()] = np.asarray(status)[row_valid]
    return out


def precision_recall(
    real: np.ndarray, fake: np.ndarray, *, k: int = 3, block_size: int = 10_000
) -> tuple[float, float]:
    """Improved precision and recall of fake (M, D) against real (N, D) features, k-NN balls with k = 3.

    precision = fraction of fake rows inside the union of balls around real rows (radius: distance to the k-th
    nearest real neighbour); recall = fraction of real rows inside the balls around fake rows. Distances are
    float32 at full matmul precision, in blocks of `block_size` rows and columns (memory O(block_size^2)).
    """
    real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall need features (N, D) and (M, D), got {real.shape} and {fake.shape}")
    real_radii = manifold_radii(real, k=k, block_size=block_size)
    fake_radii = manifold_radii(fake, k=k, block_size=block_size)
    precision = coverage(fake, real, real_radii, block_size=block_size).mean()
    recall = coverage(real, fake, fake_radii, block_size=block_size).mean()
    return float(precision), float(recall)
