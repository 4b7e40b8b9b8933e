"""Experiment 2 of docs/results.md: LZN learns representations with no auxiliary loss.

    python -m lzn_jax.experiments.representation                # 2 trainings x 3 seeds, then the table
    python -m lzn_jax.experiments.representation --smoke --out=/tmp/repr_smoke

On the embedded digits (``configs/digits_repr.py``), the features of:

* **LZN**: the contrastive LZN encoder (two views, the zoning solver's forward and reverse flows, nothing else);
* **SimCLR-style**: the same encoder, augmentations, batches, optimiser (per-module Adam, warm-up, clipping, EMA)
  and number of steps, trained with the NT-Xent loss (temperature ``SIMCLR_TEMPERATURE``) on the L2-normalised
  anchors of the two views; like LZN's, no projection head;
* **random init**: the same encoder with its initial weights (each seed's);
* **raw pixels** (256-d) and **PCA** of the pixels to the anchors' dimension (16), fitted on the training split.

Each is probed on the 359 test digits after fitting on the 1,438 training digits (no augmentation): weighted k-NN
(``probes.KnnOptions``: cosine similarity, k = 20) and a linear probe (multinomial logistic regression on the
standardised features, scikit-learn, fitted to convergence). Outputs in ``--out`` as for the other experiments.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lzn_jax import api, parallel
from lzn_jax.evaluation import end_of_training
from lzn_jax.experiments import runs

NAME = "representation"
CONFIG = "digits_repr"
SIMCLR_TEMPERATURE = 0.5  # SimCLR's value for small batches (Chen et al. 2020, CIFAR10)


def nt_xent_loss(anchors_0: jax.Array, anchors_1: jax.Array, temperature: float) -> jax.Array:
    """SimCLR's NT-Xent loss of two views' features (B, D): each of the 2B rows must pick its other view among the
    2B - 1 others, by softmax over cosine similarity / temperature; the mean over the 2B rows."""
    rows = jnp.concatenate([anchors_0, anchors_1]).astype(jnp.float32)
    rows = rows / jnp.maximum(jnp.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    batch = anchors_0.shape[0]
    logits = rows @ rows.T / temperature
    logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, logits)  # a row is not its own positive
    positives = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, positives[:, None], axis=-1))


def simclr_loss(modules, params, inputs, key) -> jax.Array:
    """NT-Xent of the encoder's anchors of the two views, encoded as the LZN step encodes them."""
    from lzn_jax.objectives.contrastive import two_view_anchors

    anchors_0, anchors_1 = two_view_anchors(modules.encoder, params["encoder"], inputs["views"], key)
    return nt_xent_loss(anchors_0, anchors_1, SIMCLR_TEMPERATURE)


def encoder_scores(config, modules, params) -> dict[str, float]:
    """:func:`probe_scores` of the encoder's anchors on the training and test splits (no augmentation)."""
    mesh = parallel.data_mesh(1)
    with jax.set_mesh(mesh):
        features = end_of_training.split_features(config, modules.encoder, params["encoder"], mesh)
    return runs.probe_scores(*features)


def pixel_baselines(dim: int) -> dict[str, dict[str, float]]:
    """Probe scores of the raw pixels and of their PCA to ``dim`` dimensions (fitted on the training split)."""
    from sklearn.decomposition import PCA

    (train_x, train_y), (test_x, test_y) = runs.pixel_vectors("train"), runs.pixel_vectors("test")
    pca = PCA(n_components=dim, random_state=0).fit(train_x)
    return {"raw pixels": runs.probe_scores(train_x, train_y, test_x, test_y),
            f"PCA ({dim})": runs.probe_scores(pca.transform(train_x), train_y, pca.transform(test_x), test_y)}


def initial_params(config, modules) -> dict:
    """The params an LZN run of ``config`` starts from (``init_state`` of ``jax.random.key(config.seed)``, as the
    trainer calls it)."""
    from lzn_jax.train import optim, state as train_state

    optimizer = optim.make_optimizer(config, modules.present())
    return train_state.init_state(config, modules, optimizer, jax.random.key(config.seed)).params


def run(out: pathlib.Path, seeds: Sequence[int], *, smoke: bool = False) -> dict:
    from lzn_jax.train import state as train_state

    results = {"experiment": NAME, "config": f"configs/{CONFIG}.py", "smoke": smoke, "seeds": list(seeds),
               "simclr_temperature": SIMCLR_TEMPERATURE, "runs": {}}
    for seed in seeds:
        config = runs.seeded(runs.load_config(CONFIG, smoke=smoke), seed)
        config.train.end_probes = False  # probed below, the same way for every model
        modules = train_state.build_modules(config)

        workdir = out / f"lzn_seed{seed}"
        summary = runs.train(config, workdir)
        model = api.load(workdir)
        results["runs"].setdefault("LZN", []).append(
            {"seed": seed, "train_seconds": summary.get("seconds"), "steps": summary.get("step"),
             "assignment_acc": summary.get("train/assignment_acc"), **encoder_scores(config, modules, model.params)})

        params, info = runs.train_with_loss(config, simclr_loss)
        results["runs"].setdefault("SimCLR-style", []).append(
            {"seed": seed, "train_seconds": info["seconds"], "steps": info["steps"], "final_loss": info["final_loss"],
             "skipped": info["skipped"], **encoder_scores(config, modules, params)})

        results["runs"].setdefault("random init", []).append(
            {"seed": seed, **encoder_scores(config, modules, initial_params(config, modules))})
        runs.write_outputs(out, results, table(results))  # after every seed: a long run shows its progress
    results["fixed"] = pixel_baselines(int(config.latent_dim))
    runs.write_outputs(out, results, table(results))
    return results


def table(results: dict) -> str:
    seeds = runs.seeds_reported(results)
    rows = [[setting, runs.format_mean_std(runs.column(records, "linear_accuracy"), scale=100.0),
             runs.format_mean_std(runs.column(records, "knn_accuracy"), scale=100.0)]
            for setting, records in results["runs"].items()]
    for setting, scores in results.get("fixed", {}).items():
        rows.append([setting, f"{100 * scores['linear_accuracy']:.1f}", f"{100 * scores['knn_accuracy']:.1f}"])
    return (f"Experiment 2 (configs/{CONFIG}.py, seeds {seeds}; mean ± std over seeds): test accuracy (%) of probes "
            "fitted on the training digits' features.\n\n"
            + runs.markdown_table(["features", "linear probe", "k-NN"], rows))


def main(argv: Sequence[str] | None = None) -> None:
    runs.command_line(NAME, __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
