"""Latent zoning solver: forward + backward time and memory, side by side with baselines measured in the same run.

  python benchmarks/zoning.py --torch-python .venv-torch/bin/python

Three blocks, float32, D = 200 (--dim); every time is the best of --repeats timed runs after one untimed
warm-up, except where a run takes minutes: the torch broadcast baseline gets no warm-up, and a JAX
measurement whose first run exceeds 20 s counts that run as its first timed one.

1. Forward flow (--sizes, default B = N = 1024, 2048, 4096; Euler and DPM-Solver++, --steps 20): the gradient
   of sum(latents * W) with respect to the anchors (own anchors = context, as in training).
     remat      our rematerialisation decision, zoning.remat_plan: "kept" (each step's (B, N) posterior is kept
                for the backward pass) or "remat" (each step's posterior evaluation is recomputed); --remat sets
                SolverOptions.remat (default auto: kept up to the 2 GiB default budget, so up to B = N = 4096)
     ours       lzn_jax.zoning.compute_latents (dense kernel, default options)
     lean       the matmul form in PyTorch (benchmarks/zoning_torch_reference.py, run by --torch-python): logits
                ((1-t) x A^T - (1-t)^2 |a|^2 / 2) / t^2, softmax, mean = p A, v = (x - mean) / t, the same
                flows and time grids, plain autograd, nothing checkpointed. "x lean" = lean time / ours.
     lean-jax   the same matmul form written plainly in JAX (plain jax.grad), compiled by the same XLA as ours:
                it tells our formulation's cost from the runtime's. "x l-jax" = lean-jax time / ours.
     jax-bcast  the reference's (B, N, D) broadcast formulation written plainly in JAX, checkpointed per step
     torch      the same broadcast formulation in PyTorch, checkpointed per step; "x torch" / "x jax-b" =
                its time / ours. Both broadcast baselines run only up to --max-broadcast-size (default 1024:
                each of their (B, N, D) tensors is 0.8 GB there), or not at all with --skip-broadcast.
     matmuls    the six products per step that forward + backward cannot avoid ((B,D)x(D,N) and (B,N)x(N,D)
                forward, and backward two of those and two (B,N)^T x (B,D)), timed alone at the same shapes,
                each in its fastest form (matmul_floor); "frac" = their time / ours.
     flt ours / flt lean   minor page faults per timed call (getrusage), in thousands, of ours and of the lean
                PyTorch rewrite: XLA:CPU allocates a program's temporaries as one block at every call, which
                the process then faults through page by page with glibc's defaults (docs/numerics.md, "Host
                memory on the CPU"). --host-allocator retain runs every child, ours and the PyTorch ones alike,
                with GLIBC_TUNABLES=RETAIN_TUNABLES, under which freed memory stays mapped: once the heap has
                grown to hold a call's blocks (over the first calls, which the column still counts), calls fault
                on none of it. The default, "default", leaves glibc as it is.
2. Reverse flow (--assign-sizes, default 1024, 2048; reverse Euler, --assign-steps 100): the gradient of the
   alignment loss (cut-off 0.2, probabilities) with respect to latents and context, targets = own index.
     assign     zoning.assign (records the (S, B, N) log posteriors) + zoning.alignment_loss
     targets    zoning.assign_targets (records (S, B)) + zoning.target_alignment_loss
     lean       the matmul-form reverse flow in PyTorch: log-softmax per step, the target column, max over
                the steps after the cut-off. "x lean" = lean time / assign, and lean time / targets.
     block...   zoning.assign_targets with the blockwise kernel (--block-size); "x targets" = its time / targets.
3. Blockwise kernel (--blockwise-sizes, default --sizes; both solvers): compute_latents with
   SolverOptions(block_size=--block-size, 256) against the dense kernel (the "ours" measurement of block 1),
   same loss; "time x" / "mem x" = blockwise / dense.

Memory: for JAX, XLA's compiled memory analysis of the whole jitted gradient (temporaries + arguments +
outputs; the process's resident-set peak is dominated by the compiler, so it would not measure the solver);
for PyTorch, the process's peak resident set above the resident set once the inputs exist (it includes the
allocator's cached blocks). The two are not the same measure: compare them as orders of magnitude.

Each measurement runs in its own process. The machine is whatever runs the script: on a shared machine repeat
the run; the ratios, measured in the same run, are more stable than the times.

On a GPU, JAX runs on its default backend (the GPU) and --torch-device cuda puts the PyTorch baselines there too
(full float32 products on both sides; PyTorch's memory is then torch.cuda.max_memory_allocated); the page-fault
columns then only count the host:

  python benchmarks/zoning.py --torch-python python3 --torch-device cuda --sizes 4096,8192,16384 \
      --skip-broadcast --blocks forward,assign --assign-sizes 4096,8192 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_SCRIPT = REPO / "benchmarks" / "zoning_torch_reference.py"
# A JAX measurement whose first (warm-up) run takes longer than this counts that run as its first timed one.
LONG_RUN_SECONDS = 20.0
# --host-allocator retain: glibc malloc settings under which freed memory stays mapped for the next call. One
# arena, so that the worker threads that run XLA:CPU's programs allocate from the main heap; no mmap, so that a
# large block comes from that heap too; no trimming (SIZE_MAX), so that the heap never shrinks.
RETAIN_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"


# ----------------------------------------------------------------------------------------- measurements (child)


def broadcast_data_prediction(anchors):
    """The reference's broadcast formulation in JAX (docs/method.md), checkpointed per velocity evaluation."""
    import jax
    import jax.numpy as jnp

    @jax.checkpoint
    def data_prediction(x, t):
        t = jnp.asarray(t, x.dtype)
        noise = (x[:, None, :] - (1 - t) * anchors[None]) / t
        log_pdf = -0.5 * jnp.sum(noise**2, -1)
        pdf = jnp.exp(log_pdf - jnp.max(log_pdf, axis=1, keepdims=True))
        v = jnp.sum(pdf[:, :, None] * (noise - anchors[None]), 1) / jnp.sum(pdf, 1)[:, None]
        return x - t * v

    return data_prediction


def lean_data_prediction(anchors):
    """The lean rewrite's matmul form in JAX, as zoning_torch_reference.py writes it in PyTorch: logits
    [(1 - t) <x, a> - (1 - t)^2 |a|^2 / 2] / t^2 as one product, a softmax, the mean as a second product; plain
    automatic differentiation, nothing checkpointed."""
    import jax
    import jax.numpy as jnp

    half_squared_norms = 0.5 * jnp.sum(anchors * anchors, axis=1)

    def data_prediction(x, t):
        t = jnp.asarray(t, x.dtype)
        inner = jnp.matmul(x, anchors.T, precision="highest")
        logits = ((1 - t) * inner - (1 - t) ** 2 * half_squared_norms) / t**2
        return jnp.matmul(jax.nn.softmax(logits, axis=1), anchors, precision="highest")

    return data_prediction


def forward_flow_jax(data_prediction, anchors, prior, solver, steps):
    """The forward flow from ``eps * prior + (1 - eps) * anchors`` with a given data prediction, on the same time
    grids as our solver and the PyTorch baselines (Euler: t from 1e-4; DPM-Solver++ order 3: t from 1e-3)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if solver == "euler":
        eps = 1e-4
        h = (1 - eps) / steps

        def step(x, t):
            return x + h * (x - data_prediction(x, t)) / t, None

        times = jnp.asarray(eps + h * np.arange(steps), anchors.dtype)
        x, _ = jax.lax.scan(step, eps * prior + (1 - eps) * anchors, times)
        return x
    # The host-side time grid and update coefficients come from lzn_jax (plain float64 numbers); what is
    # measured is the data prediction, evaluated as often as in our solver.
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


def matmul_floor(steps):
    """Six products per step at the solver's shapes; every one depends on the step's x, so none is hoisted.

    Each product in the fastest form XLA:CPU offers, as the solver itself forms them: the two sums over the batch
    rows as ``(D, B) (B, N)`` products with (D, N) results, summed over the steps in that layout (1.5-1.7x
    faster on the CPU than ``(B, N)^T (B, D)``, which copies the (B, N) operand first).
    """
    import jax
    import jax.numpy as jnp

    from lzn_jax.zoning._dense import row_sum_product

    def products(x, a):
        def step(carry, scale):
            x, g_a = carry
            logits = jnp.matmul(x * scale, a.T, precision="highest")
            mean = jnp.matmul(logits, a, precision="highest")
            g_probs = jnp.matmul(mean, a.T, precision="highest")
            g_x = jnp.matmul(g_probs, a, precision="highest")
            g_a = g_a + row_sum_product(mean, logits) + row_sum_product(x, g_probs)
            return (x + 1e-3 * g_x, g_a), None

        return jax.lax.scan(step, (x, jnp.zeros(a.shape[::-1], a.dtype)), jnp.linspace(1.0, 2.0, steps))[0]

    return products


def measure_jax(kind: str, solver: str, size: int, args) -> dict:
    import jax
    import jax.numpy as jnp

    from lzn_jax import zoning

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    first, second, projection = (jax.random.normal(k, (size, args.dim), jnp.float32) for k in keys)

    if kind == "matmuls":
        fn, fn_args = jax.jit(matmul_floor(args.steps)), (first, second)
    elif kind in ("ours", "broadcast", "lean-jax", "blockwise"):
        anchors, prior = first, second
        options = zoning.SolverOptions(solver=solver, num_steps=args.steps, remat=args.remat,
                                       block_size=args.block_size if kind == "blockwise" else None)
        formulation = {"broadcast": broadcast_data_prediction, "lean-jax": lean_data_prediction}.get(kind)

        def loss(anchors):
            if formulation is not None:
                latents = forward_flow_jax(formulation(anchors), anchors, prior, solver, args.steps)
            else:
                latents = zoning.compute_latents(anchors, prior, options=options)
            return jnp.sum(latents * projection)

        fn, fn_args = jax.jit(jax.grad(loss)), (anchors,)
    elif kind in ("assign", "targets", "targets-blockwise"):
        latents, context = first, second
        targets = jnp.arange(size) % size
        options = zoning.SolverOptions(solver="euler", num_steps=args.assign_steps,
                                       block_size=args.block_size if kind == "targets-blockwise" else None)

        def loss(latents, context):
            if kind == "assign":
                log_probs = zoning.assign(latents, context, options=options).log_probs
                return zoning.alignment_loss(log_probs, targets, cut_off=0.2)
            target_log_probs = zoning.assign_targets(latents, context, targets, options=options).target_log_probs
            return zoning.target_alignment_loss(target_log_probs, cut_off=0.2)

        fn, fn_args = jax.jit(jax.grad(loss, argnums=(0, 1))), (latents, context)
    else:
        raise ValueError(kind)

    compiled = fn.lower(*fn_args).compile()

    def run_once():
        start = time.perf_counter()
        jax.block_until_ready(compiled(*fn_args))
        return time.perf_counter() - start

    first = run_once()  # the warm-up, unless it is long enough to count as a timed run
    times = [first] if first > LONG_RUN_SECONDS else []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    timed = args.repeats - len(times)
    times += [run_once() for _ in range(timed)]
    faults_after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    analysis = compiled.memory_analysis()
    peak = sum(getattr(analysis, f"{part}_size_in_bytes") for part in ("temp", "argument", "output"))
    result = {"seconds": min(times), "peak_bytes": peak}
    if timed > 0:  # the faults of calls after the first (a long first call counts as timed, but faults more)
        result["faults_per_call"] = (faults_after - faults_before) / timed
    return result


# ----------------------------------------------------------------------------------------- driver (parent)


def run_child(command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout:.0f}s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ok(result) -> bool:
    return result is not None and "error" not in result


def fmt_seconds(result) -> str:
    if result is None:
        return "-"
    return f"{result['seconds']:.3f}s" if ok(result) else "ERR"


def backend_name() -> str:
    """The device the JAX children run on, asked of a short-lived child: on a GPU, a backend started in this
    parent would hold most of the device's memory while the children measure."""
    probe = ("import jax, os; d = jax.devices()[0]; "
             "print(d.device_kind if d.platform != 'cpu' else f'{os.cpu_count()} CPU cores')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "unknown device"


def fmt_faults(result) -> str:
    """Minor page faults per timed call, in thousands."""
    if not ok(result) or "faults_per_call" not in result:
        return "-"
    return f"{result['faults_per_call'] / 1e3:.1f}k"


def fmt_bytes(result) -> str:
    return f"{result['peak_bytes'] / 2**30:.2f}G" if ok(result) else "-"


def ratio(numerator, denominator, key="seconds") -> str:
    if not (ok(numerator) and ok(denominator)):
        return "-"
    value = numerator[key] / denominator[key]
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def fraction(part, whole) -> str:
    return f"{part['seconds'] / whole['seconds']:.0%}" if ok(part) and ok(whole) else "-"


def print_header(title: str, columns: list[tuple[str, int]]) -> None:
    print(f"\n{title}")
    print(" ".join(f"{name:<{width}}" if i == 0 else f"{name:>{width}}" for i, (name, width) in enumerate(columns)))
    print("-" * (sum(width for _, width in columns) + len(columns) - 1))


def print_row(columns: list[tuple[str, int]], cells: list[str]) -> None:
    print(" ".join(f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
                   for i, ((_, width), cell) in enumerate(zip(columns, cells))), flush=True)


def report_errors(results: dict) -> None:
    for name, result in results.items():
        if result is not None and "error" in result:
            print(f"    {name}: {result['error']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,4096", help="B = N of the forward-flow table")
    parser.add_argument("--solvers", default="euler,dpm_solver++")
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="forward-flow steps")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is shown)")
    parser.add_argument("--max-broadcast-size", type=int, default=1024)
    parser.add_argument("--skip-broadcast", action="store_true", help="leave out both broadcast baselines")
    parser.add_argument("--assign-sizes", default="1024,2048", help="B = N of the reverse-flow table")
    parser.add_argument("--assign-steps", type=int, default=100)
    parser.add_argument("--blockwise-sizes", default=None, help="B = N of the blockwise table (default --sizes)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--remat", default="auto", choices=["auto", "never", "always"],
                        help="SolverOptions.remat of our forward flow (auto: by the 2 GiB default memory budget)")
    parser.add_argument("--blocks", default="forward,assign,blockwise", help="which tables to run")
    parser.add_argument("--host-allocator", default="default", choices=["default", "retain"],
                        help="glibc malloc in every child, ours and the baselines alike: its defaults, or "
                             "RETAIN_TUNABLES (freed memory stays mapped)")
    parser.add_argument("--torch-python", default=None, help="a Python with torch for the PyTorch baselines")
    parser.add_argument("--torch-device", default="cpu", help="cpu, or cuda where JAX runs on the GPU too")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SOLVER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, solver, size = args.child
        print(json.dumps(measure_jax(kind, solver, int(size), args)))
        return

    from lzn_jax import zoning

    me = [sys.executable, str(pathlib.Path(__file__).resolve())]
    common = ["--dim", str(args.dim), "--steps", str(args.steps), "--repeats", str(args.repeats),
              "--assign-steps", str(args.assign_steps), "--block-size", str(args.block_size), "--remat", args.remat]
    child_env = {"GLIBC_TUNABLES": RETAIN_TUNABLES} if args.host_allocator == "retain" else None

    def jax_child(kind, solver, size):
        return run_child(me + common + ["--child", kind, solver, str(size)], args.timeout, env=child_env)

    def torch_child(mode, formulation, solver, size, steps, warmup):
        if not args.torch_python:
            return None
        return run_child([args.torch_python, str(TORCH_SCRIPT), mode, "--formulation", formulation,
                          "--solver", solver, "--size", str(size), "--dim", str(args.dim), "--steps", str(steps),
                          "--repeats", str(args.repeats), "--warmup", str(warmup),
                          "--device", args.torch_device], args.timeout, env=child_env)

    def plan(solver, steps, size):
        options = zoning.SolverOptions(solver=solver, num_steps=steps, remat=args.remat)
        decision = zoning.remat_plan(options, batch=size, num_anchors=size, dim=args.dim)
        return "remat" if decision.rematerialise else "kept"

    solvers = args.solvers.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    blocks = args.blocks.split(",")
    print(f"zoning benchmark: D={args.dim}, float32, forward + backward, {backend_name()}, "
          f"torch on {args.torch_device}, host allocator {args.host_allocator}, "
          f"best of {args.repeats} after a warm-up; {time.strftime('%Y-%m-%d %H:%M')}")

    dense = {}
    if "forward" in blocks:
        columns = [("solver", 12), ("B=N", 5), ("remat", 5), ("ours", 8), ("mem", 6), ("lean", 8), ("mem", 6),
                   ("x lean", 7), ("lean-jax", 8), ("mem", 6), ("x l-jax", 7), ("jax-bcast", 9), ("mem", 6),
                   ("torch", 9), ("mem", 6), ("x torch", 7), ("x jax-b", 7), ("matmuls", 8), ("frac", 5),
                   ("flt ours", 8), ("flt lean", 8)]
        print_header(f"forward flow (compute_latents), {args.steps} steps, grad of sum(latents * W) w.r.t. "
                     "anchors", columns)
        for solver in solvers:
            for size in sizes:
                ours = dense[solver, size] = jax_child("ours", solver, size)
                lean = torch_child("forward", "lean", solver, size, args.steps, warmup=1)
                lean_jax = jax_child("lean-jax", solver, size)
                matmuls = jax_child("matmuls", solver, size)
                jax_bcast = torch_bcast = None
                if not args.skip_broadcast and size <= args.max_broadcast_size:
                    jax_bcast = jax_child("broadcast", solver, size)
                    torch_bcast = torch_child("forward", "broadcast", solver, size, args.steps, warmup=0)
                print_row(columns, [solver, str(size), plan(solver, args.steps, size), fmt_seconds(ours),
                                    fmt_bytes(ours), fmt_seconds(lean), fmt_bytes(lean), ratio(lean, ours),
                                    fmt_seconds(lean_jax), fmt_bytes(lean_jax), ratio(lean_jax, ours),
                                    fmt_seconds(jax_bcast), fmt_bytes(jax_bcast), fmt_seconds(torch_bcast),
                                    fmt_bytes(torch_bcast), ratio(torch_bcast, ours), ratio(jax_bcast, ours),
                                    fmt_seconds(matmuls), fraction(matmuls, ours), fmt_faults(ours),
                                    fmt_faults(lean)])
                report_errors({"ours": ours, "lean": lean, "lean-jax": lean_jax, "matmuls": matmuls,
                               "jax-bcast": jax_bcast, "torch": torch_bcast})

    if "assign" in blocks:
        columns = [("B=N", 5), ("remat", 5), ("assign", 8), ("mem", 6), ("targets", 8), ("mem", 6), ("lean", 8),
                   ("mem", 6), ("x lean/a", 8), ("x lean/t", 8), (f"block{args.block_size}", 9), ("mem", 6),
                   ("x targets", 9)]
        print_header(f"reverse flow (assign, Euler {args.assign_steps} steps), grad of the alignment loss w.r.t. "
                    "latents and context", columns)
        for size in (int(s) for s in args.assign_sizes.split(",")):
            full = jax_child("assign", "euler", size)
            targets = jax_child("targets", "euler", size)
            lean = torch_child("assign", "lean", "euler", size, args.assign_steps, warmup=1)
            blockwise = jax_child("targets-blockwise", "euler", size)
            print_row(columns, [str(size), plan("euler", args.assign_steps, size), fmt_seconds(full),
                                fmt_bytes(full), fmt_seconds(targets), fmt_bytes(targets), fmt_seconds(lean),
                                fmt_bytes(lean), ratio(lean, full), ratio(lean, targets), fmt_seconds(blockwise),
                                fmt_bytes(blockwise), ratio(blockwise, targets)])
            report_errors({"assign": full, "targets": targets, "lean": lean, "blockwise": blockwise})

    if "blockwise" in blocks:
        columns = [("solver", 12), ("B=N", 5), ("dense", 8), ("mem", 6), (f"block{args.block_size}", 9),
                   ("mem", 6), ("time x", 7), ("mem x", 6)]
        print_header(f"blockwise kernel (compute_latents, block_size={args.block_size}) vs dense, "
                    f"{args.steps} steps, same loss", columns)
        for solver in solvers:
            for size in (int(s) for s in (args.blockwise_sizes or args.sizes).split(",")):
                dense_result = dense.get((solver, size)) or jax_child("ours", solver, size)
                blockwise = jax_child("blockwise", solver, size)
                print_row(columns, [solver, str(size), fmt_seconds(dense_result), fmt_bytes(dense_result),
                                    fmt_seconds(blockwise), fmt_bytes(blockwise), ratio(blockwise, dense_result),
                                    ratio(blockwise, dense_result, key="peak_bytes")])
                report_errors({"dense": dense_result, "blockwise": blockwise})


if __name__ == "__main__":
    main()
