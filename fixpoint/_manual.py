"""Loops and closure conversion that also work inside `jax.shard_map`.

Inside `shard_map` an array's type records the mesh axes it varies over: an
input sharded over `"batch"` varies, a `jnp.zeros` made inside does not. A loop
whose carry starts invariant (a zero initial guess) and varies after one step
(it has met the sharded data) is refused by `lax.while_loop`, and by
`equinox.filter_closure_convert`, which checks its arguments' shardings.

- `while_loop` / `fori_loop`: the `lax` loops, with the initial carry first
  cast (`lax.pcast`) to vary over the axes one step of the body makes it vary
  over. Outside `shard_map` they are the `lax` loops, untouched.
- `hoist(fn, *args)`: closure conversion (every array `fn` closes over becomes
  a pytree leaf) that checks pytree structure, shapes and dtypes, not shardings.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


class Hoisted(eqx.Module):
    """`fn` as a jaxpr, with every array it closes over in `consts` (pytree leaves)."""

    jaxpr: Any = eqx.field(static=True)
    consts: list
    in_tree: Any = eqx.field(static=True)
    in_avals: tuple = eqx.field(static=True)
    in_varying: tuple = eqx.field(static=True)
    out_tree: Any = eqx.field(static=True)
    out_static: tuple = eqx.field(static=True)  # (leaves, treedef): hashable

    def __call__(self, *args):
        leaves, tree, avals = _flat_dynamic(args)
        if tree != self.in_tree or avals != self.in_avals:
            raise ValueError(
                "internal error: a hoisted function was called with other arguments than "
                f"it was traced with: {tree}, {avals} against {self.in_tree}, {self.in_avals}."
            )
        leaves = [_vary(x, axes) for x, axes in zip(leaves, self.in_varying, strict=True)]
        out = jax.core.eval_jaxpr(self.jaxpr, self.consts, *leaves)  # pyright: ignore
        static_leaves, static_tree = self.out_static
        return eqx.combine(
            jax.tree.unflatten(self.out_tree, out), jax.tree.unflatten(static_tree, static_leaves)
        )


_T = TypeVar("_T")


def hoist(fn: Callable, *args) -> Hoisted:
    """`fn` traced at example `args`, with the arrays it closes over as leaves.

    Inside `shard_map` the trace is made with every argument varying over the
    mesh axes that any argument or closed-over array varies over, and each call
    casts its arguments to those: the traced types then hold whether a loop's
    carry still has its initial type or has met the sharded data.
    """
    closed, out_struct, out_static = eqx.filter_make_jaxpr(fn)(*args)
    leaves, tree, avals = _flat_dynamic(args)
    if manual_axes():
        axes = frozenset().union(*map(_varying, leaves + list(closed.consts)))
        if any(_varying(x) != axes for x in leaves):
            args = jax.tree.map(lambda x: _vary(x, axes) if eqx.is_array(x) else x, args)
            closed, out_struct, out_static = eqx.filter_make_jaxpr(fn)(*args)
            leaves = _flat_dynamic(args)[0]
    static_leaves, static_tree = jax.tree.flatten(out_static)
    return Hoisted(
        closed.jaxpr,
        list(closed.consts),
        tree,
        avals,
        tuple(_varying(x) for x in leaves),
        jax.tree.structure(out_struct),
        (tuple(static_leaves), static_tree),
    )


def while_loop(cond: Callable[[_T], Any], body: Callable[[_T], _T], init: _T) -> _T:
    """`lax.while_loop`, with `init` made to vary as `body` makes it.

    Inside `jax.shard_map`, the initial carry is first cast (`lax.pcast`) to vary
    over the mesh axes that one step of `body` makes it vary over; outside
    `shard_map` this is `lax.while_loop`, untouched.

    **Arguments:**

    - `cond`: `cond(carry) -> bool scalar`.
    - `body`: `body(carry) -> carry`.
    - `init`: the initial carry, a pytree.

    **Returns:**

    The final carry.
    """
    return jax.lax.while_loop(cond, body, match_varying(body, init))


def fori_loop(lower: int, upper: int, body: Callable[[Int[Array, ""], _T], _T], init: _T) -> _T:
    """`lax.fori_loop`, with `init` made to vary as `body` makes it.

    Inside `jax.shard_map` the initial carry is cast as in `while_loop`;
    outside it this is `lax.fori_loop`.

    **Arguments:**

    - `lower`: the first index.
    - `upper`: one past the last index.
    - `body`: `body(i, carry) -> carry`, `i` an integer scalar.
    - `init`: the initial carry, a pytree.

    **Returns:**

    The final carry.
    """
    init = match_varying(lambda x: body(jnp.asarray(lower), x), init)
    return jax.lax.fori_loop(lower, upper, body, init)


def match_varying(step: Callable, init):
    """`init` with each array cast to vary over the mesh axes `step(init)`'s does.

    Only inside `shard_map` (otherwise `init` is returned as it is). Repeats
    until nothing changes: a leaf made varying may make others vary in turn.
    """
    if not manual_axes():
        return init
    # Python numbers become arrays, as the loop would make them.
    init = jax.tree.map(lambda x: jnp.asarray(x) if eqx.is_array_like(x) else x, init)
    leaves, tree = jax.tree.flatten(init)
    for _ in range(len(leaves) + 1):  # each round makes at least one more leaf vary
        outs = jax.tree.leaves(eqx.filter_eval_shape(step, init))
        leaves, tree = jax.tree.flatten(init)
        if len(outs) != len(leaves):
            return init  # the loop itself reports the mismatch of structure
        changed = False
        new = []
        for x, o in zip(leaves, outs, strict=True):
            if eqx.is_array(x) and isinstance(o, jax.ShapeDtypeStruct):
                wanted = _varying(o)
                if not wanted <= _varying(x):
                    x = _vary(x, wanted)
                    changed = True
            new.append(x)
        init = jax.tree.unflatten(tree, new)
        if not changed:
            return init
    return init


def _varying(x) -> frozenset:
    kind = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    manual = getattr(kind, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(kind, "vma", ()))  # older JAX


def vary_like(x, like):
    """`x` cast to vary over the mesh axes `like` varies over (inside `shard_map`)."""
    return _vary(x, _varying(like)) if manual_axes() else x


def manual_axes() -> tuple:
    """The mesh axes of the `shard_map` being traced (none outside one)."""
    return tuple(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def _vary(x, axes):
    """`x` cast to vary over `axes` too (a no-op when it already does)."""
    missing = tuple(sorted(frozenset(axes) - _varying(x)))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # pyright: ignore  (older JAX)


def _flat_dynamic(args):
    leaves, tree = jax.tree.flatten(eqx.filter(args, eqx.is_array))
    return leaves, tree, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
