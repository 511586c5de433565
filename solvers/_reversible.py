"""RevDEQ's reversible relaxed iteration."""

from collections.abc import Callable

import equinox as eqx

import fixpoint
from fixpoint import internal


class Reversible(internal.AbstractReversibleSolver):
    """The coupled relaxed iteration of reversible DEQs, which can be run backwards.

    Two sequences are relaxed towards `f` of each other,
    `y_{n+1} = (1 − β) y_n + β f(z_n)`, `z_{n+1} = (1 − β) z_n + β f(y_{n+1})`,
    from `y_0 = z_0 = y0`. Interleaved they are one sequence
    `w_{k+1} = (1 − β) w_{k−1} + β f(w_k)` (`w_{2n−1} = y_n`, `w_{2n} = z_n`),
    which is what the loop runs: one evaluation per step, convergence tested
    at every iterate. Each step can be undone,
    `w_{k−1} = (w_{k+1} − β f(w_k)) / (1 − β)`, so with
    `fixpoint.ReversibleAdjoint` the gradient of the iteration itself is
    computed in memory that does not grow with the number of steps. Any
    adjoint works with this solver; `ReversibleAdjoint` only with reversible
    solvers (this one, or a `fixpoint.internal.AbstractReversibleSolver`).

    On a contraction with `J_f ≈ 0` the error shrinks by `√(1 − β)` per step
    (Picard's is `|J_f|`); with `β` near 1 it approaches Picard, and
    reversing divides by `1 − β`. The state holds one more copy of `y`.

    McCallum et al., *Reversible Deep Equilibrium Models*, arXiv:2509.12917,
    2025.

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test (default `fixpoint.max_norm`).

    Keyword-only:

    - `beta`: the relaxation `β` in `(0, 1)` (default 0.8, RevDEQ's).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    beta: float = eqx.field(default=0.8, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_tolerances(self)
        internal.check_number(self.beta, "beta", "(0, 1)", owner="Reversible")

    def update(self, previous, y, fy):
        return (1 - self.beta) * previous + self.beta * fy

    def revert(self, y, y_next, fy):
        return (y_next - self.beta * fy) / (1 - self.beta)
