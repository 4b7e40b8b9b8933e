"""Command-line tools beside training: ``python -m lzn_jax.tools.import_reference`` converts a checkpoint of the
PyTorch reference into a workdir of ours (docs/design.md, "Importing the reference's checkpoints")."""
