"""Anderson acceleration (type II) with a scaled ridge and a restart safeguard."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import fixpoint
from fixpoint import internal


class _AndersonState(eqx.Module):
    fys: Float[Array, "m n"]  # f(y_i) for the stored iterates
    res: Float[Array, "m n"]  # f(y_i) - y_i
    valid: Bool[Array, " m"]
    slot: Int[Array, ""]
    restarts: Int[Array, ""]
    y_good: Float[Array, " n"]  # the last iterate with a finite residual
    has_good: Bool[Array, ""]


class Anderson(internal.AbstractSolver):
    """Anderson acceleration (Walker & Ni 2011, type II / "AA-II").

    Keeps the last `history` pairs `(f(y_i), r_i = f(y_i) - y_i)` and picks
    weights `α` (summing to one) minimising `|Σ α_i r_i|`:

        y_next = Σ α_i f(y_i) - (1 - damping) Σ α_i r_i

    What makes it robust where fixed-ridge implementations stall:

    - the Tikhonov ridge is *relative*: `ridge · trace(RRᵀ)/m`, so it scales with
      the residuals and never swamps them near convergence;
    - a back-off: a point whose evaluation is not finite (an extrapolation out
      of `f`'s domain) is not stored, and the next point is halfway back to the
      last good iterate;
    - a safeguard: if the weights are non-finite or `Σ|α_i|` exceeds
      `max_weight` (an ill-conditioned least-squares problem), the step falls
      back to a (damped) Picard step and the history restarts from the newest pair.

    **Arguments:** `rtol`, `atol`, `norm`; keyword-only: `history` (≥ 1),
    `damping` in (0, 1], `ridge` (relative, ≥ 0), `max_weight` (> 1).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    history: int = eqx.field(default=5, converter=internal.as_python_number, kw_only=True)
    damping: float = eqx.field(default=1.0, converter=internal.as_python_number, kw_only=True)
    ridge: float = eqx.field(default=1e-10, converter=internal.as_python_number, kw_only=True)
    max_weight: float = eqx.field(
        default=10000.0, converter=internal.as_python_number, kw_only=True
    )

    def __check_init__(self):
        internal.check_tolerances(self)
        internal.check_int(self.history, "history", 1, owner="Anderson")
        internal.check_number(self.damping, "damping", "(0, 1]", owner="Anderson")
        internal.check_number(self.ridge, "ridge", ">= 0", owner="Anderson")
        internal.check_number(self.max_weight, "max_weight", "> 1", owner="Anderson")

    def init(self, problem, y, args):
        m, n = self.history, y.size
        return _AndersonState(
            fys=jnp.zeros((m, n), y.dtype),
            res=jnp.zeros((m, n), y.dtype),
            valid=jnp.zeros(m, bool),
            slot=jnp.array(0),
            restarts=jnp.array(0),
            y_good=y,
            has_good=jnp.array(False),
        )

    def step(self, problem, y, args, state):
        ev = problem.evaluate(y, args)
        r = ev.fy - y
        # A non-finite evaluation (e.g. an extrapolation out of the domain) is not
        # stored; the next point backs off halfway towards the last good iterate.
        good = jnp.all(jnp.isfinite(r))
        newest = (jnp.arange(self.history) == state.slot) & good
        fys = jnp.where(newest[:, None], ev.fy, state.fys)
        res = jnp.where(newest[:, None], r, state.res)
        valid = state.valid | newest

        # The small least-squares system is solved in at least float32 (LAPACK
        # has no bfloat16/float16 kernels, and the Gram matrix needs the range).
        work = y.dtype if jnp.finfo(y.dtype).bits >= 32 else jnp.dtype(jnp.float32)
        alpha = self._weights(res.astype(work), valid).astype(y.dtype)
        ok = jnp.all(jnp.isfinite(alpha)) & (jnp.sum(jnp.abs(alpha)) <= self.max_weight)
        alpha = jnp.where(ok, alpha, newest.astype(y.dtype))
        y_next = alpha @ fys - (1 - self.damping) * (alpha @ res)
        y_next = jnp.where(good, y_next, 0.5 * (state.y_good + y))
        state = _AndersonState(
            fys=fys,
            res=res,
            valid=jnp.where(ok, valid, newest),
            slot=jnp.where(good, (state.slot + 1) % self.history, state.slot),
            restarts=state.restarts + jnp.where(ok, 0, 1),
            y_good=jnp.where(good, y, state.y_good),
            has_good=state.has_good | good,
        )
        return internal.Step(y_next, state, ev, trial=~good & state.has_good)

    def _weights(self, res, valid):
        """Solve `min |Σ α_i r_i|² + λ|α|²` s.t. `Σ α_i = 1` over the valid rows."""
        m = self.history
        gram = jnp.where(valid[:, None] & valid[None, :], res @ res.T, 0)
        # Normalise by the mean squared residual so the ridge is relative and the
        # bordered system below is well balanced at any residual size.
        scale = jnp.maximum(
            jnp.trace(gram) / jnp.sum(valid, dtype=res.dtype), jnp.finfo(res.dtype).tiny
        )
        # Invalid rows get a unit diagonal and no constraint: their weights are zero.
        gram = gram / scale + jnp.diag(jnp.where(valid, self.ridge, 1.0))
        ones = valid.astype(res.dtype)
        system = jnp.block([[gram, ones[:, None]], [ones[None, :], jnp.zeros((1, 1), res.dtype)]])
        rhs = jnp.zeros(m + 1, res.dtype).at[m].set(1.0)
        return jnp.linalg.solve(system, rhs)[:m]
