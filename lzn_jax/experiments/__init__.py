"""Small reproducible studies run by ``lzn_jax.main`` (one module per study)."""
