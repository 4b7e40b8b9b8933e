"""What every training config shares: the full key set at its defaults, variant parsing, and the shrinking
that ``:smoke`` applies. A setting file starts from ``base_config()`` and changes only what differs.

Plain Python and ml_collections only (the model presets are plain dicts), so parsing a config never imports JAX.
Keys are documented where they are set; docs/design.md ("Configs") lists them by block.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import ml_collections
from ml_collections.config_dict import placeholder

from lzn_jax.data.config import default_config as default_data_config
from lzn_jax.models import presets

# The trainable modules, in the order the reference builds its optimiser's parameter groups.
MODULES = ("encoder", "decoder", "label_anchors")


def parse_variants(arg: str, known: Iterable[str]) -> frozenset[str]:
    """``"rf,smoke"`` -> ``{"rf", "smoke"}``; an unknown or repeated name raises ValueError naming the valid ones."""
    known = tuple(known)
    names = [name.strip() for name in arg.split(",") if name.strip()] if arg else []
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown config variant(s) {unknown}; this config accepts {sorted(known)} (comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError(f"config variant repeated in {arg!r}")
    return frozenset(names)


def per_module(**values) -> ml_collections.ConfigDict:
    """A block with one value per trainable module (missing modules get 0.0, i.e. unused)."""
    block = ml_collections.ConfigDict()
    for module in MODULES:
        block[module] = float(values.get(module, 0.0))
    return block


def solver_block(solver: str, num_steps: int, eps: float | None = None) -> ml_collections.ConfigDict:
    """A zoning solver's settings (fields of ``zoning.SolverOptions``; eps unset: the solver's own default).

    The kernel keys keep the library's defaults: ``block_size`` unset is the dense kernel (an int streams over
    anchor blocks of that size, memory independent of the global batch: docs/scaling.md), ``remat="auto"``
    rematerialises each step's posterior only when keeping them all would exceed ``memory_budget_bytes`` per device
    (unset: ``zoning.SolverOptions``' default, 2 GiB; named, not imported, because parsing a config imports no jax).
    """
    block = ml_collections.ConfigDict()
    block.solver = solver
    block.num_steps = num_steps
    block.eps = placeholder(float) if eps is None else float(eps)
    block.block_size = placeholder(int)
    block.remat = "auto"
    block.memory_budget_bytes = placeholder(int)
    return block


def model_block(preset: dict | None) -> ml_collections.ConfigDict | None:
    """A model preset (``lzn_jax.models.presets``) as a ConfigDict; None stays None (no such module)."""
    return None if preset is None else ml_collections.ConfigDict(copy.deepcopy(preset))


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, at the reference's shared defaults (docs/design.md, "Configs")."""
    config = ml_collections.ConfigDict()
    # "generation" (case studies 1 and 3: encoder -> latents -> rectified-flow decoder, plus the label alignment
    # when there are label anchors) or "contrastive" (case study 2: two views, alignment of view 0's latents to
    # view 1's anchors).
    config.objective = "generation"
    # Seed of the weights and of every random draw in a step (noise, times, dropout); data.seed orders the data.
    config.seed = 0
    config.latent_dim = 200

    config.data = default_data_config()

    config.model = ml_collections.ConfigDict()
    # Model presets (a dict with a "name" the registry knows), or None where the setting has no such module
    # (no encoder in a rectified-flow baseline, no decoder in case study 2, no label anchors outside case study 3).
    config.model.encoder = None
    config.model.decoder = None
    config.model.label_anchors = None
    # Compute dtype of convolutions and matmuls in the models ("float32" or "bfloat16"); params stay float32, the
    # solver and the losses float32 always.
    config.model.dtype = "float32"
    # Rematerialise the image models' blocks (NCSN++ residual and attention blocks, ResNet bottlenecks): each block
    # keeps only its input for the backward pass and recomputes the rest there, trading most of one more forward
    # pass for activation memory (docs/scaling.md, "Global batch 65,536"). Same values and gradients, same dropout
    # masks. Off in the paper's settings, as in the reference.
    config.model.remat = False

    config.optim = ml_collections.ConfigDict()
    # Adam learning rate per module (0.0: the module does not exist in this setting).
    config.optim.learning_rate = per_module()
    # Iterations during which each module trains; from then on it is frozen (params, Adam moments and EMA
    # untouched). Training stops at the largest.
    config.optim.num_iterations = ml_collections.ConfigDict({module: 0 for module in MODULES})
    # Linear warm-up of every learning rate from warmup_init_factor to 1 over warmup_steps successful updates.
    config.optim.warmup_steps = 5000
    config.optim.warmup_init_factor = 1.0 / 5000
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    # Global L2 norm of the gradients of all trainable (unfrozen) modules is clipped to this.
    config.optim.grad_clip_norm = 1.0
    # Modules with at most this many trainable values are updated (Adam, clipping, EMA) as one vector, larger ones
    # leaf by leaf: the same numbers, but a vector compiles about twice as fast for small models and runs 3x slower
    # for the paper's (lzn_jax/train/vectors.py; docs/design.md, "Optimisation").
    config.optim.vector_update_max_size = 4_000_000

    config.ema = ml_collections.ConfigDict()
    # EMA decay per module; the effective decay is min(decay, (1 + n) / (10 + n)) with n the module's update count.
    config.ema.decay = per_module()

    config.generation = ml_collections.ConfigDict()
    # The image latent flow (anchors -> latents), DPM-Solver++(3M) from t = 1e-3 to 0.999 in every paper setting.
    config.generation.latent_solver = solver_block("dpm_solver++", 20)
    # Scale alpha of the prior draw that starts the latent flow.
    config.generation.prior_scale = 1.0
    # Rectified-flow times are drawn uniformly from [rf_time_eps, 1] (noise at 0, data at 1).
    config.generation.rf_time_eps = 1e-3
    config.generation.rf_loss_weight = 1.0
    # The label flow of case study 3: reverse Euler over the label anchors with global-batch class weights.
    config.generation.label_solver = solver_block("euler", 100)
    config.generation.label_cut_off = 0.2
    config.generation.label_loss_weight = 1.0
    config.generation.label_use_log = False

    config.contrastive = ml_collections.ConfigDict()
    # Latents of view 0 (forward Euler from t = 1e-4), then the reverse flow over view 1's anchors.
    config.contrastive.latent_solver = solver_block("euler", 20, eps=1e-4)
    config.contrastive.prior_scale = 0.45
    config.contrastive.alignment_solver = solver_block("euler", 20)
    config.contrastive.cut_off = 0.2
    # Weights of -mean max p and of -mean log max p (the reference uses only the log form).
    config.contrastive.prob_loss_weight = 0.0
    config.contrastive.log_loss_weight = 1.0
    # Encode each device's 2 x B_device view rows in this many sequential chunks, twice (gradient caching,
    # objectives/contrastive.py, encoded_in_chunks): the encoder's activation memory falls by this factor for one
    # extra forward pass, and the gradient stays the one-pass gradient. 1: one pass (the reference's way).
    config.contrastive.encoder_chunks = 1

    # --mode=eval (lzn_jax/train/evaluate.py): what the evaluation of the latest checkpoint computes. Sizes of 0
    # switch a metric off; the setting files turn on the paper's (docs/evaluation.md).
    config.eval = ml_collections.ConfigDict()
    config.eval.use_ema = True  # the paper evaluates the EMA weights
    # Image samplers of the decoder, each metric computed once per sampler: "euler" (euler_steps steps) and
    # "dopri5" (adaptive, rtol = atol = 1e-5, the batch as one ODE state as the reference solves it).
    config.eval.samplers = ("euler",)
    config.eval.euler_steps = 10
    # Reconstruction error: this many training images (no flip) as one batch, num_draws prior draws each.
    config.eval.reconstruction_num_images = 0
    config.eval.reconstruction_draws = 20
    # Classification accuracy of a joint model at each prior scale alpha (the "tunable std" sweep), in batches of
    # train.accuracy_batch_size of split train.accuracy_split, uniform and batch-label class weights.
    config.eval.accuracy_prior_scales = ()
    # FID / sFID / IS / precision-recall of this many generated images against the training split (all of it,
    # or fid_num_reference images); the Inception weights file comes from inception_weights (a path) or the cache.
    config.eval.fid_num_samples = 0
    config.eval.fid_num_reference = placeholder(int)
    config.eval.fid_batch_size = 100
    config.eval.inception_weights = placeholder(str)
    # Where training-set statistics are cached (default: ~/.cache/lzn_jax/fid_statistics).
    config.eval.fid_statistics_dir = placeholder(str)
    # Representation models: k-NN and ridge probes, and a trained linear probe of this many epochs (0: none).
    config.eval.probes = True
    config.eval.linear_probe_epochs = 0
    config.eval.linear_probe_batch_size = 8192
    config.eval.linear_probe_learning_rate = 3e-4
    # Train the linear probe on one freshly augmented view per training image every epoch (the training
    # augmentation, data.augmentation) instead of fixed unaugmented features. Costs an encoder pass per epoch.
    config.eval.linear_probe_augment = False

    config.train = ml_collections.ConfigDict()
    # A non-finite loss or gradient norm skips the update; this many skips in a row stop the run.
    config.train.max_consecutive_skips = 20
    config.train.log_every_steps = 100
    # Sample grid (generation) or assignment curve (contrastive) written into the workdir; 0: never.
    config.train.sample_every_steps = 5000
    config.train.num_sample_images = 100
    config.train.sample_num_steps = 10
    # An optional profiler window on process 0: steps [profile_start_step, + profile_num_steps); unset: none.
    config.train.profile_start_step = placeholder(int)
    config.train.profile_num_steps = 5
    # At the end of a run with label anchors: classification accuracy on data split accuracy_split, solved in
    # batches of accuracy_batch_size (transductive, alpha 1, uniform class weights; a partial last batch is left
    # out and the count reported). 0: no accuracy.
    config.train.accuracy_split = "test"
    config.train.accuracy_batch_size = 0
    # At the end of a contrastive run: weighted k-NN and ridge-probe accuracy of the encoder's features, fitted on
    # data.split and scored on accuracy_split (lzn_jax/evaluation/probes.py). Every feature is held on the host,
    # so this suits small data sets; the paper's trained linear probe is a separate evaluation.
    config.train.end_probes = False
    # Implicit host<->device transfers are errors during training ("allow" to debug).
    config.train.transfer_guard = "disallow"

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    # How many recent checkpoints to keep (the newest complete one is never deleted).
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True
    # Resume order: the workdir's own checkpoint, then resume_from (a checkpoint directory of another run, whole
    # state), then init_from (params only), then scratch.
    config.checkpoint.resume_from = placeholder(str)
    config.checkpoint.init_from = placeholder(str)

    # Devices of the 1-D data mesh; unset: all devices of all hosts.
    config.num_devices = placeholder(int)
    return config


def set_generation_iterations(config, *, encoder: int, decoder: int, label_anchors: int = 0) -> None:
    """Stage lengths of a generation setting (the reference's names: num_encoder/decoder/label_anchor_iterations)."""
    config.optim.num_iterations.encoder = encoder
    config.optim.num_iterations.decoder = decoder
    config.optim.num_iterations.label_anchors = label_anchors


def paper_generation_eval(config: ml_collections.ConfigDict, *, fid_num_samples: int,
                          reconstruction_num_images: int) -> None:
    """The paper's evaluation of a generation setting: both samplers (Dormand-Prince, as the paper's RK45, and
    Euler 10), FID-type metrics of ``fid_num_samples`` images against the training set, and the reconstruction
    error of ``reconstruction_num_images`` training images (20 draws)."""
    config.eval.samplers = ("dopri5", "euler")
    config.eval.fid_num_samples = fid_num_samples
    config.eval.reconstruction_num_images = reconstruction_num_images


def image256_generation_config(arg: str, *, data_name: str, encoder_learning_rate: float, num_iterations: int,
                               ema_decay: float, fid_num_samples: int) -> ml_collections.ConfigDict:
    """Case study 1 at 256x256 (AFHQ-Cat, CelebA-HQ, LSUN-Bedroom): the settings share everything but the data
    set, the encoder's learning rate, the iteration count, the EMA decay and the FID sample count.

    Variants ``arg``: ``rf`` (the plain RF baseline) and ``smoke`` (16x16 images, two levels: the 256 structure,
    FIR, skips and Fourier time, at toy size).
    """
    variants = parse_variants(arg, ("rf", "smoke"))
    config = base_config()
    config.objective = "generation"
    config.latent_dim = 200

    # Flip, then the shorter side resized to image_size (data.resize_size unset); labels unused.
    config.data.name = data_name
    config.data.image_size = 256
    config.data.augmentation = "flip"
    config.data.batch_size = 256  # global

    config.model.encoder = model_block(presets.image256_encoder_config(config.latent_dim))
    config.model.decoder = model_block(presets.image256_decoder_config(config.latent_dim))

    # Adam (0.9, 0.999, 1e-8), warm-up from 1/5000 over 5000 steps, clipping at 1.0: base_config's defaults.
    config.optim.learning_rate = per_module(encoder=encoder_learning_rate, decoder=2e-4)
    set_generation_iterations(config, encoder=num_iterations, decoder=num_iterations)
    config.ema.decay = per_module(encoder=ema_decay, decoder=ema_decay)

    # Image latents: DPM-Solver++(3M), 20 steps from t = 1e-3 to 0.999, unscaled prior; RF times ~ U[1e-3, 1].
    config.generation.latent_solver = solver_block("dpm_solver++", 20)
    config.generation.prior_scale = 1.0
    config.generation.rf_time_eps = 1e-3
    config.generation.rf_loss_weight = 1.0

    config.checkpoint.every_steps = 2000
    config.train.sample_every_steps = 10_000
    config.train.num_sample_images = 256
    paper_generation_eval(config, fid_num_samples=fid_num_samples, reconstruction_num_images=256)

    if "rf" in variants:
        apply_rectified_flow_baseline(config)
    if "smoke" in variants:
        apply_smoke(config)
    return config


def apply_rectified_flow_baseline(config: ml_collections.ConfigDict) -> None:
    """``:rf``: the same decoder without the latent (latent_dim 0) and without encoder and latent flow.

    The one-hot class input of a conditional decoder stays, so ``cifar10_joint.py:rf`` is the class-conditional RF.
    The label anchors go too: with no encoder there is no latent to align.
    """
    config.model.encoder = None
    config.model.label_anchors = None
    config.model.decoder.latent_dim = 0
    config.optim.learning_rate.encoder = 0.0
    config.optim.learning_rate.label_anchors = 0.0
    config.optim.num_iterations.encoder = 0
    config.optim.num_iterations.label_anchors = 0
    config.ema.decay.encoder = 0.0
    config.ema.decay.label_anchors = 0.0


def apply_smoke(config: ml_collections.ConfigDict, *, image_size: int = 16) -> None:
    """``:smoke``: the same wiring with tiny widths, a batch of 8 and 2 iterations, for tests and laptops.

    Every architectural switch of the setting (FIR, input/output skips, Fourier time, scale_by_sigma, dropout,
    heads) is kept; only sizes shrink. The NCSN++ models keep two levels so that skips and resampling are exercised.
    """
    config.data.batch_size = 8
    config.data.image_size = image_size
    if config.data.resize_size is not None:
        config.data.resize_size = image_size
    config.data.num_workers = 0
    config.data.prefetch_buffer_size = 16
    for name in ("encoder", "decoder"):
        block = config.model[name]
        if block is None:
            continue
        if block.name.startswith("ncsnpp"):
            block.nf = 16
            block.ch_mult = (1, 2)
            block.num_res_blocks = 1
            block.attn_resolutions = (image_size // 2,)
            if "latent_transformation_resolutions" in block and block.latent_transformation_resolutions is not None:
                block.latent_transformation_resolutions = (image_size // 2,)
            if "num_base_units" in block:
                block.num_base_channels = 4
                block.num_base_units = 16
        elif block.name == "resnet50_gn":
            block.stage_sizes = (1, 1, 1, 1)
    for module in MODULES:
        if config.optim.num_iterations[module]:
            config.optim.num_iterations[module] = 2
    config.optim.warmup_steps = 2
    config.train.log_every_steps = 1
    config.train.sample_every_steps = 0
    config.train.num_sample_images = 8
    config.train.accuracy_batch_size = 0
    config.train.end_probes = False
    config.eval.fid_num_samples = 0
    config.eval.reconstruction_num_images = 0
    config.eval.accuracy_prior_scales = ()
    config.eval.linear_probe_epochs = 0
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
