"""The rectified-flow ODE of the image decoder, integrated forward (noise -> image: sampling) or backward (image ->
noise: inversion) with fixed-step Euler or adaptive Dormand-Prince 5(4). Time: 0 = noise, 1 = data.

The functions take any velocity field ``velocity(x, t, conditioning)``, so analytic fields test them; the decoder's
field comes from :func:`lzn_jax.sampling.decoder_velocity`. Nothing here is jitted: callers jit (diffrax compiles
its own solve). docs/design.md, "Sampling", says which options reproduce the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# velocity(x (B, *S), t (B,), conditioning) -> (B, *S): conditioning is None or a pytree of (B, ...) arrays whose
# rows belong to the rows of x (the decoder's (latents, label one-hots)).
Velocity = Callable[[jax.Array, jax.Array, Any], jax.Array]

SAMPLERS = ("euler", "dopri5")
ERROR_NORMS = ("batch", "per_sample")

# Dormand-Prince 5(4) is first-same-as-last: an attempted step evaluates 6 new stages, its 7th (at the step's end)
# being the next step's first; the first step also evaluates its first stage.
DOPRI5_EVALUATIONS_PER_STEP = 6
DOPRI5_START_EVALUATIONS = 1


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How the image ODE is integrated; frozen and hashable (a static argument of ``jax.jit``).

    Attributes:
      sampler: "euler" (``num_steps`` equal steps; the reference's "euler10") or "dopri5" (adaptive Dormand-Prince
        5(4) with a PID step-size controller; the reference's SciPy "RK45", the paper's sampler).
      num_steps: Euler steps (10 by default); unused by "dopri5".
      time_eps: the integration runs between ``time_eps`` and 1 (the noise sits at ``time_eps``, not at 0).
      rtol, atol: "dopri5" tolerances (1e-5 in the reference): the error of a step, divided by
        ``atol + rtol * max(|x_before|, |x_after|)`` elementwise, must have norm <= 1.
      error_norm: "batch" (default, the reference's): the whole batch ``x`` is one ODE state, so every sample
        shares one step-size sequence and one RMS error norm over all elements, and a sample's result and NFE
        depend on its batch-mates. "per_sample": each sample is its own adaptive solve (its own step sizes and
        RMS norm over its own elements), so it is the same whatever batch it is in; the batch still runs in
        lockstep until its slowest sample finishes. Unused by "euler".
      first_step: size of the first step "dopri5" tries (its sign follows the direction of integration); the
        controller adapts from there. 0.01 is what diffrax 0.7 uses when asked to choose (its Hairer heuristic is
        skipped for the wrapped terms it passes); fixing it keeps step sequences and NFE counts stable across
        diffrax versions. SciPy's RK45 chooses it by Hairer's heuristic instead: one source of the small
        differences from the reference's step sequence (docs/differences.md, item 16).
      max_steps: "dopri5" gives up after this many attempted steps; the rows of a solve that gave up come back
        NaN (the whole batch under the "batch" norm). diffrax's raising check is off: its host callback sits on
        one device and makes the compiler gather a sharded state there.
    """

    sampler: Literal["euler", "dopri5"] = "euler"
    num_steps: int = 10
    time_eps: float = 1e-3
    rtol: float = 1e-5
    atol: float = 1e-5
    error_norm: Literal["batch", "per_sample"] = "batch"
    first_step: float = 0.01
    max_steps: int = 4096

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} does not exist; choose one of {SAMPLERS}")
        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        if not 0.0 <= float(self.time_eps) < 1.0:
            raise ValueError(f"time_eps must lie in [0, 1), got {self.time_eps!r}")
        if not (float(self.rtol) > 0.0 and float(self.atol) > 0.0):
            raise ValueError(f"rtol and atol must be positive, got rtol={self.rtol!r}, atol={self.atol!r}")
        if self.error_norm not in ERROR_NORMS:
            raise ValueError(f"error_norm={self.error_norm!r} does not exist; choose one of {ERROR_NORMS}")
        if not 0.0 < float(self.first_step) <= 1.0:
            raise ValueError(f"first_step must lie in (0, 1], got {self.first_step!r}")
        if not _is_int(self.max_steps) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")

    def replace(self, **changes) -> SamplerOptions:
        return dataclasses.replace(self, **changes)


EULER = SamplerOptions(sampler="euler")
DOPRI5 = SamplerOptions(sampler="dopri5")


class Solution(NamedTuple):
    """End state of an integration.

    x: (B, *S) the state at the end time, dtype of the start state.
    nfe: (B,) int32 velocity evaluations spent on each sample's trajectory: ``num_steps`` for Euler; for
      Dormand-Prince ``1 + 6 * attempted steps`` of its solve (equal across the batch under the "batch" norm).
    """

    x: jax.Array
    nfe: jax.Array


def dopri5_evaluations(attempted_steps: jax.Array) -> jax.Array:
    """Velocity evaluations of a Dormand-Prince solve that attempted ``attempted_steps`` steps (accepted plus
    rejected): ``1 + 6 * attempted_steps``.

    Exact unless the very first step is rejected: diffrax then evaluates the first stage once more per such
    rejection, which the solve's statistics cannot show. SciPy (the reference's ``nfev``) counts ``2 + 6 * steps``:
    its first-step heuristic costs one evaluation more.
    """
    return DOPRI5_START_EVALUATIONS + DOPRI5_EVALUATIONS_PER_STEP * jnp.asarray(attempted_steps, jnp.int32)


def _batch_times(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full((x.shape[0],), t, x.dtype)


def euler_solve(velocity: Velocity, x: jax.Array, conditioning: Any = None, *, t0: float, t1: float,
                num_steps: int) -> Solution:
    """``num_steps`` equal Euler steps ``x <- x + h * velocity(x, t)``, ``h = (t1 - t0) / num_steps``, from time
    ``t0`` to ``t1`` (either direction; the velocity is taken at each step's start time).

    x: (B, *S) float. Returns a :class:`Solution` with ``nfe`` = ``num_steps`` for every sample.
    """
    # The time grid in float64 on the host, then cast: float32 accumulation of t would drift from the exact grid.
    times = t0 + (t1 - t0) * np.arange(num_steps, dtype=np.float64) / num_steps
    step = (t1 - t0) / num_steps

    def body(state, t):
        return state + step * velocity(state, _batch_times(t, state), conditioning).astype(state.dtype), None

    end, _ = jax.lax.scan(body, x, jnp.asarray(times, x.dtype))
    return Solution(end, jnp.full((x.shape[0],), num_steps, jnp.int32))


def _dopri5_one_state(field: Callable[[jax.Array, jax.Array, Any], jax.Array], y0: jax.Array, args: Any, *,
                      t0: float, t1: float, options: SamplerOptions) -> tuple[jax.Array, jax.Array]:
    """One adaptive solve of ``dy/dt = field(y, t, args)`` with ``y0`` as a single state: RMS error norm over all
    of its elements, one step-size sequence. Returns ``(y at t1, or NaN if the solve gave up; nfe scalar int32)``."""
    # Imported here: diffrax (with equinox) adds a second to every import of the package, which the training loop
    # and its subprocesses pay although they only use Euler.
    import diffrax

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: field(y, t, args).astype(y.dtype)),
        diffrax.Dopri5(),
        t0=t0,
        t1=t1,
        dt0=float(np.copysign(options.first_step, t1 - t0)),
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(t1=True),
        # rms_norm (diffrax's default) is SciPy's: sqrt(mean(scaled error ** 2)) over the whole state.
        stepsize_controller=diffrax.PIDController(rtol=options.rtol, atol=options.atol),
        max_steps=options.max_steps,
        # throw=True would check the result with a host callback placed on one device, which makes the compiler
        # gather the whole sharded state there; a failed solve is marked with NaN instead.
        throw=False,
    )
    end = jnp.where(solution.result == diffrax.RESULTS.successful, solution.ys[0], jnp.nan)
    return end, dopri5_evaluations(solution.stats["num_steps"])


def dopri5_solve(velocity: Velocity, x: jax.Array, conditioning: Any = None, *, t0: float, t1: float,
                 options: SamplerOptions = DOPRI5) -> Solution:
    """Adaptive Dormand-Prince 5(4) (diffrax ``Dopri5``, PID controller, ``options.rtol``/``atol``) from time ``t0``
    to ``t1`` (either direction), with the error norm of ``options.error_norm``.

    x: (B, *S) float. Returns a :class:`Solution`; under "per_sample" each row of ``nfe`` is its own solve's.
    """
    if options.error_norm == "batch":
        def batch_field(y, t, args):
            return velocity(y, _batch_times(t, y), args)

        end, nfe = _dopri5_one_state(batch_field, x, conditioning, t0=t0, t1=t1, options=options)
        return Solution(end, jnp.full((x.shape[0],), nfe, jnp.int32))

    def sample_field(y, t, args):
        # One sample (*S) seen by the velocity as a batch of one.
        rows = jax.tree.map(lambda leaf: leaf[None], args)
        return velocity(y[None], jnp.full((1,), t, y.dtype), rows)[0]

    # vmap of a diffrax solve: separate step sizes and norms per sample (diffrax supports batching its loop).
    end, nfe = jax.vmap(
        lambda y, args: _dopri5_one_state(sample_field, y, args, t0=t0, t1=t1, options=options)
    )(x, conditioning)
    return Solution(end, nfe)


def integrate(velocity: Velocity, x: jax.Array, conditioning: Any = None, *, t0: float, t1: float,
              options: SamplerOptions) -> Solution:
    """The ODE ``dx/dt = velocity(x, t, conditioning)`` from time ``t0`` to ``t1`` with ``options.sampler``.

    x: (B, *S) float; conditioning: None or a pytree of (B, ...) arrays. Returns a :class:`Solution`.
    """
    if options.sampler == "euler":
        return euler_solve(velocity, x, conditioning, t0=t0, t1=t1, num_steps=options.num_steps)
    return dopri5_solve(velocity, x, conditioning, t0=t0, t1=t1, options=options)


def sample(velocity: Velocity, noise: jax.Array, conditioning: Any = None, *,
           options: SamplerOptions = EULER) -> Solution:
    """Images from noise: ``noise`` (B, *S) is the state at time ``options.time_eps``; returns the state at 1.

    Under ``jit`` a batch sharded by rows stays sharded; the "batch" norm's global RMS is one all-reduce.
    """
    return integrate(velocity, noise, conditioning, t0=float(options.time_eps), t1=1.0, options=options)


def invert(velocity: Velocity, images: jax.Array, conditioning: Any = None, *, options: SamplerOptions = EULER,
           remove_image_part: bool = False) -> Solution:
    """Noise from images: the same ODE run backwards from ``images`` (B, *S) at time 1 to ``options.time_eps``.

    The default returns the state at ``time_eps``, the exact start that :func:`sample` maps back to the images
    (up to the integration error). ``remove_image_part=True`` returns ``(x_eps - eps * images) / (1 - eps)``
    instead, the reference's RK45 inversion (docs/differences.md, item 15): a noise estimate on the straight line
    ``x_t = t * image + (1 - t) * noise``, off by about ``eps * |x_eps - images|`` from the state.
    """
    eps = float(options.time_eps)
    solution = integrate(velocity, images, conditioning, t0=1.0, t1=eps, options=options)
    if not remove_image_part:
        return solution
    noise = (solution.x - eps * images.astype(solution.x.dtype)) / (1.0 - eps)
    return Solution(noise, solution.nfe)
