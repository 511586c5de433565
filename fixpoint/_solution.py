"""`Solution` and the `RESULTS` enumeration."""

from typing import Any

import equinox as eqx
from jaxtyping import Array, PyTree


class RESULTS(eqx.Enumeration):
    """Why a solve stopped. Compare with `==`: `sol.result == RESULTS.successful`."""

    successful = ""
    max_steps_reached = (
        "The maximum number of steps was reached before the residual met the "
        "tolerance. Raise `max_steps`, loosen `rtol`/`atol`, or use a faster solver."
    )
    diverged = (
        "The residual grew far beyond the smallest residual seen so far: the "
        "iteration is diverging (is the map a contraction near the starting point?)."
    )
    nonfinite = "A NaN or Inf appeared in the iterate or in the residual."
    linear_solve_failed = "A linear solve inside the solver failed."


class Solution(eqx.Module):
    """The result of `fixpoint.fixed_point` or `fixpoint.root_find`.

    **Attributes:**

    - `value`: the solution, with the same pytree structure as `y0`. It is the
      iterate at which the reported residual was measured.
    - `result`: a `RESULTS` item; `sol.result == RESULTS.successful` is a boolean
      (a boolean array under `vmap`).
    - `aux`: the auxiliary output of `fn` at `value` (`None` unless `has_aux=True`).
    - `stats`: a dict with `num_steps` (the index of the returned iterate: the
      number of updates made), `residual` (the solver's norm of the residual at
      `value`) and, when `record_residuals=True`, `residual_history` (the residual
      norm at every step, NaN after the last one).
    """

    value: PyTree[Array]
    result: RESULTS
    aux: Any
    stats: dict[str, Array]
