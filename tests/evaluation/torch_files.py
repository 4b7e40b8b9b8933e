"""Writes files in torch.save's two layouts with the standard library only (this venv has no torch), for tests.

The pickles name `torch._utils._rebuild_tensor_v2`, `torch.<Type>Storage` and `collections.OrderedDict` exactly as
torch's own files do; stand-in modules exist in sys.modules only while pickling.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import struct
import sys
import types
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class Storage:
    """A flat storage: `data` (numel,) with a key."""

    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, np.ascontiguousarray(data).reshape(-1)


class Tensor:
    """A strided view (offset, shape, stride in elements) into a Storage; pickles like a torch tensor."""

    rebuild = None  # set while the stand-in torch modules exist

    def __init__(self, storage: Storage, offset: int, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def __reduce_ex__(self, protocol):
        return (Tensor.rebuild, (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


def tensor(array: np.ndarray, key: str) -> Tensor:
    """A contiguous tensor with its own storage."""
    array = np.require(array, requirements="C")  # (ascontiguousarray would turn a scalar into shape (1,))
    strides = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()
    return Tensor(Storage(key, array), 0, array.shape, strides)


@contextlib.contextmanager
def _stand_in_torch():
    torch_module, utils_module = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError("stand-in")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in set(STORAGE_NAMES.values()):
        setattr(torch_module, name, type(name, (), {"__module__": "torch", "__qualname__": name}))
    torch_module._utils = utils_module
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch_module, utils_module
    Tensor.rebuild = _rebuild_tensor_v2
    try:
        yield torch_module
    finally:
        Tensor.rebuild = None
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _pickle(obj, torch_module, legacy: bool) -> tuple[bytes, dict[str, Storage]]:
    storages: dict[str, Storage] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, value):
            if not isinstance(value, Storage):
                return None
            storages[value.key] = value
            storage_type = getattr(torch_module, STORAGE_NAMES[value.data.dtype])
            base = ("storage", storage_type, value.key, "cpu", value.data.size)
            return base + (None,) if legacy else base

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue(), storages


def write_zip(path, obj, *, name: str = "archive") -> None:
    """torch >= 1.6 layout: <name>/data.pkl, <name>/data/<key> raw little-endian bytes, <name>/version, byteorder."""
    with _stand_in_torch() as torch_module:
        data, storages = _pickle(obj, torch_module, legacy=False)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{name}/data.pkl", data)
        archive.writestr(f"{name}/byteorder", "little")
        for key, storage in storages.items():
            archive.writestr(f"{name}/data/{key}", storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())
        archive.writestr(f"{name}/version", "3\n")


def write_legacy(path, obj) -> None:
    """Pre-1.6 layout: magic, protocol 1001, sys_info, the object, sorted storage keys, then (numel, bytes) each."""
    with _stand_in_torch() as torch_module:
        data, storages = _pickle(obj, torch_module, legacy=True)
    with open(path, "wb") as out:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                            "type_sizes": {"short": 2, "int": 4, "long": 8}}):
            pickle.dump(header, out, protocol=2)
        out.write(data)
        keys = sorted(storages)
        pickle.dump(keys, out, protocol=2)
        for key in keys:
            raw = storages[key].data
            out.write(struct.pack("<q", raw.size))
            out.write(raw.astype(raw.dtype.newbyteorder("<")).tobytes())


def torch_state_dict(variables: dict) -> collections.OrderedDict:
    """Our Inception variables -> pytorch-fid's state dict (OIHW kernels, fc (out, in)), as Tensors."""
    out = collections.OrderedDict()

    def walk(params, stats, prefix):
        if "conv" in params and "bn" in params:
            out[prefix + "conv.weight"] = np.transpose(params["conv"]["kernel"], (3, 2, 0, 1))
            out[prefix + "bn.weight"] = params["bn"]["scale"]
            out[prefix + "bn.bias"] = params["bn"]["bias"]
            out[prefix + "bn.running_mean"] = stats["bn"]["mean"]
            out[prefix + "bn.running_var"] = stats["bn"]["var"]
            out[prefix + "bn.num_batches_tracked"] = np.asarray(0, np.int64)
            return
        for name in params:
            walk(params[name], stats.get(name, {}), f"{prefix}{name}.")

    for name in variables["params"]:
        if name == "fc":
            out["fc.weight"] = np.asarray(variables["params"]["fc"]["kernel"]).T
            out["fc.bias"] = variables["params"]["fc"]["bias"]
        else:
            walk(variables["params"][name], variables["batch_stats"][name], f"{name}.")
    return collections.OrderedDict((k, tensor(np.asarray(v), str(i))) for i, (k, v) in enumerate(out.items()))
