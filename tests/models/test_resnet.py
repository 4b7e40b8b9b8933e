"""ResNet-50-GN: paper sizes, v1.5 bottleneck against NumPy, zero-init residual, input mapping, head, dtype, remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import models
from lzn_jax.models import presets, resnet
from tests.models import numpy_reference as ref

TINY = dict(name="resnet50_gn", latent_dim=64, stage_sizes=(1,), head_num_layers=2)  # one stage: 256 features

# head_num_layers -> parameter count: 2 is the configured head, 1 the paper's reported count, 0 the backbone.
PAPER_COUNTS = {2: 28_231_232, 1: 24_032_832, 0: 23_508_032}


@pytest.fixture(scope="module")
def resnet50():
    """head_num_layers -> (ResNetOutput, params) as ShapeDtypeStructs of the bfloat16-compute ResNet-50-GN at
    batch 2 and 224x224, traced once."""

    @functools.cache
    def trace(head_num_layers):
        return ref.trace_model(presets.resnet50_gn_config(head_num_layers=head_num_layers), 224)

    return trace


@pytest.mark.parametrize("head_num_layers", list(PAPER_COUNTS))
def test_parameter_count_equals_paper(resnet50, head_num_layers):
    _, params = resnet50(head_num_layers)
    assert ref.count_parameters(params) == PAPER_COUNTS[head_num_layers]


@pytest.mark.parametrize("head_num_layers", list(PAPER_COUNTS))
def test_output_is_float32_anchors_and_features_with_float32_params(resnet50, head_num_layers):
    output, params = resnet50(head_num_layers)
    assert isinstance(output, resnet.ResNetOutput)
    assert output.anchors.shape == ((2, 2048) if head_num_layers == 0 else (2, 256))
    assert output.features.shape == (2, 2048)
    assert output.anchors.dtype == output.features.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("stride, use_projection, channels", [(2, True, 64), (1, False, 128)])
def test_bottleneck_matches_numpy_v1_5(stride, use_projection, channels):
    """Stride on the 3x3 conv with symmetric padding; an even input size tells this apart from 'SAME' padding."""
    block = resnet.BottleneckBlock(width=32, stride=stride, use_projection=use_projection)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, channels)), jnp.float32)
    params = ref.random_params(block, x)
    out = block.apply(params, x)
    expected = ref.bottleneck_block(ref.to_numpy(params["params"]), np.asarray(x), stride=stride)
    assert out.shape == expected.shape == (2, 6 // stride, 6 // stride, 128)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_last_group_norm_of_each_block_starts_at_zero():
    block = resnet.BottleneckBlock(width=32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 4, 128)), jnp.float32)
    params = block.init(jax.random.key(0), x)
    assert not np.any(np.asarray(params["params"]["norm_2"]["scale"]))
    np.testing.assert_array_equal(block.apply(params, x), np.maximum(np.asarray(x), 0))


def test_stem_sees_inputs_mapped_to_unit_interval():
    module = models.build(TINY)
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    params = ref.random_params(module, x)
    _, state = module.apply(params, x, capture_intermediates=lambda m, _: m.name == "stem_conv")
    kernel = np.asarray(params["params"]["stem_conv"]["kernel"])
    expected = ref.conv2d((np.asarray(x, np.float64) + 1) / 2, kernel, stride=2, padding=((3, 3), (3, 3)))
    np.testing.assert_allclose(state["intermediates"]["stem_conv"]["__call__"][0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head_num_layers", [0, 1, 2])
def test_projection_head_matches_numpy(head_num_layers):
    module = models.build(TINY, head_num_layers=head_num_layers)
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    params = ref.random_params(module, x)
    anchors, features = module.apply(params, x)
    assert features.shape == (2, 256) and anchors.dtype == jnp.float32
    h = np.asarray(features, np.float64)
    p = ref.to_numpy(params["params"])
    for i in range(head_num_layers):
        h = ref.group_norm(h @ p[f"head_dense_{i}"]["kernel"], 32, p[f"head_norm_{i}"]["scale"],
                           p[f"head_norm_{i}"]["bias"], 1e-5)
        if i < head_num_layers - 1:
            h = np.maximum(h, 0)
    assert anchors.shape == ((2, 256) if head_num_layers == 0 else (2, 64))
    np.testing.assert_allclose(anchors, h, rtol=1e-4, atol=1e-4)


def test_initialisation_is_pytorch_default():
    module = models.build(TINY)
    x = jnp.zeros((1, 16, 16, 3))
    params = module.init(jax.random.key(0), x)["params"]
    kernel = np.asarray(params["stem_conv"]["kernel"])
    bound = 1 / np.sqrt(7 * 7 * 3)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
    assert "bias" not in params["stem_conv"] and "bias" not in params["head_dense_0"]
    assert np.abs(np.asarray(params["head_dense_1"]["kernel"])).max() <= 1 / np.sqrt(256)


def test_bfloat16_compute_is_close_to_float32():
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    plain = models.build(TINY)
    params = ref.random_params(plain, x)
    anchors16 = models.build(TINY, dtype="bfloat16").apply(params, x).anchors
    anchors32 = plain.apply(params, x).anchors
    assert anchors16.dtype == jnp.float32
    error = np.linalg.norm(anchors16 - anchors32) / np.linalg.norm(anchors32)
    assert 1e-5 < error < 3e-2


@pytest.mark.slow
def test_remat_gives_identical_values_and_gradients():
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    plain, remat = models.build(TINY), models.build(TINY, remat=True)
    params = ref.random_params(plain, x)
    loss = lambda module: jax.value_and_grad(lambda p: jnp.sum(module.apply(p, x).anchors ** 2))(params)
    (value_plain, grads_plain), (value_remat, grads_remat) = loss(plain), loss(remat)
    np.testing.assert_allclose(value_remat, value_plain, rtol=1e-6)
    ref.assert_trees_equal_up_to_float32_rounding(grads_remat, grads_plain)
