"""Experiment 1 of docs/results.md: LZN improves a generative model without changing its objective.

    python -m lzn_jax.experiments.generation                     # 2 settings x 3 seeds, then the table
    python -m lzn_jax.experiments.generation --smoke --out=/tmp/gen_smoke

Rectified Flow (``configs/digits_gen.py:rf``) against RF+LZN (``configs/digits_gen.py``) on the embedded digits:
the same NCSN++ decoder, data, optimiser, EMA and number of steps; the only difference is the latent that LZN's
encoder and zoning solver feed the decoder. Per seed (weights, training draws and data order all follow it):

* digits-FID of 1,000 unconditional samples (Euler, ``SAMPLE_STEPS`` steps, EMA weights) against the training
  split, in the feature space of a small digits classifier trained once and frozen
  (:mod:`lzn_jax.evaluation.digits_fid`), with improved precision and recall in the same space;
* the reconstruction error of docs/evaluation.md: 128 training digits inverted to noise and regenerated (Euler 10
  steps both ways, 20 prior draws for LZN; the baseline has no latent, so no draw), mean per-image L2 in [-1, 1]
  units.

The real test digits against the training split give the floor of digits-FID. Outputs in ``--out``: one workdir
per run, ``results.json`` (per-seed numbers), ``results.md`` (mean ± std over seeds) and ``samples_<setting>.png``
(seed 0's samples).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from lzn_jax import api, parallel, sampling
from lzn_jax.data.digits import load_digits_split
from lzn_jax.evaluation import digits_fid, metrics
from lzn_jax.experiments import runs

NAME = "generation"
CONFIG = "digits_gen"
SETTINGS = {"RF": ("rf",), "RF+LZN": ()}  # name -> variants of configs/digits_gen.py
NUM_SAMPLES = 1000
SAMPLE_STEPS = 50
GRID_IMAGES = 100


def split_images(split: str) -> np.ndarray:
    """The real digits of ``split``, uint8 (N, 16, 16, 1)."""
    return load_digits_split(split)[0]


def classifier_for(out: pathlib.Path, *, smoke: bool) -> digits_fid.FrozenClassifier:
    """The feature network of every digits-FID in this experiment: trained once, saved in ``out`` and reused, so
    that all runs (and reruns) are measured in the same space."""
    steps = 50 if smoke else 250
    path = out / f"digits_classifier_{steps}steps.msgpack"
    if path.exists():
        return digits_fid.load_classifier(path)
    classifier = digits_fid.train_classifier(seed=0, steps=steps)
    digits_fid.save_classifier(classifier, path)
    return classifier


class FeatureSpace(NamedTuple):
    """Where generated digits are measured: the frozen classifier, and its features (N, 64) of the training split
    with their mean and covariance (the digits-FID reference)."""

    classifier: digits_fid.FrozenClassifier
    real_features: np.ndarray
    reference: tuple[np.ndarray, np.ndarray]


def feature_space(out: pathlib.Path, *, smoke: bool) -> FeatureSpace:
    """:func:`classifier_for` and the training split's features, computed once for every model measured."""
    classifier = classifier_for(out, smoke=smoke)
    real_features = digits_fid.features(classifier, split_images("train"))
    return FeatureSpace(classifier, real_features, metrics.feature_statistics(real_features))


def sample_quality(model: api.Model, space: FeatureSpace, *, seed: int, count: int,
                   steps: int) -> tuple[dict[str, float], np.ndarray]:
    """digits-FID, precision and recall of ``count`` samples of ``model`` (and the samples, uint8 (count, H, W, 1))."""
    from lzn_jax.train import evaluate  # the trainer's evaluation helpers import TensorFlow (clu)

    mesh = parallel.data_mesh(model.config.num_devices)
    options = sampling.SamplerOptions(sampler="euler", num_steps=steps,
                                      time_eps=float(model.config.generation.rf_time_eps))
    with jax.set_mesh(mesh):
        images = evaluate.generated_uint8(model.config, model.modules, model.params, jax.random.key(seed), mesh,
                                          count, options)[..., :1]  # gray digits come back as three equal channels
    fake_features = digits_fid.features(space.classifier, images)
    precision, recall = metrics.precision_recall(space.real_features, fake_features)
    fid = digits_fid.fid_of_features(fake_features, space.reference)
    return {"digits_fid": fid, "precision": precision, "recall": recall}, images


def reconstruction_error(model: api.Model, *, seed: int) -> float:
    """The reconstruction error of ``config.eval`` (Euler 10, 20 draws, the first 128 training digits)."""
    from lzn_jax.train import evaluate

    mesh = parallel.data_mesh(model.config.num_devices)
    with jax.set_mesh(mesh):
        results = evaluate.reconstruction_metrics(model.config, model.modules, model.params, jax.random.key(seed),
                                                  mesh, weights="EMA")
    return float(results["reconstruction_euler"].value)


def run(out: pathlib.Path, seeds: Sequence[int], *, smoke: bool = False) -> dict:
    space = feature_space(out, smoke=smoke)
    sanity = digits_fid.sanity_check(space.classifier, space.reference)  # real test digits, blurred or noised ones
    count, steps = (64, 4) if smoke else (NUM_SAMPLES, SAMPLE_STEPS)
    results = {"experiment": NAME, "config": f"configs/{CONFIG}.py", "smoke": smoke, "seeds": list(seeds),
               "num_samples": count, "sample_steps": steps, "classifier_test_accuracy": space.classifier.test_accuracy,
               "real_test_digits_fid": sanity["real_test"], "real_test_images": len(split_images("test")),
               "digits_fid_sanity": sanity, "runs": {}}
    for setting, variants in SETTINGS.items():
        per_seed = results["runs"][setting] = []
        for seed in seeds:
            config = runs.seeded(runs.load_config(CONFIG, variants, smoke=smoke), seed)
            if smoke:
                config.eval.reconstruction_num_images = 8
                config.eval.reconstruction_draws = 2
            workdir = out / f"{setting.lower().replace('+', '_')}_seed{seed}"
            summary = runs.train(config, workdir)
            model = api.load(workdir)
            quality, images = sample_quality(model, space, seed=seed, count=count, steps=steps)
            record = {"seed": seed, "workdir": str(workdir), "train_seconds": summary.get("seconds"),
                      "steps": summary.get("step"), "rf_loss": summary.get("train/rf_loss"), **quality,
                      "reconstruction": reconstruction_error(model, seed=seed)}
            per_seed.append(record)
            print(f"{setting} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                       if isinstance(v, float)), flush=True)
            if seed == seeds[0]:
                sampling.write_grid(out / f"samples_{setting.lower().replace('+', '_')}.png",
                                    images[:GRID_IMAGES], columns=10)
            runs.write_outputs(out, results, table(results))  # after every run: a long run shows its progress
    return results


def table(results: dict) -> str:
    header = ["setting", "digits-FID ↓", "precision ↑", "recall ↑", "reconstruction L2 ↓"]
    rows = [[setting] + [runs.format_mean_std(runs.column(records, key))
                         for key in ("digits_fid", "precision", "recall", "reconstruction")]
            for setting, records in results["runs"].items()]
    seeds = runs.seeds_reported(results)
    return (f"Experiment 1 (configs/{CONFIG}.py, seeds {seeds}; mean ± std over seeds): {results['num_samples']} "
            f"samples, Euler {results['sample_steps']} steps, EMA weights.\n\n" + runs.markdown_table(header, rows)
            + f"\nReal test digits against the training split: digits-FID {results['real_test_digits_fid']:.3g} "
            f"({results['real_test_images']} images, so not comparable with the {results['num_samples']}-sample "
            "numbers above: the estimate is biased upwards at small counts).\n")


def main(argv: Sequence[str] | None = None) -> None:
    runs.command_line(NAME, __doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    main()
