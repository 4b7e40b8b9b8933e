"""The reference's broadcast (B, N, D) latent-flow formulation, written plainly in PyTorch, for timing only.

Runs under a separate Python with CPU torch (see benchmarks/zoning.py); it imports nothing from lzn_jax.
Follows SPEC.md §1.2-1.6: implied noises (B, N, D), max-shifted pdfs, weighted sums. Each velocity evaluation
is checkpointed (non-reentrant), as the reference does for Euler; its DPM-Solver path keeps every step instead,
which at these sizes does not fit in 24 GB, so it is checkpointed here too.
Prints one JSON line: {"seconds": best of the repeats, "peak_bytes": peak resident memory above the
baseline after the inputs exist}.
"""

import json
import math
import resource
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint


def velocity_and_mean(x, t, anchors):
    noise = (x[:, None, :] - (1 - t) * anchors[None]) / t
    log_pdf = -0.5 * (noise**2).sum(-1)
    pdf = torch.exp(log_pdf - log_pdf.max(dim=1, keepdim=True).values)
    v = (pdf[:, :, None] * (noise - anchors[None])).sum(1) / pdf.sum(1)[:, None]
    return v, x - t * v


def euler_forward(anchors, prior, steps, eps=1e-4):
    t, h = eps, (1 - eps) / steps
    x = eps * prior + (1 - eps) * anchors
    for _ in range(steps):
        v, _ = checkpoint(velocity_and_mean, x, t, anchors, use_reentrant=False)
        x = x + h * v
        t += h
    return x


def dpm_forward(anchors, prior, steps, eps=1e-3, order=3):
    times = [eps + (1 - 2 * eps) * k / steps for k in range(steps + 1)]
    lam = [math.log((1 - t) / t) for t in times]
    x = eps * prior + (1 - eps) * anchors
    history = [checkpoint(velocity_and_mean, x, times[0], anchors, use_reentrant=False)[1]]
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
            history = (history + [checkpoint(velocity_and_mean, x, times[k], anchors, use_reentrant=False)[1]])[-3:]
    return x


def resident_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(solver, size, dim, steps, repeats):
    torch.manual_seed(0)
    anchors = torch.randn(size, dim, requires_grad=True)
    prior, projection = torch.randn(size, dim), torch.randn(size, dim)
    flow = euler_forward if solver == "euler" else dpm_forward
    baseline = resident_bytes()
    times = []
    for _ in range(repeats):  # no warm-up: eager PyTorch compiles nothing, and the first run sets the peak
        start = time.perf_counter()
        anchors.grad = None
        (flow(anchors, prior, steps) * projection).sum().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    print(json.dumps({"seconds": min(times), "peak_bytes": peak}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
