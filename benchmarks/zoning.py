"""Latent zoning solver: forward + backward time and peak memory, side by side with baselines in one run.

For B = N in --sizes, D = 200, 20 steps, it times the gradient of sum(latents * W) with respect to the anchors
(own anchors = context, as in training) for Euler and DPM-Solver++:
  ours       lzn_jax.zoning.compute_latents (dense kernel, remat policy by memory budget)
  jax-bcast  the reference's (B, N, D) broadcast formulation written plainly in JAX (per-step checkpoint)
  torch      the same broadcast formulation in PyTorch (benchmarks/zoning_torch_reference.py), run by a
             separate Python that has CPU torch (--torch-python)
  matmuls    the products forward + backward cannot avoid: per step (B,D)x(D,N) and (B,N)x(N,D) forward, two
             of each backward, timed at the same shapes; printed as a fraction of our time
Each measurement runs in its own process. Memory: for JAX, XLA's compiled memory analysis (temporaries +
arguments + outputs); for PyTorch, the peak resident set above the resident set once the inputs exist.
Baselines run only up to --max-broadcast-size (their (B, N, D) tensors are 0.8 GB each at 1024).

  python benchmarks/zoning.py --torch-python .venv-torch/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- measurements (child)


def broadcast_forward_jax(anchors, prior, solver, steps):
    """The reference's broadcast formulation in JAX (SPEC.md §1.2), checkpointed per velocity evaluation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.checkpoint
    def data_prediction(x, t):
        t = jnp.asarray(t, x.dtype)
        noise = (x[:, None, :] - (1 - t) * anchors[None]) / t
        log_pdf = -0.5 * jnp.sum(noise**2, -1)
        pdf = jnp.exp(log_pdf - jnp.max(log_pdf, axis=1, keepdims=True))
        v = jnp.sum(pdf[:, :, None] * (noise - anchors[None]), 1) / jnp.sum(pdf, 1)[:, None]
        return x - t * v

    if solver == "euler":
        eps = 1e-4
        h = (1 - eps) / steps

        def step(x, t):
            return x + h * (x - data_prediction(x, t)) / t, None

        times = jnp.asarray(eps + h * np.arange(steps), anchors.dtype)
        x, _ = jax.lax.scan(step, eps * prior + (1 - eps) * anchors, times)
        return x
    # The host-side time grid and update coefficients come from lzn_jax (plain float64 numbers); what is
    # measured is the broadcast velocity, evaluated as often as in our solver.
    from lzn_jax.zoning import dpm_solver

    eps = 1e-3
    times = dpm_solver.time_grid(steps, eps, reverse=False)
    orders = dpm_solver.step_orders(steps, 3, True)
    updates = jnp.asarray(dpm_solver.update_coefficients(times, orders), anchors.dtype)
    x = eps * prior + (1 - eps) * anchors
    d1 = data_prediction(x, times[0])

    def step(carry, per_step):
        x, (d1, d2, d3) = carry
        (ratio, c_a, c_b), t = per_step
        x = d1 + ratio * (x - d1) + c_a * (d1 - d2) + c_b * (d2 - d3)
        return (x, (data_prediction(x, t), d1, d2)), None

    zeros = jnp.zeros_like(x)
    (x, (d1, d2, d3)), _ = jax.lax.scan(step, (x, (d1, zeros, zeros)),
                                        (updates[:-1], jnp.asarray(times[1:-1], anchors.dtype)))
    ratio, c_a, c_b = updates[-1]
    return d1 + ratio * (x - d1) + c_a * (d1 - d2) + c_b * (d2 - d3)


def measure_jax(kind: str, solver: str, size: int, dim: int, steps: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from lzn_jax import zoning

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    anchors, prior, projection = (jax.random.normal(k, (size, dim), jnp.float32) for k in keys)

    if kind == "matmuls":
        # 6 products per step at the solver's shapes; distinct operands per step so none is hoisted.
        def products(x, a):
            def step(carry, scale):
                x, a = carry
                logits = jnp.matmul(x * scale, a.T, precision="highest")
                mean = jnp.matmul(logits, a, precision="highest")
                g_probs = jnp.matmul(mean, a.T, precision="highest")
                g_a1 = jnp.matmul(logits.T, mean, precision="highest")
                g_x = jnp.matmul(g_probs, a, precision="highest")
                g_a2 = jnp.matmul(g_probs.T, x, precision="highest")
                return (x + 1e-3 * g_x, a + 1e-3 * (g_a1 + g_a2)), None

            return jax.lax.scan(step, (x, a), jnp.linspace(1.0, 2.0, steps))[0]

        fn = jax.jit(products)
        args = (anchors, prior)
    else:
        def loss(anchors):
            if kind == "ours":
                latents = zoning.compute_latents(anchors, prior, solver=solver, num_steps=steps)
            else:
                latents = broadcast_forward_jax(anchors, prior, solver, steps)
            return jnp.sum(latents * projection)

        fn = jax.jit(jax.grad(loss))
        args = (anchors,)
    compiled = fn.lower(*args).compile()
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    # XLA's own account of what the executable allocates: its temporaries plus arguments and outputs. (The
    # process's resident-set peak is dominated by the compiler here, so it would not measure the solver.)
    analysis = compiled.memory_analysis()
    peak = sum(getattr(analysis, f"{part}_size_in_bytes") for part in ("temp", "argument", "output"))
    return {"seconds": min(times[1:]), "peak_bytes": peak}


# ----------------------------------------------------------------------------------------- driver (parent)


def run_child(command: list[str], timeout: float) -> dict | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_seconds(result):
    return "-" if result is None else (result.get("error", "")[:24] if "error" in result else
                                       f"{result['seconds']:.3f}s")


def fmt_bytes(result):
    if result is None or "error" in result:
        return "-"
    return f"{result['peak_bytes'] / 2**30:.2f}G"


def speedup(baseline, ours) -> str:
    if baseline is None or "error" in baseline or "error" in ours:
        return "-"
    return f"{baseline['seconds'] / ours['seconds']:.0f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,4096,8192")
    parser.add_argument("--solvers", default="euler,dpm_solver++")
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-broadcast-size", type=int, default=1024)
    parser.add_argument("--torch-python", default=None, help="a Python with CPU torch for the PyTorch baseline")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SOLVER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, solver, size = args.child
        print(json.dumps(measure_jax(kind, solver, int(size), args.dim, args.steps, args.repeats)))
        return

    me = [sys.executable, str(pathlib.Path(__file__).resolve())]
    common = ["--dim", str(args.dim), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    print(f"zoning benchmark: D={args.dim}, {args.steps} steps, forward+backward, float32, "
          f"{os.cpu_count()} CPU cores; best of {args.repeats}")
    header = (f"{'solver':<13}{'B=N':>6} | {'ours':>9}{'mem':>7} | {'jax-bcast':>9}{'mem':>7} | "
              f"{'torch':>9}{'mem':>7} | {'x torch':>8}{'x jax-b':>8} | {'matmuls':>9}{'frac':>6}")
    print(header)
    print("-" * len(header))
    for solver in args.solvers.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            ours = run_child(me + common + ["--child", "ours", solver, str(size)], args.timeout)
            matmuls = run_child(me + common + ["--child", "matmuls", solver, str(size)], args.timeout)
            jax_bcast = torch_bcast = None
            if size <= args.max_broadcast_size:
                jax_bcast = run_child(me + common + ["--child", "broadcast", solver, str(size)], args.timeout)
                if args.torch_python:
                    torch_bcast = run_child(
                        [args.torch_python, str(REPO / "benchmarks" / "zoning_torch_reference.py"), solver,
                         str(size), str(args.dim), str(args.steps), str(args.repeats)], args.timeout)

            fraction = "-" if "error" in ours or "error" in matmuls else \
                f"{matmuls['seconds'] / ours['seconds']:.0%}"
            print(f"{solver:<13}{size:>6} | {fmt_seconds(ours):>9}{fmt_bytes(ours):>7} | "
                  f"{fmt_seconds(jax_bcast):>9}{fmt_bytes(jax_bcast):>7} | {fmt_seconds(torch_bcast):>9}"
                  f"{fmt_bytes(torch_bcast):>7} | {speedup(torch_bcast, ours):>8}{speedup(jax_bcast, ours):>8} | "
                  f"{fmt_seconds(matmuls):>9}{fraction:>6}", flush=True)


if __name__ == "__main__":
    main()
