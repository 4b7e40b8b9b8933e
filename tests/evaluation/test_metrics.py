"""Fréchet distance, Inception Score and improved precision/recall against references with known answers."""

import numpy as np
import pytest
import scipy.linalg

from lzn_jax.evaluation import metrics


def _scipy_reference_fd(mu1, sigma1, mu2, sigma2):
    """The textbook formula with SciPy's sqrtm, written independently: |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root)


def _random_gaussian(rng, dim):
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [8, 64])
def test_frechet_distance_equals_scipy_reference_on_random_gaussians(dim):
    rng = np.random.default_rng(dim)
    (mu1, s1), (mu2, s2) = _random_gaussian(rng, dim), _random_gaussian(rng, dim)
    expected = _scipy_reference_fd(mu1, s1, mu2, s2)
    assert expected > 1.0
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-10)
    # Symmetric, and the closed form for commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2.
    np.testing.assert_allclose(metrics.frechet_distance(mu2, s2, mu1, s1), expected, rtol=1e-8)
    a, b = np.diag(s1), np.diag(s2)
    np.testing.assert_allclose(
        metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)),
        np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rtol=1e-10,
    )


def test_frechet_distance_of_a_set_against_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 64)) @ np.random.default_rng(1).normal(size=(64, 64))
    mu, sigma = metrics.feature_statistics(features.astype(np.float32))
    assert mu.dtype == np.float64 and sigma.shape == (64, 64)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float32).astype(np.float64), rowvar=False))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    with pytest.raises(ValueError, match="matching statistics"):
        metrics.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_inception_score_on_known_distributions():
    classes = 10
    one_hot_logits = 50.0 * np.eye(classes)[np.arange(1000) % classes]  # confident and uniform over classes
    score, std = metrics.inception_score(one_hot_logits, splits=10)
    np.testing.assert_allclose(score, classes, rtol=1e-9)
    assert std < 1e-9
    same = np.tile(np.random.default_rng(0).normal(size=(1, classes)), (100, 1))  # identical predictions
    np.testing.assert_allclose(metrics.inception_score(same, splits=10)[0], 1.0, rtol=1e-12)
    # Two classes, p(y|x) = (q, 1 - q) or (1 - q, q) in equal numbers: exp(q log 2q + (1 - q) log 2(1 - q)).
    q = 0.8
    rows = np.log(np.array([[q, 1 - q], [1 - q, q]]))[np.arange(200) % 2]
    np.testing.assert_allclose(
        metrics.inception_score(rows, splits=10)[0], np.exp(q * np.log(2 * q) + (1 - q) * np.log(2 * (1 - q))),
        rtol=1e-12,
    )


def test_inception_score_splits_are_consecutive_with_their_own_marginal():
    logits = 50.0 * np.eye(2)[np.repeat([0, 1], 50)]  # first half class 0, second half class 1
    np.testing.assert_allclose(metrics.inception_score(logits, splits=2)[0], 1.0, rtol=1e-9)
    np.testing.assert_allclose(metrics.inception_score(logits, splits=1)[0], 2.0, rtol=1e-9)


def _brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((fake[:, None, :] - real[None, :, :]) ** 2).sum(-1)  # (M, N)
    precision = (d <= radii(real)[None, :]).any(axis=1).mean()
    recall = (d.T <= radii(fake)[None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_recall_limits_identical_and_far_disjoint_sets():
    real = np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32)
    assert metrics.precision_recall(real, real.copy(), k=3, block_size=25) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0, k=3, block_size=25) == (0.0, 0.0)


def test_precision_recall_and_radii_equal_a_brute_force_reference_with_ragged_blocks():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(53, 8)).astype(np.float32)
    fake = (rng.normal(size=(41, 8)) * 1.3 + 0.4).astype(np.float32)
    expected_radii = np.sort(((real[:, None] - real[None]) ** 2).sum(-1), axis=1)[:, 3]
    np.testing.assert_allclose(metrics.manifold_radii(real, k=3, block_size=16), expected_radii, rtol=1e-5)
    precision, recall = metrics.precision_recall(real, fake, k=3, block_size=16)
    expected = _brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), 3)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0
    np.testing.assert_allclose((precision, recall), expected)
