"""Experiment 3 of docs/results.md: LZN does generation and classification jointly.

    python -m lzn_jax.experiments.joint                     # 4 trainings x 3 seeds, then the tables
    python -m lzn_jax.experiments.joint --smoke --out=/tmp/joint_smoke

On the embedded digits (``configs/digits_joint.py``), per seed:

* **RF+LZN (joint)**: the case-study-3 model (image encoder, class-conditional RF decoder with the latent, label
  anchors, the label alignment loss), as the README's main job trains it;
* **RF (class-conditional)**: ``:rf``, the same decoder with the class input and no latent;
* **LZN, classification only**: the joint model with the RF loss weighted 0 (the paper's "no gen" ablation, its
  Table 3): the encoder learns from the label alignment alone (the decoder still runs, with no effect on anything,
  as in the reference's ablation);
* **cross-entropy**: the same encoder with the label-anchor table as a bias-free linear head
  (``logits = anchors @ table.T``), trained with softmax cross-entropy by the trainer's own optimiser (the same
  per-module Adam learning rates, warm-up, clipping and EMA) on the same batches for the same number of steps.

Reported: test accuracy (the 359 test digits; LZN models classify them as one batch, transductively, alpha 1 and
uniform class weights, EMA weights; the cross-entropy model by its arg-max logit, EMA weights), the LZN models'
accuracy against alpha (``eval.accuracy_prior_scales``), and the class-conditional digits-FID of 1,000 samples
(100 per class) of the two generative models. Logistic regression on the raw pixels (experiment 2's linear probe,
no seed) is the floor. The cross-entropy model shares the joint run's initial encoder and table, learning rates
(tuned for LZN, not for it), warm-up, EMA and batches; its gradient clipping sees only its own two modules.
Outputs in ``--out`` as for :mod:`lzn_jax.experiments.generation`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import optax

from lzn_jax import api, data, parallel
from lzn_jax.data.digits import load_digits_split
from lzn_jax.evaluation.classification import eval_anchors
from lzn_jax.experiments import runs
from lzn_jax.experiments.generation import feature_space, sample_quality
from lzn_jax.objectives.contrastive import encoder_anchors

NAME = "joint"
CONFIG = "digits_joint"
GENERATIVE = {"RF+LZN (joint)": ("joint", ()), "RF (class-conditional)": ("rf", ("rf",))}
CLASSIFICATION_ONLY = "LZN, classification only"
CROSS_ENTROPY = "cross-entropy"


# ---------------------------------------------------------------------------------------------------------------
# The cross-entropy baseline: the trainer's state, optimiser and batches, another loss.
# ---------------------------------------------------------------------------------------------------------------


def cross_entropy_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The joint config without the decoder: encoder and label-anchor table only, same optimiser settings."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.decoder = None
    config.optim.num_iterations.decoder = 0
    return config


def cross_entropy_logits(modules, params, anchors: jax.Array) -> jax.Array:
    """(B, num_classes) logits ``anchors @ table.T`` of anchors (B, D), the label-anchor table as the head."""
    return anchors @ modules.label_anchors.apply({"params": params["label_anchors"]}).T


def cross_entropy_loss(modules, params, inputs, key) -> jax.Array:
    """Mean softmax cross-entropy of the training-mode (dropout on) logits against the labels."""
    anchors = encoder_anchors(modules.encoder, params["encoder"], inputs["image"], key)
    logits = cross_entropy_logits(modules, params, anchors)
    return optax.softmax_cross_entropy_with_integer_labels(logits, inputs["label"]).mean()


def cross_entropy_accuracy(config: ml_collections.ConfigDict, params) -> float:
    """Test accuracy of the cross-entropy model: arg-max logit, no dropout."""
    from lzn_jax.train import state as train_state

    modules = train_state.build_modules(config)
    images, labels = load_digits_split("test", image_size=config.data.image_size,
                                       num_channels=train_state.encoder_input_channels(config.data))
    forward = jax.jit(lambda p, x: cross_entropy_logits(modules, p, eval_anchors(modules.encoder, p["encoder"], x)))
    logits = forward(params, data.to_float_images(images))
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))


# ---------------------------------------------------------------------------------------------------------------
# The LZN models' numbers.
# ---------------------------------------------------------------------------------------------------------------


def accuracy_by_alpha(model: api.Model, *, seed: int) -> dict[str, float]:
    """``{alpha: test accuracy}`` over ``eval.accuracy_prior_scales`` (the whole test split as one batch)."""
    from lzn_jax.train import evaluate

    mesh = parallel.data_mesh(model.config.num_devices)
    with jax.set_mesh(mesh):
        results = evaluate.accuracy_metrics(model.config, model.modules, model.params, jax.random.key(seed), mesh,
                                            weights="EMA")
    return {str(r.protocol["alpha"]): r.value for name, r in results.items() if not name.endswith("class_weights")}


def classification_numbers(model: api.Model, *, seed: int) -> dict:
    """``accuracy`` (alpha 1, the paper's test-time setting) and ``accuracy_by_alpha``."""
    by_alpha = accuracy_by_alpha(model, seed=seed)
    return {"accuracy": by_alpha["1.0"], "accuracy_by_alpha": by_alpha}


def pixel_logistic_regression() -> float:
    """Test accuracy of the linear probe of experiment 2 on the raw pixels (the floor)."""
    return runs.probe_scores(*runs.pixel_vectors("train"), *runs.pixel_vectors("test"))["linear_accuracy"]


def _workdir(out: pathlib.Path, tag: str, seed: int) -> pathlib.Path:
    return out / f"{tag}_seed{seed}"


def model_config(variants: Sequence[str], seed: int, *, smoke: bool = False) -> ml_collections.ConfigDict:
    """The config of one of this experiment's LZN / RF runs (``configs/digits_joint.py`` with ``variants``) for
    ``seed``; :mod:`lzn_jax.experiments.zones` rebuilds the joint model's with it, so it finds the same workdir."""
    config = runs.seeded(runs.load_config(CONFIG, variants, smoke=smoke), seed)
    if smoke:  # one compiled classifier (the alpha sweep's), not also the end-of-training one
        config.train.accuracy_batch_size = 0
        config.eval.accuracy_prior_scales = (0.0, 1.0)
    return config


def joint_workdir(out: pathlib.Path, seed: int) -> pathlib.Path:
    """The joint model's workdir of ``seed`` in this experiment's output folder ``out``."""
    return _workdir(out, GENERATIVE["RF+LZN (joint)"][0], seed)


def run(out: pathlib.Path, seeds: Sequence[int], *, smoke: bool = False) -> dict:
    space = feature_space(out, smoke=smoke)
    count, steps = (64, 4) if smoke else (1000, 50)
    results = {"experiment": NAME, "config": f"configs/{CONFIG}.py", "smoke": smoke, "seeds": list(seeds),
               "num_samples": count, "sample_steps": steps, "classifier_test_accuracy": space.classifier.test_accuracy,
               "pixel_logistic_regression": pixel_logistic_regression(), "runs": {}}

    for seed in seeds:
        for setting, (tag, variants) in GENERATIVE.items():
            workdir = _workdir(out, tag, seed)
            summary = runs.train(model_config(variants, seed, smoke=smoke), workdir)
            model = api.load(workdir)
            quality, _ = sample_quality(model, space, seed=seed, count=count, steps=steps)
            record = {"seed": seed, "train_seconds": summary.get("seconds"), "steps": summary.get("step"), **quality}
            if model.modules.label_anchors is not None:
                record.update(classification_numbers(model, seed=seed))
            results["runs"].setdefault(setting, []).append(record)

        config = model_config((), seed, smoke=smoke)
        config.generation.rf_loss_weight = 0.0
        workdir = _workdir(out, "classification_only", seed)
        summary = runs.train(config, workdir)
        results["runs"].setdefault(CLASSIFICATION_ONLY, []).append({
            "seed": seed, "train_seconds": summary.get("seconds"), "steps": summary.get("step"),
            **classification_numbers(api.load(workdir), seed=seed)})

        config = cross_entropy_config(model_config((), seed, smoke=smoke))
        params, info = runs.train_with_loss(config, cross_entropy_loss)
        results["runs"].setdefault(CROSS_ENTROPY, []).append({
            "seed": seed, "train_seconds": info["seconds"], "steps": info["steps"], "final_loss": info["final_loss"],
            "skipped": info["skipped"], "accuracy": cross_entropy_accuracy(config, params)})
        runs.write_outputs(out, results, table(results))  # after every seed: a long run shows its progress
    return results


def table(results: dict) -> str:
    seeds = runs.seeds_reported(results)
    lines = [f"Experiment 3 (configs/{CONFIG}.py, seeds {seeds}; mean ± std over seeds). Test accuracy of the 359 "
             f"test digits; class-conditional digits-FID of {results['num_samples']} samples (Euler "
             f"{results['sample_steps']} steps), EMA weights.\n"]
    rows = [[setting, runs.format_mean_std(runs.column(records, "accuracy"), scale=100.0),
             runs.format_mean_std(runs.column(records, "digits_fid"))]
            for setting, records in results["runs"].items()]
    rows.append(["logistic regression on the pixels", f"{100 * results['pixel_logistic_regression']:.1f}", ""])
    lines.append(runs.markdown_table(["model", "test accuracy (%)", "digits-FID ↓"], rows))
    alphas = sorted({alpha for records in results["runs"].values() for record in records
                     for alpha in record.get("accuracy_by_alpha", {})}, key=float)
    if alphas:
        rows = [[setting] + [runs.format_mean_std([r["accuracy_by_alpha"][alpha] for r in records], scale=100.0)
                             for alpha in alphas]
                for setting, records in results["runs"].items() if runs.column(records, "accuracy_by_alpha")]
        lines.append("\nTest accuracy (%) against the prior scale alpha of the image latents:\n")
        lines.append(runs.markdown_table(["model"] + [f"alpha {alpha}" for alpha in alphas], rows))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    runs.command_line(NAME, __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
