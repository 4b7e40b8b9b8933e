"""The setting files in configs/: every variant parses, is consistent, locks, takes command-line overrides, builds
its models, documents its run command, carries the hyper-parameters of the paper's settings (docs/method.md, "Training recipes in brief"), and parses without JAX."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys
import types

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from lzn_jax.data.config import check_config, default_config
from lzn_jax.models import presets

REPO = pathlib.Path(__file__).resolve().parents[2]
# Files in configs/ that are not training settings: the shared schema and the zoning demo (another experiment).
NOT_SETTINGS = ("common.py", "digits_zoning_demo.py")
CONFIG_FILES = sorted(path for path in (REPO / "configs").glob("*.py") if path.name not in NOT_SETTINGS)
NAMES = [path.stem for path in CONFIG_FILES]


@functools.cache
def load(name: str) -> types.ModuleType:
    """The config file as config_flags loads it: by path, not as a package module."""
    spec = importlib.util.spec_from_file_location(f"_config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_args(name: str) -> list[str]:
    """Every combination of the file's variants, as the text after the ':' ('' for none)."""
    variants = load(name).VARIANTS
    return [",".join(combo) for n in range(len(variants) + 1) for combo in itertools.combinations(variants, n)]


CASES = [(name, arg) for name in NAMES for arg in variant_args(name)]
CASE_IDS = [f"{name}:{arg}" for name, arg in CASES]


def key_paths(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf; a model block counts as one leaf (its keys are the model's own)."""
    paths = set()
    for key, value in config.items():
        path = prefix + key
        if isinstance(value, ml_collections.ConfigDict) and path not in {f"model.{m}" for m in common.MODULES}:
            paths |= key_paths(value, path + ".")
        else:
            paths.add(path)
    return paths


def ncsnpp_resolutions(block, image_size: int) -> set[int]:
    return {image_size // 2**level for level in range(len(block.ch_mult))}


def test_every_setting_is_found():
    assert set(NAMES) == {
        "cifar10_gen", "afhq_cat_gen", "celebahq_gen", "lsun_bedroom_gen", "imagenet_repr", "cifar10_joint",
        "digits_gen", "digits_repr", "digits_joint",
    }


@pytest.mark.parametrize("name", NAMES)
def test_variants_offered(name):
    config = load(name).get_config()
    expected = ("rf", "smoke") if config.objective == "generation" else ("smoke",)
    assert tuple(load(name).VARIANTS) == expected


@pytest.mark.parametrize(("name", "arg"), CASES, ids=CASE_IDS)
def test_config_is_consistent(name, arg):
    config = load(name).get_config(arg)
    assert isinstance(config, ml_collections.ConfigDict)
    assert key_paths(config) == key_paths(common.base_config()), "a setting only changes the keys of base_config"
    check_config(config.data)
    model = config.model
    for module in common.MODULES:  # a module exists exactly when it is trained
        exists = model[module] is not None
        assert exists == (config.optim.learning_rate[module] > 0), module
        assert exists == (config.optim.num_iterations[module] > 0), module
        assert exists == (0 < config.ema.decay[module] < 1), module
    if config.objective == "contrastive":
        assert model.encoder is not None and model.decoder is None and model.label_anchors is None
        assert config.data.augmentation == "two_view"
    else:
        assert config.objective == "generation" and model.decoder is not None
        assert config.data.augmentation != "two_view"
    for block in (model.encoder, model.label_anchors):
        if block is not None:
            assert block.latent_dim == config.latent_dim
    if model.encoder is not None:
        assert model.decoder is None or model.decoder.latent_dim == config.latent_dim
    if model.label_anchors is not None:
        assert model.encoder is not None and model.decoder.num_classes == model.label_anchors.num_classes
    for block in (model.encoder, model.decoder):
        if block is not None and block.name.startswith("ncsnpp"):
            resolutions = ncsnpp_resolutions(block, config.data.image_size)
            assert set(block.attn_resolutions) <= resolutions
            heads = block.get("latent_transformation_resolutions")
            assert heads is None or set(heads) <= resolutions, "every encoder head sits at an existing resolution"
        elif block is not None:
            assert config.data.image_size >= 32, "the ResNet downsamples 32 times"
    assert 0 < config.optim.warmup_steps <= max(config.optim.num_iterations.values())


@pytest.mark.parametrize(("name", "arg"), CASES, ids=CASE_IDS)
def test_locked_config_takes_overrides(name, arg):
    config = load(name).get_config(arg)
    config.lock()
    config.seed = 1
    config.data.batch_size = 16
    config.optim.learning_rate.encoder = 0.5
    config.data.data_dir = "/data"
    assert (config.seed, config.data.batch_size, config.data.data_dir) == (1, 16, "/data")
    with pytest.raises(AttributeError):
        config.sede = 1


@pytest.mark.parametrize("name", NAMES)
def test_unknown_variant_names_the_valid_ones(name):
    with pytest.raises(ValueError, match="bogus") as error:
        load(name).get_config("smoke,bogus")
    for variant in load(name).VARIANTS:
        assert repr(variant) in str(error.value)


@pytest.mark.parametrize(("name", "arg"), [case for case in CASES if "rf" in case[1]], ids=lambda v: str(v))
def test_rf_has_no_latent(name, arg):
    config = load(name).get_config(arg)
    assert config.model.encoder is None and config.model.label_anchors is None
    assert config.model.decoder.latent_dim == 0
    assert config.model.decoder.num_classes == load(name).get_config().model.decoder.num_classes


@pytest.mark.parametrize(("name", "arg"), [case for case in CASES if "smoke" in case[1]], ids=lambda v: str(v))
def test_smoke_is_small_and_keeps_the_wiring(name, arg):
    config = load(name).get_config(arg)
    full = load(name).get_config(arg.replace("smoke", "").strip(","))
    assert config.data.batch_size == 8
    for module in common.MODULES:
        assert config.optim.num_iterations[module] == (2 if full.model[module] is not None else 0), module
    assert (config.objective, config.latent_dim, config.data.name, config.data.augmentation) == (
        full.objective, full.latent_dim, full.data.name, full.data.augmentation)
    switches = ("name", "latent_dim", "num_classes", "fir", "progressive", "progressive_input", "embedding_type",
                "scale_by_sigma", "dropout", "head_num_layers")
    for module in common.MODULES:
        if full.model[module] is not None:
            for key in switches:
                assert config.model[module].get(key) == full.model[module].get(key), (module, key)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_holds_the_run_commands(name):
    doc = load(name).__doc__
    assert f"python -m lzn_jax.main --config=configs/{name}.py --workdir=" in doc
    for variant in load(name).VARIANTS:
        assert f"--config=configs/{name}.py:{variant} --workdir=" in doc


@pytest.mark.parametrize(("name", "arg"), CASES, ids=CASE_IDS)
def test_model_blocks_build(name, arg):
    from lzn_jax import models

    config = load(name).get_config(arg)
    for module in common.MODULES:
        block = config.model[module]
        if block is not None:
            assert isinstance(models.build(block), models.MODELS[block.name])


@pytest.mark.parametrize("name", NAMES)
def test_model_remat_key_reaches_every_image_model(name):
    """``--config.model.remat=True`` sets ``remat`` on every image model the trainer builds (``state.build_modules``),
    beside ``model.dtype``; the paper's settings leave it off; the label anchors (a table) have none."""
    import jax.numpy as jnp

    from lzn_jax.train import state

    config = load(name).get_config()
    assert config.model.remat is False
    assert not any(getattr(module, "remat", False) for module in state.build_modules(config) if module is not None)
    config.model.remat, config.model.dtype = True, "bfloat16"
    modules = state.build_modules(config)
    for module_name in modules.present():
        module = getattr(modules, module_name)
        if module_name == "label_anchors":
            assert not hasattr(module, "remat")
        else:
            assert module.remat is True and module.dtype == jnp.bfloat16, module_name
    # The config of a run written before the key existed (its config.json), read back frozen as api.load does.
    old = config.to_dict()
    del old["model"]["remat"]
    modules = state.build_modules(ml_collections.FrozenConfigDict(old))
    assert not any(getattr(module, "remat", False) for module in modules if module is not None)


def _rematerialised_calls(module, inputs) -> int:
    """How many rematerialised calls (JAX's remat primitive) the training-mode forward pass of ``module`` traces."""
    import jax

    remat_primitive = jax.make_jaxpr(jax.checkpoint(lambda x: x))(1.0).eqns[0].primitive
    variables = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    forward = lambda v: module.apply(v, *inputs, train=True, rngs={"dropout": jax.random.key(0)})
    return sum(eqn.primitive is remat_primitive for eqn in jax.make_jaxpr(forward)(variables).eqns)


@pytest.mark.slow
def test_model_remat_key_keeps_values_and_gradients():
    """Built from a config with ``model.remat=True``, the NCSN++ models rematerialise each residual and attention
    block (the ResNet each bottleneck), and the decoder gives the same velocity and parameter gradients as without,
    with the same dropout masks. The encoder's and the ResNet's values under remat: tests/models (test_ncsnpp,
    test_resnet); the decoder's blocks take the time embedding too, which the encoder's do not."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lzn_jax.train import state
    from tests.models import numpy_reference as ref

    # Smaller than :smoke, through the config, so that the two compiles stay small. One level with no residual
    # blocks still has the middle (ResBlock, attention, ResBlock) and, in the decoder, an upsampling-path ResBlock;
    # the ResNet keeps one stage.
    config = load("cifar10_gen").get_config("smoke")
    config.data.image_size = 8
    for block in (config.model.encoder, config.model.decoder):
        block.update(ch_mult=(1,), num_res_blocks=0, nf=8)
    resnet_config = load("imagenet_repr").get_config("smoke")
    resnet_config.model.encoder.stage_sizes = (1,)
    plain = state.build_modules(config)
    config.model.remat = resnet_config.model.remat = True
    remat, resnet = state.build_modules(config), state.build_modules(resnet_config).encoder

    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    latent = np.random.default_rng(1).standard_normal((2, config.latent_dim)).astype(np.float32)
    inputs = (x, np.array([0.3, 0.8], np.float32), latent)
    # Encoder: the middle (ResBlock, attention, ResBlock); decoder: the middle, then one upsampling-path ResBlock
    # and its attention (:smoke attends at image_size / 2, here 8); ResNet: its one bottleneck.
    assert _rematerialised_calls(plain.decoder, inputs) == 0
    assert _rematerialised_calls(remat.encoder, (x,)) == 3 and _rematerialised_calls(remat.decoder, inputs) == 5
    assert _rematerialised_calls(resnet, (jnp.zeros((1, 32, 32, 3)),)) == 1

    def loss(module, params):
        velocity = module.apply(params, *inputs, train=True, rngs={"dropout": jax.random.key(3)})
        return jnp.sum(velocity**2), velocity

    params = ref.random_params(plain.decoder, *inputs)
    assert config.model.decoder.dropout > 0, "dropout on: remat must replay the same masks in the backward pass"
    # Jitted: two small compiles cost less CPU time here than the eager pass's hundreds of one-op kernels.
    (_, out_plain), grads_plain = jax.jit(jax.value_and_grad(lambda p: loss(plain.decoder, p), has_aux=True))(params)
    (_, out_remat), grads_remat = jax.jit(jax.value_and_grad(lambda p: loss(remat.decoder, p), has_aux=True))(params)
    np.testing.assert_allclose(out_remat, out_plain, rtol=1e-6, atol=1e-6)
    ref.assert_trees_equal_up_to_float32_rounding(grads_remat, grads_plain)
    assert np.abs(np.asarray(grads_plain["params"]["conv_in"]["kernel"])).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_smoke_models_trace(name):
    """Abstract init and apply (jax.eval_shape: no compute) of every model of the smoke variants."""
    import jax

    from lzn_jax import models

    for arg in [arg for arg in variant_args(name) if "smoke" in arg]:
        config = load(name).get_config(arg)
        num_channels = 3 if config.data.name != "digits" or config.data.augmentation == "two_view" else 1
        for module in common.MODULES:
            if config.model[module] is None:
                continue
            model = models.build(config.model[module])
            inputs = model.example_inputs(config.data.batch_size, config.data.image_size, num_channels)
            variables = jax.eval_shape(model.init, jax.random.key(0), *inputs)
            out = jax.eval_shape(model.apply, variables, *inputs)
            out = out.anchors if hasattr(out, "anchors") else out
            if module == "decoder":
                assert out.shape == inputs[0].shape
            elif module == "encoder":
                assert out.shape == (config.data.batch_size, config.latent_dim)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' own loader
def test_command_line_overrides():
    """What `python -m lzn_jax.main --config=...:rf,smoke --config.a.b=v` does, on a fresh FlagValues."""
    argv = ["main", f"--config={REPO / 'configs' / 'cifar10_joint.py'}:rf,smoke",
            "--config.optim.learning_rate.decoder=0.5", "--config.data.data_dir=/data/tfds",
            "--config.model.decoder.nf=8", "--config.generation.label_cut_off=0.1",
            "--config.train.profile_start_step=3"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.is_locked and config.data.batch_size == 8 and config.model.encoder is None
    assert config.optim.learning_rate.decoder == 0.5 and config.data.data_dir == "/data/tfds"
    assert config.model.decoder.nf == 8 and config.generation.label_cut_off == 0.1
    assert config.train.profile_start_step == 3

    argv = ["main", f"--config={REPO / 'configs' / 'cifar10_gen.py'}", "--config.optim.no_such_key=1"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    with pytest.raises(AttributeError, match="no_such_key"):
        flag_values(argv)


def test_parsing_imports_neither_jax_nor_flax():
    """main parses the config before anything heavy: every file and variant, in a fresh interpreter."""
    script = (
        "import importlib.util, itertools, json, sys\n"
        f"for name in {NAMES!r}:\n"
        "    spec = importlib.util.spec_from_file_location('c_' + name, 'configs/' + name + '.py')\n"
        "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "    for n in range(len(module.VARIANTS) + 1):\n"
        "        for combo in itertools.combinations(module.VARIANTS, n):\n"
        "            module.get_config(','.join(combo))\n"
        "print(json.dumps(sorted(m for m in ('jax', 'flax', 'tensorflow', 'grain', 'torch') if m in sys.modules)))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout) == []


# The paper's settings (docs/method.md, "Training recipes in brief"): the paper's value of every hyper-parameter the schema holds, per setting.
_GEN = dict(objective="generation", solver=("dpm_solver++", 20), prior_scale=1.0)
PAPER = {
    "cifar10_gen": dict(_GEN, data=("cifar10", 32, "flip", 2000), latent=200, lr=dict(encoder=2.5e-5, decoder=1e-3),
                        iters=dict(encoder=50_000, decoder=50_000), ema=0.999999, ckpt=1000, samples=(5000, 100)),
    "afhq_cat_gen": dict(_GEN, data=("afhq_cat", 256, "flip", 256), latent=200, lr=dict(encoder=2e-6, decoder=2e-4),
                         iters=dict(encoder=60_000, decoder=60_000), ema=0.999999, ckpt=2000, samples=(10_000, 256)),
    "celebahq_gen": dict(_GEN, data=("celeba_hq", 256, "flip", 256), latent=200, lr=dict(encoder=4e-6, decoder=2e-4),
                         iters=dict(encoder=350_000, decoder=350_000), ema=0.9999, ckpt=2000, samples=(10_000, 256)),
    "lsun_bedroom_gen": dict(_GEN, data=("lsun_bedroom", 256, "flip", 256), latent=200,
                             lr=dict(encoder=2e-6, decoder=2e-4), iters=dict(encoder=2_050_000, decoder=2_050_000),
                             ema=0.99999, ckpt=2000, samples=(10_000, 256)),
    "cifar10_joint": dict(_GEN, data=("cifar10", 32, "flip", 2000), latent=200,
                          lr=dict(encoder=5e-5, decoder=2e-3, label_anchors=1e-4),
                          iters=dict(encoder=200_000, decoder=60_000, label_anchors=200_000), ema=0.999999, ckpt=1000,
                          samples=(5000, 1000)),
    "imagenet_repr": dict(objective="contrastive", solver=("euler", 20), prior_scale=0.45,
                          data=("imagenet2012", 224, "two_view", 8192), latent=256, lr=dict(encoder=8e-4),
                          iters=dict(encoder=5_000_000), ema=0.9999, ckpt=2000, samples=None),
}
MODELS = {
    "cifar10_gen": dict(encoder=presets.cifar10_encoder_config(), decoder=presets.cifar10_decoder_config()),
    "afhq_cat_gen": dict(encoder=presets.image256_encoder_config(), decoder=presets.image256_decoder_config()),
    "cifar10_joint": dict(encoder=presets.cifar10_encoder_config(), decoder=presets.cifar10_decoder_config(200, 10),
                          label_anchors=presets.label_anchors_config(10, 200)),
    "imagenet_repr": dict(encoder=presets.resnet50_gn_config(256, head_num_layers=2)),
}
MODELS["celebahq_gen"] = MODELS["lsun_bedroom_gen"] = MODELS["afhq_cat_gen"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name):
    paper, config = PAPER[name], load(name).get_config()
    data = config.data
    assert (data.name, data.image_size, data.augmentation, data.batch_size) == paper["data"]
    assert data.resize_size is None, "the folders' Resize(256) is the default resize to image_size"
    assert (config.objective, config.latent_dim) == (paper["objective"], paper["latent"])
    for module in common.MODULES:
        assert config.optim.learning_rate[module] == paper["lr"].get(module, 0.0), module
        assert config.optim.num_iterations[module] == paper["iters"].get(module, 0), module
        assert config.ema.decay[module] == (paper["ema"] if module in paper["lr"] else 0.0), module
        expected = MODELS[name].get(module)
        assert (config.model[module].to_dict() if config.model[module] is not None else None) == expected, module
    optim = config.optim
    assert (optim.warmup_steps, optim.warmup_init_factor, optim.grad_clip_norm) == (5000, 1 / 5000, 1.0)
    assert (optim.b1, optim.b2, optim.eps) == (0.9, 0.999, 1e-8)
    assert config.model.dtype == "float32" and config.checkpoint.every_steps == paper["ckpt"]
    if paper["objective"] == "generation":
        gen = config.generation
        assert (gen.latent_solver.solver, gen.latent_solver.num_steps) == paper["solver"]
        assert gen.latent_solver.eps is None, "DPM-Solver++'s own eps (1e-3 at both ends)"
        assert (gen.prior_scale, gen.rf_time_eps, gen.rf_loss_weight) == (paper["prior_scale"], 1e-3, 1.0)
        assert (config.train.sample_every_steps, config.train.num_sample_images) == paper["samples"]
        if config.model.label_anchors is not None:
            assert (gen.label_solver.solver, gen.label_solver.num_steps) == ("euler", 100)
            assert (gen.label_cut_off, gen.label_loss_weight, gen.label_use_log) == (0.2, 1.0, False)
    else:
        con = config.contrastive
        assert (con.latent_solver.solver, con.latent_solver.num_steps, con.latent_solver.eps) == ("euler", 20, 1e-4)
        assert (con.alignment_solver.solver, con.alignment_solver.num_steps) == ("euler", 20)
        assert (con.prior_scale, con.cut_off, con.prob_loss_weight, con.log_loss_weight) == (0.45, 0.2, 0.0, 1.0)
        assert data.two_view.to_dict() == default_config().two_view.to_dict(), "the reference's two-view values"


def test_solver_blocks_choose_the_kernel_and_old_blocks_keep_the_defaults():
    from lzn_jax import zoning
    from lzn_jax.objectives.generation import GenerationSettings, solver_options

    config = load("cifar10_gen").get_config()
    assert solver_options(config.generation.latent_solver) == zoning.SolverOptions(solver="dpm_solver++", num_steps=20)
    config.generation.latent_solver.block_size = 4096  # what --config.generation.latent_solver.block_size=4096 does
    config.generation.latent_solver.remat = "always"
    config.generation.latent_solver.memory_budget_bytes = 2**20
    options = GenerationSettings.from_config(config.generation).latent_options
    assert (options.block_size, options.remat, options.memory_budget_bytes) == (4096, "always", 2**20)
    # The block of a run written before these keys existed (its config.json), read back frozen as api.load does.
    old = ml_collections.FrozenConfigDict({"solver": "euler", "num_steps": 5, "eps": None})
    assert solver_options(old) == zoning.SolverOptions(solver="euler", num_steps=5)
