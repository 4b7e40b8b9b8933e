"""Reads PyTorch `torch.save` files (state dicts) into NumPy arrays without torch and without running pickled code.

A restricted unpickler resolves only the handful of names a state dict refers to (OrderedDict, the tensor rebuild
functions, the typed storage classes); anything else is refused. Both the zip layout (torch >= 1.6) and the older
single-stream layout are understood (docs/evaluation.md, "Reading .pth files without torch").
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# The legacy (pre-zip) format starts with this magic number, then the protocol version, then system information.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class TorchCheckpointError(ValueError):
    """The file is not a torch state dict this reader accepts (unknown global, bad layout, out-of-range view)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands for `torch.<Name>Storage` inside the pickle: only its element type matters."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(eq=False)
class _Storage:
    """One flat storage; `data` (numel,) is filled when the raw bytes are read (after the pickle in the old format)."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class _TensorRef:
    """A strided view into a storage, materialised once every storage has its bytes."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise TorchCheckpointError(f"storage {self.storage.key!r} has no data in the file")
        if any(n == 0 for n in self.shape):
            return np.zeros(self.shape, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        # A view past the storage would make as_strided read foreign memory: refuse it.
        if self.offset < 0 or last >= flat.shape[0]:
            raise TorchCheckpointError(
                f"tensor view (offset {self.offset}, shape {self.shape}, stride {self.stride}) exceeds its storage "
                f"{self.storage.key!r} of {flat.shape[0]} elements"
            )
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.shape, strides=[s * item for s in self.stride], writeable=False
        )
        return np.array(view, copy=True, order="C")


def _as_int_tuple(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise TorchCheckpointError(f"tensor {what} must be a tuple of non-negative ints, got {values!r}")
    return tuple(values)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """Stand-in for torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride, [requires_grad, hooks, ...])."""
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(f"a tensor refers to {type(storage).__name__}, not to a storage")
    if not isinstance(storage_offset, int):
        raise TorchCheckpointError(f"tensor storage offset must be an int, got {storage_offset!r}")
    shape, strides = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise TorchCheckpointError(f"tensor size {shape} and stride {strides} differ in length")
    return _TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, *unused):
    """Stand-in for torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that maps the allowed torch names to our stand-ins and refuses every other global."""

    def __init__(self, file, storage_from_id):
        super().__init__(file)
        self._storage_from_id = storage_from_id

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TorchCheckpointError(
                f"the file refers to {module}.{name}, which a plain state dict never needs; refusing to load it "
                "(only tensors, storages and OrderedDict are allowed)"
            ) from None

    def persistent_load(self, saved_id):
        return self._storage_from_id(saved_id)


def _storage_type(value) -> _StorageType:
    if not isinstance(value, _StorageType):
        raise TorchCheckpointError(f"unexpected storage type {value!r}")
    return value


def _materialise(obj):
    """Replaces every `_TensorRef` inside dicts, lists and tuples with its NumPy array."""
    if isinstance(obj, _TensorRef):
        return obj.to_numpy()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _read_zip(archive: zipfile.ZipFile):
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchCheckpointError(f"expected one '<name>/data.pkl' in the zip, found {pickles or 'none'}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in archive.namelist():
        byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def storage_from_id(saved_id):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise TorchCheckpointError(f"unexpected persistent id {saved_id!r}")
        storage_type, key, numel = _storage_type(saved_id[1]), str(saved_id[2]), saved_id[4]
        if key not in storages:
            raw = archive.read(f"{prefix}data/{key}")
            dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
            if len(raw) < numel * dtype.itemsize:
                raise TorchCheckpointError(f"storage {key!r} holds {len(raw)} bytes, {numel} elements need more")
            data = np.frombuffer(raw, dtype=dtype, count=numel).astype(storage_type.dtype, copy=False)
            storages[key] = _Storage(key, storage_type.dtype, numel, data)
        return storages[key]

    with archive.open(pickles[0]) as stream:
        return _RestrictedUnpickler(io.BytesIO(stream.read()), storage_from_id).load()


def _read_legacy(stream):
    """The pre-1.6 layout: magic, protocol, sys_info, the object pickle, the storage keys, then raw storages."""
    header = _RestrictedUnpickler(stream, lambda saved_id: None)
    if header.load() != _LEGACY_MAGIC:
        raise TorchCheckpointError("not a torch file: the legacy magic number is missing")
    if header.load() != _LEGACY_PROTOCOL:
        raise TorchCheckpointError("unsupported legacy torch protocol version")
    sys_info = header.load()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise TorchCheckpointError("big-endian legacy torch files are not supported")
    storages: dict[str, _Storage] = {}

    def storage_from_id(saved_id):
        # ('storage', storage_type, root_key, location, numel, view_metadata)
        if not (isinstance(saved_id, tuple) and len(saved_id) == 6 and saved_id[0] == "storage"):
            raise TorchCheckpointError(f"unexpected persistent id {saved_id!r} (only storages are allowed)")
        storage_type, key, numel, view = _storage_type(saved_id[1]), str(saved_id[2]), saved_id[4], saved_id[5]
        if view is not None:
            raise TorchCheckpointError("storage views of the oldest torch files are not supported")
        if key not in storages:
            storages[key] = _Storage(key, storage_type.dtype, int(numel))
        return storages[key]

    result = _RestrictedUnpickler(stream, storage_from_id).load()
    keys = _RestrictedUnpickler(stream, lambda saved_id: None).load()
    for key in keys:
        storage = storages.get(str(key))
        count = np.frombuffer(stream.read(8), dtype="<i8")
        if storage is None or count.shape != (1,):
            raise TorchCheckpointError(f"storage {key!r} is listed but malformed")
        numel = int(count[0])
        raw = stream.read(numel * storage.dtype.itemsize)
        if len(raw) != numel * storage.dtype.itemsize:
            raise TorchCheckpointError(f"storage {key!r} is truncated")
        storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<")).astype(storage.dtype, copy=False)
    return result


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
    """The object saved in a `torch.save` file, with every tensor as a NumPy array (a copy, C-contiguous).

    Accepts the zip format and the legacy single-stream format. Raises `TorchCheckpointError` for any pickled name
    outside the allow-list (no code from the file ever runs) and for malformed layouts.
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            result = _read_zip(archive)
    else:
        with open(path, "rb") as stream:
            try:
                result = _read_legacy(stream)
            except (pickle.UnpicklingError, EOFError) as error:
                raise TorchCheckpointError(f"{path} is neither a torch zip file nor a legacy torch file: {error}")
    return _materialise(result)
