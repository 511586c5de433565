"""Raising readable errors from inside compiled code."""

import functools as ft
from typing import TypeVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, PyTree

from ._manual import vary_like
from ._solution import RESULTS


class SolveError(RuntimeError):
    """Raised when a solve with `throw=True` fails.

    Eager calls (also under eager `jax.vmap` and `jax.grad`) raise `SolveError`
    itself. Inside `jax.jit` the check runs as a host callback when the compiled
    code executes, and JAX re-raises it as `jax.errors.JaxRuntimeError` whose
    message contains this one (catch `JaxRuntimeError`, or `Exception`, there).

    It carries one message (its only argument): the entry point or layer that
    failed, the `RESULTS` member by name with its explanation, the number of
    steps and the residual of the first failing sample, how many samples failed
    under `vmap`, and a hint (by default: pass `throw=False` to get the result
    code instead). A failed backward (gradient) solve raises it the same way.
    """


_SOLVE_HINT = "Pass `throw=False` to get the result code instead of an error."


def _describe(what, codes, steps, residual, hint=_SOLVE_HINT) -> str:
    # Equinox keeps the items by name in `_name_to_item`.
    names = {int(item._value): name for name, item in RESULTS._name_to_item.items()}
    codes = np.asarray(codes).reshape(-1)
    steps = np.broadcast_to(np.asarray(steps).reshape(-1), codes.shape)
    residual = np.broadcast_to(np.asarray(residual).reshape(-1), codes.shape)
    bad = np.flatnonzero(codes != RESULTS.successful._value)
    i = int(bad[0])
    name = names[int(codes[i])]
    where = (
        ""
        if codes.size == 1
        else f" ({bad.size} of {codes.size} samples failed; the first is #{i})"
    )
    # (A decode has no residual: NaN.)
    res = "" if np.isnan(residual[i]) else f" (residual {float(residual[i]):.3e})"
    return (
        f"{what} failed with result `{name}` after {int(steps[i])} steps{res}{where}. "
        f"{RESULTS[RESULTS._name_to_item[name]]} "
        f"{hint}"
    )


def _concrete(x):
    """`x` as a NumPy array if its value is known now, else `None`.

    Known now: a concrete array, or a tracer of an *eager* transformation whose
    value is concrete underneath (`vmap` keeps it in `.val`, `jvp`/`grad` in
    `.primal`). Inside `jit` the value is abstract, and the check must run as a
    callback instead.
    """
    for _ in range(16):
        if not isinstance(x, Tracer):
            return np.asarray(x)
        if isinstance(x, _BatchTracer):
            x = x.val
        elif isinstance(x, _JVPTracer):
            x = x.primal
        else:
            return None
    return None


try:  # the eager transformations' tracers (JAX internals; without them, callbacks)
    from jax._src.interpreters.ad import JVPTracer as _JVPTracer
    from jax._src.interpreters.batching import BatchTracer as _BatchTracer
except ImportError:  # pragma: no cover
    _JVPTracer = _BatchTracer = ()


_T = TypeVar("_T")


@ft.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def raise_if_failed(
    value: PyTree[Array],
    codes: Int[ArrayLike, "*batch"],
    num_steps: Int[ArrayLike, "*batch"],
    residual: Float[ArrayLike, "*batch"],
    what: str,
    hint: str = _SOLVE_HINT,
) -> PyTree[Array]:
    """Return `value`; at run time, raise `SolveError` if any `codes` is a failure.

    The message names the result code, the number of steps and the residual of
    the first failing sample, and how many samples failed under `vmap`. The check
    is a `lax.cond` around a host callback whose output `value` depends on, so it
    cannot be optimised away. When the codes are concrete (an eager call, also
    under eager `vmap`/`grad`) the check runs in Python and raises at once. A
    `jax.custom_jvp`: tangents pass through unchanged.

    **Arguments:**

    - `value`: any pytree of arrays, returned unchanged.
    - `codes`: the `RESULTS` codes (`result._value`), an integer array of any
      batch shape.
    - `num_steps`: the step counts, an integer array broadcastable to `codes`.
    - `residual`: the residual norms, a float array broadcastable to `codes`
      (NaN where there is none, as for a decode).
    - `what`: what failed, for the message, e.g. "`fixed_point`".
    - `hint`: the advice that ends the message (default: pass `throw=False` to
      get the result code instead of an error).

    **Returns:**

    `value`, made to depend on the check.

    **Raises:**

    `SolveError` (wrapped in `jax.errors.JaxRuntimeError` under `jit`) if any
    code is not `RESULTS.successful`.
    """
    known = [_concrete(x) for x in (codes, num_steps, residual)]
    if all(k is not None for k in known):
        # Eager call (also under eager `vmap`/`grad`): check in Python and raise
        # the plain exception.
        if np.any(known[0] != RESULTS.successful._value):
            codes_, steps_, residual_ = known
            raise SolveError(_describe(what, codes_, steps_, residual_, hint))
        return value
    failed = eqxi.unvmap_any(codes != RESULTS.successful._value)
    leaves, treedef = jax.tree.flatten(value)

    def raises(codes, steps, res, *leaves):
        raise SolveError(_describe(what, codes, steps, res, hint))

    def handle(leaves):
        struct = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        out = jax.pure_callback(
            raises,
            struct,
            codes,
            num_steps,
            residual,
            *leaves,
            vmap_method="expand_dims",
        )
        # Inside `shard_map`: the callback's outputs vary as its inputs do.
        return [vary_like(o, x) for o, x in zip(out, leaves, strict=True)]

    leaves = jax.lax.cond(failed, handle, lambda xs: list(xs), leaves)
    return jax.tree.unflatten(treedef, leaves)


@raise_if_failed.defjvp
def _raise_if_failed_jvp(what, hint, primals, tangents):
    value, codes, num_steps, residual = primals
    return raise_if_failed(value, codes, num_steps, residual, what, hint), tangents[0]


def checked(
    outputs: _T,
    codes: Int[ArrayLike, "*batch"],
    num_steps: Int[ArrayLike, "*batch"],
    residual: Float[ArrayLike, "*batch"],
    what: str,
    hint: str = _SOLVE_HINT,
) -> _T:
    """`outputs` (any pytree), made to depend on a run-time check of `codes`.

    The check (`raise_if_failed`) runs on a scalar token, 0 unless it raises,
    that is combined with *every* array leaf: so whichever output a caller uses
    (the value, the result code, a step count) keeps the check alive under
    `jit`, and a sharded output is never gathered to one device for it.

    **Arguments:**

    - `outputs`: any pytree; its array leaves are made to depend on the check,
      other leaves are returned as they are.
    - `codes`: the `RESULTS` codes (`result._value`), an integer array of any
      batch shape.
    - `num_steps`: the step counts, an integer array broadcastable to `codes`.
    - `residual`: the residual norms, a float array broadcastable to `codes`;
      its dtype is the token's.
    - `what`: what failed, for the message, e.g. "`fixed_point`".
    - `hint`: the advice that ends the message (default: pass `throw=False` to
      get the result code instead of an error).

    **Returns:**

    `outputs` with the same structure and values (the token is zero unless the
    check raises; it is added with `stop_gradient`, or xor-ed into booleans).

    **Raises:**

    `SolveError` (as `raise_if_failed`) if any code is not `RESULTS.successful`.
    """
    dtype = jnp.result_type(residual)
    token = raise_if_failed(jnp.zeros((), dtype), codes, num_steps, residual, what, hint)

    def attach(a):
        if not eqx.is_array(a):
            return a
        if a.dtype == jnp.bool_:
            return a ^ (token != 0)
        return a + jax.lax.stop_gradient(token).astype(a.dtype)

    return jax.tree.map(attach, outputs)
