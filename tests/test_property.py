"""Property: on any random contraction, every solver reaches the unique fixed point."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import fixpoint
import solvers

_SOLVERS = [
    solvers.Picard(1e-9, 1e-9),
    solvers.Picard(1e-9, 1e-9, damping=0.6),
    solvers.Anderson(1e-9, 1e-9, history=3),
    solvers.Newton(1e-9, 1e-9),
    solvers.Broyden(1e-9, 1e-9),
]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 8),
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

    # z -> tanh(W z) + b is a contraction with constant rho (tanh is 1-Lipschitz).
    def fn(z, b):
        return jnp.tanh(w @ z) + b

    sol = fixpoint.fixed_point(fn, y0, b, solver=_SOLVERS[which], max_steps=1000)
    assert bool(sol.result == fixpoint.RESULTS.successful)
    r = fn(sol.value, b) - sol.value
    assert float(jnp.max(jnp.abs(r) / (1e-9 + 1e-9 * jnp.abs(sol.value)))) < 1
    # Uniqueness: from another start the same point is reached (up to the bound
    # |y - y*| <= |r| / (1 - rho) implied by contraction).
    other = fixpoint.fixed_point(fn, -y0 + 1.0, b, solver=_SOLVERS[0], max_steps=2000).value
    bound = 2 * (1e-9 * (1 + float(jnp.max(jnp.abs(sol.value))))) / (1 - rho) * np.sqrt(n)
    np.testing.assert_allclose(sol.value, other, atol=bound + 1e-12)
