"""Halpern's anchored iteration, with optional adaptive restarts."""

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax.numpy as jnp

import fixpoint
from fixpoint import internal


class _State(NamedTuple):
    anchor: jnp.ndarray  # the point every step is pulled back towards
    count: jnp.ndarray  # steps since the anchor was set (`k`)
    anchor_norm: jnp.ndarray  # the residual norm at the anchor (restarts only)


class Halpern(internal.AbstractSolver):
    """Halpern iteration `y_{k+1} = β_k y_0 + (1 − β_k) f(y_k)`, `β_k = 1/(k+2)`.

    For maps that are only *nonexpansive* (`|f(x) − f(y)| ≤ |x − y|`), where
    Picard may cycle forever (a rotation, a reflection), the anchored iteration
    converges, with the optimal worst-case rate `|y_k − f(y_k)| ≤ 2·|y_0 − y*|/(k+1)`
    in the Euclidean norm (Lieder 2021; Cai, Alacaoglu and Diakonikolas 2023), to
    the fixed point nearest the anchor `y_0` (Wittmann 1992). That rate is also
    all it gets on a contraction, where Picard is linear: there use `restart_ratio`.

    - `restart_ratio=None` (default): one anchor, the starting point.
    - `restart_ratio=r` in (0, 1): adaptive restarts. Once the residual norm has fallen
      to `r` times its value at the anchor, the current iterate becomes the new
      anchor and `k` starts again. On a `ρ`-contraction (Euclidean norm) each
      restart comes after at most about `2/(r(1 − ρ))` steps, since
      `|y_0 − y*| ≤ |y_0 − f(y_0)|/(1 − ρ)`, so the rate is linear; on a nonexpansive map
      the restarted anchors are no longer `y_0`, so the limit is a fixed point,
      not necessarily the one nearest `y_0`.

    Cost: one evaluation per step (plus one norm with `restart_ratio`). The state
    holds the anchor (one copy of `y`).

    On a map with no fixed point the iterates drift by half the infimal
    displacement vector per step (Park and Ryu, *Accelerated infeasibility
    detection of constrained optimization and fixed-point iterations*, ICML
    2023): a solve that runs out of steps during that drift ends
    `RESULTS.infeasible`, the estimate in `stats["displacement"]` (see the
    results guide; with restarts the anchors move and it may not be
    recognised).

    Halpern, *Fixed points of nonexpanding maps*, Bull. Amer. Math. Soc. 1967;
    Wittmann, *Approximation of fixed points of nonexpansive mappings*, Arch.
    Math. 1992; Lieder, *On the convergence rate of the Halpern-iteration*,
    Optim. Lett. 2021.

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test (default `fixpoint.max_norm`); it
      also measures the residual for the restarts.

    Keyword-only:

    - `restart_ratio`: `None` (default) or a number in `(0, 1)`, as above.
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    restart_ratio: float | None = eqx.field(
        default=None, converter=internal.as_python_number, kw_only=True
    )
    # The pull towards the anchor does not vanish at a fixed point: only the
    # residual is tested.
    step_estimates_error: ClassVar[bool] = False
    # Its residual dips (nearly to zero on a rotation) and rises again: divergence
    # is judged against the first residual, not the smallest.
    diverges_from_start: ClassVar[bool] = True

    def __check_init__(self):
        internal.check_tolerances(self)
        if self.restart_ratio is not None:
            internal.check_number(self.restart_ratio, "restart_ratio", "(0, 1)", owner="Halpern")

    def drift_rate(self):
        # Anchored at y_0 with β_k = 1/(k+2), a map y ↦ y − v gives y_k = y_0 − k v / 2.
        return 0.5

    def init(self, problem, y, args):
        rdtype = jnp.finfo(y.dtype).dtype
        return _State(anchor=y, count=jnp.array(0), anchor_norm=jnp.array(jnp.inf, rdtype))

    def step(self, problem, y, args, state):
        ev = problem.evaluate(y, args)
        anchor, count, anchor_norm = state
        if self.restart_ratio is not None:
            rnorm = self.norm(ev.residual)
            anchor_norm = jnp.where(count == 0, rnorm, anchor_norm)
            # A NaN residual never restarts (the comparison is False).
            again = (count > 0) & (rnorm <= self.restart_ratio * anchor_norm)
            anchor = jnp.where(again, y, anchor)
            count = jnp.where(again, 0, count)
            anchor_norm = jnp.where(again, rnorm, anchor_norm)
        beta = (1 / (count + 2)).astype(y.dtype)
        y_next = beta * anchor + (1 - beta) * ev.fy
        return internal.Step(y_next, _State(anchor, count + 1, anchor_norm), ev)
