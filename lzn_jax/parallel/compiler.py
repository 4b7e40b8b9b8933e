"""XLA compile options per platform, for the callers that jit whole steps (train/, evaluation/, main.py).

On CPU, jax 0.12's XLA hands every convolution to YNNPACK, whose kernel-gradient convolution is 4-11x slower than
XLA's own on the paper's layers (benchmarks/README.md, "Where XLA:CPU's convolutions lost"); keeping YNNPACK for
dots only makes our CIFAR10 decoder's forward + backward 1.9x faster with results within float32 rounding. GPU and
TPU compilers do not know the option, so they get none.
"""

from __future__ import annotations

import jax

# YNNPACK for dots only: XLA's own convolutions run on CPU.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """The ``compiler_options`` for ``jax.jit`` on ``platform`` (default: JAX's default backend); None off CPU."""
    platform = platform or jax.default_backend()
    return dict(CPU_OPTIONS) if platform == "cpu" else None



def jit_for_mesh(fun, mesh: jax.sharding.Mesh, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` with the :func:`compiler_options` of the platform of ``mesh``'s devices."""
    return jax.jit(fun, compiler_options=compiler_options(mesh.devices.flat[0].platform), **jit_kwargs)
