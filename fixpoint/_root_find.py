"""`root_find`: find `y` with `fn(y, args) = 0`."""

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._compact import Compaction
from ._custom_types import Args, Fn, Y
from ._solution import Solution
from ._solve import solve
from ._solver import AbstractSolver


def root_find(
    fn: Fn,
    y0: Y,
    args: Args = None,
    *,
    solver: AbstractSolver,
    max_steps: int = 256,
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

    **Returns:** a `fixpoint.Solution`; `stats["residual"]` is the norm of `fn`.
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
