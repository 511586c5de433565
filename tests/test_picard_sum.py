"""`solvers.PicardSum`: Picard in integral form over time (ParaDiGMS's iteration).

The problem with a known answer is a diffusion sampler: Euler steps of the
probability-flow ODE of a Gaussian mixture, whose score is exact, from
`sigma = 20` down to `0.01` (`lax.scan` of the same steps is the reference).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import finite_difference_grad

import fixpoint
from fixpoint import solvers

OK = fixpoint.RESULTS.successful
D, T = 4, 200


def _mixture(key):
    means = 3.0 * jax.random.normal(key, (5, D), jnp.float64)
    return means, jnp.asarray(0.05, jnp.float64)


def _score(x, sigma, means, var):
    v = var + sigma**2
    weights = jax.nn.softmax(-jnp.sum((x - means) ** 2, axis=1) / (2 * v))
    return (weights @ means - x) / v


def _sampler_step(params, x, sigmas):
    """One Euler step of `dx/dsigma = -sigma * score(x, sigma)`: near the identity."""
    means, var = params
    a, b = sigmas
    x = x + (b - a) * (-a * _score(x, a, means, var))
    return x, x


def _inputs(key):
    sig = jnp.geomspace(20.0, 0.01, T + 1, dtype=jnp.float64)
    return 20.0 * jax.random.normal(key, (D,), jnp.float64), (sig[:-1], sig[1:])


class _NewtonCertified(solvers.PicardSum):
    """Certified by the parallel Newton step (the default off the CPU), so the
    answer is PicardSum's own trajectory refined once, not the CPU's sweep."""

    def exact(self, problem):
        return False, False

    def refine(self, problem, h, fh, derivatives, state):
        return problem.newton_step(h, "parallel"), state


def _solve(solver, params, x0, xs, reverse=False):
    return fixpoint.scan(
        lambda h, s: _sampler_step(params, h, s),
        x0,
        xs,
        solver=solver,
        reverse=reverse,
        return_solution=True,
    )


@pytest.fixture(scope="module")
def problem():
    keys = jax.random.split(jax.random.key(3), 2)
    return _mixture(keys[0]), *_inputs(keys[1])


def test_sampler_in_few_iterations_where_jacobi_needs_T(problem):
    params, x0, xs = problem
    run = jax.jit(lambda solver, *a: _solve(solver, *a), static_argnums=0)
    ref = jax.lax.scan(lambda h, s: _sampler_step(params, h, s), x0, xs)[1]
    _, ys, sol = run(_NewtonCertified(1e-10, 1e-10), params, x0, xs)
    assert bool(sol.result == OK)
    np.testing.assert_allclose(ys, ref, rtol=1e-9, atol=1e-9)
    steps = int(sol.stats["num_steps"])
    # Measured: 25 iterations; Jacobi fixes about one
    # step per iteration on a cell this close to the identity.
    assert steps <= 30, steps
    _, _, jac = run(solvers.Jacobi(1e-10, 1e-10), params, x0, xs)
    assert bool(jac.result == OK) and int(jac.stats["num_steps"]) >= T - 10


def test_update_on_an_integrator_is_exact_after_the_frozen_prefix():
    # `h + x` has the identity as Jacobian: one update is the answer given the
    # frozen steps, which the loop keeps as they are (here off by 1e-3, as a
    # step within a loose tolerance may be), and the first unfrozen step is
    # `F(H)_p` exactly.
    xs = jnp.arange(1.0, 13.0, dtype=jnp.float64).reshape(6, 2)
    h0 = jnp.array([0.5, -1.0], jnp.float64)
    for reverse in (False, True):
        order = jnp.arange(5, -1, -1) if reverse else jnp.arange(6)
        frozen = order < 2
        problem = fixpoint.internal.ScanProblem(
            lambda h, x: h + x, h0, xs, fixpoint.internal.Time(), reverse=reverse
        )
        exact = problem.sweep(6)
        h = jnp.where(frozen[:, None], exact + 1e-3, 7.0)
        out, _ = solvers.PicardSum().update(problem, h, problem.evaluate(h), None, frozen, None)
        np.testing.assert_array_equal(out[frozen], h[frozen])
        np.testing.assert_array_equal(out[order == 2], problem.evaluate(h)[order == 2])
        # After the frozen steps, the integrator's own sums from the last of them.
        np.testing.assert_allclose(out[~frozen], exact[~frozen] + 1e-3, rtol=1e-14)


def test_gradient_matches_finite_differences_and_lax_scan(problem):
    params, x0, xs = problem
    w = jnp.cos(jnp.arange(T * D, dtype=jnp.float64)).reshape(T, D)

    def loss(scale, solver):
        p = (params[0] * scale, params[1])
        if solver is None:
            ys = jax.lax.scan(lambda h, s: _sampler_step(p, h, s), x0, xs)[1]
        else:
            ys = _solve(solver, p, x0, xs)[1]
        return jnp.sum(w * ys)

    scale = jnp.array(1.1, jnp.float64)
    ours = jax.jit(jax.value_and_grad(lambda s: loss(s, solvers.PicardSum(1e-11, 1e-11))))
    value, grad = ours(scale)
    np.testing.assert_allclose(value, loss(scale, None), rtol=1e-10)
    np.testing.assert_allclose(grad, jax.grad(loss)(scale, None), rtol=1e-8)
    fd = finite_difference_grad(lambda s: ours(s)[0], scale, eps=1e-6)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_jit_vmap_and_eager_agree(problem):
    params, _, xs = problem
    x0s = 20.0 * jax.random.normal(jax.random.key(11), (3, D), jnp.float64)
    solver = _NewtonCertified(1e-9, 1e-9)

    def run(x0):
        _, ys, sol = _solve(solver, params, x0, xs)
        return ys, sol.stats["num_steps"]

    batched = jax.jit(jax.vmap(run))(x0s)
    for i in range(3):
        eager = run(x0s[i])
        np.testing.assert_allclose(batched[0][i], eager[0], rtol=1e-12, atol=1e-12)
        assert int(batched[1][i]) == int(eager[1])


def test_a_cell_far_from_the_identity_still_converges():
    # A contraction (Jacobian 0.3 I): the identity overshoots, and the loop's
    # safeguard still brings every step within tolerance in at most T iterations.
    xs = jnp.sin(jnp.arange(50.0, dtype=jnp.float64))[:, None] * jnp.ones(3, jnp.float64)
    f = lambda h, x: (0.3 * h + x, h)  # noqa: E731
    _, ys, sol = fixpoint.scan(
        f,
        jnp.ones(3, jnp.float64),
        xs,
        solver=_NewtonCertified(1e-10, 1e-10),
        return_solution=True,
    )
    ref = jax.lax.scan(f, jnp.ones(3, jnp.float64), xs)[1]
    assert bool(sol.result == OK) and int(sol.stats["num_steps"]) <= 50 + 2
    np.testing.assert_allclose(ys, ref, rtol=1e-9, atol=1e-9)


# ---- sliding windows ------------------------------------------------------------


def _newton_certified(window):
    return _NewtonCertified(1e-10, 1e-10, window=window)


@pytest.mark.parametrize("reverse", [False, True])
def test_window_matches_lax_scan_and_evaluates_less(problem, reverse):
    params, x0, xs = problem
    ref = jax.lax.scan(lambda h, s: _sampler_step(params, h, s), x0, xs, reverse=reverse)[1]
    run = jax.jit(
        lambda solver, x0: _solve(solver, params, x0, xs, reverse=reverse), static_argnums=0
    )
    counts = {}
    for window in (None, 40):
        _, ys, sol = run(_newton_certified(window), x0)
        assert bool(sol.result == OK), window
        np.testing.assert_allclose(ys, ref, rtol=1e-9, atol=1e-9)
        counts[window] = int(sol.stats["num_steps"])
    # Each windowed iteration evaluates 40 steps, the whole-sequence one 200.
    assert counts[40] <= T + 2
    assert counts[40] * 40 < counts[None] * T, counts
    # The default guess lets steps entering the window start from the latest
    # state; the same guess passed explicitly is kept as it is, and costs more.
    _, _, kept = fixpoint.scan(
        lambda h, s: _sampler_step(params, h, s),
        x0,
        xs,
        solver=_newton_certified(40),
        reverse=reverse,
        guess=jnp.broadcast_to(x0, (T, D)),
        return_solution=True,
    )
    assert bool(kept.result == OK) and int(kept.stats["num_steps"]) > counts[40], counts


def test_window_gradients_match_lax_scan(problem):
    params, x0, xs = problem
    w = jnp.sin(jnp.arange(T * D, dtype=jnp.float64)).reshape(T, D)

    def loss(x0, solver):
        if solver is None:
            ys = jax.lax.scan(lambda h, s: _sampler_step(params, h, s), x0, xs)[1]
        else:
            ys = _solve(solver, params, x0, xs)[1]
        return jnp.sum(w * ys)

    grad = jax.jit(jax.grad(lambda x0: loss(x0, solvers.PicardSum(1e-11, 1e-11, window=32))))(x0)
    np.testing.assert_allclose(grad, jax.grad(loss)(x0, None), rtol=1e-8, atol=1e-10)


def test_window_under_vmap_agrees_with_each_call(problem):
    params, _, xs = problem
    x0s = 20.0 * jax.random.normal(jax.random.key(12), (3, D), jnp.float64)

    def run(x0):
        _, ys, sol = _solve(_newton_certified(25), params, x0, xs)
        return ys, sol.stats["num_steps"], sol.stats["converged_steps"]

    batched = jax.jit(jax.vmap(run))(x0s)
    for i in range(3):
        one = jax.jit(run)(x0s[i])
        np.testing.assert_allclose(batched[0][i], one[0], rtol=1e-12, atol=1e-12)
        assert int(batched[1][i]) == int(one[1]) and int(batched[2][i]) == T


def test_window_keeps_a_given_guess(problem):
    # A guess is not overwritten by extrapolation: the exact trajectory as the
    # guess is confirmed one window at a time, with no update at all.
    params, x0, xs = problem
    exact = jax.lax.scan(lambda h, s: _sampler_step(params, h, s), x0, xs)[1]
    _, ys, sol = fixpoint.scan(
        lambda h, s: _sampler_step(params, h, s),
        x0,
        xs,
        solver=_newton_certified(50),
        guess=exact,
        return_solution=True,
    )
    assert bool(sol.result == OK)
    # Four windows, none needing an update, and the certifying measurement:
    # no step counted (as without a window); with `max_steps=1` still a success.
    assert int(sol.stats["num_steps"]) == 0
    np.testing.assert_allclose(ys, exact, rtol=1e-12)


def test_window_codes_nonfinite_and_max_steps():
    # NaN from step 30 on: `nonfinite`, with the 30 leading steps converged.
    xs = jnp.where(jnp.arange(60.0) < 30, 0.01, jnp.nan)[:, None] * jnp.ones(2)
    f = lambda h, x: (h + x, h)  # noqa: E731
    _, _, sol = fixpoint.scan(
        f, jnp.zeros(2), xs, solver=solvers.PicardSum(window=8), throw=False, return_solution=True
    )
    assert bool(sol.result == fixpoint.RESULTS.nonfinite)
    assert int(sol.stats["converged_steps"]) == 30
    # Out of iterations inside the window phase.
    xs = jnp.full((60, 2), 0.01)
    _, _, sol = fixpoint.scan(
        lambda h, x: (jnp.sin(3 * h) + x, h),
        jnp.zeros(2),
        xs,
        solver=solvers.PicardSum(window=8),
        max_steps=3,
        throw=False,
        return_solution=True,
    )
    assert bool(sol.result == fixpoint.RESULTS.max_steps_reached)
    assert int(sol.stats["num_steps"]) == 3 and int(sol.stats["converged_steps"]) < 60
    # The residual is the last window's, measured at the returned trajectory.
    h = sol.value
    hp = jnp.concatenate([jnp.zeros((1, 2)), h[:-1]])
    r = jnp.abs(h - (jnp.sin(3 * hp) + xs))
    lo = int(sol.stats["converged_steps"])
    window = r[min(lo, 60 - 8) : min(lo, 60 - 8) + 8]
    np.testing.assert_allclose(sol.stats["residual"], jnp.max(window), rtol=1e-12)


def test_window_bounds_and_a_window_of_one():
    # The step the loop sets exactly counts as converged at once, so a window
    # needs no more iterations than `T` (a window of 1 is the sequential scan).
    xs = jnp.linspace(-1.0, 1.0, 10)[:, None] * jnp.ones(3)
    f = lambda h, x: (h + 0.05 * jnp.sin(h + x), h)  # noqa: E731
    ref = jax.lax.scan(f, jnp.zeros(3), xs)[1]
    for solver in (solvers.Jacobi, solvers.PicardSum):
        for window in (1, 3, 9):
            _, ys, sol = fixpoint.scan(
                f,
                jnp.zeros(3),
                xs,
                solver=solver(1e-12, 1e-12, window=window),
                max_steps=10,
                return_solution=True,
            )
            assert bool(sol.result == OK), (solver, window)
            np.testing.assert_allclose(ys, ref, rtol=1e-12, atol=1e-12)
    # A stop inside the window phase returns the window it measured: the
    # leading steps it counts as converged are those of the returned value.
    t = jnp.arange(60)
    xs = jnp.where((t < 8) | (t >= 20), 1.0, 0.0)[:, None] * jnp.ones(2)
    g = lambda h, x: (h + x, h)  # noqa: E731
    _, _, sol = fixpoint.scan(
        g,
        jnp.zeros(2),
        xs,
        solver=solvers.PicardSum(window=8),
        max_steps=2,
        throw=False,
        return_solution=True,
    )
    h = sol.value
    r = jnp.max(jnp.abs(h - (jnp.concatenate([jnp.zeros((1, 2)), h[:-1]]) + xs)), axis=1)
    lead = int(jnp.argmax(r > 1e-6))
    assert bool(sol.result == fixpoint.RESULTS.max_steps_reached)
    # (25 here, counted on the stopped window as it is returned.)
    assert int(sol.stats["converged_steps"]) == lead == 25


def test_window_longer_than_the_sequence_changes_nothing(problem):
    params, x0, xs = problem
    outs = [_solve(solvers.PicardSum(window=w), params, x0, xs)[2] for w in (None, T, 10 * T)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out.value, outs[0].value)
        assert int(out.stats["num_steps"]) == int(outs[0].stats["num_steps"])


def test_window_errors_name_the_problem():
    for bad in (0, -3, True, 2.5):
        with pytest.raises((ValueError, TypeError), match="PicardSum: `window`"):
            solvers.PicardSum(window=bad)

    class WindowedELK(solvers.ELK):
        def window_length(self, length):
            return 4

    xs = jnp.ones((10, 2))
    f = lambda h, x: (h + x, h)  # noqa: E731
    with pytest.raises(TypeError, match="WindowedELK: a solver with a window must keep no state"):
        fixpoint.scan(f, jnp.zeros(2), xs, solver=WindowedELK())
    mesh = jax.make_mesh((1,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match=r"`solver=PicardSum\(window=4\)` slides a window"):
        fixpoint.scan(f, jnp.zeros(2), xs, solver=solvers.PicardSum(window=4), mesh=mesh)
    # Without a window the one-device mesh runs (its axis index is an int32,
    # which used to meet int64 positions under x64 and strict promotion).
    final, _ = fixpoint.scan(f, jnp.zeros(2), xs, solver=solvers.PicardSum(), mesh=mesh)
    np.testing.assert_allclose(final, 10.0)


def test_elk_on_the_sampler_keeps_its_steps(problem):
    # ELK's trust region used to reject every step after the first here (the
    # loop's exact setting of the first unconverged step raises the merit of
    # even a zero step), so it ran T = 200 iterations at one step each; 14 now.
    params, x0, xs = problem
    ref = jax.lax.scan(lambda h, s: _sampler_step(params, h, s), x0, xs)[1]
    _, ys, sol = jax.jit(lambda x0: _solve(solvers.ELK(), params, x0, xs))(x0)
    assert bool(sol.result == OK) and int(sol.stats["num_steps"]) <= 30
    np.testing.assert_allclose(ys, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", [None, 30])
def test_float32_at_the_default_tolerance(problem, window):
    params, x0, xs = jax.tree.map(lambda a: a.astype(jnp.float32), problem)
    ref = jax.lax.scan(lambda h, s: _sampler_step(params, h, s), x0, xs)[1]
    _, ys, sol = jax.jit(lambda x0: _solve(_NewtonCertified(window=window), params, x0, xs))(x0)
    assert bool(sol.result == OK) and ys.dtype == jnp.float32
    # The default float32 tolerance is 1e-4 per step (`fixpoint.internal.scan_tolerances`).
    scale = 1e-4 * (1 + jnp.abs(ref))
    assert float(jnp.max(jnp.abs(ys - ref) / scale)) <= 2.0
