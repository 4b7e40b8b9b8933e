"""Reading what training runs leave (checkpoints, metrics.jsonl) and comparing train states, for the trainer tests."""

from __future__ import annotations

import functools
import hashlib
import pathlib

import jax
import numpy as np

from lzn_jax import checkpoint, parallel
from lzn_jax.train import loop, optim, report
from lzn_jax.train import state as state_lib
from tests.train import tiny


@functools.cache
def abstract_state(kind: str = "joint", num_devices: int = 1):
    """The train state of ``tiny.<kind>()`` as ShapeDtypeStructs, replicated over a mesh of ``num_devices``."""
    config = tiny.get_config(kind)
    modules = state_lib.build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    replicated = jax.NamedSharding(parallel.data_mesh(num_devices), jax.P())
    return loop.abstract_train_state(config, modules, optimizer, replicated)


def restore(workdir: pathlib.Path, step: int | None = None, kind: str = "joint"):
    """``(state, data_state)`` of ``workdir``'s checkpoint ``step`` (default: the newest), read only; each checkpoint
    is read once per session (hundreds of small arrays: about a second each)."""
    if step is None:
        step = checkpoint_steps(workdir)[-1]
    return _restore(pathlib.Path(workdir).resolve(), step, kind)


@functools.cache
def _restore(workdir: pathlib.Path, step: int, kind: str):
    return checkpoint.restore_state(workdir / "checkpoints", abstract_state(kind), step=step)


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def leaves(tree) -> dict[str, np.ndarray]:
    """``{path: numpy array}`` of a pytree; typed PRNG keys as their key data."""
    result = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        result[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
    return result


def assert_bitwise_equal(actual, expected, what: str = "") -> None:
    """Same tree paths, shapes, dtypes and bytes (NaN payloads and signed zeros included)."""
    a, e = leaves(actual), leaves(expected)
    assert a.keys() == e.keys(), f"{what}: tree paths differ: {sorted(a.keys() ^ e.keys())[:10]}"
    differing = [path for path in a if a[path].dtype != e[path].dtype or a[path].shape != e[path].shape
                 or a[path].tobytes() != e[path].tobytes()]
    assert not differing, f"{what}: {len(differing)} of {len(a)} leaves differ, e.g. {differing[:8]}"


def assert_trained(actual, expected, what: str = "") -> None:
    """Most leaves changed: a module that took an update. (Not all: a leaf whose gradient is tiny, e.g. behind the
    decoder's zero-initialised output conv at the first steps, moves by less than half a float32 ulp.)"""
    a, e = leaves(actual), leaves(expected)
    changed = [path for path in a if not np.array_equal(a[path], e[path])]
    assert len(changed) >= 0.6 * len(a), f"{what}: only {len(changed)} of {len(a)} leaves changed"


def max_abs_error(actual, expected) -> float:
    """max |actual - expected| over every element of two trees with the same paths."""
    a, e = leaves(actual), leaves(expected)
    assert a.keys() == e.keys()
    return float(max(np.max(np.abs(a[k].astype(np.float64) - e[k].astype(np.float64)), initial=0.0) for k in e))


def assert_close(actual, expected, *, rtol: float, atol: float, what: str = "") -> None:
    """Leaf by leaf ``|a - e| <= atol + rtol |e|``, naming the leaf that is not."""
    a, e = leaves(actual), leaves(expected)
    assert a.keys() == e.keys(), f"{what}: tree paths differ"
    for path in e:
        np.testing.assert_allclose(a[path], e[path], rtol=rtol, atol=atol, err_msg=f"{what} {path}")


def train_metrics(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
    """``{step: {name: value}}`` of the ``train/*`` metrics in ``workdir/metrics.jsonl`` (last record per step)."""
    by_step: dict[int, dict[str, float]] = {}
    for name, (steps, values) in report.read_metrics(workdir).items():
        if name.startswith("train/"):
            for step, value in zip(steps, values):
                by_step.setdefault(int(step), {})[name] = float(value)
    return by_step


def file_hashes(directory: pathlib.Path) -> dict[str, str]:
    """``{relative path: sha256 or "dir"}`` of everything under ``directory``."""
    return {str(p.relative_to(directory)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(directory).rglob("*"))}


# ---------------------------------------------------------------------------------------------------------------
# The same training on another device count or process count: equal up to the order of float32 reductions.
# ---------------------------------------------------------------------------------------------------------------

# Adam's moments are linear and quadratic in the gradients, so they carry the reduction-order differences as they
# are: rtol 1e-4 / atol 1e-5 element by element (measured after 2 steps, 8 vs 1 device: 3e-8 uncond, 2.1e-7 joint,
# 2.5e-6 contrastive).
MOMENT_RTOL, MOMENT_ATOL = 1e-4, 1e-5
# Params and EMA of the generation settings: Adam divides each gradient by its own running RMS, so an element whose
# gradient nearly cancels over the batch (relative rounding error O(1)) moves by up to lr either way, whatever its size.
# rtol 1e-4 / atol 1e-5 holds for all but such elements: measured after 2 steps, 8 vs 1 device, uncond at most 3e-8,
# joint 1 of 66,151 elements off by 1.1e-5 (0.11 x the encoder's lr 1e-4). So the absolute tolerance is a quarter of
# the element's module's learning rate (2.5e-5 for lr 1e-4).
PARAM_RTOL, PARAM_LR_FRACTION = 1e-4, 0.25
# Logged scalars of the same step (measured: <= 1.1e-5 relative, the gradient norm; losses <= 1e-6).
METRIC_RTOL, METRIC_ATOL = 3e-5, 1e-6
# The contrastive loss does not change when every anchor moves by the same vector (both flows are equivariant to it
# and the posteriors depend only on differences), so its gradient along any direction of the params that moves every
# anchor alike is zero up to rounding: the last bias of each latent head, but also e.g. a hidden unit of a head whose
# input barely varies over the batch. Adam turns that rounding noise into steps of up to lr in either direction:
# measured after 2 steps, 8 vs 1 device, 9.7e-4 on a head's last bias and 3.9e-4 on a head's first kernel, with lr
# 1e-3 (2 processes vs 1: 4.8e-4). The contrastive params are held to the bound of that walk, 2 lr per step, and the
# tight checks are the Adam moments' and the loss's. ode_error, not invariant to the translation (it divides by an
# anchor's norm), follows the walk: measured 1.2e-3 relative at step 2.
CONTRASTIVE_METRIC_RTOL = {"train/ode_error": 1e-2}
# The gradient norm after that walk: at step 1 (same params) it is held to METRIC_RTOL; at step 2 it is the norm at
# params that differ by the walk. Measured 3.2e-5 (2 processes) and 3.9e-5 (8 devices) relative since each device
# encodes only its own rows (contrastive.two_view_anchors; before, every device encoded the whole batch, so the
# encoder's gradient was summed in one order everywhere and the walk was smaller: <= 1.1e-5).
CONTRASTIVE_WALKED_GRAD_NORM_RTOL = 1e-4


def assert_same_training(one, eight, metrics_one: list[dict], metrics_eight: list[dict], kind: str) -> None:
    """The states and per-step metrics of two runs of ``tiny.<kind>()`` agree to float32 reduction-order tolerance
    (the constants above). ``one`` is the reference. Metrics are compared by name; one side may have names the other
    lacks (metrics.jsonl adds ``train/skipped_total`` to what the step returns)."""
    config = tiny.get_config(kind)
    contrastive = config.objective == "contrastive"
    assert len(metrics_one) == len(metrics_eight)
    for step, (m1, m8) in enumerate(zip(metrics_one, metrics_eight), start=1):
        assert set(m1) <= set(m8) or set(m8) <= set(m1), (sorted(m1), sorted(m8))
        for name in sorted(set(m1) & set(m8)):
            rtol = CONTRASTIVE_METRIC_RTOL.get(name, METRIC_RTOL) if contrastive else METRIC_RTOL
            if contrastive and name == "train/grad_norm" and step > 1:
                rtol = CONTRASTIVE_WALKED_GRAD_NORM_RTOL
            np.testing.assert_allclose(m8[name], m1[name], rtol=rtol, atol=METRIC_ATOL,
                                       err_msg=f"{kind}: {name} at step {step}")
    assert_close(eight.opt_state, one.opt_state, rtol=MOMENT_RTOL, atol=MOMENT_ATOL, what=f"{kind}: opt_state")
    lr_fraction = 2 * len(metrics_one) if contrastive else PARAM_LR_FRACTION
    for part in ("params", "ema_params"):
        a, e = leaves(getattr(eight, part)), leaves(getattr(one, part))
        assert a.keys() == e.keys()
        for path in e:
            atol = lr_fraction * float(config.optim.learning_rate[path.split("'")[1]])
            np.testing.assert_allclose(a[path], e[path], rtol=PARAM_RTOL, atol=atol, err_msg=f"{kind}: {part} {path}")
    for part in ("step", "ema_counts", "skipped_updates", "consecutive_skips", "rng"):
        assert_bitwise_equal(getattr(eight, part), getattr(one, part), f"{kind}: {part}")
