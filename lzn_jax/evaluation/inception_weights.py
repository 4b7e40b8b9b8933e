"""The FID Inception's weights: pytorch-fid's file, found in a cache or downloaded once (with a checksum check), read
without torch and converted to the Linen variables of `inception.InceptionV3` (docs/evaluation.md, "Weights").
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request

import jax
import numpy as np

from lzn_jax.evaluation import inception
from lzn_jax.evaluation.torch_checkpoint import read_torch_checkpoint

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# The published checksum is the 8 hex digits in the file name: by torch.hub's naming convention they are the start
# of the file's SHA-256. No full digest is published; pass `sha256=` to pin one.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
DOWNLOAD_TIMEOUT_S = 10.0


class InceptionWeightsError(RuntimeError):
    """The weights file is missing, cannot be downloaded, fails its checksum, or does not fit the network."""


def cache_dir() -> pathlib.Path:
    """Where downloaded files live: `$LZN_CACHE` if set, else `~/.cache/lzn_jax`."""
    return pathlib.Path(os.environ.get("LZN_CACHE") or pathlib.Path.home() / ".cache" / "lzn_jax")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: pathlib.Path, expected: str) -> str:
    """Returns the file's digest when it starts with `expected` (a full digest or a prefix), else raises."""
    actual = file_sha256(path)
    if not actual.startswith(expected.lower()):
        raise InceptionWeightsError(
            f"{path} has SHA-256 {actual}, expected one starting with {expected}. The file is damaged or not the "
            f"FID Inception weights: delete it and download it again from {FID_WEIGHTS_URL}"
        )
    return actual


def _missing_message(target: pathlib.Path, reason: str) -> str:
    return (
        f"The FID Inception weights are not available ({reason}). Download {FID_WEIGHTS_URL} on a machine with a "
        f"network and put it at {target} (the cache: $LZN_CACHE, default ~/.cache/lzn_jax), or pass the file's "
        "path explicitly (load_inception(path))."
    )


def _download(url: str, target: pathlib.Path, timeout: float) -> None:
    """Streams `url` into a temporary file beside `target`, then renames it into place (never a partial file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        urllib.request.urlopen(url, timeout=timeout) as response,
        tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name, suffix=".part", delete=False) as out,
    ):
        try:
            shutil.copyfileobj(response, out, length=1 << 20)
        except BaseException:
            os.unlink(out.name)
            raise
    os.replace(out.name, target)


def fetch_weights(
    path: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    download: bool = True,
    url: str = FID_WEIGHTS_URL,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> tuple[pathlib.Path, str]:
    """The weights file and its SHA-256: `path` if given, else the cached copy, else a one-time download.

    `sha256` (full digest or prefix) is checked when given; the cached and downloaded file are always checked
    against at least the published prefix. Without a network the download fails within `timeout` seconds and the
    error says where to get the file and where to put it.
    """
    if path is not None:
        path = pathlib.Path(path).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(_missing_message(path, f"no file at {path}"))
        return path, (_check_sha256(path, sha256) if sha256 else file_sha256(path))
    target = cache_dir() / FID_WEIGHTS_FILENAME
    expected = sha256 or FID_WEIGHTS_SHA256_PREFIX
    if not target.is_file():
        if not download:
            raise InceptionWeightsError(_missing_message(target, "not in the cache and downloads are off"))
        try:
            _download(url, target, timeout)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise InceptionWeightsError(_missing_message(target, f"download failed: {error}")) from error
    return target, _check_sha256(target, expected)


# ----------------------------------------------------------------------------------------------------------------
# torch state dict -> Linen variables
# ----------------------------------------------------------------------------------------------------------------

# torch leaf name -> (collection, our leaf path below the layer, layout change)
_LEAF_MAP = {
    ("conv", "weight"): ("params", ("conv", "kernel"), lambda w: np.transpose(w, (2, 3, 1, 0))),  # OIHW -> HWIO
    ("bn", "weight"): ("params", ("bn", "scale"), None),
    ("bn", "bias"): ("params", ("bn", "bias"), None),
    ("bn", "running_mean"): ("batch_stats", ("bn", "mean"), None),
    ("bn", "running_var"): ("batch_stats", ("bn", "var"), None),
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)  # BN step counters: unused in evaluation


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, prefix + (key,)))
        return out
    return {prefix: tree}


def variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
    """pytorch-fid's FID Inception state dict (torch names, OIHW kernels) -> {"params", "batch_stats"} float32.

    Every tensor must land on a variable of `InceptionV3` with the right shape and every variable must be filled;
    otherwise the error names the mismatched leaves (e.g. torchvision's own Inception weights, which have 1000
    classes and an auxiliary head, are refused).
    """
    variables: dict = {}
    unknown = []
    for name, value in state_dict.items():
        parts = tuple(name.split("."))
        if parts[-1] in _IGNORED_SUFFIXES:
            continue
        value = np.asarray(value)
        if parts == ("fc", "weight"):
            _set(variables, ("params", "fc", "kernel"), value.T)  # (out, in) -> (in, out)
        elif parts == ("fc", "bias"):
            _set(variables, ("params", "fc", "bias"), value)
        elif parts[-2:] in _LEAF_MAP:
            collection, leaf, layout = _LEAF_MAP[parts[-2:]]
            _set(variables, (collection, *parts[:-2], *leaf), layout(value) if layout else value)
        else:
            unknown.append(name)
    abstract = inception.abstract_variables(inception.MIN_INPUT_SIZE)  # the cheapest trace; shapes are the same
    expected = _flatten(jax.tree.map(lambda s: s.shape, abstract, is_leaf=_is_shape_struct))
    got = _flatten(variables)
    problems = [f"unexpected tensor {name}" for name in unknown]
    problems += [f"missing {'/'.join(path)} {shape}" for path, shape in expected.items() if path not in got]
    problems += [f"unexpected {'/'.join(path)}" for path in got if path not in expected]
    problems += [
        f"{'/'.join(path)}: shape {got[path].shape}, expected {shape}"
        for path, shape in expected.items()
        if path in got and got[path].shape != shape
    ]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems)} in all)" if len(problems) > 12 else "")
        raise InceptionWeightsError(f"the state dict does not fit the FID Inception-V3: {shown}")
    return jax.tree.map(lambda a: np.ascontiguousarray(a, dtype=np.float32), variables)


def _is_shape_struct(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def load_inception(
    path: str | os.PathLike | None = None, *, sha256: str | None = None, download: bool = True
) -> tuple[dict, str]:
    """Variables of `inception.InceptionV3` from pytorch-fid's weights (see `fetch_weights`) and the file's SHA-256.

    Usage: `variables, digest = load_inception(); out = InceptionV3().apply(variables, images)`.
    """
    file, digest = fetch_weights(path, sha256=sha256, download=download)
    state_dict = read_torch_checkpoint(file)
    if not isinstance(state_dict, dict):
        raise InceptionWeightsError(f"{file} holds a {type(state_dict).__name__}, not a state dict")
    return variables_from_state_dict(state_dict), digest
