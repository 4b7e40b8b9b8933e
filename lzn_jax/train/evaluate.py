"""``--mode=eval``: restore the workdir's latest checkpoint and write what the trainer writes at a sample step
(the sample grid from the EMA weights, the metric curves). The paper's metrics (FID, accuracy, probes) are the
evaluation package's (lzn_jax.evaluation), which this mode will call once it exists."""

from __future__ import annotations

import pathlib

import jax
import ml_collections

from lzn_jax import checkpoint, parallel
from lzn_jax.train import optim, report
from lzn_jax.train.loop import _image_channels, _write_samples, abstract_train_state, make_sample_fn
from lzn_jax.train.state import build_modules


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes ``eval_samples_<step>.png`` (generation) and ``curves.png`` into ``workdir``; returns the workdir.

    Raises:
      FileNotFoundError: the workdir holds no checkpoint.
    """
    workdir = pathlib.Path(workdir)
    mesh = parallel.data_mesh(config.num_devices)
    replicated = jax.NamedSharding(mesh, jax.P())
    modules = build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    abstract = abstract_train_state(config, modules, optimizer, replicated)
    with jax.set_mesh(mesh), checkpoint.Checkpointer(workdir / "checkpoints", handle_sigterm=False) as checkpointer:
        restored = checkpointer.restore(abstract)
        if restored is None:
            raise FileNotFoundError(
                f"{workdir / 'checkpoints'} holds no checkpoint to evaluate; train first with --mode=train and the "
                "same --workdir"
            )
        state, _ = restored
        if config.objective == "generation":
            image_shape = (config.data.image_size, config.data.image_size, _image_channels(config))
            sample, rows = make_sample_fn(config, modules, image_shape)
            _write_samples(jax.jit(sample, out_shardings=replicated), state, workdir, int(jax.device_get(state.step)),
                           rows, jax.process_index() == 0, prefix="eval_samples")
    if jax.process_index() == 0:
        report.plot_curves(workdir, workdir / "curves.png")
    return workdir
