"""Operations along the time axis of a trajectory, on one device or sharded.

A trajectory is an array whose leading axis is time. Every scan solver touches
that axis only through a `Time` object: shifting by one step, associative scans,
and reductions. With `axis_name=None` these are plain array operations. Inside
`shard_map` over a mesh axis (`axis_name`, `size` devices, each holding one
contiguous chunk of time), the same calls exchange the few values that cross a
chunk boundary: one state for a shift, one summary per device for a scan, one
scalar for a reduction. So the solvers are written once and run either way.
"""

from collections.abc import Callable
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int, Shaped

_T = TypeVar("_T")


class Time(eqx.Module):
    """The time axis: local (`axis_name=None`) or split over `size` devices.

    Every scan solver touches the time axis only through a `Time`: shifts
    (`shift`, `order`, `offset`), associative scans (`associative_scan`) and
    reductions (`all`, `max`, `sum`, `min`). Sharded, each device holds one
    contiguous chunk of time and the calls exchange what crosses a chunk
    boundary (inside `jax.shard_map`).

    **Arguments:**

    - `axis_name`: the mesh axis time is split over, or `None` (default) for a
      local time axis.
    - `size`: the number of devices along `axis_name` (default 1).
    """

    axis_name: str | None = eqx.field(static=True, default=None)
    size: int = eqx.field(static=True, default=1)

    def _index(self) -> Int[Array, ""]:
        # In the default int dtype, as `jnp.arange` (int32 is a strict-promotion
        # error against int64 positions under x64).
        return lax.axis_index(self.axis_name).astype(jax.dtypes.canonicalize_dtype(jnp.int_))

    def offset(self, local_length: int) -> Int[Array, ""]:
        """Global index of this chunk's first step.

        **Arguments:**

        - `local_length`: the number of steps each device holds.

        **Returns:**

        An integer scalar: 0 locally, `device index · local_length` sharded.
        """
        if self.axis_name is None:
            return jnp.array(0)
        return self._index() * local_length

    def shift(
        self, x: Shaped[Array, " T *rest"], fill: Shaped[Array, "*rest"], reverse: bool = False
    ) -> Shaped[Array, " T *rest"]:
        """Each step's predecessor in scan order.

        Forward: `[fill, x_0, ..., x_{T-2}]`; `reverse=True`: `[x_1, ..., x_{T-1}, fill]`.

        **Arguments:**

        - `x`: the trajectory (this device's chunk), time on the leading axis.
        - `fill`: what the first step in scan order gets (e.g. `h0`), shaped
          as one step of `x`.
        - `reverse`: whether the scan runs backwards in time (default `False`).

        **Returns:**

        The shifted trajectory, the shape of `x`.
        """
        if self.axis_name is None:
            if reverse:
                return jnp.concatenate([x[1:], fill[None]])
            return jnp.concatenate([fill[None], x[:-1]])
        if reverse:
            perm = [(i + 1, i) for i in range(self.size - 1)]
            incoming = lax.ppermute(x[0], self.axis_name, perm)
            tail = jnp.where(self._index() == self.size - 1, fill, incoming)
            return jnp.concatenate([x[1:], tail[None]])
        perm = [(i, i + 1) for i in range(self.size - 1)]
        incoming = lax.ppermute(x[-1], self.axis_name, perm)
        head = jnp.where(self._index() == 0, fill, incoming)
        return jnp.concatenate([head[None], x[:-1]])

    def order(self, local_length: int, reverse: bool = False) -> Int[Array, " T"]:
        """Each local step's position in scan order (0 is the first step computed).

        **Arguments:**

        - `local_length`: the number of steps each device holds.
        - `reverse`: whether the scan runs backwards in time (default `False`).

        **Returns:**

        An integer array of shape `(local_length,)`.
        """
        index = self.offset(local_length) + jnp.arange(local_length)
        if reverse:
            return local_length * self.size - 1 - index
        return index

    def associative_scan(self, fn: Callable[[_T, _T], _T], elems: _T, reverse: bool = False) -> _T:
        """`lax.associative_scan` over the whole (possibly sharded) time axis.

        `fn(a, b)` combines `a`, earlier in scan order, with `b`, and must work on
        batches along the leading axis (as for `lax.associative_scan`). Sharded,
        each device scans its chunk, the chunk totals are gathered and scanned
        (one element per device), and each chunk is combined with the total of
        the chunks before it in scan order.

        **Arguments:**

        - `fn`: the associative combination `fn(a, b)`.
        - `elems`: a pytree of arrays, time on the leading axis.
        - `reverse`: scan from the last step backwards (default `False`).

        **Returns:**

        The inclusive scan, with the structure and shapes of `elems`.
        """
        local = lax.associative_scan(fn, elems, reverse=reverse)
        if self.axis_name is None:
            return local
        total = jax.tree.map(lambda a: a[0] if reverse else a[-1], local)
        totals = jax.tree.map(lambda a: lax.all_gather(a, self.axis_name), total)
        before = lax.associative_scan(fn, totals, reverse=reverse)
        i = self._index()
        j = jnp.clip(i + 1 if reverse else i - 1, 0, self.size - 1)
        carry = jax.tree.map(lambda a: a[j], before)
        has_carry = (i < self.size - 1) if reverse else (i > 0)
        length = jax.tree.leaves(local)[0].shape[0]
        carry = jax.tree.map(lambda a: jnp.broadcast_to(a, (length, *a.shape)), carry)
        combined = fn(carry, local)
        return jax.tree.map(lambda c, x: jnp.where(has_carry, c, x), combined, local)

    def all(self, x: Shaped[Array, "T ..."]) -> Bool[Array, ""]:
        """Whether every entry is true, over the whole time axis.

        **Arguments:**

        - `x`: an array with time on its leading axis (this device's chunk).

        **Returns:**

        A boolean scalar (`jnp.all`, then across devices).
        """
        out = jnp.all(x)
        if self.axis_name is None:
            return out
        return lax.pmin(out.astype(jnp.int32), self.axis_name).astype(bool)

    def max(self, x: Shaped[Array, "T ..."]) -> Shaped[Array, ""]:
        """The maximum entry over the whole time axis.

        **Arguments:**

        - `x`: an array with time on its leading axis (this device's chunk).

        **Returns:**

        A scalar (`jnp.max`, then across devices).
        """
        out = jnp.max(x)
        if self.axis_name is None:
            return out
        return lax.pmax(out, self.axis_name)

    def sum(self, x: Shaped[Array, "T ..."]) -> Shaped[Array, ""]:
        """The sum of every entry over the whole time axis.

        **Arguments:**

        - `x`: an array with time on its leading axis (this device's chunk).

        **Returns:**

        A scalar (`jnp.sum`, then across devices).
        """
        out = jnp.sum(x)
        if self.axis_name is None:
            return out
        return lax.psum(out, self.axis_name)

    def min(self, x: Shaped[Array, "T ..."], axis: int | None = None) -> Shaped[Array, "..."]:
        """The minimum over time (and, with `axis=None`, every other axis too).

        **Arguments:**

        - `x`: an array with time on its leading axis (this device's chunk).
        - `axis`: the axis of `jnp.min`; `None` (default): every axis. Sharded,
          the result is then reduced across devices (so `axis` should include
          time, axis 0).

        **Returns:**

        The minimum: a scalar for `axis=None`, else `jnp.min(x, axis)`'s shape.
        """
        out = jnp.min(x, axis=axis)
        if self.axis_name is None:
            return out
        return lax.pmin(out, self.axis_name)


def _diagonal_combine(a, b):
    # Elements (A, b) stand for the affine map h -> A h + b; `a` acts first.
    return b[0] * a[0], b[0] * a[1] + b[1]


def _dense_combine(a, b):
    hi = lax.Precision.HIGHEST
    return (
        jnp.matmul(b[0], a[0], precision=hi),
        jnp.einsum("...ij,...j->...i", b[0], a[1], precision=hi) + b[1],
    )


def linear_recurrence(
    time: Time,
    a: Float[Array, "T D D"] | Float[Array, "T D"],
    b: Float[Array, "T D"],
    reverse: bool = False,
) -> Float[Array, "T D"]:
    """Solve `x_t = A_t x_{t-1} + b_t` (from `x_{-1} = 0`) by an associative scan.

    `a` is `(T, D, D)` (dense) or `(T, D)` (diagonal); `b` is `(T, D)`. With
    `reverse=True` the recurrence runs backwards: `x_t = A_t x_{t+1} + b_t`.
    Matrix products run at the highest precision: with a TF32-like default on a
    GPU the Newton iterations of DEER stall short of the tolerance.

    A linear recurrence as a parallel scan: Blelloch, *Prefix sums and their
    applications*, CMU technical report, 1990; Martin & Cundy, *Parallelizing
    linear recurrent neural nets over sequence length*, ICLR 2018.

    **Arguments:**

    - `time`: the time axis (`Time()` locally; sharded inside `shard_map`).
    - `a`: the matrices `A_t`, `(T, D, D)`, or their diagonals, `(T, D)`.
    - `b`: the offsets `b_t`, `(T, D)`.
    - `reverse`: run backwards in time (default `False`).

    **Returns:**

    The solution `x`, `(T, D)`.
    """
    combine = _diagonal_combine if a.ndim == b.ndim else _dense_combine
    return time.associative_scan(combine, (a, b), reverse=reverse)[1]
