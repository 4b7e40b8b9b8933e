"""The checks a run ends with, against a second path computed by hand from the same weights.

Tiny models (tests/train/tiny.py) on the embedded digits, fresh weights: what is checked is the batching, the keys,
the drop-last count and the feature extraction, not how good an untrained model is.
"""

import jax
import numpy as np
import pytest

from lzn_jax import data, evaluation, parallel
from lzn_jax.evaluation import end_of_training, probes
from lzn_jax.train.state import build_modules, encoder_input_channels, init_params
from tests.train import tiny


def _fresh(config):
    modules = build_modules(config)
    return modules, init_params(modules, config, jax.random.key(3))


def _test_images(config, channels):
    source = data.digits_source("test", image_size=config.data.image_size, num_channels=channels)
    records = [source[i] for i in range(len(source))]
    return np.stack([r["image"] for r in records]), np.array([r["label"] for r in records])


def test_classification_accuracy_equals_classifying_each_full_batch_by_hand():
    config = tiny.joint()
    config.train.accuracy_batch_size = 96  # 359 test digits: 3 full batches, 71 left out
    modules, params = _fresh(config)
    rng = jax.random.key(7)
    mesh = parallel.data_mesh(1)
    result = end_of_training.classification_accuracy(config, modules, params, rng, mesh)

    images, labels = _test_images(config, encoder_input_channels(config.data))
    table = modules.label_anchors.apply({"params": params["label_anchors"]})
    classify = jax.jit(lambda x, key: evaluation.classify(modules.encoder, params["encoder"], table, x, key))
    correct = 0
    for index in range(3):
        rows = slice(96 * index, 96 * (index + 1))
        key = jax.random.fold_in(jax.random.fold_in(rng, index), 2)
        correct += int(np.sum(np.asarray(classify(data.to_float_images(images[rows]), key)) == labels[rows]))
    assert result["eval/accuracy"] == correct / 288
    assert "288 of 359 examples in batches of 96" in result["eval/accuracy_protocol"]


def test_a_batch_larger_than_the_split_is_refused():
    config = tiny.joint()
    config.train.accuracy_batch_size = 400
    modules, params = _fresh(config)
    with pytest.raises(ValueError, match="accuracy_batch_size=400 exceeds the 359 examples"):
        end_of_training.classification_accuracy(config, modules, params, jax.random.key(0), parallel.data_mesh(1))


def test_eval_data_config_copies_frozen_and_mutable_configs_and_leaves_them_unchanged():
    import ml_collections

    config = tiny.joint()
    before = config.data.to_dict()
    for given in (config, ml_collections.FrozenConfigDict(config)):  # api.Model.config is frozen
        eval_data = end_of_training.eval_data_config(given, "test", 32)
        assert (eval_data.split, eval_data.batch_size, eval_data.augmentation) == ("test", 32, "none")
        eval_data.seed = 99  # mutable, and not an alias of the caller's block
    assert config.data.to_dict() == before


def test_representation_probes_use_every_record_of_both_splits_on_two_devices():
    config = tiny.contrastive()
    config.data.batch_size = 64  # 1438 training digits: the last batch is padding-masked, not dropped
    modules, params = _fresh(config)
    mesh = parallel.data_mesh(2)
    channels = encoder_input_channels(config.data)
    assert channels == 3  # two-view digits are seen as RGB; the probes must feed the same

    features, labels = end_of_training.encode_split(config, modules.encoder, params["encoder"], "test", mesh)
    images, expected_labels = _test_images(config, channels)
    expected = modules.encoder.apply({"params": params["encoder"]}, data.to_float_images(images))
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(features, np.asarray(expected), rtol=1e-4, atol=1e-5)

    result = end_of_training.representation_probes(config, modules, params, mesh)
    train_features, train_labels = end_of_training.encode_split(config, modules.encoder, params["encoder"], "train",
                                                                mesh)
    assert train_features.shape == (1438, config.latent_dim)
    assert result["eval/knn_accuracy"] == probes.knn_accuracy(train_features, train_labels, features, labels,
                                                              num_classes=10)
    assert result["eval/ridge_accuracy"] == probes.ridge_accuracy(train_features, train_labels, features, labels,
                                                                  num_classes=10)
    assert "1438 examples" in result["eval/knn_protocol"] and "(359)" in result["eval/ridge_protocol"]


def test_augmented_epoch_features_encode_one_fresh_view_of_every_training_record():
    config = tiny.contrastive()
    config.data.batch_size = 64
    modules, params = _fresh(config)
    mesh = parallel.data_mesh(2)
    epoch_features = end_of_training.augmented_epoch_features(config, modules.encoder, params["encoder"], mesh)
    first, first_labels = epoch_features(0)
    again, _ = epoch_features(0)
    second, second_labels = epoch_features(1)
    plain, plain_labels = end_of_training.encode_split(config, modules.encoder, params["encoder"], "train", mesh)

    # Every record once, in file order; a pass is a function of its epoch, and epochs draw different views.
    assert first.shape == plain.shape == (1438, config.latent_dim)
    np.testing.assert_array_equal(first_labels, plain_labels)
    np.testing.assert_array_equal(second_labels, plain_labels)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, second, atol=1e-3) and not np.allclose(first, plain, atol=1e-3)

    # By hand: the first view of each record of the augmented pass, unsharded, through the encoder.
    seed = end_of_training.augmentation_seed(config, 1)
    passes = data.build_eval_pipeline(end_of_training.eval_data_config(config, "train", 64, augmentation_seed=seed))
    views, masks = [], []
    for batch in passes:
        inputs = passes.to_model_inputs(batch)
        views.append(np.asarray(inputs["views"][:, 0]))
        masks.append(np.asarray(inputs["mask"]))
    views = np.concatenate(views)[np.concatenate(masks)]
    expected = modules.encoder.apply({"params": params["encoder"]}, views)
    np.testing.assert_allclose(second, np.asarray(expected), rtol=1e-4, atol=1e-5)
