"""The entry points of the fixed-point family: `fixed_point` (`fn(y, args) = y`)
and `root_find` (`fn(y, args) = 0`)."""

from jaxtyping import Array, Int

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._compact import Compaction
from ._custom_types import Args, Fn, Y
from ._fixed_point_setup import solve
from ._fixed_point_solver import AbstractSolver
from ._solution import Solution


def fixed_point(
    fn: Fn,
    y0: Y,
    args: Args = None,
    *,
    solver: AbstractSolver,
    max_steps: int | Int[Array, ""] = 256,
    throw: bool = True,
    has_aux: bool = False,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    record_residuals: bool = False,
    divergence_ratio: float = 1e4,
    compaction: Compaction | None = Compaction(),
) -> Solution:
    """Find a fixed point `y = fn(y, args)`.

    **Arguments:**

    - `fn`: `fn(y, args) -> y_next` (or `(y_next, aux)` with `has_aux=True`), with
      the same pytree structure, shapes and dtypes as `y0`.
    - `y0`: the starting point (warm start): a pytree of floating-point arrays.
    - `args`: any pytree passed through to `fn`; gradients flow to its arrays.
    - `solver`: one of `fixpoint.solvers`, e.g. `Picard(rtol, atol)`, `Anderson(...)`,
      `Newton(...)`, `Broyden(...)`, `Halpern(...)` (for maps that are only
      nonexpansive).
    - `max_steps`: the largest number of updates: a Python int, or an integer
      scalar array, a *run-time budget*: under `jit` it is traced, so a
      schedule may raise or lower it between calls of the compiled function
      without compiling again (not with `record_residuals=True` or
      `UnrolledAdjoint`, which size buffers by it). A concrete budget below 1
      is refused; a traced one below 1 makes no updates.
    - `throw`: raise `fixpoint.SolveError` if the solve fails (under `vmap`: if any
      sample fails). With `False`, read `sol.result` instead (per sample).
    - `has_aux`: whether `fn` also returns auxiliary data.
    - `adjoint`: how to differentiate: `ImplicitAdjoint()` (default),
      `PhantomAdjoint`, `NeumannAdjoint`, `UnrolledAdjoint`.
    - `record_residuals`: also return `stats["residual_history"]`, the residual
      norm at each step (length `max_steps + 1`, NaN-padded).
    - `divergence_ratio`: stop with `RESULTS.diverged` once the residual norm
      exceeds this multiple of the smallest residual norm seen (of the first,
      for `Halpern` and `VarianceReducedHalpern`, whose residual may dip).
    - `compaction`: under `jax.vmap`, gather the samples that are still running
      into smaller batches as the others finish, so that a finished sample stops
      costing (`fixpoint.Compaction`; `None`: off, the whole batch runs until
      its slowest sample is done). The answer, result codes and step counts do
      not change. Not used by `UnrolledAdjoint` and `ReversibleAdjoint`, which
      differentiate the loop.

    **Returns:**

    A `fixpoint.Solution`: `value` (same structure as `y0`), `result`, `aux`
    and `stats` (`num_steps`, `residual`, and `residual_history` if recorded).
    """
    return solve(
        "fixed_point",
        "fixed_point",
        fn,
        y0,
        args,
        solver=solver,
        max_steps=max_steps,
        throw=throw,
        has_aux=has_aux,
        adjoint=adjoint,
        record_residuals=record_residuals,
        divergence_ratio=divergence_ratio,
        compaction=compaction,
    )


def root_find(
    fn: Fn,
    y0: Y,
    args: Args = None,
    *,
    solver: AbstractSolver,
    max_steps: int | Int[Array, ""] = 256,
    throw: bool = True,
    has_aux: bool = False,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    record_residuals: bool = False,
    divergence_ratio: float = 1e4,
    compaction: Compaction | None = Compaction(),
) -> Solution:
    """Find a root `fn(y, args) = 0`.

    The arguments are those of `fixpoint.fixed_point`. Fixed-point solvers
    (`Picard`, `Anderson`) iterate the map `y - fn(y, args)`, so they suit
    problems whose Jacobian is close to the identity; `Newton` and `Broyden`
    work on `fn` directly.

    **Arguments:**

    - `fn`: `fn(y, args) -> g` (or `(g, aux)` with `has_aux=True`), with the
      same pytree structure, shapes and dtypes as `y0`.
    - `y0`: the starting point: a pytree of floating-point arrays.
    - `args`: any pytree passed through to `fn`; gradients flow to its arrays.
    - `solver`: one of `fixpoint.solvers`, e.g. `Newton(rtol, atol)`,
      `Broyden(...)`, `Anderson(...)`.
    - `max_steps`: the largest number of updates (default 256); an integer
      scalar array is a run-time budget, as in `fixpoint.fixed_point`.
    - `throw`: raise `fixpoint.SolveError` if the solve fails (under `vmap`: if
      any sample fails). With `False`, read `sol.result` instead (per sample).
    - `has_aux`: whether `fn` also returns auxiliary data.
    - `adjoint`: how to differentiate: `ImplicitAdjoint()` (default),
      `PhantomAdjoint`, `NeumannAdjoint`, `UnrolledAdjoint`.
    - `record_residuals`: also return `stats["residual_history"]`, the residual
      norm at each step (length `max_steps + 1`, NaN-padded).
    - `divergence_ratio`: stop with `RESULTS.diverged` once the residual norm
      exceeds this multiple of the smallest residual norm seen (default 1e4;
      the first, for `Halpern` and `VarianceReducedHalpern`).
    - `compaction`: under `jax.vmap`, gather the still-running samples into
      smaller batches (`fixpoint.Compaction`, default; `None`: off).

    **Returns:**

    A `fixpoint.Solution`; `stats["residual"]` is the norm of `fn` at `value`.
    """
    return solve(
        "root_find",
        "root",
        fn,
        y0,
        args,
        solver=solver,
        max_steps=max_steps,
        throw=throw,
        has_aux=has_aux,
        adjoint=adjoint,
        record_residuals=record_residuals,
        divergence_ratio=divergence_ratio,
        compaction=compaction,
    )
