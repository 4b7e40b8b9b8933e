"""Training step: throughput, compile time and compiled memory, side by side with the reference's PyTorch step.

  .venv/bin/python -m benchmarks.train --reference_dir /tmp/lznref --speed lzn,rf,solver,parts \
      --variants default,ynn_conv_off --step_variants ynn_conv_off --repeats 2 --memory none   # ~1 h on 2 cores
  .venv/bin/python -m benchmarks.train --speed none                            # the memory table (~30 min)
  .venv/bin/python -m benchmarks.train --speed none --memory cifar10_gen:125   # one memory row

A checkout of github.com/microsoft/latent-zoning-networks for --reference_dir: `git clone` it, or from a bare mirror
`git -C <mirror> archive HEAD | tar -x -C /tmp/lznref`. Its PyTorch side runs under --torch_python (default
.venv-torch/bin/python, which needs torch, numpy, scipy and ml_collections) in a worker process that imports
neither JAX nor lzn_jax; the two processes take turns, so no measurement shares the CPU with the other side.

1. Speed (--speed, default lzn,rf,solver): the full CIFAR10 models (float32) at per-device batch --batch (default
   8) on this machine's CPU. Every item is timed --repeats times, ours and the reference's interleaved (ours, ref,
   ours, ref, ...), after one untimed call each; the table gives the min and median seconds.
     lzn     one whole RF+LZN generation step of configs/cifar10_gen.py: uint8 batch -> encoder -> DPM-Solver++
             latents (20 steps) -> decoder -> rectified-flow loss -> backward -> clipping -> Adam -> EMA. Ours is
             `steps.make_step` jitted with the state donated, as lzn_jax/train/loop.py does; the reference's is its
             own `GenerationTrainer._train_iteration` (see "Reference" below).
     rf      the same for the Rectified Flow baseline, configs/cifar10_gen.py:rf (no encoder, no latent).
     solver  the latent computation alone at the step's shapes: the gradient of sum(latents * W) w.r.t. the (B, 200)
             anchors through DPM-Solver++ 20 steps (ours: zoning.compute_latents under jax.grad; the reference's:
             its DPMSolverLatentFlow forward + backward). "share" = solver / lzn step time. The solver is timed
             separately, not by replacing it with the identity inside the step.
     parts   (not in the default) the models alone in training mode: encoder forward, encoder forward + backward
             (gradient of sum(anchors * W) w.r.t. its params), decoder forward, decoder forward + backward
             (gradient of the rectified-flow loss w.r.t. its params; the latent is an input).
   The parameter values are random at the init's scales (GroupNorm scale 1, bias 0, kernels N(0, 1/fan_in)):
   a real `init` compiles hundreds of random-number kernels (minutes on this CPU) and values do not change the
   cost of dense float32 kernels.
2. Compile time of each of our jitted items (lowering + XLA compilation; the step's first call adds nothing).
3. Memory (--memory, default cifar10_gen:125,cifar10_joint:125,afhq_cat_gen:8,imagenet_repr:64, the paper's
   per-device batches): `jax.jit(step, donate_argnums=0).lower(abstract_state, abstract_batch).compile()
   .memory_analysis()` on the CPU backend, abstract inputs only (nothing allocated). One device holds the
   per-device batch; the zoning solver's (B_device, B_global) terms are missing from it, a few MB at these sizes.
   "peak" = argument + output - alias + temp: the state, the batch, the new state where it does not reuse the
   donated buffers, and XLA's temporaries (activations kept for the backward pass among them). It is CPU XLA's
   buffer assignment, an approximation of what a GPU or TPU compilation would need (different fusions, layouts,
   and rematerialisation); the fit verdicts compare it with a 16 GB TPU v5e chip and a 40 GB A100 and should be
   read with that margin.

Threads: JAX uses XLA:CPU's default thread pool (one thread per core; this machine has 2); the reference runs
with torch.set_num_threads(--threads, default 2). XLA flags go in XLA_FLAGS as usual (benchmarks/README.md,
"Training step", lists the ones measured).

Reference. Its trainer cannot be constructed on a CPU-only machine as it is: `lzn.model.ncsnpp_lib.op` compiles
CUDA kernels when imported, and its __init__ loads data, metrics and loggers. The worker therefore
  * registers a stub for `lzn.model.ncsnpp_lib.op` (upfirdn2d, used only by FIR resampling, which CIFAR10 does
    not use: fir=False) and for `matplotlib.pyplot` (imported by its metric items, used only to draw);
  * starts a one-process gloo process group (NCCL on a GPU), so its all_gathers and DistributedDataParallel work;
  * loads configs/lzn1/case_study_1_cifar10.py, sets the device to --reference_device, and builds a
    GenerationTrainer with `object.__new__` plus the trainer's own _initialize_{encoder,decoder,label_anchor,
    training_sampler,t_scheduler,losses,latent_flow,grad_scalar}, its EMA, optimizer and LR-scheduler factories,
    exactly as its __init__ does, minus data, metrics and loggers; on CPU, DDP gets device_ids=None instead of
    [local_rank];
  * times `trainer._train_iteration(data, label, prior_data)` (uniform images in [-1, 1], Gaussian prior).
  The RF step is the same trainer with the decoder's latent_dim 0, no encoder module, parameter group or EMA, and
  get_latent_from_data returning None (the reference has no RF config; this is its path with the encoder gone).

On a GPU (not yet run: no GPU was available to this project's sessions), --platform cuda runs our items on the GPU
(with --variants default: the other variants are XLA:CPU flags; JAX's preallocation is turned off, as the reference
shares the device) and --reference_device cuda the reference's: its tensors on the GPU, an NCCL process group, DDP
with the trainer's own device_ids, and torch.cuda.synchronize() around each timed call; --peak_tflops gives the FLOP
utilisation, and the memory rows are then the GPU compiler's own analysis. Float32 on both sides is what each
framework does by default there: XLA uses TF32 for float32 products and convolutions, PyTorch for its cuDNN
convolutions but not for its matmuls (torch.backends.cuda.matmul.allow_tf32 stays False), as a user of each gets.
The upfirdn2d stub stays (CIFAR10 does not use it), which also spares compiling the reference's CUDA extension. Our
side imports neither the training loop nor TensorFlow (the abstract state comes from lzn_jax.train.state): beyond
jax with its CUDA plugin, flax, optax, numpy, scipy and pillow it needs only ml_collections, which the reference
needs too.

Last measured (2-core AMD EPYC, shared: load 4-11; batch 8; min of 2 interleaved calls; full tables and the
analysis in benchmarks/README.md, "Training step"):
  LZN step [ynn_conv_off]  ours 17.6 s, reference 47.6 s: 2.70x the reference's throughput; compile 828 s
  RF step  [ynn_conv_off]  ours 19.4 s, reference 33.5 s: 1.73x; compile 355 s
  solver share of the LZN step: ours 0.03 %, reference 0.22 %; reference LZN / RF step time 1.42x
  decoder fwd+bwd: default 25.8 s (0.98x the reference), ynn_conv_off 13.5 s (1.87x): the flag's 1.91x
  memory peak GiB (default flags): cifar10_gen/joint@125 25.1, afhq_cat_gen@8 37.4, imagenet_repr@64 16.5:
  none fits a 16 GB v5e chip; all but afhq_cat_gen (0.2 GiB over) fit a 40 GB A100
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MEMORY = "cifar10_gen:125,cifar10_joint:125,afhq_cat_gen:8,imagenet_repr:64"
# XLA compile options our items can be compiled with, side by side in one run (`compile(compiler_options=...)`;
# the same as XLA_FLAGS for this process). XLA:CPU in jax 0.12 hands convolutions to YNNPACK by default, whose
# kernel-gradient (weight-gradient) convolutions are 4-11x slower than XLA's own (Eigen) convolutions on this CPU;
# "ynn_conv_off" keeps YNNPACK for dots only. The XLA_FLAGS equivalent is
# --xla_cpu_experimental_ynn_fusion_type=-individual_convolution.
VARIANTS = {
    "default": None,
    "ynn_conv_off": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""},
}
# Accelerator memory the fit verdicts compare with (bytes).
TPU_V5E_BYTES = 16 * 10**9
A100_40GB_BYTES = 40 * 10**9


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch of the speed items (paper: 125)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per item after one untimed call")
    parser.add_argument("--speed", default="lzn,rf,solver", help="comma-separated subset of lzn,rf,solver,parts; "
                        "'none' for no speed items")
    parser.add_argument("--memory", default=DEFAULT_MEMORY, help="config:per_device_batch,... or 'none'")
    parser.add_argument("--reference_dir", default=None, help="checkout of microsoft/latent-zoning-networks")
    parser.add_argument("--torch_python", default=str(REPO / ".venv-torch" / "bin" / "python"))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads of the reference")
    parser.add_argument("--variants", default="default", help="comma-separated XLA compile variants of our items: "
                        + ", ".join(VARIANTS) + " (see VARIANTS)")
    parser.add_argument("--step_variants", default=None, help="variants of the whole steps (lzn, rf) only; "
                        "default: --variants (a whole step compiles for minutes on 2 cores)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak TFLOP/s at the step's "
                        "precision (e.g. 989 for H100/H200 dense bf16, 67 for float32 without TF32): prints the "
                        "FLOP utilisation of the whole steps")
    parser.add_argument("--memory_variant", default="default", help="the XLA variant the memory rows compile with")
    parser.add_argument("--platform", default="cpu", help="the JAX backend of our items: cpu, or cuda on a GPU "
                        "(then --variants default: the other variants are XLA:CPU flags)")
    parser.add_argument("--reference_device", default="cpu", help="the reference's torch device: cpu or cuda")
    parser.add_argument("--reference_worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _summary(seconds: list[float]) -> tuple[float, float]:
    return min(seconds), statistics.median(seconds)


# ===============================================================================================================
# The reference's side (runs under --torch_python; imports torch and the reference only)
# ===============================================================================================================


def _reference_worker(args) -> None:
    """Reads item names from stdin, one per line; answers each with one JSON line {"seconds": ...}."""
    import importlib.util
    import tempfile
    import types

    import torch

    torch.set_num_threads(args.threads)
    reference = os.path.abspath(args.reference_dir)
    sys.path.insert(0, reference)

    def unavailable(*_, **__):
        raise NotImplementedError("upfirdn2d is a CUDA extension of the reference; this benchmark stubs it out")

    op = types.ModuleType("lzn.model.ncsnpp_lib.op")
    op.upfirdn2d = unavailable
    sys.modules["lzn.model.ncsnpp_lib.op"] = op
    pyplot = types.ModuleType("matplotlib.pyplot")
    sys.modules.setdefault("matplotlib", types.ModuleType("matplotlib")).pyplot = pyplot
    sys.modules["matplotlib.pyplot"] = pyplot

    import torch.distributed as dist

    store = tempfile.NamedTemporaryFile(prefix="lzn_gloo_", delete=False).name
    os.unlink(store)
    on_gpu = args.reference_device == "cuda"
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{store}", rank=0, world_size=1)

    import lzn.model
    import lzn.optimizer
    import lzn.prior
    from lzn.trainer import generation_trainer

    if not on_gpu:
        # DDP of CPU modules takes device_ids=None; the trainer passes [local_rank] (a GPU index).
        ddp = generation_trainer.CustomDistributedDataParallel
        generation_trainer.CustomDistributedDataParallel = lambda module, device_ids=None, **kw: ddp(module, **kw)

    def load_config():
        path = os.path.join(reference, "configs", "lzn1", "case_study_1_cifar10.py")
        spec = importlib.util.spec_from_file_location("reference_cifar10_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        config.distributed.device = args.reference_device
        config.distributed.local_rank = 0
        return config

    def build(rf: bool):
        """GenerationTrainer.__init__ minus data, metrics, loggers and evaluation samplers."""
        config = load_config()
        trainer = object.__new__(generation_trainer.GenerationTrainer)
        if rf:
            config.decoder.params.latent_dim = 0
        trainer._config = config
        trainer._prior = lzn.prior.from_config(config.prior)
        if rf:
            trainer._encoder = torch.nn.Module()  # no parameters; train()/eval() still work
            trainer.get_latent_from_data = lambda **_: None
            trainer._encoder_enabled = True  # what _initialize_encoder sets
        else:
            trainer._initialize_encoder()
        trainer._initialize_decoder()
        trainer._initialize_label_anchor()
        trainer._initialize_training_sampler()
        trainer._initialize_t_scheduler()
        trainer._initialize_losses()
        trainer._initialize_latent_flow()
        trainer._initialize_grad_scalar()
        trainer._decoder_ema = lzn.model.ema_from_config(trainer._decoder.parameters(), config.decoder_ema)
        trainer._encoder_ema = None if rf else lzn.model.ema_from_config(trainer._encoder.parameters(),
                                                                         config.encoder_ema)
        trainer._label_anchor_ema = None
        groups = [(None if rf else trainer._encoder, config.optimizer.additional_params.encoder_lr),
                  (trainer._decoder, config.optimizer.additional_params.decoder_lr), (None, None)]
        trainer._optimizer = lzn.optimizer.from_config(groups, config.optimizer)
        trainer._lr_scheduler = lzn.optimizer.lr_scheduler_from_config(trainer._optimizer, config.lr_scheduler)
        trainer._parameters = list(trainer._decoder.parameters()) + (
            [] if rf else list(trainer._encoder.parameters()))
        trainer._epoch = trainer._iteration = 0
        return trainer

    torch.manual_seed(0)
    if on_gpu:  # only there: a default device adds a little to every torch call
        torch.set_default_device(args.reference_device)
    batch = args.batch
    data = torch.rand(batch, 3, 32, 32) * 2 - 1
    label = torch.zeros(batch, dtype=torch.long)
    prior = torch.randn(batch, 200)
    trainers = {}

    def trainer(kind):
        if kind not in trainers:
            trainers[kind] = build(rf=kind == "rf")
        return trainers[kind]

    def step(kind):
        def run():
            trainer(kind)._train_iteration(data=data, label=label, prior_data=prior)
        trainer(kind)
        return run

    def solver():
        flow = trainer("lzn")._encoder_latent_flow
        anchors = torch.randn(batch, 200, requires_grad=True)
        weights = torch.randn(batch, 200)

        def run():
            latents = flow(full_encoded=anchors, encoded=anchors, prior_data=prior, num_steps=20)
            (latents * weights).sum().backward()
        return run

    def parts():
        lzn_trainer = trainer("lzn")
        encoder = lzn_trainer._encoder.model.module
        decoder = lzn_trainer._decoder.model.module
        encoder.train()
        decoder.train()
        weights = torch.randn(batch, 200)
        latent = torch.randn(batch, 200)
        t = torch.rand(batch)
        noise = torch.randn_like(data)
        xt = t[:, None, None, None] * data + (1 - t[:, None, None, None]) * noise

        def encoder_fwd():
            with torch.no_grad():
                encoder(data)

        def encoder_fwd_bwd():
            encoder.zero_grad()
            (encoder(data) * weights).sum().backward()

        def decoder_fwd():
            with torch.no_grad():
                decoder(latent=latent, label=None, t=t, xt=xt)

        def decoder_fwd_bwd():
            decoder.zero_grad()
            ((decoder(latent=latent, label=None, t=t, xt=xt) - (data - noise)) ** 2).mean().backward()
        return {"encoder fwd": encoder_fwd, "encoder fwd+bwd": encoder_fwd_bwd, "decoder fwd": decoder_fwd,
                "decoder fwd+bwd": decoder_fwd_bwd}

    functions = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name or name == "quit":
            break
        if name not in functions:
            if name in ("lzn", "rf"):
                functions[name] = step(name)
            elif name == "solver":
                functions[name] = solver()
            else:
                functions.update(parts())
            functions[name]()  # untimed first call
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        functions[name]()
        if on_gpu:
            torch.cuda.synchronize()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


class _Reference:
    """The worker process, driven one item at a time."""

    def __init__(self, args):
        command = [args.torch_python, str(pathlib.Path(__file__).resolve()), "--reference_worker",
                   "--reference_dir", args.reference_dir, "--batch", str(args.batch), "--threads", str(args.threads),
                   "--reference_device", args.reference_device]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=args.reference_dir)
        self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference worker exited (code {self.process.wait()}); see its stderr above")
        return json.loads(line)

    def time(self, name: str) -> float:
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return self._read()["seconds"]

    def close(self):
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait()


# ===============================================================================================================
# Our side
# ===============================================================================================================


def _load_config(name: str):
    """``name`` is a configs/ module, optionally with ``:variants`` (``cifar10_gen:rf``)."""
    import importlib

    module, _, variants = name.partition(":")
    return importlib.import_module(f"configs.{module}").get_config(variants)


def _setting(name: str, per_device_batch: int):
    """(config, modules, optimizer, step function) of a config at one device holding ``per_device_batch`` rows."""
    from lzn_jax.data.device import model_inputs_fn
    from lzn_jax.train import optim, steps
    from lzn_jax.train.state import build_modules

    config = _load_config(name)
    config.data.batch_size = per_device_batch
    config.num_devices = 1
    modules = build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    step = steps.make_step(config, steps.StepFunctions(modules, optimizer, model_inputs_fn(config.data)))
    return config, modules, optimizer, step


def _abstract_batch(config, batch: int, sharding):
    """What the pipeline yields for ``config.data``: uint8 images (or two views) and int32 labels."""
    import jax
    import jax.numpy as jnp

    from lzn_jax.train.state import encoder_input_channels

    size = config.data.image_size
    if config.data.augmentation == "two_view":
        if config.data.augment_on != "host":
            raise NotImplementedError("the benchmark builds host-augmented two-view batches only")
        images = {"views": jax.ShapeDtypeStruct((batch, 2, size, size, 3), jnp.uint8, sharding=sharding)}
    else:
        channels = encoder_input_channels(config.data)
        images = {"image": jax.ShapeDtypeStruct((batch, size, size, channels), jnp.uint8, sharding=sharding)}
    return {**images, "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)}


def _concrete(abstract, seed: int = 0):
    """Arrays for an abstract state at the init's scales (Adam moments and counters zero), without compiling init."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [str(getattr(entry, "key", getattr(entry, "name", ""))) for entry in path]
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or "opt_state" in names:
            return jnp.zeros(leaf.shape, leaf.dtype)
        if names[-1] == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if names[-1] == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _step_item(name: str, batch: int, options=None):
    """(compile seconds, call) of one whole training step; ``call()`` runs a step on the carried state."""
    import jax
    import numpy as np

    from lzn_jax.train import state as train_state

    config, modules, optimizer, step = _setting(name, batch)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = train_state.abstract_train_state(config, modules, optimizer, device)
    abstract_batch = _abstract_batch(config, batch, device)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(abstract, abstract_batch).compile(compiler_options=options)
    compile_s = time.perf_counter() - start
    rng = np.random.default_rng(1)
    inputs = {key: jax.device_put(rng.integers(0, 255, leaf.shape).astype(leaf.dtype) if key != "label" else
                                  np.zeros(leaf.shape, leaf.dtype), device) for key, leaf in abstract_batch.items()}
    holder = {"state": _concrete(abstract)}

    def call():
        holder["state"], metrics = compiled(holder["state"], inputs)
        jax.block_until_ready((holder["state"], metrics))
    call.flops = _compiled_flops(compiled)
    return compile_s, call


def _compiled_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOP count of one call (None where the backend gives none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _timed_compile(fn, *args, options=None):
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)
    return time.perf_counter() - start, compiled


def _solver_item(batch: int, compiler_options=None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lzn_jax import zoning
    from lzn_jax.objectives.generation import solver_options

    config = _load_config("cifar10_gen")
    options = solver_options(config.generation.latent_solver)
    rng = np.random.default_rng(2)
    anchors, noise, weights = (jnp.asarray(rng.standard_normal((batch, config.latent_dim)), jnp.float32)
                               for _ in range(3))
    grad = jax.grad(lambda a, n: jnp.sum(zoning.compute_latents(a, n, options=options) * weights))
    compile_s, compiled = _timed_compile(grad, anchors, noise, options=compiler_options)
    return compile_s, lambda: jax.block_until_ready(compiled(anchors, noise))


def _part_items(batch: int, options=None):
    """{name: (compile seconds, call)} of the models alone in training mode (see the docstring's "parts")."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    config, modules, optimizer, _ = _setting("cifar10_gen", batch)
    from lzn_jax.train import state as train_state

    abstract = train_state.abstract_train_state(config, modules, optimizer, jax.sharding.SingleDeviceSharding(
        jax.devices()[0]))
    params = _concrete(abstract).params
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(-1, 1, (batch, 32, 32, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    t = jnp.asarray(rng.uniform(1e-3, 1, batch), jnp.float32)
    latent, weights = (jnp.asarray(rng.standard_normal((batch, 200)), jnp.float32) for _ in range(2))
    x_t = t[:, None, None, None] * images + (1 - t[:, None, None, None]) * noise
    key = jax.random.key(4)
    encoder, decoder = modules.encoder, modules.decoder

    def encode(p):
        return encoder.apply({"params": p}, images, train=True, rngs={"dropout": key})

    def rf_loss(p):
        velocity = decoder.apply({"params": p}, x_t, t, latent, train=True, rngs={"dropout": key})
        return jnp.mean((velocity - (images - noise)) ** 2)

    functions = {
        "encoder fwd": (encode, params["encoder"]),
        "encoder fwd+bwd": (jax.grad(lambda p: jnp.sum(encode(p) * weights)), params["encoder"]),
        "decoder fwd": (rf_loss, params["decoder"]),
        "decoder fwd+bwd": (jax.grad(rf_loss), params["decoder"]),
    }
    items = {}
    for name, (fn, arg) in functions.items():
        compile_s, compiled = _timed_compile(fn, arg, options=options)
        items[name] = (compile_s, lambda compiled=compiled, arg=arg: jax.block_until_ready(compiled(arg)))
    return items


def _speed(args) -> None:
    import jax

    wanted = [name for name in args.speed.split(",") if name and name != "none"]
    if not wanted:
        return
    variants = args.variants.split(",")
    step_variants = (args.step_variants or args.variants).split(",")
    for variant in set(variants) | set(step_variants):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    items = {}  # (item, variant) -> call; the reference runs each item once, whatever the variant
    compile_times = {}
    print(f"\ncompiling (batch {args.batch}) ...", flush=True)
    for name in wanted:
        for variant in (step_variants if name in ("lzn", "rf") else variants):
            options = VARIANTS[variant]
            if name in ("lzn", "rf"):
                compile_times[name, variant], items[name, variant] = _step_item(
                    "cifar10_gen" + (":rf" if name == "rf" else ""), args.batch, options)
            elif name == "solver":
                compile_times[name, variant], items[name, variant] = _solver_item(args.batch, options)
            elif name == "parts":
                for part, (compile_s, call) in _part_items(args.batch, options).items():
                    compile_times[part, variant], items[part, variant] = compile_s, call
            else:
                raise ValueError(f"unknown speed item {name!r}")
            print(f"  {name} [{variant}] compiled", flush=True)
    names = list(dict.fromkeys(name for name, _ in items))
    reference = _Reference(args) if args.reference_dir else None
    ours = {key: [] for key in items}
    theirs = {name: [] for name in names}
    try:
        for key, call in items.items():  # untimed first calls
            call()
        if reference:
            for name in names:
                reference.time(name)
        for _ in range(args.repeats):
            for name in names:
                for key in [key for key in items if key[0] == name]:
                    start = time.perf_counter()
                    items[key]()
                    ours[key].append(time.perf_counter() - start)
                if reference:
                    theirs[name].append(reference.time(name))
    finally:
        if reference:
            reference.close()

    print(f"\nspeed: batch {args.batch}, float32, {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
          f"{args.repeats} interleaved repeats; seconds min / median; ratios from the minima")
    print(f"{'item':16s} {'variant':12s} {'ours s':>15s} {'ref s':>15s} {'ours img/s':>10s} {'ref img/s':>10s} "
          f"{'ours/ref speed':>14s} {'compile s':>9s}")
    for (name, variant) in items:
        o_min, o_med = _summary(ours[name, variant])
        line = f"{name:16s} {variant:12s} {o_min:7.3f}/{o_med:7.3f} "
        if theirs[name]:
            r_min, r_med = _summary(theirs[name])
            line += f"{r_min:7.3f}/{r_med:7.3f} {args.batch / o_min:10.2f} {args.batch / r_min:10.2f} " \
                    f"{r_min / o_min:14.2f}"
        else:
            line += f"{'-':>15s} {args.batch / o_min:10.2f} {'-':>10s} {'-':>14s}"
        print(line + f" {compile_times[name, variant]:9.1f}")
    best = lambda name, variant: min(ours[name, variant])  # noqa: E731
    for (name, variant), call in items.items():
        flops = getattr(call, "flops", None)
        if flops:
            achieved = flops / best(name, variant) / 1e12
            line = f"{name} [{variant}]: {flops / 1e9:.1f} GFLOP per step (XLA cost analysis), {achieved:.2f} TFLOP/s"
            if args.peak_tflops:
                line += f", {100 * achieved / args.peak_tflops:.1f}% of the {args.peak_tflops} TFLOP/s peak given"
            print(line)
    for variant in variants:
        if variant != "default" and "default" in variants:
            for name in names:
                if (name, variant) in items and (name, "default") in items:
                    print(f"{name} [{variant}] / [default] speed: {best(name, 'default') / best(name, variant):.2f}x")
    for variant in step_variants:
        if ("lzn", variant) in items and ("rf", variant) in items:
            text = f"LZN step / RF step time [{variant}]: ours {best('lzn', variant) / best('rf', variant):.2f}x"
            if theirs["lzn"]:
                text += f", reference {min(theirs['lzn']) / min(theirs['rf']):.2f}x"
            print(text)
        if ("lzn", variant) in items and ("solver", variants[0]) in items:
            text = f"solver share of the LZN step [{variant}]: ours " \
                   f"{100 * best('solver', variants[0]) / best('lzn', variant):.2f}%"
            if theirs["lzn"]:
                text += f", reference {100 * min(theirs['solver']) / min(theirs['lzn']):.2f}%"
            print(text)


# ----------------------------------------------------------------------------------------------------- memory


def _memory(args) -> None:
    import jax

    from lzn_jax.train import state as train_state

    settings = [entry for entry in args.memory.split(",") if entry and entry != "none"]
    if not settings:
        return
    gib = lambda n: n / 2**30  # noqa: E731
    print(f"\ncompiled memory per device (XLA:{jax.default_backend().upper()} memory_analysis [{args.memory_variant}], "
          "abstract inputs; GiB; "
          "peak = arg + out - alias + temp)")
    print(f"{'setting':22s} {'batch':>5s} {'args':>7s} {'out':>7s} {'alias':>7s} {'temp':>7s} {'code':>7s} "
          f"{'peak':>7s} {'v5e 16GB':>9s} {'A100 40GB':>9s} {'compile s':>9s}")
    for entry in settings:
        name, _, per_device = entry.rpartition(":")
        batch = int(per_device)
        config, modules, optimizer, step = _setting(name, batch)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = train_state.abstract_train_state(config, modules, optimizer, device)
        start = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(abstract, _abstract_batch(config, batch, device)).compile(
            compiler_options=VARIANTS[args.memory_variant])
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        sizes = {key: getattr(memory, f"{key}_size_in_bytes") for key in
                 ("argument", "output", "alias", "temp", "generated_code")}
        peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
        verdict = lambda capacity: "fits" if peak <= capacity else "no"  # noqa: E731
        print(f"{name:22s} {batch:5d} {gib(sizes['argument']):7.2f} {gib(sizes['output']):7.2f} "
              f"{gib(sizes['alias']):7.2f} {gib(sizes['temp']):7.2f} {gib(sizes['generated_code']):7.3f} "
              f"{gib(peak):7.2f} {verdict(TPU_V5E_BYTES):>9s} {verdict(A100_40GB_BYTES):>9s} {compile_s:9.1f}",
              flush=True)
        del compiled


def main(argv=None) -> None:
    args = _parse(argv)
    if args.reference_worker:
        _reference_worker(args)
        return
    sys.path.insert(0, str(REPO))
    if args.platform != "cpu":
        unknown = [v for v in {*args.variants.split(","), *(args.step_variants or "").split(","),
                               args.memory_variant} if v and v != "default"]
        if unknown:
            raise SystemExit(f"--platform {args.platform} takes --variants default only: {sorted(unknown)} are "
                             "XLA:CPU flags")
        # The reference worker shares the GPU with this process: JAX must not take 75 % of it up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    jax.config.update("jax_platforms", args.platform)
    print(f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cores, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    _speed(args)
    _memory(args)


if __name__ == "__main__":
    main()
