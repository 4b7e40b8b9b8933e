"""Converts a checkpoint of the PyTorch reference (microsoft/latent-zoning-networks) into a workdir of ours.

  python -m lzn_jax.tools.import_reference --checkpoint=000008000-000200000.pt \
      --config=configs/cifar10_joint.py --workdir=/path/to/workdir
  python -m lzn_jax.main --config=configs/cifar10_joint.py --workdir=/path/to/workdir --mode=eval

The workdir gets one checkpoint (the full train state at the reference's iteration: weights, EMA weights and EMA
counts from the file, a fresh optimiser state) and config.json, so evaluation and resumed training work on it. The
file is read without torch and without running any of its pickled code. docs/design.md ("Importing the reference's
checkpoints") explains the mapping and what the converter checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lzn_jax.tools import reference_names
from lzn_jax.tools.reference_names import Leaf

# The reference trainer wraps each model in a DistributedDataParallel inside a wrapper whose attribute is `model`.
REFERENCE_PREFIX = "model.module."
# Our module name -> the key of its state dict in the reference's checkpoint (its EMA is under KEY + "_ema").
FILE_KEYS = {"encoder": "encoder", "decoder": "decoder", "label_anchors": "label_anchor"}
# Other entries of the reference's checkpoint: read (iteration) or deliberately not used.
_OTHER_ENTRIES = ("optimizer", "lr_scheduler", "epoch", "iteration", "grad_scalar")
# Our configs that hold each combination of modules, for the refusal message.
_SETTINGS_BY_MODULES = {
    ("encoder", "decoder", "label_anchors"): "configs/cifar10_joint.py",
    ("encoder", "decoder"): "configs/cifar10_gen.py, afhq_cat_gen.py, celebahq_gen.py or lsun_bedroom_gen.py",
    ("encoder",): "configs/imagenet_repr.py",
}
_MAX_LISTED = 20
IMPORT_RECORD = "reference_import.json"


class ReferenceImportError(ValueError):
    """The file does not fit the config (modules, names, shapes) or is not a checkpoint of the reference trainer."""


# ---------------------------------------------------------------------------------------------------------------
# Checks on the file's contents.
# ---------------------------------------------------------------------------------------------------------------


def _listed(lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED] + ([f"... and {len(lines) - _MAX_LISTED} more"] if len(lines) > _MAX_LISTED else [])
    return "\n".join(f"    {line}" for line in shown)


def file_modules(reference: Mapping[str, Any]) -> tuple[str, ...]:
    """Our names of the modules whose state dicts the reference checkpoint holds, in our order."""
    return tuple(module for module, key in FILE_KEYS.items() if key in reference)


def check_entries(reference: Any, present: tuple[str, ...]) -> None:
    """Refuses anything but the dict the reference trainer saves, and a file whose modules differ from ``present``.

    Args:
      reference: what `read_torch_checkpoint` returned.
      present: our config's modules (`Modules.present()`).
    """
    if not isinstance(reference, Mapping):
        raise ReferenceImportError(
            f"the file holds a {type(reference).__name__}, not the dict the reference trainer saves (with the keys "
            "encoder, decoder, optimizer, iteration, ...)"
        )
    known = set(FILE_KEYS.values()) | {f"{key}_ema" for key in FILE_KEYS.values()} | set(_OTHER_ENTRIES)
    unknown = sorted(str(key) for key in reference if key not in known)
    if unknown:
        raise ReferenceImportError(
            f"the file has entries the reference trainer does not write: {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(known))}"
        )
    in_file = file_modules(reference)
    if in_file != present:
        fitting = _SETTINGS_BY_MODULES.get(in_file, "none of ours")
        raise ReferenceImportError(
            f"the config has the modules {', '.join(present) or 'none'} but the file has "
            f"{', '.join(in_file) or 'none'}; pass the config of the setting the file was trained with ({fitting})"
        )
    for module in in_file:
        ema = reference.get(FILE_KEYS[module] + "_ema")
        if ema is not None and not (isinstance(ema, Mapping) and isinstance(ema.get("shadow_params"), list)):
            raise ReferenceImportError(
                f"the file's {FILE_KEYS[module]}_ema is not an EMA state (it has no shadow_params list)")


def strip_prefix(state_dict: Any, module: str) -> dict[str, np.ndarray]:
    """The module's state dict with the trainer's ``model.module.`` prefix removed.

    A state dict saved from the bare model (no prefix on any key) is accepted as it is; a mixture is refused.
    """
    if not isinstance(state_dict, Mapping):
        raise ReferenceImportError(f"the file's {FILE_KEYS[module]} entry is a {type(state_dict).__name__}, not a "
                                   "state dict")
    keys = [str(key) for key in state_dict]
    prefixed = [key.startswith(REFERENCE_PREFIX) for key in keys]
    if any(prefixed) and not all(prefixed):
        odd = [key for key, p in zip(keys, prefixed) if not p]
        raise ReferenceImportError(f"{module}: some keys lack the '{REFERENCE_PREFIX}' prefix the others carry:\n"
                                   + _listed(odd))
    cut = len(REFERENCE_PREFIX) if any(prefixed) else 0
    return {key[cut:]: value for key, value in zip(keys, state_dict.values())}


def _float32(value: Any, what: str) -> np.ndarray:
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ReferenceImportError(f"{what} is {array.dtype}, not a floating-point tensor")
    return array.astype(np.float32, copy=False)


def check_names_and_shapes(state_dict: Mapping[str, np.ndarray], leaves: list[Leaf],
                           our_shapes: Mapping[tuple[str, ...], tuple[int, ...]], module: str) -> None:
    """Refuses unknown or missing keys and tensors whose shape is not the one our model needs (all are listed).

    Args:
      state_dict: the module's state dict without prefix (`strip_prefix`).
      leaves: the module's `reference_names` leaves.
      our_shapes: ``{params path: shape}`` of our model under the config.
      module: our module name, for the messages.
    """
    expected = {leaf.name for leaf in leaves}
    present = set(state_dict) - set(reference_names.IGNORED_BUFFERS)
    unknown, missing = sorted(present - expected), sorted(expected - present)
    if unknown or missing:
        parts = [f"the file's {module} does not match the {module} of this config:"]
        if unknown:
            parts.append(f"  in the file but not in this model ({len(unknown)}):\n" + _listed(unknown))
        if missing:
            parts.append(f"  needed by this model but missing from the file ({len(missing)}):\n" + _listed(missing))
        parts.append("Is --config the setting this file was trained with (same model sizes and resolution)?")
        raise ReferenceImportError("\n".join(parts))
    wrong = []
    for leaf in leaves:
        want = reference_names.reference_shape(our_shapes[leaf.path], leaf.layout)
        got = tuple(np.shape(state_dict[leaf.name]))
        if got != want:
            wrong.append(f"{leaf.name} (ours: {'/'.join(leaf.path)}): file {got}, this config needs {want}")
    if wrong:
        raise ReferenceImportError(
            f"the file's {module} has tensors of other shapes than this config's {module} ({len(wrong)}):\n"
            + _listed(wrong) + "\nIs --config the setting this file was trained with?"
        )


# ---------------------------------------------------------------------------------------------------------------
# Conversion of one module.
# ---------------------------------------------------------------------------------------------------------------


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           leaves: list[Leaf]) -> dict[tuple[str, ...], np.ndarray]:
    """``{params path: float32 array in our layout}`` for every leaf (names and shapes already checked)."""
    return {
        leaf.path: reference_names.to_ours(_float32(state_dict[leaf.name], leaf.name), leaf.layout)
        for leaf in leaves
    }


def ema_from_shadows(shadows: list, state_dict: Mapping[str, np.ndarray], leaves: list[Leaf],
                     params: Mapping[tuple[str, ...], np.ndarray], module: str) -> dict[tuple[str, ...], np.ndarray]:
    """Our EMA params from the reference's shadow list.

    The shadows are unnamed, in the order of the reference's ``parameters()`` restricted to trainable ones, which is
    the order of ``leaves`` without the non-trainable ones. Those (the Fourier frequencies) take the live weight, as
    the reference's evaluation with EMA does. Each shadow must have its parameter's shape.
    """
    trainable = [leaf for leaf in leaves if leaf.trainable]
    if len(shadows) != len(trainable):
        raise ReferenceImportError(
            f"the file's {FILE_KEYS[module]}_ema holds {len(shadows)} shadows, but the {module} has {len(trainable)} "
            "trainable parameters: the EMA was not taken over this model"
        )
    wrong = []
    for index, (leaf, shadow) in enumerate(zip(trainable, shadows)):
        if tuple(np.shape(shadow)) != tuple(np.shape(state_dict[leaf.name])):
            wrong.append(f"shadow {index} -> {leaf.name}: shadow {tuple(np.shape(shadow))}, parameter "
                         f"{tuple(np.shape(state_dict[leaf.name]))}")
    if wrong:
        raise ReferenceImportError(
            f"the file's {FILE_KEYS[module]}_ema does not line up with the {module}'s parameters:\n" + _listed(wrong))
    ema = dict(params)
    for index, (leaf, shadow) in enumerate(zip(trainable, shadows)):
        ema[leaf.path] = reference_names.to_ours(_float32(shadow, f"EMA shadow {index} ({leaf.name})"), leaf.layout)
    return ema


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(tree).items()}


def _check_coverage(leaves: list[Leaf], our_shapes: Mapping[tuple[str, ...], Any], module: str) -> None:
    """The name mapping must cover our params exactly; a gap is a bug in `reference_names`, not in the file."""
    mapped = {leaf.path for leaf in leaves}
    if mapped != set(our_shapes) or len(mapped) != len(leaves):
        raise RuntimeError(
            f"internal error: the reference name mapping of the {module} does not cover its params exactly; "
            f"unmapped params: {sorted('/'.join(p) for p in set(our_shapes) - mapped)}; "
            f"mapped paths that do not exist: {sorted('/'.join(p) for p in mapped - set(our_shapes))}"
        )


# ---------------------------------------------------------------------------------------------------------------
# The whole train state.
# ---------------------------------------------------------------------------------------------------------------


def _ema_count(entry: Mapping[str, Any], iteration: int, notes: list[str], module: str) -> int:
    count = entry.get("num_updates")
    if count is None:
        notes.append(f"{module}: the file's EMA counts no updates (use_num_updates off); its count is set to the "
                     f"iteration, {iteration}")
        return iteration
    if not isinstance(count, int) or count < 0:
        raise ReferenceImportError(f"the file's {FILE_KEYS[module]}_ema num_updates is {count!r}, not a count")
    return count


def _iteration(reference: Mapping[str, Any], notes: list[str]) -> int:
    iteration = reference.get("iteration")
    if iteration is None:
        notes.append("the file records no iteration: the state starts at step 0")
        return 0
    if not isinstance(iteration, int) or not 0 <= iteration < 2**31:
        raise ReferenceImportError(f"the file's iteration is {iteration!r}, not a step count")
    return iteration


def convert_module(reference: Mapping[str, Any], module: str, model, abstract_params: Any,
                   config: ml_collections.ConfigDict, iteration: int, notes: list[str]) -> tuple[dict, dict, int]:
    """One module's ``(params, EMA params, EMA count)``; params as ``{path: float32 array}`` in our layout.

    ``model`` is our unbound module and ``abstract_params`` its params' shapes under ``config``. Refusals name the
    mismatching tensors; ``notes`` collects what the user should know (a missing EMA, another EMA decay).
    """
    try:
        leaves = reference_names.module_leaves(model, config.data.image_size)
    except ValueError as error:
        raise ReferenceImportError(f"the config's {module}: {error}") from error
    our_shapes = _flat_shapes(abstract_params)
    _check_coverage(leaves, our_shapes, module)
    state_dict = strip_prefix(reference[FILE_KEYS[module]], module)
    check_names_and_shapes(state_dict, leaves, our_shapes, module)
    flat = params_from_state_dict(state_dict, leaves)
    entry = reference.get(FILE_KEYS[module] + "_ema")
    if entry is None:
        notes.append(f"{module}: the file has no EMA; the EMA starts equal to the weights, with count 0")
        return flat, dict(flat), 0
    flat_ema = ema_from_shadows(entry["shadow_params"], state_dict, leaves, flat, module)
    decay = entry.get("decay")
    if decay is not None and float(decay) != float(config.ema.decay[module]):
        notes.append(f"{module}: the file's EMA decay is {decay}, config.ema.decay.{module} is "
                     f"{config.ema.decay[module]} (the config's is used from now on)")
    return flat, flat_ema, _ema_count(entry, iteration, notes, module)


def convert(reference: Mapping[str, Any], config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any]]:
    """The reference trainer's checkpoint dict as our `TrainState`, and a summary of what was taken.

    Args:
      reference: what `read_torch_checkpoint` returned for the reference trainer's file.
      config: our config of the same setting (its model blocks decide the shapes).

    Returns:
      ``(state, summary)``: the state at the file's iteration (params and EMA params from the file, EMA counts from
      its ``num_updates``, a fresh optimiser state, the key ``config.seed`` gives a fresh run, no skips); the
      summary holds the step, per-module parameter counts and EMA counts, and notes.

    Raises:
      ReferenceImportError: the file is not the reference trainer's, or does not fit ``config`` (all mismatching
        names and shapes are listed).
    """
    from lzn_jax.train import optim
    from lzn_jax.train.state import TrainState, build_modules, init_state
    from lzn_jax.train.vectors import pack_params

    modules = build_modules(config)
    present = modules.present()
    check_entries(reference, present)
    optimizer = optim.make_optimizer(config, present)
    abstract = jax.eval_shape(lambda key: init_state(config, modules, optimizer, key), jax.random.key(0))

    notes: list[str] = []
    iteration = _iteration(reference, notes)
    params, ema_params, ema_counts, summary_modules = {}, {}, {}, {}
    for module in present:
        flat, flat_ema, count = convert_module(reference, module, getattr(modules, module), abstract.params[module],
                                               config, iteration, notes)
        params[module] = flax.traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()})
        ema_params[module] = flax.traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat_ema.items()})
        ema_counts[module] = jnp.asarray(count, jnp.int32)
        summary_modules[module] = {"parameters": int(sum(v.size for v in flat.values())), "ema_updates": count}
    notes.append("Adam moments and the learning-rate warm-up start afresh (the file's optimiser state is not used)")

    zero = jnp.zeros((), jnp.int32)
    # One compiled init: run eagerly, every leaf's zeros would be compiled on its own.
    opt_state = jax.jit(lambda p: optimizer.init(pack_params(p, config.optim.vector_update_max_size)))(params)
    state = TrainState(
        step=jnp.asarray(iteration, jnp.int32), params=params, opt_state=opt_state,
        ema_params=ema_params, ema_counts=ema_counts,
        # The key a fresh run of this config would train with (init_state's second split).
        rng=jax.random.split(jax.random.key(config.seed))[1], skipped_updates=zero, consecutive_skips=zero,
    )
    _check_against_abstract(state, abstract)
    return state, {"step": iteration, "modules": summary_modules, "notes": notes}


def _check_against_abstract(state: Any, abstract: Any) -> None:
    """The built state must have exactly the tree, shapes and dtypes of the state a run of this config restores."""
    built = jax.tree_util.tree_flatten_with_path(state)[0]
    wanted = jax.tree_util.tree_flatten_with_path(abstract)[0]
    described = lambda leaves: [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype)) for p, x in leaves]
    if described(built) != described(wanted):
        difference = sorted(set(described(built)) ^ set(described(wanted)))
        raise RuntimeError(f"internal error: the imported state differs from the train state: {difference[:10]}")


# ---------------------------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------------------------


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _writable_workdir(workdir: pathlib.Path) -> None:
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ReferenceImportError(
            f"{workdir} exists and is not an empty directory; import into a new --workdir (nothing was written)")


def write_workdir(state: Any, config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  record: Mapping[str, Any]) -> pathlib.Path:
    """Writes the checkpoint, config.json (as the training loop writes it) and ``record`` into ``workdir``.

    Everything is written into a temporary sibling directory that is renamed to ``workdir`` only when complete, so
    an interrupted import leaves no partial workdir. ``workdir`` must not exist or be an empty directory (a local
    path: the rename is a local file-system operation).
    """
    from lzn_jax import checkpoint

    workdir = pathlib.Path(workdir).absolute()
    _writable_workdir(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling made with mkdir (not mkdtemp) keeps the user's umask on the final directory.
    staging = workdir.parent / f".{workdir.name}.importing-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with checkpoint.Checkpointer(staging / "checkpoints", every_steps=config.checkpoint.every_steps,
                                     keep=config.checkpoint.keep, async_save=False,
                                     handle_sigterm=False) as checkpointer:
            checkpointer.save(int(state.step), state, force=True)
        (staging / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        (staging / IMPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        _writable_workdir(workdir)
        if workdir.exists():
            workdir.rmdir()
        os.replace(staging, workdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return workdir


def import_reference(checkpoint_path: str | os.PathLike, config: ml_collections.ConfigDict,
                     workdir: str | os.PathLike) -> dict[str, Any]:
    """Reads the reference's checkpoint, converts it for ``config`` and writes the workdir; returns the summary.

    Nothing is written when the file is refused (see `convert`) or ``workdir`` is not new or empty.
    """
    from lzn_jax.evaluation.torch_checkpoint import TorchCheckpointError, read_torch_checkpoint

    path = pathlib.Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference checkpoint at {path}")
    _writable_workdir(pathlib.Path(workdir))
    try:
        reference = read_torch_checkpoint(path)
    except TorchCheckpointError as error:
        raise ReferenceImportError(f"{path} cannot be read as a reference checkpoint: {error}") from error
    state, summary = convert(reference, config)
    record = {"source": str(path.absolute()), "source_sha256": _sha256(path), **summary}
    summary["workdir"] = str(write_workdir(state, config, workdir, record))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------


def _print_summary(summary: Mapping[str, Any], checkpoint_path: str, config_path: str) -> None:
    print(f"imported {checkpoint_path} at step {summary['step']} into {summary['workdir']}")
    for module, info in summary["modules"].items():
        print(f"  {module:<14} {info['parameters']:>12,} parameters, EMA after {info['ema_updates']:,} updates")
    for note in summary["notes"]:
        print(f"  note: {note}")
    print("next (with the same --config.* overrides, if any):")
    print(f"  evaluate:  python -m lzn_jax.main --config={config_path} --workdir={summary['workdir']} --mode=eval")
    print(f"  train on:  python -m lzn_jax.main --config={config_path} --workdir={summary['workdir']}")


def _run() -> None:
    """The command line; its flags are defined only here, so importing this module defines none."""
    from absl import app, flags
    from ml_collections import config_flags

    from lzn_jax import entry

    config = config_flags.DEFINE_config_file("config", None, "Config of the setting the file was trained with "
                                             "(configs/<setting>.py; --config.key=value overrides work).",
                                             lock_config=True)
    checkpoint_file = flags.DEFINE_string("checkpoint", None, "The reference's checkpoint file (.pt / .pth).")
    workdir = flags.DEFINE_string("workdir", None, "New (or empty) directory to write the converted run into.")
    flags.mark_flags_as_required(["config", "checkpoint", "workdir"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        # The summary below is the output; orbax's and absl's INFO lines would bury it.
        entry.quiet_library_logs()
        try:
            summary = import_reference(checkpoint_file.value, config.value, workdir.value)
        except (ReferenceImportError, FileNotFoundError) as error:
            raise SystemExit(f"import_reference: {error}") from None
        _print_summary(summary, checkpoint_file.value, flags.FLAGS["config"].config_filename)

    app.run(main)


if __name__ == "__main__":
    _run()
