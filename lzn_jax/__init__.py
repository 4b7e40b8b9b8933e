"""lzn-jax: Latent Zoning Networks (NeurIPS 2025) in JAX/Flax.

Subpackages are imported on demand (``from lzn_jax import zoning``) so that importing the solver never pulls in
Flax, TensorFlow or the data stack.
"""

__version__ = "0.1.0"
