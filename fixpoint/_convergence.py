"""The convergence test: one rule, called by every loop.

The fixed-point / root-finding loop (`_iterate.py`), the scan loop
(`_scan_loop.py`) and the splitting loop (`solvers/splitting.py`) all decide
"converged" here, so the rule is written once:

- **Scaled size.** A vector `v` (a residual, a step, an error estimate) meets
  the tolerance relative to a reference `ref` when
  `norm(v / (atol + rtol·|ref|)) < 1`. An entry that is exactly zero meets any
  tolerance (also `atol = 0` at `ref = 0`, where the ratio would be `0/0`); a
  nonzero entry with a zero scale does not.
- **A residual must have fallen** (fixed-point form): a residual that is merely
  small next to a runaway `|y|` (`y ↦ y + 1` at `y = 100`, `rtol = 1e-2`) is
  never accepted. Besides meeting the tolerance relative to `|y|`, the
  residual must either meet it relative to the starting point `|y0|` as well
  (a warm start near the answer), or have fallen to at most half its starting
  norm. (No residual test can tell a residual that itself decays along a
  runaway, `y ↦ y + 1/(1+|y|)`, from convergence, nor a point where rounding
  makes `f(y) == y` exactly.)
- **A root-finding residual is measured in its own units**: `|g(y)|` against
  `atol + rtol·‖g(y0)‖` (the problem's own scale), never against `|y|`.
- **The solver's next step must be as small** (in `y`'s units, relative to
  `|y|`): for Newton-type solvers it estimates the distance to the solution.
"""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def scaled_size(norm, v, ref, rtol, atol) -> Float[Array, "..."]:
    """`norm(v / (atol + rtol·|ref|))`, with `0/0 = 0` and `v/0 = inf` for `v ≠ 0`."""
    scale = atol + rtol * jnp.abs(ref)
    positive = scale > 0
    ratio = jnp.where(positive, v / jnp.where(positive, scale, 1), jnp.inf)
    return norm(jnp.where(v == 0, jnp.zeros_like(v), ratio))


def meets(norm, v, ref, rtol, atol) -> Bool[Array, "..."]:
    """Whether `v` meets the tolerance relative to `ref` (False for NaN)."""
    return scaled_size(norm, v, ref, rtol, atol) < 1


def converged(
    norm,
    residual,
    y,
    step,
    rtol,
    atol,
    *,
    kind: str,
    start_norm,
    y0,
) -> tuple[Bool[Array, ""], Bool[Array, ""]]:
    """`(converged, residual_ok)` for one iterate of a fixed-point or root problem.

    **Arguments:**

    - `norm`: the solver's norm.
    - `residual`: `G(y)`: `y - f(y)` (`kind="fixed_point"`) or `g(y)` (`"root"`).
    - `y`: the current iterate.
    - `step`: the solver's proposed update `y_next - y` (or `None` to skip that test).
    - `start_norm`: `norm(G(y0))`, the residual norm at the starting point.
    - `y0`: the starting point.

    `residual_ok` is the residual test alone (used to tell a residual within
    tolerance from a diverging one).
    """
    if kind == "root":
        residual_ok = meets(norm, residual, start_norm, rtol, atol)
    else:
        fallen = norm(residual) <= 0.5 * start_norm
        residual_ok = meets(norm, residual, y, rtol, atol) & (
            fallen | meets(norm, residual, y0, rtol, atol)
        )
    ok = residual_ok
    if step is not None:
        ok = ok & meets(norm, step, y, rtol, atol)
    return ok, residual_ok
