"""The functional API over a trained checkpoint, for notebooks: ``load`` a workdir, then ``embed``, ``anchors``,
``latents``, ``generate``, ``classify`` and ``reconstruct``, the compositions of the paper's Figure 1.

Every function is pure given its arguments and compiles once per model configuration, input shape and static
option (docs/design.md, "The functional API"). Images go in as uint8 (B, H, W, C) pixels or float in [-1, 1].
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lzn_jax import checkpoint, parallel, sampling, zoning
from lzn_jax.data.device import to_float_images
from lzn_jax.evaluation import classification
from lzn_jax.objectives.latents import BATCH_AXIS, latents_of
from lzn_jax.train.state import Modules, abstract_train_state, build_modules, encoder_input_channels

__all__ = [
    "Model",
    "Reconstruction",
    "anchors",
    "classify",
    "embed",
    "generate",
    "latents",
    "load",
    "reconstruct",
    "trace_counts",
]

Sampler = Literal["euler", "dopri5"] | sampling.SamplerOptions


# ---------------------------------------------------------------------------------------------------------------
# The loaded model.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A trained checkpoint: what every function of this module takes first. Immutable; build it with :func:`load`.

    Attributes:
      config: the run's config, read back from ``<workdir>/config.json`` (frozen: hashable, lists as tuples).
      modules: the unbound Flax modules the config names (``encoder``, ``decoder``, ``label_anchors``; None where
        the setting has none).
      params: ``{module: params}``, the EMA weights or the raw ones (``ema``).
      step: the training step of the checkpoint.
      ema: whether ``params`` are the EMA weights.
      workdir: where it was read from.
    """

    config: ml_collections.FrozenConfigDict
    modules: Modules
    params: dict[str, Any]
    step: int
    ema: bool
    workdir: pathlib.Path
    # Copies of ``params`` already placed with a given sharding (one per mesh a call has used), so that calls do not
    # transfer the weights again. Not part of the value.
    _placed: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the encoder and decoder were trained on."""
        size = int(self.config.data.image_size)
        return size, size, encoder_input_channels(self.config.data)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional decoder (0 for an unconditional one or a model without a decoder)."""
        return int(getattr(self.modules.decoder, "num_classes", 0) or 0)

    def __repr__(self) -> str:
        weights = "EMA" if self.ema else "raw"
        return (f"Model({self.config.objective}, {', '.join(self.modules.present())}, step {self.step}, {weights} "
                f"weights, images {self.image_shape}, from {self.workdir})")


def _listing(directory: pathlib.Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    return ", ".join(names) if names else "nothing"


def _read_config(workdir: pathlib.Path) -> ml_collections.FrozenConfigDict:
    if not workdir.is_dir():
        parent = next((p for p in workdir.parents if p.is_dir()), None)
        where = f"; {parent} holds: {_listing(parent)}" if parent is not None else ""
        raise FileNotFoundError(f"no workdir {workdir}{where}. Pass the --workdir of a training run "
                                "(python -m lzn_jax.main --config=... --workdir=...)")
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} has no config.json (a training run writes it when it starts); it holds: "
                                f"{_listing(workdir)}")
    return ml_collections.FrozenConfigDict(ml_collections.ConfigDict(json.loads(path.read_text())))


def _load_sharding() -> jax.sharding.Sharding:
    """Replicated over the ambient mesh (``jax.set_mesh``), else on the default device."""
    mesh = jax.sharding.get_mesh()
    if not mesh.empty:
        return jax.NamedSharding(mesh, jax.P())
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


@functools.lru_cache(maxsize=16)
def _abstract_params(config: ml_collections.FrozenConfigDict, sharding: jax.sharding.Sharding) -> dict[str, Any]:
    """``{"params": ..., "ema_params": ...}`` of the config's train state as ShapeDtypeStructs placed with
    ``sharding`` (traced once per config: a notebook reloading a workdir does not trace the model again)."""
    from lzn_jax.train import optim  # only load needs the optimiser's state structure

    modules = build_modules(config)
    abstract = abstract_train_state(config, modules, optim.make_optimizer(config, modules.present()), sharding)
    return {"params": abstract.params, "ema_params": abstract.ema_params}


def load(workdir: str | pathlib.Path, step: int | None = None, *, ema: bool = True) -> Model:
    """Reads a training run's config and the weights of one checkpoint.

    Args:
      workdir: the ``--workdir`` of a training run (it holds ``config.json`` and ``checkpoints/``).
      step: the checkpoint step to read; default the newest complete one.
      ema: the EMA weights (what evaluation uses) or the raw ones. Only that subtree is read from disk.

    Returns:
      A :class:`Model`; its params are replicated over the ambient mesh (``jax.set_mesh``), or on the default
      device when there is none.

    Raises:
      FileNotFoundError: no such workdir, no config.json, no complete checkpoint, or no checkpoint of ``step``;
        the message says what exists instead.
      checkpoint.IncompatibleCheckpointError: the checkpoint does not fit the config next to it (leaves named).
    """
    workdir = pathlib.Path(workdir)
    config = _read_config(workdir)
    directory = workdir / "checkpoints"
    steps = checkpoint.Checkpointer(directory, handle_sigterm=False).all_steps() if directory.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint; {workdir} holds: {_listing(workdir)}. "
                                "Train (or resume) with the same --workdir first.")
    if step is None:
        step = steps[-1]
    elif int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; available steps: "
                                f"{', '.join(map(str, steps))}")
    sharding = _load_sharding()
    subtree = "ema_params" if ema else "params"
    params = checkpoint.restore_params(directory, _abstract_params(config, sharding)[subtree], step=int(step),
                                       subtree=subtree)
    model = Model(config=config, modules=build_modules(config), params=params, step=int(step), ema=bool(ema),
                  workdir=workdir)
    model._placed[sharding] = params
    return model


# ---------------------------------------------------------------------------------------------------------------
# Programs: one jitted function per (config, function, static options, mesh), built on first use.
# ---------------------------------------------------------------------------------------------------------------

_PROGRAMS: dict[tuple, Callable] = {}
_TRACES: collections.Counter = collections.Counter()


def trace_counts() -> dict[str, int]:
    """How many times each API function has been traced (compiled) in this process, e.g. ``{"latents": 1}``: a
    repeated call with the same model configuration, shapes and options adds nothing."""
    return dict(_TRACES)


def _program(model: Model, name: str, build: Callable[..., Callable], static: tuple,
             mesh: jax.sharding.Mesh | None) -> Callable:
    """The jitted ``build(model.modules, *static)``, cached under the model's config (two loads of one config
    share it) and the mesh it runs on."""
    key = (model.config, name, static, mesh)
    if key not in _PROGRAMS:
        body = build(model.modules, *static)

        def traced(*args, **kwargs):
            _TRACES[name] += 1  # runs at trace time only
            return body(*args, **kwargs)

        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        out = {} if mesh is None else {"out_shardings": jax.NamedSharding(mesh, jax.P(BATCH_AXIS))}
        _PROGRAMS[key] = jax.jit(traced, compiler_options=parallel.compiler_options(platform), **out)
    return _PROGRAMS[key]


def _mesh_for(rows: int) -> jax.sharding.Mesh | None:
    """The ambient mesh when it has a data axis that divides ``rows``; None: run on one device."""
    mesh = jax.sharding.get_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names or rows % mesh.shape[BATCH_AXIS]:
        return None
    return mesh


def _run(model: Model, name: str, build: Callable, static: tuple, rows: int, *, batch: tuple, replicated: tuple):
    """Runs a program with ``batch`` (arrays or None, leading dim ``rows``) sharded over the ambient mesh's data
    axis when it divides, ``replicated`` copied everywhere; otherwise everything on one device."""
    mesh = _mesh_for(rows)
    if mesh is None:
        ambient = jax.sharding.get_mesh()
        device = ambient.devices.flat[0] if not ambient.empty else jax.devices()[0]
        row_sharding = whole = jax.sharding.SingleDeviceSharding(device)
    else:
        row_sharding, whole = jax.NamedSharding(mesh, jax.P(BATCH_AXIS)), jax.NamedSharding(mesh, jax.P())
    params = model._placed.get(whole)
    if params is None:
        params = model._placed[whole] = jax.device_put(model.params, whole)
    fn = _program(model, name, build, static, mesh)
    batch = tuple(None if x is None else jax.device_put(x, row_sharding) for x in batch)
    replicated = tuple(None if x is None else jax.device_put(x, whole) for x in replicated)
    # Without a usable mesh the program is traced with none, so the solver runs unsharded.
    with jax.set_mesh(mesh):
        return fn(params, *batch, *replicated)


# ---------------------------------------------------------------------------------------------------------------
# Checks of user input (host side, before anything is traced).
# ---------------------------------------------------------------------------------------------------------------


def _check_images(model: Model, images) -> int:
    shape = np.shape(images)
    if len(shape) != 4 or tuple(shape[1:]) != model.image_shape:
        raise ValueError(f"images must be (B, {', '.join(map(str, model.image_shape))}) like the model's training "
                         f"data, got shape {shape}")
    dtype = np.dtype(images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype)
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise ValueError(f"images must be uint8 pixels or floats in [-1, 1], got dtype {dtype}")
    return shape[0]


def _check_labels(model: Model, labels, rows: int) -> None:
    values = np.asarray(jax.device_get(labels))
    if values.shape != (rows,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"labels must be ({rows},) integers, got {values.dtype} of shape {values.shape}")
    if values.size and (values.min() < 0 or values.max() >= model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}), got {values.min()} to {values.max()}")


# The width of each configuration's anchors, found once by tracing shapes only.
_ANCHOR_DIMS: dict[ml_collections.FrozenConfigDict, int] = {}


def _check_context(model: Model, context) -> None:
    """``context`` must be (N, D) anchors of this model's encoder."""
    if model.config not in _ANCHOR_DIMS:
        size, _, channels = model.image_shape
        shape = jax.eval_shape(lambda params, x: _anchors(model.modules, params, x), model.params,
                               jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)).shape
        _ANCHOR_DIMS[model.config] = shape[1]
    zoning.flows.check_matrix("context", context, dim=_ANCHOR_DIMS[model.config])


def _need(model: Model, module: str, what: str) -> None:
    if getattr(model.modules, module) is None:
        raise ValueError(f"{what} needs a model with a {module}; this one has {', '.join(model.modules.present())}")


def _sampler_options(sampler: Sampler) -> sampling.SamplerOptions:
    if isinstance(sampler, sampling.SamplerOptions):
        return sampler
    choices = {"euler": sampling.EULER, "dopri5": sampling.DOPRI5}
    if sampler not in choices:
        raise ValueError(f"sampler={sampler!r} does not exist; use 'euler', 'dopri5' or a sampling.SamplerOptions")
    return choices[sampler]


# ---------------------------------------------------------------------------------------------------------------
# Traced building blocks.
# ---------------------------------------------------------------------------------------------------------------


def _model_inputs(images: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1] as the data pipeline converts them; floats are taken as they are."""
    return to_float_images(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)


def _encode(modules: Modules, params, images: jax.Array):
    return modules.encoder.apply({"params": params["encoder"]}, _model_inputs(images), train=False)


def _anchors(modules: Modules, params, images: jax.Array) -> jax.Array:
    """Anchors (B, D) float32 of uint8 or [-1, 1] images, the encoder in evaluation mode."""
    return classification.eval_anchors(modules.encoder, params["encoder"], _model_inputs(images))


def _own_zone_latents(anchors: jax.Array, noise: jax.Array, context: jax.Array) -> jax.Array:
    """Latents (B, D) with each row solved on its own against ``context`` (N, D) plus its own anchor, so that a
    row does not depend on the others (docs/evaluation.md, "Classifying one image at a time")."""

    def one(anchor, noise_row):
        own = anchor[None]
        zones = jnp.concatenate([context.astype(own.dtype), own])
        own_index = jnp.full((1,), context.shape[0], jnp.int32)  # the own anchor is the last row of the zones
        return zoning.compute_latents(own, noise_row[None], context=zones, own_index=own_index,
                                      options=classification.IMAGE_LATENT_OPTIONS)[0]

    return jax.vmap(one)(anchors, noise)


def _latents(modules: Modules, params, images, rng, prior_scale, context) -> jax.Array:
    """The image latents: the encoder's anchors, the prior draw ``prior_scale * N(0, I)`` from ``rng`` (the draw
    ``evaluation.classify`` makes), DPM-Solver++ 20 steps against the batch, or row by row against ``context``."""
    anchors = _anchors(modules, params, images)
    noise = prior_scale * jax.random.normal(rng, anchors.shape, jnp.float32)
    if context is None:
        return latents_of(anchors, noise, classification.IMAGE_LATENT_OPTIONS)
    return _own_zone_latents(anchors, noise, context)


def _onehot(modules: Modules, labels):
    classes = getattr(modules.decoder, "num_classes", 0)
    return jax.nn.one_hot(labels, classes, dtype=jnp.float32) if classes and labels is not None else None


# ---------------------------------------------------------------------------------------------------------------
# The public functions.
# ---------------------------------------------------------------------------------------------------------------


def _build_embed(modules: Modules):
    def embed_fn(params, images):
        output = _encode(modules, params, images)
        return (output.features if hasattr(output, "features") else output).astype(jnp.float32)

    return embed_fn


def embed(model: Model, images) -> jax.Array:
    """The representation the probes read: (B, F) float32.

    A ResNet encoder (case study 2) gives its globally pooled backbone features (F = 2048 x width), the features
    the paper's linear probe uses; an NCSN++ encoder, which has no separate backbone output, gives its anchors
    (F = latent_dim). ``images``: (B, H, W, C) uint8 or float in [-1, 1]. The encoder runs in evaluation mode.
    """
    _need(model, "encoder", "embed")
    rows = _check_images(model, images)
    return _run(model, "embed", _build_embed, (), rows, batch=(images,), replicated=())


def _build_anchors(modules: Modules):
    def anchors_fn(params, images):
        return _anchors(modules, params, images)

    return anchors_fn


def anchors(model: Model, images) -> jax.Array:
    """The encoder's anchors (B, latent_dim) float32 (a ResNet's projection-head output); ``images`` (B, H, W, C)
    uint8 or float in [-1, 1]. The context :func:`latents` and :func:`classify` take in inductive mode."""
    _need(model, "encoder", "anchors")
    rows = _check_images(model, images)
    return _run(model, "anchors", _build_anchors, (), rows, batch=(images,), replicated=())


def _build_latents(modules: Modules):
    def latents_fn(params, images, rng, prior_scale, context):
        return _latents(modules, params, images, rng, prior_scale, context)

    return latents_fn


def latents(model: Model, images, rng: jax.Array, *, prior_scale: float = 1.0, context=None) -> jax.Array:
    """Latents (B, latent_dim) float32 of ``images`` (B, H, W, C) uint8 or float in [-1, 1].

    The encoder's anchors flow forward with DPM-Solver++ (20 steps, the paper's image flow) from the prior draw
    ``prior_scale * N(0, I)`` taken from ``rng`` (alpha; 0 gives the zone centres). Without ``context`` each latent
    is solved against all B anchors of the batch, as in training and in the paper's evaluation, so it depends on
    its batch-mates. With ``context`` (N, latent_dim), e.g. ``anchors(model, training_images)``, each row is solved
    alone against the N context anchors plus its own, and no longer depends on the rest of the batch (memory
    O(B N latent_dim): split large sets into batches).
    """
    _need(model, "encoder", "latents")
    rows = _check_images(model, images)
    if context is not None:
        _check_context(model, context)
    return _run(model, "latents", _build_latents, (), rows, batch=(images,),
                replicated=(rng, jnp.float32(prior_scale), context))


def _build_generate(modules: Modules, count: int, image_shape: tuple, options: sampling.SamplerOptions):
    decoder = modules.decoder

    def generate_fn(params, labels, rng):
        # The sampling path of the training loop's grids (lzn_jax.train.loop.make_sample_fn), with any sampler.
        noise_key, latent_key = jax.random.split(rng)
        noise = jax.random.normal(noise_key, (count, *image_shape), jnp.float32)
        latents = None
        if decoder.latent_dim > 0:
            latents = sampling.unconditional_latents(latent_key, count, decoder.latent_dim)
            if modules.label_anchors is not None and labels is not None:
                table = modules.label_anchors.apply({"params": params["label_anchors"]})
                latents = sampling.class_conditional_latents(table, labels, latents)
        return sampling.sample_images(decoder, params["decoder"], noise, latents=latents,
                                      label_onehot=_onehot(modules, labels), options=options).x

    return generate_fn


def generate(model: Model, rng: jax.Array, n: int, labels=None, *, sampler: Sampler = "euler") -> jax.Array:
    """``n`` new images (n, H, W, C) float32, nominally in [-1, 1] and not clipped (``sampling.to_uint8`` and
    ``sampling.image_grid`` make pictures of them).

    The latent comes from the prior: z ~ N(0, I) for an unconditional model; for a joint model with ``labels``
    (n,) the forward label flow from each class's anchor (100 Euler steps); the Rectified Flow baseline has none.
    A class-conditional decoder needs ``labels`` (its one-hot input). The image ODE runs from noise drawn from
    ``rng`` with ``sampler``: "euler" (10 steps), "dopri5" (adaptive, rtol = atol = 1e-5, the paper's sampler), or
    any ``sampling.SamplerOptions``.
    """
    _need(model, "decoder", "generate")
    count = int(n)
    if count < 1:
        raise ValueError(f"n must be a positive number of images, got {n}")
    if labels is not None:
        if model.num_classes == 0:
            raise ValueError("this model's decoder is unconditional: call generate without labels")
        _check_labels(model, labels, count)
        labels = jnp.asarray(labels, jnp.int32)
    elif model.num_classes:
        raise ValueError(f"this decoder is class-conditional ({model.num_classes} classes): pass labels (n,), e.g. "
                         f"np.arange(n) % {model.num_classes}")
    options = _sampler_options(sampler)
    return _run(model, "generate", _build_generate, (count, model.image_shape, options), count,
                batch=(labels,), replicated=(rng,))


def _build_classify(modules: Modules):
    def classify_fn(params, images, rng, prior_scale, context):
        table = modules.label_anchors.apply({"params": params["label_anchors"]})
        if context is None:
            return classification.classify(modules.encoder, params["encoder"], table, _model_inputs(images), rng,
                                           prior_scale=prior_scale)
        latents = _latents(modules, params, images, rng, prior_scale, context)
        return classification.decode_labels(latents, table)

    return classify_fn


def classify(model: Model, images, rng: jax.Array, *, mode: Literal["transductive", "inductive"] = "transductive",
             context=None, prior_scale: float = 1.0) -> jax.Array:
    """Predicted classes (B,) int32 of ``images`` (B, H, W, C) uint8 or float in [-1, 1] by a joint model.

    Image latents as in :func:`latents` (DPM-Solver++ 20 steps from ``prior_scale * N(0, I)``), then the reverse
    label flow (100 Euler steps, uniform class weights) and the nearest label anchor.

    mode "transductive" (the paper's): ``evaluation.classify`` on the batch; each latent is solved against the
    batch's B anchors, so a prediction depends on the batch-mates, the batch size and ``prior_scale``.
    mode "inductive": each latent is solved alone against ``context`` (N, latent_dim), the anchors of a fixed set
    of training images (``anchors(model, train_images)``), plus its own anchor; with a fixed ``rng`` and batch
    size an image's prediction is the same whatever its batch-mates (docs/evaluation.md, "Classifying one image
    at a time").
    """
    _need(model, "label_anchors", "classify")
    rows = _check_images(model, images)
    if mode not in ("transductive", "inductive"):
        raise ValueError(f"mode={mode!r} does not exist; use 'transductive' or 'inductive'")
    if (mode == "inductive") != (context is not None):
        raise ValueError("inductive classification needs context=anchors(model, train_images) (N, latent_dim); "
                         "transductive classification takes no context")
    if context is not None:
        _check_context(model, context)
    return _run(model, "classify", _build_classify, (), rows, batch=(images,),
                replicated=(rng, jnp.float32(prior_scale), context))


class Reconstruction(NamedTuple):
    """What :func:`reconstruct` returns.

    images: (B, H, W, C) float32, the regenerated images (not clipped).
    noise: (B, H, W, C) float32, the inverted noise at time ``time_eps`` they were regenerated from.
    distances: (B,) float32, each image's ``||reconstruction - image||_2`` over all pixels in [-1, 1] units (the
      paper's reconstruction error, averaged over images and prior draws).
    """

    images: jax.Array
    noise: jax.Array
    distances: jax.Array


def _build_reconstruct(modules: Modules, options: sampling.SamplerOptions):
    decoder = modules.decoder

    def reconstruct_fn(params, images, labels, rng, prior_scale):
        x = _model_inputs(images)
        latents = _latents(modules, params, images, rng, prior_scale, None) if decoder.latent_dim > 0 else None
        conditioning = {"latents": latents, "label_onehot": _onehot(modules, labels), "options": options}
        noise = sampling.invert_images(decoder, params["decoder"], x, **conditioning).x
        regenerated = sampling.sample_images(decoder, params["decoder"], noise, **conditioning).x
        distances = jnp.sqrt(jnp.sum(jnp.square(regenerated - x), axis=(1, 2, 3)))
        return Reconstruction(regenerated, noise, distances)

    return reconstruct_fn


def reconstruct(model: Model, images, rng: jax.Array, labels=None, *, sampler: Sampler = "euler",
                prior_scale: float = 1.0) -> Reconstruction:
    """Inverts ``images`` (B, H, W, C) uint8 or float in [-1, 1] to noise and regenerates them (the paper's
    reconstruction metric for one prior draw).

    The latent comes from the encoder as in :func:`latents` (against the batch; prior draw from ``rng``); the
    decoder's ODE runs backwards from the image to ``time_eps`` with that latent (and ``labels`` (B,), the true
    classes, which a class-conditional decoder needs), then forwards from that noise with the same conditioning.
    The Rectified Flow baseline has no latent. ``sampler`` as for :func:`generate`; the noise is the ODE state at
    ``time_eps`` (``sampling.invert``'s default). Returns a :class:`Reconstruction`. The reported metric (20 prior
    draws, the reference's inversion form, its protocol) is ``lzn_jax.evaluation.reconstruction``'s.
    """
    _need(model, "decoder", "reconstruct")
    rows = _check_images(model, images)
    if model.modules.decoder.latent_dim > 0:
        _need(model, "encoder", "reconstruct with a latent")
    if model.num_classes:
        if labels is None:
            raise ValueError(f"this decoder is class-conditional ({model.num_classes} classes): pass the images' "
                             "labels (B,)")
        _check_labels(model, labels, rows)
        labels = jnp.asarray(labels, jnp.int32)
    elif labels is not None:
        raise ValueError("this model's decoder is unconditional: call reconstruct without labels")
    options = _sampler_options(sampler)
    return _run(model, "reconstruct", _build_reconstruct, (options,), rows, batch=(images, labels),
                replicated=(rng, jnp.float32(prior_scale)))
