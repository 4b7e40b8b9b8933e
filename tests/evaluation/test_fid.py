"""Feature extraction end to end, the reference-statistics cache with its protocol check, and metric results that
carry their protocol."""

import json

import numpy as np
import pytest

from lzn_jax.evaluation import fid, inception
from tests.evaluation.helpers import random_variables

PROTOCOL = fid.FeatureProtocol(weights_sha256="ab" * 32)


def test_extract_features_runs_the_full_network_once_and_pads_the_last_batch():
    """The only 299 x 299 forward pass in the suite: CIFAR-sized uint8 images, batches of 2, the last one padded."""
    variables = random_variables(inception.abstract_variables(inception.MIN_INPUT_SIZE), seed=3)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    seen = []
    features = fid.extract_features(np.stack([a, b, a]), variables, protocol=PROTOCOL, batch_size=2,
                                    progress=seen.append)
    assert seen == [2, 3]
    assert features.pool.shape == (3, 2048) and features.spatial.shape == (3, 2023)
    assert features.logits.shape == (3, 1008)
    assert np.isfinite(features.pool).all() and np.abs(features.pool).max() > 1e-3
    # Image a alone in a zero-padded batch gives the same features as beside b: rows are independent.
    for array in features:
        np.testing.assert_allclose(array[2], array[0], rtol=1e-5, atol=1e-6)
        assert not np.allclose(array[1], array[0])


def _features(seed, n=200, shift=0.0):
    rng = np.random.default_rng(seed)
    return fid.InceptionFeatures(
        pool=(rng.normal(size=(n, 16)) + shift).astype(np.float32),
        spatial=(rng.normal(size=(n, 12)) + shift).astype(np.float32),
        logits=rng.normal(size=(n, 10)).astype(np.float32),
    )


def test_reference_statistics_are_computed_once_then_read_from_the_cache(tmp_path):
    path = tmp_path / "stats" / "cifar10_train.npz"
    calls = []

    def compute():
        calls.append(1)
        return _features(0)

    first = fid.reference_statistics(path, compute, protocol=PROTOCOL, name="cifar10/train")
    second = fid.reference_statistics(path, compute, protocol=PROTOCOL, name="cifar10/train")
    assert calls == [1] and path.is_file() and not list(path.parent.glob("*.tmp"))
    assert second.count == 200 and second.protocol == {**PROTOCOL.as_dict(), "reference": "cifar10/train"}
    for name in ("mu", "sigma", "mu_spatial", "sigma_spatial", "pool_features"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    np.testing.assert_allclose(second.sigma, np.cov(_features(0).pool.astype(np.float64), rowvar=False))


def test_cached_statistics_under_another_protocol_are_refused(tmp_path):
    path = tmp_path / "ref.npz"
    fid.reference_statistics(path, lambda: _features(0), protocol=PROTOCOL, name="cifar10/train")
    other = fid.FeatureProtocol(weights_sha256=PROTOCOL.weights_sha256, normalization="pytorch_fid")
    with pytest.raises(fid.ProtocolMismatchError, match="normalization: cached 'clean', wanted 'pytorch_fid'"):
        fid.reference_statistics(path, lambda: _features(0), protocol=other, name="cifar10/train")
    with pytest.raises(fid.ProtocolMismatchError, match="reference: cached 'cifar10/train'"):
        fid.reference_statistics(path, lambda: _features(0), protocol=PROTOCOL, name="celeba/train")
    with pytest.raises(ValueError, match="resize must be one of"):
        fid.FeatureProtocol(weights_sha256="", resize="bilinear")


def test_every_number_comes_with_its_protocol(tmp_path):
    reference = fid.reference_statistics(tmp_path / "r.npz", lambda: _features(0), protocol=PROTOCOL, name="train")
    same = fid.evaluate(_features(0), reference, protocol=PROTOCOL)
    assert set(same) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert abs(same["fid"].value) < 1e-6 and abs(same["sfid"].value) < 1e-6
    assert same["precision"].value == same["recall"].value == 1.0
    shifted = fid.evaluate(_features(1, n=150, shift=3.0), reference, protocol=PROTOCOL)
    assert shifted["fid"].value > 16 * 9 * 0.8  # |mean shift|^2 = 16 dims * 3^2, up to sampling noise
    for result in shifted.values():
        assert result.protocol["weights_sha256"] == PROTOCOL.weights_sha256 and result.protocol["samples"] == 150
        json.dumps(result.as_dict())  # plain JSON for the workdir's results file
    assert shifted["fid"].protocol["reference_samples"] == 200
    assert "pool_3" in shifted["fid"].protocol["features"] and "mixed_6/conv" in shifted["sfid"].protocol["features"]
    assert shifted["inception_score"].protocol["splits"] == 10 and shifted["precision"].protocol["k"] == 3
    assert str(shifted["fid"]).startswith("FID = ") and "resize=clean" in str(shifted["fid"])
    with pytest.raises(fid.ProtocolMismatchError):
        fid.evaluate(_features(1), reference, protocol=fid.FeatureProtocol(weights_sha256="cd" * 32))
