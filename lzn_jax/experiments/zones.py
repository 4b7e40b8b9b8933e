"""Experiment 3's figures (docs/results.md): the zones, and classification against the evaluation batch size, the
prior scale alpha and the solver steps.

    python -m lzn_jax.experiments.zones                  # the joint models of python -m lzn_jax.experiments.joint
    python -m lzn_jax.experiments.zones --smoke --models=/tmp/joint_smoke --out=/tmp/zones_smoke

Per seed, with experiment 3's joint model (``configs/digits_joint.py``; taken from ``--models``, the joint
experiment's output folder, or trained there with the same config if it is missing), EMA weights, on the 359 test
digits:

* **zones.png** (first seed): (a) the solver alone in 2-D: 12 anchors, every point of the plane coloured by the
  anchor its reverse flow reaches, and some reverse-flow trajectories. Each zone holds 1/12 of the Gaussian's mass.
  (b) The joint model's test latents (one batch, alpha 1) in their linear discriminant plane (the 2-D linear view
  in which the true classes separate best), coloured by their true class, with the label anchors and the reverse
  label flow's trajectories of a few latents into them;
* **accuracy against the evaluation batch size** B and alpha (transductive, as in the paper: each latent is solved
  against its B batch-mates' anchors), and the inductive protocol (each latent solved alone against the anchors of
  the 1,438 training digits) for reference;
* **accuracy against the solver steps**: the image latents' DPM-Solver++ steps (20 in the paper) with the label
  flow at 100 Euler steps, and the label flow's Euler steps (100) with the latents at 20.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lzn_jax import api, zoning
from lzn_jax.data.digits import load_digits_split
from lzn_jax.evaluation import classification
from lzn_jax.experiments import joint, runs
from lzn_jax.zoning.euler import reverse_grid
from lzn_jax.zoning.velocity import posterior, time_coefficients

NAME = "zones"
BATCH_SIZES = (8, 16, 32, 64, 128, 359)  # 359: the whole test split, the joint experiment's protocol
ALPHAS = (0.0, 0.5, 1.0)
INDUCTIVE_BATCH_SIZE = 64
LATENT_STEPS = (3, 5, 10, 20, 50)  # DPM-Solver++ (its order, 3, is the fewest steps)
LABEL_STEPS = (5, 10, 20, 50, 100, 200)  # reverse Euler
TOY_ANCHORS = 12
TRAJECTORIES = 40
SMOKE = {"batch_sizes": (16, 359), "alphas": (1.0,), "latent_steps": (3, 20), "label_steps": (5, 100)}


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers.
# ---------------------------------------------------------------------------------------------------------------


def cyclic_batches(count: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """Batches of exactly ``batch_size`` indices into ``range(count)`` that predict every index once.

    Batch k holds indices ``k * batch_size ...`` and wraps around to the start when it runs past ``count``; its
    first ``new`` entries are the indices it predicts, the rest (only in the last batch) are batch-mates whose
    predictions were already taken. So every image is classified in a batch of the same size, and none is dropped.

    Returns:
      ``[(indices (batch_size,) int, new), ...]``.
    """
    if not 1 <= batch_size <= count:
        raise ValueError(f"batch_size must be in [1, {count}], got {batch_size}")
    batches = []
    for start in range(0, count, batch_size):
        new = min(batch_size, count - start)
        batches.append(((start + np.arange(batch_size)) % count, new))
    return batches


def reverse_trajectories(latents: jax.Array, context: jax.Array, num_steps: int) -> np.ndarray:
    """States (num_steps + 1, B, D) of the reverse Euler flow from latents (B, D) at t = 1 to the anchors
    ``context`` (N, D) at t = 0, uniform weights: the path ``zoning.assign`` takes (its end points are the last
    state), recorded for drawing."""
    return np.asarray(_reverse_trajectories(jnp.asarray(latents, jnp.float32), jnp.asarray(context, jnp.float32),
                                            num_steps))


@functools.partial(jax.jit, static_argnums=2)
def _reverse_trajectories(latents: jax.Array, context: jax.Array, num_steps: int) -> jax.Array:
    times, step = reverse_grid(num_steps)
    # The coefficients are computed in float64 on the host, as the solver does, then scanned over.
    coefficients = jax.tree.map(lambda value: jnp.asarray(value, jnp.float32), time_coefficients(times))

    def euler_step(x, at_t):
        mean, _ = posterior(x, context, at_t)
        return x - step * (x - mean) / at_t.time, x

    end, states = jax.lax.scan(euler_step, latents, coefficients)
    return jnp.concatenate([states, end[None]])


def toy_zones(*, seed: int, grid: int = 200, extent: float = 3.0, num_steps: int = 100) -> dict[str, np.ndarray]:
    """The solver alone in 2-D: ``TOY_ANCHORS`` anchors drawn from N(0, 0.6^2 I), the index of the anchor whose
    zone holds every point of a ``grid`` x ``grid`` lattice over [-extent, extent]^2 (the nearest anchor to the
    point's reverse-flow end point), and the trajectories of ``TRAJECTORIES`` Gaussian draws."""
    anchors_key, draws_key = jax.random.split(jax.random.key(seed))
    anchors = 0.6 * jax.random.normal(anchors_key, (TOY_ANCHORS, 2), jnp.float32)
    axis = np.linspace(-extent, extent, grid, dtype=np.float32)
    points = jnp.asarray(np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2))
    options = zoning.SolverOptions(solver="euler", num_steps=num_steps)
    endpoints = zoning.assign(points, anchors, options=options).endpoints
    zones = classification.nearest_label(endpoints, anchors).reshape(grid, grid)
    draws = jax.random.normal(draws_key, (TRAJECTORIES, 2), jnp.float32)
    return {"anchors": np.asarray(anchors), "axis": axis, "zones": np.asarray(zones),
            "trajectories": reverse_trajectories(draws, anchors, num_steps)}


# ---------------------------------------------------------------------------------------------------------------
# Measurements on a joint model.
# ---------------------------------------------------------------------------------------------------------------


def test_digits(model: api.Model) -> tuple[np.ndarray, np.ndarray]:
    """The 359 test digits as the model's encoder takes them (uint8) and their labels."""
    from lzn_jax.train import state as train_state

    config = model.config
    return load_digits_split("test", image_size=config.data.image_size,
                             num_channels=train_state.encoder_input_channels(config.data))


def batched_accuracy(classify_rows, order: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    """Accuracy over ``labels`` of ``classify_rows(indices (batch_size,), k) -> classes``, called on the
    :func:`cyclic_batches` of ``batch_size`` taken from ``order`` (a permutation of the rows); batch k counts only
    the rows it predicts first."""
    correct = 0
    for k, (rows, new) in enumerate(cyclic_batches(len(order), batch_size)):
        chosen = order[rows]
        predicted = np.asarray(classify_rows(chosen, k))
        correct += int(np.sum(predicted[:new] == labels[chosen[:new]]))
    return correct / len(order)


def accuracy_by_batch_size(model: api.Model, images, labels, *, seed: int, batch_sizes: Sequence[int],
                           alphas: Sequence[float]) -> dict[str, dict[str, float]]:
    """``{alpha: {B: test accuracy}}``, transductive: the test digits in a fixed random order (from ``seed``),
    classified in :func:`cyclic_batches` of B, each batch with its own prior draw."""
    order = np.random.default_rng(seed).permutation(len(labels))
    key = jax.random.key(seed)
    return {str(alpha): {str(batch_size): batched_accuracy(
        lambda rows, k, alpha=alpha: api.classify(model, images[rows], jax.random.fold_in(key, k), prior_scale=alpha),
        order, labels, batch_size) for batch_size in batch_sizes} for alpha in alphas}


def inductive_accuracy(model: api.Model, images, labels, *, seed: int, alphas: Sequence[float],
                       batch_size: int = INDUCTIVE_BATCH_SIZE) -> dict[str, float]:
    """``{alpha: test accuracy}`` of the inductive protocol: each latent solved alone against the anchors of the
    training digits plus its own (``api.classify(mode="inductive")``), so batch-mates do not matter."""
    train_images, _ = load_digits_split("train", image_size=images.shape[1], num_channels=images.shape[-1])
    context = api.anchors(model, train_images)
    key = jax.random.key(seed)
    return {str(alpha): batched_accuracy(
        lambda rows, k, alpha=alpha: api.classify(model, images[rows], jax.random.fold_in(key, k), mode="inductive",
                                                  context=context, prior_scale=alpha),
        np.arange(len(labels)), labels, min(batch_size, len(labels))) for alpha in alphas}


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _classify(encoder, label_anchors, params, images, key, latent_options, label_options):
    table = label_anchors.apply({"params": params["label_anchors"]})
    return classification.classify(encoder, params["encoder"], table, images, key,
                                   latent_options=latent_options, label_options=label_options)


def accuracy_by_steps(model: api.Model, images, labels, *, seed: int, latent_steps: Sequence[int],
                      label_steps: Sequence[int]) -> dict[str, dict[str, float]]:
    """Test accuracy (the whole split as one batch, alpha 1) against the image latents' DPM-Solver++ steps (label
    flow at its default 100 Euler steps) and against the label flow's Euler steps (latents at their default 20)."""
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    key = jax.random.key(seed)

    def accuracy(latent_options, label_options):
        predicted = _classify(model.modules.encoder, model.modules.label_anchors, model.params, x, key,
                              latent_options, label_options)
        return float(np.mean(np.asarray(predicted) == labels))

    return {
        "latent_dpm_solver_steps": {str(n): accuracy(zoning.SolverOptions(solver="dpm_solver++", num_steps=n),
                                                     classification.LABEL_FLOW_OPTIONS) for n in latent_steps},
        "label_euler_steps": {str(n): accuracy(classification.IMAGE_LATENT_OPTIONS,
                                               zoning.SolverOptions(solver="euler", num_steps=n))
                              for n in label_steps},
    }


def model_zones(model: api.Model, images, labels, *, seed: int) -> dict[str, np.ndarray]:
    """The test latents (one batch, alpha 1), the label anchors and the reverse label-flow trajectories of
    ``TRAJECTORIES`` latents, all mapped by one linear map to 2-D: the latents' linear discriminant plane (fitted
    to the test latents and their true classes: the 2-D view in which the classes separate best), and the
    predicted classes."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    table = np.asarray(model.modules.label_anchors.apply({"params": model.params["label_anchors"]}))
    latents = api.latents(model, images, jax.random.key(seed))
    predicted = classification.decode_labels(latents, jnp.asarray(table))
    chosen = np.random.default_rng(seed).choice(len(labels), size=min(TRAJECTORIES, len(labels)), replace=False)
    paths = reverse_trajectories(latents[chosen], jnp.asarray(table), classification.LABEL_FLOW_OPTIONS.num_steps)
    plane = LinearDiscriminantAnalysis(n_components=2).fit(np.asarray(latents, np.float64), labels)

    def project(points):
        return plane.transform(np.asarray(points, np.float64).reshape(-1, table.shape[1])).reshape(
            *np.shape(points)[:-1], 2)

    return {"latents": project(latents), "labels": labels, "predicted": np.asarray(predicted),
            "anchors": project(table), "trajectories": project(paths), "trajectory_labels": labels[chosen]}


# ---------------------------------------------------------------------------------------------------------------
# Figures and tables.
# ---------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_zones(path: pathlib.Path, toy: dict, learned: dict) -> None:
    plt = _pyplot()
    colours = plt.get_cmap("tab20" if TOY_ANCHORS > 10 else "tab10")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    extent = (toy["axis"][0], toy["axis"][-1]) * 2
    left.imshow(toy["zones"], origin="lower", extent=extent, cmap=colours, vmin=0, vmax=19, alpha=0.45,
                interpolation="nearest")
    for path_2d in np.moveaxis(toy["trajectories"], 1, 0):
        left.plot(path_2d[:, 0], path_2d[:, 1], color="k", linewidth=0.6, alpha=0.6)
        left.plot(path_2d[0, 0], path_2d[0, 1], "o", color="k", markersize=2)
    left.scatter(toy["anchors"][:, 0], toy["anchors"][:, 1], c=np.arange(TOY_ANCHORS), cmap=colours, vmin=0, vmax=19,
                 edgecolors="k", s=80, marker="*")
    left.set_title(f"(a) the solver in 2-D: {TOY_ANCHORS} anchors (stars), their zones,\n"
                   "reverse-flow paths of Gaussian draws (dots) to an anchor", fontsize=10)
    left.set_aspect("equal")

    digits = plt.get_cmap("tab10")
    right.scatter(learned["latents"][:, 0], learned["latents"][:, 1], c=learned["labels"], cmap=digits, vmin=0,
                  vmax=9, s=9, alpha=0.7)
    for path_2d, label in zip(np.moveaxis(learned["trajectories"], 1, 0), learned["trajectory_labels"]):
        right.plot(path_2d[:, 0], path_2d[:, 1], color=digits(int(label)), linewidth=0.8, alpha=0.9)
    for label, (x, y) in enumerate(learned["anchors"]):
        right.scatter([x], [y], color=digits(label), edgecolors="k", s=160, marker="*", zorder=3)
        right.annotate(str(label), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=11, weight="bold")
    accuracy = 100 * np.mean(learned["predicted"] == learned["labels"])
    right.set_title("(b) joint model: test latents by true class, label anchors (stars),\n"
                    f"reverse label-flow paths (linear discriminant plane; accuracy {accuracy:.1f} %)",
                    fontsize=10)
    right.set_aspect("equal")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _curve(records: Sequence[dict], *keys: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """x labels, mean and std over seeds (in %) of ``record[keys[0]][keys[1]]...``."""
    tables = []
    for record in records:
        value = record
        for key in keys:
            value = value[key]
        tables.append(value)
    xs = list(tables[0])
    values = 100 * np.array([[table[x] for x in xs] for table in tables])
    return xs, values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(xs))


def plot_sweeps(out: pathlib.Path, records: Sequence[dict]) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for alpha in records[0]["by_batch_size"]:
        xs, mean, std = _curve(records, "by_batch_size", alpha)
        axis.errorbar([int(x) for x in xs], mean, yerr=std, marker="o", capsize=3, label=f"transductive, alpha {alpha}")
    alphas = list(records[0]["inductive"])
    xs, mean, std = _curve(records, "inductive")
    axis.errorbar([INDUCTIVE_BATCH_SIZE] * len(xs), mean, yerr=std, fmt="k*", capsize=3,
                  label="inductive (training anchors), alpha " + ", ".join(alphas))
    axis.set_xscale("log", base=2)
    axis.set_xlabel("evaluation batch size B")
    axis.set_ylabel("test accuracy (%)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "accuracy_vs_batch_size.png", dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, key, label in ((axes[0], "latent_dpm_solver_steps", "image latents: DPM-Solver++ steps (label flow 100)"),
                             (axes[1], "label_euler_steps", "label flow: Euler steps (image latents 20)")):
        xs, mean, std = _curve(records, "by_steps", key)
        axis.errorbar([int(x) for x in xs], mean, yerr=std, marker="o", capsize=3)
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    figure.tight_layout()
    figure.savefig(out / "accuracy_vs_solver_steps.png", dpi=110)
    plt.close(figure)


def table(results: dict) -> str:
    records = results["runs"]["RF+LZN (joint)"]
    seeds = runs.seeds_reported(results)
    pct = functools.partial(runs.format_mean_std, scale=100.0)

    def cells(*keys):
        values = {}
        for record in records:
            table_ = record
            for key in keys:
                table_ = table_[key]
            for x, value in table_.items():
                values.setdefault(x, []).append(value)
        return values

    lines = [f"Experiment 3's joint model (configs/digits_joint.py, seeds {seeds}; mean ± std over seeds): test "
             "accuracy (%) of the 359 test digits.\n",
             "Against the evaluation batch size B (transductive) and alpha:\n"]
    by_alpha = {alpha: cells("by_batch_size", alpha) for alpha in records[0]["by_batch_size"]}
    batch_sizes = list(next(iter(by_alpha.values())))
    inductive = cells("inductive")
    rows = [[f"alpha {alpha}"] + [pct(values[b]) for b in batch_sizes] + [pct(inductive[alpha])]
            for alpha, values in by_alpha.items()]
    lines.append(runs.markdown_table(["", *(f"B = {b}" for b in batch_sizes),
                                      f"inductive (B = {INDUCTIVE_BATCH_SIZE})"], rows))
    for key, title in (("latent_dpm_solver_steps", "Against the image latents' DPM-Solver++ steps (label flow 100 "
                                                   "Euler steps; B = 359, alpha 1):"),
                       ("label_euler_steps", "Against the label flow's Euler steps (image latents 20 DPM-Solver++ "
                                             "steps; B = 359, alpha 1):")):
        values = cells("by_steps", key)
        lines += [f"\n{title}\n", runs.markdown_table(["steps", *values], [["accuracy", *map(pct, values.values())]])]
    return "\n".join(lines)


def run(out: pathlib.Path, seeds: Sequence[int], *, smoke: bool = False, models: pathlib.Path | None = None) -> dict:
    sweeps = SMOKE if smoke else {"batch_sizes": BATCH_SIZES, "alphas": ALPHAS, "latent_steps": LATENT_STEPS,
                                  "label_steps": LABEL_STEPS}
    models = pathlib.Path(models) if models is not None else out.parent / (f"{joint.NAME}_smoke" if smoke
                                                                           else joint.NAME)
    results = {"experiment": NAME, "config": f"configs/{joint.CONFIG}.py", "smoke": smoke, "seeds": list(seeds),
               "models": str(models), **{k: list(v) for k, v in sweeps.items()}, "runs": {}}
    out.mkdir(parents=True, exist_ok=True)
    records = results["runs"]["RF+LZN (joint)"] = []
    for seed in seeds:
        workdir = joint.joint_workdir(models, seed)
        runs.train(joint.model_config((), seed, smoke=smoke), workdir)  # reuses experiment 3's run
        model = api.load(workdir)
        images, labels = test_digits(model)
        if seed == seeds[0]:
            plot_zones(out / "zones.png", toy_zones(seed=seed), model_zones(model, images, labels, seed=seed))
        records.append({
            "seed": seed, "workdir": str(workdir),
            "by_batch_size": accuracy_by_batch_size(model, images, labels, seed=seed,
                                                    batch_sizes=sweeps["batch_sizes"], alphas=sweeps["alphas"]),
            "inductive": inductive_accuracy(model, images, labels, seed=seed, alphas=sweeps["alphas"]),
            "by_steps": accuracy_by_steps(model, images, labels, seed=seed, latent_steps=sweeps["latent_steps"],
                                          label_steps=sweeps["label_steps"])})
        plot_sweeps(out, records)
        runs.write_outputs(out, results, table(results))  # after every seed: a long run shows its progress
    return results


def _flags(parser) -> None:
    parser.add_argument("--models", type=pathlib.Path, default=None,
                        help="the joint experiment's output folder, whose joint models this reads (trained there "
                             "if missing; default: joint, or joint_smoke with --smoke, beside --out)")


def main(argv: Sequence[str] | None = None) -> None:
    runs.command_line(NAME, __doc__.splitlines()[0], run, argv, extra_flags=_flags)


if __name__ == "__main__":
    main()
