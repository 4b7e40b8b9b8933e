"""``optim.apply_gradients`` against a float64 NumPy re-implementation of the optimisation of docs/method.md ("Training recipes in brief") and docs/design.md ("Training"), on a tiny params tree.

The reference below is written from that description, not from the code: per-module Adam (eps outside the square root),
torch's LinearLR warm-up ``lr * (f + (1 - f) * s / W)`` with ``s`` the module's successful updates so far, torch's
clipping scale ``min(1, c / (norm + 1e-6))`` over the unfrozen modules only, the per-module EMA with
``d = min(decay, (1 + n) / (10 + n))`` after the ``n``-th update, frozen modules and the Fourier frequencies untouched,
and a whole update skipped (schedule and EMA included) when the loss or the gradient norm is not finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from lzn_jax.train import optim, vectors
from lzn_jax.train.state import TrainState

LR = {"encoder": 1e-2, "decoder": 3e-2, "label_anchors": 5e-2}
DECAY = {"encoder": 0.9, "decoder": 0.999, "label_anchors": 0.2}  # 0.2: min() picks the decay from n = 2 on
ITERATIONS = {"encoder": 5, "decoder": 2, "label_anchors": 5}  # the decoder's stage ends after two steps
WARMUP, FACTOR, CLIP, B1, B2, EPS = 4, 0.25, 1.0, 0.9, 0.999, 1e-8
SHAPES = {
    "encoder": {"dense": {"kernel": (3, 2), "bias": (2,)}},
    "decoder": {"conv": {"kernel": (2, 2)}, "time_fourier": {"frequencies": (4,)}},
    "label_anchors": {"anchors": (3, 2)},
}


def config():
    c = common.base_config()
    c.optim.learning_rate = common.per_module(**LR)
    for module, count in ITERATIONS.items():
        c.optim.num_iterations[module] = count
    c.optim.warmup_steps = WARMUP
    c.optim.warmup_init_factor = FACTOR
    c.optim.grad_clip_norm = CLIP
    c.ema.decay = common.per_module(**DECAY)
    return c


def is_constant(path: tuple[str, ...]) -> bool:
    return path[-1] == "frequencies"


def flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    """``{(module, ..., leaf name): float64 array}``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): np.asarray(leaf, np.float64) for path, leaf in leaves}


def random_tree(rng, scale: dict[str, float]) -> dict:
    return jax.tree_util.tree_map_with_path(
        lambda path, shape: np.float32(scale[path[0].key]) * rng.standard_normal(shape).astype(np.float32),
        SHAPES, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x),
    )


# Five updates: clipped; not clipped; a NaN loss (skipped); the decoder frozen with NaN gradients (which must neither
# count in the norm nor stop the update) and a huge frequency gradient; an infinite encoder gradient (skipped).
def updates(rng):
    calls = []
    calls.append((1.0, random_tree(rng, {"encoder": 1.0, "decoder": 1.0, "label_anchors": 1.0})))
    calls.append((1.0, random_tree(rng, {"encoder": 0.05, "decoder": 0.05, "label_anchors": 0.05})))
    calls.append((float("nan"), random_tree(rng, {"encoder": 0.1, "decoder": 0.1, "label_anchors": 0.1})))
    grads = random_tree(rng, {"encoder": 0.1, "decoder": 1.0, "label_anchors": 0.1})
    grads["decoder"]["conv"]["kernel"][0, 0] = np.nan
    calls.append((1.0, grads))
    grads = random_tree(rng, {"encoder": 0.1, "decoder": 0.1, "label_anchors": 0.1})
    grads["encoder"]["dense"]["bias"][1] = np.inf
    calls.append((1.0, grads))
    for _, grads in calls:  # the frequencies get a large gradient every time; it must be ignored
        grads["decoder"]["time_fourier"]["frequencies"][:] = 1e3
    return calls


class Reference:
    """The described optimisation step in float64."""

    def __init__(self, params):
        self.params = flat(params)
        self.ema = dict(self.params)
        self.mu = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.nu = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.adam_count = dict.fromkeys(LR, 0)  # successful updates per module (Adam's t and the warm-up's s)
        self.ema_count = dict.fromkeys(LR, 0)
        self.step = self.skipped = self.consecutive = 0

    def learning_rate(self, module: str) -> float:
        s = min(self.adam_count[module], WARMUP)
        return LR[module] * (FACTOR + (1 - FACTOR) * s / WARMUP)

    def apply(self, loss: float, grads) -> float:
        grads = flat(grads)
        enabled = {m: self.step < ITERATIONS[m] for m in LR}
        trainable = [k for k in grads if enabled[k[0]] and not is_constant(k)]
        norm = float(np.sqrt(sum(np.sum(grads[k] ** 2) for k in trainable)))
        self.step += 1
        if not (np.isfinite(loss) and np.isfinite(norm)):
            self.skipped += 1
            self.consecutive += 1
            return norm
        self.consecutive = 0
        scale = min(1.0, CLIP / (norm + 1e-6))
        for module in LR:
            if not enabled[module]:
                continue
            lr = self.learning_rate(module)
            self.adam_count[module] += 1
            t = self.adam_count[module]
            self.ema_count[module] += 1
            n = self.ema_count[module]
            d = min(DECAY[module], (1 + n) / (10 + n))
            for k in [k for k in trainable if k[0] == module]:
                g = grads[k] * scale
                self.mu[k] = B1 * self.mu[k] + (1 - B1) * g
                self.nu[k] = B2 * self.nu[k] + (1 - B2) * g**2
                mu_hat, nu_hat = self.mu[k] / (1 - B1**t), self.nu[k] / (1 - B2**t)
                self.params[k] = self.params[k] - lr * mu_hat / (np.sqrt(nu_hat) + EPS)
                self.ema[k] = self.ema[k] - (1 - d) * (self.ema[k] - self.params[k])
        return norm


def adam_moments(opt_state, params, module: str, as_vector: bool):
    """(mu, nu, count) of ``module``'s Adam, as ``{leaf path: array}`` of that module's (non-constant) leaves: its
    moments are laid out as ``vectors.pack`` lays out the params (one vector, or the leaves)."""
    adam = opt_state.inner_states[module].inner_state[0]

    def as_leaves(packed):
        tree = vectors.unpack(params[module], packed, as_vector)
        return {(module, *path): value for path, value in flat(tree).items() if not is_constant((module, *path))}

    return as_leaves(adam.mu[module]), as_leaves(adam.nu[module]), int(adam.count)


# 0: every module leaf by leaf; the default: these tiny modules as one vector each (vectors.py).
@pytest.mark.parametrize("max_size", [0, common.base_config().optim.vector_update_max_size])
def test_apply_gradients_matches_a_float64_reference(max_size):
    cfg = config()
    cfg.optim.vector_update_max_size = max_size
    rng = np.random.default_rng(0)
    params = random_tree(rng, {"encoder": 1.0, "decoder": 1.0, "label_anchors": 1.0})
    optimizer = optim.make_optimizer(cfg, tuple(LR))
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=jax.tree.map(jnp.asarray, params), opt_state=optimizer.init(vectors.pack_params(params, max_size)),
                       ema_params=jax.tree.map(jnp.asarray, params), ema_counts=dict.fromkeys(LR, zero),
                       rng=jax.random.key(0), skipped_updates=zero, consecutive_skips=zero)
    apply = jax.jit(lambda s, g, loss: optim.apply_gradients(s, g, loss, optimizer=optimizer, config=cfg))
    reference = Reference(params)

    for index, (loss, grads) in enumerate(updates(rng)):
        expected_lrs = {m: reference.learning_rate(m) for m in LR}
        np.testing.assert_allclose([optim.learning_rates(state, cfg)[m] for m in LR],
                                   [expected_lrs[m] for m in LR], rtol=1e-6, err_msg=f"update {index}")
        state, metrics = apply(state, grads, jnp.float32(loss))
        norm = reference.apply(loss, grads)
        where = f"after update {index}"

        if np.isfinite(norm):
            np.testing.assert_allclose(float(metrics["train/grad_norm"]), norm, rtol=1e-5, err_msg=where)
        else:
            assert not np.isfinite(float(metrics["train/grad_norm"])), where
        assert float(metrics["train/skipped"]) == float(not (np.isfinite(loss) and np.isfinite(norm))), where
        assert int(state.step) == reference.step, where
        assert int(state.skipped_updates) == reference.skipped, where
        assert int(state.consecutive_skips) == reference.consecutive, where
        assert {m: int(c) for m, c in state.ema_counts.items()} == reference.ema_count, where

        got_params, got_ema = flat(state.params), flat(state.ema_params)
        for key, value in reference.params.items():
            np.testing.assert_allclose(got_params[key], value, rtol=2e-6, atol=1e-7, err_msg=f"params {key} {where}")
            np.testing.assert_allclose(got_ema[key], reference.ema[key], rtol=2e-6, atol=1e-7,
                                       err_msg=f"ema {key} {where}")
        for module in LR:
            mu, nu, count = adam_moments(state.opt_state, state.params, module, max_size > 0)
            assert count == reference.adam_count[module], (module, where)
            assert sorted(mu) == sorted(k for k in reference.mu if k[0] == module and not is_constant(k)), module
            for key in mu:
                np.testing.assert_allclose(mu[key], reference.mu[key], rtol=1e-5, atol=1e-9,
                                           err_msg=f"mu {key} {where}")
                np.testing.assert_allclose(nu[key], reference.nu[key], rtol=1e-5, atol=1e-12,
                                           err_msg=f"nu {key} {where}")

    # The whole history once more, in words: two skips, the last one now; the decoder stopped after two updates.
    assert reference.skipped == 2 and reference.consecutive == 1
    assert reference.adam_count == {"encoder": 3, "decoder": 2, "label_anchors": 3}
    # The frequencies never moved, and their EMA is the parameter itself.
    key = ("decoder", "time_fourier", "frequencies")
    np.testing.assert_array_equal(flat(state.params)[key], flat(params)[key])
    np.testing.assert_array_equal(flat(state.ema_params)[key], flat(params)[key])


@pytest.mark.parametrize("norm", [0.5, 3.0])
def test_clip_by_global_norm_is_torchs(norm):
    grads = {"a": jnp.full((4,), norm / 2.0, jnp.float32)}  # global norm = norm
    clipped, got = optim.clip_by_global_norm(grads, 1.0)
    np.testing.assert_allclose(float(got), norm, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(clipped["a"]), np.full(4, norm / 2.0 * min(1.0, 1.0 / (norm + 1e-6))),
                               rtol=1e-6)


def test_packing_leaves_out_the_constants_and_unpacks_exactly():
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.asarray, random_tree(rng, {"encoder": 1.0, "decoder": 1.0, "label_anchors": 1.0}))
    leaves = flat(params)
    for as_vector in (True, False):
        packed = vectors.pack_params(params, 10**9 if as_vector else 0)
        for module in LR:
            trainable = [leaves[k] for k in sorted(leaves)  # jax.tree.leaves order: sorted keys
                         if k[0] == module and not is_constant(k)]
            if as_vector:
                (vector,) = packed[module]
                np.testing.assert_array_equal(np.asarray(vector, np.float64), np.concatenate([t.ravel() for t in trainable]))
            else:
                assert [np.asarray(a, np.float64).tolist() for a in packed[module]] == [t.tolist() for t in trainable]
        back = {m: vectors.unpack(params[m], jax.tree.map(lambda a: a + 1.0, packed[m]), as_vector) for m in LR}
        for key, value in flat(back).items():
            np.testing.assert_array_equal(value, leaves[key] if is_constant(key) else np.float32(leaves[key]) + 1.0)
    assert vectors.trainable_size(params["decoder"]) == 4  # the 2x2 kernel; the 4 frequencies are not counted
    with pytest.raises(ValueError, match="is not the vector of a tree of 4 trainable values"):
        vectors.unpack(params["decoder"], [jnp.zeros(5)], True)
    with pytest.raises(TypeError, match="pass vectors.pack_params"):
        optim.make_optimizer(config(), tuple(LR)).init(params)
