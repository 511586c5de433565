"""The implicit-function-theorem rule shared by every implicit adjoint.

If `y*(θ)` solves `G(y, θ) = 0` then `J_y G · dy = -J_θ G · dθ`. We attach that
rule with a `custom_jvp` (so forward mode works) and solve the linear system with
`lax.custom_linear_solve` (so JAX can transpose it for reverse mode, using VJPs
only). The primal iteration is never differentiated: memory does not grow with
the number of forward steps.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp


def implicit_solve(
    primal: Callable, residual: Callable, inputs, y0, linear_solve, *, at_point: bool = False
):
    """Solve with `primal(inputs, y0) -> (y, rest)`; differentiate `y` implicitly.

    **Arguments:**

    - `primal`: runs the forward solve; it is never differentiated.
    - `residual`: `residual(y, inputs) -> G`, zero at the solution.
    - `inputs`: pytree whose floating-point arrays may be differentiated.
    - `y0`: starting point; receives no gradient.
    - `linear_solve`: `solve(matvec, b, transpose_of=None)` (see `_linear.py`);
      with `at_point=True`, a function `(y, inputs) -> solve` instead, for solves
      that need the solution itself (e.g. to form Jacobians), not just `matvec`.

    **Returns:** `(y, rest)`; `rest` (result codes, statistics) has zero tangent.
    """
    y0 = jax.lax.stop_gradient(y0)
    if not at_point:
        solve = linear_solve
        linear_solve = lambda y, inputs: solve  # noqa: E731
    y, rest = _implicit(inputs, y0, primal=primal, residual=residual, linear_solve=linear_solve)
    rest = jax.lax.stop_gradient(rest)
    return y, rest


@eqx.filter_custom_jvp
def _implicit(inputs, y0, *, primal, residual, linear_solve):
    del residual, linear_solve
    return primal(inputs, y0)


def _is_none(x):
    return x is None


@_implicit.def_jvp
def _implicit_jvp(primals, tangents, *, primal, residual, linear_solve):
    inputs, y0 = primals
    t_inputs, _ = tangents
    has_tangent = jax.tree.map(lambda t: t is not None, t_inputs, is_leaf=_is_none)
    y, rest = _implicit(inputs, y0, primal=primal, residual=residual, linear_solve=linear_solve)
    diff, nondiff = eqx.partition(inputs, has_tangent)

    def g_theta(d):
        return residual(y, eqx.combine(d, nondiff))

    _, rhs = jax.jvp(g_theta, (diff,), (t_inputs,))

    def matvec(v):
        return jax.jvp(lambda z: residual(z, inputs), (y,), (v,))[1]

    solve = linear_solve(y, inputs)

    def transpose_solve(vecmat, b):
        return solve(vecmat, b, transpose_of=matvec)

    t_y = -jax.lax.custom_linear_solve(matvec, rhs, solve, transpose_solve)
    t_rest = jax.tree.map(_zero_tangent, rest)
    return (y, rest), (t_y, t_rest)


def _zero_tangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return None
