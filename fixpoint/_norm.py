"""Norms on flat vectors (the convergence test itself is in `_convergence.py`)."""

import jax.numpy as jnp
from jaxtyping import Array, Float


def max_norm(x: Float[Array, " n"]) -> Float[Array, ""]:
    """The infinity norm: the largest absolute entry."""
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    return jnp.max(jnp.abs(x))


def rms_norm(x: Float[Array, " n"]) -> Float[Array, ""]:
    """The root-mean-square norm: the 2-norm divided by sqrt(size)."""
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def two_norm(x: Float[Array, " n"]) -> Float[Array, ""]:
    """The Euclidean norm."""
    return jnp.sqrt(jnp.sum(jnp.square(x)))
