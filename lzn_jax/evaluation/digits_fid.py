"""Digits-FID: the Fréchet distance between Gaussians fitted to features of a small CNN trained on the embedded
scikit-learn digits (``lzn_jax.data.digits``, 16x16x1) and then frozen, for comparing generative models on them.

Why not the FID Inception network: it was trained on 299x299 natural RGB photographs, so a 16x16 gray digit, upsampled
and repeated to three channels, is far from anything it was trained on, and its 2048 features were not made to tell
such digits, or good ones from bad ones, apart. A classifier trained on the digits themselves has features that
separate exactly what matters here (digit identity, stroke shape, sharpness), and with only 64 of them about a
thousand samples estimate the covariance well; it is also small enough to train in seconds and run anywhere.

Protocol: the classifier (:class:`DigitsClassifier`) is trained once (:func:`train_classifier`, fixed seed, no
dropout, batch norm or augmentation, so its features are a deterministic function of the pixels), saved
(:func:`save_classifier`) and loaded by every run that is compared (:func:`load_classifier`); digits-FIDs from
different classifiers are not comparable. Training twice gives the same params on one machine and XLA setup; under
another setup (8 forced host devices instead of 1, here) the sanity numbers below moved in their third digit, so
share the saved classifier rather than retraining it. Images go through :func:`features`, which quantises float
images to uint8 exactly as samples are written to disk, the reference is the train split
(:func:`reference_statistics`), and
:func:`digits_fid` is ``metrics.frechet_distance`` of the two feature statistics. Like FID it is biased upwards at
small sample counts: compare models at the same number of samples.

Measured 2026-11-29 on 2 CPU cores shared with other jobs (load ~4.5; jax 0.12.0; the defaults: seed 0, 250 steps
of batch 128, about 22 epochs, Adam 1e-3 cosine-decayed to 0) with ``.venv/bin/python -c "from lzn_jax.evaluation
import digits_fid as d; c = d.train_classifier(); print(c.train_accuracy, c.test_accuracy, d.sanity_check(c))"``:
training 21 s (compilation included), train accuracy 100.0%, test accuracy 97.8% (351 of 359). :func:`sanity_check`
against the train statistics, 359 images each: real test split 4.06; blurred (sigma 1 pixel) 58.5 (14x); Gaussian
noise of std 0.3, 11.15 (2.7x), of std 0.6, 43.6 (11x); uniform noise images 744 (183x). The real test split's 4.06
is about the floor at 359 samples: 359 random train digits, which the reference itself contains, score 4-10 with
this and similar classifiers. Noise of std 0.3 costs less than blur, probably because a classifier learns to
look past pixel-level noise; other recipes we tried (ReLU features, 100-300 steps, learning rates 1e-3 and 3e-3, 128
features) gave 1.8-3.3x for it and 12-15x for the blur.
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.ndimage
from flax import serialization

from lzn_jax import parallel
from lzn_jax.data.device import to_float_images
from lzn_jax.data.digits import NUM_CLASSES, load_digits_split
from lzn_jax.evaluation import metrics
from lzn_jax.sampling.grids import to_uint8

Params = Any
IMAGE_SHAPE = (16, 16, 1)
# Few enough dimensions that the ~1,000 samples of an experiment estimate a (64, 64) covariance well.
FEATURE_DIM = 64
# Rows per forward pass of :func:`features`; the last batch is zero-padded so that one compiled program serves all.
EVAL_BATCH = 512
FILE_FORMAT = 1
# Negative slope of the features' leaky ReLU (see DigitsClassifier).
FEATURE_SLOPE = 0.1
# The sanity check's corruptions (pixel units of the 16x16 images; [-1, 1] units for the noise).
BLUR_SIGMA = 1.0
NOISE_STD = 0.3
HEAVY_NOISE_STD = 0.6
SANITY_SEED = 0


class DigitsClassifier(nn.Module):
    """A small CNN: (B, 16, 16, 1) float in [-1, 1] -> ``(logits (B, 10), features (B, num_features))``.

    conv3x3(32)-relu, conv3x3(64, stride 2)-relu (8x8), conv3x3(64, stride 2)-relu (4x4), flatten, dense(64)-leaky
    relu (slope 0.1) = features, dense(10) = logits. The features' nonlinearity is leaky because with a plain ReLU
    15-20 of the 64 units were dead (zero on every train digit) in our trainings: an exactly singular reference
    covariance, a SciPy "singular matrix" warning at every distance and only ~45 dimensions left. Full float32
    products everywhere: GPUs would otherwise use TF32 and TPUs bfloat16 passes, and the features should not depend
    on the machine more than rounding makes them.
    """

    num_features: int = FEATURE_DIM
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        precision = jax.lax.Precision.HIGHEST
        x = nn.relu(nn.Conv(32, (3, 3), precision=precision)(images))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2, precision=precision)(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2, precision=precision)(x))
        x = x.reshape(x.shape[0], -1)
        features = nn.leaky_relu(nn.Dense(self.num_features, precision=precision)(x), FEATURE_SLOPE)
        return nn.Dense(self.num_classes, precision=precision)(features), features


class FrozenClassifier(NamedTuple):
    """A trained :class:`DigitsClassifier`: ``params`` and its top-1 accuracies on the digits train and test splits."""

    params: Params
    train_accuracy: float
    test_accuracy: float


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def batch_order(seed: int, num_rows: int, batch_size: int, steps: int) -> np.ndarray:
    """Row indices (steps, batch_size) int32: consecutive epochs, each a fresh permutation of ``num_rows`` (NumPy
    generator ``seed``) cut into full batches, the incomplete rest of each epoch dropped."""
    if not 1 <= batch_size <= num_rows:
        raise ValueError(f"batch_size must be in [1, {num_rows}], got {batch_size}")
    rng = np.random.default_rng(seed)
    per_epoch = num_rows // batch_size
    epochs = -(-steps // per_epoch)
    batches = [rng.permutation(num_rows)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
               for _ in range(epochs)]
    return np.concatenate(batches)[:steps].astype(np.int32)


def classifier_loss(params: Params, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of the classifier on float images (B, 16, 16, 1) in [-1, 1] with labels (B,)."""
    logits, _ = DigitsClassifier().apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# Compiled once per recipe and platform. The loop over steps stays in Python: XLA:CPU ran the same step ~20x slower
# inside a ``lax.scan`` (1.7 s against 80 ms per step of batch 128, measured 2026-11-29), so only the step is jitted.
@functools.lru_cache(maxsize=8)
def _jitted_step(learning_rate: float, steps: int, platform: str):
    """``(optimizer, step)``: Adam with ``learning_rate`` cosine-decayed to 0 over ``steps``, and ``(params,
    opt_state, images uint8 (B, 16, 16, 1), labels (B,)) -> (params, opt_state)`` jitted, the old state donated."""
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

    def step(params, opt_state, images, labels):
        grads = jax.grad(classifier_loss)(params, to_float_images(images), labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return optimizer, jax.jit(step, donate_argnums=(0, 1), compiler_options=parallel.compiler_options(platform))


def train_classifier(*, seed: int = 0, steps: int = 250, batch_size: int = 128,
                     learning_rate: float = 1e-3) -> FrozenClassifier:
    """Trains :class:`DigitsClassifier` on the digits train split and scores it on both splits.

    Adam with a cosine decay of ``learning_rate`` to 0 over ``steps``, cross-entropy, no augmentation. ``seed`` fixes
    the init (``jax.random.key(seed)``) and the batch order (:func:`batch_order`), so the same arguments on the same
    platform give the same params.
    """
    images, labels = load_digits_split("train")
    optimizer, step = _jitted_step(float(learning_rate), int(steps), jax.default_backend())
    params = DigitsClassifier().init(jax.random.key(seed), jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))["params"]
    opt_state = optimizer.init(params)
    for rows in batch_order(seed, len(labels), batch_size, steps):
        params, opt_state = step(params, opt_state, images[rows], labels[rows])
    params = jax.device_get(params)
    return FrozenClassifier(params, accuracy(params, "train"), accuracy(params, "test"))


# ----------------------------------------------------------------------------------------------------------------
# Features and the Fréchet distance
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _jitted_forward(platform: str):
    """``(params, images uint8 (EVAL_BATCH, 16, 16, 1)) -> (logits, features)`` float32, jitted."""

    def forward(params, images):
        return DigitsClassifier().apply({"params": params}, to_float_images(images))

    return jax.jit(forward, compiler_options=parallel.compiler_options(platform))


def quantize(images) -> np.ndarray:
    """Images (N, 16, 16, 1) as the uint8 pixels the classifier sees: uint8 unchanged, floats in [-1, 1] clipped and
    rounded to the nearest of the 256 levels (``sampling.to_uint8``, what sample files store)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"digits-FID needs images (N, {', '.join(map(str, IMAGE_SHAPE))}), got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"digits-FID needs uint8 images or float images in [-1, 1], got dtype {images.dtype}")
    # Real digits only ever take the 256 uint8 levels; a generator's floats take any value, and the network would
    # see that difference (out-of-range pixels, sub-level noise) where a saved sample or a viewer would not. Sending
    # both through the same quantisation makes the comparison about the images, not about how they were stored.
    return to_uint8(images)


def _forward(params: Params, images) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 10) and features (N, F), float32, in batches of EVAL_BATCH rows of :func:`quantize`d images."""
    images = quantize(images)
    forward = _jitted_forward(jax.default_backend())
    logits, features = [], []
    for start in range(0, images.shape[0], EVAL_BATCH):
        batch = images[start : start + EVAL_BATCH]
        padded = np.zeros((EVAL_BATCH, *IMAGE_SHAPE), np.uint8)
        padded[: batch.shape[0]] = batch
        batch_logits, batch_features = jax.device_get(forward(params, padded))
        logits.append(batch_logits[: batch.shape[0]])
        features.append(batch_features[: batch.shape[0]])
    if not logits:
        return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(logits), np.concatenate(features)


def accuracy(params: Params, split: str) -> float:
    """Top-1 accuracy of the classifier on a digits split (``"train"``, ``"test"``, ``"all"``)."""
    images, labels = load_digits_split(split)
    logits, _ = _forward(params, images)
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def features(classifier: FrozenClassifier, images) -> np.ndarray:
    """Penultimate-layer features (N, 64) float64 of images (N, 16, 16, 1): uint8, or float in [-1, 1] (clipped and
    quantised to uint8 first, see :func:`quantize`)."""
    return _forward(classifier.params, images)[1].astype(np.float64)


def reference_statistics(classifier: FrozenClassifier, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Mean (64,) and covariance (64, 64), float64, of the features of a real digits split."""
    return metrics.feature_statistics(features(classifier, load_digits_split(split)[0]))


def digits_fid(classifier: FrozenClassifier, images, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance between the features of ``images`` (N >= 2, 16, 16, 1; see :func:`features`) and the
    ``reference`` statistics ``(mu, sigma)`` from :func:`reference_statistics`."""
    return fid_of_features(features(classifier, images), reference)


def fid_of_features(image_features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """:func:`digits_fid` of features (N >= 2, 64) already computed by :func:`features`."""
    return metrics.frechet_distance(*metrics.feature_statistics(image_features), *reference)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def save_classifier(classifier: FrozenClassifier, path: str | os.PathLike) -> None:
    """Writes the classifier as msgpack, whole or not at all (a temporary file beside ``path``, renamed into place)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FILE_FORMAT, "params": jax.device_get(classifier.params),
        "train_accuracy": float(classifier.train_accuracy), "test_accuracy": float(classifier.test_accuracy),
    }
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as out:
        try:
            out.write(serialization.msgpack_serialize(state))
        except BaseException:
            os.unlink(out.name)
            raise
    os.replace(out.name, path)


def _expected_shapes() -> dict:
    """The parameter tree of :class:`DigitsClassifier` as nested dicts of shape tuples."""
    shapes = jax.eval_shape(DigitsClassifier().init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))
    return jax.tree.map(lambda leaf: tuple(leaf.shape), serialization.to_state_dict(shapes["params"]))


def load_classifier(path: str | os.PathLike) -> FrozenClassifier:
    """Reads a classifier written by :func:`save_classifier`, checking that its parameters fit
    :class:`DigitsClassifier`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no digits-FID classifier at {path}: train one with train_classifier() and write it "
                                "with save_classifier()")
    try:
        state = serialization.msgpack_restore(path.read_bytes())
    except Exception as error:
        raise ValueError(f"{path} is not a digits-FID classifier file (msgpack): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FILE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: digits-FID classifier file format {found!r}, expected {FILE_FORMAT}")
    params = state["params"]
    found = jax.tree.map(lambda leaf: tuple(np.shape(leaf)), params)
    expected = _expected_shapes()
    if found != expected:
        raise ValueError(f"{path}: the parameters do not fit DigitsClassifier (num_features={FEATURE_DIM}); "
                         f"expected shapes {expected}, found {found}")
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)
    return FrozenClassifier(params, float(state["train_accuracy"]), float(state["test_accuracy"]))


# ----------------------------------------------------------------------------------------------------------------
# Sanity check
# ----------------------------------------------------------------------------------------------------------------


def sanity_check(classifier: FrozenClassifier,
                 reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """Digits-FIDs against ``reference`` (default: the train split's statistics) of the real test split and of four
    corruptions of it, each as many images as the test split (359):

      ``real_test``: the test split as stored (a good generator's floor at this sample count);
      ``blurred_test``: Gaussian blur of sigma BLUR_SIGMA pixels (mirror edges), i.e. over-smooth samples;
      ``noised_test``: plus Gaussian noise of std NOISE_STD in [-1, 1] units, clipped, i.e. unfinished samples;
      ``heavily_noised_test``: the same with std HEAVY_NOISE_STD;
      ``uniform_noise``: independent uniform pixels in [-1, 1], i.e. no digits at all.

    The noise is drawn from ``numpy.random.default_rng(SANITY_SEED)``, so the numbers are reproducible.
    """
    reference = reference_statistics(classifier) if reference is None else reference
    test = np.asarray(to_float_images(load_digits_split("test")[0]))
    rng = np.random.default_rng(SANITY_SEED)
    corrupted = {
        "real_test": test,
        "blurred_test": scipy.ndimage.gaussian_filter(test, sigma=(0, BLUR_SIGMA, BLUR_SIGMA, 0), mode="mirror"),
        "noised_test": np.clip(test + NOISE_STD * rng.standard_normal(test.shape), -1.0, 1.0),
        "heavily_noised_test": np.clip(test + HEAVY_NOISE_STD * rng.standard_normal(test.shape), -1.0, 1.0),
        "uniform_noise": rng.uniform(-1.0, 1.0, test.shape),
    }
    return {name: digits_fid(classifier, images, reference) for name, images in corrupted.items()}
