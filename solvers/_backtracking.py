"""Backtracking on the residual norm, for the solvers that take Newton-like steps.

Fits the one-evaluation-per-step protocol: a step that lands at a trial point
`y_acc + alpha p` either accepts it (sufficient decrease of `|G|`, Armijo-style)
and computes a new direction there, or rejects it and proposes a point at half
the step length from the last accepted point `y_acc`.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


class Backtracking(eqx.Module):
    y_acc: Float[Array, " n"]  # last accepted point
    g_acc: Float[Array, " n"]  # residual there
    gnorm_acc: Float[Array, ""]
    direction: Float[Array, " n"]
    alpha: Float[Array, ""]
    has_prev: Bool[Array, ""]


def init_backtracking(y) -> Backtracking:
    return Backtracking(
        y_acc=y,
        g_acc=jnp.zeros_like(y),
        gnorm_acc=jnp.array(jnp.inf, y.dtype),
        direction=jnp.zeros_like(y),
        alpha=jnp.array(1.0, y.dtype),
        has_prev=jnp.array(False),
    )


def judge(bt: Backtracking, gnorm, min_step: float, decrease: float = 1e-4):
    """`(accept, exhausted)` for the trial point whose residual norm is `gnorm`.

    The Armijo-style test `|G| <= (1 - decrease·α)|G_acc|`. A trial is also
    accepted on the first step, or once the step has shrunk below `min_step`
    (`exhausted`: the caller should treat its model as stale, e.g. reset a
    quasi-Newton memory). Non-monotone variants (accepting some growth) were
    tried for Broyden and rejected: letting the reference drift made Broyden
    diverge on a linear problem, and anchoring it to the best norm made it stall.
    """
    sufficient = gnorm <= (1 - decrease * bt.alpha) * bt.gnorm_acc
    exhausted = bt.alpha <= min_step
    accept = ~bt.has_prev | sufficient | exhausted
    return accept, exhausted & ~sufficient & bt.has_prev


def base_point(bt: Backtracking, accept, y, g):
    """Where the next step starts: `y` if accepted, else the last accepted point."""
    return jnp.where(accept, y, bt.y_acc), jnp.where(accept, g, bt.g_acc)


def advance(bt: Backtracking, accept, y, g, gnorm, direction):
    """The next iterate and state.

    `direction` is a step from `base_point(...)`: taken in full from `y` if
    `accept`, else scaled by half the previous step length from the last accepted
    point (the caller may pass an improved direction, e.g. after a secant update).
    """
    alpha = jnp.where(accept, jnp.ones_like(bt.alpha), bt.alpha / 2)
    y_base, g_base = base_point(bt, accept, y, g)
    return y_base + alpha * direction, Backtracking(
        y_acc=y_base,
        g_acc=g_base,
        gnorm_acc=jnp.where(accept, gnorm, bt.gnorm_acc),
        direction=direction,
        alpha=alpha,
        has_prev=jnp.array(True),
    )
