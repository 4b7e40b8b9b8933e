"""What the experiments of docs/results.md share: one training run per (setting, seed) in its own workdir, resumed
when it is already there; mean ± standard deviation over seeds; the raw per-seed numbers as JSON and the table as
Markdown beside the figures.

Each experiment module (``python -m lzn_jax.experiments.NAME``) is a thin script over these helpers and the
library's own trainer, checkpoints and evaluation functions. The LZN models and the Rectified Flow baselines train
exactly as ``python -m lzn_jax.main`` trains them (:func:`train`); the baselines with another loss (cross-entropy,
SimCLR-style) train in :func:`train_with_loss`, a plain loop over the trainer's own state, optimiser and batches,
on one device, without checkpoints (they are trained again on every call).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

DEFAULT_SEEDS = (0, 1, 2)


def parse_args(name: str, description: str, argv: Sequence[str] | None = None, *,
               extra_flags: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The flags every experiment takes: ``--out`` (default ``workdirs/experiments/<name>`` under the current
    directory), ``--seeds`` (comma-separated ints) and ``--smoke`` (the configs' ``:smoke`` variants, one seed and
    tiny evaluations: a wiring check whose numbers mean nothing); ``extra_flags(parser)`` adds an experiment's
    own."""
    parser = argparse.ArgumentParser(prog=f"python -m lzn_jax.experiments.{name}", description=description)
    if extra_flags is not None:
        extra_flags(parser)
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder: one workdir per run, results.json, results.md and the figures "
                             f"(default workdirs/experiments/{name}, or {name}_smoke with --smoke)")
    parser.add_argument("--seeds", type=_seeds, default=DEFAULT_SEEDS, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--smoke", action="store_true", help="tiny configs and evaluations: checks the wiring only")
    args = parser.parse_args(argv)
    if args.smoke and args.seeds == DEFAULT_SEEDS:
        args.seeds = (0,)
    if args.out is None:  # apart, so that a smoke run's models are never taken for a full run's
        args.out = pathlib.Path("workdirs") / "experiments" / (f"{name}_smoke" if args.smoke else name)
    return args


def command_line(name: str, description: str, run: Callable, argv: Sequence[str] | None = None, *,
                 extra_flags: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """An experiment's ``main``: parses the flags (:func:`parse_args`), makes the entry points' process-wide
    settings (quiet library logs, the compilation cache) and calls ``run(out, seeds, smoke=..., **extra)``, the
    extra flags' values by their names."""
    from lzn_jax import entry

    args = vars(parse_args(name, description, argv, extra_flags=extra_flags))
    entry.quiet_library_logs()
    entry.enable_compilation_cache()
    run(args.pop("out"), args.pop("seeds"), **args)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct integers, got {text!r}")
    return seeds


def load_config(name: str, variants: Sequence[str] = (), *, smoke: bool = False) -> ml_collections.ConfigDict:
    """``configs/<name>.py`` with ``variants`` (plus ``smoke`` when asked), as ``--config=configs/<name>.py:...``
    would resolve it."""
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(",".join([*variants, *(["smoke"] if smoke else [])]))


def seeded(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose weights, training draws and data order all come from ``seed``."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.seed = int(seed)
    config.data.seed = int(seed)
    return config


def train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` and returns its summary (``summary.json``: the last logged metrics, the
    end-of-training checks, ``seconds`` of training).

    A workdir whose run already finished is not touched: its summary is read back, so rerunning an experiment only
    redoes the evaluation. An unfinished one is resumed from its last checkpoint.

    Raises:
      ValueError: the workdir holds a run of another config (``config.json`` differs): nothing is reused or
        overwritten.
    """
    workdir = pathlib.Path(workdir)
    written = workdir / "config.json"
    if written.is_file() and written.read_text() != config.to_json_best_effort(indent=2) + "\n":
        raise ValueError(f"{workdir} holds a run of another config (its config.json differs from this experiment's); "
                         "pass another --out, or delete that workdir to train it again")
    summary_file = workdir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if _reached_the_end(summary):
            print(f"{workdir}: finished earlier (step {summary['step']}), reusing it", flush=True)
            return summary
    from lzn_jax.train import loop  # imports TensorFlow (clu): only when an experiment trains

    return require_finished(loop.train(config, workdir), workdir)


def _reached_the_end(summary: dict[str, Any]) -> bool:
    return bool(summary.get("finished")) and not summary.get("stopped_early")


def require_finished(summary: dict[str, Any], workdir: pathlib.Path) -> dict[str, Any]:
    """Returns a training summary if its run reached its last step.

    A run the trainer stopped early (SIGTERM / preemption: it wrote a checkpoint and returned) must not be
    evaluated as if it were trained, or a half-trained model's numbers would enter the results.

    Raises:
      RuntimeError: the run stopped before its last step; its checkpoint is kept, and rerunning the same command
        resumes it.
    """
    if _reached_the_end(summary):
        return summary
    raise RuntimeError(f"{workdir}: training stopped at step {summary.get('step')} of {summary.get('last_step')} "
                       "before its end (preempted or interrupted); its checkpoint is kept: rerun the same command "
                       "to resume it")


def train_with_loss(config: ml_collections.ConfigDict, loss_of: Callable) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains the config's modules on another loss with the trainer's own parts: fresh state (``init_state``), the
    per-module Adam with warm-up (``make_optimizer``), clipping, EMA and non-finite skips (``apply_gradients``), the
    config's batches (``build_pipeline``), ``optim.total_steps`` steps on one device. For the baselines of the
    experiments, which differ from an LZN run in their loss only.

    Args:
      loss_of: ``(modules, params, inputs, key) -> scalar loss``; ``inputs`` are the model inputs of a batch
        (``"image"`` / ``"views"`` in [-1, 1], ``"label"``), ``key`` the step's key (dropout).
    Returns:
      ``(EMA params, {"seconds", "steps", "final_loss", "skipped"})``.
    """
    import jax

    from lzn_jax import data
    from lzn_jax.train import optim, state as train_state
    from lzn_jax.train.steps import step_key

    modules = train_state.build_modules(config)
    present = modules.present()
    optimizer = optim.make_optimizer(config, present)
    steps = optim.total_steps(config, present)
    batches = data.build_pipeline(config.data, sharding=None)
    to_inputs = batches.to_model_inputs

    @jax.jit
    def step(state, batch):
        inputs = to_inputs(batch)
        loss, grads = jax.value_and_grad(lambda params: loss_of(modules, params, inputs, step_key(state)))(state.params)
        new_state, _ = optim.apply_gradients(state, grads, loss, optimizer=optimizer, config=config)
        return new_state, loss

    start = time.perf_counter()
    init = jax.jit(lambda key: train_state.init_state(config, modules, optimizer, key))
    current, loss = init(jax.random.key(config.seed)), None
    for _ in range(steps):
        current, loss = step(current, next(batches))
    info = {"seconds": round(time.perf_counter() - start, 1), "steps": steps, "final_loss": float(loss),
            "skipped": int(current.skipped_updates)}
    return current.ema_params, info


def seeds_reported(results: dict) -> str:
    """The seeds with numbers in ``results["runs"]``, as "0, 1, 2": what a table made mid-run covers, which may
    be fewer than the seeds asked for."""
    seeds = sorted({record["seed"] for records in results["runs"].values() for record in records})
    return ", ".join(map(str, seeds))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of per-seed numbers."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def format_mean_std(values: Sequence[float], *, digits: int = 3, scale: float = 1.0) -> str:
    """``"mean ± std"`` of ``values * scale`` to ``digits`` significant figures of the mean (``"n/a"`` if empty)."""
    if not len(values):
        return "n/a"
    mean, std = mean_std([v * scale for v in values])
    if not math.isfinite(mean):
        return str(mean)
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(mean))))) if mean else digits
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}" if len(values) > 1 else f"{mean:.{decimals}f}"


def column(records: Sequence[dict], key: str) -> list:
    """``record[key]`` of every record that has it."""
    return [record[key] for record in records if key in record]


def pixel_vectors(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``split`` as raw pixel vectors (N, 256) float64 in [-1, 1] (the model inputs' scale), labels."""
    from lzn_jax.data.digits import load_digits_split

    images, labels = load_digits_split(split)
    return images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1.0, np.asarray(labels)


def probe_scores(train_x, train_y, test_x, test_y) -> dict[str, float]:
    """Test accuracy of two probes fitted on the training rows of features (N, D): weighted k-NN
    (``probes.KnnOptions``: cosine similarity, k = 20) and a linear probe (multinomial logistic regression on the
    features standardised with the training rows' mean and deviation, scikit-learn's lbfgs to convergence)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from lzn_jax.evaluation import probes

    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    knn = probes.knn_accuracy(train_x.astype(np.float32), np.asarray(train_y), test_x.astype(np.float32),
                              np.asarray(test_y), num_classes=int(np.max(train_y)) + 1)
    scaler = StandardScaler().fit(train_x)
    linear = LogisticRegression(max_iter=10_000).fit(scaler.transform(train_x), train_y)
    return {"knn_accuracy": float(knn), "linear_accuracy": float(linear.score(scaler.transform(test_x), test_y))}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out: pathlib.Path, results: dict[str, Any], table: str) -> None:
    """``results.json`` (raw per-seed numbers, settings, timings) and ``results.md`` (the table) in ``out``."""
    from lzn_jax.train import report  # imports TensorFlow (clu)

    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", results)
    (out / "results.md").write_text(table)
    print(table, flush=True)
    print(f"results in {out / 'results.json'} and {out / 'results.md'}", flush=True)
