"""Anderson acceleration (type II) with a scaled ridge and a restart safeguard."""

from collections.abc import Callable

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import fixpoint
from fixpoint import internal


class _AndersonState(eqx.Module):
    fys: Float[Array, "m n"]  # f(y_i) for the stored iterates
    res: Float[Array, "m n"]  # f(y_i) - y_i
    gram: Float[Array, "m m"]  # r_i · r_j (entries of invalid rows are stale)
    valid: Bool[Array, " m"]
    slot: Int[Array, ""]
    restarts: Int[Array, ""]
    has_good: Bool[Array, ""]


class Anderson(internal.AbstractSolver):
    """Anderson acceleration (type II, "AA-II").

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

    Anderson, *Iterative procedures for nonlinear integral equations*, J. ACM
    1965; Walker & Ni, *Anderson acceleration for fixed-point iterations*, SIAM
    J. Numer. Anal. 2011.

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test (default `fixpoint.max_norm`).

    Keyword-only:

    - `history`: the number `m >= 1` of pairs kept (default 5).
    - `damping`: in `(0, 1]` (default 1: no damping).
    - `ridge`: the relative Tikhonov ridge, `>= 0` (default 1e-10).
    - `max_weight`: the bound on `Σ|α_i|`, `> 1`, beyond which the step falls
      back to Picard (default 1e4).
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
            gram=jnp.zeros((m, m), _work_dtype(y.dtype)),
            valid=jnp.zeros(m, bool),
            slot=jnp.array(0),
            restarts=jnp.array(0),
            has_good=jnp.array(False),
        )

    def step(self, problem, y, args, state):
        ev = problem.evaluate(y, args)
        r = ev.fy - y
        m, slot = self.history, state.slot
        # A non-finite evaluation (e.g. an extrapolation out of the domain) is not
        # stored; the next point backs off halfway towards the last good iterate.
        # `max_norm` is NaN for any NaN entry, at any size (a plain `jnp.max` drops
        # NaNs on XLA:CPU from 4096 entries).
        good = jnp.isfinite(fixpoint.max_norm(r))
        newest = (jnp.arange(m) == slot) & good
        # The new pair overwrites one row in place (the oldest, or the slot a
        # non-finite evaluation left unused); a non-finite one leaves it as it was.
        fys = state.fys.at[slot].set(jnp.where(good, ev.fy, state.fys[slot]))
        res = state.res.at[slot].set(jnp.where(good, r, state.res[slot]))
        valid = state.valid | newest

        # The Gram matrix `RRᵀ` is kept up to date one row at a time: only the
        # new residual's products with the stored ones are computed (m, not m²,
        # dot products: the whole matrix each step cost ~25 µs of ~165 at
        # n = 16384, m = 5). It is accumulated in at least float32 (LAPACK has no
        # bfloat16/float16 kernels, and the Gram matrix needs the range).
        work = state.gram.dtype
        row = res.astype(work) @ res[slot].astype(work)
        fresh = newest[:, None] | newest[None, :]
        gram = jnp.where(fresh, jnp.where(newest[:, None], row[None, :], row[:, None]), state.gram)
        alpha = self._weights(gram, valid).astype(y.dtype)
        ok = jnp.all(jnp.isfinite(alpha)) & (jnp.sum(jnp.abs(alpha)) <= self.max_weight)
        alpha = jnp.where(ok, alpha, newest.astype(y.dtype))
        # After a non-finite evaluation, the next point is halfway back to the last
        # good iterate, recovered from its stored pair as `f(y) - r` (to rounding).
        # A branch keeps that rare case off the common path: no iterate to copy
        # into the state each step, no select over the extrapolation.
        prev = (slot - 1) % m

        def extrapolate():
            # Type II: `Σ α_i f(y_i) - (1 - damping) Σ α_i r_i`; undamped, the
            # second sum is not formed (one pass over the history, not two).
            y_next = alpha @ fys
            if self.damping != 1:
                y_next = y_next - (1 - self.damping) * (alpha @ res)
            return y_next

        def back_off():
            return 0.5 * ((fys[prev] - res[prev]) + y)

        def either():
            return jnp.where(good, extrapolate(), back_off())

        # Under `vmap` a batched predicate would turn the branch into a select that
        # computes both sides at every step: branch on "every sample is good" instead
        # (unbatched), and select per sample only when one is not.
        y_next = jax.lax.cond(eqxi.unvmap_all(good), extrapolate, either)
        state = _AndersonState(
            fys=fys,
            res=res,
            gram=gram,
            valid=jnp.where(ok, valid, newest),
            slot=jnp.where(good, (slot + 1) % m, slot),
            restarts=state.restarts + jnp.where(ok, 0, 1),
            has_good=state.has_good | good,
        )
        return internal.Step(y_next, state, ev, trial=~good & state.has_good)

    def _weights(self, gram, valid):
        """Solve `min |Σ α_i r_i|² + λ|α|²` s.t. `Σ α_i = 1` over the valid rows,
        given the Gram matrix `gram[i, j] = r_i · r_j`."""
        m = self.history
        dtype = gram.dtype
        gram = jnp.where(valid[:, None] & valid[None, :], gram, 0)
        # Normalise by the mean squared residual so the ridge is relative and the
        # bordered system below is well balanced at any residual size.
        scale = jnp.maximum(jnp.trace(gram) / jnp.sum(valid, dtype=dtype), jnp.finfo(dtype).tiny)
        # Invalid rows get a unit diagonal and no constraint: their weights are zero.
        gram = gram / scale + jnp.diag(jnp.where(valid, self.ridge, 1.0))
        ones = valid.astype(dtype)
        system = jnp.block([[gram, ones[:, None]], [ones[None, :], jnp.zeros((1, 1), dtype)]])
        rhs = jnp.zeros(m + 1, dtype).at[m].set(1.0)
        return jnp.linalg.solve(system, rhs)[:m]


def _work_dtype(dtype):
    """The dtype of the least-squares work: `dtype`, but at least float32."""
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
