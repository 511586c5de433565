"""The solver protocol that one generic loop drives (see `_fixed_point_loop.py`)."""

import abc
from typing import Any, ClassVar, Generic, TypeVar

import equinox as eqx
import numpy as np
from equinox import AbstractVar
from jax.core import Tracer
from jaxtyping import Array, Float

from ._custom_types import Args, HasTolerances, Norm
from ._fixed_point_problem import Evaluation, Problem
from ._solution import RESULTS

_State = TypeVar("_State")


class Step(eqx.Module):
    """What one solver step reports to the loop (the return of `AbstractSolver.step`).

    **Arguments:**

    - `y_next`: the proposed next iterate, flat, shape `(n,)`.
    - `state`: the solver state for the next step.
    - `evaluation`: `fn` evaluated at the current iterate, an `Evaluation` (the
      loop tests convergence on its residual).
    - `result`: a `fixpoint.RESULTS`: `RESULTS.successful` (default) unless the
      solver itself failed at this iterate (e.g. a linear solve).
    - `trial`: whether the current iterate was only a trial point that the solver
      rejected (a line search backtracking), a bool or a boolean scalar array
      (default `False`). A rejected trial never counts as divergence: the solver
      is already stepping back from it.
    - `exact`: whether `evaluation` is `fn` itself at `y` (default `True`), or
      only an estimate of it (a bool or a boolean scalar array): a solver that
      samples the components of a `fixpoint.FiniteSum` estimates the mean. The
      loop never accepts convergence, nor detects divergence, on an estimate,
      and `stats["residual"]` stays the norm of the last exact evaluation; a
      non-finite estimate still ends the solve (`RESULTS.nonfinite`).
    """

    y_next: Any
    state: Any
    evaluation: Evaluation
    result: RESULTS = eqx.field(default_factory=lambda: RESULTS.successful)
    trial: Any = False
    exact: Any = True


class AbstractSolver(eqx.Module, Generic[_State]):
    """A fixed-point / root-finding algorithm on flat vectors.

    A solver holds static settings only. The loop calls `init` once, then `step`
    repeatedly. `step` evaluates the problem *once* at the current iterate `y` and
    returns a `Step`: that `Evaluation` (the loop tests convergence on its
    residual) and the proposed next iterate. Termination, divergence detection and the result
    codes are the loop's job, so every solver gets them the same way.

    Every concrete solver has the fields `rtol`, `atol` and `norm`; the loop
    decides convergence with them by `fixpoint.internal.converged` (see the docs,
    convergence rule), the same way for every solver.

    `step_estimates_error` (a class attribute, default True): whether the
    proposed step `y_next - y` estimates the distance to the solution, so that
    the loop also requires it to meet the tolerance. Set it to False where the
    step need not vanish at a fixed point (Halpern's pull towards its anchor).

    `diverges_from_start` (a class attribute, default False): whether the loop's
    divergence test (`divergence_ratio`) compares the residual norm with the
    *first* residual norm instead of the smallest one seen. Set it to True where
    the residual legitimately dips far below its later values: Halpern's
    residual on a rotation falls nearly to zero whenever the rotated copies it
    averages cancel, then rises again on its `O(1/k)` envelope.

    A subclass (a final `eqx.Module`) provides:

    - the fields `rtol`, `atol` (floats) and `norm` (a `Norm`, e.g.
      `fixpoint.max_norm`), declared as `AbstractVar`s here, conventionally
      validated in `__check_init__` by `fixpoint.internal.check_tolerances`;
    - `init(problem, y, args)`, returning the initial state;
    - `step(problem, y, args, state)`, returning a `Step`.
    """

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Norm]
    step_estimates_error: ClassVar[bool] = True
    diverges_from_start: ClassVar[bool] = False

    def drift_rate(self) -> float | None:
        """How far the iterates move per step, in units of the infimal displacement
        vector, on a map without a fixed point; `None` (default): the loop does not
        try to detect infeasibility for this solver.

        On a nonexpansive map with no fixed point, the infimal displacement vector
        `v` (the smallest `y − f(y)`) is nonzero and averaged iterations drift:
        `(y_0 − y_k) / k → rate · v` (Pazy 1971; Park and Ryu 2023). With a rate,
        the fixed-point loop watches the drift at steps 8, 16, 32, ... and at the
        last step; when the step limit is reached during a drift that was steady,
        matched by the residual, with a residual that no longer falls, over the
        last three checks, the result is `RESULTS.infeasible` instead of
        `max_steps_reached` (see the results guide). Return it only where the
        iterates of a map that *has* a fixed point stay bounded (Fejér-monotone
        methods: Picard / Krasnoselskii–Mann, Halpern); a method whose iterates
        may wander (Anderson, Newton) must keep `None`.

        **Returns:**

        The rate (Picard with damping `α`: `α`; Halpern: `1/2`), or `None`.
        """
        return None

    def stats(self, state: _State) -> dict[str, Any]:
        """Numbers of the solver's own to add to `Solution.stats` (default: none).

        Called once, on the state after the last step. Their names must not be
        the loop's own (`num_steps`, `residual`, `residual_history`,
        `displacement`).

        **Arguments:**

        - `state`: the solver state after the last step.

        **Returns:**

        A dict of arrays (e.g. `{"component_evaluations": ...}`); `{}` by default.
        """
        del state
        return {}

    @abc.abstractmethod
    def init(self, problem: Problem, y: Float[Array, " n"], args: Args) -> _State:
        """Initial solver state for starting point `y` (must not call `fn`).

        **Arguments:**

        - `problem`: the `Problem` being solved (not to be evaluated here).
        - `y`: the starting point, flat, shape `(n,)`.
        - `args`: the user's `args`.

        **Returns:**

        The solver's state: a pytree of arrays whose structure, shapes and dtypes
        stay the same from step to step (it is a `while_loop` carry).
        """

    @abc.abstractmethod
    def step(self, problem: Problem, y: Float[Array, " n"], args: Args, state: _State) -> Step:
        """Evaluate the problem once at `y` and propose the next iterate.

        **Arguments:**

        - `problem`: the `Problem` being solved; call `problem.evaluate(y, args)`
          once.
        - `y`: the current iterate, flat, shape `(n,)`.
        - `args`: the user's `args`.
        - `state`: the state returned by `init` or the previous `step`.

        **Returns:**

        A `Step`: the proposed next iterate, the next state, the evaluation at
        `y` and a result code.
        """


def check_tolerance(value: object, what: str) -> None:
    """A tolerance must be a static, finite, non-negative real number."""
    if isinstance(value, Tracer):
        raise TypeError(
            f"{what} must be a static Python float, got a traced value: tolerances "
            "decide the loop's structure. Pass a number (not a JAX array under "
            "`jit`/`vmap`), or close over it as a Python float."
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{what} must be a non-negative number, got {value!r}.")
    if isinstance(value, np.complexfloating) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a non-negative, finite number, got {value!r}.")


def check_relative_tolerance(value: float | None, what: str) -> None:
    """A relative tolerance must be below 1 (after `check_tolerance`).

    `|Δy| <= rtol·|y|` with `rtol >= 1` accepts nearly any step, and a number
    that large is more likely an option given positionally: every option after
    `rtol, atol, norm` is keyword-only, so `GaussSeidel(16)` sets `rtol=16`.
    """
    if value is not None and value >= 1:
        raise ValueError(
            f"{what} must be below 1 (a relative tolerance), got {value!r}. Options "
            "other than `rtol`, `atol` and `norm` are keyword-only: did you mean to pass "
            "one by position (write e.g. `GaussSeidel(block_size=16)`)?"
        )


def check_tolerances(solver: HasTolerances, allow_default: bool = False) -> None:
    """Shared `__check_init__` body: readable errors for bad tolerances.

    Each of `rtol` and `atol` must be a static, finite, non-negative real number
    (a traced value is refused), `rtol` must be below 1, they cannot both be
    zero, and `norm` must be callable.

    **Arguments:**

    - `solver`: the solver (anything with `rtol`, `atol` and `norm` attributes);
      its class name starts every message.
    - `allow_default`: whether a tolerance may be `None` (a default resolved at
      trace time from the dtype, as the scan solvers'
      `fixpoint.internal.scan_tolerances`). Default `False`.

    **Raises:**

    `TypeError` or `ValueError` naming the offending field.
    """
    for name in ("rtol", "atol"):
        value = getattr(solver, name)
        if not (allow_default and value is None):
            check_tolerance(value, f"{type(solver).__name__}: `{name}`")
    check_relative_tolerance(solver.rtol, f"{type(solver).__name__}: `rtol`")
    if solver.rtol == 0 and solver.atol == 0:
        raise ValueError(f"{type(solver).__name__}: `rtol` and `atol` cannot both be zero.")
    if not callable(solver.norm):
        raise TypeError(f"{type(solver).__name__}: `norm` must be callable, got {solver.norm!r}.")
