"""`RESULTS.infeasible`: maps without a fixed point are reported with their infimal
displacement vector, and maps with one never are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixpoint as fp
from fixpoint import solvers

TOL = 1e-8
DETECTING = {
    "picard": solvers.Picard(TOL, TOL),
    "damped": solvers.Picard(TOL, TOL, damping=0.5),
    "halpern": solvers.Halpern(TOL, TOL),
}


def shift(y, c):
    return jax.tree.map(lambda a, b: a + b, y, c)


@pytest.mark.parametrize("name", DETECTING)
def test_a_shift_is_infeasible_with_its_displacement(name):
    c = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    y0 = {"a": jnp.zeros(2), "b": jnp.array(3.0)}
    sol = fp.fixed_point(shift, y0, c, solver=DETECTING[name], throw=False)
    assert sol.result == fp.RESULTS.infeasible
    # Only when the budget is spent: a solve that would converge is never cut short.
    assert int(sol.stats["num_steps"]) == 256
    # The library's convention: v = y - f(y) = -c.
    v = sol.stats["displacement"]
    np.testing.assert_allclose(v["a"], [-1.0, 2.0], rtol=1e-12)
    np.testing.assert_allclose(v["b"], -0.5, rtol=1e-12)


def douglas_rachford(y, gap):
    """Douglas–Rachford for two parallel lines {y_1 = 0} and {y_1 = gap}:
    `T = (I + R_A R_B) / 2`, a translation by `(0, gap)`."""
    rb = y.at[1].set(-y[1])
    ra = rb.at[1].set(2 * gap - rb[1])
    return 0.5 * (y + ra)


@pytest.mark.parametrize("name", DETECTING)
def test_douglas_rachford_on_parallel_lines(name):
    sol = fp.fixed_point(
        douglas_rachford, jnp.array([0.3, 0.2]), 2.0, solver=DETECTING[name], throw=False
    )
    assert sol.result == fp.RESULTS.infeasible
    np.testing.assert_allclose(sol.stats["displacement"], [0.0, -2.0], atol=1e-12)


def test_throw_names_the_result():
    with pytest.raises(fp.SolveError, match="infeasible.*no fixed point"):
        fp.fixed_point(shift, jnp.zeros(2), jnp.ones(2), solver=DETECTING["picard"])


def test_per_sample_under_vmap_and_jit():
    cs = jnp.array([[1.0, 1.0], [0.0, 0.0]])  # a shift, and the identity's fixed points

    def solve(c):
        return fp.fixed_point(
            lambda y, c: y + c,
            jnp.ones(2),
            c,
            solver=DETECTING["picard"],
            throw=False,
        )

    sols = jax.jit(jax.vmap(solve))(cs)
    assert (sols.result == fp.RESULTS.infeasible).tolist() == [True, False]
    assert (sols.result == fp.RESULTS.successful).tolist() == [False, True]
    eager = solve(cs[0])
    np.testing.assert_array_equal(sols.stats["displacement"][0], eager.stats["displacement"])


@pytest.mark.parametrize("name", DETECTING)
def test_never_on_random_contractions(name):
    # 100 contractions in R^5, rates 0.1 ... 0.999 in the 2-norm, started 100 away
    # from their fixed points: converged or out of steps, never infeasible.
    rng = np.random.default_rng(0)
    n = 100
    q = np.linalg.qr(rng.normal(size=(n, 5, 5)))[0]
    rates = np.concatenate([[0.999, 0.998, 0.99], rng.uniform(0.1, 0.999, n - 3)])
    spectra = rates[:, None] * rng.uniform(-1, 1, (n, 5))
    spectra[:, 0] = rates * np.where(rng.random(n) < 0.5, 1, -1)
    a = np.einsum("bij,bj,bkj->bik", q, spectra, q)
    y0 = 100 * rng.normal(size=(n, 5)) / np.sqrt(5)

    def solve(a, y0):
        return fp.fixed_point(
            lambda y, a: a @ y, y0, a, solver=DETECTING[name], throw=False, max_steps=1024
        ).result

    results = jax.jit(jax.vmap(solve))(jnp.asarray(a), jnp.asarray(y0))
    assert not bool(jnp.any(results == fp.RESULTS.infeasible))


@pytest.mark.parametrize("name", DETECTING)
def test_never_on_nonexpansive_maps_with_fixed_points(name):
    th = 0.3
    rotation = jnp.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])

    def project_line(y, direction):  # onto the line through 0 along `direction`
        return direction * (direction @ y)

    d1, d2 = jnp.array([1.0, 0.0]), jnp.array([np.cos(0.2), np.sin(0.2)])
    maps = [
        (lambda y, a: rotation @ y, jnp.array([5.0, 0.0])),
        (lambda y, a: project_line(project_line(y, d1), d2), jnp.array([40.0, -30.0])),
        (lambda y, a: jnp.clip(y + 1.0, -5.0, 5.0), jnp.full(3, -200.0)),  # reaches 5
    ]
    for f, y0 in maps:
        sol = fp.fixed_point(f, y0, None, solver=DETECTING[name], throw=False, max_steps=2000)
        assert sol.result != fp.RESULTS.infeasible


def test_converging_solves_are_never_infeasible():
    # Each looks like a translation for a long time (found by review, when the
    # loop stopped at step 64 on a steady drift), and converges.
    picard = solvers.Picard(TOL, TOL)
    sol = fp.fixed_point(
        lambda y, a: y - 0.5 * jnp.tanh(y), jnp.full(1, 100.0), None, solver=picard, throw=False
    )
    assert sol.result == fp.RESULTS.successful
    sol = fp.fixed_point(
        lambda z, a: jnp.tanh(z + 1e-4),
        jnp.zeros(1),
        None,
        solver=picard,
        throw=False,
        max_steps=20_000,
    )
    assert sol.result == fp.RESULTS.successful
    th = 0.003
    rot = jnp.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c = jnp.array([1.0, 0.0])
    sol = fp.fixed_point(
        lambda y, a: rot @ (y - c) + c,
        jnp.zeros(2),
        None,
        solver=solvers.Halpern(1e-4, 1e-4),
        throw=False,
        max_steps=100_000,
    )
    assert sol.result == fp.RESULTS.successful


def test_detection_is_not_proof():
    # The same descent with too small a budget ends during its drift: `infeasible`
    # replaces `max_steps_reached` (both failures), and the distance travelled says
    # how far a fixed point must be.
    sol = fp.fixed_point(
        lambda y, a: y - 0.5 * jnp.tanh(y),
        jnp.full(1, 100.0),
        None,
        solver=DETECTING["picard"],
        throw=False,
        max_steps=100,
    )
    assert sol.result == fp.RESULTS.infeasible
    # `min(y + 1, M)` has the fixed points y >= M; far below M it is a shift for
    # as long as the run can see, and is reported infeasible: the documented policy.
    sol = fp.fixed_point(
        lambda y, m: jnp.minimum(y + 1, m),
        jnp.zeros(1),
        1e6,
        solver=DETECTING["picard"],
        throw=False,
    )
    assert sol.result == fp.RESULTS.infeasible
    # A map with no fixed point whose displacement tends to 0 has `v = 0`: not
    # detected (and not converged: the residual must have fallen).
    sol = fp.fixed_point(
        lambda y, a: y + 1 / (1 + jnp.abs(y)),
        jnp.ones(1),
        None,
        solver=DETECTING["picard"],
        throw=False,
    )
    assert sol.result == fp.RESULTS.max_steps_reached


def test_other_solvers_and_root_find_do_not_detect():
    for solver in (solvers.Anderson(TOL, TOL), solvers.Broyden(TOL, TOL)):
        sol = fp.fixed_point(shift, jnp.zeros(2), jnp.ones(2), solver=solver, throw=False)
        assert sol.result != fp.RESULTS.infeasible
        assert "displacement" not in sol.stats
    sol = fp.root_find(
        lambda y, c: -c + 0 * y,
        jnp.zeros(2),
        jnp.ones(2),
        solver=DETECTING["picard"],
        throw=False,
    )
    assert sol.result != fp.RESULTS.infeasible


@pytest.mark.parametrize("max_steps", [1, 2, 9, 17, 32, 33])
def test_small_budgets(max_steps):
    # Three agreeing checks need checkpoints 16 and 32 before the last step.
    sol = fp.fixed_point(
        shift,
        jnp.zeros(2),
        jnp.ones(2),
        solver=DETECTING["picard"],
        throw=False,
        max_steps=max_steps,
    )
    expected = fp.RESULTS.infeasible if max_steps > 32 else fp.RESULTS.max_steps_reached
    assert sol.result == expected


def test_gradient_of_an_infeasible_solve_is_nan():
    # A failed solve is never differentiated into a plausible number.
    def loss(c):
        sol = fp.fixed_point(shift, jnp.zeros(2), c, solver=DETECTING["picard"], throw=False)
        return jnp.sum(sol.value)

    assert bool(jnp.all(jnp.isnan(jax.grad(loss)(jnp.ones(2)))))
