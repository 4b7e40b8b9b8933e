"""lzn_jax.checkpoint: bitwise round trips, resharding, refusal of incompatible checkpoints, kills and SIGTERM."""

import hashlib
import os
import pathlib
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lzn_jax import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 180


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    key: jax.Array


def make_state(seed: int = 0) -> TrainState:
    """A small state with every kind of leaf a train state has; the optimiser state is non-trivial."""
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {"dense": {"kernel": jnp.asarray(rng.standard_normal((16, 3)), jnp.float32),
                              "bias": jnp.asarray(rng.standard_normal(3), jnp.float32)}},
        "decoder": {"scale": jnp.asarray(rng.standard_normal((2, 3)), jnp.bfloat16)},
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return TrainState(step=jnp.int32(seed + 7), params=params, opt_state=opt_state,
                      key=jax.random.fold_in(jax.random.key(seed), 3))


def abstract_like(tree, sharding_of=lambda leaf: jax.sharding.SingleDeviceSharding(jax.devices()[0])):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def snapshot(directory: pathlib.Path) -> dict:
    """Every path under ``directory`` with the SHA-256 of each file (None for directories)."""
    return {str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def step_dirs(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name[0].isdigit())


def test_round_trip_is_bitwise_and_save_decides_when(tmp_path):
    directory = tmp_path / "checkpoints"
    state = make_state()
    with checkpoint.Checkpointer(directory, every_steps=5, async_save=False, handle_sigterm=False) as ckpt:
        assert ckpt.restore(abstract_like(state)) is None        # nothing there yet: a fresh run
        assert not ckpt.save(7, state, data_state={"step": 7})   # not a multiple of every_steps
        assert ckpt.save(10, state, data_state={"step": 10, "name": "digits", "seed": [1, 2]})
        assert not ckpt.save(10, state, force=True)              # the preemption save after a regular one
        assert ckpt.all_steps() == [10]
    restored, data_state = checkpoint.Checkpointer(directory, handle_sigterm=False).restore(abstract_like(state))
    assert isinstance(restored, TrainState)
    assert_trees_equal(restored, state)
    assert restored.key.dtype == state.key.dtype
    assert data_state == {"step": 10, "name": "digits", "seed": [1, 2]}
    # The restored key draws exactly what the saved one draws.
    np.testing.assert_array_equal(jax.random.normal(restored.key, (4,)), jax.random.normal(state.key, (4,)))


def test_relative_paths_are_taken_from_the_current_directory(tmp_path, monkeypatch):
    """``--workdir=workdirs/run``, as README's main job passes it: orbax itself refuses relative paths."""
    monkeypatch.chdir(tmp_path)
    state = make_state()
    with checkpoint.Checkpointer("runs/checkpoints", every_steps=1, async_save=False, handle_sigterm=False) as ckpt:
        assert ckpt.save(3, state, data_state={"step": 3})
    assert step_dirs(tmp_path / "runs" / "checkpoints") == ["3"]
    restored, data_state = checkpoint.restore_state("runs/checkpoints", abstract_like(state))
    assert_trees_equal(restored, state)
    assert data_state == {"step": 3}
    assert_trees_equal(checkpoint.restore_params("runs/checkpoints/3", abstract_like(state.params)), state.params)


def test_async_saves_keep_the_newest_two(tmp_path):
    directory = tmp_path / "checkpoints"
    states = {step: make_state(step) for step in range(1, 5)}
    with checkpoint.Checkpointer(directory, every_steps=1, keep=2, async_save=True, handle_sigterm=False) as ckpt:
        for step, state in states.items():
            assert ckpt.save(step, state, data_state={"step": step})
            # save returned after the copy to host: the caller may donate (here: delete) the arrays at once.
            for leaf in jax.tree.leaves(state):
                leaf.delete()
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4]
    assert step_dirs(directory) == ["3", "4"]
    restored, data_state = checkpoint.restore_state(directory, abstract_like(make_state(4)))
    assert_trees_equal(restored, make_state(4))
    assert data_state == {"step": 4}


def sharded_state(mesh):
    """A state with one leaf (and a batch of keys) split over ``"data"``, everything else replicated."""
    state = {"params": make_state().params, "rows": jnp.arange(32 * 3, dtype=jnp.float32).reshape(32, 3),
             "keys": jax.random.split(jax.random.key(1), 8), "key": jax.random.key(2), "step": jnp.int32(3)}
    return jax.tree_util.tree_map_with_path(lambda path, x: jax.device_put(x, layout(mesh, path)), state)


def layout(mesh, path):
    return NamedSharding(mesh, P("data") if path[0].key in ("rows", "keys") else P())


@pytest.mark.parametrize("saved_on, restored_on", [(8, 1), (8, 4), (1, 8)])
def test_restore_onto_another_device_count(tmp_path, saved_on, restored_on):
    meshes = {n: jax.make_mesh((n,), ("data",), devices=jax.devices()[:n]) for n in (1, 4, 8)}
    state = sharded_state(meshes[saved_on])
    with checkpoint.Checkpointer(tmp_path, every_steps=1, async_save=False, handle_sigterm=False) as ckpt:
        ckpt.save(3, state)
    target = meshes[restored_on]
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=layout(target, path)), state)
    restored, data_state = checkpoint.restore_state(tmp_path, abstract)
    assert data_state is None
    assert_trees_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert got.sharding == want.sharding
    assert len(restored["rows"].addressable_shards) == restored_on


def test_incompatible_checkpoint_is_refused_untouched(tmp_path):
    directory = tmp_path / "checkpoints"
    state = make_state()
    with checkpoint.Checkpointer(directory, every_steps=1, async_save=False, handle_sigterm=False) as ckpt:
        ckpt.save(1, state, data_state={"step": 1})
    before = snapshot(directory)

    other = make_state()
    params = dict(other.params)
    params["encoder"] = {"dense": {"kernel": jnp.zeros((8, 3)), "bias": other.params["encoder"]["dense"]["bias"]},
                         "extra": jnp.zeros(5)}
    params["decoder"] = {}                                       # decoder/scale missing
    other = other.replace(params=params, step=jnp.float32(0))    # step: int32 saved, float32 expected
    with pytest.raises(ValueError) as info:
        checkpoint.Checkpointer(directory, handle_sigterm=False).restore(abstract_like(other))
    message = str(info.value)
    assert isinstance(info.value, checkpoint.IncompatibleCheckpointError)
    assert "params/encoder/dense/kernel: saved float32[16,3], expected float32[8,3]" in message
    assert "step: saved int32[], expected float32[]" in message
    assert "params/encoder/extra" in message and "missing" in message
    assert "params/decoder/scale" in message and "not in this state" in message
    assert "fresh --workdir" in message
    assert "params/encoder/dense/bias" not in message            # matching leaves are not listed
    assert snapshot(directory) == before
    # The same goes for init_from: a params subtree of another model.
    with pytest.raises(ValueError, match="params/encoder/dense/kernel"):
        checkpoint.restore_params(directory, abstract_like(other.params))
    assert snapshot(directory) == before


def test_clear_errors_for_a_file_and_a_missing_step(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is a file"):
        checkpoint.Checkpointer(a_file, handle_sigterm=False)
    with pytest.raises(NotADirectoryError, match="is a file"):
        checkpoint.Checkpointer(a_file / "checkpoints", handle_sigterm=False)

    state = make_state()
    with checkpoint.Checkpointer(tmp_path / "ck", every_steps=2, async_save=False, handle_sigterm=False) as ckpt:
        for step in (2, 4):
            ckpt.save(step, state)
        with pytest.raises(FileNotFoundError, match="step 3 .*available steps: 2, 4"):
            ckpt.restore(abstract_like(state), step=3)
        restored, _ = ckpt.restore(abstract_like(state), step=2)
    assert_trees_equal(restored, state)


def test_restore_params_reads_only_the_params(tmp_path):
    directory = tmp_path / "checkpoints"
    state = make_state()
    with checkpoint.Checkpointer(directory, every_steps=1, async_save=False, handle_sigterm=False) as ckpt:
        ckpt.save(1, make_state(1))
        ckpt.save(2, state)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    abstract = abstract_like(state.params, lambda x: NamedSharding(mesh, P()))
    params = checkpoint.restore_params(directory, abstract)
    assert_trees_equal(params, state.params)
    assert all(leaf.sharding == NamedSharding(mesh, P()) for leaf in jax.tree.leaves(params))
    assert_trees_equal(checkpoint.restore_params(directory, abstract, step=1), make_state(1).params)
    assert_trees_equal(checkpoint.restore_params(directory / "1", abstract), make_state(1).params)


def run_script(tmp_path, source: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, check=False)


BIG = 25_000_000  # int32 elements: 100 MB, so that the asynchronous write is still in flight when killed


def big_state(step):
    return {"step": jnp.int32(step), "key": jax.random.key(step),
            "big": jnp.asarray(np.random.default_rng(step).integers(0, 2**31, BIG, dtype=np.int32))}


def test_sigkill_during_an_async_save_keeps_the_last_complete_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    result = run_script(tmp_path, f"""
        import os, signal, sys
        import jax, jax.numpy as jnp, numpy as np
        from lzn_jax import checkpoint

        def big_state(step):
            return {{"step": jnp.int32(step), "key": jax.random.key(step),
                    "big": jnp.asarray(np.random.default_rng(step).integers(0, 2**31, {BIG}, dtype=np.int32))}}

        ckpt = checkpoint.Checkpointer(sys.argv[1], every_steps=1, keep=3, async_save=True)
        ckpt.save(1, big_state(1), data_state={{"step": 1}})
        ckpt.wait_until_finished()
        state = jax.block_until_ready(big_state(2))
        ckpt.save(2, state, data_state={{"step": 2}})
        print("killing", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """, str(directory))
    assert result.returncode == -9, result.stdout + result.stderr[-3000:]
    assert "killing" in result.stdout
    names = sorted(p.name for p in directory.iterdir())
    assert "1" in names and ("2" in names or any(n.startswith("2.orbax-checkpoint-tmp") for n in names)), names

    sd = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sd),
                "key": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sd),
                "big": jax.ShapeDtypeStruct((BIG,), jnp.int32, sharding=sd)}
    ckpt = checkpoint.Checkpointer(directory, every_steps=1, keep=3, async_save=True, handle_sigterm=False)
    restored, data_state = ckpt.restore(abstract)
    step = int(restored["step"])
    assert step in (1, 2) and data_state == {"step": step}
    assert_trees_equal(restored, big_state(step))
    # Training goes on: the next save works and the killed save's temporary directory is gone.
    assert ckpt.save(3, restored, data_state={"step": 3})
    ckpt.close()
    assert not [p for p in directory.iterdir() if "tmp" in p.name]
    restored, data_state = checkpoint.restore_state(directory, abstract)
    assert int(restored["step"]) == step and data_state == {"step": 3}


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    directory = tmp_path / "checkpoints"
    result = run_script(tmp_path, """
        import os, signal, sys
        import jax.numpy as jnp
        from lzn_jax import checkpoint

        before = signal.getsignal(signal.SIGTERM)
        ckpt = checkpoint.Checkpointer(sys.argv[1], every_steps=1000, keep=2, async_save=True)
        state = {"step": jnp.int32(0), "w": jnp.zeros(4)}
        for step in range(1, 1000):
            state = {"step": jnp.int32(step), "w": state["w"] + 1}
            ckpt.save(step, state, data_state={"step": step})
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            if ckpt.preemption_requested(step):
                ckpt.save(step, state, data_state={"step": step}, force=True)
                ckpt.wait_until_finished()
                ckpt.close()
                assert signal.getsignal(signal.SIGTERM) is before
                print("preempted at", step, flush=True)
                sys.exit(0)
        sys.exit(3)
        """, str(directory))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    step = int(result.stdout.split("preempted at")[1])
    sd = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sd),
                "w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sd)}
    restored, data_state = checkpoint.restore_state(directory, abstract)
    assert int(restored["step"]) == step and data_state == {"step": step}
    np.testing.assert_array_equal(restored["w"], np.full(4, step, np.float32))


MULTIPROCESS_WORKER = """
import os, signal, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

process_id, port, directory, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_enable_preemption_service", mode == "jax_service")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=60)
from lzn_jax import checkpoint

mesh = jax.make_mesh((4,), ("data",))
rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

def make_state(step):
    values = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) + step
    return {"step": jax.make_array_from_callback((), replicated, lambda index: np.int32(step)),
            "rows": jax.make_array_from_callback((8, 3), rows, lambda index: values[index])}

ckpt = checkpoint.Checkpointer(directory, every_steps=1000, keep=2, async_save=True)
for step in range(1, 3000):
    state = make_state(step)
    ckpt.save(step, state, data_state={"step": step})
    if process_id == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)      # only one process is told
    if ckpt.preemption_requested(step):
        ckpt.save(step, state, data_state={"step": step}, force=True)
        ckpt.wait_until_finished()
        ckpt.close()
        # Every process restores (orbax synchronises them) onto the mesh the run uses.
        restored, data_state = checkpoint.restore_state(directory, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
        assert int(restored["step"]) == step and data_state == {"step": step}, (restored, data_state)
        print("preempted at", step, flush=True)
        jax.distributed.shutdown()
        sys.exit(0)
    time.sleep(0.01)
sys.exit(3)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["jax_service", "allgather"])
def test_two_processes_agree_on_the_preemption_step(tmp_path, mode):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(MULTIPROCESS_WORKER)
    directory = tmp_path / "checkpoints"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(directory), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    steps = {int(output.split("preempted at")[1].split()[0]) for output in outputs}
    assert len(steps) == 1, outputs                              # both saved the same step
    step = steps.pop()
    # Our flag is gathered on the step it was set; JAX's service agrees on a later step (max over hosts + 1).
    assert step == 3 if mode == "allgather" else step > 3, step
    mesh = jax.make_mesh((8,), ("data",))
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
                "rows": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=NamedSharding(mesh, P("data")))}
    restored, data_state = checkpoint.restore_state(directory, abstract)
    assert int(restored["step"]) == step and data_state == {"step": step}
    np.testing.assert_array_equal(restored["rows"], np.arange(24, dtype=np.float32).reshape(8, 3) + step)
