"""jit and vmap agree with the plain call; batches are per-sample."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVERS, contraction

import fixpoint
from fixpoint import solvers


def _problem(getkey, n=6):
    w = contraction(getkey(), n, 0.7)
    xs = jax.random.normal(getkey(), (5, n), jnp.float64) * jnp.arange(1.0, 6.0)[:, None]
    return (lambda z, x: jnp.tanh(w @ z + x)), xs


@pytest.mark.parametrize("name", SOLVERS)
def test_jit_and_vmap_match_plain_calls(name, getkey):
    fn, xs = _problem(getkey)
    solver = SOLVERS[name]()

    def solve(x):
        return fixpoint.fixed_point(fn, jnp.zeros(x.shape), x, solver=solver)

    plain = [solve(x) for x in xs]
    jitted = [jax.jit(solve)(x) for x in xs]
    batched = jax.jit(jax.vmap(solve))(xs)
    for i, (p, j) in enumerate(zip(plain, jitted, strict=True)):
        np.testing.assert_allclose(p.value, j.value, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(p.value, batched.value[i], rtol=1e-9, atol=1e-12)
        # Each sample stops on its own: same step count as when solved alone.
        assert int(p.stats["num_steps"]) == int(batched.stats["num_steps"][i])
    steps = np.asarray(batched.stats["num_steps"])
    if not name.startswith("newton"):
        assert len(set(steps.tolist())) > 1, "samples of different difficulty should differ"


def test_vmap_result_is_boolean_array():
    sol = jax.vmap(
        lambda c: fixpoint.fixed_point(
            lambda y, c: c * y + 1, jnp.zeros(2), c, solver=solvers.Picard(1e-8, 1e-8), throw=False
        )
    )(jnp.array([0.5, 2.0]))
    ok = sol.result == fixpoint.RESULTS.successful
    assert ok.shape == (2,) and ok.dtype == jnp.bool_


def test_newton_under_vmap_never_forms_a_batch_jacobian():
    # A (64, 32) batch: each sample has its own 32 x 32 Jacobian. No intermediate may
    # be as large as a Jacobian over the whole batch, (64 * 32) ** 2 entries.
    batch, n = 64, 32
    w = contraction(jax.random.key(0), n, 0.5)

    def solve(x):
        return fixpoint.fixed_point(
            lambda z, x: jnp.tanh(w @ z + x), jnp.zeros(n), x, solver=solvers.Newton(1e-8, 1e-8)
        ).value

    jaxpr = jax.make_jaxpr(jax.vmap(solve))(jnp.ones((batch, n)))
    sizes = []

    def visit(jpr):
        for eqn in jpr.eqns:
            for v in eqn.outvars:
                sizes.append(int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0)
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
                visit(sub)
            for p in eqn.params.values():
                if isinstance(p, jax.extend.core.ClosedJaxpr):
                    visit(p.jaxpr)
                elif isinstance(p, jax.extend.core.Jaxpr):
                    visit(p)
                elif isinstance(p, (tuple, list)):
                    for q in p:
                        if isinstance(q, jax.extend.core.ClosedJaxpr):
                            visit(q.jaxpr)

    visit(jaxpr.jaxpr)
    assert max(sizes) >= batch * n * n  # the per-sample Jacobians are there ...
    assert max(sizes) < (batch * n) ** 2 // 4  # ... but nothing batch-squared


def test_no_retrace_for_same_shapes():
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def solve(x):
        return fixpoint.fixed_point(
            lambda y, x: 0.5 * y + x, jnp.zeros(3), x, solver=solvers.Anderson(1e-8, 1e-8)
        ).value

    for i in range(3):
        solve(jnp.full(3, float(i)))
