"""Property: on any random contraction, every solver reaches the unique fixed point."""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import fixpoint
from fixpoint import solvers

_SOLVERS = [
    solvers.Picard(1e-9, 1e-9),
    solvers.Picard(1e-9, 1e-9, damping=0.6),
    solvers.Anderson(1e-9, 1e-9, history=3),
    solvers.Newton(1e-9, 1e-9),
    solvers.Broyden(1e-9, 1e-9),
]


def _map(z, args):
    # z -> tanh(W z) + b is a contraction with constant rho (tanh is 1-Lipschitz).
    w, b = args
    return jnp.tanh(w @ z) + b


@ft.cache
def _solve(which, max_steps):
    # Compiled once per solver and size (the sizes are few), shared by the examples.
    return jax.jit(
        lambda w, b, y0: fixpoint.fixed_point(
            _map, y0, (w, b), solver=_SOLVERS[which], max_steps=max_steps
        )
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.sampled_from([1, 4, 8]),
    rho=st.floats(0.05, 0.9),
    scale=st.floats(0.1, 10.0),
    which=st.integers(0, len(_SOLVERS) - 1),
)
def test_contraction_reaches_unique_fixed_point(seed, n, rho, scale, which):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(k1, (n, n), jnp.float64)
    w = rho * w / jnp.linalg.norm(w, 2)
    b = scale * jax.random.normal(k2, (n,), jnp.float64)
    y0 = scale * jax.random.normal(k3, (n,), jnp.float64)

    sol = _solve(which, 1000)(w, b, y0)
    assert bool(sol.result == fixpoint.RESULTS.successful)
    r = _map(sol.value, (w, b)) - sol.value
    assert float(jnp.max(jnp.abs(r) / (1e-9 + 1e-9 * jnp.abs(sol.value)))) < 1
    # Uniqueness: from another start the same point is reached (up to the bound
    # |y - y*| <= |r| / (1 - rho) implied by contraction).
    other = _solve(0, 2000)(w, b, -y0 + 1.0).value
    bound = 2 * (1e-9 * (1 + float(jnp.max(jnp.abs(sol.value))))) / (1 - rho) * np.sqrt(n)
    np.testing.assert_allclose(sol.value, other, atol=bound + 1e-12)
