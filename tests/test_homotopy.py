"""`solvers.Homotopy`: roots reached along the Newton homotopy's path, folds
reported as `path_ended`, gradients of the root reached."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import finite_difference_grad

import fixpoint
from fixpoint import solvers

HOMOTOPY = solvers.Homotopy(1e-10, 1e-10)
NEWTON = solvers.Newton(1e-10, 1e-10)
A = jnp.array([[2.0, 1.0], [0.5, 1.5]])
B = jnp.array([1.0, -1.0])


def arctan_system(y, b):
    return jnp.arctan(A @ y - b)


def sine(y, args):
    return jnp.sin(y)


def _root(fn, y0, args=None, solver=HOMOTOPY, max_steps=500, **kw):
    return fixpoint.root_find(fn, jnp.asarray(y0), args, solver=solver, max_steps=max_steps, **kw)


def test_the_path_leads_to_the_root_and_agrees_with_newton_where_both_work():
    sol = _root(arctan_system, [10.0, -8.0], B)
    np.testing.assert_allclose(sol.value, np.linalg.solve(A, B), atol=1e-9)
    np.testing.assert_allclose(sol.value, _root(arctan_system, [10.0, -8.0], B, NEWTON).value)
    assert int(sol.stats["path_points"]) >= 3
    assert float(sol.stats["lambda"]) == 1.0


def test_the_root_the_path_leads_to_where_newton_jumps_to_another():
    # sin(y) = (1 − λ) sin(y_0) keeps |y| < π/2 from y_0 = (1.4, −1.45): the path
    # ends at 0. Newton's first step from 1.4 (tan 1.4 ≈ 5.8) lands near −π...
    sol = _root(sine, [1.4, -1.45])
    np.testing.assert_allclose(sol.value, 0.0, atol=1e-10)
    newton = _root(sine, [1.4, -1.45], solver=NEWTON)
    assert newton.result == fixpoint.RESULTS.successful
    assert float(jnp.max(jnp.abs(newton.value))) > 3.0  # a root, but another one


def test_a_fold_ends_the_path():
    # y³ − 2y + 2 − 2(1 − λ) = 0 from y = 0 climbs to the fold at y = √(2/3),
    # λ = (2y − y³)/2 ≈ 0.544, and turns back: no path to the real root -1.77.
    sol = _root(lambda y, a: y**3 - 2 * y + 2, [0.0], throw=False)
    assert sol.result == fixpoint.RESULTS.path_ended
    fold = np.sqrt(2 / 3)
    assert abs(float(sol.stats["lambda"]) - (2 * fold - fold**3) / 2) < 0.01
    with pytest.raises(fixpoint.SolveError, match="path_ended"):
        _root(lambda y, a: y**3 - 2 * y + 2, [0.0])


def test_a_nearly_singular_start_is_not_divergence():
    # At y = 0.01 the slope of y³ − 1 is 3e-4: the first tangent points 666 away,
    # where the residual is 3e8. That prediction is rejected (a trial), not
    # "diverged", and the path, with smaller steps, reaches the root 1.
    sol = _root(lambda y, a: y**3 - 1, [0.01])
    np.testing.assert_allclose(sol.value, 1.0, rtol=1e-10)
    assert int(sol.stats["rejected"]) > 0


def test_the_first_step_is_initial_step():
    sol = _root(sine, [1.4, -1.45], max_steps=2, throw=False)
    assert float(sol.stats["lambda"]) == pytest.approx(0.1)


def test_fixed_points_and_pytrees():
    sol = fixpoint.fixed_point(
        lambda y, a: {"u": jnp.cos(y["v"]), "v": 0.5 * jnp.sin(y["u"])},
        {"u": jnp.array(3.0), "v": jnp.array(-2.0)},
        solver=HOMOTOPY,
    )
    np.testing.assert_allclose(sol.value["u"], jnp.cos(sol.value["v"]), atol=1e-10)
    np.testing.assert_allclose(sol.value["v"], 0.5 * jnp.sin(sol.value["u"]), atol=1e-10)


def test_gradient_is_the_roots():
    # The root A⁻¹ b does not depend on the path: d/db of Σ y*² is 2 A⁻ᵀ A⁻¹ b.
    def loss(b):
        return jnp.sum(_root(arctan_system, [10.0, -8.0], b).value ** 2)

    grad = jax.grad(loss)(B)
    inv = np.linalg.inv(np.asarray(A))
    np.testing.assert_allclose(grad, 2 * inv.T @ inv @ np.asarray(B), rtol=1e-8)
    np.testing.assert_allclose(grad, finite_difference_grad(loss, B), rtol=1e-6)


def test_jit_and_vmap_agree_with_the_plain_call():
    starts = jnp.array([[10.0, -8.0], [0.3, 0.2], [-6.0, 9.0]])
    batched = jax.vmap(lambda y0: _root(arctan_system, y0, B, throw=False))(starts)
    jitted = jax.jit(lambda y0: _root(arctan_system, y0, B))(starts[0])
    np.testing.assert_array_equal(jitted.value, _root(arctan_system, starts[0], B).value)
    for k in range(3):
        one = _root(arctan_system, starts[k], B)
        np.testing.assert_allclose(batched.value[k], one.value, rtol=1e-12, atol=1e-14)
        assert int(batched.stats["num_steps"][k]) == int(one.stats["num_steps"])
        assert int(batched.stats["path_points"][k]) == int(one.stats["path_points"])


@pytest.mark.parametrize(
    "option, value, error",
    [
        ("initial_step", 0.0, ValueError),
        ("max_step", 1.5, ValueError),
        ("min_step", 0.5, ValueError),  # above initial_step
        ("corrector_rtol", 1.0, ValueError),
        ("max_corrections", 0, ValueError),
        ("max_corrections", 2.5, TypeError),
    ],
)
def test_bad_options_are_named(option, value, error):
    with pytest.raises(error, match=option):
        solvers.Homotopy(1e-6, 1e-6, **{option: value})
