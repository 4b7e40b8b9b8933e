"""The fast representation checks: weighted k-NN and the closed-form ridge probe."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from lzn_jax.evaluation import probes


def _clusters(rng, num_classes=4, per_class=30, dim=8, spread=0.05):
    centres = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    return centres[labels] + spread * rng.normal(size=(labels.size, dim)), labels


def test_knn_scores_equal_a_brute_force_vote():
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(25, 6)), rng.integers(0, 3, 25)
    queries = rng.normal(size=(7, 6))
    options = probes.KnnOptions(k=5, temperature=0.5)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    got = np.asarray(probes.knn_scores(unit(train).astype(np.float32), labels, unit(queries).astype(np.float32),
                                       num_classes=3, options=options))
    similarity = unit(queries) @ unit(train).T
    expected = np.zeros((7, 3))
    for q in range(7):
        for n in np.argsort(-similarity[q])[:5]:
            expected[q, labels[n]] += np.exp(similarity[q, n] / 0.5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_knn_separates_clusters_and_is_near_chance_on_shuffled_labels():
    rng = np.random.default_rng(1)
    train, train_labels = _clusters(rng)
    test = train + 0.01 * rng.normal(size=train.shape)
    options = probes.KnnOptions(k=5, chunk_size=16)  # several chunks
    assert probes.knn_accuracy(train, train_labels, test, train_labels, num_classes=4, options=options) == 1.0
    shuffled = rng.permutation(train_labels)
    chance = probes.knn_accuracy(train, shuffled, test, train_labels, num_classes=4, options=options)
    assert chance < 0.6


def test_ridge_equals_sklearn_on_standardised_features():
    rng = np.random.default_rng(2)
    features, labels = rng.normal(size=(60, 5)) * [1, 10, 0.1, 3, 1], rng.integers(0, 3, 60)
    options = probes.RidgeOptions(l2=0.3)
    mean, scale, weights, bias = probes.fit_ridge(features, labels, num_classes=3, options=options)
    x = (features - features.mean(0)) / features.std(0)
    lam = options.l2 * np.trace(x.T @ x / 60) / 5
    reference = Ridge(alpha=lam * 60, fit_intercept=True).fit(x, np.eye(3)[labels])
    np.testing.assert_allclose(weights, reference.coef_.T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bias, reference.intercept_, atol=1e-10)
    np.testing.assert_allclose(mean, features.mean(0))


def test_ridge_separates_clusters_and_keeps_constant_features_finite():
    rng = np.random.default_rng(3)
    features, labels = _clusters(rng, spread=0.2)
    features = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)  # a constant column
    assert probes.ridge_accuracy(features, labels, features, labels, num_classes=4) == 1.0


@pytest.mark.parametrize("fn", [probes.knn_accuracy, probes.ridge_accuracy])
def test_mismatched_rows_are_refused(fn):
    with pytest.raises(ValueError, match=r"\(N, F\) with labels \(N,\)"):
        fn(np.zeros((5, 2)), np.zeros(4, int), np.zeros((3, 2)), np.zeros(3, int), num_classes=2)
