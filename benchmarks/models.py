"""Throughput and compiled memory of the NCSN++ encoder + decoder at the CIFAR10 configuration.

Measures images/s of the forward pass and of forward+backward (value and gradient of a rectified-flow loss w.r.t.
encoder and decoder params) for float32 vs bfloat16 compute and remat off/on, plus `compiled.memory_analysis()`, and
prints ratios against the float32 / no-remat baseline of the same run. The latent zoning flow between encoder and
decoder is left out on purpose (benchmarks/zoning.py measures it): the decoder gets the anchors as its latent.

Paper setting: per-device batch 125 (2000 over 16 GPUs). From the repository root:
  .venv/bin/python -m benchmarks.models                       # CPU-sized default: batch 4 (minutes, mostly compiling)
  .venv/bin/python -m benchmarks.models --batch 125 --repeats 20                  # GPU/TPU, the paper's batch
  .venv/bin/python -m benchmarks.models --modes fwd --dtypes float32 --remat off   # one cell only
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import models


def _parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (paper: 125)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per cell after one warm-up call")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--remat", default="off,on")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--latent-dim", type=int, default=200)
    return parser.parse_args()


def _batch(batch: int, latent_dim: int):
    """A random CIFAR-shaped batch: images in [-1, 1], noise, RF times."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (batch, 32, 32, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(1e-3, 1.0, batch), jnp.float32)
    return images, noise, t


def _loss_fn(encoder, decoder):
    """Rectified-flow loss of decoder(x_t, t, latent=encoder(x)) in training mode (dropout on)."""

    def loss(params, images, noise, t, rng):
        enc_rng, dec_rng = jax.random.split(rng)
        anchors = encoder.apply(params["encoder"], images, train=True, rngs={"dropout": enc_rng})
        x_t = t[:, None, None, None] * images + (1 - t[:, None, None, None]) * noise
        velocity = decoder.apply(params["decoder"], x_t, t, anchors, train=True, rngs={"dropout": dec_rng})
        return jnp.mean((images - noise - velocity) ** 2)

    return loss


def _measure(fn, args, repeats: int) -> tuple[float, float, dict]:
    """Compiles fn for args; returns (compile seconds, seconds per call, memory analysis in bytes)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    mem = {
        name: getattr(memory, f"{name}_size_in_bytes", float("nan"))
        for name in ("argument", "output", "temp", "generated_code")
    } if memory is not None else {}
    jax.block_until_ready(compiled(*args))  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = compiled(*args)
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / repeats, mem


def main():
    args = _parse()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"batch {args.batch}, repeats {args.repeats}")
    enc_config = models.cifar10_encoder_config(latent_dim=args.latent_dim)
    dec_config = models.cifar10_decoder_config(latent_dim=args.latent_dim)
    images, noise, t = _batch(args.batch, args.latent_dim)
    # Params do not depend on dtype or remat: one float32 set shared by every cell. Values do not change the speed
    # of dense convolutions, so they are drawn by NumPy from the eval_shape tree; a real `init` of these two models
    # compiles ~700 random-number kernels (over a minute on a 2-core CPU) for nothing here.
    encoder, decoder = models.build(enc_config), models.build(dec_config)
    shapes = jax.eval_shape(lambda key: {
        "encoder": encoder.init(key, *models.example_inputs(enc_config, 1, 32)),
        "decoder": decoder.init(key, *models.example_inputs(dec_config, 1, 32)),
    }, jax.random.key(0))
    fill = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * fill.standard_normal(s.shape), s.dtype), shapes)
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"encoder + decoder parameters: {count:,}")
    rng = jax.random.key(1)

    results = {}
    header = f"{'mode':9s} {'dtype':9s} {'remat':5s} {'images/s':>10s} {'ms/call':>9s} {'compile s':>9s} " \
             f"{'temp MiB':>9s} {'args MiB':>9s} {'out MiB':>8s}"
    print(header)
    for mode in args.modes.split(","):
        for dtype in args.dtypes.split(","):
            for remat in args.remat.split(","):
                enc = models.build(enc_config, dtype=dtype, remat=remat == "on")
                dec = models.build(dec_config, dtype=dtype, remat=remat == "on")
                loss = _loss_fn(enc, dec)
                fn = loss if mode == "fwd" else jax.value_and_grad(loss)
                compile_s, step_s, mem = _measure(fn, (params, images, noise, t, rng), args.repeats)
                ips = args.batch / step_s
                results[(mode, dtype, remat)] = (ips, mem.get("temp", float("nan")))
                mib = lambda key: mem.get(key, float("nan")) / 2**20
                print(f"{mode:9s} {dtype:9s} {remat:5s} {ips:10.1f} {1e3 * step_s:9.1f} {compile_s:9.1f} "
                      f"{mib('temp'):9.1f} {mib('argument'):9.1f} {mib('output'):8.1f}", flush=True)

    print("\nratios (throughput; temp memory)")
    for (mode, dtype, remat), (ips, temp) in results.items():
        if dtype != "float32" and (mode, "float32", remat) in results:
            base_ips, base_temp = results[(mode, "float32", remat)]
            print(f"  {mode:9s} remat {remat:3s}: {dtype}/float32 = {ips / base_ips:.2f}x speed, "
                  f"{temp / base_temp:.2f}x temp memory")
        if remat == "on" and (mode, dtype, "off") in results:
            base_ips, base_temp = results[(mode, dtype, "off")]
            print(f"  {mode:9s} {dtype:9s}: remat/no-remat = {ips / base_ips:.2f}x speed, "
                  f"{temp / base_temp:.2f}x temp memory")


if __name__ == "__main__":
    main()
