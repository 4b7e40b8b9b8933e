"""``--mode=eval``: every metric ``config.eval`` asks for, on the workdir's latest checkpoint.

What runs depends on the setting's modules (docs/evaluation.md):

* generation: a sample grid per sampler; the reconstruction error (``eval.reconstruction_num_images``); FID,
  sFID, IS and precision/recall (``eval.fid_num_samples``);
* joint models: the classification accuracy at each prior scale of ``eval.accuracy_prior_scales`` (uniform and
  batch-label class weights), or at alpha 1 when the sweep is empty;
* representation models: k-NN and ridge probes (``eval.probes``) and the trained linear probe
  (``eval.linear_probe_epochs``).

Results go to ``eval_<step>.json`` (every number with its protocol) and PNG figures in the workdir; the metric
curves of training are redrawn.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lzn_jax import checkpoint, data, parallel, sampling
from lzn_jax.evaluation import classification, end_of_training, reconstruction
from lzn_jax.evaluation.fid import MetricResult
from lzn_jax.train import optim, report
from lzn_jax.train.loop import (
    _write_samples,
    decoder_conditioning,
    make_sample_fn,
)
from lzn_jax.train.state import Modules, abstract_train_state, build_modules, encoder_input_channels

logger = logging.getLogger(__name__)


def sampler_options(config: ml_collections.ConfigDict, name: str) -> sampling.SamplerOptions:
    """The decoder sampler ``name`` ("euler" or "dopri5") of ``config.eval``, from ``generation.rf_time_eps``."""
    time_eps = float(config.generation.rf_time_eps)
    if name == "euler":
        return sampling.SamplerOptions(sampler="euler", num_steps=int(config.eval.euler_steps), time_eps=time_eps)
    if name == "dopri5":
        return sampling.SamplerOptions(sampler="dopri5", time_eps=time_eps)
    raise ValueError(f"config.eval.samplers holds {name!r}; use 'euler' or 'dopri5'")



def _first_images(config, split: str, count: int) -> dict[str, np.ndarray]:
    """The first ``count`` records of ``split`` (file order, no augmentation) as host arrays: uint8 images, labels."""
    source = data.build_source(end_of_training.eval_data_config(config, split, count))
    if count > len(source):
        raise ValueError(f"config.eval asks for {count} images of split {split!r}, which has {len(source)}")
    records = [source[i] for i in range(count)]
    return {"image": np.stack([r["image"] for r in records]), "label": np.array([r["label"] for r in records])}


def reconstruction_metrics(config, modules: Modules, params, rng, mesh, *, weights: str) -> dict[str, MetricResult]:
    """The reconstruction error per sampler: ``eval.reconstruction_num_images`` training images as one batch
    (sharded over the mesh), ``eval.reconstruction_draws`` prior draws (one pass for the RF baseline)."""
    count = int(config.eval.reconstruction_num_images)
    if count % mesh.devices.size:
        raise ValueError(f"config.eval.reconstruction_num_images={count} does not divide over the "
                         f"{mesh.devices.size} devices; use a multiple of {mesh.devices.size}")
    host = _first_images(config, config.data.split, count)
    rows = parallel.batch_sharding(mesh)
    images = jax.device_put(data.to_float_images(host["image"]), rows)
    labels = jax.device_put(host["label"].astype(np.int32), rows)
    conditional = getattr(modules.decoder, "num_classes", 0) > 0
    results = {}
    for name in config.eval.samplers:
        options = reconstruction.ReconstructionOptions(sampler=sampler_options(config, name),
                                                       num_draws=int(config.eval.reconstruction_draws))

        def distances(params, images, labels, key, options=options):
            return reconstruction.reconstruction_distances(
                modules.decoder, params["decoder"], images, key, encoder=modules.encoder,
                encoder_params=params.get("encoder"), labels=labels if conditional else None, options=options)

        key = jax.random.fold_in(rng, 3)  # apart from training, sampling and accuracy draws
        output = parallel.jit_for_mesh(distances, mesh)(params, images, labels, key)
        result = reconstruction.reconstruction_result(
            output, options, weights=weights, has_latent=modules.encoder is not None,
            labels="true class" if conditional else "none")
        results[f"reconstruction_{name}"] = result
    return results


def accuracy_metrics(config, modules: Modules, params, rng, mesh, *, weights: str) -> dict[str, MetricResult]:
    """Classification accuracy of a joint model at each alpha of ``eval.accuracy_prior_scales`` (alpha 1 alone when
    empty), uniform and batch-label class weights, in full batches of ``train.accuracy_batch_size``."""
    batch_size = int(config.train.accuracy_batch_size) or int(config.data.batch_size)
    scales = tuple(float(a) for a in config.eval.accuracy_prior_scales) or (1.0,)

    def correct_in(params, inputs, key):  # the keys of the end-of-training accuracy: alpha 1 gives its number
        table = modules.label_anchors.apply({"params": params["label_anchors"]})
        sweep = classification.classify_prior_scales(modules.encoder, params["encoder"], table, inputs["image"],
                                                     key, prior_scales=scales, labels=inputs["label"])
        return classification.count_correct(sweep, inputs["label"])

    total, classified, _ = end_of_training.count_over_full_batches(config, mesh, params, rng, batch_size, correct_in)
    return classification.prior_scale_results(total, classified, prior_scales=scales, batch_size=batch_size,
                                              split=config.train.accuracy_split, weights=weights)


def generated_uint8(config, modules: Modules, params, rng, mesh, count: int, options: sampling.SamplerOptions):
    """``count`` generated images, uint8 (count, H, W, 3) on the host, in batches of ``eval.fid_batch_size``
    sharded over the mesh; class-conditional models cycle through the classes."""
    batch_size = int(config.eval.fid_batch_size)
    if batch_size % mesh.devices.size:
        raise ValueError(f"config.eval.fid_batch_size={batch_size} does not divide over the {mesh.devices.size} "
                         "devices")
    channels = encoder_input_channels(config.data)
    shape = (config.data.image_size, config.data.image_size, channels)
    decoder = modules.decoder
    num_classes = getattr(decoder, "num_classes", 0)
    rows = parallel.batch_sharding(mesh)

    def generate(params, key, first):
        noise_key, latent_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, (batch_size, *shape), jnp.float32)
        labels = (first + jnp.arange(batch_size)) % num_classes if num_classes else None
        latents, onehot = decoder_conditioning(modules, params, labels, latent_key, batch_size)
        return sampling.sample_images(decoder, params["decoder"], noise, latents=latents, label_onehot=onehot,
                                      options=options).x

    generate = parallel.jit_for_mesh(generate, mesh, out_shardings=rows)
    batches = []
    for index in range(-(-count // batch_size)):
        key = jax.random.fold_in(jax.random.fold_in(rng, 4), index)
        batches.append(sampling.to_uint8(jax.device_get(generate(params, key, np.int32(index * batch_size)))))
    images = np.concatenate(batches)[:count]
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def fid_metrics(config, modules: Modules, params, rng, mesh, inception, *, weights: str) -> dict[str, MetricResult]:
    """FID, sFID, IS and precision/recall of ``eval.fid_num_samples`` images per sampler against the training
    split's statistics (cached per data set and protocol). ``inception``: ``load_inception``'s (variables,
    sha256)."""
    from lzn_jax.evaluation import fid

    variables, digest = inception
    protocol = fid.FeatureProtocol(weights_sha256=digest)
    statistics_dir = pathlib.Path(config.eval.fid_statistics_dir or pathlib.Path.home() / ".cache" / "lzn_jax" /
                                  "fid_statistics")
    reference_count = config.eval.fid_num_reference
    name = f"{config.data.name}_{config.data.split}_{config.data.image_size}px"
    name += f"_{reference_count}" if reference_count else ""

    def reference_features():
        source = data.build_source(end_of_training.eval_data_config(config, config.data.split, 1))
        count = min(len(source), reference_count or len(source))
        batch = int(config.eval.fid_batch_size)

        def uint8_batches():
            for start in range(0, count, batch):
                images = np.stack([source[i]["image"] for i in range(start, min(count, start + batch))])
                yield np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images

        return fid.extract_features(uint8_batches(), variables, protocol=protocol, batch_size=batch)

    reference = fid.reference_statistics(statistics_dir / f"{name}.npz", reference_features, protocol=protocol,
                                         name=name)
    results = {}
    for sampler_name in config.eval.samplers:
        images = generated_uint8(config, modules, params, rng, mesh, int(config.eval.fid_num_samples),
                                  sampler_options(config, sampler_name))
        features = fid.extract_features(images, variables, protocol=protocol,
                                        batch_size=int(config.eval.fid_batch_size))
        for metric, result in fid.evaluate(features, reference, protocol=protocol).items():
            protocol_with_run = {**result.protocol, "sampler": sampler_name, "weights": weights}
            results[f"{metric}_{sampler_name}"] = MetricResult(f"{metric}_{sampler_name}", result.value,
                                                               protocol_with_run)
    return results


def probe_metrics(config, modules: Modules, params, mesh, workdir: pathlib.Path, *,
                  weights: str) -> dict[str, MetricResult]:
    """k-NN and ridge probes (``eval.probes``) and the trained linear probe (``eval.linear_probe_epochs``) of a
    representation model's features, fitted on ``data.split`` and scored on ``train.accuracy_split``."""
    results = {}
    epochs = int(config.eval.linear_probe_epochs)
    if not config.eval.probes and epochs <= 0:
        return results
    # Encoded once for every probe below.
    features = end_of_training.split_features(config, modules.encoder, params["encoder"], mesh)
    if config.eval.probes:
        values = end_of_training.representation_probes(config, modules, params, mesh, weights=f"{weights} weights",
                                                       features=features)
        for metric in ("knn", "ridge"):
            results[f"{metric}_accuracy"] = MetricResult(f"{metric}_accuracy", values[f"eval/{metric}_accuracy"],
                                                         {"protocol": values[f"eval/{metric}_protocol"]})
    if epochs > 0:
        from lzn_jax.evaluation import linear_probe

        train_x, train_y, val_x, val_y = features
        options = linear_probe.LinearProbeOptions(
            learning_rate=float(config.eval.linear_probe_learning_rate), num_epochs=epochs,
            batch_size=min(int(config.eval.linear_probe_batch_size), len(train_y)))
        epoch_features = (end_of_training.augmented_epoch_features(config, modules.encoder, params["encoder"], mesh)
                          if config.eval.linear_probe_augment else None)
        probe = linear_probe.train_linear_probe(train_x, train_y, val_x, val_y, num_classes=features.num_classes,
                                                key=jax.random.key(int(config.seed)), options=options, mesh=mesh,
                                                epoch_features=epoch_features)
        last = probe.history[-1]
        protocol = {"probe": probe.protocol, "weights": weights, "training_features":
                    f"one {config.data.augmentation} view per image, redrawn every epoch"
                    if epoch_features is not None else "fixed, unaugmented"}
        results["linear_probe_top1"] = MetricResult("linear_probe_top1", float(last["val_top1"]), protocol)
        results["linear_probe_top5"] = MetricResult("linear_probe_top5", float(last["val_top5"]), protocol)
        _plot_probe_history(probe.history, workdir / "linear_probe.png")
    return results


def _plot_probe_history(history, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = np.arange(1, len(history) + 1)
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for name in ("val_top1", "val_top5"):
        axis.plot(epochs, [float(h[name]) for h in history], label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("accuracy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Evaluates the workdir's latest checkpoint as ``config.eval`` says; returns ``{metric: value}`` and writes
    ``eval_<step>.json`` (values with protocols), sample grids and figures into ``workdir``.

    Raises:
      FileNotFoundError: the workdir holds no checkpoint.
    """
    workdir = pathlib.Path(workdir)
    mesh = parallel.data_mesh(config.num_devices)
    replicated = jax.NamedSharding(mesh, jax.P())
    modules = build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    abstract = abstract_train_state(config, modules, optimizer, replicated)
    is_main = jax.process_index() == 0
    inception = None
    if config.objective == "generation" and config.eval.fid_num_samples:
        from lzn_jax.evaluation.inception_weights import load_inception

        # Before anything else: a missing weights file fails at once, saying where to get it and where to put it.
        inception = load_inception(config.eval.inception_weights)
    with jax.set_mesh(mesh), checkpoint.Checkpointer(workdir / "checkpoints", handle_sigterm=False) as checkpointer:
        restored = checkpointer.restore(abstract)
        if restored is None:
            raise FileNotFoundError(
                f"{workdir / 'checkpoints'} holds no checkpoint to evaluate; train first with --mode=train and the "
                "same --workdir"
            )
        state, _ = restored
        step = int(jax.device_get(state.step))
        params = state.ema_params if config.eval.use_ema else state.params
        weights = "EMA" if config.eval.use_ema else "raw"
        results: dict[str, MetricResult] = {}
        timings: dict[str, float] = {}

        def timed(name, fn):
            start = time.perf_counter()
            results.update(fn())
            timings[name] = round(time.perf_counter() - start, 1)
            if is_main:
                print(f"eval: {name} done in {timings[name]} s", flush=True)

        if config.objective == "generation":
            sample, columns = make_sample_fn(config, modules)
            sample_fn = parallel.jit_for_mesh(sample, mesh, out_shardings=replicated)
            # The grid draws from the params chosen above (EMA or raw), like every other number here.
            grid_state = state.replace(ema_params=params)
            _write_samples(sample_fn, grid_state, workdir, step, columns, is_main, prefix="eval_samples")
            if config.eval.reconstruction_num_images:
                timed("reconstruction", lambda: reconstruction_metrics(config, modules, params, state.rng, mesh,
                                                                       weights=weights))
            if modules.label_anchors is not None:
                timed("accuracy", lambda: accuracy_metrics(config, modules, params, state.rng, mesh,
                                                           weights=weights))
            if config.eval.fid_num_samples:
                timed("fid", lambda: fid_metrics(config, modules, params, state.rng, mesh, inception, weights=weights))
        elif config.objective == "contrastive":
            timed("probes", lambda: probe_metrics(config, modules, params, mesh, workdir, weights=weights))

    output = {"step": step, "seconds": timings,
              "metrics": {name: result.as_dict() for name, result in results.items()}}
    if is_main:
        path = workdir / f"eval_{step:07d}.json"
        report.write_json(path, output)
        report.plot_curves(workdir, workdir / "curves.png")
        for name, result in results.items():
            print(f"  {name:<40} {result.value:.4g}", flush=True)
        print(f"eval results in {path}", flush=True)
    return {name: result.value for name, result in results.items()}
