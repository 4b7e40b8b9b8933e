"""The reference-checkpoint importer against the reference's own outputs (fixtures from make_reference_fixture.py).

`joint` is a checkpoint written by the reference trainer itself; `gen256` and `resnet` rebuild the reference's state
dicts from stored names, shapes and deterministic weights (tests/tools/synthetic_weights.py). After conversion our
models must reproduce the reference's outputs, with the raw and with the EMA weights, to float32 rounding.
"""

from __future__ import annotations

import collections
import copy
import gzip
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lzn_jax import checkpoint
from lzn_jax.evaluation.torch_checkpoint import read_torch_checkpoint
from lzn_jax.tools import import_reference, reference_names
from lzn_jax.tools.import_reference import ReferenceImportError
from lzn_jax.train import optim
from lzn_jax.train.state import abstract_train_state, build_modules

DATA = pathlib.Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA.parent))
import synthetic_weights

# Two float32 implementations of the same network differ by rounding that grows with the length of the sums (up to
# 3x3x512 and 2048 terms here). Measured, as max |ours - reference| / max |reference|: NCSN++ up to 1.5e-6, the
# ResNet up to 3.3e-6 (docs/design.md, "Importing the reference's checkpoints").
RTOL = 2e-5


def _fixture(name: str) -> tuple[dict, dict]:
    settings = json.loads((DATA / f"{name}.json").read_text())
    with np.load(DATA / f"{name}.npz") as arrays:
        return settings, dict(arrays)


def _config(settings: dict):
    """Our config of the fixture's setting (`:smoke`) with the fixture's tiny model sizes."""
    module = __import__(f"configs.{settings['config']}", fromlist=["get_config"])
    config = module.get_config("smoke")
    config.data.image_size = settings["image_size"]
    for name in ("encoder", "decoder"):
        for key, value in settings.get(name, {}).items():
            config.model[name][key] = tuple(value) if isinstance(value, list) else value
    if config.model.label_anchors is not None:
        config.model.label_anchors.latent_dim = settings["latent_dim"]
    return config


def _scaled_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _nhwc(images: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.transpose(images, (0, 2, 3, 1)))


def _generation_outputs(config, params: dict, arrays: dict) -> dict:
    """Our encoder's anchors, decoder's velocity (NCHW, as the reference returns it) and label-anchor table."""
    modules = build_modules(config)
    out = {"anchors": modules.encoder.apply({"params": params["encoder"]}, _nhwc(arrays["input_images"]))}
    onehot = None
    if modules.decoder.num_classes:
        onehot = jax.nn.one_hot(arrays["input_labels"], modules.decoder.num_classes)
    velocity = modules.decoder.apply({"params": params["decoder"]}, _nhwc(arrays["input_x_t"]),
                                     jnp.asarray(arrays["input_t"]), jnp.asarray(arrays["input_latent"]), onehot)
    out["velocity"] = np.transpose(np.asarray(velocity), (0, 3, 1, 2))
    if modules.label_anchors is not None:
        out["label_anchors"] = modules.label_anchors.apply({"params": params["label_anchors"]})
    return out


def _synthetic_reference(settings: dict, iteration: int = 5) -> dict:
    """The dict the reference trainer would save for the fixture's modules, rebuilt from its manifest."""
    reference = {"iteration": iteration, "epoch": 0, "optimizer": {}, "lr_scheduler": {}, "grad_scalar": {}}
    for module, manifest in settings["modules"].items():
        entries = [(name, tuple(shape)) for name, shape in manifest["state_dict"]]
        raw = synthetic_weights.synthetic_state_dict(entries, salt=settings["raw_salt"])
        shapes = dict(entries)
        shadows = synthetic_weights.synthetic_state_dict([(n, shapes[n]) for n in manifest["trainable"]],
                                                          salt=settings["ema_salt"])
        # The reference's EMA shadows follow its parameters() order; the manifest's trainable list is in that order.
        assert manifest["trainable"] == [n for n in manifest["parameter_order"] if n in set(manifest["trainable"])]
        key = import_reference.FILE_KEYS[module]
        reference[key] = collections.OrderedDict((f"model.module.{k}", v) for k, v in raw.items())
        reference[f"{key}_ema"] = {"decay": 0.9999, "num_updates": iteration, "shadow_params": list(shadows.values())}
    return reference


# ---------------------------------------------------------------------------------------------------------------
# The trainer-written checkpoint (case study 3), through the files.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    """(settings, reference arrays, config, workdir, summary) of the converted joint fixture."""
    settings, arrays = _fixture("joint")
    config = _config(settings)
    workdir = tmp_path_factory.mktemp("imported") / "run"
    summary = import_reference.import_reference(DATA / "joint.pth", config, workdir)
    return settings, arrays, config, workdir, summary


@pytest.fixture(scope="module")
def joint_state(joint):
    """The converted state restored from the workdir into the abstract state a run of the config restores."""
    _, _, config, workdir, _ = joint
    modules = build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    replicated = jax.NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), jax.P())
    abstract = abstract_train_state(config, modules, optimizer, replicated)  # what the trainer restores into
    with checkpoint.Checkpointer(workdir / "checkpoints", handle_sigterm=False) as checkpointer:
        state, data_state = checkpointer.restore(abstract)
    assert data_state is None
    return state


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_trainer_checkpoint_reproduces_the_reference_outputs(joint, joint_state, weights):
    _, arrays, config, _, _ = joint
    params = joint_state.params if weights == "raw" else joint_state.ema_params
    ours = _generation_outputs(config, params, arrays)
    for name in ("anchors", "velocity", "label_anchors"):
        error = _scaled_error(ours[name], arrays[f"{weights}_{name}"])
        assert error < RTOL, f"{weights} {name}: relative error {error:.2e}"


def test_raw_and_ema_weights_are_told_apart(joint):
    """The fixture's EMA is far from the weights, so a swap or misordered shadow would fail the parity above."""
    _, arrays, _, _, _ = joint
    for name in ("anchors", "velocity", "label_anchors"):
        assert _scaled_error(arrays[f"ema_{name}"], arrays[f"raw_{name}"]) > 100 * RTOL


def test_workdir_holds_the_reference_iteration_counts_and_config(joint, joint_state):
    settings, _, config, workdir, summary = joint
    assert int(joint_state.step) == settings["iteration"] == summary["step"]
    assert {m: int(c) for m, c in joint_state.ema_counts.items()} == {
        m: settings["ema_num_updates"] for m in ("encoder", "decoder", "label_anchors")}
    assert int(joint_state.skipped_updates) == 0
    # A fresh optimiser: zero moments and counts.
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(joint_state.opt_state))
    assert json.loads((workdir / "config.json").read_text()) == json.loads(config.to_json_best_effort())
    record = json.loads((workdir / import_reference.IMPORT_RECORD).read_text())
    assert record["step"] == settings["iteration"] and len(record["source_sha256"]) == 64
    assert sorted(p.name for p in workdir.parent.iterdir()) == ["run"]  # no staging directory left behind


def test_name_mapping_follows_the_file_order():
    """Our walk lists the reference's tensors in its state-dict order, the order of its parameters()."""
    settings, _ = _fixture("joint")
    modules = build_modules(_config(settings))
    reference = read_torch_checkpoint(DATA / "joint.pth")
    for module, key in import_reference.FILE_KEYS.items():
        leaves = reference_names.module_leaves(getattr(modules, module), settings["image_size"])
        in_file = [k.removeprefix("model.module.") for k in reference[key]]
        assert [leaf.name for leaf in leaves] == [k for k in in_file if k not in reference_names.IGNORED_BUFFERS]


@pytest.mark.parametrize("setting", ["cifar10_gen", "afhq_cat_gen", "celebahq_gen", "lsun_bedroom_gen",
                                     "imagenet_repr", "cifar10_joint"])
def test_name_mapping_of_the_full_size_paper_models(setting):
    """Every tensor name of the released settings' models, in the reference's order, and the EMA's subset of them."""
    with gzip.open(DATA / "paper_models.json.gz", "rt") as stream:
        manifests = json.load(stream)[setting]
    config = __import__(f"configs.{setting}", fromlist=["get_config"]).get_config("")
    modules = build_modules(config)
    assert set(manifests) == set(modules.present())
    for module, manifest in manifests.items():
        leaves = reference_names.module_leaves(getattr(modules, module), config.data.image_size)
        names = [name for name, _ in manifest["state_dict"] if name not in reference_names.IGNORED_BUFFERS]
        assert [leaf.name for leaf in leaves] == names
        assert [leaf.name for leaf in leaves if leaf.trainable] == manifest["trainable"]
        assert manifest["trainable"] == [n for n in manifest["parameter_order"] if n in set(manifest["trainable"])]


# ---------------------------------------------------------------------------------------------------------------
# The 256x256 layers and the ResNet, from rebuilt state dicts.
# ---------------------------------------------------------------------------------------------------------------


def _converted(name: str):
    settings, arrays = _fixture(name)
    config = _config(settings)
    state, summary = import_reference.convert(_synthetic_reference(settings), config)
    return arrays, config, state, summary


@pytest.fixture(scope="module")
def gen256():
    return _converted("gen256")


@pytest.fixture(scope="module")
def resnet():
    return _converted("resnet")


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_image256_layers_reproduce_the_reference_outputs(gen256, weights):
    """FIR resampling, input/output skips, Fourier time (not EMA-shadowed), scale_by_sigma, heads at 8x8 only."""
    arrays, config, state, _ = gen256
    params = state.params if weights == "raw" else state.ema_params
    # The frequencies have no shadow: the EMA state carries the live ones.
    np.testing.assert_array_equal(state.ema_params["decoder"]["time_fourier"]["frequencies"],
                                  state.params["decoder"]["time_fourier"]["frequencies"])
    ours = _generation_outputs(config, params, arrays)
    for name in ("anchors", "velocity"):
        error = _scaled_error(ours[name], arrays[f"{weights}_{name}"])
        assert error < RTOL, f"{weights} {name}: relative error {error:.2e}"


def test_another_ema_decay_is_reported(gen256):
    """The three 256x256 settings differ in their EMA decay only; the fixture's 0.9999 is not afhq_cat_gen's."""
    _, _, _, summary = gen256
    assert any("EMA decay is 0.9999, config.ema.decay.encoder is 0.999999" in note for note in summary["notes"])


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_resnet_reproduces_the_reference_outputs(resnet, weights):
    arrays, config, state, summary = resnet
    assert summary["step"] == 5 and int(state.ema_counts["encoder"]) == 5
    params = state.params if weights == "raw" else state.ema_params
    # Compiled whole: the ResNet's eager first call compiles every op on its own and takes several times longer.
    out = jax.jit(build_modules(config).encoder.apply)({"params": params["encoder"]}, _nhwc(arrays["input_images"]))
    for name, ours in (("anchors", out.anchors), ("features", out.features)):
        error = _scaled_error(ours, arrays[f"{weights}_{name}"])
        assert error < RTOL, f"{weights} {name}: relative error {error:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# Refusals: nothing is written, and the message names what is wrong.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def joint_reference():
    settings, _ = _fixture("joint")
    return read_torch_checkpoint(DATA / "joint.pth"), _config(settings)


def _refused(reference, config, *fragments):
    with pytest.raises(ReferenceImportError) as error:
        import_reference.convert(reference, config)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_a_missing_key_is_refused_by_name(joint_reference):
    reference, config = joint_reference
    broken = copy.copy(reference)
    broken["decoder"] = collections.OrderedDict(reference["decoder"])
    del broken["decoder"]["model.module.all_modules.4.Conv_1.weight"]
    _refused(broken, config, "missing from the file (1)", "all_modules.4.Conv_1.weight")


def test_an_unknown_key_is_refused_by_name(joint_reference):
    reference, config = joint_reference
    broken = copy.copy(reference)
    broken["encoder"] = collections.OrderedDict(reference["encoder"])
    broken["encoder"]["model.module.extra.weight"] = np.zeros(3, np.float32)
    _refused(broken, config, "in the file but not in this model (1)", "extra.weight")


def test_a_changed_shape_is_refused_with_both_shapes(joint_reference):
    reference, config = joint_reference
    broken = copy.copy(reference)
    broken["encoder"] = collections.OrderedDict(reference["encoder"])
    name = "model.module.latent_transformations.0.0.weight"
    broken["encoder"][name] = np.zeros((8, 7), np.float32)
    _refused(broken, config, "latent_transformations.0.0.weight (ours: head_0/dense_0/kernel): file (8, 7), "
                             "this config needs (8, 512)")


def test_a_config_with_other_modules_is_refused(joint_reference):
    reference, _ = joint_reference
    settings, _ = _fixture("joint")
    unconditional = dict(settings, config="cifar10_gen")
    _refused(reference, _config(unconditional), "the config has the modules encoder, decoder but the file has "
                                                "encoder, decoder, label_anchors", "configs/cifar10_joint.py")


def test_a_config_of_other_sizes_is_refused(joint_reference):
    reference, config = joint_reference
    config = copy.deepcopy(config)
    config.model.decoder.num_classes = 0  # the class-conditional decoder's first dense layer is wider
    _refused(reference, config, "all_modules.0.weight (ours: cond_dense_0/kernel)")


def test_an_ema_of_another_model_is_refused(joint_reference):
    reference, config = joint_reference
    broken = copy.copy(reference)
    broken["encoder_ema"] = dict(reference["encoder_ema"], shadow_params=reference["encoder_ema"]["shadow_params"][1:])
    _refused(broken, config, "holds 95 shadows, but the encoder has 96 trainable parameters")
    swapped = list(reference["encoder_ema"]["shadow_params"])
    swapped[0], swapped[-1] = swapped[-1], swapped[0]
    broken["encoder_ema"] = dict(reference["encoder_ema"], shadow_params=swapped)
    _refused(broken, config, "shadow 0 -> spatial_transformations.0.0.weight")


def test_unprefixed_state_dicts_and_a_missing_ema_are_taken(joint_reference, joint_state):
    """A state dict saved from the bare model converts alike; without an EMA entry the EMA starts at the weights."""
    reference, config = joint_reference
    bare = dict(reference, encoder=collections.OrderedDict(
        (k.removeprefix("model.module."), v) for k, v in reference["encoder"].items()))
    del bare["encoder_ema"]
    state, summary = import_reference.convert(bare, config)
    jax.tree.map(np.testing.assert_array_equal, state.params, joint_state.params)
    jax.tree.map(np.testing.assert_array_equal, state.ema_params["encoder"], joint_state.params["encoder"])
    assert int(state.ema_counts["encoder"]) == 0 and any("no EMA" in note for note in summary["notes"])
    mixed = dict(reference, encoder=collections.OrderedDict(bare["encoder"], **{"model.module.x": 0}))
    _refused(mixed, config, "lack the 'model.module.' prefix")


def test_a_file_that_is_not_a_trainer_checkpoint_is_refused(joint_reference, tmp_path):
    reference, config = joint_reference
    _refused(reference["encoder"], config, "does not write")  # a bare state dict
    _refused({**reference, "scheduler_extra": 1}, config, "scheduler_extra")
    with pytest.raises(ReferenceImportError, match="cannot be read"):
        (tmp_path / "bad.pth").write_bytes(b"not a torch file")
        import_reference.import_reference(tmp_path / "bad.pth", config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_occupied_workdir_is_refused_and_left_alone(joint_reference, tmp_path):
    _, config = joint_reference
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ReferenceImportError, match="not an empty directory"):
        import_reference.import_reference(DATA / "joint.pth", config, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
