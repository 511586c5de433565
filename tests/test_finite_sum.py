"""Finite sums (`fixpoint.FiniteSum`) and the variance-reduced Halpern solver.

Known answers: least squares as a mean of one-row maps (the answer is
`lstsq`), and a regularised bilinear game as a mean of component operators
(the answer solves a linear system). The solver's answer equals full-batch
Halpern's; its gradient equals the analytic one and finite differences.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixpoint
from fixpoint import solvers

N, D = 96, 6


def _least_squares():
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.normal(size=(N, D)))[0]
    v = np.linalg.qr(rng.normal(size=(D, D)))[0]
    a = u @ np.diag(np.logspace(0, -1, D) * np.sqrt(N)) @ v.T  # condition number 10
    b = a @ rng.normal(size=D) + 0.1 * rng.normal(size=N)
    step = 1 / np.linalg.eigvalsh(a.T @ a / N).max()
    return jnp.asarray(a), jnp.asarray(b), float(step)


A, B, STEP = _least_squares()
LSTSQ = np.linalg.lstsq(np.asarray(A), np.asarray(B), rcond=None)[0]


def row_map(y, args, i):
    # T_i(y) = y − η a_i (a_iᵀ y − b_i): the mean is a gradient step on ‖Ay − b‖²/2n.
    a, b = args
    return y - STEP * a[i] * (a[i] @ y - b[i])


LEAST_SQUARES = fixpoint.FiniteSum(row_map, N)
TOL = 1e-9
VR = solvers.VarianceReducedHalpern(0, TOL, restart_ratio=0.5)
HALPERN = solvers.Halpern(0, TOL, restart_ratio=0.5)


def _solve(solver, b=B, **kw):
    return fixpoint.fixed_point(
        LEAST_SQUARES, jnp.zeros(D), (A, b), solver=solver, max_steps=20_000, **kw
    )


@pytest.fixture(scope="module")
def vr_solution():
    return _solve(VR)


def test_finite_sum_called_whole_is_the_mean():
    def part(y, args, i):
        return {"u": y["u"] * args[i], "v": y["v"] + args[i]}

    y = {"u": jnp.arange(3.0), "v": jnp.ones((2, 2))}
    w = jnp.array([1.0, 2.0, 6.0])
    out = fixpoint.FiniteSum(part, 3)(y, w)
    np.testing.assert_allclose(out["u"], y["u"] * 3.0)
    np.testing.assert_allclose(out["v"], y["v"] + 3.0)


def test_answer_is_least_squares_and_equals_full_batch_halpern(vr_solution):
    full = _solve(HALPERN)
    assert vr_solution.result == fixpoint.RESULTS.successful
    np.testing.assert_allclose(vr_solution.value, LSTSQ, atol=1e-7)
    np.testing.assert_allclose(vr_solution.value, full.value, atol=1e-7)
    # The certificate is exact: the residual at the answer, measured whole.
    exact = vr_solution.value - LEAST_SQUARES(vr_solution.value, (A, B))
    assert float(jnp.max(jnp.abs(exact))) <= TOL
    np.testing.assert_allclose(vr_solution.stats["residual"], jnp.max(jnp.abs(exact)), rtol=1e-6)


def test_fewer_component_evaluations_than_full_batch(vr_solution):
    full = _solve(HALPERN)
    full_evaluations = N * (int(full.stats["num_steps"]) + 1)
    evaluations = int(vr_solution.stats["component_evaluations"])
    # √96 ≈ 10: a sampled step costs 2·10 instead of 96, a full one comes
    # every 10 steps at most, so about 3x fewer.
    assert evaluations < full_evaluations / 2.5, (evaluations, full_evaluations)


def test_the_counts_add_up(vr_solution):
    stats = vr_solution.stats
    full, sampled = int(stats["full_steps"]), int(stats["sampled_steps"])
    assert full + sampled == int(stats["num_steps"]) + 1  # every step evaluates once
    assert 0 < full < sampled
    b, _ = VR.sizes(N)
    assert float(stats["component_evaluations"]) == full * N + sampled * 2 * b


def test_uneven_components_fall_back_towards_full_steps():
    # Rows whose norms vary by e^(±2): a few components are ~900 times as
    # Lipschitz as the mean, and the sampled estimate is too noisy to follow.
    # Exact (and estimated) residuals that jump make full steps more frequent,
    # so the solve still converges where it used to end `diverged`.
    rng = np.random.default_rng(1)
    n, d = 1000, 5
    a = rng.normal(size=(n, d)) * np.exp(2 * rng.normal(size=(n, 1)))
    b = a @ rng.normal(size=d) + 0.01 * rng.normal(size=n)
    step = 1 / np.linalg.eigvalsh(a.T @ a / n).max()

    def row(y, args, i):
        a, b = args
        return y - step * a[i] * (a[i] @ y - b[i])

    sol = fixpoint.fixed_point(
        fixpoint.FiniteSum(row, n),
        jnp.zeros(d),
        (jnp.asarray(a), jnp.asarray(b)),
        solver=solvers.VarianceReducedHalpern(0, 1e-6, restart_ratio=0.5),
        max_steps=5000,
    )
    np.testing.assert_allclose(sol.value, np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-4)


def test_a_batch_as_large_as_the_sum_makes_every_step_full():
    sol = _solve(solvers.VarianceReducedHalpern(0, 1e-6, batch_size=N // 2, restart_ratio=0.5))
    assert int(sol.stats["sampled_steps"]) == 0
    steps = int(sol.stats["num_steps"]) + 1
    assert float(sol.stats["component_evaluations"]) == N * steps


def test_every_other_solver_accepts_a_finite_sum():
    for solver in (solvers.Picard(0, TOL), solvers.Anderson(0, TOL)):
        sol = _solve(solver)
        np.testing.assert_allclose(sol.value, LSTSQ, atol=1e-7)
        assert "component_evaluations" not in sol.stats


def test_gradient_equals_analytic_and_finite_differences():
    weights = jnp.linspace(-1.0, 1.0, D)

    def loss(b):
        return jnp.sum(weights * jnp.sin(_solve(VR, b).value))

    grad = jax.grad(loss)(B)
    # d/db of lstsq(A, b) is A⁺: the chain rule by hand.
    pinv = np.linalg.pinv(np.asarray(A))
    np.testing.assert_allclose(grad, pinv.T @ (np.asarray(weights) * np.cos(LSTSQ)), atol=1e-7)
    # And finite differences along one direction (the same compiled solve).
    direction = jnp.asarray(np.random.default_rng(3).normal(size=N))
    eps = 1e-4
    fd = (loss(B + eps * direction) - loss(B - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(grad @ direction, fd, rtol=1e-5)


def test_jit_and_vmap_agree_with_the_plain_call(vr_solution):
    jitted = jax.jit(lambda b: _solve(VR, b))(B)
    np.testing.assert_array_equal(jitted.value, vr_solution.value)
    assert int(jitted.stats["num_steps"]) == int(vr_solution.stats["num_steps"])
    bs = jnp.stack([B, 2 * B])
    batched = jax.vmap(lambda b: _solve(VR, b))(bs)
    for k in range(2):
        one = vr_solution if k == 0 else _solve(VR, bs[1])
        np.testing.assert_allclose(batched.value[k], one.value, rtol=1e-12, atol=1e-14)
        for name in ("num_steps", "component_evaluations", "full_steps"):
            assert int(batched.stats[name][k]) == int(one.stats[name])


def test_root_find_on_a_game():
    # min_x max_z (1/n) Σ_i [xᵀ B_i z + μ/2 (|x|² − |z|²) − c_iᵀ x + d_iᵀ z]: the
    # operator F_i = (B_i z + μx − c_i, −B_iᵀ x + μz − d_i) is monotone and its mean
    # cocoercive (μ > 0); scaled by η it is an averaged-map root problem.
    rng = np.random.default_rng(1)
    n, p, mu = 48, 3, 0.5
    bs = jnp.asarray(rng.normal(size=(n, p, p)) + 1.0)
    c, d = (jnp.asarray(rng.normal(size=(n, p))) for _ in range(2))
    mean = np.asarray(bs.mean(0))
    eta = mu / (mu**2 + np.linalg.norm(mean, 2) ** 2)

    def operator(y, args, i):
        bs, c, d = args
        return {
            "x": eta * (bs[i] @ y["z"] + mu * y["x"] - c[i]),
            "z": eta * (-bs[i].T @ y["x"] + mu * y["z"] - d[i]),
        }

    y0 = {"x": jnp.zeros(p), "z": jnp.zeros(p)}
    sol = fixpoint.root_find(
        fixpoint.FiniteSum(operator, n), y0, (bs, c, d), solver=VR, max_steps=20_000
    )
    matrix = np.block([[mu * np.eye(p), mean], [-mean.T, mu * np.eye(p)]])
    answer = np.linalg.solve(matrix, np.concatenate([c.mean(0), d.mean(0)]))
    np.testing.assert_allclose(sol.value["x"], answer[:p], atol=1e-6)
    np.testing.assert_allclose(sol.value["z"], answer[p:], atol=1e-6)


def test_sampled_steps_never_converge_and_record_the_last_exact_residual():
    # A loose tolerance met early: the solve stops at a full step, and the
    # recorded history repeats the last exact norm across sampled steps.
    solver = solvers.VarianceReducedHalpern(0, 1e-3, refresh_every=4)
    sol = _solve(solver, record_residuals=True)
    k = int(sol.stats["num_steps"])
    history = np.asarray(sol.stats["residual_history"][: k + 1])
    exact = sol.value - LEAST_SQUARES(sol.value, (A, B))
    np.testing.assert_allclose(history[-1], jnp.max(jnp.abs(exact)), rtol=1e-9)
    assert history[-1] <= 1e-3 < history[-2]
    repeats = np.sum(history[1:] == history[:-1])
    assert repeats > k / 2, (repeats, k)


def test_a_nan_component_is_nonfinite():
    def bad(y, args, i):
        return jnp.where(i == 3, jnp.nan, 1.0) * row_map(y, args, i)

    sol = fixpoint.fixed_point(
        fixpoint.FiniteSum(bad, N), jnp.zeros(D), (A, B), solver=VR, throw=False
    )
    assert sol.result == fixpoint.RESULTS.nonfinite
    assert np.isnan(float(sol.stats["residual"]))  # reported, not hidden behind an old norm


def test_seeds_change_the_path_not_the_answer(vr_solution):
    other = _solve(dataclasses.replace(VR, seed=7))
    np.testing.assert_allclose(other.value, vr_solution.value, atol=1e-7)
    again = _solve(VR)
    np.testing.assert_array_equal(again.value, vr_solution.value)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="FiniteSum"):
        fixpoint.fixed_point(lambda y, a: y / 2, jnp.ones(2), solver=VR)
    with pytest.raises(TypeError, match="has_aux"):
        fixpoint.fixed_point(LEAST_SQUARES, jnp.zeros(D), (A, B), solver=VR, has_aux=True)
    with pytest.raises(ValueError, match="num_components"):
        fixpoint.FiniteSum(row_map, 0)
    with pytest.raises(TypeError, match="callable"):
        fixpoint.FiniteSum(3, 2)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match=r"fn\(y, args, i\)"):
        fixpoint.FiniteSum(lambda y, args: y, 2)
    wrong = fixpoint.FiniteSum(lambda y, args, i: y[:-1], N)
    with pytest.raises(ValueError, match=r"`FiniteSum` component.*fn\(y0, args, 0\)"):
        fixpoint.fixed_point(wrong, jnp.zeros(D), (A, B), solver=VR)
    pair = fixpoint.FiniteSum(lambda y, args, i: (y, y), N)
    with pytest.raises(ValueError, match="component") as error:
        fixpoint.fixed_point(pair, jnp.zeros(D), (A, B), solver=VR)
    assert "has_aux" not in str(error.value)
    for option, value, error in (
        ("batch_size", 0, ValueError),
        ("refresh_every", 1.5, TypeError),
        ("restart_ratio", 1.0, ValueError),
        ("seed", -1, ValueError),
        ("seed", 2**32, ValueError),
    ):
        with pytest.raises(error, match=option):
            solvers.VarianceReducedHalpern(0, 1e-6, **{option: value})


def test_solver_stats_may_not_take_the_loops_names():
    class Greedy(solvers.Picard):
        def stats(self, state):
            return {"residual": jnp.zeros(())}

    with pytest.raises(ValueError, match="residual"):
        fixpoint.fixed_point(lambda y, a: y / 2, jnp.ones(2), solver=Greedy(0, 1e-6))


def test_estimated_steps_are_the_loops_contract():
    # A solver whose every evaluation is an estimate never converges: it runs
    # out of steps, with the residual of its (exact) start recorded.
    class Estimating(solvers.Picard):
        def step(self, problem, y, args, state):
            return dataclasses.replace(super().step(problem, y, args, state), exact=False)

    sol = fixpoint.fixed_point(
        lambda y, a: y / 2, jnp.ones(2), solver=Estimating(0, 1e-6), max_steps=20, throw=False
    )
    assert sol.result == fixpoint.RESULTS.max_steps_reached
    assert not np.isfinite(float(sol.stats["residual"]))  # no exact norm ever recorded
