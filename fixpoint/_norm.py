"""Norms on flat vectors (the convergence test itself is in `_convergence.py`)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def max_norm(x: Float[Array, " n"]) -> Float[Array, ""]:
    """The infinity norm: the largest absolute entry.

    The default `norm` of every solver. A NaN entry gives NaN (never hidden by
    the maximum), and an empty vector gives 0.

    **Arguments:**

    - `x`: a vector (any shape is flattened), floating point.

    **Returns:**

    `max |x_i|`, a scalar of `x`'s dtype.
    """
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    return _max(jnp.abs(jnp.ravel(x)))


# Up to this size, `_max` halves before it reduces; above it, it only reduces.
_HALVING_UP_TO = 2**17

_BITS = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def _max(a):
    """`max(a)` over the last axis of non-negative `a`, propagating NaN, fast in a loop.

    Two faults of XLA:CPU (jaxlib 0.10) shape this. A float max-reduction of
    4096 entries or more in all (also many short rows, as under `vmap`) goes
    to a library kernel (YNNPACK) that drops NaNs: `jnp.max` of 4096 ones and
    one NaN is 1.0, so a NaN residual would go unseen. So the reduction runs
    on the entries' bits as integers: for non-negative floats their order is
    the order of the values, with NaN above `inf`, and integer maxima have no
    NaN to drop. And a reduction of more than 32 entries becomes a
    reduce-window and a reduce, two kernels no elementwise producer fuses
    into; so up to `_HALVING_UP_TO` entries the vector is first halved
    (`jnp.maximum` of its two halves, which propagates NaN) down to 32 inside
    the producer's kernel. Picard at d = 64, batch 1, in a `while_loop` with
    the convergence test's four norms: 0.70 -> 0.14 µs per step; n = 65536:
    176 -> 71 µs (at n = 1e6 halving was 2x slower, hence the bound, and
    above it the float reduction with a NaN check). `max` is exact in any
    order: every form gives the same number.
    """
    if not jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.max(a, axis=-1)
    n = a.shape[-1]
    if n > _HALVING_UP_TO:
        # The library kernel is fast here (n = 1e6: 0.26 ms, the integer form
        # 1.1 ms); a sum catches its NaNs (0.62 ms in all): a sum of
        # non-negative entries is NaN exactly when one of them is.
        top = jnp.max(a, axis=-1)
        return jnp.where(jnp.isnan(jnp.sum(a, axis=-1)), jnp.nan, top)
    rest = None
    while n > 32:
        half = n // 2
        if n % 2:
            last = a[..., -1]
            rest = last if rest is None else jnp.maximum(rest, last)
        a = jnp.maximum(a[..., :half], a[..., half : 2 * half])
        n = half
    bits = _BITS[a.dtype.itemsize]
    top = jax.lax.bitcast_convert_type(
        jnp.max(jax.lax.bitcast_convert_type(a, bits), axis=-1), a.dtype
    )
    return top if rest is None else jnp.maximum(top, rest)


def rms_norm(x: Float[Array, " n"]) -> Float[Array, ""]:
    """The root-mean-square norm: the 2-norm divided by sqrt(size).

    Independent of the size of `x`, so a tolerance means the same for a small
    and a large state. An empty vector gives 0.

    **Arguments:**

    - `x`: a vector, floating point.

    **Returns:**

    `sqrt(mean(x²))`, a scalar of `x`'s dtype.
    """
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def two_norm(x: Float[Array, " n"]) -> Float[Array, ""]:
    """The Euclidean norm.

    **Arguments:**

    - `x`: a vector, floating point.

    **Returns:**

    `sqrt(sum(x²))`, a scalar of `x`'s dtype (0 for an empty vector).
    """
    return jnp.sqrt(jnp.sum(jnp.square(x)))
