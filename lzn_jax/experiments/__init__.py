"""Reproducible studies, one module each: ``python -m lzn_jax.experiments.NAME`` trains and measures what
docs/results.md reports (``generation``: RF against RF+LZN; ``joint``: generation and classification together),
on the embedded digits; ``runs`` holds what they share. ``zoning_demo`` runs through ``lzn_jax.main``
(configs/digits_zoning_demo.py)."""
