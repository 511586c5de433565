"""Solvers that do not break down, cached compiled work, errors naming the mistake.

One regression test per report of issue #10.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixpoint
from fixpoint import layers, solvers

OK = fixpoint.RESULTS.successful


# ---- 7. Broyden with a Jacobian near -I ---------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_broyden_handles_negative_jacobians(dtype):
    b = solvers.Broyden(1e-6, 1e-6)
    z = jnp.zeros(2, dtype)
    sol = fixpoint.root_find(lambda y, a: 2.0 - y, z, solver=b)
    np.testing.assert_allclose(sol.value, 2.0, rtol=1e-5)
    sol = fixpoint.root_find(lambda y, a: jnp.cos(y) - y, z, solver=b)
    np.testing.assert_allclose(sol.value, 0.7390851332, rtol=1e-5)
    sol = fixpoint.fixed_point(lambda y, a: 3 * y - 1, z, solver=b)
    np.testing.assert_allclose(sol.value, 0.5, rtol=1e-5)


# ---- 8. Newton on singular Jacobians ------------------------------------------


def test_newton_pass_through_component_and_root_at_start():
    n = solvers.Newton(1e-8, 1e-8)
    y0 = {"a": jnp.zeros(2), "b": jnp.ones(2)}
    sol = fixpoint.fixed_point(lambda y, a: {"a": jnp.cos(y["a"]), "b": y["b"]}, y0, solver=n)
    np.testing.assert_allclose(sol.value["a"], 0.7390851332151607, rtol=1e-8)
    np.testing.assert_array_equal(sol.value["b"], 1.0)
    sol = fixpoint.root_find(lambda y, a: y**2, jnp.zeros(1), solver=n)
    assert int(sol.stats["num_steps"]) == 0


# ---- 9. line searches back off from non-finite trial points --------------------


@pytest.mark.parametrize(
    "solver",
    [solvers.Newton(1e-8, 1e-8), solvers.Anderson(1e-8, 1e-8), solvers.Broyden(1e-8, 1e-8)],
)
def test_backs_off_from_nonfinite_trial(solver):
    sol = fixpoint.root_find(lambda y, a: jnp.log(y), jnp.array([10.0]), solver=solver)
    np.testing.assert_allclose(sol.value, 1.0, rtol=1e-7)


@pytest.mark.parametrize("n", [64, 5000, 300_000])
def test_anderson_backs_off_from_one_nan_entry(n):
    # One entry of a large state leaves the domain (log of a negative number):
    # the evaluation is non-finite however many entries there are (XLA:CPU's
    # float max-reduction drops NaNs from 4096 entries), and after backing off
    # the solve converges; the history has wrapped around (more steps than 5).
    def g(y, a):
        return (y - 1).at[7].set(jnp.log(y[7]))

    y0 = 10 * jnp.ones(n, jnp.float32)
    sol = fixpoint.root_find(g, y0, solver=solvers.Anderson(1e-5, 1e-5), throw=False)
    assert bool(sol.result == fixpoint.RESULTS.successful)
    assert int(sol.stats["num_steps"]) > 5
    np.testing.assert_allclose(sol.value, 1.0, atol=1e-4)


def test_anderson_back_off_under_vmap_matches_each_sample():
    # Under `vmap` the back-off is taken per sample (only the samples whose
    # evaluation was not finite back off): the batch equals the samples solved alone.
    def g(y, a):
        return (y - a).at[0].set(jnp.log(y[0]) - jnp.log(a))

    y0 = jnp.array([[10.0, 10.0], [0.5, 3.0]])  # the first sample overshoots below 0
    a = jnp.array([1.0, 2.0])
    solver = solvers.Anderson(1e-10, 1e-10)
    run = lambda y, a: fixpoint.root_find(g, y, a, solver=solver, throw=False)  # noqa: E731
    batch = jax.vmap(run)(y0, a)
    for i in range(2):
        alone = run(y0[i], a[i])
        assert bool(alone.result == fixpoint.RESULTS.successful)
        np.testing.assert_allclose(batch.value[i], alone.value, rtol=1e-9)
        assert int(batch.stats["num_steps"][i]) == int(alone.stats["num_steps"])


# ---- 10. zero-size states -------------------------------------------------------


def test_gradient_through_zero_size_state():
    def loss(a):
        sol = fixpoint.fixed_point(
            lambda y, a: a * y, jnp.zeros(0), a, solver=solvers.Picard(1e-6, 1e-6)
        )
        return sol.value.sum()

    assert float(jax.grad(loss)(0.5)) == 0.0


# ---- 11 & 17. compiled work is cached; eager failures raise SolveError -----------


class _Map(eqx.Module):
    w: jax.Array

    def __call__(self, y, a):
        return jnp.cos(self.w * a * y)


def test_eager_calls_reuse_compiled_work(monkeypatch):
    # An Equinox module's arrays are inputs of the compiled loop: new weights, the
    # same compiled loop (no new trace; counted, not timed), and a new answer.
    p = solvers.Picard(1e-6, 1e-6)
    traces = []
    monkeypatch.setattr(
        _Map, "__call__", lambda self, y, a: traces.append(1) or jnp.cos(self.w * a * y)
    )

    def call(w):
        return fixpoint.fixed_point(_Map(jnp.asarray(w)), jnp.ones(3), 1.0, solver=p).value

    call(1.0)
    first = len(traces)
    call(1.0)
    new = call(0.5)
    assert len(traces) == first
    np.testing.assert_allclose(
        new,
        fixpoint.fixed_point(lambda y, a: jnp.cos(0.5 * a * y), jnp.ones(3), 1.0, solver=p).value,
        rtol=1e-12,
    )


def test_plain_functions_follow_jits_rule():
    # What a plain function reads outside its arguments is frozen when it is first
    # traced, as under `jax.jit`; inside `fixpoint.uncached()` every call traces again.
    p = solvers.Picard(1e-10, 1e-10)
    state = {"w": 0.5 * jnp.eye(2)}
    f = lambda y, a: state["w"] @ y + a  # noqa: E731
    solve = lambda: fixpoint.fixed_point(f, jnp.zeros(2), jnp.ones(2), solver=p).value  # noqa: E731
    np.testing.assert_allclose(solve(), 2.0)
    state["w"] = 0.1 * jnp.eye(2)
    np.testing.assert_allclose(solve(), 2.0)  # frozen
    with fixpoint.uncached():
        np.testing.assert_allclose(solve(), 1 / 0.9, rtol=1e-9)
    scale = {"a": 0.5}
    cell = lambda h, x: (scale["a"] * h + x, h)  # noqa: E731
    run = lambda: fixpoint.scan(cell, jnp.zeros(1), jnp.ones((3, 1)), solver=solvers.Jacobi())[0]  # noqa: E731
    run()
    scale["a"] = 2.0
    np.testing.assert_allclose(run(), 1.75)  # frozen at 0.5: 1, 1.5, 1.75
    with fixpoint.uncached():
        np.testing.assert_allclose(run(), 7.0)


class _Cell(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.lin(z) + x)


def test_layers_do_not_retrace(getkey):
    # Counted, not timed (the times are in bench/eager.py): a repeated call of a
    # layer, with new inputs and new weights of the same shapes, traces nothing.
    traces = []

    class Counted(eqx.Module):
        inner: eqx.Module

        @property
        def hidden_size(self):
            return getattr(self.inner, "hidden_size", None)

        def __call__(self, *args):
            traces.append(1)
            return self.inner(*args)

    rnn = layers.ParallelRNN(Counted(eqx.nn.GRUCell(2, 3, key=getkey())), solver=solvers.DEER())
    deq = layers.DEQ(Counted(_Cell(eqx.nn.Linear(3, 3, key=getkey()))), z_shape=(3,))
    for model, x in ((rnn, jax.random.normal(getkey(), (20, 2))), (deq, jnp.ones(3))):
        jax.block_until_ready(model(x))
        first = len(traces)
        assert first > 0
        heavier = jax.tree.map(lambda a: 1.01 * a if eqx.is_inexact_array(a) else a, model)
        for m, y in ((model, x), (model, 0.5 * x), (heavier, x)):
            jax.block_until_ready(m(y))
        assert len(traces) == first, type(model).__name__


def test_eager_vmap_raises_solve_error_itself():
    f = lambda y, a: jnp.cos(a * y)  # noqa: E731
    p = solvers.Picard(1e-6, 1e-6)
    with pytest.raises(fixpoint.SolveError, match="1 of 2 samples failed"):
        jax.vmap(lambda a: fixpoint.fixed_point(f, jnp.ones(1), a, solver=p).value)(
            jnp.array([1.0, 5.0])
        )
    with pytest.raises(fixpoint.SolveError):
        fixpoint.fixed_point(f, jnp.ones(1), 5.0, solver=p)
    # Under jit the same message arrives inside JAX's runtime error.
    with pytest.raises(jax.errors.JaxRuntimeError, match="max_steps_reached"):
        jax.jit(lambda a: fixpoint.fixed_point(f, jnp.ones(1), a, solver=p).value)(5.0)


# ---- 12. DEQ errors name z_shape and x ----------------------------------------


def test_deq_errors_name_the_argument(getkey):
    lin = eqx.nn.Linear(8, 8, key=getkey())
    up = eqx.nn.Linear(4, 8, key=getkey())
    f = lambda z, x: jnp.tanh(lin(z) + up(x))  # noqa: E731
    with pytest.raises(ValueError, match="pass `z_shape=`"):
        layers.DEQ(f)(jnp.ones(4))
    assert layers.DEQ(f, z_shape=8)(jnp.ones(4)).shape == (8,)
    with pytest.raises(TypeError, match="`x` must be a floating-point array"):
        layers.DEQ(f, z_shape=8)(jnp.ones(4, jnp.int32))
    down = eqx.nn.Linear(8, 6, key=getkey())
    with pytest.raises(ValueError, match="`z_shape`.*returned float64\\[6\\]"):
        layers.DEQ(lambda z, x: down(z), z_shape=(8,))(jnp.ones(4))
    with pytest.raises(TypeError, match="`z_shape` must be a tuple of ints"):
        layers.DEQ(f, z_shape="8")


# ---- 13. half precision -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("solver", [solvers.Anderson(1e-2, 1e-2), solvers.Newton(1e-2, 1e-2)])
def test_half_precision_anderson_and_newton(solver, dtype):
    sol = fixpoint.fixed_point(lambda y, a: jnp.cos(y), jnp.zeros(2, dtype), solver=solver)
    assert sol.value.dtype == dtype
    np.testing.assert_allclose(np.asarray(sol.value, np.float32), 0.739085, rtol=2e-2)


# ---- 14. Python numbers where arrays are expected --------------------------------


def test_python_numbers_and_bad_outputs():
    p = solvers.Picard(1e-8, 1e-8)
    sol = fixpoint.fixed_point(lambda y, a: 0.5, 0.1, solver=p)
    np.testing.assert_allclose(sol.value, 0.5)
    sol = fixpoint.fixed_point(lambda y, a: (jnp.cos(y), 0.5), 0.1, solver=p, has_aux=True)
    np.testing.assert_allclose(sol.aux, 0.5)
    sol = fixpoint.fixed_point(lambda y, a: jnp.cos(y) * a, jnp.zeros(2), 0.5, solver=p)
    assert bool(sol.result == OK)
    with pytest.raises(TypeError, match=r"at `fn\(y, args\)\[1\]` it returned str"):
        fixpoint.fixed_point(lambda y, a: (jnp.cos(y), "s"), 0.1, solver=p, has_aux=True)


# ---- 15. tolerance and option validation -----------------------------------------


def test_tolerance_validation():
    assert solvers.Picard(np.float32(1e-6), np.float64(1e-6)).rtol == np.float32(1e-6)
    with pytest.raises(TypeError, match="static Python float"):
        jax.jit(lambda r: solvers.Picard(r, 1e-6).rtol)(1e-3)
    with pytest.raises(ValueError, match="finite"):
        solvers.Picard(float("nan"), 1e-6)
    with pytest.raises(TypeError, match="`rtol` must be a non-negative number, got True"):
        solvers.Picard(True, 1e-6)
    with pytest.raises(TypeError, match="`throw` must be a bool"):
        fixpoint.fixed_point(lambda y, a: y, 0.1, solver=solvers.Picard(1e-6, 1e-6), throw="no")


# ---- 16. adjoint-specific messages -----------------------------------------------


def test_unrolled_under_jvp_and_series_hint():
    def solve(a, adjoint):
        return fixpoint.fixed_point(
            lambda y, a: jnp.cos(a * y), 0.1, a, solver=solvers.Picard(1e-8, 1e-8), adjoint=adjoint
        ).value

    with pytest.raises(TypeError, match="use `fixpoint.ImplicitAdjoint\\(\\)`"):
        jax.jvp(lambda a: solve(a, fixpoint.UnrolledAdjoint()), (1.0,), (1.0,))

    # Neumann on a map whose Jacobian has spectral radius 3 at the solution blows up.
    def expand(a):
        return fixpoint.fixed_point(
            lambda y, a: -3.0 * y + a,
            jnp.zeros(1),
            a,
            solver=solvers.Newton(1e-8, 1e-8),
            adjoint=fixpoint.NeumannAdjoint(terms=2000),
        ).value.sum()

    # The backward pass runs compiled: the message arrives in JAX's runtime error.
    with pytest.raises(Exception, match="PhantomAdjoint` / `NeumannAdjoint"):
        jax.grad(expand)(1.0)
