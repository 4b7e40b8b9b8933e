"""The FID Inception-V3 in Linen against an independent float64 NumPy computation on small random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax.evaluation import inception
from tests.evaluation import numpy_inception as ref
from tests.evaluation.helpers import random_variables


@pytest.fixture(scope="module")
def abstract():
    return inception.abstract_variables(inception.MIN_INPUT_SIZE)


def _close(actual, expected, rtol=2e-5):
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_parameter_count_equals_pytorch_fid_network(abstract):
    assert inception.count_params(abstract["params"]) == inception.NUM_PARAMS == 23_850_960
    # Every conv-BN unit (94 of them) has a running mean and variance as long as its BN scale and bias.
    bn_params = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(abstract["params"]) if "'bn'" in str(path)]
    assert len(bn_params) == 2 * 94
    assert inception.count_params(abstract["batch_stats"]) == inception.count_params(bn_params)


@pytest.mark.parametrize(
    "kernel, stride, padding", [((3, 3), 2, (0, 0)), ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0)), ((3, 3), 1, (1, 1))]
)
def test_conv_bn_relu_matches_numpy(kernel, stride, padding):
    module = inception.ConvBNReLU(6, kernel, stride, padding)
    x = np.random.default_rng(1).normal(size=(2, 9, 11, 5)).astype(np.float32)
    variables = random_variables(jax.eval_shape(module.init, jax.random.key(0), x), seed=2)
    expected = ref.conv_bn_relu(x, variables["params"], variables["batch_stats"], stride=stride, padding=padding)
    actual = module.apply(variables, x)
    assert actual.shape == expected.shape
    assert (expected == 0).any() and (expected > 0).any()  # the ReLU is exercised
    _close(actual, expected)


def test_average_pool_excludes_padding_from_the_count():
    x = np.random.default_rng(3).normal(size=(2, 5, 6, 3)).astype(np.float32)
    _close(inception.avg_pool_3x3_exclude_padding(x), ref.avg_pool_exclude_padding(x))
    # A constant image stays constant only when the zero padding is not counted (a corner would give 4/9 of it).
    constant = inception.avg_pool_3x3_exclude_padding(jnp.full((1, 4, 4, 1), 2.0))
    np.testing.assert_allclose(constant, 2.0, rtol=1e-6)


def test_max_pools_pad_with_minus_infinity_and_reduce_without_padding():
    x = -np.abs(np.random.default_rng(4).normal(size=(1, 6, 7, 2))).astype(np.float32) - 1.0  # all negative
    same = inception.max_pool_3x3_same(x)
    _close(same, ref.max_pool(x, stride=1, pad=1))
    assert (np.asarray(same) < 0).all()  # zero padding would have put zeros on the border
    _close(inception.max_pool_3x3_stride2(x), ref.max_pool(x, stride=2, pad=0))
    assert inception.max_pool_3x3_stride2(np.zeros((1, 35, 35, 1))).shape == (1, 17, 17, 1)


@pytest.mark.parametrize(
    "block, numpy_block",
    [
        (inception.FIDInceptionA(pool_features=4), ref.block_a),
        (inception.FIDInceptionC(channels_7x7=8), ref.block_c),
        (inception.FIDInceptionE(pool="avg"), lambda x, v: ref.block_e(x, v, "avg")),
        (inception.FIDInceptionE(pool="max"), lambda x, v: ref.block_e(x, v, "max")),
    ],
    ids=["A", "C", "E-avg", "E-max"],
)
def test_fid_blocks_match_numpy(block, numpy_block):
    x = np.random.default_rng(5).normal(size=(1, 5, 6, 8)).astype(np.float32)
    variables = random_variables(jax.eval_shape(block.init, jax.random.key(0), x), seed=6)
    actual = jnp.concatenate(block.apply(variables, x), axis=-1)
    _close(actual, numpy_block(x, variables))


def test_whole_network_matches_numpy_at_the_smallest_input(abstract):
    """Wiring, branch order, the sFID tap and both logits, on a 75 x 75 batch of 2 (cheap on a CPU)."""
    variables = random_variables(abstract, seed=9)
    x = np.random.default_rng(10).normal(size=(2, 75, 75, 3)).astype(np.float32)
    out = jax.jit(inception.InceptionV3().apply)(variables, x)
    pool, spatial, logits, unbiased = ref.inception_v3(x, variables)
    assert out.pool.shape == (2, 2048) and out.logits.shape == (2, 1008)
    assert out.spatial.shape == (2, 7 * 3 * 3)  # mixed_6 is 3 x 3 at this input size (17 x 17 at 299)
    assert np.abs(pool).max() > 1e-2  # activations did not vanish, so the comparison means something
    for actual, expected in [(out.pool, pool), (out.spatial, spatial), (out.logits, logits),
                             (out.logits_unbiased, unbiased)]:
        _close(actual, expected, rtol=1e-4)


def test_inputs_smaller_than_75_or_without_three_channels_are_refused():
    with pytest.raises(ValueError, match="at least 75"):
        inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 80, 80, 1)))
