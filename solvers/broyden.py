"""Limited-memory ("good") Broyden with a backtracking line search."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import fixpoint

from ._backtracking import Backtracking, advance, init_backtracking, judge


class _BroydenState(eqx.Module):
    us: Float[Array, "m n"]
    vs: Float[Array, "m n"]
    valid: Bool[Array, " m"]
    slot: Int[Array, ""]
    search: Backtracking
    restarts: Int[Array, ""]


class Broyden(fixpoint.AbstractSolver):
    """Broyden's "good" method with a limited-memory inverse Jacobian.

    Works on the root form `G(y) = 0` with `H ≈ J_G⁻¹ = I + Σ u_i v_iᵀ`, starting
    from `H = I` (so the first step of a fixed-point problem is a Picard step).
    The rank-one updates live in a ring buffer of size `memory`; the oldest is
    overwritten. Each step costs one evaluation and O(memory · n) work.

    Safeguards: a backtracking line search on `|G|₂` (a trial point without
    sufficient decrease is rejected; its secant information is still used, and
    the next trial goes half as far along the same direction, down to
    `min_step`, after which the point is accepted and the memory cleared); an
    update whose denominator is tiny or non-finite is skipped.

    **Arguments:** `rtol`, `atol`, `memory` (≥ 1), `min_step` in (0, 1), `norm`.
    """

    rtol: float
    atol: float
    memory: int = 20
    min_step: float = 1e-3
    norm: Callable = fixpoint.max_norm

    def __check_init__(self):
        fixpoint.check_tolerances(self)
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"Broyden: `memory` must be an int >= 1, got {self.memory!r}.")
        if not isinstance(self.min_step, (int, float)) or not 0 < self.min_step < 1:
            raise ValueError(f"Broyden: `min_step` must lie in (0, 1), got {self.min_step!r}.")

    def init(self, problem, y, args):
        m, n = self.memory, y.size
        return _BroydenState(
            us=jnp.zeros((m, n), y.dtype),
            vs=jnp.zeros((m, n), y.dtype),
            valid=jnp.zeros(m, bool),
            slot=jnp.array(0),
            search=init_backtracking(y),
            restarts=jnp.array(0),
        )

    def step(self, problem, y, args, state):
        ev = problem.evaluate(y, args)
        g = ev.residual
        gnorm = jnp.linalg.norm(g)
        search = state.search
        accept, exhausted = judge(search, gnorm, self.min_step)

        # Rank-one "good Broyden" update from the last accepted point to this
        # one. A rejected trial point is still valid secant information.
        us, vs = state.us, state.vs
        s = y - search.y_acc
        dg = g - search.g_acc
        h_dg = dg + us.T @ (vs @ dg)
        v = s + vs.T @ (us @ s)  # Hᵀ s
        denom = v @ dg
        scale = jnp.linalg.norm(s) * jnp.linalg.norm(dg)
        update = (
            search.has_prev
            & jnp.isfinite(denom)
            & jnp.isfinite(gnorm)
            & (jnp.abs(denom) > 1e3 * jnp.finfo(y.dtype).eps * scale)
            & (scale > 0)
        )
        u = (s - h_dg) / jnp.where(update, denom, 1)
        write = update & (jnp.arange(self.memory) == state.slot)
        us = jnp.where(write[:, None], u, us)
        vs = jnp.where(write[:, None], v, vs)
        valid = (state.valid | write) & ~exhausted
        us = jnp.where(valid[:, None], us, 0)
        vs = jnp.where(valid[:, None], vs, 0)

        # A new quasi-Newton direction where the trial is accepted; otherwise
        # backtrack along the previous direction.
        direction = jnp.where(accept, -(g + us.T @ (vs @ g)), search.direction)
        y_next, search = advance(search, accept, y, g, gnorm, direction)
        state = _BroydenState(
            us=us,
            vs=vs,
            valid=valid,
            slot=jnp.where(update, (state.slot + 1) % self.memory, state.slot),
            search=search,
            restarts=state.restarts + jnp.where(exhausted, 1, 0),
        )
        return fixpoint.Step(y_next, state, ev, trial=~accept)
