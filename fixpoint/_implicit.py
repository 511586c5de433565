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
    primal: Callable,
    residual: Callable,
    inputs,
    y0,
    linear_solve,
    *,
    at_point: bool = False,
    failed: Callable | None = None,
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
    y, rest = _implicit(
        inputs, y0, primal=primal, residual=residual, linear_solve=linear_solve, failed=failed
    )
    rest = jax.lax.stop_gradient(rest)
    return y, rest


@eqx.filter_custom_jvp
def _implicit(inputs, y0, *, primal, residual, linear_solve, failed):
    del residual, linear_solve, failed
    return primal(inputs, y0)


def _is_none(x):
    return x is None


@_implicit.def_jvp
def _implicit_jvp(primals, tangents, *, primal, residual, linear_solve, failed):
    inputs, y0 = primals
    t_inputs, _ = tangents
    has_tangent = jax.tree.map(lambda t: t is not None, t_inputs, is_leaf=_is_none)
    y, rest = _implicit(
        inputs, y0, primal=primal, residual=residual, linear_solve=linear_solve, failed=failed
    )
    diff, nondiff = eqx.partition(inputs, has_tangent)
    bad = jnp.array(False) if failed is None else failed(y, rest, inputs)
    # A failed iterate may be NaN, and 0 * NaN = NaN: linearise a failed solve
    # at its (finite) start instead; its derivative is replaced below anyway.
    y_lin = jnp.where(bad, y0, y)

    def g_theta(d):
        return residual(y_lin, eqx.combine(d, nondiff))

    _, rhs = jax.jvp(g_theta, (diff,), (t_inputs,))
    # For a failed solve the right-hand side at `y0` may vanish although the
    # input tangents do not (forward mode would then report a plausible 0): add
    # a linear probe of the tangents there, so the answer is NaN exactly when
    # some tangent is nonzero. (In reverse mode its cotangent is the solve's,
    # zero for a masked sample.)
    rhs = rhs + _probe(t_inputs, rhs.dtype) * bad.astype(rhs.dtype) * jnp.ones_like(rhs)

    def matvec(v):
        return jax.jvp(lambda z: residual(z, inputs), (y_lin,), (v,))[1]

    solve = _guarded(linear_solve(y_lin, inputs), bad)

    def transpose_solve(vecmat, b):
        return solve(vecmat, b, transpose_of=matvec)

    t_y = -jax.lax.custom_linear_solve(matvec, rhs, solve, transpose_solve)
    t_rest = jax.tree.map(_zero_tangent, rest)
    return (y, rest), (t_y, t_rest)


def _probe(tangents, dtype):
    """A fixed linear functional of the tangents, nonzero for (almost) any nonzero one."""
    total = jnp.zeros((), dtype)
    for t in jax.tree.leaves(tangents):
        if eqx.is_array(t) and jnp.issubdtype(t.dtype, jnp.inexact):
            weights = 1 + (jnp.arange(t.size, dtype=dtype) % 7) / 7
            total = total + jnp.sum(t.reshape(-1).astype(dtype) * weights)
    return total


def _guarded(solve, bad):
    """`solve`, except where the forward solve failed (`bad`): there the answer is
    0 for a zero right-hand side and NaN otherwise, and the inner solve only sees
    a zero right-hand side (so it cannot report a failure of its own)."""

    def guarded(matvec, b, transpose_of=None):
        x = solve(matvec, jnp.where(bad, jnp.zeros_like(b), b), transpose_of=transpose_of)
        poisoned = jnp.where(jnp.all(b == 0), jnp.zeros_like(x), jnp.full_like(x, jnp.nan))
        return jnp.where(bad, poisoned, x)

    return guarded


def poison_cotangent(y, bad):
    """Identity on `y`; in reverse mode the cotangent becomes NaN where `bad` and nonzero.

    For adjoints that differentiate the forward iterations themselves
    (`UnrolledAdjoint`): the gradient of a failed solve is never a plausible number.
    """
    return _poison(y, bad)


@jax.custom_vjp
def _poison(y, bad):
    return y


def _poison_fwd(y, bad):
    return y, bad


def _poison_bwd(bad, ct):
    nan = jnp.where(jnp.all(ct == 0), jnp.zeros_like(ct), jnp.full_like(ct, jnp.nan))
    return jnp.where(bad, nan, ct), None


_poison.defvjp(_poison_fwd, _poison_bwd)


def _zero_tangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return None
