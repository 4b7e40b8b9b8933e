"""The pure training step, ``(state, batch) -> (state, metrics)``: un-jitted here (loop.py jits it once, with
shardings and the state donated), so tests and notebooks can call or trace it as it is."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lzn_jax.objectives.contrastive import ContrastiveSettings, contrastive_loss
from lzn_jax.objectives.generation import GenerationSettings, generation_loss
from lzn_jax.train.optim import apply_gradients, module_enabled
from lzn_jax.train.state import Modules, TrainState

OBJECTIVES = ("generation", "contrastive")


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """What a step needs besides the state and the batch; built once per run by ``make_step``."""

    modules: Modules
    optimizer: optax.GradientTransformation
    to_model_inputs: Callable[[dict], dict]


def step_key(state: TrainState) -> jax.Array:
    """The key of the step ``state.step``: ``fold_in(rng, step)``, so a resumed run draws what it would have."""
    return jax.random.fold_in(state.rng, state.step)


def _generation_objective(settings: GenerationSettings, modules: Modules):
    def objective(params, inputs, key, enabled):
        outputs = generation_loss(
            params, inputs["image"], inputs.get("label"), key, modules=modules, settings=settings, enabled=enabled
        )
        metrics = {
            "train/rf_loss": outputs.rf_loss, "train/anchor_norm": outputs.anchor_norm,
            "train/latent_std": outputs.latent_std,
        }
        if modules.label_anchors is not None:
            metrics["train/label_loss"] = outputs.label_loss
        return outputs.loss, metrics

    return objective


def _contrastive_objective(settings: ContrastiveSettings, modules: Modules):
    def objective(params, inputs, key, enabled):
        del enabled  # one module: when its stage ends, training ends
        outputs = contrastive_loss(params, inputs["views"], key, modules=modules, settings=settings)
        return outputs.loss, {
            "train/prob_loss": outputs.prob_loss, "train/log_loss": outputs.log_loss,
            "train/assignment_acc": outputs.assignment_acc, "train/ode_error": outputs.ode_error,
        }

    return objective


def objective_fn(config: ml_collections.ConfigDict, modules: Modules):
    """``(params, inputs, key, enabled) -> (loss, metrics)`` for ``config.objective``."""
    if config.objective == "generation":
        if modules.decoder is None:
            raise ValueError("objective 'generation' needs config.model.decoder")
        return _generation_objective(GenerationSettings.from_config(config.generation), modules)
    if config.objective == "contrastive":
        if modules.encoder is None:
            raise ValueError("objective 'contrastive' needs config.model.encoder")
        return _contrastive_objective(ContrastiveSettings.from_config(config.contrastive), modules)
    raise ValueError(f"config.objective={config.objective!r} is not one of {OBJECTIVES}")


def make_step(config: ml_collections.ConfigDict, functions: StepFunctions):
    """The step function of ``config``: ``(state, batch) -> (state, metrics)``, pure and un-jitted.

    ``batch`` is what the data pipeline yields (uint8 images); ``metrics`` is a flat dict of float32 scalars
    (``train/loss``, ``train/grad_norm``, ``train/skipped``, ...).
    """
    objective = objective_fn(config, functions.modules)

    def train_step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        inputs = functions.to_model_inputs(batch)
        enabled = module_enabled(state.step, config, tuple(state.params))
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, inputs, step_key(state), enabled
        )
        new_state, update_metrics = apply_gradients(
            state, grads, loss, optimizer=functions.optimizer, config=config
        )
        metrics = {"train/loss": loss, **metrics, **update_metrics}
        return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

    return train_step
