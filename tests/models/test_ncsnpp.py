"""NCSN++ encoder and rectified-flow decoder: paper sizes, the whole wiring against NumPy, modes, precision, remat."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import models
from lzn_jax.models import ncsnpp, presets
from tests.models import numpy_reference as ref

# Every architectural key is spelled out: the NumPy composition reads them and never the Flax defaults.
TINY_TRUNK = dict(
    nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, fir=False, progressive_input="none"
)
TINY_ENCODER = dict(
    name="ncsnpp_encoder", latent_dim=6, num_base_channels=4, num_base_units=12, num_latent_transformation_layers=2,
    latent_transformation_resolutions=None, **TINY_TRUNK,
)
TINY_DECODER = dict(
    name="ncsnpp_decoder", latent_dim=6, num_classes=3, embedding_type="positional", progressive="none",
    scale_by_sigma=False, **TINY_TRUNK,
)
# The 256x256 models' features (FIR, input skip, heads at some resolutions; Fourier time, output skip,
# scale_by_sigma) at 16x16 with three levels.
TINY_ENCODER_256 = dict(
    TINY_ENCODER, ch_mult=(1, 1, 2), fir=True, progressive_input="input_skip", latent_transformation_resolutions=(8, 4)
)
TINY_DECODER_256 = dict(
    TINY_DECODER, ch_mult=(1, 1, 2), fir=True, embedding_type="fourier", progressive="output_skip",
    progressive_input="input_skip", scale_by_sigma=True,
)


def _decoder_inputs(batch, res, latent_dim, num_classes, *, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, res, res, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.05, 1.0, batch), jnp.float32)
    latent = jnp.asarray(rng.standard_normal((batch, latent_dim)), jnp.float32) if latent_dim else None
    onehot = jax.nn.one_hot(rng.integers(0, num_classes, batch), num_classes) if num_classes else None
    return x, t, latent, onehot


def _near_zero_bound(kernel):
    """The largest weight `ddpm_init(0)` can draw for a conv (HWIO) or dense (in, out) kernel: scale 1e-10."""
    receptive = int(np.prod(kernel.shape[:-2]))
    fan_avg = receptive * (kernel.shape[-2] + kernel.shape[-1]) / 2
    return np.sqrt(3e-10 / fan_avg)


# ------------------------------------------------------------------------------------------------------------------
# Exact paper architectures: one jax.eval_shape trace each (no memory, no FLOPs), in bfloat16 compute
# ------------------------------------------------------------------------------------------------------------------

# name -> (preset, image size, parameter count of the paper)
PAPER_MODELS = {
    "encoder32": (presets.cifar10_encoder_config(), 32, 49_790_260),
    "encoder256": (presets.image256_encoder_config(), 256, 87_768_896),
    "rf32": (presets.cifar10_decoder_config(latent_dim=0), 32, 61_804_419),
    "rf_lzn32": (presets.cifar10_decoder_config(), 32, 61_906_819),
    "rf_lzn_cond32": (presets.cifar10_decoder_config(num_classes=10), 32, 61_911_939),
    "rf_cond32": (presets.cifar10_decoder_config(latent_dim=0, num_classes=10), 32, 61_809_539),
    "rf256": (presets.image256_decoder_config(latent_dim=0), 256, 65_574_549),
    "rf_lzn256": (presets.image256_decoder_config(), 256, 65_676_949),
}


@pytest.fixture(scope="module")
def paper_model():
    """name -> (output, params) as ShapeDtypeStructs of the bfloat16-compute model at batch 2, traced once."""

    @functools.cache
    def trace(name):
        config, image_size, _ = PAPER_MODELS[name]
        return ref.trace_model(config, image_size)

    return trace


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_parameter_count_equals_paper(paper_model, name):
    _, params = paper_model(name)
    assert ref.count_parameters(params) == PAPER_MODELS[name][2]


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_bfloat16_compute_keeps_float32_params_and_outputs(paper_model, name):
    output, params = paper_model(name)
    config, image_size, _ = PAPER_MODELS[name]
    expected_shape = (2, config["latent_dim"]) if "encoder" in name else (2, image_size, image_size, 3)
    assert output.shape == expected_shape and output.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "name, head_resolutions",
    [("encoder32", [32] * 5 + [16] * 5 + [8] * 5 + [4] * 6),
     ("encoder256", [64] * 3 + [32] * 3 + [16] * 3 + [8] * 3 + [4] * 4)],
)
def test_encoder_has_one_head_per_feature_map_at_the_paper_resolutions(paper_model, name, head_resolutions):
    """One head per map (256: none at 256 and 128), each 20 r^2 wide after the channel-major flatten."""
    _, params = paper_model(name)
    heads = sorted((k for k in params if k.startswith("head_")), key=lambda k: int(k.split("_")[1]))
    widths = [params[k]["dense_0"]["kernel"].shape[0] for k in heads]
    assert widths == [20 * r * r for r in head_resolutions]


# ------------------------------------------------------------------------------------------------------------------
# The whole wiring against a float64 NumPy composition of the separately tested blocks
# ------------------------------------------------------------------------------------------------------------------

# name -> (config, image size, a wrong wiring of the NumPy composition between two maps of equal shape)
WIRING_CASES = {
    "encoder32": (TINY_ENCODER, 8, dict(swap_heads=(0, 1))),  # input conv and first block, both 8x8x16
    "encoder256": (TINY_ENCODER_256, 16, dict(swap_heads=(2, 3))),  # first down block and the block after it
    "decoder32": (TINY_DECODER, 8, dict(swap_skips=(0, 0, 1))),
    "decoder256": (TINY_DECODER_256, 16, dict(swap_skips=(1, 0, 1))),
}


@pytest.fixture(scope="module")
def float64_forward():
    """name -> (NumPy params, inputs, Flax output), all float64, the model run once under x64."""

    @functools.cache
    def forward(name):
        config, image_size, _ = WIRING_CASES[name]
        rng = np.random.default_rng(11)
        images = rng.uniform(-1, 1, (2, image_size, image_size, 3))
        if config["name"] == "ncsnpp_decoder":
            # t = 1.3 checks the clamp to [0, 1]; a distinct one-hot row per sample.
            inputs = (images, np.array([0.3, 1.3]), rng.standard_normal((2, 6)), np.eye(3)[[2, 0]])
        else:
            inputs = (images,)
        with jax.enable_x64(True):
            module = models.build(config, dtype=jnp.float64)
            # Random values in every leaf, so the near-zero-initialised convs and attention outputs carry signal.
            params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), ref.random_params(module, *inputs))
            # Op by op on purpose: one float64 forward compiles faster this way than as a whole graph on CPU.
            output = np.asarray(module.apply(params, *inputs))
        assert output.dtype == np.float64
        return ref.to_numpy(params["params"]), inputs, output

    return forward


def _numpy_forward(name, params, inputs, **wiring):
    config = WIRING_CASES[name][0]
    network = ref.ncsnpp_decoder if config["name"] == "ncsnpp_decoder" else ref.ncsnpp_encoder
    return network(params, *inputs, config, **wiring)


@pytest.mark.parametrize("name", list(WIRING_CASES))
def test_whole_network_equals_numpy_composition_in_float64(float64_forward, name):
    params, inputs, output = float64_forward(name)
    expected = _numpy_forward(name, params, inputs)
    np.testing.assert_allclose(output, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("name", list(WIRING_CASES))
def test_numpy_composition_tells_a_swapped_wire_apart(float64_forward, name):
    """The comparison above would catch two equal-shape skips (decoder) or head inputs (encoder) swapped."""
    params, inputs, output = float64_forward(name)
    miswired = _numpy_forward(name, params, inputs, **WIRING_CASES[name][2])
    assert np.abs(output - miswired).max() > 1e-3 * np.abs(output).max()


# ------------------------------------------------------------------------------------------------------------------
# Initialisation of a tiny encoder (real init)
# ------------------------------------------------------------------------------------------------------------------


def test_tiny_encoder_initialises_as_specified_and_runs():
    encoder = models.build(TINY_ENCODER)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    params = encoder.init(jax.random.key(0), x)["params"]
    anchors = encoder.apply({"params": params}, x)
    assert anchors.shape == (2, 6) and anchors.dtype == jnp.float32 and np.all(np.isfinite(anchors))
    # init_scale 0: the second conv of every residual block and the attention output are ~0 (scale 1e-10).
    resblocks = [block for name, block in params.items() if "block" in name or "resample" in name]
    attention = [block for name, block in params.items() if "attn" in name]
    assert (len(resblocks), len(attention)) == (5, 2)  # 2 level blocks, a down block, 2 middle; 2 attention
    for kernel in [block["conv_1"]["kernel"] for block in resblocks] + [block["out"]["kernel"] for block in attention]:
        assert 0 < np.abs(np.asarray(kernel)).max() <= _near_zero_bound(kernel)
    assert all(np.all(np.asarray(block["norm_0"]["scale"]) == 1) for block in resblocks)
    # Head Linear layers: PyTorch default init, weights and biases within 1/sqrt(fan_in).
    for name in (k for k in params if k.startswith("head_")):
        for dense in ("dense_0", "dense_1"):
            fan_in = params[name][dense]["kernel"].shape[0]
            for leaf in params[name][dense].values():
                assert np.abs(np.asarray(leaf)).max() <= 1 / np.sqrt(fan_in)


# ------------------------------------------------------------------------------------------------------------------
# Encoder semantics
# ------------------------------------------------------------------------------------------------------------------


def test_latent_head_flattens_channel_major_like_the_reference():
    head = ncsnpp.LatentHead(latent_dim=5, num_base_channels=3, num_base_units=7, num_latent_transformation_layers=3)
    fmap = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 6)), jnp.float32)
    params = ref.random_params(head, fmap)
    assert params["params"]["dense_0"]["kernel"].shape == (3 * 16, 7)  # the NumPy head's flatten is NCHW
    expected = ref.latent_head(ref.to_numpy(params["params"]), fmap)
    np.testing.assert_allclose(head.apply(params, fmap), expected, rtol=1e-4, atol=1e-5)


def test_latent_head_refuses_fewer_than_two_layers_naming_its_field():
    head = ncsnpp.LatentHead(latent_dim=5, num_latent_transformation_layers=1)
    with pytest.raises(ValueError, match=r"LatentHead.num_latent_transformation_layers must be >= 2"):
        jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((1, 4, 4, 6))))


def test_heads_restricted_to_latent_transformation_resolutions():
    encoder = models.build(TINY_ENCODER, latent_transformation_resolutions=(4,))
    params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))["params"]
    # Maps 0, 1 are at 8x8; maps 2 (down block), 3 (block), 4 (middle) at 4x4.
    assert sorted(k for k in params if k.startswith("head_")) == ["head_2", "head_3", "head_4"]


def test_dropout_only_in_training_and_only_with_an_rng():
    # One level: every residual block has the same shape, so CPU compiles a single random-bit kernel.
    config = dict(TINY_ENCODER, ch_mult=(1,), dropout=0.5)
    encoder = models.build(config)
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    params = ref.random_params(encoder, x)
    apply = encoder.apply
    evaluation = apply(params, x, train=False)
    np.testing.assert_array_equal(evaluation, apply(params, x, train=False))
    train_a = apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(train_a, apply(params, x, train=True, rngs={"dropout": jax.random.key(1)}))
    assert not np.allclose(train_a, train_b) and not np.allclose(train_a, evaluation)
    with pytest.raises(flax.errors.InvalidRngError):
        encoder.apply(params, x, train=True)
    # The same module without dropout is identical in both modes.
    no_dropout = models.build(config, dropout=0.0)
    np.testing.assert_array_equal(no_dropout.apply(params, x, train=True), no_dropout.apply(params, x, train=False))


# ------------------------------------------------------------------------------------------------------------------
# Decoder inputs
# ------------------------------------------------------------------------------------------------------------------


def test_plain_rectified_flow_decoder_takes_no_latent():
    decoder = models.build(TINY_DECODER, latent_dim=0, num_classes=0)
    x, t, _, _ = _decoder_inputs(1, 8, 0, 0)
    params = jax.eval_shape(lambda: decoder.init(jax.random.key(0), x, t))
    assert params["params"]["cond_dense_0"]["kernel"].shape == (16, 64)  # the time embedding only
    with pytest.raises(ValueError, match="latent_dim=0"):
        decoder.init(jax.random.key(0), x, t, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="pass `latent`"):
        models.build(TINY_DECODER).init(jax.random.key(0), x, t)


# ------------------------------------------------------------------------------------------------------------------
# Precision and rematerialisation
# ------------------------------------------------------------------------------------------------------------------


def _relative_error(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b))


def test_bfloat16_compute_is_close_to_float32():
    x = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    encoder32, encoder16 = models.build(TINY_ENCODER), models.build(TINY_ENCODER, dtype="bfloat16")
    params = ref.random_params(encoder32, x)
    anchors16 = encoder16.apply(params, x)
    assert anchors16.dtype == jnp.float32
    error = _relative_error(anchors16, encoder32.apply(params, x))
    assert 1e-5 < error < 3e-2  # really ran in bf16 (not bitwise f32), yet close

    inputs = _decoder_inputs(2, 8, 6, 3, seed=9)
    decoder32, decoder16 = models.build(TINY_DECODER), models.build(TINY_DECODER, dtype=jnp.bfloat16)
    params = ref.random_params(decoder32, *inputs)
    velocity16 = decoder16.apply(params, *inputs)
    assert velocity16.dtype == jnp.float32
    error = _relative_error(velocity16, decoder32.apply(params, *inputs))
    assert 1e-5 < error < 3e-2


@pytest.mark.slow
def test_remat_gives_identical_values_and_gradients():
    x = jnp.asarray(np.random.default_rng(10).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    # Input conv + middle (ResBlock, attention, ResBlock): every kind of block with as few compilations as
    # possible; remat of dropout-carrying blocks compiles a random-bit kernel per block on CPU.
    config = dict(TINY_ENCODER, ch_mult=(1,), num_res_blocks=0, dropout=0.3)
    plain, remat = models.build(config), models.build(config, remat=True)
    params = ref.random_params(plain, x)
    remat_shapes = jax.eval_shape(lambda: remat.init(jax.random.key(0), x))
    assert jax.tree_util.tree_structure(remat_shapes) == jax.tree_util.tree_structure(params)

    def loss(module, p):
        # Dropout active: remat must replay the same dropout masks in the backward pass.
        anchors = module.apply(p, x, train=True, rngs={"dropout": jax.random.key(3)})
        return jnp.mean(anchors**2), anchors

    # Eager (op-by-op) on purpose: on a 2-core CPU compiling two whole backward graphs costs minutes.
    (loss_plain, out_plain), grads_plain = jax.value_and_grad(lambda p: loss(plain, p), has_aux=True)(params)
    (loss_remat, out_remat), grads_remat = jax.value_and_grad(lambda p: loss(remat, p), has_aux=True)(params)
    np.testing.assert_allclose(out_remat, out_plain, rtol=1e-6, atol=1e-6)
    ref.assert_trees_equal_up_to_float32_rounding(grads_remat, grads_plain)
    assert float(loss_plain) > 0 and np.abs(np.asarray(grads_plain["params"]["conv_in"]["kernel"])).max() > 0
