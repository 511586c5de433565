"""Shared problems and tolerances for the tests."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from fixpoint import solvers


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    same = jax.tree.structure(x) == jax.tree.structure(y)
    return same and all(
        np.allclose(a, b, rtol=rtol, atol=atol)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    )


def contraction(key, n, rho, dtype=jnp.float64):
    """A random `n x n` matrix with spectral norm `rho` (so `z -> W z + b` contracts)."""
    w = jax.random.normal(key, (n, n), dtype)
    return rho * w / jnp.linalg.norm(w, 2)


TOL = 1e-10

# Every solver, as (name, constructor(rtol, atol)).
SOLVERS = {
    "picard": lambda rtol=TOL, atol=TOL: solvers.Picard(rtol, atol),
    "picard_damped": lambda rtol=TOL, atol=TOL: solvers.Picard(rtol, atol, damping=0.7),
    "anderson": lambda rtol=TOL, atol=TOL: solvers.Anderson(rtol, atol),
    "anderson_damped": lambda rtol=TOL, atol=TOL: solvers.Anderson(rtol, atol, damping=0.8),
    "newton": lambda rtol=TOL, atol=TOL: solvers.Newton(rtol, atol),
    "newton_krylov": lambda rtol=TOL, atol=TOL: solvers.Newton(
        rtol, atol, linear_solver=lx.GMRES(rtol=1e-12, atol=1e-12)
    ),
    "broyden": lambda rtol=TOL, atol=TOL: solvers.Broyden(rtol, atol),
}


def finite_difference_grad(f, x, eps=1e-6):
    """Central finite differences of a scalar `f` at the array `x` (float64)."""
    f = jax.jit(f)
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    out = np.zeros_like(flat)
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = eps
        hi = f(jnp.asarray((flat + e).reshape(np.shape(x))))
        lo = f(jnp.asarray((flat - e).reshape(np.shape(x))))
        out[i] = (float(hi) - float(lo)) / (2 * eps)
    return out.reshape(np.shape(x))


def directional_fd(loss, flat, grad_flat, directions=4, eps=1e-6):
    """Central differences along random unit directions against `grad · d`."""
    loss = jax.jit(loss)
    for k in range(directions):
        d = jax.random.normal(jax.random.key(100 + k), flat.shape, flat.dtype)
        d = d / jnp.linalg.norm(d)
        fd = (float(loss(flat + eps * d)) - float(loss(flat - eps * d))) / (2 * eps)
        np.testing.assert_allclose(float(grad_flat @ d), fd, rtol=1e-5, atol=1e-7)
