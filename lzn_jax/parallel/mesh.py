"""The project's device mesh: by default one ``("data",)`` axis over every device of every host, Auto axes."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(num_devices: int | None = None, *, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over ``num_devices`` (default: all devices of all processes) with an Auto axis.

    Raises:
      ValueError: more devices asked for than exist.
    """
    available = jax.device_count()
    num_devices = available if num_devices is None else num_devices
    if not 1 <= num_devices <= available:
        raise ValueError(f"asked for a mesh of {num_devices} devices, but {available} exist")
    return jax.make_mesh((num_devices,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:num_devices])


def batch_sharding(mesh: Mesh, axis_name: str = "data") -> NamedSharding:
    """Rows of a batch split over ``axis_name``; every other dimension replicated."""
    return NamedSharding(mesh, PartitionSpec(axis_name))
