"""The solver's matrix products alone, in each form XLA can be asked for: which ones the CPU runs slowly.

  .venv/bin/python -m benchmarks.matmul_forms [--sizes 2048,4096] [--dim 200] [--repeats 5]

Each row is one jitted product at B = N = size (float32, HIGHEST precision), best of --repeats calls after a
warm-up, with its rate and its time as a ratio of the plain ``P @ A`` in the same run:

  X @ A.T               (B, D) x (N, D)^T -> (B, N): the logits and G_P = G_M @ A.T
  P @ A                 (B, N) x (N, D) -> (B, D): the mean and G_Q
  P.T @ G               (B, N)^T x (B, D) -> (N, D): the two sums over the batch rows of the backward pass
  (G.T @ P).T           the same written as a transposed (D, N) product: XLA folds the transpose back
  transposed_product    the same behind an optimisation barrier (lzn_jax.zoning._dense.transposed_product)
  G.T @ P               the same sum left as a (D, N) result (lzn_jax.zoning._dense.row_sum_product), as the dense
                        kernels return it for the transposed context
  P * 2                 one elementwise pass over a fresh (B, N) array, for scale: its output's page faults

docs/numerics.md ("Speed: the two sums over the batch rows") reads this table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from lzn_jax.zoning._dense import row_sum_product, transposed_product

HIGHEST = jax.lax.Precision.HIGHEST

FORMS = {
    "X @ A.T": lambda x, a, p: jnp.matmul(x, a.T, precision=HIGHEST),
    "P @ A": lambda x, a, p: jnp.matmul(p, a, precision=HIGHEST),
    "P.T @ G": lambda x, a, p: jnp.matmul(p.T, x, precision=HIGHEST),
    "(G.T @ P).T": lambda x, a, p: jnp.matmul(x.T, p, precision=HIGHEST).T,
    "transposed_product": lambda x, a, p: transposed_product(p, x),
    "G.T @ P": lambda x, a, p: row_sum_product(x, p),
    "P * 2": lambda x, a, p: p * 2.0,
}


def best_seconds(fn, args, repeats: int) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"matrix products alone: D={args.dim}, float32, {jax.device_count()} {jax.default_backend()} device(s), "
          f"best of {args.repeats}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'B=N':>5} {'form':<20} {'time':>9} {'GFLOP/s':>8} {'x P@A':>6}")
    for size in (int(s) for s in args.sizes.split(",")):
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (size, args.dim))
        a = jax.random.normal(keys[1], (size, args.dim))
        p = jax.random.normal(keys[2], (size, size))
        seconds = {name: best_seconds(fn, (x, a, p), args.repeats) for name, fn in FORMS.items()}
        flops = 2.0 * size * size * args.dim
        for name, value in seconds.items():
            rate = "-" if name == "P * 2" else f"{flops / value / 1e9:.0f}"
            print(f"{size:>5} {name:<20} {value * 1e3:7.1f}ms {rate:>8} {value / seconds['P @ A']:5.2f}x")


if __name__ == "__main__":
    main()
