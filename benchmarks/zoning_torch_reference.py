"""PyTorch baselines of the latent flows for benchmarks/zoning.py, for timing only.

Runs under a separate Python with CPU torch (``--torch-python`` of benchmarks/zoning.py); it imports nothing
from lzn_jax. Two formulations of the same posterior velocity share the same flows and time grids:

  broadcast  the reference's formulation (docs/method.md): implied noises (B, N, D), max-shifted pdfs,
             weighted sums. Each velocity evaluation is checkpointed (non-reentrant), as the reference does for
             Euler; its DPM-Solver path keeps every step instead, which at these sizes does not fit in 24 GB, so
             it is checkpointed here too.
  lean       what a PyTorch user writes first to fix it: the logits as one (B, N) matmul, a softmax and a
             second matmul for the mean; plain autograd, nothing checkpointed, no (B, N, D) tensor.

Modes (first argument):
  forward  {broadcast,lean}: gradient of sum(latents * W) w.r.t. the anchors through the forward flow (Euler or
           DPM-Solver++), own anchors = context, as in training.
  assign   lean only: reverse Euler flow from latents to context, each row's target log posterior per step,
           alignment loss -mean_b max_{s >= cut} P[s, b, target_b]; gradient w.r.t. latents and context.

Prints one JSON line: {"seconds": best of the repeats, "peak_bytes": peak resident memory above the
resident set once the inputs exist, "faults_per_call": minor page faults per timed run}. The peak is the
process's high-water mark, so the first run sets it. With ``--device cuda`` the tensors live on the GPU, every
timed run ends with ``torch.cuda.synchronize()``, "peak_bytes" is ``torch.cuda.max_memory_allocated`` and float32
products stay full float32 (PyTorch's default: no TF32 for matmuls), as the JAX side's HIGHEST precision.
"""

import argparse
import json
import math
import resource
import time

import torch
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------------------ velocity fields
# Each returns (velocity (B, D), data prediction (B, D)) at points x (B, D) and time t (a Python float);
# code time: anchors at t = 0, the Gaussian at t = 1.


def broadcast_velocity(x, t, anchors):
    noise = (x[:, None, :] - (1 - t) * anchors[None]) / t
    log_pdf = -0.5 * (noise**2).sum(-1)
    pdf = torch.exp(log_pdf - log_pdf.max(dim=1, keepdim=True).values)
    v = (pdf[:, :, None] * (noise - anchors[None])).sum(1) / pdf.sum(1)[:, None]
    return v, x - t * v


def lean_logits(x, t, anchors, half_squared_norms):
    """(B, N) log posterior up to a per-row constant: [(1 - t) <x, a> - (1 - t)^2 |a|^2 / 2] / t^2."""
    return ((1 - t) * (x @ anchors.T) - (1 - t) ** 2 * half_squared_norms) / t**2


def lean_velocity(x, t, anchors, half_squared_norms):
    posterior = torch.softmax(lean_logits(x, t, anchors, half_squared_norms), dim=1)
    mean = posterior @ anchors
    return (x - mean) / t, mean


def velocity_field(formulation, anchors):
    """``evaluate(x, t) -> (velocity, data prediction)`` of one formulation against the context ``anchors``."""
    if formulation == "broadcast":
        return lambda x, t: checkpoint(broadcast_velocity, x, t, anchors, use_reentrant=False)
    half_squared_norms = 0.5 * (anchors * anchors).sum(1)  # once per flow; it carries gradient to the anchors
    return lambda x, t: lean_velocity(x, t, anchors, half_squared_norms)


# ---------------------------------------------------------------------------------------------------- flows


def euler_forward(evaluate, start, steps, eps=1e-4):
    """t: eps -> 1 in ``steps`` equal steps, evaluated at eps + k h (never at t = 1)."""
    t, h = eps, (1 - eps) / steps
    x = start
    for _ in range(steps):
        velocity, _ = evaluate(x, t)
        x = x + h * velocity
        t += h
    return x


def dpm_forward(evaluate, start, steps, eps=1e-3, order=3):
    """Multistep DPM-Solver++ (data prediction), t: eps -> 1 - eps on a uniform grid, warm-up orders 1, 2."""
    times = [eps + (1 - 2 * eps) * k / steps for k in range(steps + 1)]
    lam = [math.log((1 - t) / t) for t in times]
    x = start
    history = [evaluate(x, times[0])[1]]
    for k in range(1, steps + 1):
        step_order = min(k, order)
        h = lam[k] - lam[k - 1]
        alpha_t, phi_1 = 1 - times[k], math.expm1(-h)
        new = (times[k] / times[k - 1]) * x - alpha_t * phi_1 * history[-1]
        if step_order >= 2:
            r0 = (lam[k - 1] - lam[k - 2]) / h
            d0 = (history[-1] - history[-2]) / r0
        if step_order == 2:
            new = new - 0.5 * alpha_t * phi_1 * d0
        if step_order == 3:
            r1 = (lam[k - 2] - lam[k - 3]) / h
            d1 = (history[-2] - history[-3]) / r1
            e1, e2 = d0 + r0 / (r0 + r1) * (d0 - d1), (d0 - d1) / (r0 + r1)
            phi_2 = phi_1 / h + 1
            new = new + alpha_t * phi_2 * e1 - alpha_t * (phi_2 / h - 0.5) * e2
        x = new
        if k < steps:
            history = (history + [evaluate(x, times[k])[1]])[-3:]
    return x


def lean_alignment_loss(latents, context, targets, steps=100, cut_off=0.2):
    """Reverse Euler t: 1 -> 0 (evaluated at 1 - k / steps), matmul-form posterior; -mean_b max_{s >= cut} P."""
    half_squared_norms = 0.5 * (context * context).sum(1)
    x, h = latents, 1.0 / steps
    target_log_probs = []
    for k in range(steps):
        t = 1.0 - k * h
        log_posterior = torch.log_softmax(lean_logits(x, t, context, half_squared_norms), dim=1)
        target_log_probs.append(log_posterior.gather(1, targets[:, None])[:, 0])
        mean = log_posterior.exp() @ context
        x = x - (h / t) * (x - mean)
    kept = torch.stack(target_log_probs[math.floor(steps * cut_off):])
    return -kept.max(dim=0).values.exp().mean()


# --------------------------------------------------------------------------------------------------- driver


def resident_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("forward", "assign"))
    parser.add_argument("--formulation", choices=("broadcast", "lean"), default="lean")
    parser.add_argument("--solver", choices=("euler", "dpm_solver++"), default="euler")
    parser.add_argument("--size", type=int, required=True, help="B = N")
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs first (they still set the peak)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        # Only there: a default device adds a little to every torch call, which the CPU timings should not carry.
        torch.set_default_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    if args.mode == "forward":
        anchors = torch.randn(args.size, args.dim, requires_grad=True)
        prior, projection = torch.randn(args.size, args.dim), torch.randn(args.size, args.dim)
        flow = euler_forward if args.solver == "euler" else dpm_forward
        eps = 1e-4 if args.solver == "euler" else 1e-3
        leaves = (anchors,)

        def loss():
            start = eps * prior + (1 - eps) * anchors
            return (flow(velocity_field(args.formulation, anchors), start, args.steps, eps) * projection).sum()
    else:
        if args.formulation != "lean":
            parser.error("assign runs the lean formulation only")
        latents = torch.randn(args.size, args.dim, requires_grad=True)
        context = torch.randn(args.size, args.dim, requires_grad=True)
        targets = torch.arange(args.size) % args.size
        leaves = (latents, context)

        def loss():
            return lean_alignment_loss(latents, context, targets, args.steps)

    baseline = 0 if on_gpu else resident_bytes()
    times = []
    for run in range(args.warmup + args.repeats):
        if run == args.warmup:
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start_time = time.perf_counter()
        for leaf in leaves:
            leaf.grad = None
        loss().backward()
        synchronize()
        times.append(time.perf_counter() - start_time)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.repeats
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    print(json.dumps({"seconds": min(times[args.warmup:]), "peak_bytes": peak, "faults_per_call": faults}))


if __name__ == "__main__":
    main()
