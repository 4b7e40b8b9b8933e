"""Writes the reference-parity fixtures of tests/tools/test_import_reference.py with the PyTorch reference itself.

Run from the repository root with a torch environment (outside the project's requirements; torch CPU, scipy,
ml_collections) and a checkout of github.com/microsoft/latent-zoning-networks:

  PYTHONPATH=/tmp/lznref .venv-torch/bin/python tests/tools/make_reference_fixture.py --out tests/tools/data

It writes into --out (tests/tools/data by default; about 1 MB in all):
  joint.pth    case study 3 (cifar10_joint) at tiny widths: NCSN++ encoder, class-conditional decoder, label
               anchors, saved by the reference's own `GenerationTrainer.save_checkpoint` after three real training
               iterations (so Adam state, EMA shadows, counters and the `model.module.` keys are exactly what the
               trainer writes);
  gen256.json  the 256x256 family (afhq_cat_gen) at tiny widths: FIR resampling, input/output skips, Fourier time,
  resnet.json  scale_by_sigma, heads at 8x8 only; and case study 2's ResNet-GN (blocks (2, 1, 1, 1), the 2-layer
               head). These are too large to store, so their weights are `synthetic_weights` values that the test
               rebuilds; the JSON lists the reference's own state-dict names, shapes and parameter order;
  NAME.npz     fixed inputs and the reference's outputs on them, with the raw and with the EMA weights (the
               reference's own EMA class swaps the shadows in);
  joint.json   the tiny settings in our config's names, the iteration and EMA count;
  paper_models.json.gz  the state-dict names and shapes and the parameter order of the full-size models of all
               six paper settings, keyed by our config names (no weights).

The reference compiles a CUDA extension when its NCSN++ layers are imported; this script replaces
`torch.utils.cpp_extension.load` by a no-op first, so the layers take the reference's own CPU code path
(`upfirdn2d_native`). It starts a one-process gloo group because the trainer wraps its models in
DistributedDataParallel and all-gathers anchors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import types

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
BATCH = 4
SEED = 20250917


def _prepare_reference(reference_dir: pathlib.Path):
    """Imports the reference with its CUDA extension and plotting stubbed out; returns the torch module."""
    import torch
    import torch.utils.cpp_extension

    torch.utils.cpp_extension.load = lambda *args, **kwargs: None
    pyplot = types.ModuleType("matplotlib.pyplot")
    sys.modules.setdefault("matplotlib", types.ModuleType("matplotlib")).pyplot = pyplot
    sys.modules["matplotlib.pyplot"] = pyplot
    sys.path.insert(0, str(reference_dir))

    import torch.distributed as dist

    store = tempfile.NamedTemporaryFile(prefix="lzn_fixture_gloo_", delete=False).name
    os.unlink(store)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    torch.set_num_threads(2)
    return torch


def _reference_config(reference_dir: pathlib.Path, name: str):
    path = reference_dir / "configs" / "lzn1" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"reference_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# The tiny widths of every NCSN++ fixture (two levels, one block each, attention at the lower level).
NF, CH_MULT, IMAGE_SIZE, LATENT_DIM, HEAD_CHANNELS, HEAD_UNITS = 4, (1, 2), 16, 8, 2, 8


def _shrink(config, *, heads_at: tuple[int, ...] | None) -> dict:
    """Tiny widths in the reference config; returns the same settings in our config's names."""
    config.distributed.device = "cpu"
    config.distributed.local_rank = 0
    config.image_size = IMAGE_SIZE
    config.latent_dim = LATENT_DIM
    model = config.encoder.params.config.model
    model.nf = NF
    model.ch_mult = CH_MULT
    model.num_res_blocks = 1
    model.attn_resolutions = (IMAGE_SIZE // 2,)
    encoder = config.encoder.params
    encoder.num_base_channels = HEAD_CHANNELS
    encoder.num_base_units = HEAD_UNITS
    if heads_at is not None:
        encoder.latent_transformation_resolutions = list(heads_at)
    # Big steps without warm-up, so three iterations move the weights far from their EMA.
    config.optimizer.additional_params.encoder_lr = 1e-2
    config.optimizer.additional_params.decoder_lr = 1e-2
    if "label_anchor_lr" in config.optimizer.additional_params:
        # The anchors are of scale 1: larger steps, so their EMA too is far from them.
        config.optimizer.additional_params.label_anchor_lr = 0.1
    config.lr_scheduler.params.start_factor = 1.0
    trunk = dict(nf=NF, ch_mult=list(CH_MULT), num_res_blocks=1, attn_resolutions=[IMAGE_SIZE // 2])
    return dict(
        image_size=IMAGE_SIZE,
        latent_dim=LATENT_DIM,
        encoder=dict(trunk, latent_dim=LATENT_DIM, num_base_channels=HEAD_CHANNELS, num_base_units=HEAD_UNITS,
                     latent_transformation_resolutions=None if heads_at is None else list(heads_at)),
        decoder=dict(trunk, latent_dim=LATENT_DIM),
    )


def _build_trainer(torch, config):
    """`GenerationTrainer.__init__` minus data loading, metrics, loggers and evaluation samplers."""
    import lzn.model
    import lzn.optimizer
    import lzn.prior
    from lzn.trainer import generation_trainer

    ddp = generation_trainer.CustomDistributedDataParallel
    # DistributedDataParallel of CPU modules takes device_ids=None; the trainer passes a GPU index.
    generation_trainer.CustomDistributedDataParallel = lambda module, device_ids=None, **kw: ddp(module, **kw)

    trainer = object.__new__(generation_trainer.GenerationTrainer)
    trainer._config = config
    trainer._data = types.SimpleNamespace(num_classes=10)
    trainer._prior = lzn.prior.from_config(config.prior)
    trainer._initialize_encoder()
    trainer._initialize_decoder()
    trainer._initialize_label_anchor()
    trainer._initialize_training_sampler()
    trainer._initialize_t_scheduler()
    trainer._initialize_losses()
    trainer._initialize_latent_flow()
    trainer._initialize_grad_scalar()

    # Every trainable weight off its initial value (several start at ~1e-10), so a misplaced leaf shows.
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for model in (trainer._encoder, trainer._decoder, trainer._label_anchor):
            if model is None:
                continue
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))

    trainer._decoder_ema = lzn.model.ema_from_config(trainer._decoder.parameters(), config.decoder_ema)
    trainer._encoder_ema = lzn.model.ema_from_config(trainer._encoder.parameters(), config.encoder_ema)
    trainer._label_anchor_ema = None
    if trainer._label_anchor is not None:
        trainer._label_anchor_ema = lzn.model.ema_from_config(trainer._label_anchor.parameters(),
                                                              config.label_anchor_ema)
    groups = [(trainer._encoder, config.optimizer.additional_params.encoder_lr),
              (trainer._decoder, config.optimizer.additional_params.decoder_lr),
              (trainer._label_anchor,
               None if trainer._label_anchor is None else config.optimizer.additional_params.label_anchor_lr)]
    trainer._optimizer = lzn.optimizer.from_config(groups, config.optimizer)
    trainer._lr_scheduler = lzn.optimizer.lr_scheduler_from_config(trainer._optimizer, config.lr_scheduler)
    trainer._parameters = (list(trainer._encoder.parameters()) + list(trainer._decoder.parameters())
                           + (list(trainer._label_anchor.parameters()) if trainer._label_anchor is not None else []))
    trainer._epoch = 0
    trainer._iteration = 0
    return trainer


def _train(torch, trainer, image_size: int, iterations: int = 3) -> None:
    generator = torch.Generator().manual_seed(SEED + 1)
    for _ in range(iterations):
        data = torch.rand(BATCH, 3, image_size, image_size, generator=generator) * 2 - 1
        label = torch.randint(0, 10, (BATCH,), generator=generator)
        prior = torch.randn(BATCH, trainer._config.latent_dim, generator=generator)
        trainer._train_iteration(data=data, label=label, prior_data=prior)
        trainer._iteration += 1


def _inputs(torch, image_size: int, latent_dim: int) -> dict:
    generator = torch.Generator().manual_seed(SEED + 2)
    return {
        "images": torch.rand(BATCH, 3, image_size, image_size, generator=generator) * 2 - 1,
        "x_t": torch.randn(BATCH, 3, image_size, image_size, generator=generator),
        "t": torch.tensor([0.02, 0.3, 0.65, 0.97]),
        "latent": torch.randn(BATCH, latent_dim, generator=generator),
        "labels": torch.tensor([0, 3, 7, 9]),
    }


def _outputs(torch, trainer, inputs: dict, conditional: bool) -> dict:
    """The modules' outputs in evaluation mode (no dropout)."""
    trainer._encoder.eval()
    trainer._decoder.eval()
    label = torch.nn.functional.one_hot(inputs["labels"], 10).float() if conditional else None
    with torch.no_grad():
        out = {
            "anchors": trainer._encoder(inputs["images"]),
            "velocity": trainer._decoder(latent=inputs["latent"], label=label, t=inputs["t"], xt=inputs["x_t"]),
        }
        if trainer._label_anchor is not None:
            out["label_anchors"] = trainer._label_anchor(None)
    # Copies: the label-anchor output is the parameter itself, which swapping the EMA in and out overwrites.
    return {name: value.detach().clone().numpy() for name, value in out.items()}


def _ema_outputs(torch, trainer, inputs: dict, conditional: bool) -> dict:
    """The same outputs with the EMA shadows swapped in, as the reference's EMA evaluation does it."""
    pairs = [(trainer._encoder_ema, trainer._encoder), (trainer._decoder_ema, trainer._decoder),
             (trainer._label_anchor_ema, trainer._label_anchor)]
    pairs = [(ema, model) for ema, model in pairs if ema is not None]
    for ema, model in pairs:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    try:
        return _outputs(torch, trainer, inputs, conditional)
    finally:
        for ema, model in pairs:
            ema.restore(model.parameters())


def _joint_fixture(torch, reference_dir: pathlib.Path, out: pathlib.Path) -> None:
    """Case study 3, saved by the reference's trainer after three real iterations."""
    config = _reference_config(reference_dir, "case_study_3")
    settings = _shrink(config, heads_at=None)
    trainer = _build_trainer(torch, config)
    _train(torch, trainer, image_size=IMAGE_SIZE)
    checkpoint = out / "joint.pth"
    trainer.save_checkpoint(str(checkpoint))

    inputs = _inputs(torch, IMAGE_SIZE, LATENT_DIM)
    arrays = {f"input_{key}": value.numpy() for key, value in inputs.items()}
    arrays.update({f"raw_{key}": value for key, value in _outputs(torch, trainer, inputs, True).items()})
    arrays.update({f"ema_{key}": value for key, value in _ema_outputs(torch, trainer, inputs, True).items()})
    np.savez_compressed(out / "joint.npz", **arrays)
    settings.update(config="cifar10_joint", num_classes=10, iteration=trainer._iteration,
                    ema_num_updates=trainer._encoder_ema.num_updates)
    (out / "joint.json").write_text(json.dumps(settings, indent=1) + "\n")
    print(f"joint: {checkpoint} {checkpoint.stat().st_size / 1e3:.0f} kB, iteration {trainer._iteration}")


def _manifest(model) -> dict:
    """What the test needs to rebuild a module's state dict: names and shapes in order, and its parameter order."""
    return dict(
        state_dict=[[name, list(tensor.shape)] for name, tensor in model.state_dict().items()],
        parameter_order=[name for name, _ in model.named_parameters()],
        trainable=[name for name, param in model.named_parameters() if param.requires_grad],
    )


def _load_synthetic(torch, model, manifest: dict, synthetic_weights):
    """Raw weights with salt 1, then an EMA (the reference's own class) holding salt-2 shadows."""
    import lzn.model

    entries = [(name, tuple(shape)) for name, shape in manifest["state_dict"]]
    raw = synthetic_weights.synthetic_state_dict(entries, salt=1)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in raw.items()})
    shapes = dict(entries)
    shadows = synthetic_weights.synthetic_state_dict([(n, shapes[n]) for n in manifest["trainable"]], salt=2)
    ema = lzn.model.ExponentialMovingAverage(model.parameters(), decay=0.9999)
    ema.shadow_params = [torch.from_numpy(value) for value in shadows.values()]
    return ema


def _synthetic_outputs(torch, models: dict, emas: dict, compute) -> dict:
    """``compute()`` with the raw weights, then with every EMA swapped in by the reference's own `copy_to`."""
    with torch.no_grad():
        arrays = {f"raw_{k}": v.clone().numpy() for k, v in compute().items()}
        for name, ema in emas.items():
            ema.store(models[name].parameters())
            ema.copy_to(models[name].parameters())
        arrays.update({f"ema_{k}": v.clone().numpy() for k, v in compute().items()})
        for name, ema in emas.items():
            ema.restore(models[name].parameters())
    return arrays


def _gen256_fixture(torch, reference_dir: pathlib.Path, out: pathlib.Path, synthetic_weights) -> None:
    """The 256x256 family's layers at tiny widths (FIR, skips, Fourier time, heads at 8x8 only), weights synthetic."""
    import lzn.model

    config = _reference_config(reference_dir, "case_study_1_afhqcat")
    settings = _shrink(config, heads_at=(IMAGE_SIZE // 2,))
    models = {"encoder": lzn.model.from_config(config.encoder).eval(),
              "decoder": lzn.model.from_config(config.decoder).eval()}
    manifests = {name: _manifest(model) for name, model in models.items()}
    emas = {name: _load_synthetic(torch, model, manifests[name], synthetic_weights) for name, model in models.items()}
    inputs = _inputs(torch, IMAGE_SIZE, LATENT_DIM)
    arrays = {f"input_{key}": value.numpy() for key, value in inputs.items()}
    arrays.update(_synthetic_outputs(torch, models, emas, lambda: {
        "anchors": models["encoder"](inputs["images"]),
        "velocity": models["decoder"](latent=inputs["latent"], label=None, t=inputs["t"], xt=inputs["x_t"]),
    }))
    np.savez_compressed(out / "gen256.npz", **arrays)
    settings.update(config="afhq_cat_gen", num_classes=0, modules=manifests, raw_salt=1, ema_salt=2)
    (out / "gen256.json").write_text(json.dumps(settings, indent=1) + "\n")
    print("gen256: " + ", ".join(f"{n} {len(m['state_dict'])} tensors" for n, m in manifests.items()))


def _resnet_fixture(torch, out: pathlib.Path, synthetic_weights) -> None:
    """Case study 2's ResNet-GN with (2, 1, 1, 1) blocks and the configured 2-layer head, weights synthetic."""
    from lzn.model.resnet import ResNet

    model = ResNet([2, 1, 1, 1], width_multiplier=1, sk_ratio=0, head_out_dim=256, head_num_layers=2,
                   num_gradient_checkpoint_segments=0).eval()
    manifest = _manifest(model)
    ema = _load_synthetic(torch, model, manifest, synthetic_weights)
    generator = torch.Generator().manual_seed(SEED + 3)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    arrays = {"input_images": images.numpy()}
    arrays.update(_synthetic_outputs(torch, {"encoder": model}, {"encoder": ema}, lambda: {
        "anchors": model(images), "features": model(images, apply_head=False)}))
    np.savez_compressed(out / "resnet.npz", **arrays)
    settings = dict(config="imagenet_repr", image_size=32,
                    encoder=dict(latent_dim=256, stage_sizes=[2, 1, 1, 1], width_multiplier=1, head_num_layers=2),
                    modules={"encoder": manifest}, raw_salt=1, ema_salt=2)
    (out / "resnet.json").write_text(json.dumps(settings, indent=1) + "\n")
    count = sum(int(np.prod(shape)) for _, shape in manifest["state_dict"])
    print(f"resnet: {len(manifest['state_dict'])} tensors, {count:,} values (not stored)")


# The reference's six paper configurations and ours.
PAPER_SETTINGS = {
    "case_study_1_cifar10": "cifar10_gen", "case_study_1_afhqcat": "afhq_cat_gen",
    "case_study_1_celebahq": "celebahq_gen", "case_study_1_lsunbedroom": "lsun_bedroom_gen",
    "case_study_2": "imagenet_repr", "case_study_3": "cifar10_joint",
}


def _paper_models_fixture(torch, reference_dir: pathlib.Path, out: pathlib.Path) -> None:
    """Names, shapes and parameter order of the full-size models of all six paper settings (no weights)."""
    import gzip

    import lzn.label_anchor
    import lzn.model

    settings = {}
    for reference_name, ours in PAPER_SETTINGS.items():
        config = _reference_config(reference_dir, reference_name)
        models = {"encoder": lzn.model.from_config(config.encoder)}
        if "decoder" in config:
            models["decoder"] = lzn.model.from_config(config.decoder)
        if config.get("training", {}).get("conditional", False):
            models["label_anchors"] = lzn.label_anchor.from_config(config.label_anchor)
        settings[ours] = {name: _manifest(model) for name, model in models.items()}
        del models
        print(f"{reference_name} -> {ours}: " + ", ".join(
            f"{n} {len(m['state_dict'])} tensors" for n, m in settings[ours].items()))
    with gzip.open(out / "paper_models.json.gz", "wt") as stream:
        json.dump(settings, stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "data")
    parser.add_argument("--reference_dir", type=pathlib.Path,
                        default=pathlib.Path(os.environ.get("LZN_REFERENCE_DIR", "/tmp/lznref")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    reference_dir = args.reference_dir.resolve()
    torch = _prepare_reference(reference_dir)
    sys.path.insert(0, str(HERE))
    import synthetic_weights

    torch.manual_seed(SEED)
    _joint_fixture(torch, reference_dir, args.out)
    torch.manual_seed(SEED)
    _gen256_fixture(torch, reference_dir, args.out, synthetic_weights)
    _resnet_fixture(torch, args.out, synthetic_weights)
    _paper_models_fixture(torch, reference_dir, args.out)


if __name__ == "__main__":
    main()
