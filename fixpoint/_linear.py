"""Backward linear solves for implicit differentiation.

Each function here builds `solve(matvec, b, transpose_of=None)` for
`jax.lax.custom_linear_solve`: the same function serves the forward (`jvp`) solve
and, with the transposed operator (and the original one as `transpose_of`), the
transposed solve of reverse mode, so both modes get consistent answers.
"""

import jax
import jax.numpy as jnp
import lineax as lx

from ._compact import Compaction
from ._custom_types import LinearSolve
from ._errors import checked
from ._gmres import gmres
from ._manual import fori_loop
from ._norm import max_norm
from ._solution import RESULTS

_WHAT = "The backward (implicit-differentiation) linear solve"
_HINT = (
    "Loosen or raise the adjoint's budget (`ImplicitAdjoint(rtol=..., max_restarts=...)`), "
    "or pass `throw=False` to the solve to get NaN gradients instead of an error."
)


def flag_failure(x, failed, steps, residual, throw: bool, hint: str = _HINT):
    """Raise (`throw=True`) or NaN-poison `x` where the backward solve failed."""
    codes = jnp.where(failed, RESULTS.linear_solve_failed._value, RESULTS.successful._value)
    if throw:
        # Only a scalar token passes the check, so a sharded `x` is never gathered.
        x = checked(x, codes, steps, residual, _WHAT, hint)
    return jnp.where(failed, jnp.nan, x)


def _target(b, rtol, atol):
    return jnp.maximum(atol, rtol * jnp.linalg.norm(b))


def gmres_solve(
    rtol: float,
    atol: float,
    restart: int,
    max_restarts: int,
    throw: bool,
    compaction: Compaction | None = None,
) -> LinearSolve:
    """`solve(matvec, b)` by our restarted GMRES (`_gmres.py`): matrix-free.

    GMRES aims at `|A x - b|₂ <= max(atol, rtol |b|₂)`; the solve counts as
    failed (raise or NaN, by `throw`) when the true residual ends above ten times
    that, a margin for the round-off floor of an ill-conditioned system.
    """

    def solve(matvec, b, transpose_of=None):
        del transpose_of
        x, res, its = gmres(
            matvec,
            b,
            rtol=rtol,
            atol=atol,
            restart=restart,
            max_restarts=max_restarts,
            compaction=compaction,
        )
        failed = ~(res <= 10 * _target(b, rtol, atol)) | ~jnp.all(jnp.isfinite(x))
        return flag_failure(x, failed, its, res, throw)

    return solve


# lineax's matrix-free solvers (`NormalCG` is a function returning a `CG`).
_ITERATIVE = tuple(
    cls
    for cls in (getattr(lx, name, None) for name in ("GMRES", "BiCGStab", "CG", "LSMR"))
    if isinstance(cls, type)
)


def lineax_solve(
    solver: lx.AbstractLinearSolver, rtol: float, atol: float, throw: bool
) -> LinearSolve:
    """`solve(matvec, b, transpose_of=None)` by a lineax solver.

    Iterative lineax solvers work on the matrix-free operator. Dense ones (LU,
    QR, ...) need the matrix: it is always built in *forward* mode, from JVPs of
    the original operator, also for the transposed solve of reverse mode
    (`transpose_of` is then the original `matvec`). Built from VJPs instead,
    a shared weight matrix would be multiplied by a batched identity under
    `vmap` (B·n³ work); from JVPs, `W @ I` does not depend on the sample and is
    computed once.

    The answer is verified independently of the solver: the true residual
    `|A x - b|₂` must be at most `max(atol, rtol |b|₂)` (with a 10x margin for
    round-off, since the solver's own test differs), and `x` must be finite.
    Otherwise the solve counts as failed.
    """

    def solve(matvec, b, transpose_of=None):
        if isinstance(solver, _ITERATIVE):
            op = lx.FunctionLinearOperator(matvec, jax.eval_shape(lambda: b))
        else:
            forward = matvec if transpose_of is None else transpose_of
            eye = jnp.eye(b.shape[0], dtype=b.dtype)
            matrix = jax.vmap(forward, out_axes=1)(eye)
            op = lx.MatrixLinearOperator(matrix if transpose_of is None else matrix.T)
        sol = lx.linear_solve(op, b, solver, throw=False)
        x = sol.value
        res = jnp.linalg.norm(op.mv(x) - b)
        failed = ~(res <= 10 * _target(b, rtol, atol)) | ~jnp.all(jnp.isfinite(x))
        failed = failed | (sol.result != lx.RESULTS.successful)
        steps = sol.stats.get("num_steps", jnp.array(0))
        return flag_failure(x, failed, steps, res, throw)

    return solve


_SERIES_HINT = (
    "The truncated series (`PhantomAdjoint` / `NeumannAdjoint`) produced a NaN or Inf: "
    "the map's Jacobian at the solution is not contractive enough for it (try fewer "
    "`steps`/`terms`, a smaller `damping`, or `ImplicitAdjoint()`), or pass "
    "`throw=False` to the solve to get NaN gradients instead of an error."
)


def series_solve(steps: int, damping: float, throw: bool) -> LinearSolve:
    """`x_k = damping * sum_{i<k} (I - damping*A)^i b`: damped Richardson from zero.

    With `A = I - J_f` (a fixed-point problem) this is the k-step phantom
    gradient; with `damping=1` it is the truncated Neumann series
    `sum_{i<k} J_f^i b`. It is an approximation by design, so only a non-finite
    answer counts as a failure.
    """

    def solve(matvec, b, transpose_of=None):
        del transpose_of

        def body(_, x):
            return x + damping * (b - matvec(x))

        x = fori_loop(0, steps, body, jnp.zeros_like(b))
        failed = ~jnp.all(jnp.isfinite(x))
        return flag_failure(x, failed, jnp.array(steps), max_norm(x), throw, _SERIES_HINT)

    return solve
