"""Batch compaction: a `vmap`ped while loop whose finished samples stop costing.

Under `jax.vmap`, `lax.while_loop` runs the body on the whole batch until the
slowest sample is done (finished samples are carried along by a select). Here,
`compacted_while_loop(cond, body, init_val, compaction)` is a `custom_vmap`: under
`vmap` it runs the batch in stages of static, shrinking bucket sizes
`B, B/f, B/f², …`. Once no more than the next bucket's size of samples is still
running, the unfinished ones are gathered (with their batched operands) into
that bucket, the loop continues on them alone, and they are scattered back at
the end. A finished sample is never touched again, so its values, step count and
result code are those of the plain loop (up to the last bits of a matmul whose
batch size changed).

Each bucket size is one more compiled copy of the loop body: `factor` trades
compile time against the work saved.
"""

import functools as ft
import math
from collections.abc import Callable
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool

from ._checks import as_python_number, check_int
from ._manual import hoist, manual_axes, while_loop

try:  # JAX internals: the effect that names a mapped axis, and dead-code elimination
    from jax._src.core import NamedAxisEffect as _NamedAxisEffect
    from jax._src.interpreters import partial_eval as _pe
except ImportError:  # pragma: no cover  (then collectives are not detected)
    _NamedAxisEffect = _pe = None


class Compaction(eqx.Module):
    """How a `vmap`ped solve gathers its unfinished samples into smaller buckets.

    **Arguments:**

    - `factor`: each bucket is `1/factor` the size of the previous one (an int
      >= 2). Larger factors compile fewer copies of the loop body.
    - `min_bucket`: the smallest bucket (an int >= 1). The default 2 keeps a
      matmul in the user's map a matrix-matrix product, bit-identical to the
      uncompacted loop's on the CPU; 1 can be several times faster for the last
      sample but its matrix-vector product has other last bits, so values and
      (at the float noise floor) step counts can differ.
    - `min_batch`: batches smaller than this are not compacted (the plain loop).

    Pass `compaction=None` to an entry point to turn compaction off.
    """

    factor: int = eqx.field(default=4, static=True, converter=as_python_number, kw_only=True)
    min_bucket: int = eqx.field(default=2, static=True, converter=as_python_number, kw_only=True)
    min_batch: int = eqx.field(default=16, static=True, converter=as_python_number, kw_only=True)

    def __check_init__(self) -> None:
        for name, low in (("factor", 2), ("min_bucket", 1), ("min_batch", 2)):
            check_int(getattr(self, name), name, low, owner="Compaction")

    def sizes(self, batch: int) -> list[int]:
        """The bucket sizes for a batch of `batch` samples, largest first.

        **Arguments:**

        - `batch`: the batch size.

        **Returns:**

        `[batch, ceil(batch/factor), ...]` down to `min_bucket`; just `[batch]`
        when `batch < min_batch` (no compaction).
        """
        sizes = [batch]
        if batch < self.min_batch:
            return sizes
        while True:
            nxt = max(self.min_bucket, math.ceil(sizes[-1] / self.factor))
            if nxt >= sizes[-1]:
                return sizes
            sizes.append(nxt)


def check_compaction(value: object, what: str = "`compaction`") -> None:
    """A readable error unless `value` is `None` or a `fixpoint.Compaction`.

    **Arguments:**

    - `value`: the option to check.
    - `what`: names the argument in the message, e.g. "DEQ: `compaction`"
      (default "`compaction`").

    **Raises:**

    `TypeError` if `value` is neither `None` nor a `fixpoint.Compaction`.
    """
    if value is not None and not isinstance(value, Compaction):
        raise TypeError(
            f"{what} must be a `fixpoint.Compaction(...)` or None (off), got {value!r}."
        )


_Carry = TypeVar("_Carry")


def compacted_while_loop(
    cond: Callable[[_Carry], Bool[Array, ""]],
    body: Callable[[_Carry], _Carry],
    init_val: _Carry,
    compaction: Compaction | None,
) -> _Carry:
    """`lax.while_loop(cond, body, init_val)`, compacted under `jax.vmap`.

    `cond(carry)` is one boolean per sample. `cond` and `body` may close over
    arrays, batched or not: they are hoisted (closure conversion) so
    that the batched ones can be gathered with the carry. Without `vmap`, or
    with `compaction=None`, this is `lax.while_loop`.

    A collective over a named `vmap` axis inside `cond` or `body` (`lax.psum(x,
    "b")` under `jax.vmap(..., axis_name="b")`) couples the samples, which
    buckets cannot follow: then the plain loop runs where compaction would not
    have been used (`min_batch`), and tracing raises, naming `compaction=None`,
    where it would.

    **Arguments:**

    - `cond`: `cond(carry) -> bool scalar`, whether a sample's loop continues.
    - `body`: `body(carry) -> carry`, one iteration.
    - `init_val`: the initial carry, a pytree (Python numbers in it become
      arrays, as `lax.while_loop` makes them).
    - `compaction`: a `fixpoint.Compaction` (the bucket sizes), or `None` for
      the plain loop.

    **Returns:**

    The final carry, as `lax.while_loop` returns it (per sample under `vmap`).

    **Raises:**

    `ValueError` at trace time for a collective over a `vmap` axis in a loop that
    would be compacted.
    """
    if compaction is None:
        return while_loop(cond, body, init_val)
    # Python numbers in the carry become arrays, as `lax.while_loop` makes them
    # (closure conversion would otherwise record them as static values).
    init_val = jax.tree.map(
        lambda x: jnp.asarray(x) if eqx.is_array_like(x) and not eqx.is_array(x) else x, init_val
    )
    cond = hoist(cond, init_val)
    body = hoist(body, init_val)
    dynamic, static = eqx.partition((init_val, cond, body), eqx.is_array)
    names = _mapped_collectives(cond.jaxpr, body.jaxpr)
    if names:
        # The plain loop, which `vmap` maps under its axis name.
        init_val, cond, body = eqx.combine(_refuse_compaction(compaction, names, dynamic), static)
        return while_loop(lambda c: cond(c), lambda c: body(c), init_val)

    def plain(dynamic):
        init_val, cond, body = eqx.combine(dynamic, static)
        return while_loop(lambda c: cond(c), lambda c: body(c), init_val)

    run = jax.custom_batching.custom_vmap(plain)

    @run.def_vmap
    def rule(axis_size, in_batched, dynamic):
        (in_batched,) = in_batched
        sizes = compaction.sizes(axis_size)
        if len(sizes) == 1:
            axes = jax.tree.map(lambda b: 0 if b else None, in_batched)
            out = jax.vmap(plain, in_axes=(axes,))(dynamic)
            return out, jax.tree.map(lambda _: True, out)
        carry, dyn_cond, dyn_body = dynamic
        carry = jax.tree.map(
            lambda x, b: x if b else _broadcast(x, axis_size),
            carry,
            in_batched[0],
        )
        vcond = _batched(static[1], in_batched[1])
        vbody = _batched(static[2], in_batched[2])
        carry = _stage(carry, vcond, vbody, dyn_cond, dyn_body, sizes[1])
        for size, following in zip(sizes[1:], sizes[2:] + [0], strict=True):
            # A stage with nothing to do is skipped, gather and all.
            carry = jax.lax.cond(
                jnp.sum(vcond(carry, dyn_cond)) > following,
                ft.partial(_compacted_stage, size, following, vcond, vbody, in_batched),
                lambda carry, dyn_cond, dyn_body: carry,
                carry,
                dyn_cond,
                dyn_body,
            )
        return carry, jax.tree.map(lambda _: True, carry)

    return run(dynamic)


def _mapped_collectives(*jaxprs) -> list:
    """The named `vmap` axes that collectives in `jaxprs` use.

    The `custom_vmap` rule that compacts is not told the name of the axis it
    maps, so its buckets are mapped without one, and a collective over that
    name would reach the compiler unmapped (a bare `AssertionError`); over an
    outer axis, it would combine different samples in each bucket. JAX records
    each named axis a jaxpr uses as an effect; a collective whose result is
    unused (e.g. in the primal half of a JVP) is dropped first, as the compiler
    would drop it.
    """
    if _pe is None or _NamedAxisEffect is None:  # pragma: no cover
        return []
    names = set()
    for jaxpr in jaxprs:
        jaxpr = _pe.dce_jaxpr(_pe.convert_constvars_jaxpr(jaxpr), True)[0]
        names |= {e.name for e in jaxpr.effects if isinstance(e, _NamedAxisEffect)}
    mapped = []
    for name in names - set(manual_axes()):  # `shard_map`'s axes are not `vmap`'s
        try:
            jax.lax.axis_size(name)
        except NameError:  # bound inside the function itself
            continue
        mapped.append(name)
    return sorted(mapped, key=repr)


def _refuse_compaction(compaction: Compaction, names: list, dynamic):
    """`dynamic`, unchanged; raises where `vmap` would compact the loop.

    A `custom_vmap` identity: its rule fires where the compacting rule would,
    for the same axis, so it sees the batch size compaction would use.
    """

    @jax.custom_batching.custom_vmap
    def probe(dynamic):
        return dynamic

    @probe.def_vmap
    def rule(axis_size, in_batched, dynamic):
        if len(compaction.sizes(axis_size)) > 1:
            axes = ("axis " if len(names) == 1 else "axes ") + ", ".join(map(repr, names))
            raise ValueError(
                f"A collective over the `vmap` {axes} (e.g. `lax.psum(x, {names[0]!r})`) "
                f"inside the function of a loop that would be compacted ({axis_size} "
                f"samples, `min_batch` is {compaction.min_batch}): compaction gathers "
                "the unfinished samples into smaller buckets, which a collective "
                "cannot follow. Pass `compaction=None` (to `fixed_point`, `root_find` "
                "or the layer, and `ImplicitAdjoint(compaction=None)` for its backward "
                "solve)."
            )
        return dynamic, in_batched[0]

    return probe(dynamic)


def _compacted_stage(size, following, vcond, vbody, in_batched, carry, dyn_cond, dyn_body):
    """Gather the unfinished samples into a bucket of `size`, run, scatter back."""
    active = vcond(carry, dyn_cond)
    # The unfinished samples first, in their order; the bucket's rest are
    # finished samples, which the stage leaves untouched.
    index = jnp.argsort(jnp.where(active, 0, 1), stable=True)[:size]

    def take(tree, batched):
        return jax.tree.map(lambda x, b: x[index] if b else x, tree, batched)

    bucket = _stage(
        jax.tree.map(lambda x: x[index], carry),
        vcond,
        vbody,
        take(dyn_cond, in_batched[1]),
        take(dyn_body, in_batched[2]),
        following,
    )
    return jax.tree.map(lambda x, b: x.at[index].set(b), carry, bucket)


def _broadcast(x, size):
    # An unbatched operand may arrive as a typed Python scalar (a literal).
    x = jnp.asarray(x)
    return jnp.broadcast_to(x, (size,) + x.shape)


def _batched(static_fn, batched):
    """`vmap` of a closure-converted function `(carry, its arrays) -> out`."""
    axes = jax.tree.map(lambda b: 0 if b else None, batched)
    return jax.vmap(lambda c, d: eqx.combine(d, static_fn)(c), in_axes=(0, axes))


def _stage(carry, vcond, vbody, dyn_cond, dyn_body, following: int):
    """Run the batched loop while more than `following` samples are unfinished."""

    def stage_cond(c):
        return jnp.sum(vcond(c, dyn_cond)) > following

    def stage_body(c):
        active = vcond(c, dyn_cond)
        new = vbody(c, dyn_body)
        return jax.tree.map(lambda n, o: _select(active, n, o), new, c)

    return while_loop(stage_cond, stage_body, carry)


def _select(mask, new, old):
    return jnp.where(mask.reshape(mask.shape + (1,) * (jnp.ndim(new) - 1)), new, old)
