"""The trained linear probe: near-perfect on linearly separable features, chance on shuffled labels, one epoch equal
to a hand-written optax loop, the same on a 4-device mesh, PyTorch's init, and a per-epoch features callback."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lzn_jax import parallel
from lzn_jax.evaluation import linear_probe

NUM_CLASSES, FEATURES = 10, 16


def _separable(seed, rows):
    """Features (rows, 16): a class centre of norm 4 plus unit noise, well apart; labels (rows,)."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.linalg.qr(np.random.default_rng(99).standard_normal((FEATURES, FEATURES)))[0][:NUM_CLASSES]
    labels = rng.integers(0, NUM_CLASSES, rows)
    return (centres[labels] + 0.5 * rng.standard_normal((rows, FEATURES))).astype(np.float32), labels.astype(np.int32)


OPTIONS = linear_probe.LinearProbeOptions(learning_rate=3e-2, batch_size=64, num_epochs=8)


def test_separable_features_are_learned_and_shuffled_labels_stay_at_chance():
    train_x, train_y = _separable(0, 1024)
    val_x, val_y = _separable(1, 1000)
    result = linear_probe.train_linear_probe(train_x, train_y, val_x, val_y, num_classes=NUM_CLASSES,
                                             key=jax.random.key(0), options=OPTIONS)
    assert len(result.history) == 8 and result.history[-1]["epoch"] == 8
    assert result.history[-1]["val_top1"] >= 0.99 and result.history[-1]["val_top5"] == 1.0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert "fixed training features (no augmentation)" in result.protocol and "batch 64" in result.protocol

    shuffled = np.random.default_rng(2).permutation(train_y)
    chance = linear_probe.train_linear_probe(train_x, shuffled, val_x, val_y, num_classes=NUM_CLASSES,
                                             key=jax.random.key(0), options=OPTIONS)
    assert abs(chance.history[-1]["val_top1"] - 0.1) < 0.05  # 1000 rows: the standard error of chance is 0.01
    assert abs(chance.history[-1]["val_top5"] - 0.5) < 0.08


def test_one_epoch_is_the_hand_written_optax_loop_and_the_mesh_changes_nothing():
    train_x, train_y = _separable(3, 300)  # 4 full batches of 64; 44 rows dropped
    val_x, val_y = _separable(4, 50)  # not a multiple of 4: padded on the mesh, the padding not counted
    options = OPTIONS.replace(num_epochs=1)
    key = jax.random.key(5)
    result = linear_probe.train_linear_probe(train_x, train_y, val_x, val_y, num_classes=NUM_CLASSES, key=key,
                                             options=options)

    params = linear_probe.init_probe(jax.random.fold_in(key, 0), FEATURES, NUM_CLASSES)
    optimizer = optax.adamw(3e-2, weight_decay=0.0)
    state = optimizer.init(params)
    order = np.asarray(linear_probe.epoch_order(jax.random.fold_in(jax.random.fold_in(key, 1), 0), 300, 64))
    assert order.shape == (4, 64) and len(set(order.ravel())) == 256
    losses = []
    def loss_fn(p, x, y):
        logits = x @ p["kernel"] + p["bias"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(64), y])

    for rows in order:
        loss, grads = jax.value_and_grad(loss_fn)(params, train_x[rows], train_y[rows])
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), result.params, params)
    assert result.history[0]["train_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    logits = val_x @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    assert result.history[0]["val_top1"] == np.mean(np.argmax(logits, -1) == val_y)
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert result.history[0]["val_top5"] == np.mean((top5 == val_y[:, None]).any(-1))

    sharded = linear_probe.train_linear_probe(train_x, train_y, val_x, val_y, num_classes=NUM_CLASSES, key=key,
                                              options=options, mesh=parallel.data_mesh(4))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded.params, result.params)
    assert sharded.history[0]["val_top1"] == result.history[0]["val_top1"]


def test_init_is_pytorchs_and_the_callback_supplies_each_epochs_features():
    params = linear_probe.init_probe(jax.random.key(0), 2048, 1000)
    assert params["kernel"].shape == (2048, 1000) and params["bias"].shape == (1000,)
    bound = 1 / np.sqrt(2048)
    assert np.abs(params["kernel"]).max() <= bound and np.abs(params["kernel"]).max() > 0.99 * bound
    assert np.abs(params["bias"]).max() <= bound and np.std(params["bias"]) > 0.5 * bound

    train_x, train_y = _separable(6, 128)
    calls = []

    def views(epoch):
        calls.append(epoch)
        return train_x + 0.01 * epoch, train_y

    options = linear_probe.LinearProbeOptions(learning_rate=3e-2, batch_size=64, num_epochs=3)
    result = linear_probe.train_linear_probe(np.zeros_like(train_x), train_y, train_x, train_y,
                                             num_classes=NUM_CLASSES, key=jax.random.key(1), options=options,
                                             epoch_features=views)
    assert calls == [0, 1, 2]
    assert result.history[-1]["val_top1"] > 0.5  # trained on the callback's features, not the zeros
    assert "re-extracted every epoch" in result.protocol

    with pytest.raises(ValueError, match="exceeds the 128 training rows"):
        linear_probe.train_linear_probe(train_x, train_y, train_x, train_y, num_classes=NUM_CLASSES,
                                        key=jax.random.key(1), options=options.replace(batch_size=256))
    with pytest.raises(ValueError, match="divisible by the 3 devices"):
        linear_probe.train_linear_probe(train_x, train_y, train_x, train_y, num_classes=NUM_CLASSES,
                                        key=jax.random.key(1), options=options, mesh=parallel.data_mesh(3))
