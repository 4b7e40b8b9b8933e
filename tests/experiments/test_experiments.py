"""Every experiment of docs/results.md runs its smoke variant end to end (tiny configs, one seed), and the shared
helpers of lzn_jax.experiments.runs."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from lzn_jax.experiments import runs
from tests import background

REPO = pathlib.Path(__file__).resolve().parents[2]
# One device and XLA's fastest compile: the smoke runs check wiring, and compiling dominates them.
ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0", "TF_CPP_MIN_LOG_LEVEL": "2",
       "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _smoke(name: str, out: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    """``python -m lzn_jax.experiments.NAME --smoke`` into ``out``, from a directory other than the repository (the
    command must not depend on the working directory)."""
    # One compilation cache for all of them: programs they share (the joint and classification-only models'
    # classifier) compile once, and nothing is written under the home directory.
    cache = background.directory("experiment_compilation_cache")
    env = {**os.environ, **ENV, "LZN_COMPILATION_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", f"lzn_jax.experiments.{name}", "--smoke", f"--out={out / name}", *flags]
    return background.run(command, cwd=out, env=env, timeout=2400)


def _joint_then_zones(out: pathlib.Path) -> dict[str, tuple[pathlib.Path, subprocess.CompletedProcess]]:
    joint = _smoke("joint", out)
    # The zones figures read the joint experiment's model (it is not trained twice).
    zones = _smoke("zones", out, f"--models={out / 'joint'}") if joint.returncode == 0 else joint
    return {"joint": (out / "joint", joint), "zones": (out / "zones", zones)}


def _one(name: str):
    return lambda out: {name: (out / name, _smoke(name, out))}


# Each experiment's smoke run is a background job (tests/background.py): they run beside the in-process tests.
# The joint experiment and the zones figures drawn from its model are the longest chain, so they start first.
# {job: (the experiments it runs, its body, its priority)}
JOBS = {"experiment_joint": (("joint", "zones"), _joint_then_zones, 0),
        "experiment_generation": (("generation",), _one("generation"), 4),
        "experiment_representation": (("representation",), _one("representation"), 6)}
for _job, (_, _body, _priority) in JOBS.items():
    background.register(_job, ("smoke_runs",), _body, priority=_priority)


class SmokeRuns:
    """``smoke_runs[name]`` -> ``(out, CompletedProcess)`` of one experiment's smoke run, once its job is done."""

    def __getitem__(self, name: str) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
        (job,) = [job for job, (names, _, _) in JOBS.items() if name in names]
        return background.wait(job)[name]


@pytest.fixture(scope="session")
def smoke_runs() -> SmokeRuns:
    return SmokeRuns()


def smoke_results(smoke_runs, name: str) -> tuple[pathlib.Path, dict, dict[str, dict]]:
    """``(out, results.json, {setting: its one record})`` of a smoke run that succeeded, every float in it finite."""
    out, process = smoke_runs[name]
    assert process.returncode == 0, process.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] is True and results["seeds"] == [0]
    records = {}
    for setting, per_seed in results["runs"].items():
        (records[setting],) = per_seed
        numbers = [value for value in records[setting].values() if isinstance(value, float)]
        assert all(math.isfinite(value) for value in numbers), records[setting]
    return out, results, records


@pytest.mark.slow
def test_generation_experiment_smoke_writes_its_numbers_and_grids(smoke_runs):
    out, results, records = smoke_results(smoke_runs, "generation")
    assert sorted(records) == ["RF", "RF+LZN"]
    for setting, record in records.items():
        assert record["steps"] == 2, setting
        assert record["digits_fid"] > 0.0 and 0.0 <= record["precision"] <= 1.0 and 0.0 <= record["recall"] <= 1.0
        assert record["reconstruction"] > 0.0
        assert (out / f"samples_{setting.lower().replace('+', '_')}.png").stat().st_size > 0
    assert results["real_test_digits_fid"] == results["digits_fid_sanity"]["real_test"] >= 0.0
    assert results["real_test_images"] == 359
    table = (out / "results.md").read_text()
    assert "| RF+LZN |" in table and "| RF |" in table


@pytest.mark.slow
def test_joint_experiment_smoke_writes_every_model_and_baseline(smoke_runs):
    out, results, records = smoke_results(smoke_runs, "joint")
    assert sorted(records) == sorted(["RF+LZN (joint)", "RF (class-conditional)", "LZN, classification only",
                                      "cross-entropy"])
    for setting, record in records.items():
        assert record["steps"] == 2, setting
        if setting != "RF (class-conditional)":
            assert 0.0 <= record["accuracy"] <= 1.0
        if "LZN" in setting:
            assert sorted(record["accuracy_by_alpha"]) == ["0.0", "1.0"]
            assert record["accuracy"] == record["accuracy_by_alpha"]["1.0"]
        if setting.startswith("RF"):
            assert record["digits_fid"] > 0.0
    # The floor is a real, deterministic number: logistic regression on the pixels classifies most test digits.
    assert results["pixel_logistic_regression"] > 0.9
    table = (out / "results.md").read_text()
    assert "| cross-entropy |" in table and "alpha 0.0" in table


@pytest.mark.slow
def test_representation_experiment_smoke_probes_every_kind_of_features(smoke_runs):
    out, results, records = smoke_results(smoke_runs, "representation")
    assert sorted(records) == ["LZN", "SimCLR-style", "random init"]
    assert sorted(results["fixed"]) == ["PCA (16)", "raw pixels"]
    for setting, record in records.items():
        assert 0.0 <= record["knn_accuracy"] <= 1.0 and 0.0 <= record["linear_accuracy"] <= 1.0
        if setting != "random init":
            assert record["steps"] == 2, setting
    # Deterministic baselines with real numbers: pixels and their PCA separate most digits.
    assert all(scores["knn_accuracy"] > 0.85 and scores["linear_accuracy"] > 0.85
               for scores in results["fixed"].values()), results["fixed"]
    assert "| SimCLR-style |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_zones_smoke_draws_its_figures_from_the_joint_model(smoke_runs):
    out, results, records = smoke_results(smoke_runs, "zones")
    assert "finished earlier" in smoke_runs["zones"][1].stdout  # the joint experiment's run, reused
    (record,) = records.values()
    assert sorted(record["by_batch_size"]["1.0"]) == ["16", "359"]
    assert sorted(record["by_steps"]) == ["label_euler_steps", "latent_dpm_solver_steps"]
    assert 0.0 <= record["inductive"]["1.0"] <= 1.0
    for figure in ("zones.png", "accuracy_vs_batch_size.png", "accuracy_vs_solver_steps.png"):
        assert (out / figure).stat().st_size > 0, figure
    assert "inductive (B = 64)" in (out / "results.md").read_text()


def test_nt_xent_equals_a_float64_loop():
    import numpy as np

    from lzn_jax.experiments import representation

    rng = np.random.default_rng(0)
    batch, temperature = 6, 0.2
    a, b = rng.normal(size=(batch, 3)), rng.normal(size=(batch, 3))
    rows = np.concatenate([a, b])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    total = 0.0
    for i in range(2 * batch):
        positive = (i + batch) % (2 * batch)  # the other view of the same image
        others = np.array([rows[i] @ rows[j] / temperature for j in range(2 * batch) if j != i])
        total -= rows[i] @ rows[positive] / temperature - np.log(np.sum(np.exp(others)))
    got = float(representation.nt_xent_loss(a.astype(np.float32), b.astype(np.float32), temperature))
    np.testing.assert_allclose(got, total / (2 * batch), rtol=1e-5)


def test_a_finished_run_is_reused_and_an_unfinished_one_is_not(tmp_path, monkeypatch):
    finished = {"step": 1200, "last_step": 1200, "finished": True, "stopped_early": False, "seconds": 400.0}
    (tmp_path / "summary.json").write_text(json.dumps(finished))
    from lzn_jax.train import loop

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "train", must_not_train)
    config = runs.load_config("digits_gen", ("rf",))
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")  # as loop.train writes it
    assert runs.train(config, tmp_path) == finished
    (tmp_path / "summary.json").write_text(json.dumps({**finished, "step": 600, "finished": False,
                                                       "stopped_early": True}))
    with pytest.raises(AssertionError, match="trained again"):
        runs.train(config, tmp_path)
    # A workdir of another config is neither reused nor resumed.
    with pytest.raises(ValueError, match="holds a run of another config"):
        runs.train(runs.seeded(config, 1), tmp_path)


def test_a_run_stopped_before_its_end_is_not_evaluated(tmp_path):
    done = {"step": 800, "last_step": 800, "finished": True, "stopped_early": False}
    assert runs.require_finished(done, tmp_path) == done
    # What loop.train returns after a SIGTERM at step 512: the experiment must stop, not probe a half-trained model.
    for stopped in ({**done, "step": 512, "finished": False, "stopped_early": True},
                    {**done, "stopped_early": True}):
        with pytest.raises(RuntimeError, match="step .* of 800 before its end.*rerun the same command"):
            runs.require_finished(stopped, tmp_path)


def test_a_table_made_mid_run_names_only_the_seeds_it_has():
    results = {"seeds": [0, 1, 2], "runs": {"LZN": [{"seed": 0}, {"seed": 1}], "baseline": [{"seed": 0}]}}
    assert runs.seeds_reported(results) == "0, 1"


def test_mean_std_and_its_format():
    assert runs.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert runs.mean_std([4.0]) == (4.0, 0.0)
    assert runs.format_mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert runs.format_mean_std([0.01234, 0.01238]) == "0.0124 ± 0.0000"
    assert runs.format_mean_std([123.4, 125.6], digits=3) == "124 ± 2"
    assert runs.format_mean_std([0.5]) == "0.500"
    assert runs.format_mean_std([]) == "n/a"
    assert runs.format_mean_std([float("nan"), 1.0]) == "nan"


def test_seeds_flag_is_parsed_and_bad_values_are_refused(capsys):
    assert runs.parse_args("x", "", ["--seeds=3,4"]).seeds == (3, 4)
    assert runs.parse_args("x", "", []).seeds == runs.DEFAULT_SEEDS
    smoke = runs.parse_args("x", "", ["--smoke"])
    assert smoke.seeds == (0,) and smoke.out.name == "x_smoke"  # never the full run's folder
    assert runs.parse_args("x", "", []).out.name == "x"
    for bad in ("1,a", "1,1", ""):
        with pytest.raises(SystemExit):
            runs.parse_args("x", "", [f"--seeds={bad}"])
        assert "--seeds" in capsys.readouterr().err


def test_seeded_copies_the_config_and_sets_both_seeds():
    config = runs.load_config("digits_gen", ("rf",))
    copy = runs.seeded(config, 7)
    assert (copy.seed, copy.data.seed) == (7, 7)
    assert (config.seed, config.data.seed) == (0, 0)
    assert copy.model.encoder is None and copy.to_dict() == {**config.to_dict(), "seed": 7,
                                                            "data": {**config.data.to_dict(), "seed": 7}}
