"""Restarted GMRES on a matrix-free operator: the default backward solver.

Written here (rather than taken from lineax) so that its stopping rule is the
one the adjoint needs: the relative 2-norm residual `|A x - b| <= max(atol,
rtol |b|)`. That criterion does not depend on the scale of the cotangent `b`
(which, for a loss averaged over a batch, can be tiny) and never divides by an
entry of `b` that happens to be zero.
"""

import jax
import jax.numpy as jnp

from ._compact import compacted_while_loop
from ._manual import fori_loop, while_loop


def gmres(
    matvec,
    b,
    *,
    rtol: float,
    atol: float,
    restart: int = 20,
    max_restarts: int = 50,
    compaction=None,
):
    """Solve `A x = b` for a flat `b` with `matvec(v) = A v`.

    Arnoldi with classical Gram–Schmidt applied twice (CGS2, two matrix products
    per step instead of a loop), Givens rotations for the small least-squares
    problem, and an early exit inside each cycle as soon as the residual
    estimate meets the target. Returns `(x, residual_norm, iterations)`, where
    the residual is recomputed from `b - A x` at the end. With `compaction`
    (a `fixpoint.Compaction`), a `vmap` over right-hand sides gathers the
    unfinished ones into smaller buckets between restart cycles.
    """
    n = b.shape[0]
    if n == 0:  # nothing to solve (a zero-size state)
        return jnp.zeros_like(b), jnp.zeros((), b.dtype), jnp.array(0)
    m = min(restart, n)
    dtype = b.dtype
    tiny = jnp.finfo(dtype).tiny
    target = jnp.maximum(atol, rtol * jnp.linalg.norm(b))
    rows = jnp.arange(m + 1)

    def cycle(x0):
        r0 = b - matvec(x0)
        beta = jnp.linalg.norm(r0)
        basis = jnp.zeros((m + 1, n), dtype).at[0].set(r0 / jnp.maximum(beta, tiny))
        hess = jnp.zeros((m + 1, m), dtype)
        cs = jnp.zeros(m, dtype)
        sn = jnp.zeros(m, dtype)
        g = jnp.zeros(m + 1, dtype).at[0].set(beta)

        def cond(c):
            j, _, _, _, _, g, _ = c
            return (j < m) & (jnp.abs(g[j]) > target)

        def body(c):
            j, basis, hess, cs, sn, g, _ = c
            w = matvec(basis[j])
            live = rows <= j
            h = jnp.where(live, basis @ w, 0)
            w = w - h @ basis
            h2 = jnp.where(live, basis @ w, 0)
            w = w - h2 @ basis
            h = h + h2
            hn = jnp.linalg.norm(w)
            basis = basis.at[j + 1].set(w / jnp.maximum(hn, tiny))
            h = h.at[j + 1].set(hn)

            def rotate(i, h):
                a, c_ = h[i], h[i + 1]
                return h.at[i].set(cs[i] * a + sn[i] * c_).at[i + 1].set(-sn[i] * a + cs[i] * c_)

            h = fori_loop(0, j, rotate, h)
            r = jnp.hypot(h[j], h[j + 1])
            c_new = jnp.where(r > 0, h[j] / jnp.maximum(r, tiny), 1.0)
            s_new = jnp.where(r > 0, h[j + 1] / jnp.maximum(r, tiny), 0.0)
            h = h.at[j].set(r).at[j + 1].set(0.0)
            g = g.at[j + 1].set(-s_new * g[j]).at[j].set(c_new * g[j])
            hess = hess.at[:, j].set(h)
            return j + 1, basis, hess, cs.at[j].set(c_new), sn.at[j].set(s_new), g, hn

        init = (jnp.array(0), basis, hess, cs, sn, g, beta)
        k, basis, hess, _, _, g, _ = while_loop(cond, body, init)
        # Back-substitution on the k x k upper-triangular part (unused columns
        # get a unit diagonal and a zero right-hand side, so they stay zero).
        used = jnp.arange(m) < k
        tri = jnp.where(used[:, None] & used[None, :], hess[:m], 0) + jnp.diag(
            jnp.where(used, 0, 1)
        )
        tri = tri.astype(dtype)
        diag_ok = jnp.abs(jnp.diag(tri)) > 0
        tri = tri + jnp.diag(jnp.where(diag_ok, 0, 1).astype(dtype))
        y = jax.scipy.linalg.solve_triangular(tri, jnp.where(used, g[:m], 0), lower=False)
        return x0 + y @ basis[:m], k

    def outer_cond(c):
        _, res, restarts, _, progress = c
        return (res > target) & (restarts < max_restarts) & jnp.isfinite(res) & progress

    def outer_body(c):
        x, _, restarts, its, _ = c
        x, k = cycle(x)
        # A cycle that takes no step means the estimate says converged while the
        # true residual does not: round-off has the last word, so stop.
        return x, jnp.linalg.norm(b - matvec(x)), restarts + 1, its + k, k > 0

    x0 = jnp.zeros_like(b)
    init = (x0, jnp.linalg.norm(b), jnp.array(0), jnp.array(0), jnp.array(True))
    x, res, _, its, _ = compacted_while_loop(outer_cond, outer_body, init, compaction)
    return x, res, its
