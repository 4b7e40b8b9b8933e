"""Fast checks of a representation: weighted k-NN accuracy and a closed-form ridge-regression probe.

Both take fixed feature matrices (the encoder's anchors, or the ResNet's pooled backbone features) and need no
training loop, so they can run at the end of every representation run and during long ones. The paper's own
number comes from a trained linear classifier (300 epochs of AdamW on the pooled backbone features); these are its cheap
companions, each stated with its protocol next to the number.

Conventions: features are ``(N, F)`` float arrays on the host or a device, labels ``(N,)`` ints in
``[0, num_classes)``. Nothing here is jitted: callers jit (``evaluation`` runs these on host-fetched features).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class KnnOptions:
    """Weighted k-NN of Wu et al. (2018), the usual self-supervised check: cosine similarity on L2-normalised
    features, the ``k`` nearest training points vote with weight ``exp(similarity / temperature)``."""

    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 1024  # test rows per similarity block: memory ~ chunk_size * num_train floats

    def describe(self) -> str:
        return f"weighted k-NN, cosine similarity, k {self.k}, temperature {self.temperature}"


def _normalise(features: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    features = jnp.asarray(features, jnp.float32)
    norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
    return features / jnp.maximum(norm, 1e-12)


def knn_scores(train_features: jax.Array, train_labels: jax.Array, query_features: jax.Array, *, num_classes: int,
               options: KnnOptions = KnnOptions()) -> jax.Array:
    """Class scores (Q, num_classes) of queries (Q, F) by a weighted vote of their k nearest training rows (N, F).

    Every argument is used as given: pass normalised features (``_normalise``) for the cosine rule.
    """
    similarity = query_features @ train_features.T  # (Q, N)
    k = min(options.k, train_features.shape[0])
    top_similarity, top_index = jax.lax.top_k(similarity, k)  # (Q, k)
    weights = jnp.exp(top_similarity / options.temperature)
    votes = jax.nn.one_hot(train_labels[top_index], num_classes, dtype=weights.dtype)  # (Q, k, C)
    return jnp.einsum("qk,qkc->qc", weights, votes)


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, num_classes: int,
                 options: KnnOptions = KnnOptions()) -> float:
    """Top-1 accuracy of weighted k-NN classification of the test rows against the training rows.

    Args:
      train_features: (N, F); train_labels: (N,) ints; test_features: (M, F); test_labels: (M,) ints.
    """
    _check_pair(train_features, train_labels, "train")
    _check_pair(test_features, test_labels, "test")
    train = _normalise(train_features)
    labels = jnp.asarray(train_labels, jnp.int32)
    test = _normalise(test_features)
    correct = 0
    score = jax.jit(knn_scores, static_argnames=("num_classes", "options"))
    for start in range(0, test.shape[0], options.chunk_size):
        chunk = test[start:start + options.chunk_size]
        predicted = jnp.argmax(score(train, labels, chunk, num_classes=num_classes, options=options), axis=-1)
        correct += int(np.sum(np.asarray(predicted) == np.asarray(test_labels[start:start + options.chunk_size])))
    return correct / test.shape[0]


@dataclasses.dataclass(frozen=True)
class RidgeOptions:
    """Least squares from standardised features to one-hot targets with an L2 penalty: ``lam = l2 * mean
    eigenvalue`` of the feature covariance, so one ``l2`` suits features of any scale. Solved in float64."""

    l2: float = 1e-2

    def describe(self) -> str:
        return f"closed-form ridge probe on standardised features, one-hot targets, l2 {self.l2} x mean eigenvalue"


def fit_ridge(features, labels, *, num_classes: int, options: RidgeOptions = RidgeOptions()):
    """Closed-form ridge regression (N, F) -> one-hot (N, C). Returns ``(mean (F,), scale (F,), weights (F, C),
    bias (C,))``, all float64 NumPy: ``predict = ((x - mean) / scale) @ weights + bias``."""
    _check_pair(features, labels, "train")
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature carries nothing; keep it at zero, not NaN
    x = (x - mean) / scale
    targets = np.eye(num_classes)[np.asarray(labels, np.int64)]
    bias = targets.mean(axis=0)
    gram = x.T @ x / x.shape[0]
    lam = options.l2 * np.trace(gram) / gram.shape[0]
    weights = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ (targets - bias) / x.shape[0])
    return mean, scale, weights, bias


def ridge_accuracy(train_features, train_labels, test_features, test_labels, *, num_classes: int,
                   options: RidgeOptions = RidgeOptions()) -> float:
    """Top-1 test accuracy of :func:`fit_ridge` fitted on the training rows."""
    _check_pair(test_features, test_labels, "test")
    mean, scale, weights, bias = fit_ridge(train_features, train_labels, num_classes=num_classes, options=options)
    scores = ((np.asarray(test_features, np.float64) - mean) / scale) @ weights + bias
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(test_labels)))


def _check_pair(features, labels, name: str) -> None:
    if np.ndim(features) != 2 or np.ndim(labels) != 1 or np.shape(features)[0] != np.shape(labels)[0]:
        raise ValueError(f"{name} features must be (N, F) with labels (N,); got {np.shape(features)} and "
                         f"{np.shape(labels)}")
    if np.shape(features)[0] == 0:
        raise ValueError(f"{name} set is empty")
