"""Newton's method, dense or matrix-free (Newton–Krylov)."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

import fixpoint
from fixpoint import RESULTS, internal

from ._backtracking import advance, init_backtracking, judge

_DENSE = (lx.LU, lx.QR)


class Newton(internal.AbstractSolver):
    """Newton's method on the root form `G(y) = 0` (for `fixed_point`: `y - f(y)`).

    Each step linearises `G` once (`jax.linearize`: one evaluation plus JVPs) and
    solves `J_G p = -G(y)` with a lineax solver, then `y <- y + damping · p`. A
    backtracking line search on `|G|₂` guards against overshooting: a trial point
    without sufficient decrease is rejected and the step halved (down to
    `min_step`); near the root full steps are accepted, so convergence stays
    quadratic.

    - `linear_solver=lineax.LU()` (default): the exact dense Jacobian, built from
      `n` JVPs. Right for small problems (`n` up to a few hundred per sample).
      The dense system is `J + μI` with `μ = sqrt(eps)·max|J 1|`, so a singular
      Jacobian (a pass-through component) gets a zero step in its null
      directions; every step must pass the inexact-Newton test
      `|J p + G| <= 0.1 |G|` on the unshifted `J`.
    - `linear_solver=lineax.GMRES(rtol, atol)`: matrix-free Newton–Krylov, one JVP
      per Krylov iteration; no `n × n` matrix is ever formed.

    Under `jax.vmap` every sample has its own Jacobian (cost linear in the batch
    size), never one Jacobian over the whole batch. A failed linear solve ends the
    loop with `RESULTS.linear_solve_failed`; a solve that reports failure but
    whose direction satisfies the inexact-Newton condition `|J p + G| <= 0.1 |G|`
    is used anyway.

    Newton–Krylov: Knoll & Keyes, *Jacobian-free Newton–Krylov methods: a survey
    of approaches and applications*, J. Comput. Phys. 2004.

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test (default `fixpoint.max_norm`).

    Keyword-only:

    - `linear_solver`: a lineax solver for `J_G p = -G(y)` (default
      `lineax.LU()`; see above).
    - `damping`: the Newton step's scale, in `(0, 1]` (default 1).
    - `min_step`: the smallest line-search step, in `(0, 1)` (default 1e-3).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    linear_solver: lx.AbstractLinearSolver = eqx.field(default=lx.LU(), kw_only=True)
    damping: float = eqx.field(default=1.0, converter=internal.as_python_number, kw_only=True)
    min_step: float = eqx.field(default=0.001, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_tolerances(self)
        if not isinstance(self.linear_solver, lx.AbstractLinearSolver):
            raise TypeError(
                f"Newton: `linear_solver` must be a lineax solver, got {self.linear_solver!r}."
            )
        internal.check_number(self.damping, "damping", "(0, 1]", owner="Newton")
        internal.check_number(self.min_step, "min_step", "(0, 1)", owner="Newton")

    def init(self, problem, y, args):
        return init_backtracking(y)

    def step(self, problem, y, args, state):
        residual, jvp, aux = jax.linearize(lambda z: problem.residual(z, args), y, has_aux=True)
        ev = internal.Evaluation(fy=y - residual, residual=residual, aux=aux)
        # The linear algebra runs in at least float32: lineax/LAPACK have no
        # bfloat16/float16 kernels. The direction is cast back to `y`'s dtype.
        work = y.dtype if jnp.finfo(y.dtype).bits >= 32 else jnp.dtype(jnp.float32)
        jvp_work = lambda v: jvp(v.astype(y.dtype)).astype(work)  # noqa: E731
        if isinstance(self.linear_solver, _DENSE):
            # A tiny Tikhonov shift `J + μI` (`μ = sqrt(eps)` times the scale of
            # `J`) keeps a singular Jacobian (a component `f` passes through
            # unchanged, a double root) from defeating LU: the singular
            # directions get a zero step, the rest stays Newton's. The step is
            # checked against the unshifted `J` by the inexact-Newton test below,
            # which an inconsistent system (`y² + 1` at 0) fails.
            scale = jnp.max(jnp.abs(jvp_work(jnp.ones(y.shape, work))))
            mu = jnp.sqrt(jnp.finfo(work).eps) * jnp.where(scale > 0, scale, 1)
            matvec = lambda v: jvp_work(v) + mu * v  # noqa: E731
        else:
            matvec = jvp_work
        operator = lx.FunctionLinearOperator(matvec, jax.ShapeDtypeStruct(y.shape, work))
        rhs = -residual.astype(work)
        sol = lx.linear_solve(operator, rhs, self.linear_solver, throw=False)
        p, solved = sol.value, sol.result == lx.RESULTS.successful
        # At an exact root there is nothing to solve.
        p = jnp.where(jnp.all(residual == 0), jnp.zeros_like(p), p).astype(y.dtype)
        gnorm = jnp.linalg.norm(residual)
        accept, _ = judge(state, gnorm, self.min_step)
        # On rejection, keep the direction computed at the last accepted point.
        direction = jnp.where(accept, self.damping * p, state.direction)
        y_next, state = advance(state, accept, y, residual, gnorm, direction)
        # A failed linear solve matters only where its direction is used, and a
        # non-finite residual is reported as such by the loop.
        # An iterative solver may report failure (lineax's GMRES can stop on a
        # false "stagnation") while its direction is a fine inexact-Newton step:
        # check `|J p + G| <= 0.1 |G|` ourselves (one more JVP) and use it then.
        forcing = jnp.linalg.norm(jvp(p) + residual) <= 0.1 * gnorm
        if isinstance(self.linear_solver, _DENSE):
            solved = jnp.array(False)  # shifted: only the forcing test counts
        ok = (solved | forcing) & jnp.all(jnp.isfinite(p))
        failed = accept & ~ok & jnp.isfinite(gnorm)
        result = RESULTS.where(failed, RESULTS.linear_solve_failed, RESULTS.successful)
        return internal.Step(y_next, state, ev, result, trial=~accept)
