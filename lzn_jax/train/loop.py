"""The training loop: mesh, input, model, sharded state, the jitted step, checkpoints, progress and pictures.

One linear function in banner-delimited sections; everything it calls is importable and testable on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import periodic_actions

from lzn_jax import checkpoint, data, parallel, sampling
from lzn_jax.evaluation import end_of_training
from lzn_jax.objectives.contrastive import ContrastiveSettings
from lzn_jax.train import optim, report
from lzn_jax.train.state import (
    Modules,
    TrainState,
    abstract_train_state,
    build_modules,
    encoder_input_channels,
    init_state,
    parameter_table,
)
from lzn_jax.train.steps import StepFunctions, make_step

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite updates: the run stops; its last good checkpoint stays as it was."""


def check_batch_divisible(global_batch_size: int, num_devices: int) -> None:
    """Every device needs the same number of rows; refuse a global batch that does not divide."""
    if global_batch_size % num_devices:
        raise ValueError(
            f"data.batch_size={global_batch_size} (the global batch) does not divide over the {num_devices} devices "
            f"of the mesh; use a multiple of {num_devices} (e.g. {num_devices * max(1, global_batch_size // num_devices)})"
        )


def check_encoder_chunks(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Each device encodes its 2 x B_device view rows in ``contrastive.encoder_chunks`` equal chunks."""
    if config.objective != "contrastive":
        return
    # The objective's own settings: its default for configs written before the key, its check that it is positive.
    chunks = ContrastiveSettings.from_config(config.contrastive).encoder_chunks
    rows = 2 * (int(config.data.batch_size) // num_devices)
    if rows % chunks:
        raise ValueError(
            f"contrastive.encoder_chunks={chunks} does not divide the {rows} encoder rows each of the {num_devices} "
            f"devices holds (2 views x {rows // 2} images); use a divisor of {rows}"
        )


def _initial_state(config, modules, optimizer, replicated, abstract, checkpointer) -> tuple[TrainState, Any, str]:
    """Resume order: this workdir's checkpoint, then ``checkpoint.resume_from``, then ``checkpoint.init_from``
    (params only), then fresh weights. Returns ``(state, data_state or None, where it came from)``."""
    restored = checkpointer.restore(abstract)
    if restored is not None:
        state, data_state = restored
        return state, data_state, f"workdir checkpoint at step {int(jax.device_get(state.step))}"
    if config.checkpoint.resume_from:
        state, data_state = checkpoint.restore_state(config.checkpoint.resume_from, abstract)
        return state, data_state, f"resume_from {config.checkpoint.resume_from}"
    # The seed is a constant of the traced function: no host-to-device transfer (the transfer guard is on).
    init = jax.jit(lambda: init_state(config, modules, optimizer, jax.random.key(config.seed)),
                   out_shardings=replicated)
    with jax.transfer_guard(config.train.transfer_guard):
        state = init()
    if config.checkpoint.init_from:
        params = checkpoint.restore_params(config.checkpoint.init_from, abstract.params)
        state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
        return state, None, f"params of init_from {config.checkpoint.init_from}"
    return state, None, "fresh weights"


# ---------------------------------------------------------------------------------------------------------------
# Pictures during training.
# ---------------------------------------------------------------------------------------------------------------


def decoder_conditioning(modules: Modules, params, labels: jax.Array | None, latent_key: jax.Array,
                         count: int) -> tuple[jax.Array | None, jax.Array | None]:
    """What the decoder is conditioned on when generating ``count`` images: ``(latents (count, D) or None, one-hot
    labels (count, C) or None)``. Latents are z ~ N(0, I) from ``latent_key``, moved into the zones of ``labels``
    by the forward label flow when the model has label anchors; the rectified-flow baseline has none."""
    decoder = modules.decoder
    num_classes = getattr(decoder, "num_classes", 0)
    onehot = jax.nn.one_hot(labels, num_classes) if num_classes else None
    if decoder.latent_dim == 0:
        return None, onehot
    prior = jax.random.normal(latent_key, (count, decoder.latent_dim), jnp.float32)
    if modules.label_anchors is None:
        return prior, onehot
    table = modules.label_anchors.apply({"params": params["label_anchors"]})
    return sampling.class_conditional_latents(table, labels, prior), onehot


def make_sample_fn(config: ml_collections.ConfigDict, modules: Modules):
    """``(ema_params, rng, step) -> images`` in [-1, 1] for the grid, and the grid's column count.

    Unconditional latents z ~ N(0, I), or, with label anchors, class-conditional latents (one grid row per class);
    the rectified-flow baseline has no latent.
    """
    count = int(config.train.num_sample_images)
    image_shape = (config.data.image_size, config.data.image_size, encoder_input_channels(config.data))
    decoder = modules.decoder
    num_classes = getattr(decoder, "num_classes", 0)

    def sample(params, rng, step):
        # A stream apart from the training draws of the same step (those split fold_in(rng, step)).
        noise_key, latent_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, step), 1))
        noise = jax.random.normal(noise_key, (count, *image_shape), jnp.float32)
        labels = jnp.arange(count) * num_classes // count if num_classes else None
        latents, onehot = decoder_conditioning(modules, params, labels, latent_key, count)
        return sampling.euler_sample(decoder, params["decoder"], noise, latents=latents, label_onehot=onehot,
                                     num_steps=int(config.train.sample_num_steps))

    rows = num_classes or int(np.ceil(np.sqrt(count)))
    return sample, -(-count // rows)


# ---------------------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, source=None,
          stop_after_steps: int | None = None) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming whatever is there) and returns the final summary.

    Args:
      source: records to train on instead of data set ``config.data.name`` (tests, notebooks).
      stop_after_steps: stop (with a checkpoint) after this many steps of this call, as a preemption would.
    """
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0

    # ---------------------------------------------------------------------------------------------- Mesh
    mesh = parallel.data_mesh(config.num_devices)
    num_devices = mesh.devices.size
    check_batch_divisible(config.data.batch_size, num_devices)
    check_encoder_chunks(config, num_devices)
    replicated = jax.NamedSharding(mesh, jax.P())
    batch_sharding = parallel.batch_sharding(mesh)

    # --------------------------------------------------------------------------------------------- Model
    modules = build_modules(config)
    present = modules.present()
    optimizer = optim.make_optimizer(config, present)
    last_step = optim.total_steps(config, present)
    abstract = abstract_train_state(config, modules, optimizer, replicated)

    # The transfer guard wraps the jitted calls only: an implicit transfer there (a Python scalar fed to the step,
    # a host array in a metric) would stall every step. Timing, logging and checkpointing transfer on purpose.
    guard = lambda: jax.transfer_guard(config.train.transfer_guard)
    with jax.set_mesh(mesh), checkpoint.Checkpointer(
        workdir / "checkpoints", every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    ) as checkpointer:
        # ----------------------------------------------------------------------------- Restore or init
        # Restore first: an incompatible workdir is refused before anything in it is written.
        state, data_state, origin = _initial_state(config, modules, optimizer, replicated, abstract, checkpointer)
        first_step = int(jax.device_get(state.step))
        if is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
            _log_start(config, mesh, state, origin, first_step, last_step)
        if first_step == 0 and config.objective == "contrastive" and config.train.end_probes:
            # The untrained encoder's probe accuracies: the baseline the final ones are read against (random
            # convolutional features already separate easy classes such as the digits).
            at_init = end_of_training.representation_probes(config, modules, state.params, mesh,
                                                            weights="initial weights")
            if is_main:
                report.write_json(workdir / "probes_at_init.json", at_init)

        # ----------------------------------------------------------------------------------------- Input
        batches = data.build_pipeline(config.data, sharding=batch_sharding, source=source, start_step=first_step)
        if data_state is not None:
            batches.set_state(data_state)

        # ------------------------------------------------------------------------------------ Update step
        step_fn = make_step(config, StepFunctions(modules, optimizer, batches.to_model_inputs))
        train_step = parallel.jit_for_mesh(step_fn, mesh, in_shardings=(replicated, batch_sharding),
                                           out_shardings=(replicated, None), donate_argnums=0)
        sample_fn = None
        if config.objective == "generation" and config.train.sample_every_steps:
            sample, grid_columns = make_sample_fn(config, modules)
            sample_fn = parallel.jit_for_mesh(sample, mesh, out_shardings=replicated)

        # ------------------------------------------------------------------------------------------ Loop
        writer = report.make_writer(workdir, is_main_process=is_main)
        progress = report.ProgressLine(first_step=first_step, last_step=last_step, enabled=is_main)
        report_progress = periodic_actions.ReportProgress(num_train_steps=last_step, writer=writer, every_secs=None,
                                                          every_steps=config.train.log_every_steps)
        hooks = [report_progress]
        if is_main and config.train.profile_start_step is not None:
            hooks.append(periodic_actions.Profile(logdir=str(workdir), first_profile=config.train.profile_start_step,
                                                  num_profile_steps=config.train.profile_num_steps))
        stop_at = last_step if stop_after_steps is None else min(last_step, first_step + stop_after_steps)
        pending: list[tuple[int, dict]] = []  # metrics of recent steps, fetched at the next log step
        step = first_step
        logged: dict[str, float] = {}
        stopped_early = False
        try:
            while step < stop_at:
                with report_progress.timed("data"), _timer(progress, "data"):
                    batch = next(batches)
                with report_progress.timed("train_step"), _timer(progress, "step"), guard():
                    state, metrics = train_step(state, batch)
                step += 1
                pending.append((step, metrics))
                for hook in hooks:
                    hook(step)
                if step % config.train.log_every_steps == 0 or step == stop_at:
                    logged = _log_metrics(pending, state, writer, progress, step, config)
                    pending = []
                if sample_fn is not None and (step % config.train.sample_every_steps == 0 or step == last_step):
                    with report_progress.timed("eval"), _timer(progress, "eval"):
                        _write_samples(sample_fn, state, workdir, step, grid_columns, is_main)
                if config.objective == "contrastive" and config.train.sample_every_steps and (
                        step % config.train.sample_every_steps == 0 or step == last_step) and is_main:
                    writer.flush()
                    report.plot_curves(workdir, workdir / "assignment_acc.png",
                                       ("train/assignment_acc", "train/log_loss", "train/ode_error"))
                preempted = checkpointer.preemption_requested(step)
                forced = preempted or step == stop_at
                with report_progress.timed("checkpoint"), _timer(progress, "checkpoint"):
                    if forced or not _in_skip_streak(config, state, step):
                        checkpointer.save(step, state, data_state=batches.get_state(), force=forced)
                if preempted:
                    if is_main:
                        print(f"preemption at step {step}: checkpoint written, exiting", flush=True)
                    stopped_early = True
                    break
            stopped_early = stopped_early or step < last_step
        finally:
            checkpointer.wait_until_finished()
            writer.flush()

        summary = {"step": step, "last_step": last_step, "finished": step >= last_step,
                   "stopped_early": stopped_early, "seconds": round(progress.elapsed(), 1),
                   "skipped_updates": int(jax.device_get(state.skipped_updates)), **logged}
        if not stopped_early:
            with _timer(progress, "eval"):
                summary.update(_end_of_training_checks(config, modules, state, mesh, workdir))
        if is_main:
            report.plot_curves(workdir, workdir / "curves.png")
            text = report.write_summary(workdir, summary)
            print(f"summary (also in {workdir / 'summary.json'}):\n{text}", flush=True)
        writer.close()
    return summary


def _end_of_training_checks(config, modules: Modules, state: TrainState, mesh,
                            workdir: pathlib.Path) -> dict[str, Any]:
    """A joint model's test accuracy; a representation model's k-NN and ridge probe accuracies (when configured),
    next to those of its untrained encoder when this workdir's run started from fresh weights."""
    if modules.label_anchors is not None and config.train.accuracy_batch_size > 0:
        return end_of_training.classification_accuracy(config, modules, state.ema_params, state.rng, mesh)
    if config.objective == "contrastive" and config.train.end_probes:
        results = end_of_training.representation_probes(config, modules, state.ema_params, mesh)
        baseline = workdir / "probes_at_init.json"
        if baseline.exists():
            at_init = json.loads(baseline.read_text())
            results.update({f"{name}_at_init": value for name, value in at_init.items() if name.endswith("accuracy")})
        return results
    return {}


def _in_skip_streak(config, state: TrainState, step: int) -> bool:
    """True at a periodic checkpoint step whose update was skipped: that save is left out, so the kept
    checkpoints stay the last good ones (skipped updates leave the weights as they were, but a save inside a streak
    would push good checkpoints out of the keep-N window). Preemption and the last step save regardless."""
    every = int(config.checkpoint.every_steps)
    if every <= 0 or step % every:
        return False
    return int(jax.device_get(state.consecutive_skips)) > 0


@contextlib.contextmanager
def _timer(progress: report.ProgressLine, section: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        progress.add(section, time.perf_counter() - start)


def _log_metrics(pending, state: TrainState, writer, progress, step: int, config) -> dict[str, float]:
    """Fetches the pending steps' metrics (one transfer), checks the skip streak, writes and shows them."""
    fetched = jax.device_get([metrics for _, metrics in pending])
    streak, total = (int(x) for x in jax.device_get((state.consecutive_skips, state.skipped_updates)))
    if streak >= config.train.max_consecutive_skips:
        first_bad = step - streak + 1
        raise TrainingDivergedError(
            f"{streak} consecutive updates skipped for a non-finite loss or gradient norm (steps {first_bad}-{step}); "
            "stopping. The last checkpoint holds the state before them; lower the learning rates or look at the "
            "data of those steps (config.train.max_consecutive_skips sets the limit)"
        )
    averaged = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[-1]}
    averaged["train/skipped_total"] = float(total)
    writer.write_scalars(step, averaged)
    progress.show(step, averaged)
    return averaged


def _write_samples(sample_fn, state: TrainState, workdir: pathlib.Path, step: int, columns: int, is_main: bool, *,
                   prefix: str = "samples") -> None:
    images = jax.device_get(sample_fn(state.ema_params, state.rng, state.step))
    if is_main:
        grid = sampling.image_grid(sampling.to_uint8(images), columns=columns)
        report.write_png(workdir / f"{prefix}_{step:07d}.png", grid)
        report.write_png(workdir / f"{prefix}_latest.png", grid)


def _log_start(config, mesh, state: TrainState, origin: str, first_step: int, last_step: int) -> None:
    devices = mesh.devices.flatten()
    print(f"lzn-jax: {config.objective} on {len(devices)} {devices[0].platform} device(s) in "
          f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}; global batch {config.data.batch_size} "
          f"({config.data.batch_size // len(devices)} per device)", flush=True)
    print(f"state from {origin}; steps {first_step} -> {last_step}", flush=True)
    for name, count in parameter_table(state.params):
        print(f"  params {name:<14} {count:>12,}", flush=True)
    logger.info("config:\n%s", json.dumps(json.loads(config.to_json_best_effort()), indent=1))
