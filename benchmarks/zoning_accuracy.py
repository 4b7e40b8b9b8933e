"""Float32 accuracy of the latent zoning solver, side by side with the PyTorch reference's own float32 code.

Every output is compared with the exact flow computed in float64 (our solver under x64, which agrees with an
independent float64 transcription of the reference to ~1e-12; tests/zoning/test_against_reference.py). The error
of an output is ``max |value - float64| / max |float64|`` over the whole array, the worst case over --seeds.

  ours       lzn_jax.zoning in float32
  reference  the reference's float32 formulation in PyTorch: the (B, N, D) broadcast velocity with max-shifted
             pdfs, float32 time arithmetic, DPM-Solver++ data prediction through the noise prediction; run by
             a separate Python that has CPU torch (--torch-python); it imports nothing from lzn_jax
  inputs     the exact (float64) flow of the inputs rounded to float32: the error that any float32 solver
             inherits from its inputs alone, before it rounds anything itself. Where an output's error is near
             this floor, what is left of it comes from the problem's sensitivity, not from the solver; below it,
             a solver's own rounding happens to cancel part of the inputs'.

Outputs: Euler and DPM-Solver++ forward latents (20 steps), the anchor gradient of <latents, W> through each,
and the Euler reverse flow (100 steps) of 64 Gaussian latents against the N anchors: its end points and its
posterior probabilities. Cases: N = B anchors
~ N(0, scale^2) for scales 1 and 5, and "near-duplicate" anchors (pairs 0.14 * scale apart).

  python benchmarks/zoning_accuracy.py --torch-python .venv-torch/bin/python

With --block-size, the forward outputs are also computed with the blockwise kernel
(SolverOptions(block_size=...)), in float32 ("blockwise", and "blk/ours" = its error / the dense kernel's) and
in float64 ("x64 blk": its float64 outputs against the dense kernel's float64 ones, which should be round-off).
The reverse flow has no blockwise column (zoning.assign needs the dense kernel).

  python benchmarks/zoning_accuracy.py --size 256 --block-size 128

--per-seed prints each seed's row instead of the worst over the seeds, and --cases picks cases, e.g. the
near-duplicates' reverse posteriors seed by seed:

  python benchmarks/zoning_accuracy.py --torch-python .venv-torch/bin/python --cases near-dup --seeds 0 1 2 3 \
      4 5 6 7 --per-seed
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OUTPUTS = ("euler_latents", "euler_grad", "dpm_latents", "dpm_grad", "reverse_endpoints", "reverse_probs")


def make_case(seed: int, size: int, dim: int, scale: float, near_duplicates: bool,
              reverse_rows: int = 64) -> dict[str, np.ndarray]:
    """Anchors (N, D), prior draw (N, D), gradient weights W (N, D) and reverse-flow latents (reverse_rows, D),
    float64."""
    rng = np.random.default_rng(seed)
    if near_duplicates:
        centres = rng.standard_normal((size // 2, dim))
        partners = centres + 0.14 / np.sqrt(dim) * rng.standard_normal((size // 2, dim))
        anchors = scale * np.concatenate([centres, partners])
    else:
        anchors = scale * rng.standard_normal((size, dim))
    return {
        "anchors": anchors, "prior": rng.standard_normal((size, dim)), "weights": rng.standard_normal((size, dim)),
        "latents": rng.standard_normal((size, dim))[:reverse_rows],
    }


# ------------------------------------------------------------------------------------------------ ours (JAX)


def run_ours(case: dict[str, np.ndarray], dtype: str, block_size: int | None = None) -> dict[str, np.ndarray]:
    """Our solver's outputs in ``dtype`` ("float32" or "float64"; the latter needs x64 enabled).

    With ``block_size``, the forward outputs of the blockwise kernel only.
    """
    import jax
    import jax.numpy as jnp

    from lzn_jax import zoning

    anchors, prior, weights, latents = (jnp.asarray(case[k], dtype) for k in ("anchors", "prior", "weights", "latents"))
    results = {}
    for solver, name in (("euler", "euler"), ("dpm_solver++", "dpm")):
        options = zoning.SolverOptions(solver=solver, num_steps=20, block_size=block_size)

        def objective(a, options=options):
            out = zoning.compute_latents(a, prior, options=options)
            return jnp.sum(out * weights), out

        (_, out), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(anchors)
        results[f"{name}_latents"], results[f"{name}_grad"] = out, grad
    if block_size is None:
        endpoints, log_probs = zoning.assign(latents, anchors, num_steps=100)
        results["reverse_endpoints"], results["reverse_probs"] = endpoints, jnp.exp(log_probs)
    return {k: np.asarray(jax.device_get(v), np.float64) for k, v in results.items()}


# ----------------------------------------------------------------------------- the reference's float32 (torch)


def run_reference(case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's float32 computation, transcribed from its description (runs under torch)."""
    import torch

    f32 = torch.float32

    def velocity(x, t, anchors):
        noise = (x[:, None, :] - (1 - t) * anchors[None]) / t
        log_pdf = -0.5 * (noise**2).sum(-1)
        pdf = torch.exp(log_pdf - log_pdf.max(dim=1, keepdim=True).values)
        v = (pdf[:, :, None] * (noise - anchors[None])).sum(1) / pdf.sum(1)[:, None]
        return v, pdf

    def euler_forward(anchors, prior, steps, eps=1e-4):
        t = torch.tensor(eps, dtype=f32)
        h = (1 - t) / steps
        x = t * prior + (1 - t) * anchors
        for _ in range(steps):
            v, _ = velocity(x, t, anchors)
            x = x + h * v
            t = t + h
        return x

    def data_prediction(x, t, anchors):
        # Noise prediction from the velocity with d alpha/dt = -1, d sigma/dt = 1, then x0 = (x - sigma eps)/alpha.
        v, _ = velocity(x, t, anchors)
        alpha, sigma = 1 - t, t
        noise = (v - (-1 / alpha) * x) / (1 - sigma * (-1 / alpha))
        return (x - sigma * noise) / alpha

    def dpm_forward(anchors, prior, steps, eps=1e-3, order=3):
        times = torch.linspace(eps, 1 - eps, steps + 1, dtype=f32)
        lambdas = torch.log(1 / times - 1)
        x = times[0] * prior + (1 - times[0]) * anchors
        history = [data_prediction(x, times[0], anchors)]
        for k in range(1, steps + 1):
            step_order = min(k, order)
            t, s = times[k], times[k - 1]
            h = lambdas[k] - lambdas[k - 1]
            alpha_t, phi_1 = 1 - t, torch.expm1(-h)
            new = (t / s) * x - alpha_t * phi_1 * history[-1]
            if step_order >= 2:
                r0 = (lambdas[k - 1] - lambdas[k - 2]) / h
                d0 = (1 / r0) * (history[-1] - history[-2])
            if step_order == 2:
                new = new - 0.5 * alpha_t * phi_1 * d0
            if step_order == 3:
                r1 = (lambdas[k - 2] - lambdas[k - 3]) / h
                d1 = (1 / r1) * (history[-2] - history[-3])
                e1 = d0 + (r0 / (r0 + r1)) * (d0 - d1)
                e2 = (1 / (r0 + r1)) * (d0 - d1)
                phi_2 = phi_1 / h + 1
                phi_3 = phi_2 / h - 0.5
                new = new + alpha_t * phi_2 * e1 - alpha_t * phi_3 * e2
            x = new
            if k < steps:
                history = (history + [data_prediction(x, t, anchors)])[-3:]
        return x

    def euler_reverse(latents, anchors, steps):
        t = torch.tensor(1.0, dtype=f32)
        h = torch.tensor(1.0 / steps, dtype=f32)
        x, probs = latents, []
        for _ in range(steps):
            v, pdf = velocity(x, t, anchors)
            probs.append(pdf / pdf.sum(1, keepdim=True))
            x = x - h * v
            t = t - h
        return x, torch.stack(probs)

    prior, weights, latents = (torch.tensor(case[k], dtype=f32) for k in ("prior", "weights", "latents"))
    results = {}
    for name, flow in (("euler", euler_forward), ("dpm", dpm_forward)):
        anchors = torch.tensor(case["anchors"], dtype=f32, requires_grad=True)
        out = flow(anchors, prior, 20)
        (out * weights).sum().backward()
        results[f"{name}_latents"], results[f"{name}_grad"] = out.detach(), anchors.grad
    with torch.no_grad():
        endpoints, probs = euler_reverse(latents, torch.tensor(case["anchors"], dtype=f32), 100)
    results["reverse_endpoints"], results["reverse_probs"] = endpoints, probs
    return {k: v.double().numpy() for k, v in results.items()}


# ----------------------------------------------------------------------------------------------------- driver


def relative_error(value: np.ndarray, exact: np.ndarray) -> float:
    return float(np.max(np.abs(value - exact)) / np.max(np.abs(exact)))


def rounded_to_float32(case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The case's inputs as a float32 solver receives them, held in float64."""
    return {k: v.astype(np.float32).astype(np.float64) for k, v in case.items()}


def child(mode: str, case_path: str, out_path: str) -> None:
    """``mode``: "reference", "float32", "float64", "inputs" (float64 on the float32-rounded inputs), or
    "float32"/"float64" with ":<block size>" (blockwise)."""
    case = dict(np.load(case_path))
    if mode == "reference":
        results = run_reference(case)
    elif mode == "inputs":
        import jax

        jax.config.update("jax_enable_x64", True)
        results = run_ours(rounded_to_float32(case), "float64")
    else:
        dtype, _, block = mode.partition(":")
        if dtype == "float64":
            import jax

            jax.config.update("jax_enable_x64", True)
        results = run_ours(case, dtype, int(block) if block else None)
    np.savez(out_path, **results)


def run_child(python: str, mode: str, case: dict[str, np.ndarray], workdir: str,
              cached: str | None = None) -> dict[str, np.ndarray]:
    """Runs one column in its own process; ``cached`` names a file that keeps the result between runs."""
    if cached and os.path.exists(cached):
        return dict(np.load(cached))
    case_path, out_path = os.path.join(workdir, "case.npz"), os.path.join(workdir, f"{mode.replace(':', '_')}.npz")
    np.savez(case_path, **case)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    subprocess.run([python, __file__, "--child", mode, case_path, out_path], check=True, env=env)
    results = dict(np.load(out_path))
    if cached:
        np.savez(cached, **results)
    return results


CASES = {"scale1": ("scale 1", 1.0, False), "scale5": ("scale 5", 5.0, False),
         "near-dup": ("near-dup, scale 5", 5.0, True)}


def case_errors(args, label: str, seed: int, case: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: the errors of every column against the float64 flow ("reference", "ours", "inputs",
    "blockwise", "x64 blk"), and ours and the reference's against the exact flow of the rounded inputs
    ("ours*", "reference*")."""
    with tempfile.TemporaryDirectory() as workdir:
        exact = run_child(sys.executable, "float64", case, workdir)
        columns = {"ours": run_child(sys.executable, "float32", case, workdir),
                   "inputs": run_child(sys.executable, "inputs", case, workdir)}
        if args.torch_python:
            cached = None
            if args.reference_cache:
                os.makedirs(args.reference_cache, exist_ok=True)
                name = f"{label.replace(' ', '_').replace(',', '')}_{seed}_{args.size}_{args.dim}.npz"
                cached = os.path.join(args.reference_cache, name)
            columns["reference"] = run_child(args.torch_python, "reference", case, workdir, cached)
        if args.block_size is not None:
            columns["blockwise"] = run_child(sys.executable, f"float32:{args.block_size}", case, workdir)
            block64 = run_child(sys.executable, f"float64:{args.block_size}", case, workdir)
    errors = {}
    for name in OUTPUTS:
        row = {column: relative_error(values[name], exact[name])
               for column, values in columns.items() if name in values}
        row["ours*"] = relative_error(columns["ours"][name], columns["inputs"][name])
        if "reference" in columns:
            row["reference*"] = relative_error(columns["reference"][name], columns["inputs"][name])
        if args.block_size is not None and name in block64:
            row["x64 blk"] = relative_error(block64[name], exact[name])
        errors[name] = row
    return errors


def print_rows(label: str, errors: dict[str, dict[str, float]], blockwise: bool) -> None:
    def cell(row, column, width=9):
        return f"{row[column]:{width}.2e}" if column in row else f"{'-':>{width}}"

    for name in OUTPUTS:
        row = errors[name]
        ratio = f"{row['reference'] / row['ours']:7.2f}x" if "reference" in row and row["ours"] > 0 else f"{'-':>8}"
        text = (f"{label:<26} {name:<18} | {cell(row, 'reference')} {cell(row, 'ours')} | {ratio} | "
                f"{cell(row, 'inputs', 8)} | {cell(row, 'reference*')} {cell(row, 'ours*')}")
        if blockwise:
            block_ratio = (f"{row['blockwise'] / row['ours']:7.2f}x" if "blockwise" in row and row["ours"] > 0
                           else f"{'-':>8}")
            gap = f"{row['x64 blk']:8.1e}" if "x64 blk" in row else f"{'-':>8}"
            text += f" | {cell(row, 'blockwise')} {block_ratio} {gap}"
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-python", help="a Python with CPU torch for the reference column")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--per-seed", action="store_true", help="a row per seed instead of the worst of the seeds")
    parser.add_argument("--reference-cache", help="a folder that keeps the reference's outputs between runs (they "
                        "do not depend on this project's code, and take most of the time)")
    parser.add_argument("--block-size", type=int, help="also measure the forward outputs of the blockwise kernel")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    blockwise = args.block_size is not None
    print(f"float32 accuracy: N = B = {args.size}, D = {args.dim}; max |x - x64| / max |x64|, "
          + ("per seed" if args.per_seed else f"worst of seeds {args.seeds}")
          + "; * = against the exact flow of the float32-rounded inputs instead")
    header = (f"{'case':<26} {'output':<18} | {'reference':>9} {'ours':>9} | {'ref/ours':>8} | {'inputs':>8} | "
              f"{'reference*':>9} {'ours*':>9}")
    if blockwise:
        header += f" | {'blockwise':>9} {'blk/ours':>8} {'x64 blk':>8}"
    print(header)
    print("-" * len(header))
    for key in args.cases:
        label, scale, near = CASES[key]
        worst: dict[str, dict[str, float]] = {name: {} for name in OUTPUTS}
        for seed in args.seeds:
            errors = case_errors(args, label, seed, make_case(seed, args.size, args.dim, scale, near))
            if args.per_seed:
                print_rows(f"{label}, seed {seed}", errors, blockwise)
            for name, row in errors.items():
                for column, value in row.items():
                    worst[name][column] = max(worst[name].get(column, 0.0), value)
        if not args.per_seed:
            print_rows(label, worst, blockwise)


if __name__ == "__main__":
    main()
