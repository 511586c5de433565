"""The convergence test: one rule, called by every loop.

The fixed-point / root-finding loop (`_fixed_point_loop.py`), the scan loop
(`_scan_loop.py`) and the splitting loop (`solvers/_splitting.py`) all decide
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

from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._custom_types import Norm, Tolerance
from ._norm import max_norm


def _ratio(v, ref, rtol, atol):
    """`v / (atol + rtol·|ref|)` entrywise, with `0/0 = 0` and `v/0 = inf` for `v ≠ 0`."""
    scale = atol + rtol * jnp.abs(ref)
    positive = scale > 0
    ratio = jnp.where(positive, v / jnp.where(positive, scale, 1), jnp.inf)
    return jnp.where(v == 0, jnp.zeros_like(v), ratio)


def scaled_size(
    norm: Norm,
    v: Float[Array, "*shape"],
    ref: Float[Array, "*shape"],
    rtol: Tolerance,
    atol: Tolerance,
) -> Float[Array, ""]:
    """`norm(v / (atol + rtol·|ref|))`, with `0/0 = 0` and `v/0 = inf` for `v ≠ 0`.

    **Arguments:**

    - `norm`: the norm, e.g. `fixpoint.max_norm`.
    - `v`: the vector measured (a residual, a step, an error estimate).
    - `ref`: the reference whose magnitude scales `rtol`, same shape as `v`.
    - `rtol`: the relative tolerance (a float or a traced scalar).
    - `atol`: the absolute tolerance (a float or a traced scalar).

    **Returns:**

    The scaled size, a scalar; below 1 when `v` meets the tolerance.
    """
    return norm(_ratio(v, ref, rtol, atol))


def meets(
    norm: Norm,
    v: Float[Array, "*shape"],
    ref: Float[Array, "*shape"],
    rtol: Tolerance,
    atol: Tolerance,
) -> Bool[Array, ""]:
    """Whether `v` meets the tolerance relative to `ref` (False for NaN).

    **Arguments:**

    - `norm`: the norm, e.g. `fixpoint.max_norm`.
    - `v`: the vector measured.
    - `ref`: the reference whose magnitude scales `rtol`, same shape as `v`.
    - `rtol`: the relative tolerance.
    - `atol`: the absolute tolerance.

    **Returns:**

    `scaled_size(norm, v, ref, rtol, atol) < 1`, a boolean scalar.
    """
    return scaled_size(norm, v, ref, rtol, atol) < 1


def rows_meet(norm, v, ref, rtol, atol) -> Bool[Array, " T"]:
    """`meets` for each row of `(T, D)` arrays: `vmap(norm)` of the scaled rows `< 1`.

    For the max-norm (the scan solvers' default) this is the same test entry by
    entry, `v == 0 or |v| < atol + rtol·|ref|`, and then "all" along the row: no
    division and no float reduction. Exactly equal, since for a positive scale
    `s`, `|v| < s` exactly when the rounded `|v| / s` is below 1. (XLA:CPU hands a
    `(T, 8)` float max-reduction to a library call, which dominated the scan
    loop's test: GRU, T = 1e4, D = 8, float32, 173 µs against 34 per test.)
    """
    if norm is max_norm:
        scale = atol + rtol * jnp.abs(ref)
        return jnp.all((v == 0) | (jnp.abs(v) < scale), axis=-1)
    return jax.vmap(norm)(_ratio(v, ref, rtol, atol)) < 1


def row_sizes(norm, v) -> Float[Array, "..."]:
    """An array whose maximum is the largest `norm` of the rows of `v` (`inf` where
    a row's norm is not finite).

    For the max-norm, the entries themselves (non-finite ones as `inf`), so the
    caller's one maximum replaces a reduction per row.
    """
    if norm is max_norm:
        if v.size == 0:  # rows of no entries: norm 0, as `max_norm` says
            return jnp.zeros((1,), v.dtype)
        return jnp.where(jnp.isfinite(v), jnp.abs(v), jnp.inf)
    rnorm = jax.vmap(norm)(v)
    return jnp.where(jnp.isfinite(rnorm), rnorm, jnp.inf)


def norms(norm, vectors) -> Float[Array, " k"]:
    """`[norm(v) for v in vectors]` as one reduction (the vectors share a shape).

    One pass over a stacked `[k, n]` array instead of `k` passes: in a loop
    whose map is cheap, every separate reduction is a kernel of its own.
    """
    if len(vectors) == 1:
        return norm(vectors[0])[None]
    return jax.vmap(norm)(jnp.stack(vectors))


class Sizes(NamedTuple):
    """The norms one convergence test needs, from one reduction (`measure`).

    Only `residual` is a size to report; the scaled sizes are only ever
    compared with 1, and for the max-norm they are `0` (meets) or `1` (does not).
    """

    residual: Float[Array, ""]  # norm(G(y))
    vs_y: Float[Array, ""] | None  # scaled residual against |y| (fixed-point form)
    vs_y0: Float[Array, ""] | None  # scaled residual against |y0| (fixed-point form)
    step: Float[Array, ""] | None  # scaled step against |y| (None: no step test)
    extra: tuple = ()  # the norms of `measure(..., extra=...)`, in order


def _misses(v, ref, rtol, atol):
    """`1` where `|v / (atol + rtol·|ref|)|` is not below 1 (`_ratio`'s rules), else `0`.

    The max-norm's test without a division: `max |ratio| < 1` exactly when
    every entry is zero or `|v| < scale` (see `rows_meet`), also for NaN
    (which meets nothing) and a zero or infinite scale.
    """
    scale = atol + rtol * jnp.abs(ref)
    return jnp.where((v == 0) | (jnp.abs(v) < scale), 0, 1).astype(v.dtype)


def measure(norm, residual, y, step, rtol, atol, *, kind: str, y0, extra=()) -> Sizes:
    """Every norm of the convergence test at `y`, taken in one reduction.

    For the max-norm the scaled rows are `_misses` (no divisions: Picard at
    d = 256 spent more on the test's divisions than on its bookkeeping).
    `extra`: more vectors (of `y`'s shape) whose plain norms ride along in the
    same reduction (the infeasibility watch's).
    """
    scaled = _misses if norm is max_norm else _ratio
    rows = [residual]
    if kind != "root":
        rows += [scaled(residual, y, rtol, atol), scaled(residual, y0, rtol, atol)]
    if step is not None:
        rows.append(scaled(step, y, rtol, atol))
    rows += list(extra)
    sizes = list(norms(norm, rows))
    rnorm = sizes.pop(0)
    vs_y, vs_y0 = (sizes.pop(0), sizes.pop(0)) if kind != "root" else (None, None)
    step_size = sizes.pop(0) if step is not None else None
    return Sizes(rnorm, vs_y, vs_y0, step_size, tuple(sizes))


def decide(sizes: Sizes, rtol, atol, *, kind: str, start_norm):
    """`(converged, residual_ok)` from `measure`'s sizes (see `converged`)."""
    if kind == "root":
        # `norm(g / (atol + rtol·start))` for a scalar scale is `norm(g) / scale`.
        residual_ok = _ratio(sizes.residual, start_norm, rtol, atol) < 1
    else:
        fallen = sizes.residual <= 0.5 * start_norm
        vs_y, vs_y0 = cast(Array, sizes.vs_y), cast(Array, sizes.vs_y0)  # set by `measure`
        residual_ok = (vs_y < 1) & (fallen | (vs_y0 < 1))
    ok = residual_ok if sizes.step is None else residual_ok & (sizes.step < 1)
    return ok, residual_ok


def converged(
    norm: Norm,
    residual: Float[Array, " n"],
    y: Float[Array, " n"],
    step: Float[Array, " n"] | None,
    rtol: Tolerance,
    atol: Tolerance,
    *,
    kind: str,
    start_norm: Float[Array, ""],
    y0: Float[Array, " n"],
) -> tuple[Bool[Array, ""], Bool[Array, ""]]:
    """`(converged, residual_ok)` for one iterate of a fixed-point or root problem.

    **Arguments:**

    - `norm`: the solver's norm (absolutely homogeneous, as every norm is).
    - `residual`: `G(y)`: `y - f(y)` (`kind="fixed_point"`) or `g(y)` (`"root"`).
    - `y`: the current iterate.
    - `step`: the solver's proposed update `y_next - y` (or `None` to skip that test).
    - `rtol`: the relative tolerance.
    - `atol`: the absolute tolerance.
    - `kind`: `"fixed_point"` (the residual is measured against `|y|` and must
      have fallen, see above) or `"root"` (against `atol + rtol·start_norm`).
    - `start_norm`: `norm(G(y0))`, the residual norm at the starting point.
    - `y0`: the starting point.

    All the norms are taken in one reduction; a loop that needs
    `norm(residual)` first (to set `start_norm`) calls `measure` and `decide`
    itself.

    **Returns:**

    `(converged, residual_ok)`, two boolean scalars: whether the iterate passes
    the whole test, and the residual test alone (used to tell a residual within
    tolerance from a diverging one).
    """
    sizes = measure(norm, residual, y, step, rtol, atol, kind=kind, y0=y0)
    return decide(sizes, rtol, atol, kind=kind, start_norm=start_norm)
