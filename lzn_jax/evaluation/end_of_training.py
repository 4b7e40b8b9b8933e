"""The checks a training run ends with, each number returned with its protocol next to it.

* ``classification_accuracy``: a joint model's test accuracy (case study 3), transductive as in the paper.
* ``representation_probes``: weighted k-NN and closed-form ridge accuracy of a representation model's features
  (case study 2), training split -> test split.

Both read whole splits through ``data.build_eval_pipeline`` (every record once, padding masked out) and encode
with the EMA weights on the training mesh. They are meant for the small test splits and the fast checks; the
paper's full metrics (FID, the trained linear probe) are the other modules of this package.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from lzn_jax import data, parallel
from lzn_jax.evaluation import probes
from lzn_jax.evaluation.classification import classify


def eval_data_config(config: ml_collections.ConfigDict, split: str, batch_size: int, *,
                     augmentation_seed: int | None = None) -> ml_collections.ConfigDict:
    """``config.data`` read once in file order with the channels the encoder was trained on (two-view digits see the
    gray channel repeated as RGB): without augmentation, or, given ``augmentation_seed``, with the training
    augmentation drawn from that seed (record ``r`` of batch ``s`` draws from ``example_rng(seed, s, r)``)."""
    from lzn_jax.train.state import encoder_input_channels

    # A mutable copy, also of a frozen config (api.Model.config): the caller's config is never changed.
    frozen = isinstance(config.data, ml_collections.FrozenConfigDict)
    eval_data = ml_collections.ConfigDict(config.data) if frozen else copy.deepcopy(config.data)
    eval_data.num_channels = encoder_input_channels(config.data)
    eval_data.split = split
    if augmentation_seed is None:
        eval_data.augmentation = "none"
    else:
        eval_data.seed = int(augmentation_seed)
    eval_data.batch_size = batch_size
    return eval_data


def augmentation_seed(config: ml_collections.ConfigDict, epoch: int) -> int:
    """The data seed of the augmented pass number ``epoch`` (0, 1, ...): apart from the training order's seed and
    from every other epoch's."""
    return int(np.random.SeedSequence([int(config.data.seed), 0x9E0B, int(epoch)]).generate_state(1)[0])



def count_over_full_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, params: Any, rng: jax.Array,
                            batch_size: int, count_in) -> tuple[Any, int, int]:
    """Sums ``count_in(params, inputs, key)`` (a pytree of int counts) over the full batches of split
    ``train.accuracy_split``, the transductive protocol of the paper's accuracies.

    Each batch's latents are solved against that batch alone, so the batch size is part of the protocol; the last,
    partial batch is dropped (the reference's drop_last). Batch ``s`` draws from ``fold_in(fold_in(rng, s), 2)``,
    apart from the training and sampling draws. Returns ``(summed counts on the host, images classified, images in
    the split)``.
    """
    batches = data.build_eval_pipeline(eval_data_config(config, config.train.accuracy_split, batch_size),
                                       sharding=parallel.batch_sharding(mesh))
    full_batches = batches.num_examples // batch_size
    if full_batches == 0:
        raise ValueError(f"train.accuracy_batch_size={batch_size} exceeds the {batches.num_examples} examples of "
                         f"split {config.train.accuracy_split!r}; use a batch of at most that size")

    def counts(params, rng, batch, index):
        key = jax.random.fold_in(jax.random.fold_in(rng, index), 2)
        return count_in(params, batches.to_model_inputs(batch), key)

    jitted = parallel.jit_for_mesh(counts, mesh, out_shardings=jax.NamedSharding(mesh, jax.P()))
    total = None
    for index, batch in enumerate(batches):
        if index == full_batches:
            break
        batch_counts = jax.device_get(jitted(params, rng, batch, np.int32(index)))
        total = batch_counts if total is None else jax.tree.map(np.add, total, batch_counts)
    return total, full_batches * batch_size, batches.num_examples


def classification_accuracy(config: ml_collections.ConfigDict, modules, params: dict[str, Any], rng: jax.Array,
                            mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Accuracy of a joint model on split ``train.accuracy_split`` in full global batches of
    ``train.accuracy_batch_size`` (transductive, alpha 1, uniform class weights; :func:`count_over_full_batches`).
    ``params``: the EMA params; ``rng``: the run's key."""
    batch_size = int(config.train.accuracy_batch_size)

    def correct_in(params, inputs, key):
        table = modules.label_anchors.apply({"params": params["label_anchors"]})
        predicted = classify(modules.encoder, params["encoder"], table, inputs["image"], key)
        return (predicted == inputs["label"]).sum()

    correct, classified, count = count_over_full_batches(config, mesh, params, rng, batch_size, correct_in)
    return {"eval/accuracy": int(correct) / classified, "eval/accuracy_protocol":
            f"EMA weights, split {config.train.accuracy_split}, {classified} of {count} examples in "
            f"batches of {batch_size}, alpha 1, uniform class weights, DPM-Solver++ 20 + reverse Euler 100, nearest "
            "label anchor"}


def _split_batches(config: ml_collections.ConfigDict, split: str, mesh: jax.sharding.Mesh,
                   augmentation_seed: int | None):
    eval_data = eval_data_config(config, split, int(config.data.batch_size), augmentation_seed=augmentation_seed)
    return data.build_eval_pipeline(eval_data, sharding=parallel.batch_sharding(mesh))


def _feature_program(encoder, to_model_inputs, mesh: jax.sharding.Mesh):
    """``(encoder params, batch) -> (features (B, F) float32, labels (B,), mask (B,))``, jitted, replicated out."""

    def features_of(params, batch):
        inputs = to_model_inputs(batch)
        # A two-view record is two independent draws of the augmentation; one of them is this pass's view.
        images = inputs["views"][:, 0] if "views" in inputs else inputs["image"]
        output = encoder.apply({"params": params}, images, train=False)
        features = output.features if hasattr(output, "features") else output
        return features.astype("float32"), inputs["label"], inputs["mask"]

    return parallel.jit_for_mesh(features_of, mesh, out_shardings=jax.NamedSharding(mesh, jax.P()))


def _encode_batches(batches, program, encoder_params) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for batch in batches:
        batch_features, batch_labels, mask = jax.device_get(program(encoder_params, batch))
        features.append(batch_features[mask])
        labels.append(batch_labels[mask])
    return np.concatenate(features), np.concatenate(labels)


def encode_split(config: ml_collections.ConfigDict, encoder, encoder_params, split: str,
                 mesh: jax.sharding.Mesh, *, augmentation_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, F) float32 and labels (N,) of every record of ``split``, on the host, in file order.

    ResNet encoders give their pooled backbone features (what the paper probes); encoders without a backbone
    output give their anchors. Batches of ``config.data.batch_size`` over the mesh, padding dropped.

    augmentation_seed: None encodes the plain evaluation view. An int encodes one view per record under the
      training augmentation (``config.data.augmentation``; of a two-view augmentation, the first view) drawn from
      that seed.
    """
    batches = _split_batches(config, split, mesh, augmentation_seed)
    return _encode_batches(batches, _feature_program(encoder, batches.to_model_inputs, mesh), encoder_params)


def augmented_epoch_features(config: ml_collections.ConfigDict, encoder, encoder_params,
                             mesh: jax.sharding.Mesh) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """``epoch -> (features (N, F), labels (N,))`` of split ``data.split`` with one freshly augmented view per record
    (:func:`encode_split` with ``augmentation_seed(config, epoch)``): the training features of a linear probe
    trained with data augmentation, as the paper's main ImageNet probe is. The program compiles once."""
    program = None

    def epoch_features(epoch: int) -> tuple[np.ndarray, np.ndarray]:
        nonlocal program
        batches = _split_batches(config, config.data.split, mesh, augmentation_seed(config, epoch))
        if program is None:
            program = _feature_program(encoder, batches.to_model_inputs, mesh)
        return _encode_batches(batches, program, encoder_params)

    return epoch_features


class SplitFeatures(NamedTuple):
    """Encoder features of the fitting split (``data.split``) and of the scoring split (``train.accuracy_split``):
    features (N, F) float32 and labels (N,), on the host."""

    train_features: np.ndarray
    train_labels: np.ndarray
    test_features: np.ndarray
    test_labels: np.ndarray

    @property
    def num_classes(self) -> int:
        """The classes are the labels seen."""
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1


def split_features(config: ml_collections.ConfigDict, encoder, encoder_params,
                   mesh: jax.sharding.Mesh) -> SplitFeatures:
    """:func:`encode_split` of the fitting and the scoring split: what every probe reads."""
    train = encode_split(config, encoder, encoder_params, config.data.split, mesh)
    test = encode_split(config, encoder, encoder_params, config.train.accuracy_split, mesh)
    return SplitFeatures(*train, *test)


def representation_probes(config: ml_collections.ConfigDict, modules, params: dict[str, Any],
                          mesh: jax.sharding.Mesh, *, weights: str = "EMA weights",
                          features: SplitFeatures | None = None,
                          knn: probes.KnnOptions = probes.KnnOptions(),
                          ridge: probes.RidgeOptions = probes.RidgeOptions()) -> dict[str, Any]:
    """k-NN and ridge accuracy of the encoder's features: fitted on split ``data.split`` (no augmentation),
    scored on split ``train.accuracy_split``. ``params``: whose encoder to probe (the protocol calls them
    ``weights``); ``features``: their :func:`split_features` when the caller has them already."""
    if features is None:
        features = split_features(config, modules.encoder, params["encoder"], mesh)
    train_x, train_y, test_x, test_y = features
    where = (f"{weights}, fitted on split {config.data.split} ({len(train_y)} examples, no augmentation), "
             f"scored on split {config.train.accuracy_split} ({len(test_y)}), {train_x.shape[1]}-d features")
    return {
        "eval/knn_accuracy": probes.knn_accuracy(train_x, train_y, test_x, test_y,
                                                 num_classes=features.num_classes, options=knn),
        "eval/knn_protocol": f"{knn.describe()}; {where}",
        "eval/ridge_accuracy": probes.ridge_accuracy(train_x, train_y, test_x, test_y,
                                                     num_classes=features.num_classes, options=ridge),
        "eval/ridge_protocol": f"{ridge.describe()}; {where}",
    }
