"""Checkpoints of the train state and the data position: atomic, optionally asynchronous, resharded on restore.

The only module that imports orbax (docs/design.md); it also turns SIGTERM into an agreed preemption step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

__all__ = ["Checkpointer", "IncompatibleCheckpointError", "restore_params", "restore_state"]

_LOG = logging.getLogger(__name__)

# Item names inside every step directory: <dir>/<step>/state (the pytree) and <dir>/<step>/data (JSON).
_STATE = "state"
_DATA = "data"
# At most this many leaves of each kind are listed in an incompatibility message.
_MAX_LISTED = 20


class IncompatibleCheckpointError(ValueError):
    """A checkpoint whose tree paths, shapes or dtypes differ from the state it is restored into."""


# ---------------------------------------------------------------------------------------------------------------
# Typed PRNG keys are stored as their ``jax.random.key_data`` (uint32: the key shape plus the implementation's
# trailing dims) and wrapped back with the abstract leaf's key dtype. orbax 0.12 could store keys itself, but plain
# arrays keep checkpoints readable by any array reader (weight conversion) and by orbax versions without keys.
# ---------------------------------------------------------------------------------------------------------------


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_data_sharding(sharding: jax.sharding.Sharding, path: str) -> jax.sharding.Sharding:
    """The sharding of a key leaf's key data: the same, since the extra trailing dims are never split."""
    # A NamedSharding's spec may be shorter than the rank (missing dims are replicated), so the same object
    # shards the key dims and keeps the implementation's trailing dims whole; single-device and replicated
    # shardings do not depend on the rank.
    if isinstance(sharding, (jax.sharding.NamedSharding, jax.sharding.SingleDeviceSharding)):
        return sharding
    if sharding.is_fully_replicated:
        return sharding
    raise TypeError(
        f"typed PRNG key leaf {path!r} has a {type(sharding).__name__}; give it a NamedSharding (or a "
        "single-device or replicated sharding) so its key data can be placed the same way"
    )


def _to_storage(state: Any) -> Any:
    """``state`` with every typed PRNG key replaced by its key data (a new array: the key may be donated later)."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, state)


def _from_storage(restored: Any, abstract_state: Any) -> Any:
    """Wraps the key data of ``restored`` back into typed keys of the abstract leaves' key dtypes."""

    def wrap(value, abstract):
        if not _is_key(abstract):
            return value
        key = jax.random.wrap_key_data(value, dtype=abstract.dtype)
        # Wrapping is a device computation; put the result exactly where the caller asked for it.
        return jax.device_put(key, abstract.sharding)

    return jax.tree.map(wrap, restored, abstract_state)


# ---------------------------------------------------------------------------------------------------------------
# Abstract trees and their comparison with a checkpoint's metadata.
# ---------------------------------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
    # orbax names a tree's nodes by dict key, attribute name or sequence index, always as strings.
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_str(path: tuple) -> str:
    return "/".join(_key_name(k) for k in path)


def _storage_abstract(abstract_state: Any) -> Any:
    """The tree orbax restores into: ``jax.ShapeDtypeStruct`` leaves with shardings, keys as key data.

    Args:
      abstract_state: a pytree whose leaves are ``jax.ShapeDtypeStruct`` with a ``sharding`` or concrete
        ``jax.Array`` (their shape, dtype and sharding are used, not their values).

    Returns:
      A pytree of the same structure with ``jax.ShapeDtypeStruct`` leaves.

    Raises:
      TypeError: leaves that are neither, or ``ShapeDtypeStruct`` without a sharding (all are named).
    """
    bad = []

    def convert(path, leaf):
        name = _path_str(path)
        if not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) or getattr(leaf, "sharding", None) is None:
            bad.append(f"{name} ({type(leaf).__name__})")
            return None
        if _is_key(leaf):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_key_data_sharding(leaf.sharding, name))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)

    converted = jax.tree_util.tree_map_with_path(convert, abstract_state)
    if bad:
        raise TypeError(
            "every leaf of the abstract state must be a jax.ShapeDtypeStruct with a sharding or a jax.Array, "
            "so that restore knows where to place it; these are not: " + ", ".join(bad[:_MAX_LISTED])
        )
    return converted


def _describe(shape: Any, dtype: Any) -> str:
    dims = ",".join(str(d) for d in (shape or ()))
    return f"{np.dtype(dtype).name if dtype is not None else '?'}[{dims}]"


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{path: (shape, dtype)}`` of a tree of ShapeDtypeStructs or of orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        _path_str(path): (tuple(getattr(leaf, "shape", None) or ()), getattr(leaf, "dtype", None))
        for path, leaf in leaves
    }


def _mismatch_report(saved: dict, expected: dict, keys: set[str]) -> str | None:
    """A readable list of the leaves that differ between ``saved`` and ``expected``; None when they agree."""
    differing = []
    for path in sorted(set(saved) & set(expected)):
        (s_shape, s_dtype), (e_shape, e_dtype) = saved[path], expected[path]
        same_dtype = s_dtype is not None and np.dtype(s_dtype) == np.dtype(e_dtype)
        if s_shape != e_shape or not same_dtype:
            note = " (a typed PRNG key, stored as its key data)" if path in keys else ""
            differing.append(f"{path}: saved {_describe(s_shape, s_dtype)}, expected {_describe(e_shape, e_dtype)}"
                             f"{note}")
    missing = [f"{p}: expected {_describe(*expected[p])}" for p in sorted(set(expected) - set(saved))]
    unexpected = [f"{p}: saved {_describe(*saved[p])}" for p in sorted(set(saved) - set(expected))]
    if not (differing or missing or unexpected):
        return None
    parts = []
    for title, lines in (("shape or dtype differs", differing), ("missing from the checkpoint", missing),
                         ("in the checkpoint but not in this state", unexpected)):
        if lines:
            shown = lines[:_MAX_LISTED] + ([f"... and {len(lines) - _MAX_LISTED} more"]
                                           if len(lines) > _MAX_LISTED else [])
            parts.append(f"  {title} ({len(lines)}):\n" + "\n".join(f"    {line}" for line in shown))
    return "\n".join(parts)


def _key_paths(abstract_state: Any) -> set[str]:
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    return {_path_str(path) for path, leaf in leaves if _is_key(leaf)}


def _metadata_tree(item_metadata: Any) -> Any:
    # orbax wraps a pytree's metadata in a TreeMetadata (``.tree``) in some code paths and not in others.
    return getattr(item_metadata, "tree", item_metadata)


# ---------------------------------------------------------------------------------------------------------------
# Directories and orbax managers.
# ---------------------------------------------------------------------------------------------------------------


def _checkpoint_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an absolute path, checked with :func:`_check_directory`. orbax refuses relative paths; a
    relative local one (``--workdir=workdirs/run``) is taken from the current directory, as the user means it."""
    path = epath.Path(path)
    if not path.is_absolute():  # remote paths (gs://...) are absolute
        path = epath.Path(os.path.abspath(path))
    _check_directory(path)
    return path


def _check_directory(path: epath.Path) -> None:
    """Raises NotADirectoryError when ``path`` or one of its parents exists as a file."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise NotADirectoryError(
                    f"checkpoint directory {path} cannot be used: {candidate} exists and is a file, not a "
                    "directory; pass another --workdir (or checkpoint path), or move the file away"
                )
            # The nearest existing ancestor is a directory, so all above it are too (and need no remote calls).
            return


def _reader(directory: epath.Path, state_handler: Any = None) -> ocp.CheckpointManager:
    """A read-only manager: it never creates, cleans up or deletes anything, so restores leave no trace."""
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, cleanup_tmp_directories=False, save_interval_steps=0
    )
    handlers = {_STATE: state_handler or ocp.StandardCheckpointHandler(), _DATA: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


def _resolve_step(directory: epath.Path, steps: list[int], step: int | None) -> int | None:
    if step is None:
        return max(steps) if steps else None
    if int(step) not in steps:
        available = ", ".join(str(s) for s in sorted(steps)) or "none"
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {directory}; available steps: {available}")
    return int(step)


def _restore_from(directory: epath.Path, abstract_state: Any, step: int | None) -> tuple[int, Any, Any] | None:
    """Checks and restores ``(step, state, data_state)`` of ``step`` (default: the latest) from ``directory``.

    Returns None when the directory holds no complete checkpoint and no step was asked for.
    """
    if not directory.exists():
        if step is not None:
            raise FileNotFoundError(f"no checkpoint directory {directory} (asked for step {step})")
        return None
    storage = _storage_abstract(abstract_state)
    manager = _reader(directory)
    try:
        step = _resolve_step(directory, list(manager.all_steps()), step)
        if step is None:
            return None
        # Compared by us before orbax reads anything: orbax's own errors do not name every leaf, and a
        # non-strict restore would silently pad or truncate arrays.
        metadata = manager.item_metadata(step)
        saved_state = metadata.get(_STATE)
        if saved_state is None:
            raise IncompatibleCheckpointError(
                f"{directory / str(step)} has no '{_STATE}' item: it was not written by lzn_jax.checkpoint. "
                "Nothing was changed; use a fresh --workdir."
            )
        report = _mismatch_report(_leaf_specs(_metadata_tree(saved_state)), _leaf_specs(storage),
                                  _key_paths(abstract_state))
        if report is not None:
            raise IncompatibleCheckpointError(
                f"the checkpoint {directory / str(step)} does not fit the train state of this run:\n{report}\n"
                "Nothing in the directory was changed. Start this config in a fresh --workdir, or resume this "
                "workdir with the config that wrote it."
            )
        restored = manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(storage),
                                             _DATA: ocp.args.JsonRestore()})
        )
    finally:
        manager.close()
    _LOG.info("restored step %d from %s", step, directory)
    return step, _from_storage(restored[_STATE], abstract_state), restored[_DATA]


# ---------------------------------------------------------------------------------------------------------------
# Preemption.
# ---------------------------------------------------------------------------------------------------------------


def _jax_preemption_service() -> bool:
    """Whether JAX's preemption service runs: it then owns SIGTERM and agrees on a sync step across hosts."""
    return bool(jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service)


class Checkpointer:
    """Saves and restores the train state and the data position of one run directory.

    Every ``every_steps`` steps (or when forced, or once a preemption was signalled) ``save`` writes step
    directories ``<directory>/<step>/{state,data}``. orbax writes each into a temporary directory and renames it
    when complete, so a run killed at any instant leaves the previous complete checkpoint readable; the ``keep``
    newest are kept, and older ones are deleted only after a newer one is complete. Restoring reads only
    (incompatible checkpoints are refused without touching anything); leftover temporary directories of killed
    saves are removed by the first save of the next run.

    In a multi-process run every method must be called by all processes in the same order with the same steps.

    Args:
      directory: the checkpoint directory (created by the first save), local or any path etils understands.
      every_steps: ``save`` writes when ``step % every_steps == 0``; 0 saves only when forced or preempted.
      keep: how many of the newest checkpoints to keep (at least 1).
      async_save: write in a background thread; ``save`` returns once the arrays are copied to host memory, so
        the caller may donate or overwrite the saved arrays right away.
      handle_sigterm: make SIGTERM request a preemption checkpoint. Without the JAX distributed client this
        installs a Python SIGTERM handler (in the main thread), put back by ``close``. With the client and JAX's
        preemption service (the default), JAX already catches SIGTERM and agrees on a step across hosts, so no
        handler is installed: a Python one would displace JAX's.
      sigterm_sync_every_steps: only for a multi-process run with our own handler (JAX's preemption service
        off): the SIGTERM flags of all processes are gathered on steps that are multiples of this. See
        ``preemption_requested`` for the cost.

    Raises:
      NotADirectoryError: ``directory`` (or a parent) exists and is a file.
      ValueError: ``keep < 1``, ``every_steps < 0`` or ``sigterm_sync_every_steps < 1``.
    """

    def __init__(self, directory: str | os.PathLike, *, every_steps: int = 1000, keep: int = 3,
                 async_save: bool = True, handle_sigterm: bool = True, sigterm_sync_every_steps: int = 1):
        if keep < 1:
            # keep=0 would let orbax delete even the newest checkpoint.
            raise ValueError(f"checkpoint keep must be at least 1, got {keep}")
        if every_steps < 0 or sigterm_sync_every_steps < 1:
            raise ValueError(f"need every_steps >= 0 and sigterm_sync_every_steps >= 1, got {every_steps} and "
                             f"{sigterm_sync_every_steps}")
        self._directory = _checkpoint_path(directory)
        self._every_steps = int(every_steps)
        self._keep = int(keep)
        self._async_save = bool(async_save)
        self._sigterm_sync_every = int(sigterm_sync_every_steps)
        # Created by the first save, so that constructing and restoring never write to the directory.
        self._manager: ocp.CheckpointManager | None = None
        # Steps whose checkpoint holds this run's state: saved by this object, or the step it restored.
        self._own_steps: set[int] = set()
        self._sigterm_received = False
        self._preempted = False
        self._previous_handler: Any = None
        self._handler_installed = False
        self._jax_service = _jax_preemption_service()
        if handle_sigterm and not self._jax_service:
            self._install_sigterm_handler()
        elif handle_sigterm:
            _LOG.info("SIGTERM is left to JAX's preemption service (reached_preemption_sync_point)")

    # -- properties and listings --------------------------------------------------------------------------------

    @property
    def directory(self) -> epath.Path:
        """The checkpoint directory."""
        return self._directory

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints on disk (and of this run's save in flight), ascending."""
        if self._manager is not None:
            return sorted(self._manager.all_steps())
        if not self._directory.exists():
            return []
        manager = _reader(self._directory)
        try:
            return sorted(manager.all_steps())
        finally:
            manager.close()

    def latest_step(self) -> int | None:
        """The newest step of ``all_steps()``, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- restore --------------------------------------------------------------------------------------------------

    def restore(self, abstract_state: Any, *, step: int | None = None) -> tuple[Any, Any] | None:
        """Restores the newest complete checkpoint (or ``step``) into the layout of ``abstract_state``.

        Args:
          abstract_state: the train state's structure: a pytree (flax.struct dataclass, nested dicts, ...) whose
            leaves are ``jax.ShapeDtypeStruct`` with a ``sharding``, or ``jax.Array`` s. Each restored leaf gets
            that sharding, whatever the device count the checkpoint was written with. Typed PRNG key leaves come
            back as typed keys of the same key dtype.
          step: a step to restore instead of the newest.

        Returns:
          ``(state, data_state)``: ``state`` with the structure of ``abstract_state``, ``data_state`` the JSON
          value given to ``save`` (None if none was). None when the directory holds no complete checkpoint and
          ``step`` is None.

        Raises:
          IncompatibleCheckpointError (a ValueError): the checkpoint's tree paths, shapes or dtypes differ; the
            message lists the leaves. Nothing in the directory is changed.
          FileNotFoundError: ``step`` has no complete checkpoint (the message lists the available steps).
          TypeError: a leaf of ``abstract_state`` has no sharding.
        """
        # A save of this run may still be in flight; read only complete data.
        self.wait_until_finished()
        restored = _restore_from(self._directory, abstract_state, step)
        if restored is None:
            return None
        restored_step, state, data_state = restored
        self._own_steps.add(restored_step)
        return state, data_state

    # -- save -----------------------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False) -> bool:
        """Saves ``state`` and ``data_state`` as ``step`` when due.

        Due means ``force``, or ``step % every_steps == 0``, or a preemption was signalled (SIGTERM in a
        single-process run; in a multi-process run the agreed preemption that ``preemption_requested`` found).
        A step this run already saved (or restored) is not written again. With ``async_save`` the write
        continues in the background; ``wait_until_finished`` waits for it and raises its error, if any.

        Args:
          step: the global step the state is at (the number of updates it holds).
          state: a pytree of ``jax.Array`` (typed PRNG keys allowed), sharded any way.
          data_state: a JSON-serialisable value (``batches.get_state()``), or None; the same on every process
            (the first process writes it).
          force: save even if the step is not a multiple of ``every_steps``.

        Returns:
          True if a save was started.

        Raises:
          ValueError: the directory already holds a checkpoint at ``step`` or later that this run neither wrote
            nor restored (two runs share the directory, or an older step was restored): saving would mix them.
        """
        step = int(step)
        preempted = self._preempted or (self._sigterm_received and not jax.distributed.is_initialized())
        due = force or preempted or (self._every_steps > 0 and step % self._every_steps == 0)
        if not due or step in self._own_steps:
            return False
        manager = self._writer()
        foreign = [s for s in manager.all_steps() if s >= step and s not in self._own_steps]
        if foreign:
            raise ValueError(
                f"{self._directory} already holds checkpoints at steps {sorted(foreign)}, at or after step {step}, "
                "that this run did not write: another run uses this directory, or an older step was restored. "
                "Use a fresh --workdir (or remove those steps)."
            )
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(_to_storage(state)),
                                     _DATA: ocp.args.JsonSave(data_state)})
        # force=True: the decision was made above, orbax's own save policy is not used.
        manager.save(step, args=args, force=True)
        self._own_steps.add(step)
        _LOG.info("checkpoint of step %d %s in %s", step, "started" if self._async_save else "written",
                  self._directory)
        return True

    def _writer(self) -> ocp.CheckpointManager:
        if self._manager is None:
            _check_directory(self._directory)
            options = ocp.CheckpointManagerOptions(
                # The newest `keep` by step; orbax deletes the others only after the new step is committed.
                preservation_policy=ocp.checkpoint_managers.LatestN(self._keep),
                enable_async_checkpointing=self._async_save,
                create=True,
                # Temporary directories left by killed saves; removed before this run's first save starts.
                cleanup_tmp_directories=True,
            )
            handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: ocp.JsonCheckpointHandler()}
            self._manager = ocp.CheckpointManager(self._directory, item_handlers=handlers, options=options)
        return self._manager

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight (if any) is complete; raises the error of a failed asynchronous save."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    # -- preemption -----------------------------------------------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            # Python accepts signal handlers only from the main thread.
            _LOG.warning("Checkpointer created outside the main thread: SIGTERM is not handled")
            return

        def on_sigterm(signum, frame):
            # Only a flag: the training loop checks it between steps, where saving is safe.
            self._sigterm_received = True

        self._previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
        self._handler_installed = True

    def _uninstall_sigterm_handler(self) -> None:
        if self._handler_installed:
            # None means the previous handler was not set from Python; the default is the closest we can restore.
            previous = self._previous_handler if self._previous_handler is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
            self._handler_installed = False

    def preemption_requested(self, step: int) -> bool:
        """Whether to save now and stop: True from the first call after a preemption notice, on all processes.

        Single process: True once this process received SIGTERM (with ``handle_sigterm``).

        Multi-process (JAX distributed client initialised): True from the step at which
        ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)`` is True, the step JAX's
        preemption service agrees on after any process received SIGTERM (it must be called on every step, by
        every process, from the same first step). If this object installed its own handler instead (the service
        is off), the processes' SIGTERM flags are gathered with ``multihost_utils.process_allgather`` on steps
        that are multiples of ``sigterm_sync_every_steps``, so every process answers the same. Cost of that
        gather: a tiny cross-process all-gather whose result the host waits for, so the host stops running ahead
        of the devices at that step (about one step's dispatch latency, plus the collective's latency over the
        network); raise ``sigterm_sync_every_steps`` to pay it less often, at the price of noticing the signal up
        to that many steps later.

        Args:
          step: the current global step (the same on all processes).

        Returns:
          True (and True on every later call) once the run should save and exit.
        """
        if self._preempted:
            return True
        agreed = False
        if jax.distributed.is_initialized():
            if self._jax_service:
                try:
                    agreed = bool(multihost_utils.reached_preemption_sync_point(int(step)))
                except RuntimeError:
                    # The service was switched off after this object was made; our flag is all there is.
                    self._jax_service = False
            if self._handler_installed and not agreed and int(step) % self._sigterm_sync_every == 0:
                flags = multihost_utils.process_allgather(np.int32(self._sigterm_received))
                agreed = bool(np.any(flags))
        else:
            agreed = self._sigterm_received
        if agreed:
            self._preempted = True
            _LOG.warning("preemption requested at step %d: saving a checkpoint and stopping", step)
        return agreed

    # -- closing --------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for the save in flight, releases orbax's threads and puts back the previous SIGTERM handler."""
        try:
            if self._manager is not None:
                self._manager.wait_until_finished()
                self._manager.close()
                self._manager = None
        finally:
            self._uninstall_sigterm_handler()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Read-only restores from other runs' directories (config.checkpoint.resume_from and init_from).
# ---------------------------------------------------------------------------------------------------------------


def restore_state(path: str | os.PathLike, abstract_state: Any, *, step: int | None = None) -> tuple[Any, Any]:
    """Restores ``(state, data_state)`` from another run's checkpoint directory without writing to it.

    Args:
      path: a checkpoint directory written by ``Checkpointer`` (the one holding the step directories).
      abstract_state: as for ``Checkpointer.restore``.
      step: the step to restore; default the newest complete one.

    Returns:
      ``(state, data_state)`` as ``Checkpointer.restore``.

    Raises:
      FileNotFoundError: no complete checkpoint (or not ``step``) in ``path``.
      IncompatibleCheckpointError, NotADirectoryError, TypeError: as ``Checkpointer``.
    """
    directory = _checkpoint_path(path)
    restored = _restore_from(directory, abstract_state, step)
    if restored is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    return restored[1], restored[2]


def restore_params(path: str | os.PathLike, abstract_params: Any, *, step: int | None = None,
                   subtree: str = "params") -> Any:
    """Restores only the ``params`` subtree of a state checkpoint (for ``config.checkpoint.init_from``).

    The other leaves (optimiser state, EMA, ...) are not read, so they may have any shapes.

    Args:
      path: a checkpoint directory written by ``Checkpointer`` (its newest step, or ``step``), or one step
        directory of it (``.../checkpoints/5000``).
      abstract_params: the structure of the state's ``subtree`` field, leaves as in ``Checkpointer.restore``.
      step: with a checkpoint directory, the step to read.
      subtree: the top-level name of the parameters in the saved state.

    Returns:
      The parameters, with the structure and shardings of ``abstract_params``.

    Raises:
      FileNotFoundError: no complete checkpoint (or not ``step``).
      IncompatibleCheckpointError: the saved ``subtree`` has other paths, shapes or dtypes (listed).
    """
    location = _checkpoint_path(path)
    storage = {subtree: _storage_abstract(abstract_params)}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), storage)
    # partial_restore reads only the leaves named in `storage`; the standard handler cannot skip leaves.
    restore = ocp.args.PyTreeRestore(item=storage, restore_args=restore_args, partial_restore=True)

    if (location / _STATE).is_dir():
        # One step directory: orbax names them by their step, so read it through its parent.
        if not location.name.isdigit():
            raise ValueError(f"{location} looks like a step directory but is not named by its step; pass it under "
                             "its original name (the step number) or the checkpoint directory that holds it")
        if step is not None and int(step) != int(location.name):
            raise ValueError(f"step {step} asked for, but {location} is the step directory of step {location.name}")
        location, step = location.parent, int(location.name)
    if not location.exists():
        raise FileNotFoundError(f"no checkpoint directory {location}")
    manager = _reader(location, ocp.PyTreeCheckpointHandler())
    try:
        chosen = _resolve_step(location, list(manager.all_steps()), step)
        if chosen is None:
            raise FileNotFoundError(f"no complete checkpoint in {location}")
        saved = _metadata_tree(manager.item_metadata(chosen)[_STATE])
        _check_subtree(saved, storage, abstract_params, subtree, location / str(chosen))
        restored = manager.restore(chosen, args=ocp.args.Composite(**{_STATE: restore}))[_STATE]
    finally:
        manager.close()
    return _from_storage(restored[subtree], abstract_params)


def _check_subtree(saved_tree: Any, storage: dict, abstract_params: Any, subtree: str, where: epath.Path) -> None:
    prefix = subtree + "/"
    saved = {p: v for p, v in _leaf_specs(saved_tree).items() if p.startswith(prefix)}
    keys = {prefix + p for p in _key_paths(abstract_params)}
    report = _mismatch_report(saved, _leaf_specs(storage), keys)
    if report is not None:
        raise IncompatibleCheckpointError(
            f"the '{subtree}' of checkpoint {where} do not fit this model:\n{report}\n"
            "Nothing was changed. Initialise from a checkpoint of the same model configuration."
        )
