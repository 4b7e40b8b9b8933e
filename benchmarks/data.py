"""Input-pipeline throughput per host core, against the images/s a training step consumes per accelerator.

  .venv/bin/python -m benchmarks.data [--num_images=48] [--repeats=2]     (from the repository root)

Measures, on JPEGs this script writes (500x375, the typical ImageNet size) and on CIFAR-shaped arrays:
  1. two-view 224x224 augmentation fully on the host (decode + crops + photometric ops), one thread;
  2. its host share when the photometric ops run on the device (decode + crops only), one thread;
  3. the device share (``apply_photometric_device`` under jit) on whatever jax backend is present;
  4. CIFAR-shaped 32x32x3 batches with random flips through the whole grain pipeline.
The consumption side comes from the paper's training times (docs/method.md, "Training recipes in brief"): there
is no trainer yet to time. Results and the host-or-device decision they support: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from lzn_jax.data import augment, device, folders, pipeline, sources

# (name, global batch, iterations, hours, A100s): the per-setting table of docs/method.md.
PAPER_RUNS = (
    ("case 1 CIFAR10 32x32", 2000, 50_000, 8, 16),
    ("case 1 AFHQ-Cat 256x256", 256, 60_000, 10, 32),
    ("case 1 LSUN-Bedroom 256x256", 256, 2_050_000, 341, 32),
    ("case 2 ImageNet two views 224x224", 8192, 5_000_000, 1800, 128),
    ("case 3 CIFAR10 32x32", 2000, 200_000, 31, 16),
)
# A TPU v5e host drives 8 chips on a single-host v5litepod-8 (4 per host in multi-host slices) and has 224 vCPUs.
V5E_CHIPS_PER_HOST = 8
V5E_VCPUS_PER_HOST = 224


def write_jpegs(folder: str, count: int, *, width: int = 500, height: int = 375) -> list[str]:
    """Writes ``count`` smooth RGB JPEGs (quality 90) so decode costs what real photos cost."""
    rng = np.random.default_rng(0)
    paths = []
    y, x = np.mgrid[0:height, 0:width]
    for i in range(count):
        phases = rng.random(6) * 6.28
        image = np.stack(
            [127 + 120 * np.sin(x / (17 + 5 * c) + y / (23 + 3 * c) + phases[c]) for c in range(3)], axis=-1
        )
        image += rng.normal(0, 12, image.shape)
        path = os.path.join(folder, f"image{width}x{height}_{i:04d}.jpg")
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(function, items, repeats: int) -> float:
    """Best-of-``repeats`` rate of calling ``function`` on every item in one thread."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def host_two_view_rates(paths: list[str], repeats: int) -> tuple[float, float, float]:
    """Images/s in one thread: decode only, decode + crops (device variant), decode + full augmentation (host)."""
    options = augment.TwoViewOptions()
    rng = np.random.default_rng(0)
    decode = images_per_second(folders.decode_rgb, paths, repeats)
    crops = images_per_second(lambda p: augment.two_view_crops(folders.decode_rgb(p), rng, options), paths, repeats)
    full = images_per_second(lambda p: augment.two_view_host(folders.decode_rgb(p), rng, options), paths, repeats)
    return decode, crops, full


def folder_generation_rate(paths: list[str], repeats: int) -> float:
    """Images/s in one thread of the 256x256 generation transform (decode, Resize(256), flip) on 512x512 JPEGs."""
    config = pipeline.default_config()
    config.update(image_size=256, augmentation="flip")
    transform = pipeline.ExampleTransform(config)
    rng = np.random.default_rng(0)
    return images_per_second(lambda p: transform({"image": folders.decode_rgb(p)}, rng), paths, repeats)


def device_photometric_rate(batch_size: int, repeats: int) -> float:
    """Views/s of the jitted photometric ops on the default jax backend (batch of ``batch_size`` images x 2 views)."""
    rng = np.random.default_rng(0)
    options = augment.TwoViewOptions()
    views = rng.integers(0, 256, (batch_size, 2, 224, 224, 3), dtype=np.uint8)
    samples = [[augment.sample_view_parameters(rng, options) for _ in range(2)] for _ in range(batch_size)]
    parameters = {k: np.array([[s[v][k] for v in range(2)] for s in samples]) for k in samples[0][0]}
    function = jax.jit(device.apply_photometric_device)
    views, parameters = jax.device_put((views, parameters))
    function(views, parameters).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(views, parameters).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * batch_size / best


def cifar_pipeline_rate(steps: int, num_threads: int) -> float:
    """Images/s of 32x32x3 random-flip batches through the grain pipeline with ``num_threads`` read threads."""
    config = pipeline.default_config()
    config.update(image_size=32, batch_size=250, augmentation="flip", num_threads=num_threads)
    images = np.random.default_rng(0).integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8)
    source = sources.ArraySource(images, np.zeros(10_000, np.int32))
    iterator = pipeline.build_pipeline(config, source=source, process_index=0, process_count=1)
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * config.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device_batch", type=int, default=16)
    arguments = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"machine: {cores} CPU cores; jax backend {jax.default_backend()} ({jax.devices()[0].device_kind})")

    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(folder, arguments.num_images)
        decode, crops, full = host_two_view_rates(paths, arguments.repeats)
        folder_rate = folder_generation_rate(
            write_jpegs(folder, arguments.num_images, width=512, height=512), arguments.repeats
        )
    device_rate = device_photometric_rate(arguments.device_batch, arguments.repeats)
    cifar_one = cifar_pipeline_rate(40, 1)
    cifar_all = cifar_pipeline_rate(40, cores)

    print("\nhost throughput, one thread (= per host core), 500x375 JPEG -> two 224x224 views:")
    print(f"  decode only                                   {decode:8.1f} images/s")
    print(f"  device variant, host share (decode + 2 crops) {crops:8.1f} images/s")
    print(f"  host variant (decode + crops + photometric)   {full:8.1f} images/s   ({crops / full:.1f}x slower)")
    print(f"device variant, photometric share on {jax.default_backend()} via jax: {device_rate:8.1f} views/s "
          f"= {device_rate / 2:.1f} images/s (all {cores} cores of this machine when the backend is cpu)")
    print(f"AFHQ-like 512x512 JPEG -> Resize(256) + flip, one thread: {folder_rate:8.1f} images/s")
    print("CIFAR-shaped 32x32x3 + flip through grain:")
    print(f"  1 read thread  {cifar_one:9.0f} images/s per core")
    print(f"  {cores} read threads {cifar_all:9.0f} images/s ({cifar_all / cores:.0f} per core)")

    print("\nconsumption per A100 from the paper's training times, and v5e host cores needed "
          f"({V5E_CHIPS_PER_HOST} chips per host, assuming a v5e chip consumes what an A100 does):")
    for name, batch, iterations, hours, gpus in PAPER_RUNS:
        per_gpu = batch * iterations / (hours * 3600 * gpus)
        per_host = per_gpu * V5E_CHIPS_PER_HOST
        if name.startswith("case 2"):
            host_cores, device_cores = per_host / full, per_host / crops
            need = f"{host_cores:5.1f} cores (host aug) / {device_cores:5.1f} cores (device aug)"
        elif "CIFAR" in name:
            need = f"{per_host / cifar_one:7.3f} cores"
        else:
            need = f"{per_host / folder_rate:7.3f} cores"
        print(f"  {name:36s} {per_gpu:7.1f} images/s per chip, {per_host:7.1f} per host: {need}")
    print(f"  (a v5e host has {V5E_VCPUS_PER_HOST} vCPUs; the rates above scale linearly with a faster trainer)")


if __name__ == "__main__":
    main()
