"""The optimiser update of a training step on the real models' parameter trees, both ways ``vectors.py`` offers:
each module as one vector (``config.optim.vector_update_max_size`` above the module's size) against leaf by leaf
(``vector_update_max_size = 0``).

Both do the same arithmetic (``lzn_jax.train.optim.apply_gradients``: zero the frozen modules' gradients, clip the
global norm, Adam with the warmed-up learning rate, the per-module EMA, keep a frozen module or a non-finite update
untouched) and agree to the gradient norm's summation order (checked below). Printed: XLA's compile time, the
HLO line count of the compiled update, and the time of one update (the state donated, as in the trainer), the
vector form as a ratio of the leaf-by-leaf one.

From the repository root:
  .venv/bin/python -m benchmarks.optimizer                                       # digits_joint and cifar10_joint
  .venv/bin/python -m benchmarks.optimizer --configs cifar10_joint --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax.train import optim, state, vectors

REPO = pathlib.Path(__file__).resolve().parents[1]


def _parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="digits_joint,cifar10_joint", help="comma-separated files of configs/")
    parser.add_argument("--repeats", type=int, default=3, help="timed updates after one warm-up")
    return parser.parse_args()


def _config(name: str, max_size: int):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("")
    config.optim.vector_update_max_size = max_size
    return config


def _initial(config, modules, optimizer):
    """A state of the config's real parameter shapes (random values: initialising the models is not measured)."""
    abstract = jax.eval_shape(lambda key: state.init_params(modules, config, key), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.05 * rng.standard_normal(leaf.shape), jnp.float32), abstract)
    opt_state = optimizer.init(vectors.pack_params(params, config.optim.vector_update_max_size))

    def zero():  # one buffer per leaf: the update donates them all
        return jnp.zeros((), jnp.int32)

    return state.TrainState(step=zero(), params=params, opt_state=opt_state,
                            ema_params=jax.tree.map(jnp.copy, params), ema_counts={m: zero() for m in params},
                            rng=jax.random.key(0), skipped_updates=zero(), consecutive_skips=zero())


def _measure(name: str, max_size: int, repeats: int) -> dict[str, Any]:
    config = _config(name, max_size)
    modules = state.build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    current = _initial(config, modules, optimizer)
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), current.params)
    update = jax.jit(lambda s, g: optim.apply_gradients(s, g, jnp.float32(1.0), optimizer=optimizer,
                                                        config=config)[0], donate_argnums=0)
    start = time.perf_counter()
    compiled = update.lower(current, grads).compile()
    compile_s = time.perf_counter() - start
    current = compiled(current, grads)
    jax.block_until_ready(current)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        current = compiled(current, grads)
        jax.block_until_ready(current)
        times.append(time.perf_counter() - start)
    return {"compile": compile_s, "update": min(times), "lines": compiled.as_text().count("\n"), "state": current}


def main():
    args = _parse()
    print(f"optimiser update, float32, {jax.device_count()} {jax.default_backend()} device(s), "
          f"best of {args.repeats} after a warm-up; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'config':>14} {'params':>8} {'leaves':>6} {'form':>7} | {'compile':>8} {'x':>6} | {'HLO lines':>9} "
          f"{'x':>6} | {'update':>9} {'x':>6}")
    for name in args.configs.split(","):
        vector = _measure(name, 2**62, args.repeats)
        leaves = _measure(name, 0, args.repeats)
        # The same update: after 1 + repeats steps both agree (the gradient norm's summation order aside).
        for a, b in zip(jax.tree.leaves(vector["state"].params), jax.tree.leaves(leaves["state"].params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        arrays = jax.tree.leaves(vector["state"].params)
        size = f"{sum(a.size for a in arrays) / 1e6:.1f}M"
        for form, row in (("vector", vector), ("leaves", leaves)):
            ratios = [f"{row[key] / leaves[key]:>5.2f}x" for key in ("compile", "lines", "update")]
            print(f"{name if form == 'vector' else '':>14} {size if form == 'vector' else '':>8} "
                  f"{len(arrays) if form == 'vector' else '':>6} {form:>7} | {row['compile']:>7.1f}s {ratios[0]} | "
                  f"{row['lines']:>9,} {ratios[1]} | {row['update'] * 1e3:>7.1f}ms {ratios[2]}")


if __name__ == "__main__":
    main()
