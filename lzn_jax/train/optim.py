"""Optimisation as the reference does it: Adam per module with a linear warm-up, global-norm clipping, per-module
EMA with the ``(1 + n) / (10 + n)`` warm-up, staged freezing, and one deliberate change: a non-finite update is
skipped whole (docs/differences.md, "Non-finite updates").

The optimiser, the clipping and the EMA see each module's trainable values as ``vectors.pack`` lays them out: one
vector for a small module, its leaves for a large one (``vectors.py`` says why). The train state keeps the params
and the EMA as the models' trees, and the Adam moments in the packed form.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lzn_jax.train.state import MODULES, TrainState
from lzn_jax.train.vectors import as_vector, pack, unpack

# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); kept so clipped updates match the reference's.
_CLIP_EPS = 1e-6


def warmup_schedule(learning_rate: float, optim: ml_collections.ConfigDict) -> optax.Schedule:
    """``lr * (f + (1 - f) * min(s, W) / W)`` after ``s`` successful updates (torch's LinearLR(f, 1, W))."""
    if optim.warmup_steps <= 0:
        return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(learning_rate * optim.warmup_init_factor, learning_rate, optim.warmup_steps)


def make_optimizer(config: ml_collections.ConfigDict, modules: tuple[str, ...]) -> optax.GradientTransformation:
    """Adam (no weight decay) with one warmed-up learning rate per present module, over ``{module: [arrays]}``
    (``vectors.pack_params``: the constants are not in them, so they get no update).

    Clipping is not part of it: ``apply_gradients`` clips first, over the unfrozen modules only.
    """
    optim = config.optim
    transforms = {}
    for module in modules:
        learning_rate = float(optim.learning_rate[module])
        if learning_rate <= 0:
            raise ValueError(
                f"config.optim.learning_rate.{module}={learning_rate}: the setting has a {module}, so it needs a "
                "positive learning rate"
            )
        transforms[module] = optax.chain(
            optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
            optax.scale_by_learning_rate(warmup_schedule(learning_rate, optim)),
        )
    return optax.multi_transform(transforms, _packed_labels)


def _packed_labels(packed: dict[str, Any]) -> dict[str, Any]:
    """Every array of a module's packed values is labelled with the module's name; anything but a list of arrays
    per module (``vectors.pack_params``) is refused."""
    for module, arrays in packed.items():
        if not isinstance(arrays, list):
            raise TypeError(
                f"the optimiser takes each module's trainable values as a list of arrays, but {module!r} is a "
                f"{type(arrays).__name__}; pass vectors.pack_params(params, ...), not the params trees"
            )
    return {module: [module] * len(arrays) for module, arrays in packed.items()}


def module_enabled(step: jax.Array, config: ml_collections.ConfigDict, modules: tuple[str, ...]) -> dict:
    """``{module: bool scalar}``: a module trains during its first ``optim.num_iterations[module]`` steps."""
    return {module: step < int(config.optim.num_iterations[module]) for module in modules}


def total_steps(config: ml_collections.ConfigDict, modules: tuple[str, ...]) -> int:
    """Training stops when the last module's stage ends."""
    return max(int(config.optim.num_iterations[module]) for module in modules)


def clip_by_global_norm(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """torch's ``clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``. Returns (grads, norm)."""
    norm = optax.tree.norm(grads)
    scale = jnp.minimum(1.0, max_norm / (norm + _CLIP_EPS))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), norm


def ema_decay(decay: float, count: jax.Array) -> jax.Array:
    """The reference's effective decay after its ``count``-th update: ``min(decay, (1 + n) / (10 + n))``."""
    count = count.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def ema_update(shadow: jax.Array, param: jax.Array, decay: jax.Array) -> jax.Array:
    """The reference's EMA step ``shadow - (1 - d) (shadow - param)``, on one array."""
    return shadow - (1.0 - decay) * (shadow - param)


def _select(condition: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def apply_gradients(
    state: TrainState,
    grads: dict[str, Any],
    loss: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step of ``state`` with ``grads`` (the gradient of ``loss``), staged and guarded.

    Modules whose stage is over keep their params, Adam moments and count, and EMA untouched. When ``loss`` or the
    gradient norm is not finite the whole state is kept (schedule and EMA included) and only ``step`` and the skip
    counters move. The constants are never touched. Returns the new state and scalar metrics (gradient norm, skip
    flag, enabled modules).
    """
    modules = tuple(state.params)
    enabled = module_enabled(state.step, config, modules)
    vector = {module: as_vector(state.params[module], config.optim.vector_update_max_size) for module in modules}
    params = {module: pack(state.params[module], vector[module]) for module in modules}
    # Frozen modules neither move nor count in the norm.
    grads = {module: _select(enabled[module], pack(grads[module], vector[module]),
                             jax.tree.map(jnp.zeros_like, params[module])) for module in modules}
    grads, grad_norm = clip_by_global_norm(grads, config.optim.grad_clip_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    moved = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    new_params, new_ema, new_counts, new_inner = {}, {}, {}, {}
    for module in modules:
        on = enabled[module] & finite
        kept = _select(on, moved[module], params[module])
        new_inner[module] = _select(on, opt_state.inner_states[module], state.opt_state.inner_states[module])
        count = state.ema_counts[module] + on.astype(jnp.int32)
        decay = ema_decay(float(config.ema.decay[module]), count)
        shadow = pack(state.ema_params[module], vector[module])
        shadow = _select(on, jax.tree.map(lambda s, p: ema_update(s, p, decay), shadow, kept), shadow)
        new_params[module] = unpack(state.params[module], kept, vector[module])
        new_ema[module] = unpack(state.ema_params[module], shadow, vector[module])
        new_counts[module] = count
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        opt_state=opt_state._replace(inner_states=new_inner),
        ema_params=new_ema,
        ema_counts=new_counts,
        skipped_updates=state.skipped_updates + skipped,
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )
    metrics = {"train/grad_norm": grad_norm, "train/skipped": skipped.astype(jnp.float32)}
    for module in modules:
        metrics[f"train/enabled_{module}"] = enabled[module].astype(jnp.float32)
    return new_state, metrics


def learning_rates(state: TrainState, config: ml_collections.ConfigDict) -> dict[str, float]:
    """The learning rate each module's next update would use (host-side, for logs)."""
    rates = {}
    for module in state.params:
        inner = state.opt_state.inner_states[module].inner_state
        count = int(jax.device_get(_schedule_count(inner)))
        rates[module] = float(warmup_schedule(float(config.optim.learning_rate[module]), config.optim)(count))
    return rates


def _schedule_count(inner_state) -> jax.Array:
    """The Adam step count of one module's chain (its ScaleByAdamState.count)."""
    return inner_state[0].count


__all__ = [
    "MODULES",
    "apply_gradients",
    "clip_by_global_norm",
    "ema_decay",
    "ema_update",
    "learning_rates",
    "make_optimizer",
    "module_enabled",
    "total_steps",
    "warmup_schedule",
]
