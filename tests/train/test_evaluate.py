"""``--mode=eval`` (lzn_jax/train/evaluate.py) on real checkpoints of the tiny configs: it computes what
``config.eval`` asks for, writes the JSON and PNG outputs, agrees with the end-of-training accuracy on the same keys,
and refuses a missing Inception weights file before doing any work."""

import json
import time

import jax
import pytest

from lzn_jax import checkpoint, parallel
from lzn_jax.evaluation import end_of_training
from lzn_jax.evaluation.inception_weights import InceptionWeightsError
from lzn_jax.train import evaluate, optim
from lzn_jax.train.state import build_modules, init_state
from tests.train import tiny


def _checkpointed(config, workdir):
    """A real step-0 checkpoint of ``config`` in ``workdir`` (fresh weights; the EMA differs from the params so
    that choosing between them is visible)."""
    modules = build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    state = init_state(config, modules, optimizer, jax.random.key(5))
    state = state.replace(ema_params=jax.tree.map(lambda x: x * 0.5, state.ema_params))
    with checkpoint.Checkpointer(workdir / "checkpoints", handle_sigterm=False, async_save=False) as ckpt:
        assert ckpt.save(0, state, force=True)
    return modules, state


def test_eval_of_a_joint_model_writes_every_asked_metric_with_its_protocol(tmp_path):
    config = tiny.joint()
    config.train.accuracy_batch_size = 96
    config.eval.reconstruction_num_images = 8
    config.eval.reconstruction_draws = 2
    config.eval.euler_steps = 2
    config.eval.accuracy_prior_scales = (0.0, 1.0)
    modules, state = _checkpointed(config, tmp_path)

    values = evaluate.evaluate(config, tmp_path)

    written = json.loads((tmp_path / "eval_0000000.json").read_text())
    assert set(written["metrics"]) == set(values) == {
        "reconstruction_euler", "test_accuracy_0.0", "test_accuracy_1.0", "test_accuracy_0.0_with_class_weights",
        "test_accuracy_1.0_with_class_weights"}
    assert written["metrics"]["reconstruction_euler"]["protocol"]["draws"] == 2
    assert written["metrics"]["test_accuracy_1.0"]["protocol"]["batch_size"] == 96
    assert all(written["metrics"][name]["protocol"]["weights"] == "EMA" for name in written["metrics"])
    assert values["reconstruction_euler"] > 0
    assert (tmp_path / "eval_samples_latest.png").exists()
    # The sweep at alpha 1 with uniform weights is the end-of-training accuracy: same batches, keys and params.
    mesh = parallel.data_mesh(1)
    with jax.set_mesh(mesh):
        expected = end_of_training.classification_accuracy(config, modules, state.ema_params, state.rng, mesh)
    assert values["test_accuracy_1.0"] == expected["eval/accuracy"]


def test_eval_with_fid_and_no_weights_file_fails_at_once_and_writes_nothing(tmp_path):
    config = tiny.joint()
    config.eval.fid_num_samples = 16
    config.eval.inception_weights = str(tmp_path / "absent" / "pt_inception-2015-12-05-6726825d.pth")
    _checkpointed(config, tmp_path)
    start = time.perf_counter()
    with pytest.raises(InceptionWeightsError, match="pt_inception"):
        evaluate.evaluate(config, tmp_path)
    assert time.perf_counter() - start < 30
    assert not list(tmp_path.glob("eval_*"))


def test_eval_of_a_representation_model_runs_the_probes(tmp_path):
    config = tiny.contrastive()
    config.data.batch_size = 64
    config.eval.linear_probe_epochs = 2
    config.eval.linear_probe_batch_size = 256
    config.eval.linear_probe_augment = True  # one augmented view per training image and epoch
    _checkpointed(config, tmp_path)
    values = evaluate.evaluate(config, tmp_path)
    assert set(values) == {"knn_accuracy", "ridge_accuracy", "linear_probe_top1", "linear_probe_top5"}
    assert all(0.0 <= value <= 1.0 for value in values.values())
    assert values["linear_probe_top5"] >= values["linear_probe_top1"]
    assert (tmp_path / "linear_probe.png").exists()
    written = json.loads(next(tmp_path.glob("eval_*.json")).read_text())
    assert "re-extracted every epoch" in json.dumps(written)


def test_eval_of_an_empty_workdir_says_to_train_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate.evaluate(tiny.joint(), tmp_path)


def test_generated_images_for_fid_are_distinct_uint8_rgb(tmp_path):
    """The FID path's sampler (the Inception network itself is tested in tests/evaluation): ``count`` images over
    several batches (each batch its own draw), gray digits repeated to RGB."""
    config = tiny.joint()
    config.eval.fid_batch_size = 4
    config.eval.euler_steps = 2
    modules, state = _checkpointed(config, tmp_path)
    mesh = parallel.data_mesh(1)
    options = evaluate.sampler_options(config, "euler")
    with jax.set_mesh(mesh):
        images = evaluate.generated_uint8(config, modules, state.ema_params, state.rng, mesh, 6, options)
    assert images.shape == (6, 8, 8, 3) and images.dtype == "uint8"
    assert (images[..., 0] == images[..., 2]).all()
    assert len({images[i].tobytes() for i in range(6)}) == 6
