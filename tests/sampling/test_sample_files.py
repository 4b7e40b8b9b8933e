"""Per-host uint8 sample files: what each process writes, the reassembly in global order, and the refusals."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lzn_jax import parallel, sampling
from lzn_jax.sampling import SampleSetError
from lzn_jax.sampling.sample_files import part_paths


def float_images(count=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (count, 3, 2, 1)).astype(np.float32)


def test_sharded_set_round_trips_in_global_order(tmp_path):
    images = float_images()
    rows = parallel.batch_sharding(parallel.data_mesh(8))
    sampling.write_samples(tmp_path, jax.device_put(images, rows))
    np.testing.assert_array_equal(sampling.read_samples(tmp_path), sampling.to_uint8(images))
    index = json.loads(part_paths(tmp_path, "samples", 0)[1].read_text())
    assert index["row_ranges"] == [[0, 16]] and index["process_count"] == 1
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary files left


def test_rows_replicated_over_another_mesh_axis_are_written_once(tmp_path):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    images = sampling.to_uint8(float_images())
    array = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    rows, values = sampling.local_rows(array)
    np.testing.assert_array_equal(rows, np.arange(16))
    np.testing.assert_array_equal(values, images)
    sampling.write_samples(tmp_path, array, name="grid")
    np.testing.assert_array_equal(sampling.read_samples(tmp_path, name="grid"), images)


def test_an_array_split_along_another_axis_is_refused():
    mesh = parallel.data_mesh(8)
    array = jax.device_put(np.zeros((2, 8, 2, 1), np.uint8), NamedSharding(mesh, PartitionSpec(None, "data")))
    with pytest.raises(ValueError, match="other than the rows"):
        sampling.local_rows(array)


def write_three_processes(directory, images, *, name="samples"):
    """Parts of 3 processes holding interleaved blocks of rows, as a mesh whose device order mixes hosts would."""
    blocks = np.arange(len(images)).reshape(-1, 2)  # row pairs, dealt round-robin to the processes
    for process in range(3):
        rows = blocks[process::3].ravel()
        sampling.write_sample_part(directory, rows, images[rows], total_rows=len(images), name=name,
                                   process_index=process, process_count=3)


def test_parts_of_several_processes_reassemble_in_global_order(tmp_path):
    images = float_images(count=18)
    write_three_processes(tmp_path, images)
    np.testing.assert_array_equal(sampling.read_samples(tmp_path), sampling.to_uint8(images))


def test_a_missing_part_is_refused(tmp_path):
    write_three_processes(tmp_path, float_images(count=18))
    part_paths(tmp_path, "samples", 1)[1].unlink()
    with pytest.raises(SampleSetError, match=r"written by 3 processes but the parts of processes \[1\] are missing"):
        sampling.read_samples(tmp_path)


def test_rows_in_no_part_are_refused(tmp_path):
    images = float_images(count=8)
    sampling.write_sample_part(tmp_path, np.array([0, 1, 2, 5]), images[[0, 1, 2, 5]], total_rows=8,
                               process_index=0, process_count=1)
    with pytest.raises(SampleSetError, match=r"incomplete: 4 rows \(3-4, 6-7\) of 8"):
        sampling.read_samples(tmp_path)


def test_overlapping_parts_are_refused(tmp_path):
    images = float_images(count=8)
    for process, rows in enumerate((np.arange(0, 5), np.arange(3, 8))):
        sampling.write_sample_part(tmp_path, rows, images[rows], total_rows=8, process_index=process,
                                   process_count=2)
    with pytest.raises(SampleSetError, match=r"overlap: 2 rows \(3-4\)"):
        sampling.read_samples(tmp_path)


def test_parts_of_different_runs_are_refused(tmp_path):
    write_three_processes(tmp_path, float_images(count=18))
    # A later run on 2 processes wrote over parts 0 and 1; part 2 is stale.
    images = float_images(count=18, seed=1)
    for process in range(2):
        rows = np.arange(9 * process, 9 * process + 9)
        sampling.write_sample_part(tmp_path, rows, images[rows], total_rows=18, process_index=process,
                                   process_count=2)
    with pytest.raises(SampleSetError, match="disagree on process_count.*different runs"):
        sampling.read_samples(tmp_path)


def test_a_part_that_disagrees_with_its_index_is_refused(tmp_path):
    images = float_images(count=8)
    sampling.write_sample_part(tmp_path, np.arange(8), images, total_rows=8, process_index=0, process_count=1)
    np.save(part_paths(tmp_path, "samples", 0)[0], sampling.to_uint8(images[:6]))
    with pytest.raises(SampleSetError, match=r"holds uint8 \(6, 3, 2, 1\) but its index"):
        sampling.read_samples(tmp_path)


def test_nothing_to_read_and_non_finite_images_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no part of sample set 'samples'"):
        sampling.read_samples(tmp_path)
    images = float_images(count=4)
    images[2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sampling.write_sample_part(tmp_path, np.arange(4), images, total_rows=4)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="distinct"):
        sampling.write_sample_part(tmp_path, np.array([0, 0]), images[:2], total_rows=4)
