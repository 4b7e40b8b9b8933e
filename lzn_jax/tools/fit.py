"""Fit check: compiles the real training step ahead of time for a target it does not have (a TPU slice, or N
accelerators of a given memory) and reports per-device memory, FLOPs and the largest per-device batch that fits.

  python -m lzn_jax.tools.fit --config=configs/cifar10_gen.py --config.data.batch_size=8192 --topology=v5e-64
  python -m lzn_jax.tools.fit --config=configs/cifar10_gen.py --devices=16 --device_memory=40GB
  python -m lzn_jax.tools.fit --config=configs/imagenet_repr.py --config.data.batch_size=65536 \
      --topology=v5e-64 --nocompile_step          # FLOPs and the solver's share only
  python -m lzn_jax.tools.fit --config=configs/digits_gen.py:smoke --devices=8 --device_memory=64MiB \
      --max_batch_search=bisect --json=/tmp/fit.json

The global batch of the config stays global: each device holds ``data.batch_size / devices`` rows. A TPU target is
compiled by XLA:TPU against a topology description (``tpu-aot``; needs libtpu, not the chips); where that is not
possible, and for ``--devices``, XLA:CPU compiles the same program on as many fake CPU devices (``cpu-estimate``).
docs/scaling.md says what each figure means and how far to trust it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import topologies
from jax.extend import core as jax_core

from lzn_jax import parallel, zoning
from lzn_jax.data import tfds_source
from lzn_jax.data.device import model_inputs_fn
from lzn_jax.data.pipeline import ExampleTransform
from lzn_jax.objectives.contrastive import ContrastiveSettings
from lzn_jax.objectives.generation import GenerationSettings
from lzn_jax.objectives.latents import latents_of, target_log_probs_of
from lzn_jax.train import loop, optim, steps
from lzn_jax.train.state import build_modules

GIB = 2**30

# ---------------------------------------------------------------------------------------------------------------
# Targets: what the step is compiled for.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """A TPU generation the fit check knows.

    Attributes:
      hbm_bytes: HBM per chip that XLA:TPU lets a program use (libtpu 0.0.50's compile-time limit: it refuses a
        program above it); a little under the chip's nominal HBM.
      nominal: the chip's HBM as the vendor states it, for the table.
      torus_dims: 2 (v5e, v6e: AxB slices) or 3 (v5p: AxBxC slices).
      chip_counts: the slice sizes ``--topology=<generation>-<chips>`` accepts.
    """

    name: str
    hbm_bytes: int
    nominal: str
    torus_dims: int
    chip_counts: tuple[int, ...]


# The usable HBM is what XLA:TPU itself reports as "available HBM" when a program is too large for the chip
# (measured with libtpu 0.0.50.1, the version jax[tpu]==0.12.0.1 pins); docs/scaling.md, "Targets".
TPU_GENERATIONS = {
    "v5e": TpuGeneration("v5e", int(15.75 * GIB), "16 GB", 2, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": TpuGeneration("v5p", int(95.73 * GIB), "95 GB", 3, tuple(2**k for k in range(2, 13))),
    "v6e": TpuGeneration("v6e", int(31.24 * GIB), "32 GB", 2, (1, 4, 8, 16, 32, 64, 128, 256)),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the step is meant to run.

    Attributes:
      name: as the user wrote it (``v5e-64``, ``16 devices``).
      num_devices: devices (TPU chips) of the 1-D data mesh.
      memory_bytes: memory per device the verdict compares with.
      topology: the TPU topology name for ahead-of-time compilation (``v5e:8x8``), None for a device count.
    """

    name: str
    num_devices: int
    memory_bytes: int
    topology: str | None = None


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The most balanced power-of-two slice shape of ``chips`` chips, smallest side first (2D: 8x8, 8x16; 3D:
    2x2x1 for 4 chips as Cloud TPU names it, then 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
    exponent = int(math.log2(chips))
    sides = [exponent // dims + (1 if i >= dims - exponent % dims else 0) for i in range(dims)]
    shape = tuple(2**side for side in sides)
    return (2, 2, 1) if dims == 3 and chips == 4 else shape


def _known_topologies() -> str:
    return "; ".join(f"{g.name}-N with N in {list(g.chip_counts)}" for g in TPU_GENERATIONS.values())


def tpu_target(text: str, *, memory_bytes: int | None = None) -> Target:
    """A TPU slice from ``<generation>-<chips>`` (``v5e-64``, ``v5p-128``, ``v6e-256``; the number counts chips,
    also for v5p, whose Cloud accelerator type ``v5p-N`` counts TensorCores, two per chip) or from an explicit
    topology ``<generation>:<shape>`` (``v5e:8x8``, ``v5p:4x4x4``).

    Raises:
      ValueError: an unknown generation, chip count or shape, naming the known ones.
    """
    text = text.strip()
    explicit = re.fullmatch(r"(v5e|v5p|v6e):(\d+(?:x\d+)+)", text)
    by_count = re.fullmatch(r"(v5e|v5p|v6e)-(\d+)", text)
    if explicit:
        generation = TPU_GENERATIONS[explicit.group(1)]
        sides = [int(side) for side in explicit.group(2).split("x")]
        if len(sides) != generation.torus_dims or min(sides) < 1:
            raise ValueError(f"--topology={text!r}: a {generation.name} slice has {generation.torus_dims} sides "
                             f"(e.g. {generation.name}:{'x'.join(map(str, _torus_shape(64, generation.torus_dims)))})")
        chips, topology = math.prod(sides), text
    elif by_count and int(by_count.group(2)) in TPU_GENERATIONS[by_count.group(1)].chip_counts:
        generation = TPU_GENERATIONS[by_count.group(1)]
        chips = int(by_count.group(2))
        topology = f"{generation.name}:" + "x".join(map(str, _torus_shape(chips, generation.torus_dims)))
    else:
        raise ValueError(f"unknown --topology={text!r}; known: {_known_topologies()} (N counts chips), or an "
                         "explicit shape such as v5e:8x8 or v5p:4x4x4")
    return Target(text, chips, generation.hbm_bytes if memory_bytes is None else memory_bytes, topology)


def device_target(num_devices: int, memory_bytes: int) -> Target:
    """``num_devices`` accelerators (GPUs) with ``memory_bytes`` each."""
    if num_devices < 1:
        raise ValueError(f"--devices must be a positive count, got {num_devices}")
    if memory_bytes <= 0:
        raise ValueError(f"--device_memory must be positive, got {memory_bytes} bytes")
    return Target(f"{num_devices} devices", num_devices, memory_bytes)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of ``"40GB"`` (decimal: k, M, G, T and kB ... TB), ``"80GiB"`` (binary: KiB ... TiB) or a byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read the memory size {text!r}; write e.g. 40GB, 80GiB or 16e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def target_mesh(target: Target, *, method: str = "auto") -> tuple[jax.sharding.Mesh, str, str | None]:
    """The 1-D ``("data",)`` mesh the step is compiled on, how it is compiled, and why not with XLA:TPU.

    Args:
      method: "auto" (XLA:TPU for a TPU target when libtpu can describe its topology, else XLA:CPU), "tpu-aot"
        (XLA:TPU or an error) or "cpu-estimate" (XLA:CPU).
    Returns:
      ``(mesh, "tpu-aot" | "cpu-estimate", the reason XLA:TPU was not used or None)``.
    Raises:
      ValueError: the target needs more CPU devices than this process has (they are fixed when JAX starts).
    """
    if method not in ("auto", "tpu-aot", "cpu-estimate"):
        raise ValueError(f"method={method!r}; use auto, tpu-aot or cpu-estimate")
    reason = None
    if target.topology and method != "cpu-estimate":
        try:
            devices = topologies.get_topology_desc(target.topology, platform="tpu").devices
            return _data_mesh_over(devices), "tpu-aot", None
        except Exception as error:  # no libtpu (RuntimeError), or a topology it refuses (JaxRuntimeError)
            if method == "tpu-aot":
                raise
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
    elif method == "tpu-aot":
        raise ValueError("method='tpu-aot' needs a TPU target (--topology)")
    available = jax.devices("cpu")
    if target.num_devices > len(available):
        raise ValueError(
            f"the target has {target.num_devices} devices but this process has {len(available)} CPU devices; use "
            f"`python -m lzn_jax.tools.fit` (it sets XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{target.num_devices} before JAX starts) or set that flag yourself before importing jax")
    return _data_mesh_over(available[:target.num_devices]), "cpu-estimate", reason


def _data_mesh_over(devices) -> jax.sharding.Mesh:
    # parallel.data_mesh builds the same mesh over jax.devices(); a TPU topology's compile-only devices are not
    # among those, so the mesh over an explicit device list is built here.
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


# ---------------------------------------------------------------------------------------------------------------
# The step, on abstract inputs.
# ---------------------------------------------------------------------------------------------------------------


def per_device_batch(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Rows each device holds; refuses a global batch that does not divide (the trainer's own check)."""
    loop.check_batch_divisible(int(config.data.batch_size), num_devices)
    loop.check_encoder_chunks(config, num_devices)
    return int(config.data.batch_size) // num_devices


def with_global_batch(config: ml_collections.ConfigDict, global_batch: int) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``data.batch_size = global_batch``."""
    config = copy.deepcopy(config)
    config.data.batch_size = int(global_batch)
    return config


def abstract_batch(data_config: ml_collections.ConfigDict, global_batch: int, sharding) -> dict[str, Any]:
    """What the training pipeline yields for ``data_config``, as ``jax.ShapeDtypeStruct`` leaves placed by
    ``sharding``: ``{"image": uint8 (B, S, S, C)}`` or ``{"views": uint8 (B, 2, S, S, 3)}`` (plus ``"augment"``
    when the photometric half runs on the device), and ``"label": int32 (B,)`` for labelled data sets.

    One synthetic record goes through the pipeline's own per-example transform, so the shapes follow the config.
    """
    channels = data_config.num_channels if data_config.name == "digits" else 3
    record = {"image": np.zeros((data_config.image_size, data_config.image_size, channels), np.uint8)}
    if data_config.name == "digits" or data_config.name in tfds_source.TFDS_DATASETS:
        record["label"] = np.int32(0)
    example = ExampleTransform(data_config)(record, np.random.default_rng(0))
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((global_batch,) + np.shape(leaf), np.asarray(leaf).dtype,
                                                          sharding=sharding), example)


@dataclasses.dataclass
class StepProgram:
    """The training step of ``config`` jitted as the trainer jits it (shardings, donated state) on ``mesh``."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    modules: Any
    jitted: Any
    abstract_state: Any
    abstract_batch: dict[str, Any]


def step_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                 compiler_options: dict[str, Any] | None = None) -> StepProgram:
    """The real step of ``config`` (``steps.make_step``, the model-input function of ``config.data``, the
    optimiser and abstract state of the trainer) jitted with the trainer's shardings and ``donate_argnums=0``.

    Args:
      compiler_options: added to the platform's own (``parallel.compiler_options``), e.g. a faster CPU compile.
    """
    replicated = jax.NamedSharding(mesh, jax.P())
    rows = parallel.batch_sharding(mesh)
    modules = build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    state = loop.abstract_train_state(config, modules, optimizer, replicated)
    batch = abstract_batch(config.data, int(config.data.batch_size), rows)
    step_fn = steps.make_step(config, steps.StepFunctions(modules, optimizer, model_inputs_fn(config.data)))
    options = {**(parallel.compiler_options(mesh.devices.flat[0].platform) or {}), **(compiler_options or {})}
    jitted = jax.jit(step_fn, in_shardings=(replicated, rows), out_shardings=(replicated, None), donate_argnums=0,
                     compiler_options=options or None)
    return StepProgram(config, mesh, modules, jitted, state, batch)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs with loops counted: XLA's cost analysis counts a while loop's body once, whatever its trip count.
# ---------------------------------------------------------------------------------------------------------------


def _dot_flops(eqn) -> int:
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contracting)


def _conv_flops(eqn) -> int:
    rhs = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (output features, input features, spatial ...)
    per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
    return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(value):
    if isinstance(value, jax_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [jaxpr for item in value for jaxpr in _sub_jaxprs(item)]
    return []


def counted_flops(jaxpr) -> tuple[int, int]:
    """Matmul and convolution FLOPs of a traced step (2 per multiply-add), loops times their trip counts.

    Args:
      jaxpr: a ``Jaxpr`` or ``ClosedJaxpr`` (``jax.jit(f).trace(...).jaxpr``).
    Returns:
      ``(outside, inside)``: FLOPs outside any ``shard_map`` at global shapes, and inside ``shard_map`` bodies at
      one device's shapes (in this project, the zoning solver). A ``cond`` counts its costliest branch; a
      ``while`` loop (no static trip count; the step has none) counts its body once.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    outside = inside = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            outside += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            outside += _conv_flops(eqn)
        elif name == "shard_map":
            body_outside, body_inside = counted_flops(eqn.params["jaxpr"])
            inside += body_outside + body_inside
        elif name == "cond":
            branches = [counted_flops(branch) for branch in eqn.params["branches"]]
            outside += max(b[0] for b in branches)
            inside += max(b[1] for b in branches)
        else:
            times = eqn.params["length"] if name == "scan" else 1
            for sub in (sub for value in eqn.params.values() for sub in _sub_jaxprs(value)):
                sub_outside, sub_inside = counted_flops(sub)
                outside += times * sub_outside
                inside += times * sub_inside
    return outside, inside


def xla_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOPs of a compiled program (each loop body once); None where the backend has none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


# ---------------------------------------------------------------------------------------------------------------
# Memory.
# ---------------------------------------------------------------------------------------------------------------


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ``ShapeDtypeStruct`` with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, leaf.dtype))
            total += math.prod(data.shape) * data.dtype.itemsize
        else:
            total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass
class Memory:
    """Per-device bytes of one compiled step.

    The first five split the step's inputs by what they are (from their shapes and shardings); the rest are XLA's
    ``memory_analysis()``. ``peak = arguments + output - alias + temp``: inputs live throughout, the new state
    reuses the donated buffers (alias), temporaries (activations kept for the backward pass among them) come on
    top. ``argument_difference`` is XLA's argument bytes minus the five parts: positive where XLA:TPU pads small
    arrays to its tiles, negative by the inputs the step never reads (jit leaves them out of the program).
    """

    params: int
    opt_state: int
    ema: int
    other_state: int
    batch: int
    arguments: int
    argument_difference: int
    temp: int
    output: int
    alias: int
    generated_code: int
    peak: int


def memory_of(program: StepProgram, compiled) -> Memory:
    stats = compiled.memory_analysis()
    state = program.abstract_state
    parts = {"params": _shard_bytes(state.params), "opt_state": _shard_bytes(state.opt_state),
             "ema": _shard_bytes(state.ema_params), "batch": _shard_bytes(program.abstract_batch)}
    parts["other_state"] = _shard_bytes(state) - parts["params"] - parts["opt_state"] - parts["ema"]
    arguments = int(stats.argument_size_in_bytes)
    output, alias, temp = (int(stats.output_size_in_bytes), int(stats.alias_size_in_bytes),
                           int(stats.temp_size_in_bytes))
    return Memory(**parts, arguments=arguments, argument_difference=arguments - sum(parts.values()), temp=temp,
                  output=output, alias=alias, generated_code=int(stats.generated_code_size_in_bytes),
                  peak=arguments + output - alias + temp)


def _compile_oom(error: Exception) -> str | None:
    """The first line of XLA:TPU's refusal when a program does not fit the chip's HBM, else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "HbmOom" not in text:
        return None
    return text.strip().splitlines()[0]


# ---------------------------------------------------------------------------------------------------------------
# The zoning solver at the step's shapes.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Flow:
    """One zoning flow of the step: its rows per device against its anchors, and how it is computed."""

    name: str
    solver: str
    num_steps: int
    rows_per_device: int
    anchors: int
    kernel: str
    rematerialise: bool
    kept_bytes: int
    budget_bytes: int
    reason: str
    posterior_bytes: int  # one (rows, anchors) float32 posterior


def _flow(name: str, options, rows: int, anchors: int, dim: int) -> Flow:
    plan = zoning.remat_plan(options, batch=rows, num_anchors=anchors, dim=dim)
    kernel = "dense" if options.block_size is None else f"blockwise (block_size={options.block_size})"
    return Flow(name, options.solver, options.num_steps, rows, anchors, kernel, plan.rematerialise,
                plan.kept_bytes, plan.budget_bytes, plan.reason, rows * anchors * 4)


def _label_table_shape(program: StepProgram) -> tuple[int, int]:
    params = program.abstract_state.params["label_anchors"]
    return jax.eval_shape(lambda p: program.modules.label_anchors.apply({"params": p}), params).shape


def solver_flows(program: StepProgram) -> tuple[list[Flow], list[str]]:
    """The step's zoning flows with their kernel and rematerialisation decision, and notes on the config."""
    config = program.config
    rows = int(config.data.batch_size) // program.mesh.devices.size
    global_batch, dim = int(config.data.batch_size), int(config.latent_dim)
    flows, notes = [], []
    if config.objective == "generation":
        if program.modules.encoder is None:
            return [], ["no encoder: no zoning flow in this step (the rectified-flow baseline)"]
        settings = GenerationSettings.from_config(config.generation)
        flows.append(_flow("latents (anchors -> latents)", settings.latent_options, rows, global_batch, dim))
        if program.modules.label_anchors is not None:
            flows.append(_flow("labels (latents -> label anchors)", settings.label_options, rows,
                               _label_table_shape(program)[0], dim))
        blocks = [("generation.latent_solver", config.generation.latent_solver)]
    else:
        settings = ContrastiveSettings.from_config(config.contrastive)
        flows.append(_flow("latents (view-0 anchors -> latents)", settings.latent_options, rows, global_batch, dim))
        flows.append(_flow("alignment (latents -> view-1 anchors)", settings.alignment_options, rows, global_batch,
                           dim))
        blocks = [("contrastive.latent_solver", config.contrastive.latent_solver),
                  ("contrastive.alignment_solver", config.contrastive.alignment_solver)]
    for path, block in blocks:
        if "block_size" not in block:
            notes.append(f"config.{path} has no block_size key (a config written before the kernel keys existed): "
                         "the dense kernel, remat='auto' with the default 2 GiB budget")
    return flows, notes


def solver_function(program: StepProgram) -> tuple[Callable, tuple] | None:
    """The step's zoning flows alone, differentiated as in the step: ``(function, abstract arguments)``.

    Each device solves its rows against all ``B_global`` anchors (gathered inside ``shard_map``, as in the step);
    a linear functional of the latents stands in for the decoder's loss. None when the step has no flow.
    """
    config, mesh = program.config, program.mesh
    global_batch, dim = int(config.data.batch_size), int(config.latent_dim)
    rows = parallel.batch_sharding(mesh)
    matrix = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=rows)
    if config.objective == "generation":
        if program.modules.encoder is None:
            return None
        settings = GenerationSettings.from_config(config.generation)
        if program.modules.label_anchors is None:
            def loss(anchors, noise):
                return jnp.sum(latents_of(anchors, noise, settings.latent_options) * noise)

            return jax.grad(loss), (matrix, matrix)
        num_classes, _ = _label_table_shape(program)
        table = jax.ShapeDtypeStruct((num_classes, dim), jnp.float32, sharding=jax.NamedSharding(mesh, jax.P()))
        labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=rows)

        def joint_loss(anchors, table, noise, labels):
            latents = latents_of(anchors, noise, settings.latent_options)
            assignment = target_log_probs_of(latents, table, labels, settings.label_options,
                                             log_weights=zoning.class_log_weights(labels, num_classes),
                                             context_is_batch=False)
            return jnp.sum(latents * noise) + zoning.target_alignment_loss(
                assignment.target_log_probs, cut_off=settings.label_cut_off, use_log=settings.label_use_log)

        return jax.grad(joint_loss, argnums=(0, 1)), (matrix, table, matrix, labels)
    settings = ContrastiveSettings.from_config(config.contrastive)

    def contrastive(anchors_0, anchors_1, noise):
        latents = latents_of(anchors_0, noise, settings.latent_options)
        targets = jnp.arange(global_batch, dtype=jnp.int32)
        assignment = target_log_probs_of(latents, anchors_1, targets, settings.alignment_options,
                                         context_is_batch=True)
        return zoning.target_alignment_loss(assignment.target_log_probs, cut_off=settings.cut_off, use_log=True)

    return jax.grad(contrastive, argnums=(0, 1)), (matrix, matrix, matrix)


@dataclasses.dataclass
class SolverAlone:
    """The zoning flows compiled alone at the step's shapes (per device)."""

    counted_flops: float
    xla_flops: float | None
    temp_bytes: int
    peak_bytes: int
    compile_seconds: float


def compile_solver_alone(program: StepProgram, *, compiler_options=None) -> SolverAlone | None:
    built = solver_function(program)
    if built is None:
        return None
    function, arguments = built
    options = {**(parallel.compiler_options(program.mesh.devices.flat[0].platform) or {}), **(compiler_options or {})}
    start = time.perf_counter()
    with jax.set_mesh(program.mesh):
        traced = jax.jit(function, compiler_options=options or None).trace(*arguments)
        compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
    outside, inside = counted_flops(traced.jaxpr)
    stats = compiled.memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
    return SolverAlone(outside / program.mesh.devices.size + inside, xla_flops(compiled),
                       int(stats.temp_size_in_bytes), int(peak), round(seconds, 1))


# ---------------------------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Flops:
    """FLOPs of one step on one device.

    Attributes:
      xla: XLA's cost analysis of the compiled per-device program; it counts each loop body once (the solver's
        steps are a loop), so it undercounts the solver.
      counted: matmul and convolution FLOPs from the traced step with every loop times its trip count; work
        outside the solver is divided evenly over the devices.
      solver: the part of ``counted`` inside ``shard_map`` (the zoning solver).
      solver_share: solver / counted.
    """

    xla: float | None
    counted: float
    solver: float
    solver_share: float


@dataclasses.dataclass
class FitReport:
    """Everything the fit check found for one config on one target at one global batch."""

    config: str
    target: str
    topology: str | None
    method: str
    why_not_tpu_aot: str | None
    num_devices: int
    global_batch: int
    per_device_batch: int
    capacity_bytes: int
    fits: bool | None  # None: the step was traced, not compiled
    margin_bytes: int | None
    memory: Memory | None
    compiler_refusal: str | None
    flops: Flops | None
    flows: list[Flow]
    notes: list[str]
    solver_alone: SolverAlone | None
    compile_seconds: float
    search: dict | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fit_check(config: ml_collections.ConfigDict, target: Target, *, mesh: jax.sharding.Mesh | None = None,
              method: str = "auto", compile_step: bool = True, solver_alone: bool = True,
              compiler_options: dict[str, Any] | None = None, config_name: str = "config") -> FitReport:
    """Compiles ``config``'s training step for ``target`` at the config's global batch and reports the fit.

    Args:
      mesh: the devices to compile on (default: ``target_mesh(target, method=method)``); its size must be the
        target's device count.
      compile_step: False traces the step only (FLOPs and solver share in seconds; no memory, no verdict).
      solver_alone: also compile the zoning flows alone (their memory and XLA FLOPs).
      compiler_options: added to the platform's compile options (tests pass a faster CPU compile).
    Raises:
      ValueError: the global batch does not divide over the target's devices (both numbers named).
    """
    why_not = None
    if mesh is None:
        mesh, method, why_not = target_mesh(target, method=method)
    elif method == "auto":
        method = "tpu-aot" if mesh.devices.flat[0].platform == "tpu" else "cpu-estimate"
    if mesh.devices.size != target.num_devices:
        raise ValueError(f"the mesh has {mesh.devices.size} devices, the target {target.num_devices}")
    config = copy.deepcopy(config)
    config.num_devices = target.num_devices
    rows = per_device_batch(config, target.num_devices)
    program = step_program(config, mesh, compiler_options=compiler_options)
    flows, notes = solver_flows(program)
    start = time.perf_counter()
    memory = flops = refusal = None
    step_xla_flops = None
    with jax.set_mesh(mesh):
        traced = program.jitted.trace(program.abstract_state, program.abstract_batch)
        if compile_step:
            try:
                compiled = traced.lower().compile()
                memory, step_xla_flops = memory_of(program, compiled), xla_flops(compiled)
                del compiled
            except Exception as error:
                refusal = _compile_oom(error)
                if refusal is None:
                    raise
    seconds = time.perf_counter() - start
    outside, inside = counted_flops(traced.jaxpr)
    counted = outside / target.num_devices + inside
    flops = Flops(step_xla_flops, counted, inside, inside / counted if counted else 0.0)
    fits = None if not compile_step else (refusal is None and memory.peak <= target.memory_bytes)
    alone = compile_solver_alone(program, compiler_options=compiler_options) if solver_alone else None
    return FitReport(
        config=config_name, target=target.name, topology=target.topology, method=method, why_not_tpu_aot=why_not,
        num_devices=target.num_devices, global_batch=int(config.data.batch_size), per_device_batch=rows,
        capacity_bytes=target.memory_bytes, fits=fits,
        margin_bytes=None if memory is None else target.memory_bytes - memory.peak, memory=memory,
        compiler_refusal=refusal, flops=flops, flows=flows, notes=notes, solver_alone=alone,
        compile_seconds=round(seconds, 1))


# ---------------------------------------------------------------------------------------------------------------
# The largest per-device batch that fits.
# ---------------------------------------------------------------------------------------------------------------

SEARCH_MODES = ("off", "double", "bisect")


@dataclasses.dataclass
class Search:
    """Result of :func:`largest_batch`: per-device batches.

    Attributes:
      largest_fitting: the largest per-device batch that compiled within the memory (None: not even 1 fits, or
        the search ran out of compiles before finding one).
      smallest_failing: the smallest that did not (None: none failed within the compiles allowed).
      tried: ``[(per-device batch, fits, peak bytes or None)]`` in the order compiled.
    """

    mode: str
    largest_fitting: int | None
    smallest_failing: int | None
    tried: list[tuple[int, bool, int | None]]


def largest_batch(measure: Callable[[int], tuple[bool, int | None]], *, start: int, mode: str = "double",
                  capacity: int | None = None, max_compiles: int = 8, multiple: int = 8) -> Search:
    """Searches the per-device batch with as few compiles as it can.

    ``double``: doubles (or halves) from ``start`` until one batch fits and the next does not; the result fits
    and twice it does not. ``bisect``: the largest fitting batch to within ``multiple`` rows. Growing, it jumps
    to where a straight line through the last two fitting peaks meets ``capacity`` (at least doubling, at most
    16x); then it narrows the bracket, each probe placed where the line through the two bracketing peaks meets
    ``capacity`` (kept inside the bracket's middle three quarters). Memory is assumed to grow with the batch.

    Args:
      measure: ``per-device batch -> (fits, peak bytes or None)``, one compile each (memoise it across calls).
      start: the first per-device batch (the config's).
      capacity: the device memory, for placing bisection probes (without it they go to the middle).
      max_compiles: calls of ``measure`` at most.
      multiple: the granularity of ``bisect``.
    """
    if mode not in SEARCH_MODES or mode == "off":
        raise ValueError(f"search mode {mode!r}; use 'double' or 'bisect'")
    tried: list[tuple[int, bool, int | None]] = []
    seen: dict[int, tuple[bool, int | None]] = {}

    def probe(batch: int) -> bool:
        if batch not in seen:
            seen[batch] = measure(batch)
            tried.append((batch, *seen[batch]))
        return seen[batch][0]

    def budget() -> bool:
        return len(tried) < max_compiles

    lo = hi = None
    start = max(1, int(start))
    if probe(start):
        lo = start
        while hi is None and budget():
            larger = 2 * lo
            if mode == "bisect":
                larger = max(larger, min(16 * lo, _extrapolate(seen, capacity, multiple)))
            if probe(larger):
                lo = larger
            else:
                hi = larger
    else:
        hi = start
        while lo is None and hi > 1 and budget():
            if probe(hi // 2):
                lo = hi // 2
            else:
                hi //= 2
        if lo is not None and 2 * lo < hi and budget():  # odd sizes: make "twice the result does not fit" hold
            if probe(2 * lo):
                lo *= 2  # and lo < hi < 2 lo: twice lo fails because hi does
            else:
                hi = 2 * lo
    if mode == "bisect" and lo is not None and hi is not None:
        while hi - lo > max(1, multiple) and budget():
            guess = _interpolate(lo, hi, seen, capacity)
            step = max(1, multiple)
            guess = min(max(lo + step, (guess // step) * step), hi - 1)
            if probe(guess):
                lo = guess
            else:
                hi = guess
    return Search(mode, lo, hi, tried)


def _extrapolate(seen, capacity, multiple: int) -> int:
    """Where a straight line through the two largest fitting batches' peaks reaches ``capacity`` (0: unknown)."""
    fitting = sorted((batch, peak) for batch, (fits, peak) in seen.items() if fits and peak is not None)
    if capacity is None or len(fitting) < 2:
        return 0
    (small, small_peak), (large, large_peak) = fitting[-2:]
    if large_peak <= small_peak:
        return 0
    batch = large + (capacity - large_peak) * (large - small) / (large_peak - small_peak)
    return int(batch) // max(1, multiple) * max(1, multiple)


def _interpolate(lo: int, hi: int, seen, capacity) -> int:
    quarter = (hi - lo) / 8
    low_peak, high_peak = seen[lo][1], seen[hi][1]
    if capacity is None or low_peak is None or high_peak is None or high_peak <= low_peak:
        return (lo + hi) // 2
    guess = lo + (capacity - low_peak) * (hi - lo) / (high_peak - low_peak)
    return int(min(max(guess, lo + quarter), hi - quarter))


def measure_fn(config: ml_collections.ConfigDict, target: Target, mesh: jax.sharding.Mesh, *,
               cache: dict[int, FitReport] | None = None, compiler_options=None, config_name: str = "config"):
    """``per-device batch -> (fits, peak or None)`` for :func:`largest_batch`, compiling the whole step; the
    reports land in ``cache`` (keyed by per-device batch), which later calls reuse. Fits means: compiled, and the
    peak is within ``target.memory_bytes``."""
    cache = {} if cache is None else cache

    def measure(batch: int) -> tuple[bool, int | None]:
        if batch not in cache:
            cache[batch] = fit_check(with_global_batch(config, batch * target.num_devices), target, mesh=mesh,
                                     solver_alone=False, compiler_options=compiler_options, config_name=config_name)
        memory = cache[batch].memory  # None: the compiler refused it
        return memory is not None and memory.peak <= target.memory_bytes, None if memory is None else memory.peak

    return measure


# ---------------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------------


# XLA's count includes elementwise work the matmul count leaves out, but in the paper's settings it stays within
# about 10 % of it when the work is split over the devices (docs/scaling.md, "What the table says").
REPLICATION_HINT = 3.0


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= GIB:
        return f"{value / GIB:9.3f} GiB"
    return f"{value / 2**20:9.1f} MiB" if abs(value) >= 2**20 else f"{int(value):9d} B  "


def _flops(value: float | None) -> str:
    return "-" if value is None else f"{value:10.3e}"


def _target_line(report: FitReport) -> str:
    if report.topology:
        generation = TPU_GENERATIONS[report.topology.split(":")[0]]
        shape = "" if report.topology == report.target else f" = {report.topology}"
        return (f"{report.target}{shape}: {report.num_devices} {generation.name} chips ({generation.nominal} HBM, "
                f"{report.capacity_bytes / GIB:.2f} GiB for programs)")
    return f"{report.num_devices} devices of {report.capacity_bytes / GIB:.2f} GiB"


def _verdict(report: FitReport) -> str:
    if report.fits is None:
        return "verdict: none (the step was traced, not compiled)"
    if report.memory is None:
        return f"verdict: DOES NOT FIT: XLA:TPU refused the step: {report.compiler_refusal}"
    share = 100 * report.memory.peak / report.capacity_bytes
    if report.fits:
        return f"verdict: FITS, margin {_bytes(report.margin_bytes).strip()} (peak {share:.0f} % of the device)"
    return f"verdict: DOES NOT FIT, {_bytes(-report.margin_bytes).strip()} over (peak {share:.0f} % of the device)"


def format_report(report: FitReport) -> str:
    """The report as the table the command line prints."""
    lines = [f"fit check: {report.config} on {_target_line(report)}  [{report.method}]"]
    if report.why_not_tpu_aot:
        lines.append(f"  (XLA:CPU instead of XLA:TPU: {report.why_not_tpu_aot})")
    done = "compiled" if report.fits is not None else "traced"
    lines.append(f"global batch {report.global_batch:,} = {report.per_device_batch:,} per device x "
                 f"{report.num_devices} devices; step {done} in {report.compile_seconds:.1f} s")
    memory = report.memory
    if memory is not None:
        rows = [
            ("parameters", memory.params), ("optimiser state (Adam moments, counts)", memory.opt_state),
            ("EMA parameters", memory.ema), ("other state (step, rng, EMA counts, skips)", memory.other_state),
            ("batch (uint8 pixels, labels)", memory.batch),
            ("arguments as XLA counts them", memory.arguments),
            ("  XLA minus the shapes above (1)", memory.argument_difference),
            ("activations and temporaries (XLA temp)", memory.temp),
            ("output (new state, metrics)", memory.output),
            ("aliased with the donated state (-)", memory.alias),
            ("peak = arguments + output - aliased + temp", memory.peak),
            ("device memory", report.capacity_bytes),
            ("generated code (not in the peak)", memory.generated_code),
        ]
        lines += ["", "per-device memory"] + [f"  {label:<46s}{_bytes(value):>14s}" for label, value in rows]
        if memory.argument_difference:
            lines.append("  (1) above 0: XLA:TPU pads small arrays to its tiles; below 0: inputs the step never "
                         "reads,\n      which jit leaves out (the pipeline still places them on the device)")
    lines += [_verdict(report), "", "FLOPs per step and device"]
    flops = report.flops
    lines.append(f"  {'XLA cost analysis (each loop body once)':<46s}{_flops(flops.xla):>14s}")
    lines.append(f"  {'matmul + conv, loops x trip counts':<46s}{_flops(flops.counted):>14s}")
    lines.append(f"  {'  of which the zoning solver (shard_map)':<46s}{_flops(flops.solver):>14s}"
                 f"   {100 * flops.solver_share:.2f} % of the step")
    if flops.xla is not None and flops.xla > REPLICATION_HINT * flops.counted:
        lines.append(f"  warning: XLA's per-device FLOPs are {flops.xla / flops.counted:.0f}x the counted ones, beyond "
                     "what elementwise work explains:\n  part of the step is probably computed whole on every device "
                     "instead of split over them (docs/scaling.md)")
    if report.flows:
        lines += ["", "zoning flows (per device: own rows x all anchors)"]
        for flow in report.flows:
            remat = "rematerialises each step" if flow.rematerialise else "keeps every step's posterior"
            lines.append(f"  {flow.name}: {flow.solver}, {flow.num_steps} steps, {flow.rows_per_device:,} x "
                         f"{flow.anchors:,}, {flow.kernel} kernel, {remat} ({flow.reason}); one posterior "
                         f"{_bytes(flow.posterior_bytes).strip()}")
    lines += [f"  note: {note}" for note in report.notes]
    alone = report.solver_alone
    if alone is not None:
        lines.append(f"  the flows compiled alone ({alone.compile_seconds:.1f} s): temp "
                     f"{_bytes(alone.temp_bytes).strip()}, peak {_bytes(alone.peak_bytes).strip()}; matmul FLOPs "
                     f"{alone.counted_flops:.3e} (XLA cost analysis: {_flops(alone.xla_flops).strip()})")
    if report.search is not None:
        lines += ["", _format_search(report.search)]
    return "\n".join(lines)


def _format_search(search: dict) -> str:
    tried = ", ".join(f"{batch} {'fits' if fits else 'does not'}" + (f" ({_bytes(peak).strip()})" if peak else "")
                      for batch, fits, peak in search["tried"])
    return (f"largest per-device batch that fits (--max_batch_search={search['mode']}): {search['largest_fitting']};"
            f" smallest that does not: {search['smallest_failing']}\n  per-device batches compiled: {tried}")


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------


def _prepare_jax(num_devices: int) -> None:
    """Before JAX starts: CPU only (with libtpu installed, JAX would otherwise look for TPU chips), and as many
    fake CPU devices as the target has, for an XLA:CPU compile at the target's per-device shapes."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()


def _run() -> None:
    """The command line; its flags are defined only here, so importing this module defines none."""
    from absl import app, flags
    from ml_collections import config_flags

    from lzn_jax import entry

    config_flag = config_flags.DEFINE_config_file("config", None, "Config of the setting (configs/<setting>.py"
                                                  "[:variants]; --config.key=value overrides work).", lock_config=True)
    topology = flags.DEFINE_string("topology", None, f"A TPU slice: {_known_topologies()} (chips), or a shape "
                                   "such as v5e:8x8.")
    devices = flags.DEFINE_integer("devices", None, "Number of accelerators (e.g. GPUs); needs --device_memory.")
    device_memory = flags.DEFINE_string("device_memory", None, "Memory per device, e.g. 40GB or 80GiB (with "
                                        "--topology: instead of the chip's usable HBM).")
    method = flags.DEFINE_enum("method", "auto", ["auto", "tpu-aot", "cpu-estimate"], "How to compile a TPU "
                               "target: XLA:TPU when libtpu is installed (auto), XLA:TPU only, or XLA:CPU.")
    search = flags.DEFINE_enum("max_batch_search", "off", list(SEARCH_MODES), "Search the largest per-device "
                               "batch that fits: off, double (fits, and twice it does not) or bisect (to "
                               "--batch_multiple rows). Each probe compiles the whole step (minutes on a CPU).")
    max_compiles = flags.DEFINE_integer("max_compiles", 6, "Most step compiles the search may spend (the first, "
                                        "at the config's batch, included).")
    multiple = flags.DEFINE_integer("batch_multiple", 8, "Granularity of --max_batch_search=bisect.")
    compile_step = flags.DEFINE_bool("compile_step", True, "Compile the step (memory and verdict); "
                                     "--nocompile_step only traces it: FLOPs and the solver's share in seconds.")
    solver_alone = flags.DEFINE_bool("solver_alone", True, "Also compile the zoning flows alone.")
    json_path = flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
    flags.mark_flags_as_required(["config"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        entry.quiet_library_logs()
        try:
            if (topology.value is None) == (devices.value is None):
                raise ValueError("give exactly one of --topology (a TPU slice) and --devices (with --device_memory)")
            memory = None if device_memory.value is None else parse_memory(device_memory.value)
            if topology.value is not None:
                target = tpu_target(topology.value, memory_bytes=memory)
            elif memory is None:
                raise ValueError("--devices needs --device_memory (e.g. --device_memory=40GB)")
            else:
                target = device_target(devices.value, memory)
            config = config_flag.value
            per_device_batch(config, target.num_devices)  # refused before anything compiles
        except ValueError as error:
            raise SystemExit(f"fit: {error}") from None
        _prepare_jax(target.num_devices)
        name = flags.FLAGS["config"].config_filename
        report = fit_check(config, target, method=method.value, compile_step=compile_step.value,
                           solver_alone=solver_alone.value, config_name=name)
        if search.value != "off" and compile_step.value:
            cache = {report.per_device_batch: report}
            mesh, _, _ = target_mesh(target, method=report.method)
            result = largest_batch(measure_fn(config, target, mesh, cache=cache, config_name=name),
                                   start=report.per_device_batch, mode=search.value, capacity=target.memory_bytes,
                                   max_compiles=max_compiles.value, multiple=multiple.value)
            report.search = dataclasses.asdict(result)
        print(format_report(report), flush=True)
        if json_path.value:
            path = pathlib.Path(json_path.value)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report.to_json(), indent=1) + "\n")
            print(f"(also written to {path})")

    app.run(main)


if __name__ == "__main__":
    _run()
