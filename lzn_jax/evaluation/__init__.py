"""Evaluation of trained models: LZN classification, FID / sFID / IS / precision-recall with the FID Inception-V3
(modules ``fid``, ``metrics``, ``inception``, ``inception_weights``), fast representation probes, and the checks a
training run ends with (``end_of_training``). docs/evaluation.md describes the protocols."""

from lzn_jax.evaluation.classification import classify, nearest_label
from lzn_jax.evaluation.probes import KnnOptions, RidgeOptions, knn_accuracy, ridge_accuracy

__all__ = ["KnnOptions", "RidgeOptions", "classify", "knn_accuracy", "nearest_label", "ridge_accuracy"]
