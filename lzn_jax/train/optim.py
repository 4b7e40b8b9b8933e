"""Optimisation as the reference does it: Adam per module with a linear warm-up, global-norm clipping, per-module
EMA with the ``(1 + n) / (10 + n)`` warm-up, staged freezing, and one deliberate change: a non-finite update is
skipped whole (docs/differences.md, "Non-finite updates").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lzn_jax.train.state import MODULES, TrainState

# Label of parameters that are constants of the model (the Fourier time frequencies): no Adam, no EMA, no
# gradient-norm contribution, as in the reference, where they do not require gradients.
CONSTANT = "constant"
_CONSTANT_PARAM_NAMES = ("frequencies",)
# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6); kept so clipped updates match the reference's.
_CLIP_EPS = 1e-6


def _is_constant(path) -> bool:
    return any(getattr(entry, "key", None) in _CONSTANT_PARAM_NAMES for entry in path)


def param_labels(params: dict[str, Any]) -> dict[str, Any]:
    """The optimiser label of every leaf: its module's name, or CONSTANT for the Fourier frequencies."""
    return {
        module: jax.tree_util.tree_map_with_path(lambda path, _: CONSTANT if _is_constant(path) else module, tree)
        for module, tree in params.items()
    }


def warmup_schedule(learning_rate: float, optim: ml_collections.ConfigDict) -> optax.Schedule:
    """``lr * (f + (1 - f) * min(s, W) / W)`` after ``s`` successful updates (torch's LinearLR(f, 1, W))."""
    if optim.warmup_steps <= 0:
        return optax.constant_schedule(learning_rate)
    return optax.linear_schedule(learning_rate * optim.warmup_init_factor, learning_rate, optim.warmup_steps)


def make_optimizer(config: ml_collections.ConfigDict, modules: tuple[str, ...]) -> optax.GradientTransformation:
    """Adam (no weight decay) with one warmed-up learning rate per present module; constants get no update.

    Clipping is not part of it: ``apply_gradients`` clips first, over the unfrozen modules only.
    """
    optim = config.optim
    transforms = {CONSTANT: optax.set_to_zero()}
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
    return optax.multi_transform(transforms, param_labels)


def module_enabled(step: jax.Array, config: ml_collections.ConfigDict, modules: tuple[str, ...]) -> dict:
    """``{module: bool scalar}``: a module trains during its first ``optim.num_iterations[module]`` steps."""
    return {module: step < int(config.optim.num_iterations[module]) for module in modules}


def total_steps(config: ml_collections.ConfigDict, modules: tuple[str, ...]) -> int:
    """Training stops when the last module's stage ends."""
    return max(int(config.optim.num_iterations[module]) for module in modules)


def _trainable(grads: dict[str, Any], labels: dict[str, Any], enabled: dict[str, jax.Array]) -> dict[str, Any]:
    """Gradients with the frozen modules and the constants set to zero (they neither move nor count in the norm)."""
    return {
        module: jax.tree.map(
            lambda g, label: jnp.where(enabled[module] & (label != CONSTANT), g, jnp.zeros_like(g)),
            tree, labels[module],
        )
        for module, tree in grads.items()
    }


def clip_by_global_norm(grads: Any, max_norm: float) -> tuple[Any, jax.Array]:
    """torch's ``clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``. Returns (grads, norm)."""
    norm = optax.global_norm(grads)
    scale = jnp.minimum(1.0, max_norm / (norm + _CLIP_EPS))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), norm


def ema_decay(decay: float, count: jax.Array) -> jax.Array:
    """The reference's effective decay after its ``count``-th update: ``min(decay, (1 + n) / (10 + n))``."""
    count = count.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def ema_update(ema: Any, params: Any, decay: jax.Array, labels: Any) -> Any:
    """``shadow - (1 - d) (shadow - param)`` on every leaf except the constants, which keep the param's value."""
    return jax.tree.map(
        lambda shadow, param, label: param if label == CONSTANT else shadow - (1.0 - decay) * (shadow - param),
        ema, params, labels,
    )


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
    counters move. Returns the new state and scalar metrics (gradient norm, skip flag, learning rates).
    """
    modules = tuple(state.params)
    labels = param_labels(state.params)
    enabled = module_enabled(state.step, config, modules)
    grads, grad_norm = clip_by_global_norm(_trainable(grads, labels, enabled), config.optim.grad_clip_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    new_params, new_ema, new_counts, new_inner = {}, {}, {}, dict(opt_state.inner_states)
    for module in modules:
        on = enabled[module]
        new_params[module] = _select(on, params[module], state.params[module])
        new_inner[module] = _select(on, opt_state.inner_states[module], state.opt_state.inner_states[module])
        count = state.ema_counts[module] + on.astype(jnp.int32)
        decay = ema_decay(float(config.ema.decay[module]), count)
        updated = ema_update(state.ema_params[module], new_params[module], decay, labels[module])
        new_ema[module] = _select(on, updated, state.ema_params[module])
        new_counts[module] = count
    updated_state = state.replace(
        params=new_params, opt_state=opt_state._replace(inner_states=new_inner), ema_params=new_ema,
        ema_counts=new_counts,
    )

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = _select(finite, updated_state, state)
    skipped = (~finite).astype(jnp.int32)
    kept = kept.replace(
        step=state.step + 1,
        skipped_updates=state.skipped_updates + skipped,
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )
    metrics = {"train/grad_norm": grad_norm, "train/skipped": skipped.astype(jnp.float32)}
    for module in modules:
        metrics[f"train/enabled_{module}"] = enabled[module].astype(jnp.float32)
    return kept, metrics


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
    "CONSTANT",
    "MODULES",
    "apply_gradients",
    "clip_by_global_norm",
    "ema_decay",
    "ema_update",
    "learning_rates",
    "make_optimizer",
    "module_enabled",
    "param_labels",
    "total_steps",
    "warmup_schedule",
]
