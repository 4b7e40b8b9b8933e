"""The train state (one pytree, no functions inside) and the modules a config trains.

Shapes first: ``jax.eval_shape(init_state, ...)`` gives the abstract state that the sharded initialisation, the
checkpoint restore and the fit check all start from (docs/design.md, "Training").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from lzn_jax import models
from lzn_jax.train.vectors import pack_params

# The trainable modules, in the order of the reference's optimiser parameter groups.
MODULES = ("encoder", "decoder", "label_anchors")


class Modules(NamedTuple):
    """The unbound Flax modules of a setting; None where the setting has no such module."""

    encoder: nn.Module | None
    decoder: nn.Module | None
    label_anchors: nn.Module | None

    def present(self) -> tuple[str, ...]:
        """Names of the modules this setting has, in MODULES order."""
        return tuple(name for name in MODULES if getattr(self, name) is not None)


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from one step to the next; a checkpoint stores exactly this.

    Attributes:
      step: int32 scalar, the number of steps taken (skipped updates included: their batch was consumed).
      params: ``{module: params}`` for every present module.
      opt_state: the ``optax.multi_transform`` state: one Adam state and one step count per module, its moments
        in the form ``vectors.pack_params`` gives (one vector for a small module, the leaves for a large one).
      ema_params: ``{module: params}``, the exponential moving averages.
      ema_counts: ``{module: int32 scalar}``, successful EMA updates per module (the ``n`` of the warm-up).
      rng: typed PRNG key; step ``s`` uses ``fold_in(rng, s)``.
      skipped_updates: int32 scalar, updates skipped for a non-finite loss or gradient norm so far.
      consecutive_skips: int32 scalar, skipped updates in a row up to now.
    """

    step: jax.Array
    params: dict[str, Any]
    opt_state: optax.OptState
    ema_params: dict[str, Any]
    ema_counts: dict[str, jax.Array]
    rng: jax.Array
    skipped_updates: jax.Array
    consecutive_skips: jax.Array


def _model_config(config: ml_collections.ConfigDict, name: str) -> dict | None:
    """Module ``name``'s block with the model-wide keys (``dtype``, ``remat``) filled in where it has none."""
    block = config.model[name]
    if block is None:
        return None
    block = dict(block.items())
    # The label anchors are a table: no compute dtype, no blocks to rematerialise.
    if name != "label_anchors":
        block.setdefault("dtype", config.model.dtype)
        # A run's config.json written before the key existed did not rematerialise.
        block.setdefault("remat", bool(config.model.get("remat", False)))
    return block


def build_modules(config: ml_collections.ConfigDict) -> Modules:
    """The Flax modules named by ``config.model`` (compute dtype ``config.model.dtype``, blocks rematerialised when
    ``config.model.remat``)."""
    built = {}
    for name in MODULES:
        block = _model_config(config, name)
        built[name] = None if block is None else models.build(block)
    return Modules(**built)


def encoder_input_channels(data_config: ml_collections.ConfigDict) -> int:
    """Channels of the images the encoder sees: two-view batches are RGB; digits have ``num_channels``."""
    if data_config.augmentation == "two_view":
        return 3
    return data_config.num_channels if data_config.name == "digits" else 3


def init_params(modules: Modules, config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, Any]:
    """Fresh params of every present module; module ``i`` of MODULES uses ``fold_in(key, i)``."""
    channels = encoder_input_channels(config.data)
    params = {}
    for index, name in enumerate(MODULES):
        module = getattr(modules, name)
        if module is None:
            continue
        inputs = module.example_inputs(1, config.data.image_size, channels)
        params[name] = module.init(jax.random.fold_in(key, index), *inputs)["params"]
    return params


def init_state(
    config: ml_collections.ConfigDict, modules: Modules, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """The state at step 0: fresh params, EMA equal to them, zero counts. Pure: jit it with out_shardings."""
    params_key, train_key = jax.random.split(key)
    params = init_params(modules, config, params_key)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=optimizer.init(pack_params(params, config.optim.vector_update_max_size)),
        ema_params=jax.tree.map(jnp.copy, params),
        ema_counts={name: zero for name in params},
        rng=train_key,
        skipped_updates=zero,
        consecutive_skips=zero,
    )


def abstract_train_state(config: ml_collections.ConfigDict, modules: Modules, optimizer: optax.GradientTransformation,
                         sharding: jax.sharding.Sharding) -> TrainState:
    """The state's shapes and dtypes with ``sharding`` on every leaf: what init, restore, fit checks and the
    benchmarks start from. Traced with ``jax.eval_shape``: nothing is allocated."""
    shapes = jax.eval_shape(lambda key: init_state(config, modules, optimizer, key), jax.random.key(0))
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes)


def parameter_table(params: dict[str, Any]) -> list[tuple[str, int]]:
    """``[(module, parameter count), ...]`` plus a total row, for the start-up log."""
    rows = [(name, sum(leaf.size for leaf in jax.tree.leaves(tree))) for name, tree in params.items()]
    rows.append(("total", sum(count for _, count in rows)))
    return rows
