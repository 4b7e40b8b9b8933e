"""The fit check (lzn_jax/tools/fit.py): its memory figures are XLA's own, the solver sees the global batch, the
batch search keeps its promise, and bad targets or batches are refused with clear messages.

The step is a one-level version of the tiny contrastive config (tests/train/tiny.py) with 2-step flows and no
dropout, compiled at XLA's lowest backend optimisation level; the module compiles it twice through the tool and
twice directly (about 8 s each on 2 cores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from lzn_jax import parallel
from lzn_jax.data.device import model_inputs_fn
from lzn_jax.tools import fit
from lzn_jax.train import loop, optim, steps
from lzn_jax.train.state import build_modules
from tests.train import tiny

FAST_COMPILE = {"xla_backend_optimization_level": 0}
NUM_DEVICES = 4
SMALL, LARGE = 2, 4  # rows per device


def _config():
    config = tiny.get_config("contrastive")
    config.model.encoder.ch_mult = (1,)
    config.data.image_size = 8
    config.contrastive.latent_solver.num_steps = 2
    config.contrastive.alignment_solver.num_steps = 2
    config.model.encoder.dropout = 0.0  # its random bits cost compile time and nothing checked here
    return config


def _direct_memory(config, mesh, global_batch):
    """``memory_analysis()`` of the step jitted here by hand, as the trainer jits it: no code of the tool."""
    replicated, rows = jax.NamedSharding(mesh, jax.P()), jax.NamedSharding(mesh, jax.P("data"))
    modules = build_modules(config)
    optimizer = optim.make_optimizer(config, modules.present())
    state = loop.abstract_train_state(config, modules, optimizer, replicated)
    size = config.data.image_size
    batch = {"views": jax.ShapeDtypeStruct((global_batch, 2, size, size, 3), jnp.uint8, sharding=rows),
             "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=rows)}
    step = steps.make_step(config, steps.StepFunctions(modules, optimizer, model_inputs_fn(config.data)))
    options = {**parallel.compiler_options("cpu"), **FAST_COMPILE}
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, in_shardings=(replicated, rows), out_shardings=(replicated, None),
                           donate_argnums=0, compiler_options=options).lower(state, batch).compile()
    return compiled.memory_analysis()


def _peak(stats):
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


@pytest.fixture(scope="module")
def measured():
    """The tool's reports at SMALL and LARGE rows per device (keyed by rows), and XLA's direct figures."""
    config = _config()
    mesh = parallel.data_mesh(NUM_DEVICES)
    target = fit.device_target(NUM_DEVICES, 10**12)
    reports = {rows: fit.fit_check(fit.with_global_batch(config, rows * NUM_DEVICES), target, mesh=mesh,
                                   solver_alone=False, compiler_options=FAST_COMPILE)
               for rows in (SMALL, LARGE)}
    direct = {rows: _direct_memory(fit.with_global_batch(config, rows * NUM_DEVICES), mesh, rows * NUM_DEVICES)
              for rows in (SMALL, LARGE)}
    return config, mesh, reports, direct


def test_memory_is_xlas_own_and_grows_with_the_batch(measured):
    _, _, reports, direct = measured
    for rows in (SMALL, LARGE):
        memory, stats = reports[rows].memory, direct[rows]
        assert memory.arguments == stats.argument_size_in_bytes
        assert memory.temp == stats.temp_size_in_bytes
        assert memory.output == stats.output_size_in_bytes
        assert memory.alias == stats.alias_size_in_bytes
        assert memory.peak == _peak(stats)
        # The split of the inputs adds up to XLA's argument bytes, but for the labels, which the contrastive
        # step never reads (jit leaves them out).
        parts = memory.params + memory.opt_state + memory.ema + memory.other_state + memory.batch
        assert parts - memory.arguments == rows * 4
        assert memory.params == memory.ema and memory.opt_state > 2 * memory.params
    growth = reports[LARGE].memory.peak - reports[SMALL].memory.peak
    assert growth == _peak(direct[LARGE]) - _peak(direct[SMALL]) > 0
    size = 8 * 8 * 3 * 2  # two uint8 views of 8x8x3
    assert reports[LARGE].memory.batch - reports[SMALL].memory.batch == (LARGE - SMALL) * (size + 4)


def test_solver_rows_meet_the_global_batch(measured):
    """Per device, the dense solver's products are (rows, global batch, D): twice the rows against twice the
    global batch is 4x their FLOPs (a few per-row terms, the refinement of each row's leading logits, only
    double); the encoder's FLOPs double."""
    _, _, reports, _ = measured
    small, large = reports[SMALL], reports[LARGE]
    assert [flow.anchors for flow in large.flows] == [LARGE * NUM_DEVICES] * 2
    assert [flow.rows_per_device for flow in large.flows] == [LARGE] * 2
    ratio = large.flops.solver / small.flops.solver
    assert 0.9 * (LARGE / SMALL) ** 2 < ratio <= (LARGE / SMALL) ** 2
    model_ratio = (large.flops.counted - large.flops.solver) / (small.flops.counted - small.flops.solver)
    assert model_ratio == pytest.approx(LARGE / SMALL, rel=0.05)
    assert large.fits and large.margin_bytes == 10**12 - large.memory.peak


def test_search_returns_a_fitting_batch_whose_double_does_not(measured):
    config, mesh, reports, _ = measured
    # A device between the two measured peaks: SMALL rows fit, LARGE do not.
    capacity = (reports[SMALL].memory.peak + reports[LARGE].memory.peak) // 2
    target = fit.device_target(NUM_DEVICES, capacity)
    cache = dict(reports)
    measure = fit.measure_fn(config, target, mesh, cache=cache, compiler_options=FAST_COMPILE)
    result = fit.largest_batch(measure, start=LARGE, mode="double", capacity=capacity)
    assert [batch for batch, _, _ in result.tried] == [LARGE, SMALL]  # halved once; both compiled above
    assert (result.largest_fitting, result.smallest_failing) == (SMALL, LARGE)
    assert cache[result.largest_fitting].memory.peak <= capacity
    double = 2 * result.largest_fitting
    assert measure(double)[0] is False and cache[double].memory.peak > capacity
    assert len(cache) == 2  # no compile beyond the two measured


def test_search_logic_on_a_known_memory_curve():
    """Peak 100 + 10 b bytes against 1000: 90 rows fit, 91 do not."""
    calls = []

    def measure(batch):
        calls.append(batch)
        return 100 + 10 * batch <= 1000, 100 + 10 * batch

    doubled = fit.largest_batch(measure, start=5, mode="double")
    assert (doubled.largest_fitting, doubled.smallest_failing) == (80, 160)
    halved = fit.largest_batch(measure, start=1000, mode="double")
    fits, _ = measure(halved.largest_fitting)
    assert fits and not measure(2 * halved.largest_fitting)[0]
    calls.clear()
    bisected = fit.largest_batch(measure, start=5, mode="bisect", capacity=1000, multiple=1, max_compiles=12)
    assert (bisected.largest_fitting, bisected.smallest_failing) == (90, 91)
    assert calls[:3] == [5, 10, 90]  # the straight line through 5 and 10 lands on the answer
    assert len(calls) <= 7
    assert fit.largest_batch(lambda b: (False, None), start=4, mode="double").largest_fitting is None


def test_refuses_a_global_batch_that_does_not_divide():
    config = _config()
    config.data.batch_size = 8 * NUM_DEVICES + 1
    with pytest.raises(ValueError, match=rf"data.batch_size={8 * NUM_DEVICES + 1} .* {NUM_DEVICES} devices"):
        fit.fit_check(config, fit.device_target(NUM_DEVICES, 10**9), mesh=parallel.data_mesh(NUM_DEVICES))


def test_targets():
    assert fit.tpu_target("v5e-64").topology == "v5e:8x8"
    assert fit.tpu_target("v5p-128").topology == "v5p:4x4x8"
    assert fit.tpu_target("v6e-8").topology == "v6e:2x4"
    assert fit.tpu_target("v5p-4").topology == "v5p:2x2x1"
    assert fit.tpu_target("v5e:4x8").num_devices == 32
    assert fit.tpu_target("v5e-64", memory_bytes=123).memory_bytes == 123
    for bad in ("v5x-64", "v5e-48", "v5e64", "v5p:4x4"):
        with pytest.raises(ValueError, match=r"v5e-N with N in \[1, 4, .*v5p-N .*v6e-N|sides") as error:
            fit.tpu_target(bad)
        assert bad in str(error.value)
    assert fit.parse_memory("40GB") == 40 * 10**9
    assert fit.parse_memory("80GiB") == 80 * 2**30
    assert fit.parse_memory("16e9") == 16 * 10**9
    with pytest.raises(ValueError, match="40 parsecs"):
        fit.parse_memory("40 parsecs")
    with pytest.raises(ValueError, match="8 CPU devices"):
        fit.target_mesh(fit.device_target(64, 10**9))


def test_counted_flops_multiply_loops_by_their_trip_counts():
    """XLA's cost analysis counts a loop body once; the tool's count multiplies it by the trip count, and agrees
    with XLA on a program without loops (up to XLA's elementwise FLOPs)."""
    x = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 32), jnp.float32)

    def looped(x, w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=7)[0]

    outside, inside = fit.counted_flops(jax.jit(looped).trace(x, w).jaxpr)
    assert (outside, inside) == (7 * 2 * 16 * 32 * 32, 0)

    images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)

    def convolve(images, kernel, w):
        # VALID: XLA leaves the taps that fall on "SAME" padding out of its count; the tool counts them.
        features = jax.lax.conv_general_dilated(images, kernel, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return features.reshape(2, -1)[:, :32] @ w

    traced = jax.jit(convolve).trace(images, kernel, w)
    counted, _ = fit.counted_flops(traced.jaxpr)
    assert counted == 2 * (2 * 6 * 6 * 5) * (3 * 3 * 3) + 2 * 2 * 32 * 32
    xla = traced.lower().compile().cost_analysis()["flops"]
    assert counted <= xla <= 1.05 * counted


def test_tpu_ahead_of_time_compile_without_a_tpu():
    """XLA:TPU compiles the step against a v5e-4 description (needs libtpu: .venv-tpu, docs/scaling.md)."""
    pytest.importorskip("libtpu")
    config = fit.with_global_batch(_config(), 4 * SMALL)
    report = fit.fit_check(config, fit.tpu_target("v5e-4"), solver_alone=False)
    assert (report.method, report.topology, report.fits) == ("tpu-aot", "v5e:2x2", True)
    assert report.capacity_bytes == int(15.75 * 2**30)
    assert report.memory.params == report.memory.ema and report.memory.peak > report.memory.arguments
    assert report.flops.xla is not None and report.flops.solver > 0
