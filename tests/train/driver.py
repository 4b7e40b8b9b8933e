"""The ``loop.train`` runs of the trainer tests, in one subprocess (run as a script, not collected by pytest).

    python tests/train/driver.py runs OUT      # every run below, then OUT/results.json
    python tests/train/driver.py kill WORKDIR K  # train with async saves every step; SIGKILL right after step K's save

All runs use ``tiny.joint()`` (6 steps; the decoder's stage ends after 2), so that they share one compiled step: the
parent (tests/train/conftest.py) gives this process and the ``kill`` child the same XLA flags and a persistent
compilation cache. What the runs leave (checkpoints, metrics.jsonl) is compared by the tests, in the pytest process.

    B      fresh, 6 steps, a checkpoint after every step (the uninterrupted reference)
    kill   a child process: async saves every step, SIGKILL right after the save of step KILL_STEP returns
    K      resumes the killed workdir to the end
    A      fresh, stopped after 3 steps (stop_after_steps, as a preemption would), then resumed to 6 by a second call
    N      a copy of A's step-3 checkpoint with one NaN parameter: every later update is skipped, and after
           max_consecutive_skips (3) of them loop.train raises TrainingDivergedError
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

KILL_STEP = 4


def listing(directory: pathlib.Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` (directories as ``"dir"``)."""
    result = {}
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        result[relative] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def config(**checkpoint):
    from tests.train import tiny

    c = tiny.joint()
    for key, value in checkpoint.items():
        c.checkpoint[key] = value
    return c


def cpu_seconds() -> float:
    """CPU time of this process and its finished children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train(name, cfg, workdir, results, **kwargs):
    from lzn_jax.train import loop

    start, cpu = time.perf_counter(), cpu_seconds()
    try:
        summary = loop.train(cfg, workdir, **kwargs)
        results[name] = {"summary": summary}
    except Exception as error:  # reported to the tests, which decide whether it was expected
        results[name] = {"error": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    results[name]["cpu_seconds"] = round(cpu_seconds() - cpu, 1)
    print(f"driver: {name} done in {results[name]['seconds']} s ({results[name]['cpu_seconds']} s of CPU)",
          flush=True)


def poison_checkpoint(source: pathlib.Path, target: pathlib.Path) -> None:
    """Writes ``source``'s newest checkpoint into the new checkpoint directory ``target`` with one NaN parameter."""
    import jax
    import jax.numpy as jnp

    from lzn_jax import checkpoint, parallel
    from lzn_jax.train import loop, optim
    from lzn_jax.train import state as state_lib

    cfg = config()
    modules = state_lib.build_modules(cfg)
    optimizer = optim.make_optimizer(cfg, modules.present())
    replicated = jax.NamedSharding(parallel.data_mesh(1), jax.P())
    abstract = loop.abstract_train_state(cfg, modules, optimizer, replicated)
    state, data_state = checkpoint.restore_state(source, abstract)
    kernel = state.params["encoder"]["conv_in"]["kernel"]
    state = state.replace(params={**state.params, "encoder": {
        **state.params["encoder"], "conv_in": {**state.params["encoder"]["conv_in"],
                                              "kernel": kernel.at[0, 0, 0, 0].set(jnp.nan)}}})
    with checkpoint.Checkpointer(target, handle_sigterm=False) as ckpt:
        assert ckpt.save(int(state.step), state, data_state=data_state, force=True)


def runs(out: pathlib.Path) -> None:
    results: dict = {}
    results_file = out / "results.json"
    train("B", config(every_steps=1), out / "B", results)
    print("driver: compiled", flush=True)  # the persistent cache now holds the step

    cpu = cpu_seconds()
    child = subprocess.run([sys.executable, __file__, "kill", str(out / "K"), str(KILL_STEP)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200, check=False)
    results["kill"] = {"returncode": child.returncode, "output": child.stdout[-4000:],
                       "checkpoints": sorted(p.name for p in (out / "K" / "checkpoints").iterdir()),
                       "cpu_seconds": round(cpu_seconds() - cpu, 1)}
    print(f"driver: kill child done ({results['kill']['cpu_seconds']} s of CPU)", flush=True)
    train("K", config(every_steps=1, async_save=True), out / "K", results)

    train("A1", config(), out / "A", results, stop_after_steps=3)
    shutil.copytree(out / "A", out / "A_after_3")
    train("A2", config(), out / "A", results)

    poison_checkpoint(out / "A_after_3" / "checkpoints", out / "N" / "checkpoints")
    results["N_before"] = listing(out / "N" / "checkpoints")
    # A checkpoint is due at every step, so the streak also shows its periodic saves are left out.
    train("N", config(every_steps=1), out / "N", results)
    results["N_after"] = listing(out / "N" / "checkpoints")

    results["cpu_seconds"] = round(cpu_seconds(), 1)
    results_file.write_text(json.dumps(results, indent=1))


def kill(workdir: pathlib.Path, step: int) -> None:
    from lzn_jax import checkpoint
    from lzn_jax.train import loop

    original = checkpoint.Checkpointer.save

    def save(self, at, state, **kwargs):
        started = original(self, at, state, **kwargs)
        if at == step:
            print(f"driver: killing myself right after the save of step {at} returned ({started})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    checkpoint.Checkpointer.save = save
    loop.train(config(every_steps=1, async_save=True), workdir)
    print("driver: the kill step was never reached", flush=True)
    sys.exit(3)


if __name__ == "__main__":
    if sys.argv[1] == "runs":
        runs(pathlib.Path(sys.argv[2]))
    elif sys.argv[1] == "kill":
        kill(pathlib.Path(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
