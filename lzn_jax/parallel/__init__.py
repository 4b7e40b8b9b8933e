"""Device meshes, shardings, multi-host start-up and per-platform compile options: the one place that builds
meshes (docs/design.md)."""

from lzn_jax.parallel.compiler import compiler_options, jit_for_mesh
from lzn_jax.parallel.distributed import maybe_initialize
from lzn_jax.parallel.mesh import batch_sharding, data_mesh
from lzn_jax.parallel.sharding import batch_shard_count, host_rows

__all__ = [
    "batch_shard_count", "batch_sharding", "compiler_options", "data_mesh", "host_rows", "jit_for_mesh",
    "maybe_initialize",
]
