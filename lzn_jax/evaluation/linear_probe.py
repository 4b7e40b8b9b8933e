"""The trained linear probe of case study 2 (the paper's representation number): one linear layer on fixed features,
AdamW, cross-entropy, top-1/top-5 validation accuracy after every epoch.

Features are computed once by the caller (``end_of_training.encode_split`` gives the ResNet's pooled 2048-d
backbone features) and passed here as arrays; a caller that wants augmentation passes a callback that re-extracts
the training features (one augmented view per image) for each epoch. docs/evaluation.md, "The trained linear probe";
docs/differences.md, item 11. The fast closed-form companions are in ``probes.py``.

Conventions: features ``(N, F)`` float, labels ``(N,)`` int in ``[0, num_classes)``. The library functions are
un-jitted; :func:`train_linear_probe` jits one whole epoch and one evaluation pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lzn_jax import parallel
from lzn_jax.models.layers import TorchLinear

Params = Any
# The mesh axis that batches are split over (lzn_jax.parallel.mesh).
DATA_AXIS = "data"
# epoch -> (features (N, F), labels (N,)): the training features to use in that epoch (same N and F every epoch).
EpochFeatures = Callable[[int], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class LinearProbeOptions:
    """The probe's recipe; the defaults are the reference's (case study 2), except the epochs.

    batch_size: the global batch; the last incomplete batch of each epoch is dropped, as the reference's loader does.
    num_epochs: the reference trains 300 epochs on ImageNet; the default here is the same.
    top_k: validation accuracies reported after every epoch (the reference logs 1, 5 and 10; the paper quotes 1, 5).
    """

    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 8192
    num_epochs: int = 300
    top_k: tuple[int, ...] = (1, 5)

    def __post_init__(self):
        if not self.batch_size >= 1 or not self.num_epochs >= 1:
            raise ValueError(f"batch_size and num_epochs must be positive, got {self.batch_size}, {self.num_epochs}")
        if not self.top_k or min(self.top_k) < 1:
            raise ValueError(f"top_k must be positive ints, got {self.top_k!r}")

    def replace(self, **changes) -> LinearProbeOptions:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        return (f"linear probe (torch-default init), AdamW lr {self.learning_rate} weight decay {self.weight_decay}, "
                f"no schedule, cross-entropy, global batch {self.batch_size} (last partial batch dropped), "
                f"{self.num_epochs} epochs")


class LinearProbeResult(NamedTuple):
    """params: the trained layer ``{"kernel": (F, C), "bias": (C,)}``; history: one dict per epoch (``epoch``,
    ``train_loss``, ``val_loss``, ``val_top{k}``); protocol: how the numbers were made."""

    params: Params
    history: list[dict[str, float]]
    protocol: str


def init_probe(key: jax.Array, num_features: int, num_classes: int) -> Params:
    """A fresh ``Linear(num_features -> num_classes)`` with PyTorch's default init (weights and bias uniform in
    +-1/sqrt(num_features)), as the reference's ``torch.nn.Linear``: ``{"kernel": (F, C), "bias": (C,)}``."""
    return TorchLinear(num_classes).init(key, jnp.zeros((1, num_features), jnp.float32))["params"]


def probe_logits(params: Params, features: jax.Array) -> jax.Array:
    """Logits (N, C) float32 of features (N, F)."""
    # Full float32 products: TPUs would otherwise multiply float32 in one bfloat16 pass, GPUs in TF32.
    logits = jnp.dot(features.astype(jnp.float32), params["kernel"], precision=jax.lax.Precision.HIGHEST)
    return logits + params["bias"]


def probe_loss(params: Params, features: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of the probe on a batch (the reference's ``cross_entropy``)."""
    return optax.softmax_cross_entropy_with_integer_labels(probe_logits(params, features), labels).mean()


def probe_optimizer(options: LinearProbeOptions) -> optax.GradientTransformation:
    """AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8) at a constant learning rate."""
    return optax.adamw(options.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=options.weight_decay)


def epoch_order(key: jax.Array, num_rows: int, batch_size: int) -> jax.Array:
    """Row indices (steps, batch_size) int32 of one epoch: a random permutation of ``num_rows`` cut into full batches
    (the incomplete rest is dropped)."""
    steps = num_rows // batch_size
    return jax.random.permutation(key, num_rows)[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def train_epoch(
    params: Params,
    opt_state: optax.OptState,
    features: jax.Array,
    labels: jax.Array,
    order: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[Params, optax.OptState, jax.Array]:
    """One epoch of the probe: an optimiser step per row of ``order`` (steps, batch_size) on those rows of
    ``features`` (N, F) / ``labels`` (N,). Returns ``(params, opt_state, mean training loss)``. Pure, un-jitted.

    batch_sharding: where each batch's rows go (the mesh's data axis), so the step runs data-parallel.
    """

    def step(carry, rows):
        params, opt_state = carry
        batch_features, batch_labels = features[rows], labels[rows]
        if batch_sharding is not None:
            batch_features = jax.lax.with_sharding_constraint(batch_features, batch_sharding)
            batch_labels = jax.lax.with_sharding_constraint(batch_labels, batch_sharding)
        loss, grads = jax.value_and_grad(probe_loss)(params, batch_features, batch_labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
    return params, opt_state, losses.mean()


def evaluate_probe(params: Params, features: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *,
                   top_k: tuple[int, ...] = (1, 5)) -> dict[str, jax.Array]:
    """Summed cross-entropy and top-k correct counts over the rows of ``features`` (N, F) where ``mask`` (N,) is
    true (all rows by default). Returns ``{"loss_sum", "count", "top{k}"...}`` scalars. Pure, un-jitted."""
    logits = probe_logits(params, features)
    mask = jnp.ones(labels.shape, bool) if mask is None else mask
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    _, top = jax.lax.top_k(logits, min(max(top_k), logits.shape[-1]))  # (N, k), best first
    hits = top == labels[:, None]
    sums = {"loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)), "count": jnp.sum(mask, dtype=jnp.int32)}
    for k in top_k:
        sums[f"top{k}"] = jnp.sum(hits[:, :k].any(axis=-1) & mask, dtype=jnp.int32)
    return sums


# Compiled once per recipe, size, sharding and platform, so repeated probes (a notebook, a sweep over checkpoints)
# reuse the programs.
@functools.lru_cache(maxsize=16)
def _jitted_epoch(learning_rate: float, weight_decay: float, batch_size: int, num_rows: int,
                  sharding: jax.sharding.Sharding | None, platform: str):
    """``(params, opt_state, features, labels, shuffle_key, epoch) -> (params, opt_state, mean loss)``, jitted; the
    epoch's order comes from ``fold_in(shuffle_key, epoch)``."""
    optimizer = probe_optimizer(LinearProbeOptions(learning_rate=learning_rate, weight_decay=weight_decay))

    def one_epoch(params, opt_state, features, labels, shuffle_key, epoch):
        order = epoch_order(jax.random.fold_in(shuffle_key, epoch), num_rows, batch_size)
        return train_epoch(params, opt_state, features, labels, order, optimizer=optimizer, batch_sharding=sharding)

    return jax.jit(one_epoch, compiler_options=parallel.compiler_options(platform))


@functools.lru_cache(maxsize=16)
def _jitted_scores(top_k: tuple[int, ...], platform: str):
    """:func:`evaluate_probe` jitted for ``top_k``."""
    return jax.jit(functools.partial(evaluate_probe, top_k=top_k),
                   compiler_options=parallel.compiler_options(platform))


def _place(array, mesh: jax.sharding.Mesh | None, *, pad_to: int = 1) -> jax.Array:
    """``array`` with rows padded (zeros) to a multiple of ``pad_to`` and, on a mesh, split over its data axis.
    Every process must hold the whole array (the probe's features are small enough to be on each host)."""
    array = np.asarray(array)
    padding = (-array.shape[0]) % pad_to
    if padding:
        array = np.concatenate([array, np.zeros((padding, *array.shape[1:]), array.dtype)])
    if mesh is None:
        return jnp.asarray(array)
    sharding = parallel.batch_sharding(mesh)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def train_linear_probe(
    train_features,
    train_labels,
    val_features,
    val_labels,
    *,
    num_classes: int,
    key: jax.Array,
    options: LinearProbeOptions = LinearProbeOptions(),
    mesh: jax.sharding.Mesh | None = None,
    epoch_features: EpochFeatures | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> LinearProbeResult:
    """Trains the probe and scores it on the validation rows after every epoch.

    Args:
      train_features, train_labels: (N, F), (N,): the fixed training features (no augmentation: the setting of the
        paper's Fig. 19 ablation). With ``epoch_features`` they only fix N and F.
      val_features, val_labels: (M, F), (M,), every row scored once.
      key: the probe's init (``fold_in(key, 0)``) and each epoch's shuffle (``fold_in(fold_in(key, 1), epoch)``).
      mesh: batches split over its ``"data"`` axis (the global batch must divide by its size); None: default device.
      epoch_features: ``epoch -> (features, labels)`` called at the start of each epoch for that epoch's training
        features, e.g. the encoder on one freshly augmented view of each image (the paper's main setting).
      progress: called with each epoch's history entry (for logging).
    Returns:
      :class:`LinearProbeResult`.
    """
    num_rows, num_features = np.shape(train_features)
    devices = 1 if mesh is None else int(mesh.shape[DATA_AXIS])
    if options.batch_size > num_rows:
        raise ValueError(f"batch_size={options.batch_size} exceeds the {num_rows} training rows; no full batch fits")
    if options.batch_size % devices:
        raise ValueError(f"batch_size={options.batch_size} must be divisible by the {devices} devices of the mesh")

    sharding = None if mesh is None else parallel.batch_sharding(mesh, DATA_AXIS)
    platform = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform
    run_epoch = _jitted_epoch(options.learning_rate, options.weight_decay, options.batch_size, num_rows, sharding,
                              platform)
    score = _jitted_scores(options.top_k, platform)
    shuffle_key = jax.random.fold_in(key, 1)

    val_rows = np.shape(val_labels)[0]
    val_x = _place(np.asarray(val_features, np.float32), mesh, pad_to=devices)
    val_y = _place(np.asarray(val_labels, np.int32), mesh, pad_to=devices)
    val_mask = _place(np.ones(val_rows, bool), mesh, pad_to=devices)

    params = init_probe(jax.random.fold_in(key, 0), num_features, num_classes)
    if mesh is not None:
        params = jax.device_put(params, jax.NamedSharding(mesh, jax.P()))  # replicated, beside the split batches
    opt_state = probe_optimizer(options).init(params)
    features = labels = None
    history = []
    for epoch in range(options.num_epochs):
        if epoch_features is not None or features is None:
            epoch_x, epoch_y = (train_features, train_labels) if epoch_features is None else epoch_features(epoch)
            if np.shape(epoch_x) != (num_rows, num_features):
                raise ValueError(f"epoch {epoch}: training features have shape {np.shape(epoch_x)}, expected "
                                 f"{(num_rows, num_features)}")
            features = _place(np.asarray(epoch_x, np.float32), mesh, pad_to=devices)
            labels = _place(np.asarray(epoch_y, np.int32), mesh, pad_to=devices)
        params, opt_state, train_loss = run_epoch(params, opt_state, features, labels, shuffle_key,
                                                 np.int32(epoch))
        sums = jax.device_get(score(params, val_x, val_y, val_mask))
        entry = {"epoch": epoch + 1, "train_loss": float(train_loss), "val_loss": float(sums["loss_sum"]) / val_rows}
        entry.update({f"val_top{k}": int(sums[f"top{k}"]) / val_rows for k in options.top_k})
        history.append(entry)
        if progress is not None:
            progress(entry)

    features_text = ("training features re-extracted every epoch by the caller (epoch_features)"
                     if epoch_features is not None else "fixed training features (no augmentation)")
    protocol = (f"{options.describe()}; {features_text}; {num_rows} training rows, {val_rows} validation rows, "
                f"{num_features}-d features, {num_classes} classes")
    return LinearProbeResult(params, history, protocol)

