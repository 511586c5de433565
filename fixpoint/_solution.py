"""`Solution` and the `RESULTS` enumeration."""

from typing import Any

import equinox as eqx
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, PyTree


class RESULTS(eqx.Enumeration):
    """Why a solve stopped. Compare with `==`: `sol.result == RESULTS.successful`.

    An `equinox.Enumeration`; each member's value is the message a
    `fixpoint.SolveError` shows. Under `jax.vmap` a result holds one code per
    sample, and `sol.result == RESULTS.successful` is a boolean array. Combine
    results with `RESULTS.where(pred, a, b)`.

    **Members:**

    - `successful`: the solve met its tolerance (or a decode finished).
    - `max_steps_reached`: the step limit (`max_steps`) was reached before the
      residual met the tolerance.
    - `diverged`: the residual grew far beyond the smallest residual seen so far
      (by the entry point's `divergence_ratio`, or a splitting solver's own;
      for `Halpern` and `VarianceReducedHalpern`, beyond the first residual).
    - `nonfinite`: a NaN or Inf appeared in the iterate or in the residual.
    - `linear_solve_failed`: a linear solve inside the solver failed (e.g. a
      Newton step's).
    - `infeasible`: the step limit was reached while the iterates drifted at a
      constant rate with a constant residual, as on a map with no fixed point
      (only for the solvers that watch for it, `Picard` and `Halpern`; it
      replaces `max_steps_reached`, never a success). `sol.stats["displacement"]`
      estimates the infimal displacement vector `v`, the smallest `y − fn(y)`
      over all `y`, in the library's residual convention (`fn(y) = y + 1` gives
      `v = −1`). Detection, not proof: see the results guide.
    - `reversal_lost`: only in the error of a gradient: `ReversibleAdjoint`,
      running the iteration backwards, lost its trajectory (see there).
    - `path_ended`: `solvers.Homotopy` could not follow its solution path to
      the target: the step along the path fell below its `min_step` (a fold,
      where the path turns back, or a singular Jacobian).
    """

    successful = ""
    max_steps_reached = (
        "The maximum number of steps was reached before the residual met the "
        "tolerance. Raise `max_steps`, loosen `rtol`/`atol`, or use a faster solver."
    )
    diverged = (
        "The residual grew far beyond the smallest residual seen so far (the first, "
        "for Halpern's solvers): the iteration is diverging (is the map a contraction, "
        "or nonexpansive, near the starting point? For `VarianceReducedHalpern`: are a "
        "few components far steeper than the mean? Raise `batch_size`)."
    )
    nonfinite = "A NaN or Inf appeared in the iterate or in the residual."
    linear_solve_failed = "A linear solve inside the solver failed."
    infeasible = (
        "The maximum number of steps was reached while the iterates drifted at a "
        "constant rate with a constant residual, as on a map with no fixed point. A "
        "fixed point, if any, lies at least half the distance travelled from `y0`: raise "
        "`max_steps` if one may be that far. `stats['displacement']` estimates the "
        "infimal displacement vector."
    )
    reversal_lost = (
        "Running the iteration backwards (`ReversibleAdjoint`) lost the forward trajectory: "
        "the recovered start drifted from `y0` by more than `rtol` times the distance the "
        "solve travelled (the number given as the residual), or overflowed, so the gradient "
        "would not be the iteration's."
    )
    path_ended = (
        "The homotopy's solution path could not be followed to the target problem: its "
        "step fell below `min_step` (a fold, where the path turns back, or a singular "
        "Jacobian). Try another `y0`, or another solver."
    )


class Solution(eqx.Module):
    """The result of `fixpoint.fixed_point` or `fixpoint.root_find` (and of the
    layers' `solve` methods).

    Built by the library; the constructor's arguments are its attributes.

    **Arguments:**

    - `value`: the solution, with the same pytree structure as `y0`. It is the
      iterate at which the reported residual was measured.
    - `result`: a `RESULTS` item; `sol.result == RESULTS.successful` is a boolean
      (a boolean array under `vmap`).
    - `aux`: the auxiliary output of `fn` at `value` (`None` unless `has_aux=True`).
    - `stats`: a dict with `num_steps` (the index of the returned iterate: the
      number of updates made), `residual` (the solver's norm of the residual at
      `value`), when `record_residuals=True`, `residual_history` (the residual
      norm at every step, NaN after the last one) and, for solvers that detect
      infeasibility (`Picard`, `Halpern`), `displacement` (with `value`'s
      structure: the average drift per step of the iterates, `(y0 − value) /
      (num_steps · rate)`; on `RESULTS.infeasible` the estimate of the infimal
      displacement vector).
    """

    value: PyTree[Array]
    result: RESULTS
    aux: Any
    stats: dict[str, Array]


def result_from_code(code) -> RESULTS:
    """The `RESULTS` item (an array of them under `vmap`) whose value is `code`."""
    return eqx.tree_at(lambda r: r._value, RESULTS.successful, code)


def _names(item) -> str:
    """`successful`, or `[successful, diverged]` for an array of results."""
    by_code = {int(v._value): name for name, v in RESULTS._name_to_item.items()}
    codes = np.asarray(item._value)
    if codes.ndim == 0:
        return by_code.get(int(codes), f"<code {int(codes)}>")
    named = np.vectorize(lambda c: by_code.get(int(c), f"<code {int(c)}>"), otypes=[object])
    return np.array2string(named(codes), separator=", ", formatter={"all": str})


_Item = type(RESULTS.successful)  # Equinox's item class, shared by all enumerations
_equinox_repr = _Item.__repr__


def _repr(item) -> str:
    # Equinox prints an item as `module.RESULTS<message>`, and the message of
    # `successful` is empty: print `RESULTS.successful` (or the name of each
    # sample's result) instead. Items of other enumerations keep Equinox's repr.
    if item._enumeration is not RESULTS:
        return _equinox_repr(item)
    if isinstance(item._value, Tracer):
        return "RESULTS.<traced>"
    name = _names(item)
    return f"RESULTS.{name}" if np.ndim(item._value) == 0 else f"RESULTS{name}"


_Item.__repr__ = _repr  # pyright: ignore[reportAttributeAccessIssue]
