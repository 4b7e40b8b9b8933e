"""Device meshes and shardings: the one place that builds meshes (DESIGN.md §5)."""

from lzn_jax.parallel.mesh import batch_sharding, data_mesh

__all__ = ["batch_sharding", "data_mesh"]
