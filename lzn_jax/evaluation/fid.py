"""FID, sFID, Inception Score and precision/recall of generated images, each number returned with the protocol that
produced it; reference (training-set) statistics computed once and cached (docs/evaluation.md, "Protocol and cache").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from lzn_jax.evaluation import inception, metrics, preprocess
from lzn_jax.evaluation.inception_weights import FID_WEIGHTS_FILENAME

CACHE_FORMAT = 1
NETWORK = f"pytorch-fid FID Inception-V3 (TF inception-2015-12-05), {FID_WEIGHTS_FILENAME}"
FEATURE_NAMES = {
    "pool": "pool_3 (2048-d)",
    "spatial": f"mixed_6/conv[..., :{inception.SPATIAL_CHANNELS}] flattened (7*17*17 = 2023-d)",
    "logits": "pool_3 @ fc weights, no bias (1008 classes)",
}


@dataclasses.dataclass(frozen=True)
class FeatureProtocol:
    """How images become Inception features. Two feature sets are comparable only under equal protocols.

    resize: "clean" (PIL bicubic on float pixels to 299, clean-fid) or "none" (images are already 299 x 299).
    normalization: "clean" ((p - 128) / 128, the original graph and clean-fid) or "pytorch_fid" (p / 255 * 2 - 1).
    weights_sha256: SHA-256 of the weights file (`load_inception` returns it); the published file starts 6726825d.
    """

    weights_sha256: str
    resize: str = "clean"
    normalization: str = "clean"

    def __post_init__(self):
        if self.resize not in preprocess.RESIZE_MODES:
            raise ValueError(f"resize must be one of {preprocess.RESIZE_MODES}, got {self.resize!r}")
        if self.normalization not in preprocess.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {preprocess.NORMALIZATIONS}, got {self.normalization!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "network": NETWORK,
            "weights_sha256": self.weights_sha256,
            "input": "uint8 RGB",
            "resize": self.resize,
            "normalization": self.normalization,
        }


class MetricResult(NamedTuple):
    """A number and how it was computed (`protocol`: features, network, preprocessing, sample counts, options)."""

    name: str
    value: float
    protocol: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "protocol": dict(self.protocol)}

    def __str__(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.protocol.items())
        return f"{self.name} = {self.value:.6g} [{details}]"


class InceptionFeatures(NamedTuple):
    """Features of N images (NumPy float32): pool (N, 2048), spatial (N, 2023), logits (N, 1008) without bias."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------


def inception_features(variables: dict, images: jax.Array, *, protocol: FeatureProtocol) -> inception.InceptionOutputs:
    """uint8 images (B, H, W, 3) -> `InceptionOutputs` of the FID network. Un-jitted; `extract_features` jits it."""
    inputs = preprocess.preprocess(images, resize=protocol.resize, normalization=protocol.normalization)
    return inception.InceptionV3().apply(variables, inputs)


@functools.partial(jax.jit, static_argnames=("protocol",))
def _features_jit(variables: dict, images: jax.Array, protocol: FeatureProtocol):
    out = inception_features(variables, images, protocol=protocol)
    return out.pool, out.spatial, out.logits_unbiased


def _as_batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    if isinstance(images, np.ndarray):
        return (images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
    return images


def extract_features(
    images: np.ndarray | Iterable[np.ndarray],
    variables: dict,
    *,
    protocol: FeatureProtocol,
    batch_size: int = 100,
    progress: Callable[[int], None] | None = None,
) -> InceptionFeatures:
    """Features of uint8 images (N, H, W, 3), given as one array or as an iterable of batches.

    Every batch is a host array, padded to `batch_size` rows so the network compiles once, and runs on the default
    device; `progress(n_done)` is called after each batch. To spread batches over a mesh, jit
    `inception_features` with the shardings you want instead.
    """
    variables = jax.device_put(variables)  # once, not 95 MB per batch when they are host arrays
    pools, spatials, logits = [], [], []
    done = 0
    for batch in _as_batches(images, batch_size):
        batch = np.asarray(batch)
        count = batch.shape[0]
        if count > batch_size:
            raise ValueError(f"a batch of {count} images exceeds batch_size = {batch_size}")
        if count < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
        pool, spatial, logit = _features_jit(variables, batch, protocol)
        pools.append(np.asarray(pool)[:count])
        spatials.append(np.asarray(spatial)[:count])
        logits.append(np.asarray(logit)[:count])
        done += count
        if progress is not None:
            progress(done)
    if not pools:
        raise ValueError("no images to compute features of")
    return InceptionFeatures(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics, cached on disk
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReferenceStatistics:
    """What the metrics need from the reference set: pool and spatial mean/covariance (float64), the count, the
    protocol they were computed under, and optionally the pool features themselves (precision/recall need them)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_spatial: np.ndarray
    sigma_spatial: np.ndarray
    count: int
    protocol: dict[str, Any]
    pool_features: np.ndarray | None = None

    @classmethod
    def from_features(
        cls, features: InceptionFeatures, protocol: FeatureProtocol, *, name: str = "", keep_pool_features: bool = True
    ) -> ReferenceStatistics:
        mu, sigma = metrics.feature_statistics(features.pool)
        mu_s, sigma_s = metrics.feature_statistics(features.spatial)
        described = {**protocol.as_dict(), "reference": name}
        pool = np.asarray(features.pool, np.float32) if keep_pool_features else None
        return cls(mu, sigma, mu_s, sigma_s, int(features.pool.shape[0]), described, pool)

    def save(self, path: str | os.PathLike) -> None:
        """Writes an .npz atomically (a temporary file renamed into place)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "format": np.int64(CACHE_FORMAT), "mu": self.mu, "sigma": self.sigma, "mu_spatial": self.mu_spatial,
            "sigma_spatial": self.sigma_spatial, "count": np.int64(self.count),
            "protocol": np.str_(json.dumps(self.protocol)),
        }
        if self.pool_features is not None:
            arrays["pool_features"] = self.pool_features
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as out:
            np.savez(out, **arrays)
        os.replace(out.name, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStatistics:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != CACHE_FORMAT:
                raise ValueError(f"{path}: statistics cache format {int(data['format'])}, expected {CACHE_FORMAT}")
            return cls(
                data["mu"], data["sigma"], data["mu_spatial"], data["sigma_spatial"], int(data["count"]),
                json.loads(str(data["protocol"])), data.get("pool_features"),
            )


class ProtocolMismatchError(ValueError):
    """Cached statistics were computed under another protocol than the evaluation asks for."""


def _check_protocol(cached: dict[str, Any], wanted: dict[str, Any], path) -> None:
    differing = {k: (cached.get(k), wanted.get(k)) for k in set(cached) | set(wanted) if cached.get(k) != wanted.get(k)}
    if differing:
        details = "; ".join(f"{k}: cached {a!r}, wanted {b!r}" for k, (a, b) in sorted(differing.items()))
        raise ProtocolMismatchError(
            f"the reference statistics in {path} were computed under another protocol ({details}). Delete the file "
            "to recompute them under the current protocol, or point the evaluation to another cache file."
        )


def reference_statistics(
    path: str | os.PathLike,
    compute_features: Callable[[], InceptionFeatures],
    *,
    protocol: FeatureProtocol,
    name: str,
    keep_pool_features: bool = True,
) -> ReferenceStatistics:
    """Cached statistics of a reference set (e.g. "cifar10/train"), computed by `compute_features()` on first use.

    A cache file written under another protocol or reference name is refused with `ProtocolMismatchError`. With
    `keep_pool_features` the pool features (N x 2048 float32: 400 MB for 50k images) are stored for
    precision/recall.
    """
    path = pathlib.Path(path)
    wanted = {**protocol.as_dict(), "reference": name}
    if path.is_file():
        cached = ReferenceStatistics.load(path)
        _check_protocol(cached.protocol, wanted, path)
        if keep_pool_features and cached.pool_features is None:
            raise ProtocolMismatchError(
                f"{path} holds no pool features, which precision/recall need; delete it to recompute, or pass "
                "keep_pool_features=False"
            )
        return cached
    statistics = ReferenceStatistics.from_features(
        compute_features(), protocol, name=name, keep_pool_features=keep_pool_features
    )
    statistics.save(path)
    return statistics


# ----------------------------------------------------------------------------------------------------------------
# The metrics with their protocol
# ----------------------------------------------------------------------------------------------------------------


def evaluate(
    features: InceptionFeatures,
    reference: ReferenceStatistics,
    *,
    protocol: FeatureProtocol,
    is_splits: int = 10,
    k: int = 3,
) -> dict[str, MetricResult]:
    """FID, sFID, IS and, when the reference keeps its pool features, precision and recall of generated images.

    `features` come from `extract_features` under `protocol`, which must equal the reference's. Keys: "fid",
    "sfid", "inception_score" (its protocol also holds the std over splits), "precision", "recall".
    """
    _check_protocol(
        {k_: v for k_, v in reference.protocol.items() if k_ != "reference"}, protocol.as_dict(), "the reference"
    )
    n = int(features.pool.shape[0])
    common = {**protocol.as_dict(), "samples": n, "reference": reference.protocol.get("reference", ""),
              "reference_samples": reference.count}
    mu, sigma = metrics.feature_statistics(features.pool)
    mu_s, sigma_s = metrics.feature_statistics(features.spatial)
    results = {
        "fid": MetricResult(
            "FID", metrics.frechet_distance(mu, sigma, reference.mu, reference.sigma),
            {**common, "features": FEATURE_NAMES["pool"], "sqrtm": "scipy.linalg.sqrtm, float64"},
        ),
        "sfid": MetricResult(
            "sFID", metrics.frechet_distance(mu_s, sigma_s, reference.mu_spatial, reference.sigma_spatial),
            {**common, "features": FEATURE_NAMES["spatial"], "sqrtm": "scipy.linalg.sqrtm, float64"},
        ),
    }
    score, std = metrics.inception_score(features.logits, splits=is_splits)
    results["inception_score"] = MetricResult(
        "IS", score, {**protocol.as_dict(), "samples": n, "features": FEATURE_NAMES["logits"], "splits": is_splits,
                      "std": std},
    )
    if reference.pool_features is not None:
        precision, recall = metrics.precision_recall(reference.pool_features, features.pool, k=k)
        options = {**common, "features": FEATURE_NAMES["pool"], "k": k, "distances": "float32"}
        results["precision"] = MetricResult("precision", precision, options)
        results["recall"] = MetricResult("recall", recall, options)
    return results
