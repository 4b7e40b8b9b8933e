"""Shard geometry: which rows of a global batch each host reads, with and without a device sharding."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from lzn_jax.parallel import sharding as shard_geometry


def _mesh(shape, names, order=None):
    devices = np.array(jax.devices())
    devices = devices if order is None else devices[list(order)]
    return jax.sharding.Mesh(devices.reshape(shape), names)


@pytest.mark.parametrize("process_count", [1, 2, 3, 4])
def test_without_a_sharding_hosts_read_contiguous_disjoint_blocks_that_cover_the_batch(process_count):
    rows = [
        shard_geometry.host_rows(12, process_index=p, process_count=process_count) for p in range(process_count)
    ]
    assert all(r.dtype == np.int64 and len(r) == 12 // process_count for r in rows)
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(12))  # in host order: no gap, no overlap


@pytest.mark.parametrize("order", [None, (3, 0, 7, 1, 6, 2, 5, 4)], ids=["in_order", "permuted"])
def test_the_only_host_reads_every_row_of_a_sharded_batch(order):
    sharding = NamedSharding(_mesh((8,), ("data",), order), PartitionSpec("data"))
    np.testing.assert_array_equal(shard_geometry.host_rows(16, sharding, process_index=0, process_count=1),
                                  np.arange(16))


def test_a_host_without_devices_in_the_sharding_reads_nothing():
    sharding = NamedSharding(_mesh((8,), ("data",)), PartitionSpec("data"))
    assert len(shard_geometry.host_rows(16, sharding, process_index=1, process_count=2)) == 0


@pytest.mark.parametrize(
    "spec, shards",
    [(PartitionSpec("data"), 4), (PartitionSpec(("data", "model")), 8), (PartitionSpec("model"), 2),
     (PartitionSpec(None, "data"), 1), (PartitionSpec("data", None, None, None), 4)],
)
def test_batch_shard_count_counts_distinct_row_blocks(spec, shards):
    sharding = NamedSharding(_mesh((4, 2), ("data", "model")), spec)
    assert shard_geometry.batch_shard_count(sharding) == shards
    # Every row is held by some device, whatever the replication over the other mesh axis.
    np.testing.assert_array_equal(shard_geometry.host_rows(8 * shards, sharding, process_index=0, process_count=1),
                                  np.arange(8 * shards))


def test_uneven_batches_are_refused_with_the_multiple_to_use():
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        shard_geometry.host_rows(10, process_index=0, process_count=3)
    sharding = NamedSharding(_mesh((8,), ("data",)), PartitionSpec("data"))
    with pytest.raises(ValueError, match="8 batch shards of the sharding; use a multiple of 8"):
        shard_geometry.host_rows(12, sharding, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
        shard_geometry.host_rows(12, process_index=2, process_count=2)
