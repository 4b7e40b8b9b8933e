"""Time per 1,000 FID samples: generating them with the decoder, then their Inception features, side by side.

    .venv/bin/python -m benchmarks.fid_time [--settings digits_gen,cifar10_gen] [--count 200] [--batch 100]

For each setting, fresh weights (the time of a forward pass does not depend on their values) of the setting's own
decoder generate ``count`` images with Euler 10 (the paper's "euler10" sampler) through the path `--mode=eval`
uses (lzn_jax/train/evaluate.py), and the FID Inception-V3 (random weights of the real architecture) extracts
their pool / spatial / logit features after clean-fid's resize to 299. Both are timed after a warm-up batch
(compiles excluded and printed apart), and scaled to 1,000 samples; the ratio says which half dominates.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def _generation_seconds(setting: str, count: int, batch: int) -> tuple[float, float, np.ndarray]:
    """(compile + first batch s, steady seconds for ``count`` images, the images uint8 (count, H, W, 3))."""
    from lzn_jax import parallel
    from lzn_jax.train import evaluate
    from lzn_jax.train.state import build_modules, init_params

    config = importlib.import_module(f"configs.{setting}").get_config()
    config.eval.fid_batch_size = batch
    modules = build_modules(config)
    params = init_params(modules, config, jax.random.key(0))
    mesh = parallel.data_mesh(1)
    options = evaluate.sampler_options(config, "euler")
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        evaluate.generated_uint8(config, modules, params, jax.random.key(1), mesh, batch, options)
        first = time.perf_counter() - start
        start = time.perf_counter()
        images = evaluate.generated_uint8(config, modules, params, jax.random.key(2), mesh, count, options)
        steady = time.perf_counter() - start
    return first, steady, images


def _feature_seconds(images: np.ndarray, batch: int) -> tuple[float, float]:
    """(compile + first batch s, steady seconds) of the FID features of ``images``."""
    from lzn_jax.evaluation import fid, inception

    variables = inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3), jnp.float32))
    protocol = fid.FeatureProtocol(weights_sha256="random-weights")
    start = time.perf_counter()
    fid.extract_features(images[:batch], variables, protocol=protocol, batch_size=batch)
    first = time.perf_counter() - start
    start = time.perf_counter()
    fid.extract_features(images, variables, protocol=protocol, batch_size=batch)
    return first, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="digits_gen,cifar10_gen")
    parser.add_argument("--count", type=int, default=200, help="images timed per setting (scaled to 1,000)")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"FID sample time: {jax.devices()[0].device_kind} ({os.cpu_count()} cores), Euler 10, batch {args.batch}, "
          f"{args.count} images per setting, seconds per 1,000 images (compile + first batch apart)")
    print(f"{'setting':14s} {'generate s':>10s} {'features s':>10s} {'total s':>8s} {'gen/feat':>8s} "
          f"{'compile gen':>11s} {'compile feat':>12s}")
    for setting in args.settings.split(","):
        gen_first, gen_steady, images = _generation_seconds(setting, args.count, args.batch)
        feat_first, feat_steady = _feature_seconds(images, args.batch)
        scale = 1000 / args.count
        print(f"{setting:14s} {gen_steady * scale:10.1f} {feat_steady * scale:10.1f} "
              f"{(gen_steady + feat_steady) * scale:8.1f} {gen_steady / feat_steady:8.2f} {gen_first:11.1f} "
              f"{feat_first:12.1f}", flush=True)


if __name__ == "__main__":
    main()
