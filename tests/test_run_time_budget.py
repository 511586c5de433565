"""`max_steps` as a run-time budget: an integer array, traced under `jit`, that a
schedule may change between calls without compiling again."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixpoint
from fixpoint import layers, solvers

TRACES = []


def cosine(y, a):
    TRACES.append(None)  # runs once per trace
    return jnp.cos(y) * a


PICARD = solvers.Picard(1e-12, 1e-12)
A = jnp.array([1.0, 0.5, -0.8])


@jax.jit
def solve(a, budget):
    return fixpoint.fixed_point(
        cosine, jnp.zeros(3), a, solver=PICARD, max_steps=budget, throw=False
    )


def test_changing_the_budget_compiles_nothing_again_and_matches_a_static_budget():
    full = int(solve(A, jnp.asarray(500, jnp.int32)).stats["num_steps"])
    assert 10 < full < 200
    traced = len(TRACES)
    budgets = (3, 10, 200, 7)
    sols = [solve(A, jnp.asarray(budget, jnp.int32)) for budget in budgets]
    assert len(TRACES) == traced  # `cosine` was not traced again
    assert solve._cache_size() == 1
    for budget, sol in zip(budgets, sols, strict=True):
        static = fixpoint.fixed_point(
            cosine, jnp.zeros(3), A, solver=PICARD, max_steps=budget, throw=False
        )
        assert sol.result == static.result
        assert int(sol.stats["num_steps"]) == int(static.stats["num_steps"]) == min(budget, full)
        np.testing.assert_array_equal(sol.value, static.value)


def test_a_budget_per_sample_under_vmap():
    full = int(solve(A, jnp.asarray(500, jnp.int32)).stats["num_steps"])
    budgets = jnp.array([3, 8, 300])
    sols = jax.vmap(lambda b: solve(A, b))(budgets)
    assert sols.stats["num_steps"].tolist() == [3, 8, full]
    ok = sols.result == fixpoint.RESULTS.successful
    assert ok.tolist() == [False, False, True]


@pytest.mark.parametrize(
    "adjoint",
    [
        fixpoint.ImplicitAdjoint(),
        fixpoint.PhantomAdjoint(steps=30),
        fixpoint.NeumannAdjoint(terms=30),
    ],
    ids=["implicit", "phantom", "neumann"],
)
def test_gradients_equal_those_of_a_static_budget(adjoint):
    def loss(a, budget):
        sol = fixpoint.fixed_point(
            cosine, jnp.zeros(3), a, solver=PICARD, max_steps=budget, adjoint=adjoint
        )
        return jnp.sum(sol.value**2)

    run_time = jax.jit(jax.grad(loss))(A, jnp.asarray(200))
    np.testing.assert_allclose(run_time, jax.grad(loss)(A, 200), rtol=1e-12, atol=1e-15)


def test_infeasibility_is_detected_as_with_a_static_budget():
    def shift(y, a):
        return y + 1.0

    for budget in (40, 100, 128):
        dynamic = fixpoint.fixed_point(
            shift, jnp.zeros(2), solver=PICARD, max_steps=jnp.asarray(budget), throw=False
        )
        static = fixpoint.fixed_point(
            shift, jnp.zeros(2), solver=PICARD, max_steps=budget, throw=False
        )
        assert dynamic.result == static.result == fixpoint.RESULTS.infeasible
        np.testing.assert_array_equal(dynamic.stats["displacement"], static.stats["displacement"])


def test_a_deq_takes_a_budget_per_call():
    class Cell(eqx.Module):
        w: jax.Array

        def __call__(self, z, x):
            return jnp.tanh(self.w @ z + x)

    w = 0.9 * jnp.eye(4) + 0.05
    deq = layers.DEQ(Cell(w), solver=solvers.Picard(1e-10, 1e-10), max_steps=500, throw=False)
    x = jnp.linspace(-1.0, 1.0, 4)

    @eqx.filter_jit
    def steps(deq, x, budget):
        return deq.solve(x, max_steps=budget).stats["num_steps"]

    assert int(steps(deq, x, jnp.asarray(5))) == 5
    assert int(steps(deq, x, jnp.asarray(12))) == 12
    full = int(deq.solve(x).stats["num_steps"])
    assert 12 < full < 500
    assert int(steps(deq, x, jnp.asarray(500))) == full
    assert steps._cached._cache_size() == 1  # pyright: ignore[reportAttributeAccessIssue]


def test_what_needs_a_static_budget_says_so():
    kw = dict(solver=PICARD, max_steps=jnp.asarray(5))
    with pytest.raises(TypeError, match="record_residuals.*max_steps"):
        fixpoint.fixed_point(cosine, jnp.zeros(3), A, record_residuals=True, **kw)
    with pytest.raises(TypeError, match="UnrolledAdjoint.*max_steps"):
        jax.grad(
            lambda a: fixpoint.fixed_point(
                cosine, jnp.zeros(3), a, adjoint=fixpoint.UnrolledAdjoint(), **kw
            ).value.sum()
        )(A)
    for bad in (jnp.asarray(5.0), jnp.array([5, 6])):
        with pytest.raises(TypeError, match="max_steps"):
            fixpoint.fixed_point(cosine, jnp.zeros(3), A, solver=PICARD, max_steps=bad)
    for bad in (jnp.asarray(0), jnp.asarray(-3)):
        with pytest.raises(ValueError, match="max_steps"):
            fixpoint.fixed_point(cosine, jnp.zeros(3), A, solver=PICARD, max_steps=bad)


def test_numpy_integers_stay_static_budgets():
    # A NumPy integer (from a config, `np.max`) is a static option as before,
    # so what needs a static budget still works with it.
    for budget in (np.int64(5), np.array(5)):
        sol = fixpoint.fixed_point(
            cosine,
            jnp.zeros(3),
            A,
            solver=PICARD,
            max_steps=budget,
            record_residuals=True,
            throw=False,
        )
        assert sol.stats["residual_history"].shape == (6,)
