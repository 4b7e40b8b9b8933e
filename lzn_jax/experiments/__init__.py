"""Reproducible studies, one module each: ``python -m lzn_jax.experiments.NAME`` trains and measures what
docs/results.md reports, on the embedded digits (``generation``: RF against RF+LZN; ``representation``: the
contrastive LZN encoder against a SimCLR-style loss and fixed features; ``joint``: generation and classification
together; ``zones``: the joint model's zones and its accuracy against the evaluation batch size, alpha and the
solver steps). ``runs`` holds what they share. ``zoning_demo`` runs through ``lzn_jax.main``
(configs/digits_zoning_demo.py)."""
