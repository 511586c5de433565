"""Limited-memory ("good") Broyden with a growth safeguard."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import fixpoint
from fixpoint import RESULTS


class _BroydenState(eqx.Module):
    us: Float[Array, "m n"]
    vs: Float[Array, "m n"]
    valid: Bool[Array, " m"]
    slot: Int[Array, ""]
    y_prev: Float[Array, " n"]
    g_prev: Float[Array, " n"]
    g_prev_norm: Float[Array, ""]
    has_prev: Bool[Array, ""]
    restarts: Int[Array, ""]


class Broyden(fixpoint.AbstractSolver):
    """Broyden's "good" method with a limited-memory inverse Jacobian.

    Works on the root form `G(y) = 0` with `H ≈ J_G⁻¹ = I + Σ u_i v_iᵀ`, starting
    from `H = I` (so the first step of a fixed-point problem is a Picard step).
    The rank-one updates are kept in a ring buffer of size `memory`; the oldest
    is overwritten. Each step costs one evaluation and O(memory · n) work.

    Safeguards: an update whose denominator is tiny or non-finite is skipped; if
    the residual norm grows by more than `growth` in one step the memory is
    cleared (the next step is a plain Picard/Richardson step from the current
    point).

    **Arguments:** `rtol`, `atol`, `memory` (≥ 1), `growth` (> 1), `norm`.
    """

    rtol: float
    atol: float
    memory: int = 20
    growth: float = 2.0
    norm: Callable = fixpoint.max_norm

    def __check_init__(self):
        fixpoint.check_tolerances(self)
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"Broyden: `memory` must be an int >= 1, got {self.memory!r}.")
        if not isinstance(self.growth, (int, float)) or self.growth <= 1:
            raise ValueError(f"Broyden: `growth` must be > 1, got {self.growth!r}.")

    def init(self, problem, y, args):
        m, n = self.memory, y.size
        return _BroydenState(
            us=jnp.zeros((m, n), y.dtype),
            vs=jnp.zeros((m, n), y.dtype),
            valid=jnp.zeros(m, bool),
            slot=jnp.array(0),
            y_prev=y,
            g_prev=jnp.zeros_like(y),
            g_prev_norm=jnp.array(jnp.inf, y.dtype),
            has_prev=jnp.array(False),
            restarts=jnp.array(0),
        )

    def step(self, problem, y, args, state):
        ev = problem.evaluate(y, args)
        g = ev.residual
        gnorm = jnp.linalg.norm(g)
        us = jnp.where(state.valid[:, None], state.us, 0)
        vs = jnp.where(state.valid[:, None], state.vs, 0)

        def h(x):  # H x
            return x + us.T @ (vs @ x)

        # Rank-one "good Broyden" update of H from the last step s and change dg.
        s = y - state.y_prev
        dg = g - state.g_prev
        h_dg = h(dg)
        v = s + vs.T @ (us @ s)  # Hᵀ s
        denom = v @ dg
        scale = jnp.linalg.norm(s) * jnp.linalg.norm(dg)
        update = (
            state.has_prev
            & jnp.isfinite(denom)
            & (jnp.abs(denom) > 1e3 * jnp.finfo(y.dtype).eps * scale)
            & (scale > 0)
        )
        u = (s - h_dg) / jnp.where(update, denom, 1)
        newest = jnp.arange(self.memory) == state.slot
        us = jnp.where(update & newest[:, None], u, us)
        vs = jnp.where(update & newest[:, None], v, vs)
        valid = state.valid | (update & newest)
        slot = jnp.where(update, (state.slot + 1) % self.memory, state.slot)

        # Safeguard: a sharp rise in the residual clears the memory.
        reset = state.has_prev & (gnorm > self.growth * state.g_prev_norm)
        valid = valid & ~reset
        us = jnp.where(valid[:, None], us, 0)
        vs = jnp.where(valid[:, None], vs, 0)
        p = -(g + us.T @ (vs @ g))
        state = _BroydenState(
            us=us,
            vs=vs,
            valid=valid,
            slot=slot,
            y_prev=y,
            g_prev=g,
            g_prev_norm=gnorm,
            has_prev=jnp.array(True),
            restarts=state.restarts + jnp.where(reset, 1, 0),
        )
        return y + p, state, ev, RESULTS.successful
