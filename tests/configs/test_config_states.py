"""Every setting in configs/ builds its train state: the abstract state of every variant (jax.eval_shape, no memory,
so the 256x256 and ResNet-50 paper models are checked too) with the paper's parameter counts (docs/method.md, "Models"), and two real training
steps of every `:smoke` variant on the data it would read.

Run as a script (``python tests/configs/test_config_states.py NAME ...``) this file is the smoke worker: it trains
each named setting's `:smoke` variant for two steps and prints one ``SMOKE {json}`` line per setting.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import math
import os
import pathlib
import sys
import traceback
import types

import pytest

from tests import background

REPO = pathlib.Path(__file__).resolve().parents[2]
# Files in configs/ that are not training settings: the shared schema and the zoning demo (another experiment).
NOT_SETTINGS = ("common.py", "digits_zoning_demo.py")
NAMES = sorted(path.stem for path in (REPO / "configs").glob("*.py") if path.name not in NOT_SETTINGS)
TRAINABLE = ("encoder", "decoder", "label_anchors")


@functools.cache
def load(name: str) -> types.ModuleType:
    """The config file as config_flags loads it: by path, not as a package module."""
    spec = importlib.util.spec_from_file_location(f"_config_state_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_args(name: str) -> list[str]:
    """Every combination of the file's VARIANTS, as the text after the ':' ('' for none)."""
    variants = load(name).VARIANTS
    return [",".join(combo) for n in range(len(variants) + 1) for combo in itertools.combinations(variants, n)]


CASES = [(name, arg) for name in NAMES for arg in variant_args(name)]

# The paper's counts (docs/method.md, "Models"): parameters per module of the paper settings (every leaf, the Fourier frequencies included).
_CIFAR_ENCODER, _ENCODER_256 = 49_790_260, 87_768_896
_GEN_256 = {"": dict(encoder=_ENCODER_256, decoder=65_676_949), "rf": dict(decoder=65_574_549)}
PAPER_COUNTS = {
    ("cifar10_gen", ""): dict(encoder=_CIFAR_ENCODER, decoder=61_906_819),
    ("cifar10_gen", "rf"): dict(decoder=61_804_419),
    ("cifar10_joint", ""): dict(encoder=_CIFAR_ENCODER, decoder=61_911_939, label_anchors=2_000),
    ("cifar10_joint", "rf"): dict(decoder=61_809_539),
    **{(name, arg): counts for name in ("afhq_cat_gen", "celebahq_gen", "lsun_bedroom_gen")
       for arg, counts in _GEN_256.items()},
    ("imagenet_repr", ""): dict(encoder=28_231_232),  # ResNet-50-GN with the 2-layer head
}


def _size(tree) -> int:
    import jax

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_every_setting_and_paper_count_is_covered():
    assert len(NAMES) == 9 and {name for name, _ in PAPER_COUNTS} <= set(NAMES)
    assert set(PAPER_COUNTS) <= set(CASES)


@pytest.mark.parametrize(("name", "arg"), CASES, ids=[f"{name}:{arg}" for name, arg in CASES])
def test_abstract_train_state(name, arg):
    import jax
    import jax.numpy as jnp

    from lzn_jax.train import loop, optim, state

    config = load(name).get_config(arg)
    modules = state.build_modules(config)
    present = modules.present()
    assert present == tuple(m for m in TRAINABLE if config.model[m] is not None)
    optimizer = optim.make_optimizer(config, present)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = loop.abstract_train_state(config, modules, optimizer, sharding)

    params = abstract.params
    assert set(params) == set(present)  # (pytrees order dict keys alphabetically)
    counts = {module: _size(params[module]) for module in present}
    if (name, arg) in PAPER_COUNTS:
        assert counts == PAPER_COUNTS[name, arg]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}, "params stay float32"
    assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(abstract))

    # EMA mirrors the params; one update count per module; scalar counters.
    assert jax.tree.structure(abstract.ema_params) == jax.tree.structure(params)
    assert [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(abstract.ema_params)] == [
        (leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(params)]
    assert set(abstract.ema_counts) == set(present)
    for scalar in (abstract.step, abstract.skipped_updates, abstract.consecutive_skips, *abstract.ema_counts.values()):
        assert scalar.shape == () and scalar.dtype == jnp.int32
    assert abstract.rng.shape == () and jax.dtypes.issubdtype(abstract.rng.dtype, jax.dtypes.prng_key)

    # One Adam state per module, with moments for exactly its trainable (non-constant) params: one vector for a
    # small module, its leaves for a large one (the paper's encoders and decoders).
    inner = abstract.opt_state.inner_states
    assert set(inner) == set(present)
    for module in present:
        leaves = jax.tree_util.tree_flatten_with_path(params[module])[0]
        trainable = sum(math.prod(leaf.shape) for path, leaf in leaves if path[-1].key != "frequencies")
        adam = inner[module].inner_state[0]
        assert _size(adam.mu) == _size(adam.nu) == trainable > 0, module
        as_vector = trainable <= config.optim.vector_update_max_size
        assert len(adam.mu[module]) == (1 if as_vector else sum(path[-1].key != "frequencies" for path, _ in leaves))
        constants = counts[module] - trainable
        # Only the 256x256 decoder's Fourier time embedding holds constants (its frequencies: nf = 128 or smoke's 16).
        expected_constants = config.model[module].nf if config.model[module].get("embedding_type") == "fourier" else 0
        assert constants == expected_constants, module


# ---------------------------------------------------------------------------------------------------------------
# Two real training steps of every `:smoke` variant.
# ---------------------------------------------------------------------------------------------------------------

SMOKE_PREFIX = "SMOKE "
# The NCSN++ backward pass takes a third of the time to compile at XLA's lowest backend optimisation level.
SMOKE_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0", "TF_CPP_MIN_LOG_LEVEL": "2",
             "CUDA_VISIBLE_DEVICES": ""}


def smoke_source(config):
    """What the smoke step reads instead of a prepared data set: random uint8 images (labels where the data set
    has them); None for the embedded digits."""
    import numpy as np

    from lzn_jax import data

    name = config.data.name
    if name == "digits":
        return None
    rng = np.random.default_rng(0)
    if name == "cifar10":
        side, labelled = 32, True
    elif name == "imagenet2012":
        side, labelled = 40, True  # larger than the 32x32 random resized crops
    else:  # an image folder: unlabelled
        side, labelled = 24, False
    images = rng.integers(0, 256, (16, side, side, 3), dtype=np.uint8)
    return data.ArraySource(images, rng.integers(0, 10, 16) if labelled else None)


def smoke_run(name: str) -> dict:
    """Two jitted training steps of ``name``'s `:smoke` variant on one device; what the test checks, as JSON."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lzn_jax import data
    from lzn_jax.train import optim, state, steps

    config = load(name).get_config("smoke")
    modules = state.build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    batches = data.build_pipeline(config.data, sharding=None, source=smoke_source(config))
    # Un-jitted init: its op-by-op kernels are shared by every setting, where a jitted init compiles each anew.
    initial = state.init_state(config, modules, optimizer, jax.random.key(config.seed))
    train_step = jax.jit(steps.make_step(config, steps.StepFunctions(modules, optimizer, batches.to_model_inputs)))
    current, metrics = initial, []
    batch_shapes = None
    for _ in range(2):
        batch = next(batches)
        batch_shapes = {key: list(np.shape(value)) for key, value in batch.items()}
        current, step_metrics = train_step(current, batch)
        metrics.append({key: float(value) for key, value in step_metrics.items()})
    moved = {}
    for module in current.params:
        before = jax.tree.leaves(initial.params[module])
        after = jax.tree.leaves(current.params[module])
        moved[module] = float(sum(jnp.sum(jnp.abs(a - b)) for a, b in zip(after, before, strict=True)))
    return {
        "name": name, "objective": config.objective, "modules": list(current.params), "metrics": metrics,
        "moved": moved, "step": int(current.step), "skipped": int(current.skipped_updates),
        "ema_counts": {module: int(count) for module, count in current.ema_counts.items()},
        "batch_shapes": batch_shapes, "image_size": config.data.image_size, "batch_size": config.data.batch_size,
    }


def _smoke_main(names: list[str]) -> None:
    for name in names:
        try:
            result = smoke_run(name)
        except Exception:  # one broken setting must not hide the others' results
            result = {"name": name, "error": traceback.format_exc()}
        print(SMOKE_PREFIX + json.dumps(result), flush=True)


def _smoke_worker(names: list[str]):
    """A background job (tests/background.py): a fresh interpreter (one XLA flag for all its settings, no 8-device
    set-up) that trains ``names`` in turn; ``{name: result}``. Compiling dominates: about 30-40 s of CPU per
    setting."""

    def body(_directory) -> dict[str, dict]:
        env = {**os.environ, **SMOKE_ENV,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        process = background.run([sys.executable, __file__, *names], cwd=REPO, env=env, timeout=1800)
        assert process.returncode == 0, process.stderr[-5000:]
        results = {}
        for line in process.stdout.splitlines():
            if line.startswith(SMOKE_PREFIX):
                result = json.loads(line[len(SMOKE_PREFIX):])
                results[result["name"]] = result
        return results

    return body


SMOKE_NAMES = [name for name in NAMES if "smoke" in load(name).VARIANTS]
# Two workers, each taking every other setting, so that both lanes can train at once.
SMOKE_JOBS = ("config_smokes_0", "config_smokes_1")
for _index, _job in enumerate(SMOKE_JOBS):
    background.register(_job, ("smoke_results",), _smoke_worker(SMOKE_NAMES[_index::len(SMOKE_JOBS)]),
                        priority=1 + 4 * _index)


@pytest.fixture(scope="session")
def smoke_results() -> dict[str, dict]:
    results = {}
    for job in SMOKE_JOBS:
        results.update(background.wait(job))
    assert sorted(results) == sorted(SMOKE_NAMES), f"missing smoke results: {sorted(set(SMOKE_NAMES) - set(results))}"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_smoke_variant_trains_two_steps(smoke_results, name):
    result = smoke_results[name]
    assert "error" not in result, result.get("error")
    config = load(name).get_config("smoke")
    present = [m for m in TRAINABLE if config.model[m] is not None]
    assert sorted(result["modules"]) == sorted(present)
    assert result["step"] == 2 and result["skipped"] == 0
    assert result["ema_counts"] == {module: 2 for module in present}

    size, batch = config.data.image_size, config.data.batch_size
    channels = 1 if config.data.name == "digits" and config.data.augmentation != "two_view" else 3
    if config.data.augmentation == "two_view":
        assert result["batch_shapes"]["views"] == [batch, 2, size, size, 3]
    else:
        assert result["batch_shapes"]["image"] == [batch, size, size, channels]

    for metrics in result["metrics"]:
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        assert metrics["train/skipped"] == 0.0 and metrics["train/grad_norm"] > 0.0
        assert all(metrics[f"train/enabled_{module}"] == 1.0 for module in present)
        if result["objective"] == "generation":
            label = metrics.get("train/label_loss", 0.0)
            assert ("train/label_loss" in metrics) == ("label_anchors" in present)
            assert -1.0 <= label <= 0.0 and metrics["train/rf_loss"] > 0.0
            assert metrics["train/loss"] == pytest.approx(metrics["train/rf_loss"] + label, rel=1e-5, abs=1e-6)
        else:
            assert 0.0 <= metrics["train/assignment_acc"] <= 1.0 and metrics["train/log_loss"] > 0.0
            assert metrics["train/loss"] == pytest.approx(metrics["train/log_loss"], rel=1e-6)
    # Every module moved. (The encoders of the generation settings move very little: at initialisation the
    # decoder's output layer is near zero, so little gradient reaches the latents; but not nothing.)
    assert all(result["moved"][module] > 0.0 for module in present), result["moved"]


if __name__ == "__main__":
    _smoke_main(sys.argv[1:])
