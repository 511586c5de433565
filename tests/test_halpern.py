"""Halpern's anchored iteration: nonexpansive maps where Picard cycles, restarts on contractions."""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import contraction, finite_difference_grad

import fixpoint
from fixpoint import solvers

# Two hyperplanes `A x = b` in R^4: reflecting through one, then the other, is a
# rotation about their intersection `L` (an isometry: nonexpansive, not a
# contraction). Picard keeps every iterate's distance to `L`; Halpern converges
# to the point of `L` nearest its anchor, `P_L(y0)`.
_A = np.array([[1.0, 2.0, -1.0, 0.5], [0.3, -1.0, 2.0, 1.0]])
_B = np.array([0.5, -1.0])


def _reflect(y, a, b):
    return y - 2 * (a @ y - b) / (a @ a) * a


def _rotation(y, args):
    a, b = args
    return _reflect(_reflect(y, a[0], b[0]), a[1], b[1])


def _nearest_on_l(y0):
    a = _A
    return y0 - a.T @ np.linalg.solve(a @ a.T, a @ y0 - _B)


def _rotation_angle():
    # The angle between the hyperplanes' normals; the rotation is by twice it.
    n = _A / np.linalg.norm(_A, axis=1, keepdims=True)
    return 2 * np.arccos(abs(n[0] @ n[1]))


@ft.cache
def _solve_rotation(solver, max_steps):
    return jax.jit(
        lambda y0: fixpoint.fixed_point(
            _rotation,
            y0,
            (jnp.asarray(_A), jnp.asarray(_B)),
            solver=solver,
            max_steps=max_steps,
            throw=False,
        )
    )


def test_nonexpansive_rotation_picard_cycles_halpern_converges_to_the_nearest_fixed_point():
    tol = 1e-4
    y0 = np.array([3.0, -1.0, 2.0, 0.0])
    target = _nearest_on_l(y0)
    picard = _solve_rotation(solvers.Picard(0.0, tol, norm=fixpoint.two_norm), 2000)(y0)
    assert picard.result == fixpoint.RESULTS.max_steps_reached
    # Picard never gets closer: an isometry keeps the distance to `L`.
    np.testing.assert_allclose(
        np.linalg.norm(picard.value - target), np.linalg.norm(y0 - target), rtol=1e-9
    )

    sol = _solve_rotation(solvers.Halpern(0.0, tol, norm=fixpoint.two_norm), 100_000)(y0)
    assert sol.result == fixpoint.RESULTS.successful
    steps = int(sol.stats["num_steps"])
    # The worst-case rate |y_k - f(y_k)| <= 2 |y0 - y*| / (k + 1) bounds the steps.
    assert steps <= 2 * np.linalg.norm(y0 - target) / tol
    assert steps > 10  # not a lucky first step: the test exercises the anchoring
    # The residual of a rotation by `theta` about `L` is 2 sin(theta/2) times the
    # distance to `L`, and Halpern never moves along `L`.
    error = np.linalg.norm(sol.value - target)
    assert error <= tol / (2 * np.sin(_rotation_angle() / 2)) * (1 + 1e-6)
    np.testing.assert_allclose(sol.value, target, atol=1e-3)


def test_restarts_make_contractions_linear():
    w = contraction(jax.random.key(0), 8, 0.5)

    def solve(solver):
        return fixpoint.fixed_point(
            lambda z, w: jnp.tanh(w @ z + 1.0),
            jnp.zeros(8),
            w,
            solver=solver,
            max_steps=2000,
            throw=False,
        )

    reference = solve(solvers.Picard(1e-13, 1e-13)).value
    plain = solve(solvers.Halpern(1e-10, 1e-10))
    restarted = solve(solvers.Halpern(1e-10, 1e-10, restart_ratio=0.5))
    # Without restarts the O(1/k) rate needs far more than 2000 steps for 1e-10.
    assert plain.result == fixpoint.RESULTS.max_steps_reached
    assert restarted.result == fixpoint.RESULTS.successful
    assert int(restarted.stats["num_steps"]) < 200
    np.testing.assert_allclose(restarted.value, reference, rtol=1e-9, atol=1e-9)


def _contraction_problem():
    w = contraction(jax.random.key(1), 5, 0.6)
    x = jax.random.normal(jax.random.key(2), (5,))
    return w, x


def _loss(solver, w, x):
    sol = fixpoint.fixed_point(
        lambda z, a: jnp.tanh(a[0] @ z + a[1]), jnp.zeros(5), (w, x), solver=solver
    )
    return jnp.sum(sol.value**2)


def test_gradient_matches_finite_differences_and_picard():
    w, x = _contraction_problem()
    halpern = solvers.Halpern(1e-12, 1e-12, restart_ratio=0.5)
    grad = jax.jit(jax.grad(lambda x: _loss(halpern, w, x)))(x)
    by_picard = jax.grad(lambda x: _loss(solvers.Picard(1e-12, 1e-12), w, x))(x)
    by_fd = finite_difference_grad(lambda x: _loss(halpern, w, x), x)
    np.testing.assert_allclose(grad, by_picard, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(grad, by_fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("restart", [None, 0.5])
def test_jit_and_vmap_agree_with_the_plain_call(restart):
    solver = solvers.Halpern(0.0, 1e-3, restart_ratio=restart, norm=fixpoint.two_norm)
    # 16 samples: the batched call is compacted (the default `Compaction`).
    y0s = np.random.default_rng(0).standard_normal((16, 4)) * np.linspace(0.1, 10, 16)[:, None]
    solve = _solve_rotation(solver, 100_000)
    batched = jax.vmap(solve)(jnp.asarray(y0s))
    assert len(set(np.asarray(batched.stats["num_steps"]).tolist())) > 1
    for i, y0 in enumerate(y0s):
        one = solve(jnp.asarray(y0))
        assert int(one.stats["num_steps"]) == int(batched.stats["num_steps"][i])
        assert one.result == fixpoint.RESULTS.successful
        np.testing.assert_allclose(batched.value[i], one.value, rtol=1e-12, atol=1e-12)
    eager = fixpoint.fixed_point(
        _rotation, jnp.asarray(y0s[0]), (jnp.asarray(_A), jnp.asarray(_B)),
        solver=solver, max_steps=100_000,
    )  # fmt: skip
    assert int(eager.stats["num_steps"]) == int(batched.stats["num_steps"][0])


def test_pytree_and_root_find():
    # root_find hands Halpern the map y - g(y): here the same rotation.
    y0 = {"a": jnp.array([3.0, -1.0]), "b": jnp.array([2.0, 0.0])}

    def g(y, args):
        flat = jnp.concatenate([y["a"], y["b"]])
        r = flat - _rotation(flat, args)
        return {"a": r[:2], "b": r[2:]}

    sol = fixpoint.root_find(
        g,
        y0,
        (jnp.asarray(_A), jnp.asarray(_B)),
        solver=solvers.Halpern(0.0, 1e-4, norm=fixpoint.two_norm),
        max_steps=100_000,
    )
    target = _nearest_on_l(np.array([3.0, -1.0, 2.0, 0.0]))
    np.testing.assert_allclose(np.concatenate([sol.value["a"], sol.value["b"]]), target, atol=1e-3)


@pytest.mark.parametrize("restart", [0.0, 1.0, -0.5, True, "0.5"])
def test_bad_restart_is_named(restart):
    with pytest.raises((ValueError, TypeError), match="Halpern: `restart_ratio`"):
        solvers.Halpern(1e-6, 1e-6, restart_ratio=restart)


def test_a_dip_of_the_residual_is_not_divergence():
    # On a rotation Halpern averages rotated copies of `y_0 − c`: whenever they
    # nearly cancel, the residual dips (here to 1.3e-7 at step 1419) and then
    # rises back to its O(1/k) envelope (2e-3). Judged against the smallest
    # residual that is a 10^4-fold rise; against the first it is not.
    c = jnp.array([1.0, 1.0])
    cos, sin = np.cos(0.5), np.sin(0.5)
    rot = jnp.array([[cos, -sin], [sin, cos]])
    sol = fixpoint.fixed_point(
        lambda y, a: c + rot @ (y - c),
        jnp.array([3.0, -2.0]),
        solver=solvers.Halpern(0, 1e-12),
        max_steps=2000,
        throw=False,
        record_residuals=True,
    )
    history = np.asarray(sol.stats["residual_history"])
    assert np.nanmin(history) < 1e-6 < 1e-3 < history[-1]
    assert sol.result == fixpoint.RESULTS.max_steps_reached
