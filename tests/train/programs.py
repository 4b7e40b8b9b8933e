"""In-process train steps of the tiny configs, compiled once per (config, device count) and shared by every test of
the session that needs them (``program(kind, num_devices)``).

Each is what ``loop.train`` runs, minus the loop: the same initial state (``init_state`` of ``config.seed``, jitted
with replicated outputs), the same batches (``data.build_pipeline``), the same pure step (``steps.make_step``), jitted
with the loop's shardings, but without donation so that tests can keep every intermediate state. The step's
``to_model_inputs`` is the pipeline's, followed by one test hook: rows whose ``"poison"`` entry is non-zero get NaN
images (a NaN batch without touching the uint8 data path). Everything compiles at XLA's lowest backend optimisation
level (the same computation; about a third of the compile time).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import data, parallel
from lzn_jax.train import optim, steps
from lzn_jax.train import state as state_lib
from tests.train import tiny

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def poisoned_inputs(to_model_inputs):
    """``to_model_inputs`` that also turns the images (or views) of rows with ``batch["poison"] != 0`` into NaN."""

    def inputs(batch):
        batch = dict(batch)
        poison = batch.pop("poison")
        result = dict(to_model_inputs(batch))
        key = "views" if "views" in result else "image"
        rows = (poison != 0).reshape((-1,) + (1,) * (result[key].ndim - 1))
        result[key] = jnp.where(rows, jnp.nan, result[key])
        return result

    return inputs


class Program:
    """One tiny config's train step on a mesh of ``num_devices`` devices, with its initial state and batches."""

    def __init__(self, kind: str, num_devices: int):
        self.kind, self.num_devices = kind, num_devices
        self.config = tiny.get_config(kind)
        self.config.num_devices = num_devices
        self.mesh = parallel.data_mesh(num_devices)
        self.replicated = jax.NamedSharding(self.mesh, jax.P())
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.modules = state_lib.build_modules(self.config)
        self.optimizer = optim.make_optimizer(self.config, self.modules.present())
        self.pipeline = data.build_pipeline(self.config.data, sharding=self.batch_sharding)
        self.to_model_inputs = poisoned_inputs(self.pipeline.to_model_inputs)
        step_fn = steps.make_step(self.config, steps.StepFunctions(self.modules, self.optimizer, self.to_model_inputs))
        self._step = jax.jit(step_fn, in_shardings=(self.replicated, self.batch_sharding),
                             out_shardings=(self.replicated, None), compiler_options=FAST_COMPILE)
        self._batches: list[dict] = []
        self._initial = None
        self._grads = None
        self._trajectory: tuple[list, list] = ([], [])

    def initial_state(self) -> state_lib.TrainState:
        """The state ``loop.train`` starts a fresh run from (replicated: on more devices, the 1-device program's values
        placed on this mesh, which saves a compile)."""
        if self._initial is None and self.num_devices != 1:
            self._initial = jax.device_put(program(self.kind, 1).initial_state(), self.replicated)
        if self._initial is None:
            config, modules, optimizer = self.config, self.modules, self.optimizer
            with jax.set_mesh(self.mesh):
                init = jax.jit(lambda: state_lib.init_state(config, modules, optimizer, jax.random.key(config.seed)),
                               out_shardings=self.replicated, compiler_options=FAST_COMPILE)
                self._initial = init()
        return self._initial

    def batch(self, step: int, *, poison: bool = False) -> dict:
        """The batch of global step ``step`` (0-based), with a ``"poison"`` entry (all rows, or none)."""
        while len(self._batches) <= step:
            self._batches.append(next(self.pipeline))
        size = self.config.data.batch_size
        flags = np.full((size,), 1.0 if poison else 0.0, np.float32)
        return {**self._batches[step], "poison": jax.device_put(flags, self.batch_sharding)}

    def step(self, state, batch) -> tuple[Any, dict[str, float]]:
        with jax.set_mesh(self.mesh):
            new_state, metrics = self._step(state, batch)
        return new_state, {name: float(value) for name, value in jax.device_get(metrics).items()}

    def trajectory(self, num_steps: int) -> tuple[list, list[dict[str, float]]]:
        """``([state after 0, 1, ..., num_steps steps], [metrics of steps 1..num_steps])`` from the initial state."""
        states, metrics = self._trajectory
        if not states:
            states.append(self.initial_state())
        while len(metrics) < num_steps:
            state, values = self.step(states[-1], self.batch(len(metrics)))
            states.append(state)
            metrics.append(values)
        return states[:num_steps + 1], metrics[:num_steps]

    def gradients(self, state, batch) -> dict:
        """The gradients of the objective that the step at ``state`` takes (before clipping and freezing)."""
        if self._grads is None:
            objective = steps.objective_fn(self.config, self.modules)
            config, to_inputs = self.config, self.to_model_inputs

            def grads(state, batch):
                enabled = optim.module_enabled(state.step, config, tuple(state.params))
                return jax.grad(objective, has_aux=True)(state.params, to_inputs(batch), steps.step_key(state),
                                                         enabled)[0]

            self._grads = jax.jit(grads, in_shardings=(self.replicated, self.batch_sharding),
                                  out_shardings=self.replicated, compiler_options=FAST_COMPILE)
        with jax.set_mesh(self.mesh):
            return self._grads(state, batch)


@functools.cache
def program(kind: str, num_devices: int) -> Program:
    """The session's one Program of ``kind`` on ``num_devices`` devices."""
    return Program(kind, num_devices)
