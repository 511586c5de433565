"""`custom_fixed_point` / `custom_root`: our gradient rules for a user's own solver."""

import functools as ft
from collections.abc import Callable
from typing import Protocol, TypeAlias

import equinox as eqx
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._checks import as_float_pytree, check_bool, check_instance, check_output
from ._convergence import converged
from ._custom_types import Args, Fn, Y
from ._fixed_point_setup import residual_fn, setup
from ._fixed_point_solver import check_relative_tolerance, check_tolerance
from ._manual import hoist
from ._norm import max_norm


class Solver(Protocol):
    """A solver decorated by `custom_fixed_point` / `custom_root`: `(y0, args) -> y`."""

    def __call__(self, y0: Y, args: Args = None) -> Y: ...


# What `custom_fixed_point(fn)` returns: it decorates `solver(y0, args) -> y`.
Decorator: TypeAlias = Callable[[Callable[[Y, Args], Y]], Solver]


def _default_tolerances(dtype):
    return (1e-10, 1e-10) if jnp.finfo(dtype).bits >= 64 else (1e-6, 1e-6)


def _decorator(kind, name, fn, has_aux, adjoint, rtol, atol, throw) -> Decorator:
    check_instance(adjoint, AbstractAdjoint, "adjoint")
    check_bool(throw, "throw")
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            check_tolerance(value, f"{name}: `{label}`")
    check_relative_tolerance(rtol, f"{name}: `rtol`")

    def decorator(solver_fn: Callable[[Y, Args], Y]) -> Solver:
        @ft.wraps(solver_fn)
        def wrapped(y0, args=None):
            y0_flat, unravel, inputs, _ = setup(name, fn, y0, args, has_aux)
            y0 = as_float_pytree(y0)
            out_struct = eqx.filter_eval_shape(solver_fn, y0, args)
            check_output(out_struct, y0, False, f"the solver decorated by `{name}`")
            # The solver may close over traced arrays too: hoist them into `inputs`.
            solver_cc = hoist(solver_fn, y0, args)
            inputs = (*inputs, solver_cc)

            residual = residual_fn(kind)
            dtype = y0_flat.dtype
            eps = float(jnp.finfo(dtype).eps) ** 0.5
            check = (eps if rtol is None else rtol, eps if atol is None else atol)

            def primal(inputs, y, loop, checkpoints):
                del loop, checkpoints
                _, args, solver = inputs
                start = max_norm(residual(y, inputs))
                return ravel_pytree(solver(unravel(y), args))[0], (start, y)

            def failed(y, rest, inputs):
                start, y_start = rest
                # The same test as the loops', on the point the user's solver returned.
                ok, _ = converged(
                    max_norm,
                    residual(y, inputs),
                    y,
                    None,
                    *check,
                    kind=kind,
                    start_norm=start,
                    y0=y_start,
                )
                return ~ok

            tolerances = _default_tolerances(dtype)
            y_flat, _ = adjoint.apply(primal, residual, inputs, y0_flat, tolerances, failed, throw)
            return unravel(y_flat)

        return wrapped

    return decorator


def custom_fixed_point(
    fn: Fn,
    *,
    has_aux: bool = False,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    rtol: float | None = None,
    atol: float | None = None,
    throw: bool = True,
) -> Decorator:
    """Give your own solver fixpoint's gradient rule for the fixed point of `fn`.

    ```python
    @fixpoint.custom_fixed_point(fn)
    def my_solver(y0, args):
        ...  # any JAX code that returns y with fn(y, args) ≈ y
        return y

    jax.grad(lambda a: my_solver(y0, a).sum())(args)
    ```

    The decorated `my_solver(y0, args)` returns the same value; its derivative
    with respect to `args` (and arrays `fn` closes over) comes from `adjoint`
    applied to `fn` at the returned point, whatever `my_solver` did internally:
    `my_solver` itself is never differentiated (except with `UnrolledAdjoint`,
    which differentiates through it). The default `ImplicitAdjoint()` uses GMRES
    with relative tolerance `1e-6` (float32) or `1e-10` (float64) unless given
    its own.

    The returned point is checked as the loops check theirs: if
    `max_norm((y - fn(y, args)) / (atol + rtol·|y|)) < 1` (with a residual that
    has fallen from the start's, `fixpoint.internal.converged`) fails there, the
    solve counts as failed and its derivative is NaN wherever the cotangent is
    nonzero (zero where it is zero, so a masked sample does not poison a
    batch). `rtol`, `atol` default to `sqrt(eps)` of the dtype (3.5e-4 in
    float32, 1.5e-8 in float64): pass your solver's tolerances.

    The returned point itself has no result code to report, so a point that
    fails the check above always gives NaN derivatives (where the cotangent is
    nonzero), whatever `throw`.

    **Arguments:**

    - `fn`: `fn(y, args) -> y` (or `(y, aux)` with `has_aux=True`), the map whose
      fixed point the decorated solver finds; same pytree structure, shapes and
      dtypes as `y0`.

    Keyword-only:

    - `has_aux`: whether `fn` also returns auxiliary data (ignored here: only
      its first output is used). Default `False`.
    - `adjoint`: how to differentiate: `fixpoint.ImplicitAdjoint()` (default),
      `PhantomAdjoint`, `NeumannAdjoint` or `UnrolledAdjoint`.
    - `rtol`, `atol`: the tolerances of the check of the returned point;
      `None` (default): `sqrt(eps)` of the dtype.
    - `throw`: a failed backward solve raises `fixpoint.SolveError` (`True`,
      default) or gives NaN derivatives (`False`).

    **Returns:**

    A decorator: it takes `solver(y0, args) -> y` and returns a function
    `(y0, args=None) -> y` with the same value and the gradient rule above.

    **Raises:**

    `TypeError` or `ValueError` at once for a bad `adjoint`, `throw`, `rtol` or
    `atol`.
    """
    return _decorator("fixed_point", "custom_fixed_point", fn, has_aux, adjoint, rtol, atol, throw)


def custom_root(
    fn: Fn,
    *,
    has_aux: bool = False,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    rtol: float | None = None,
    atol: float | None = None,
    throw: bool = True,
) -> Decorator:
    """As `custom_fixed_point`, for a solver returning `y` with `fn(y, args) ≈ 0`.

    The check of the returned point is `max_norm(g(y) / (atol + rtol·‖g(y0)‖)) < 1`.

    **Arguments:**

    - `fn`: `fn(y, args) -> g` (or `(g, aux)` with `has_aux=True`), whose root
      the decorated solver finds; same pytree structure, shapes and dtypes as
      `y0`.

    Keyword-only:

    - `has_aux`: whether `fn` also returns auxiliary data (ignored here).
      Default `False`.
    - `adjoint`: how to differentiate (default `fixpoint.ImplicitAdjoint()`).
    - `rtol`, `atol`: the tolerances of the check of the returned point;
      `None` (default): `sqrt(eps)` of the dtype.
    - `throw`: a failed backward solve raises `fixpoint.SolveError` (`True`,
      default) or gives NaN derivatives (`False`).

    **Returns:**

    A decorator: it takes `solver(y0, args) -> y` and returns a function
    `(y0, args=None) -> y` with the same value and the gradient rule above.
    """
    return _decorator("root", "custom_root", fn, has_aux, adjoint, rtol, atol, throw)
