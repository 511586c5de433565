"""Limited-memory ("good") Broyden with a backtracking line search."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import fixpoint
from fixpoint import internal

from ._backtracking import Backtracking, advance, base_point, init_backtracking, judge


class _BroydenState(eqx.Module):
    us: Float[Array, "m n"]
    vs: Float[Array, "m n"]
    valid: Bool[Array, " m"]
    slot: Int[Array, ""]
    search: Backtracking
    restarts: Int[Array, ""]
    gamma: Float[Array, ""]  # the initial inverse Jacobian is gamma * I


class Broyden(internal.AbstractSolver):
    """Broyden's "good" method with a limited-memory inverse Jacobian.

    Works on the root form `G(y) = 0` with `H ≈ J_G⁻¹ = γ I + Σ u_i v_iᵀ`,
    starting from `H = I` (so the first step of a fixed-point problem is a
    Picard step).
    The rank-one updates live in a ring buffer of size `history`; the oldest is
    overwritten. Each step costs one evaluation and O(history · n) work.

    Safeguards: initial scaling (the first secant pair sets `H0 = γ I`,
    `γ = sᵀΔg / ΔgᵀΔg`, so a Jacobian near `-I` or far from unit scale is
    handled); a backtracking line search on `|G|₂` (a trial point without
    sufficient decrease, or with a non-finite residual, is rejected; its secant
    information is still used, and the next trial goes half as far along the
    direction of the *updated* model from the last accepted point, down to
    `min_step`, after which the point is accepted and the rank-one memory
    cleared, `γ` kept); an update whose denominator is tiny or non-finite is
    skipped.

    Broyden, *A class of methods for solving nonlinear simultaneous equations*,
    Math. Comp. 1965.

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test (default `fixpoint.max_norm`).

    Keyword-only:

    - `history`: the number of rank-one updates kept, `>= 1` (default 20).
    - `min_step`: the smallest line-search step, in `(0, 1)` (default 1e-3).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    history: int = eqx.field(default=20, converter=internal.as_python_number, kw_only=True)
    min_step: float = eqx.field(default=0.001, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_tolerances(self)
        internal.check_int(self.history, "history", 1, owner="Broyden")
        internal.check_number(self.min_step, "min_step", "(0, 1)", owner="Broyden")

    def init(self, problem, y, args):
        m, n = self.history, y.size
        return _BroydenState(
            us=jnp.zeros((m, n), y.dtype),
            vs=jnp.zeros((m, n), y.dtype),
            valid=jnp.zeros(m, bool),
            slot=jnp.array(0),
            search=init_backtracking(y),
            restarts=jnp.array(0),
            gamma=jnp.array(1.0, y.dtype),
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
        # Initial scaling: with an empty memory, the first secant pair sets
        # `H0 = gamma I` with `gamma = s·dg / dg·dg` (Barzilai–Borwein), which
        # has the sign and scale of the Jacobian's inverse (-1 for `g = 2 - y`),
        # so the method works whether `J_G` is near +I or -I.
        dgdg = dg @ dg
        bb = (s @ dg) / jnp.where(dgdg > 0, dgdg, 1)
        scalable = (
            ~jnp.any(state.valid)
            & search.has_prev
            & jnp.isfinite(gnorm)
            & jnp.isfinite(bb)
            & (jnp.abs(bb) > jnp.finfo(y.dtype).eps)
        )
        gamma = jnp.where(scalable, bb, state.gamma)
        h_dg = gamma * dg + us.T @ (vs @ dg)
        v = gamma * s + vs.T @ (us @ s)  # Hᵀ s
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
        write = update & (jnp.arange(self.history) == state.slot)
        us = jnp.where(write[:, None], u, us)
        vs = jnp.where(write[:, None], v, vs)
        # After an exhausted line search the rank-one memory is stale and is
        # cleared; the scaling `gamma` learned so far is kept.
        valid = (state.valid | write) & ~exhausted
        us = jnp.where(valid[:, None], us, 0)
        vs = jnp.where(valid[:, None], vs, 0)

        # The direction always comes from the *updated* model at the base point:
        # after a rejected trial that is the last accepted point, so a trial that
        # taught the model the Jacobian's sign is followed by a better direction
        # (not the same uphill one, halved).
        _, g_base = base_point(search, accept, y, g)
        direction = -(gamma * g_base + us.T @ (vs @ g_base))
        y_next, search = advance(search, accept, y, g, gnorm, direction)
        state = _BroydenState(
            us=us,
            vs=vs,
            valid=valid,
            slot=jnp.where(update, (state.slot + 1) % self.history, state.slot),
            search=search,
            restarts=state.restarts + jnp.where(exhausted, 1, 0),
            gamma=gamma,
        )
        return internal.Step(y_next, state, ev, trial=~accept)
