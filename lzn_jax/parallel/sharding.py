"""Shard geometry of batches: which rows of a global batch each host reads, given the batch sharding.

The data pipeline asks this module; nothing else in ``data/`` knows about devices or meshes.
"""

from __future__ import annotations

import jax
import numpy as np


def _index_shape(sharding: jax.sharding.Sharding, leading: int) -> tuple[int, ...]:
    """A shape ``(leading, n, ..., n)`` of the rank ``sharding`` expects (its spec's length; 1 for others).

    ``n`` is the device count, which every shard count divides, so any split of the trailing axes is even.
    """
    rank = len(sharding.spec) if isinstance(sharding, jax.sharding.NamedSharding) else 1
    return (leading,) + (sharding.num_devices,) * max(rank - 1, 0)


def batch_shard_count(sharding: jax.sharding.Sharding) -> int:
    """Into how many distinct row blocks ``sharding`` splits the leading (batch) axis."""
    # Probed with a length every batch shard count divides: each count divides the device count.
    probe = sharding.num_devices
    blocks = {index[0].indices(probe) for index in sharding.devices_indices_map(_index_shape(sharding, probe)).values()}
    return len(blocks)


def host_rows(
    global_batch_size: int,
    sharding: jax.sharding.Sharding | None = None,
    *,
    process_index: int,
    process_count: int,
) -> np.ndarray:
    """Rows of every global batch that host ``process_index`` reads, ascending. Returns ``int64 (B_local,)``.

    Without a sharding: the contiguous block ``[p * B / P, (p + 1) * B / P)`` of ``P = process_count`` hosts.
    With one: the rows held by the devices of host ``process_index`` (``process_count`` is not needed), ascending,
    the order ``jax.make_array_from_process_local_data`` expects; a mesh whose device order interleaves hosts
    still gets each row from the host that holds it.

    Raises:
      ValueError: ``global_batch_size`` does not split evenly over the hosts or the batch shards.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if sharding is None:
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(
                f"data.batch_size={global_batch_size} must be a positive multiple of the process count "
                f"{process_count}"
            )
        local = global_batch_size // process_count
        return np.arange(process_index * local, (process_index + 1) * local, dtype=np.int64)
    num_shards = batch_shard_count(sharding)
    if global_batch_size <= 0 or global_batch_size % num_shards:
        raise ValueError(
            f"data.batch_size={global_batch_size} does not split evenly over the {num_shards} batch shards of the "
            f"sharding; use a multiple of {num_shards}"
        )
    rows = set()
    for device, index in sharding.devices_indices_map(_index_shape(sharding, global_batch_size)).items():
        if device.process_index == process_index:
            rows.update(range(*index[0].indices(global_batch_size)))
    return np.array(sorted(rows), dtype=np.int64)
