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

    # A failed solve's derivative carries no information (it is 0 or NaN, see
    # `_guarded`), and its Jacobian may be NaN even at the start (`sqrt` of a
    # negative number): 0 * NaN = NaN, so it must never meet a tangent or a
    # cotangent there. Select, do not multiply: its tangents are zeroed before
    # the Jacobian (in reverse mode this select comes *after* it and drops
    # its NaN) and the Jacobian's output is replaced after it (forward mode).
    # In its place a linear probe of the tangents makes the answer NaN exactly
    # when some tangent (or, in reverse mode, the solve's cotangent) is nonzero.
    _, rhs = jax.jvp(g_theta, (diff,), (_zero_where(bad, t_inputs),))
    rhs = jnp.where(bad, _probe(t_inputs, rhs.dtype) * jnp.ones_like(rhs), rhs)

    # Linearised once: the solve's loop then holds the linear part only (a
    # collective on `args` in the primal half would otherwise sit, dead, in it).
    _, matvec = jax.linearize(lambda z: residual(z, inputs), y_lin)

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


def _zero_where(bad, tangents):
    """`tangents` with every floating-point leaf replaced by zeros where `bad`."""

    def zero(t):
        if eqx.is_array(t) and jnp.issubdtype(t.dtype, jnp.inexact):
            return jnp.where(bad, jnp.zeros_like(t), t)
        return t

    return jax.tree.map(zero, tangents)


def _guarded(solve, bad):
    """`solve`, except where the forward solve failed (`bad`): there the answer is
    0 for a zero right-hand side and NaN otherwise, and the inner solve only sees
    the identity and a zero right-hand side (so it cannot report a failure of
    its own, even where the Jacobian is NaN)."""

    def identity_where_bad(op):
        return None if op is None else (lambda v: jnp.where(bad, v, op(v)))

    def guarded(matvec, b, transpose_of=None):
        x = solve(
            identity_where_bad(matvec),
            jnp.where(bad, jnp.zeros_like(b), b),
            transpose_of=identity_where_bad(transpose_of),
        )
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


def zero_for_zero_cotangent(fn: Callable, *args):
    """`fn(*args)`; in reverse mode an all-zero cotangent (every leaf of the output,
    per sample under `vmap`) gives exactly zero cotangents for `args`.

    For adjoints that differentiate the forward iterations themselves
    (`UnrolledAdjoint`): a failed sample's Jacobians may hold NaN, and the plain
    VJP multiplies its zero cotangent by them (0 * NaN = NaN), poisoning a shared
    parameter although the loss masks the sample out. This selects instead.
    """
    return _selecting(args, fn)


@eqx.filter_custom_vjp
def _selecting(args, fn):
    return fn(*args)


@_selecting.def_fwd
def _selecting_fwd(perturbed, args, fn):
    del perturbed
    out, vjp = eqx.filter_vjp(lambda a: fn(*a), args)
    struct = jax.tree.map(_struct, eqx.filter(out, eqx.is_inexact_array))
    return out, (vjp, struct)


@_selecting.def_bwd
def _selecting_bwd(residuals, ct, perturbed, args, fn):
    del perturbed, args, fn
    vjp, struct = residuals
    # Cotangents that are symbolically zero arrive as `None`.
    ct = jax.tree.map(
        lambda s, c: None if s is None else (jnp.zeros(s.shape, s.dtype) if c is None else c),
        struct,
        ct,
        is_leaf=_is_none,
    )
    zero = jnp.array(True)
    for c in jax.tree.leaves(ct):
        zero = zero & jnp.all(c == 0)
    (grads,) = vjp(ct)
    return jax.tree.map(lambda g: jnp.where(zero, jnp.zeros_like(g), g), grads)


def _struct(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _zero_tangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return None
