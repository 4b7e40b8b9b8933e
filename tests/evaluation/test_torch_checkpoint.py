"""The .pth reader on files written here in torch's two layouts (standard library only), and the conversion of a
whole pytorch-fid-style state dict into the Linen variables."""

import collections
import pickle
import zipfile

import jax
import numpy as np
import pytest

from lzn_jax.evaluation import inception
from lzn_jax.evaluation.inception_weights import InceptionWeightsError, load_inception, variables_from_state_dict
from lzn_jax.evaluation.torch_checkpoint import TorchCheckpointError, read_torch_checkpoint
from tests.evaluation import torch_files
from tests.evaluation.helpers import random_variables


def _mixed_state_dict():
    """Tensors of several dtypes, a scalar, a transposed view and an offset view that share one storage."""
    rng = np.random.default_rng(0)
    shared = torch_files.Storage("shared", rng.normal(size=24).astype(np.float32))
    state = collections.OrderedDict(
        weight=torch_files.tensor(rng.normal(size=(4, 3, 2, 2)).astype(np.float32), "0"),
        half=torch_files.tensor(rng.normal(size=(5,)).astype(np.float16), "1"),
        double=torch_files.tensor(rng.normal(size=(2, 3)), "2"),
        steps=torch_files.tensor(np.asarray(7, np.int64), "3"),
        mask=torch_files.tensor(np.asarray([True, False, True]), "4"),
        transposed=torch_files.Tensor(shared, 0, (4, 6), (1, 4)),  # a (6, 4) block seen column-major
        window=torch_files.Tensor(shared, 5, (2, 3), (6, 1)),
    )
    expected = {
        "weight": state["weight"].storage.data.reshape(4, 3, 2, 2),
        "half": state["half"].storage.data,
        "double": state["double"].storage.data.reshape(2, 3),
        "steps": np.asarray(7, np.int64),
        "mask": np.asarray([True, False, True]),
        "transposed": shared.data.reshape(6, 4).T,
        "window": shared.data[5:17].reshape(2, 6)[:, :3],
    }
    return state, expected


@pytest.mark.parametrize("writer", [torch_files.write_zip, torch_files.write_legacy], ids=["zip", "legacy"])
def test_reader_returns_every_tensor_with_its_dtype_shape_and_view(tmp_path, writer):
    state, expected = _mixed_state_dict()
    path = tmp_path / "state.pth"
    writer(path, state)
    assert zipfile.is_zipfile(path) == (writer is torch_files.write_zip)
    loaded = read_torch_checkpoint(path)
    assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable


def test_zip_prefix_is_found_whatever_the_archive_name(tmp_path):
    state, expected = _mixed_state_dict()
    torch_files.write_zip(tmp_path / "w.pth", state, name="pt_inception-2015-12-05")
    np.testing.assert_array_equal(read_torch_checkpoint(tmp_path / "w.pth")["window"], expected["window"])


class _Payload:
    """Unpickling this would run `touch <marker>` (harmless, and visible if the reader ever executed it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, layout):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    payload = pickle.dumps({"x": _Payload(marker)}, protocol=2)
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    else:
        with open(path, "wb") as out:
            for header in (torch_files.LEGACY_MAGIC, 1001, {"little_endian": True}):
                pickle.dump(header, out, protocol=2)
            out.write(payload)
    with pytest.raises(TorchCheckpointError, match="system"):
        read_torch_checkpoint(path)
    assert not marker.exists()


def test_a_view_past_its_storage_is_refused(tmp_path):
    storage = torch_files.Storage("0", np.zeros(6, np.float32))
    torch_files.write_zip(tmp_path / "bad.pth", {"x": torch_files.Tensor(storage, 2, (3, 2), (2, 1))})
    with pytest.raises(TorchCheckpointError, match="exceeds its storage"):
        read_torch_checkpoint(tmp_path / "bad.pth")


def test_a_file_that_is_not_a_torch_file_is_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(TorchCheckpointError):
        read_torch_checkpoint(tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def variables():
    return random_variables(inception.abstract_variables(inception.MIN_INPUT_SIZE), seed=11)


def test_whole_state_dict_round_trips_into_the_linen_variables(tmp_path, variables):
    """OIHW -> HWIO, fc (out, in) -> (in, out), running statistics -> batch_stats, num_batches_tracked dropped."""
    path = tmp_path / "fid_inception.pth"
    torch_files.write_zip(path, torch_files.torch_state_dict(variables))
    loaded, digest = load_inception(path)
    assert len(digest) == 64
    flat_expected = jax.tree_util.tree_leaves_with_path(variables)
    flat_loaded = dict(jax.tree_util.tree_leaves_with_path(loaded))
    assert len(flat_loaded) == len(flat_expected)
    for key, value in flat_expected:
        assert flat_loaded[key].dtype == np.float32
        np.testing.assert_array_equal(flat_loaded[key], value)


def test_state_dicts_that_do_not_fit_are_refused_with_the_leaves_named(variables):
    state = {k: np.asarray(t.storage.data).reshape(t.shape) for k, t in torch_files.torch_state_dict(variables).items()}
    missing = dict(state)
    del missing["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(InceptionWeightsError, match="missing batch_stats/Mixed_6d/branch1x1/bn/var"):
        variables_from_state_dict(missing)
    wrong = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32), "fc.bias": np.zeros(1000, np.float32)})
    with pytest.raises(InceptionWeightsError, match="params/fc/kernel: shape"):
        variables_from_state_dict(wrong)
    torchvision_like = dict(state, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(InceptionWeightsError, match="unexpected tensor AuxLogits.fc.weight"):
        variables_from_state_dict(torchvision_like)
