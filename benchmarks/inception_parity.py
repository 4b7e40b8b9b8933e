"""Our Flax FID Inception against pytorch-fid's network: same random weights, same images, features side by side.

    .venv/bin/python benchmarks/inception_parity.py --torch-python .venv-torch/bin/python \
        [--torchvision-shim FILE] [--batch 4] [--seed 0]

The torch side runs in a second Python (3.11 here, with torch 2.13 CPU, torchvision 0.28 and pytorch-fid 0.3.0;
none of them is a requirement of this project). It builds pytorch-fid's FID-variant structure exactly as
`pytorch_fid.inception.fid_inception_v3` does, but fills it with random weights instead of downloading the real
ones, saves its state dict with `torch.save` in both layouts (zip, and the legacy one with
`_use_new_zipfile_serialization=False`), and computes on the same images:

  pool   pytorch-fid's `InceptionV3([3], resize_input=False, normalize_input=True)` on uint8 / 255 (it maps to
         [-1, 1] itself), 299 x 299 images: the 2048-d FID features
  logits the torchvision forward's 1008 logits, and pool @ fc.weight^T (no bias, what the Inception Score uses)
  spatial the output of Mixed_6d.branch1x1 (TensorFlow's "mixed_6/conv"), channels [:7], flattened in (h, w, c)
  clean  32 x 32 images through clean-fid's resize (each channel a PIL float image, bicubic to 299, clipped),
         (p - 128) / 128, then the network's pool features

Our side reads both files with `lzn_jax.evaluation.torch_checkpoint` (no torch, no pickled code run), converts
them with `variables_from_state_dict`, and runs `extract_features` under the matching protocol ("none" +
"pytorch_fid" for 299 x 299 images, "clean" + "clean" for the 32 x 32 ones). It prints, per output, the largest
absolute difference, the largest magnitude of torch's output, and their ratio.

torchvision's wheel links CUDA libraries; on a CPU-only torch `import torchvision` fails with "operator
torchvision::nms does not exist". `--torchvision-shim FILE` imports FILE (a module that declares torchvision's op
schemas with `torch.library.define`) before torchvision, which is enough for its pure-Python models.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

_FID_BLOCKS = {  # pytorch-fid's replacements in fid_inception_v3, block name -> (class, constructor args)
    "Mixed_5b": ("FIDInceptionA", (192,), {"pool_features": 32}),
    "Mixed_5c": ("FIDInceptionA", (256,), {"pool_features": 64}),
    "Mixed_5d": ("FIDInceptionA", (288,), {"pool_features": 64}),
    "Mixed_6b": ("FIDInceptionC", (768,), {"channels_7x7": 128}),
    "Mixed_6c": ("FIDInceptionC", (768,), {"channels_7x7": 160}),
    "Mixed_6d": ("FIDInceptionC", (768,), {"channels_7x7": 160}),
    "Mixed_6e": ("FIDInceptionC", (768,), {"channels_7x7": 192}),
    "Mixed_7b": ("FIDInceptionE_1", (1280,), {}),
    "Mixed_7c": ("FIDInceptionE_2", (2048,), {}),
}


# ----------------------------------------------------------------------------------------------------------------
# Torch side (runs in --torch-python)
# ----------------------------------------------------------------------------------------------------------------


def _torch_side(out_dir: pathlib.Path, batch: int, seed: int, shim: str | None) -> None:
    import importlib.util

    import torch

    if shim:
        spec = importlib.util.spec_from_file_location("torchvision_shim", shim)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    import pytorch_fid.inception as pi
    from PIL import Image

    torch.manual_seed(seed)
    net = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, (cls, args, kwargs) in _FID_BLOCKS.items():
        setattr(net, name, getattr(pi, cls)(*args, **kwargs))
    num_params = sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):
                fan_in = tensor[0].numel()
                tensor.normal_(0.0, (2.0 / fan_in) ** 0.5)
            elif name.endswith(("bn.weight", "running_var")):
                tensor.uniform_(0.5, 1.5)
            elif name == "fc.weight":
                tensor.normal_(0.0, 2048**-0.5)
            else:  # BN bias, running mean, fc bias
                tensor.normal_(0.0, 0.1)
    net.eval()
    state = net.state_dict()
    torch.save(state, out_dir / "fid_inception_zip.pth")
    torch.save(state, out_dir / "fid_inception_legacy.pth", _use_new_zipfile_serialization=False)

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 299, 299, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)

    original = pi.fid_inception_v3
    pi.fid_inception_v3 = lambda: net  # the wrapper would download the real weights; give it ours
    try:
        wrapper = pi.InceptionV3([3], resize_input=False, normalize_input=True).eval()
    finally:
        pi.fid_inception_v3 = original
    taps = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: taps.__setitem__("spatial", output))
    with torch.no_grad():
        unit = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        pool = wrapper(unit)[0].flatten(1)
        logits = net(2 * unit - 1)
        spatial = taps["spatial"][:, :7].permute(0, 2, 3, 1).reshape(batch, -1)
        unbiased = pool @ net.fc.weight.T

        def clean_resize(image):  # clean-fid's "clean" mode, written out
            channels = [
                np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((299, 299),
                                                                                         Image.BICUBIC))
                for c in range(3)
            ]
            return np.stack(channels, axis=-1).clip(0, 255)

        resized = np.stack([clean_resize(image) for image in small]).astype(np.float32)
        clean_pool = wrapper.blocks[3](wrapper.blocks[2](wrapper.blocks[1](wrapper.blocks[0](
            (torch.from_numpy(resized).permute(0, 3, 1, 2) - 128.0) / 128.0)))).flatten(1)
    np.savez(
        out_dir / "torch_outputs.npz", images=images, small=small, pool=pool.numpy(), logits=logits.numpy(),
        unbiased=unbiased.numpy(), spatial=spatial.numpy(), clean_pool=clean_pool.numpy(),
        num_params=np.int64(num_params), torch_version=np.str_(torch.__version__),
    )


# ----------------------------------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------------------------------


def _compare(name: str, ours: np.ndarray, theirs: np.ndarray) -> dict:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))
    scale = float(np.abs(theirs).max())
    row = {"output": name, "shape": list(theirs.shape), "max_abs_diff": float(diff.max()), "max_abs_torch": scale,
           "ratio": float(diff.max() / scale)}
    print(f"{name:16s} {tuple(theirs.shape)!s:14s} max|diff| {row['max_abs_diff']:.3e}   "
          f"max|torch| {scale:.3e}   ratio {row['ratio']:.3e}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-python", default=".venv-torch/bin/python")
    parser.add_argument("--torchvision-shim", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-side", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_side:
        _torch_side(pathlib.Path(args.torch_side), args.batch, args.seed, args.torchvision_shim)
        return

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from lzn_jax.evaluation import fid, inception
    from lzn_jax.evaluation.inception_weights import file_sha256, variables_from_state_dict
    from lzn_jax.evaluation.torch_checkpoint import read_torch_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        command = [args.torch_python, os.path.abspath(__file__), "--torch-side", tmp, "--batch", str(args.batch),
                   "--seed", str(args.seed)]
        if args.torchvision_shim:
            command += ["--torchvision-shim", os.path.abspath(args.torchvision_shim)]
        subprocess.run(command, check=True)
        torch_out = dict(np.load(out / "torch_outputs.npz"))
        state_zip = read_torch_checkpoint(out / "fid_inception_zip.pth")
        state_legacy = read_torch_checkpoint(out / "fid_inception_legacy.pth")
        digest = file_sha256(out / "fid_inception_zip.pth")

    print(f"torch {torch_out['torch_version']}: {int(torch_out['num_params']):,} parameters "
          f"(ours: {inception.NUM_PARAMS:,})")
    same_files = list(state_zip) == list(state_legacy) and all(
        np.array_equal(state_zip[k], state_legacy[k]) for k in state_zip
    )
    print(f"zip and legacy files read by our reader: {len(state_zip)} tensors, identical: {same_files}")
    variables = variables_from_state_dict(state_zip)

    plain = fid.FeatureProtocol(weights_sha256=digest, resize="none", normalization="pytorch_fid")
    ours = fid.extract_features(torch_out["images"], variables, protocol=plain, batch_size=args.batch)
    out_full = inception.InceptionV3().apply(
        variables, (torch_out["images"].astype(np.float32) / 255.0) * 2.0 - 1.0
    )
    clean = fid.FeatureProtocol(weights_sha256=digest)
    ours_clean = fid.extract_features(torch_out["small"], variables, protocol=clean, batch_size=args.batch)
    rows = [
        _compare("pool (299)", ours.pool, torch_out["pool"]),
        _compare("logits", np.asarray(out_full.logits), torch_out["logits"]),
        _compare("logits, no bias", ours.logits, torch_out["unbiased"]),
        _compare("spatial (sFID)", ours.spatial, torch_out["spatial"]),
        _compare("pool (clean 32)", ours_clean.pool, torch_out["clean_pool"]),
    ]
    print(json.dumps({"parameters_torch": int(torch_out["num_params"]), "files_identical": same_files,
                      "rows": rows}))
    if not same_files or int(torch_out["num_params"]) != inception.NUM_PARAMS:
        sys.exit(1)


if __name__ == "__main__":
    main()
