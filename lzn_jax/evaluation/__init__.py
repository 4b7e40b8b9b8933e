"""Evaluation of trained models (today: LZN classification accuracy; FID-type metrics and probes are planned)."""

from lzn_jax.evaluation.classification import classify, nearest_label

__all__ = ["classify", "nearest_label"]
