"""Picard iteration with Krasnoselskii–Mann damping."""

from collections.abc import Callable

import equinox as eqx

import fixpoint
from fixpoint import internal


class Picard(internal.AbstractSolver):
    """Damped Picard iteration `y <- (1 - damping) y + damping f(y)`.

    `damping=1` is plain fixed-point iteration; `damping < 1` is the
    Krasnoselskii–Mann averaged iteration, which converges for nonexpansive maps
    where plain iteration may oscillate. Cost: one evaluation per step. On a map
    with no fixed point, a solve that runs out of steps during a steady drift
    of the iterates ends `RESULTS.infeasible`, the infimal displacement vector
    in `stats["displacement"]` (see the results guide; with `damping=1` only
    maps whose residual settles, such as averaged ones, are recognised).

    Picard (Banach) iteration and the Krasnoselskii–Mann iteration are classic;
    for the averaged iteration see Mann, *Mean value methods in iteration*,
    Proc. Amer. Math. Soc. 1953.

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test (default `fixpoint.max_norm`).

    Keyword-only:

    - `damping`: the step `damping` in `(0, 1]` (default 1: plain iteration).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    damping: float = eqx.field(default=1.0, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_tolerances(self)
        internal.check_number(self.damping, "damping", "(0, 1]", owner="Picard")

    def drift_rate(self):
        # Krasnoselskii–Mann: y_{k+1} = y_k − α r_k, and r_k → v on a map with no
        # fixed point, so (y_0 − y_k) / k → α v.
        return self.damping

    def init(self, problem, y, args):
        return None

    def step(self, problem, y, args, state):
        ev = problem.evaluate(y, args)
        if self.damping == 1:
            y_next = ev.fy
        else:
            y_next = y + self.damping * (ev.fy - y)
        return internal.Step(y_next, state, ev)
