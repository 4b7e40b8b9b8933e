"""Solver options as one typed, frozen, hashable value (a static argument of ``jax.jit``, a field of a config)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

SOLVERS = ("euler", "dpm_solver++")
# Start offsets of the reference: Euler starts at t = 1e-4; DPM-Solver++ runs from 1e-3 to 1 - 1e-3.
DEFAULT_EPS = {"euler": 1e-4, "dpm_solver++": 1e-3}
REMAT_MODES = ("auto", "never", "always")
# Per device. Keeping every step's (B, N) posterior lets the backward pass reuse the forward's products; past
# this budget each step's posterior evaluation is rematerialised instead. docs/numerics.md, "Rematerialisation".
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 1024**3


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """How a latent flow is integrated.

    Attributes:
      solver: "euler" or "dpm_solver++" (multistep DPM-Solver++).
      num_steps: velocity evaluations (20 for every forward flow of the paper, 100 for the label flow).
      eps: start offset; None takes the solver's default (Euler 1e-4: t runs eps -> 1 forward; DPM-Solver++
        1e-3: t runs eps -> 1 - eps). The reverse Euler flow runs 1 -> 0 and uses no eps.
      order: DPM-Solver++ order (1, 2 or 3; the reference uses 3).
      lower_order_final: DPM-Solver++ lowers the order of its last steps when num_steps < 10.
      block_size: None for the dense kernel, or stream over anchor blocks of this size (memory independent of
        the number of anchors; needs ``assign_targets`` in the reverse direction).
      remat: "auto" rematerialises each step's posterior evaluation only when keeping every step's posterior
        would exceed ``memory_budget_bytes``; "never" always keeps them; "always" always rematerialises.
      memory_budget_bytes: per-device budget for kept posteriors under ``remat="auto"``.
    """

    solver: Literal["euler", "dpm_solver++"] = "dpm_solver++"
    num_steps: int = 20
    eps: float | None = None
    order: int = 3
    lower_order_final: bool = True
    block_size: int | None = None
    remat: Literal["auto", "never", "always"] = "auto"
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} does not exist; choose one of {SOLVERS}")
        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        if self.eps is not None and not 0.0 < float(self.eps) < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5) or be None (the solver's default), got {self.eps!r}")
        if self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}")
        if self.solver == "dpm_solver++" and self.num_steps < self.order:
            raise ValueError(f"num_steps ({self.num_steps}) must be >= order ({self.order}) for DPM-Solver++; "
                             "lower the order or add steps")
        if self.block_size is not None and (not _is_int(self.block_size) or self.block_size < 1):
            raise ValueError(f"block_size must be None or a positive int, got {self.block_size!r}")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat={self.remat!r} does not exist; choose one of {REMAT_MODES}")
        if not _is_int(self.memory_budget_bytes) or self.memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be a non-negative int, got {self.memory_budget_bytes!r}")

    @property
    def start_offset(self) -> float:
        """The eps actually used: ``eps``, or the solver's default."""
        return DEFAULT_EPS[self.solver] if self.eps is None else float(self.eps)

    def replace(self, **changes) -> SolverOptions:
        return dataclasses.replace(self, **changes)


FORWARD_DEFAULTS = SolverOptions(solver="dpm_solver++", num_steps=20)
REVERSE_DEFAULTS = SolverOptions(solver="euler", num_steps=100)


def resolve_options(options: SolverOptions | None, defaults: SolverOptions, **overrides) -> SolverOptions:
    """``options`` (or ``defaults``) with the keyword arguments that are not None written over its fields."""
    if options is None:
        options = defaults
    elif not isinstance(options, SolverOptions):
        raise TypeError(f"options must be a zoning.SolverOptions, got {type(options).__name__}")
    changes = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(options, **changes) if changes else options
