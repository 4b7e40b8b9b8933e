"""NCSN++ encoder and rectified-flow decoder: exact paper sizes, shapes, modes, precision, remat, conditioning."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import models
from lzn_jax.models import ncsnpp
from tests.models import numpy_reference as ref


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _module(config, **overrides):
    return models.build(config, **overrides)


def _decoder_inputs(batch, res, latent_dim, num_classes, *, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, res, res, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.05, 1.0, batch), jnp.float32)
    latent = jnp.asarray(rng.standard_normal((batch, latent_dim)), jnp.float32) if latent_dim else None
    onehot = jax.nn.one_hot(rng.integers(0, num_classes, batch), num_classes) if num_classes else None
    return x, t, latent, onehot


TINY_TRUNK = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
TINY_ENCODER = dict(name="ncsnpp_encoder", latent_dim=6, num_base_channels=4, num_base_units=12, **TINY_TRUNK)
TINY_DECODER = dict(name="ncsnpp_decoder", latent_dim=6, num_classes=3, **TINY_TRUNK)
# The 256x256 decoder's features (FIR, Fourier time, output/input skip, scale_by_sigma) at 16x16.
TINY_DECODER_256 = dict(
    TINY_DECODER, ch_mult=(1, 1, 2), fir=True, embedding_type="fourier", progressive="output_skip",
    progressive_input="input_skip", scale_by_sigma=True,
)


# ------------------------------------------------------------------------------------------------------------------
# Exact paper architectures, through jax.eval_shape (no memory, no FLOPs)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, resolution, expected, head_resolutions",
    [
        (ncsnpp.cifar10_encoder_config(), 32, 49_790_260, [32] * 5 + [16] * 5 + [8] * 5 + [4] * 6),
        (ncsnpp.image256_encoder_config(), 256, 87_768_896, [64] * 3 + [32] * 3 + [16] * 3 + [8] * 3 + [4] * 4),
    ],
    ids=["encoder32", "encoder256"],
)
def test_encoder_parameter_count_and_heads_equal_paper(config, resolution, expected, head_resolutions):
    """Counts, and one head per feature map at the paper's resolutions (256: none at 256 and 128), 20 r^2 wide."""
    module = _module(config)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3))))
    assert _count(shapes) == expected
    heads = sorted((k for k in shapes["params"] if k.startswith("head_")), key=lambda k: int(k.split("_")[1]))
    widths = [shapes["params"][k]["dense_0"]["kernel"].shape[0] for k in heads]
    assert widths == [20 * r * r for r in head_resolutions]


@pytest.mark.parametrize(
    "config, resolution, expected",
    [
        (ncsnpp.cifar10_decoder_config(latent_dim=0), 32, 61_804_419),
        (ncsnpp.cifar10_decoder_config(), 32, 61_906_819),
        (ncsnpp.cifar10_decoder_config(num_classes=10), 32, 61_911_939),
        (ncsnpp.cifar10_decoder_config(latent_dim=0, num_classes=10), 32, 61_809_539),
        (ncsnpp.image256_decoder_config(latent_dim=0), 256, 65_574_549),
        (ncsnpp.image256_decoder_config(), 256, 65_676_949),
    ],
    ids=["rf32", "rf_lzn32", "rf_lzn_cond32", "rf_cond32", "rf256", "rf_lzn256"],
)
def test_decoder_parameter_count_equals_paper(config, resolution, expected):
    module = _module(config)
    inputs = _decoder_inputs(1, resolution, config.latent_dim, config.num_classes)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    assert _count(shapes) == expected


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_256_models_shapes_and_dtypes_through_eval_shape(dtype):
    encoder = _module(ncsnpp.image256_encoder_config(), dtype=dtype)
    decoder = _module(ncsnpp.image256_decoder_config(), dtype=dtype)
    x = jnp.zeros((2, 256, 256, 3))
    anchors, enc_params = jax.eval_shape(lambda: encoder.init_with_output(jax.random.key(0), x))
    assert anchors.shape == (2, 200) and anchors.dtype == jnp.float32
    inputs = _decoder_inputs(2, 256, 200, 0)
    velocity, dec_params = jax.eval_shape(lambda: decoder.init_with_output(jax.random.key(0), *inputs))
    assert velocity.shape == (2, 256, 256, 3) and velocity.dtype == jnp.float32
    # Parameters stay float32 whatever the compute dtype.
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((enc_params, dec_params))} == {jnp.dtype(jnp.float32)}


# ------------------------------------------------------------------------------------------------------------------
# Initialisation of a tiny encoder and decoder (real init)
# ------------------------------------------------------------------------------------------------------------------


def test_tiny_models_initialise_as_specified_and_run():
    encoder = _module(TINY_ENCODER)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    params = encoder.init(jax.random.key(0), x)["params"]
    anchors = encoder.apply({"params": params}, x)
    assert anchors.shape == (2, 6) and anchors.dtype == jnp.float32 and np.all(np.isfinite(anchors))
    # init_scale 0: the second conv of every residual block and the attention output are ~0 (bound from 1e-10).
    for name, block in params.items():
        if "block" in name or "resample" in name:
            kernel = np.asarray(block["conv_1"]["kernel"])
            fan_avg = 9 * (kernel.shape[2] + kernel.shape[3]) / 2
            assert np.abs(kernel).max() <= np.sqrt(3e-10 / fan_avg)
            assert np.all(np.asarray(block["norm_0"]["scale"]) == 1)
        if "attn" in name:
            assert np.abs(np.asarray(block["out"]["kernel"])).max() <= np.sqrt(3e-10 / kernel.shape[-1])
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
    head = ncsnpp.LatentHead(latent_dim=5, num_base_channels=3, num_units=7, num_layers=3)
    fmap = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 6)), jnp.float32)
    params = ref.random_params(head, fmap)
    p = ref.to_numpy(params["params"])
    h = np.einsum("bhwc,co->bhwo", np.asarray(fmap, np.float64), p["conv"]["kernel"][0, 0])
    h = ref.silu(h + p["conv"]["bias"])
    h = h.transpose(0, 3, 1, 2).reshape(2, -1)  # NCHW order: index = c * 16 + y * 4 + x
    h = ref.silu(h @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    h = ref.silu(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
    expected = h @ p["dense_2"]["kernel"] + p["dense_2"]["bias"]
    np.testing.assert_allclose(head.apply(params, fmap), expected, rtol=1e-4, atol=1e-5)


def test_latent_head_needs_at_least_two_layers():
    head = ncsnpp.LatentHead(latent_dim=5, num_layers=1)
    with pytest.raises(ValueError, match=">= 2"):
        jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((1, 4, 4, 6))))


def _zero_head(params, head):
    params = flax.core.unfreeze(jax.tree_util.tree_map(np.array, params))
    last = params["params"][head]["dense_1"]
    last["kernel"][...] = 0
    last["bias"][...] = 0
    return params


def test_anchor_is_the_sum_of_every_head():
    encoder = _module(TINY_ENCODER)
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (3, 8, 8, 3)), jnp.float32)
    params = ref.random_params(encoder, x)
    heads = [k for k in params["params"] if k.startswith("head_")]
    assert len(heads) == 5  # input conv, block at 8, down block, block at 4, middle
    apply = encoder.apply
    anchors = np.asarray(apply(params, x), np.float64)
    contributions = []
    for head in heads:
        contribution = anchors - np.asarray(apply(_zero_head(params, head), x), np.float64)
        assert np.linalg.norm(contribution) > 1e-2 * np.linalg.norm(anchors), head  # every head matters
        contributions.append(contribution)
    np.testing.assert_allclose(np.sum(contributions, axis=0), anchors, rtol=1e-4, atol=1e-4)


def test_heads_restricted_to_latent_transformation_resolutions():
    encoder = _module(TINY_ENCODER, latent_transformation_resolutions=(4,))
    x = jnp.zeros((1, 8, 8, 3))
    params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), x))["params"]
    # Maps 0, 1 are at 8x8; maps 2 (down block), 3 (block), 4 (middle) at 4x4.
    assert sorted(k for k in params if k.startswith("head_")) == ["head_2", "head_3", "head_4"]


def test_dropout_only_in_training_and_only_with_an_rng():
    encoder = _module(TINY_ENCODER, dropout=0.5)
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
    no_dropout = _module(TINY_ENCODER)
    np.testing.assert_array_equal(no_dropout.apply(params, x, train=True), no_dropout.apply(params, x, train=False))


# ------------------------------------------------------------------------------------------------------------------
# Decoder semantics
# ------------------------------------------------------------------------------------------------------------------


def test_conditioning_is_latent_then_class_then_time_embedding():
    """Zeroing the conditioning rows of one input removes exactly that input's influence on the velocity."""
    decoder = _module(TINY_DECODER)
    x, t, latent, onehot = _decoder_inputs(2, 8, 6, 3, seed=4)
    params = ref.random_params(decoder, x, t, latent, onehot)
    apply = decoder.apply
    other = dict(latent=latent[::-1] + 1.0, onehot=onehot[::-1], t=t[::-1] * 0.5)
    base = np.asarray(apply(params, x, t, latent, onehot))
    for name, rows in [("latent", slice(0, 6)), ("onehot", slice(6, 9)), ("t", slice(9, None))]:
        args = dict(latent=latent, onehot=onehot, t=t)
        args[name] = other[name]
        changed = np.asarray(apply(params, x, args["t"], args["latent"], args["onehot"]))
        assert np.abs(changed - base).max() > 1e-3, f"velocity does not depend on {name}"
        blind = jax.tree_util.tree_map(np.array, params)
        blind["params"]["cond_dense_0"]["kernel"][rows] = 0
        np.testing.assert_allclose(
            apply(blind, x, args["t"], args["latent"], args["onehot"]), apply(blind, x, t, latent, onehot),
            rtol=1e-6, atol=1e-6,
        )
    assert params["params"]["cond_dense_0"]["kernel"].shape == (6 + 3 + 16, 64)


def test_positional_time_embedding_of_the_clamped_scaled_time():
    decoder = _module(TINY_DECODER)
    x, _, latent, onehot = _decoder_inputs(3, 8, 6, 3, seed=5)
    t = jnp.asarray([0.25, 1.3, 0.999])  # 1.3 is clamped to 1
    params = ref.random_params(decoder, x, t, latent, onehot)
    _, state = decoder.apply(params, x, t, latent, onehot, capture_intermediates=lambda m, _: m.name == "cond_dense_0")
    scaled = np.clip(np.asarray(t, np.float64), 0, 1) * 999
    freqs = 10000.0 ** (-np.arange(8) / 7)
    temb = np.concatenate([np.sin(scaled[:, None] * freqs), np.cos(scaled[:, None] * freqs)], axis=1)
    cond = np.concatenate([np.asarray(latent), np.asarray(onehot), temb], axis=1)
    p = params["params"]["cond_dense_0"]
    expected = cond @ np.asarray(p["kernel"], np.float64) + p["bias"]
    np.testing.assert_allclose(state["intermediates"]["cond_dense_0"]["__call__"][0], expected, atol=1e-3)


def test_fourier_embedding_of_log_scaled_time_and_scale_by_sigma():
    decoder = _module(TINY_DECODER_256)
    x, t, latent, onehot = _decoder_inputs(2, 16, 6, 3, seed=6)
    params = ref.random_params(decoder, x, t, latent, onehot)
    params["params"]["time_fourier"]["frequencies"] = np.asarray(
        np.random.default_rng(7).normal(0, 16, 16), np.float32)
    capture = lambda module, _: module.name == "time_fourier"
    out, state = decoder.apply(params, x, t, latent, onehot, capture_intermediates=capture)
    w = np.asarray(params["params"]["time_fourier"]["frequencies"], np.float64)
    proj = 2 * np.pi * np.log(np.asarray(t, np.float64) * 999)[:, None] * w
    np.testing.assert_allclose(
        state["intermediates"]["time_fourier"]["__call__"][0], np.concatenate([np.sin(proj), np.cos(proj)], 1),
        atol=2e-3,
    )
    unscaled = _module(TINY_DECODER_256, scale_by_sigma=False).apply(params, x, t, latent, onehot)
    assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.asarray(unscaled) / (999 * np.asarray(t))[:, None, None, None], rtol=1e-5)


def test_plain_rectified_flow_decoder_takes_no_latent():
    decoder = _module(TINY_DECODER, latent_dim=0, num_classes=0)
    x, t, _, _ = _decoder_inputs(1, 8, 0, 0)
    params = jax.eval_shape(lambda: decoder.init(jax.random.key(0), x, t))
    assert params["params"]["cond_dense_0"]["kernel"].shape == (16, 64)
    with pytest.raises(ValueError, match="latent_dim=0"):
        decoder.init(jax.random.key(0), x, t, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="pass `latent`"):
        _module(TINY_DECODER).init(jax.random.key(0), x, t)


# ------------------------------------------------------------------------------------------------------------------
# Precision and rematerialisation
# ------------------------------------------------------------------------------------------------------------------


def _relative_error(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b))


def test_bfloat16_compute_is_close_to_float32():
    x = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    encoder32, encoder16 = _module(TINY_ENCODER), _module(TINY_ENCODER, dtype="bfloat16")
    params = ref.random_params(encoder32, x)
    anchors16 = encoder16.apply(params, x)
    assert anchors16.dtype == jnp.float32
    error = _relative_error(anchors16, encoder32.apply(params, x))
    assert 1e-5 < error < 3e-2  # really ran in bf16 (not bitwise f32), yet close

    inputs = _decoder_inputs(2, 8, 6, 3, seed=9)
    decoder32, decoder16 = _module(TINY_DECODER), _module(TINY_DECODER, dtype=jnp.bfloat16)
    params = ref.random_params(decoder32, *inputs)
    velocity16 = decoder16.apply(params, *inputs)
    assert velocity16.dtype == jnp.float32
    error = _relative_error(velocity16, decoder32.apply(params, *inputs))
    assert 1e-5 < error < 3e-2


def test_remat_gives_identical_values_and_gradients():
    x = jnp.asarray(np.random.default_rng(10).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    # Input conv + middle (ResBlock, attention, ResBlock): every kind of block with as few compilations as
    # possible; remat of dropout-carrying blocks compiles a random-bit kernel per block on CPU.
    config = dict(TINY_ENCODER, ch_mult=(1,), num_res_blocks=0, dropout=0.3)
    plain, remat = _module(config), _module(config, remat=True)
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
