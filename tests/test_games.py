"""Games: best responses in every order, the contraction estimate, the small-gain
certificate, and iterative water-filling with its known equilibrium."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import finite_difference_grad

import fixpoint
from fixpoint import datasets, solvers

ORDERS = ("simultaneous", "sequential", "random")


def _two_user_game():
    # The known answer: σ² = 1, P = 2, G_11 = G_22 = 1, G_21 = (0.5, 0)
    # (transmitter 2 into receiver 1), G_12 = (0, 0.5).
    gains = jnp.array(
        [
            [[1.0, 1.0], [0.0, 0.5]],  # from transmitter 1: into 1, into 2
            [[0.5, 0.0], [1.0, 1.0]],  # from transmitter 2: into 1, into 2
        ]
    )
    return datasets.InterferenceGame(gains=gains, noise=jnp.ones((2, 2)), power=jnp.full(2, 2.0))


@pytest.mark.parametrize("order", ORDERS)
def test_water_filling_reaches_the_known_equilibrium(order):
    game = _two_user_game()
    sol = fixpoint.fixed_point(
        game.responses(), game.start(), solver=solvers.BestResponse(1e-12, 1e-12, order=order)
    )
    np.testing.assert_allclose(sol.value[0], [2 / 3, 4 / 3], atol=1e-10)
    np.testing.assert_allclose(sol.value[1], [4 / 3, 2 / 3], atol=1e-10)


def _solve(game, order, fn=None, **kw):
    return fixpoint.fixed_point(
        game.responses() if fn is None else fn,
        game.start(),
        solver=solvers.BestResponse(1e-10, 1e-10, order=order, **kw),
        max_steps=500,
    )


def test_every_order_the_same_equilibrium_and_gauss_seidel_no_slower():
    game = datasets.interference_game(jax.random.PRNGKey(0), 5, 8, cross=0.05)
    assert float(jnp.max(jnp.abs(jnp.linalg.eigvals(game.interference_ratios())))) < 1
    sols = {order: _solve(game, order) for order in ORDERS}
    for order in ORDERS[1:]:
        for a, b in zip(sols[order].value, sols["simultaneous"].value, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-8)
    steps = {order: int(s.stats["num_steps"]) for order, s in sols.items()}
    assert steps["sequential"] <= steps["simultaneous"], steps
    # The plain (whole) fn gives the same sweeps as the per-block form.
    whole = _solve(game, "sequential", fn=lambda p, a: game.responses()(p, a))
    assert int(whole.stats["num_steps"]) == steps["sequential"]
    # Under vmap (a batch of starting points), the random order per sample.
    starts = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), game.start())
    batched = jax.vmap(
        lambda p0: (
            fixpoint.fixed_point(
                game.responses(), p0, solver=solvers.BestResponse(1e-10, 1e-10, order="random")
            ).value
        )
    )(starts)
    np.testing.assert_allclose(batched[0][1], sols["simultaneous"].value[0], atol=1e-8)


def test_the_implicit_gradient_of_the_equilibrium():
    game = _two_user_game()

    def total_power_on_channel_0(noise):
        g = datasets.InterferenceGame(game.gains, noise, game.power)
        sol = fixpoint.fixed_point(
            g.responses(), g.start(), solver=solvers.BestResponse(1e-12, 1e-12, order="sequential")
        )
        return sol.value[0][0] + 3 * sol.value[1][0]

    grad = jax.grad(total_power_on_channel_0)(game.noise)
    fd = finite_difference_grad(total_power_on_channel_0, game.noise)
    np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_the_small_gain_certificate_known_numbers():
    mu, coupling = jnp.array([1.0, 1.0]), jnp.array([[0.0, 10.0], [0.05, 0.0]])
    cert = fixpoint.small_gain_certificate(mu, coupling)
    np.testing.assert_allclose(cert.euclidean_margin, -4.025, rtol=1e-12)
    np.testing.assert_allclose(cert.margin, 1 - np.sqrt(0.5), rtol=1e-10)
    np.testing.assert_allclose(cert.weights[1] / cert.weights[0], 200.0, rtol=1e-10)
    assert bool(cert.certified) and not cert.local
    given = fixpoint.small_gain_certificate(mu, coupling, weights=jnp.array([1.0, 200.0]))
    np.testing.assert_allclose(given.margin, 1 - np.sqrt(0.5), rtol=1e-10)
    assert np.isnan(cert.step_size)  # no own-block Lipschitz constants given
    lip = fixpoint.small_gain_certificate(mu, coupling, lipschitz=jnp.ones(2))
    assert 0 < float(lip.step_size) and 0 < float(lip.rate) < 1


def test_the_certificate_for_more_players_is_the_m_matrix_condition():
    # Three players in a cycle: certified exactly when ρ(L / μ) < 1.
    for gain, expect in ((2.0, True), (3.0, False)):
        coupling = jnp.array([[0, gain, 0.1], [0.1, 0, gain], [0.05, 0.1, 0]])
        rho = float(jnp.max(jnp.abs(jnp.linalg.eigvals(coupling))))
        cert = fixpoint.small_gain_certificate(jnp.ones(3), coupling)
        assert bool(cert.certified) == expect == (rho < 1), (gain, rho, cert.margin)


def test_water_filling_certificate_matches_scutaris_condition_and_its_step_converges():
    for seed, cross in ((0, 0.05), (1, 0.6)):
        game = datasets.interference_game(jax.random.PRNGKey(seed), 4, 6, cross=cross)
        rho = float(jnp.max(jnp.abs(jnp.linalg.eigvals(game.interference_ratios()))))
        cert = fixpoint.small_gain_certificate(game.constants())
        assert bool(cert.certified) == (rho < 1), (rho, cert.margin)
        if rho < 1:
            sol = _solve(game, "simultaneous", damping=float(cert.step_size))
            assert sol.result == fixpoint.RESULTS.successful
    local = fixpoint.game_constants(game.responses(), game.start())
    assert local.local and fixpoint.small_gain_certificate(local).local


def test_contraction_estimate_of_a_linear_map_is_its_spectral_radius():
    a = jax.random.normal(jax.random.PRNGKey(3), (6, 6)) / 3
    true = float(jnp.max(jnp.abs(jnp.linalg.eigvals(a))))
    est = fixpoint.contraction_estimate(lambda y, args: a @ y, jnp.ones(6), iterations=400)
    # Gelfand's mean converges like 1/iterations.
    np.testing.assert_allclose(est.rate, true, rtol=1e-2)
    # A dominant eigenvalue set apart (here -0.8 against at most 0.5): found exactly.
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(4), (6, 6)))
    b = q @ jnp.diag(jnp.array([-0.8, 0.5, 0.4, -0.3, 0.2, 0.1])) @ q.T
    est = fixpoint.contraction_estimate(lambda y, args: b @ y, jnp.ones(6))
    np.testing.assert_allclose(est.eigenvalue, -0.8, rtol=1e-8)
    np.testing.assert_allclose(est.rate, 0.8, rtol=1e-2)
    # An oscillating map (eigenvalue -1.5): damping makes it contract.
    flip = fixpoint.contraction_estimate(
        lambda y, args: jax.tree.map(lambda v: -1.5 * v, y), {"a": jnp.ones(3)}
    )
    np.testing.assert_allclose(flip.rate, 1.5, rtol=1e-6)
    np.testing.assert_allclose(flip.damping, 0.4, rtol=1e-6)
    sol = fixpoint.fixed_point(
        lambda y, args: 1.0 - 1.5 * y,
        jnp.zeros(3),
        solver=solvers.Picard(1e-10, 1e-10, damping=float(flip.damping)),
    )
    np.testing.assert_allclose(sol.value, 0.4, atol=1e-9)
    # A real eigenvalue above one: no damping helps.
    assert np.isnan(fixpoint.contraction_estimate(lambda y, a: 2 * y, jnp.ones(2)).damping)


def test_bad_options_and_states_are_named():
    with pytest.raises(ValueError, match="order"):
        solvers.BestResponse(1e-6, 1e-6, order="jacobi")
    with pytest.raises(ValueError, match="damping"):
        solvers.BestResponse(1e-6, 1e-6, damping=0.0)
    with pytest.raises(TypeError, match="tuple, list or dict of blocks"):
        fixpoint.fixed_point(
            lambda y, a: y / 2, jnp.ones(3), solver=solvers.BestResponse(1e-6, 1e-6)
        )
    with pytest.raises(TypeError, match="callable"):
        fixpoint.Blockwise((lambda y, a: y[0], 3))
    with pytest.raises(ValueError, match="Blockwise"):
        fixpoint.fixed_point(
            fixpoint.Blockwise((lambda y, a: y[1], lambda y, a: jnp.ones(4))),
            (jnp.ones(2), jnp.ones(2)),
            solver=solvers.Picard(1e-6, 1e-6),
        )
    with pytest.raises(ValueError, match="weights"):
        fixpoint.small_gain_certificate(jnp.ones(2), jnp.eye(2), weights=jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="iterations"):
        fixpoint.contraction_estimate(lambda y, a: y, jnp.ones(2), iterations=1)


def test_edge_cases_found_in_review():
    # One-sided coupling: certified (the best weight is a limit; the M-matrix start
    # finds a certifying one).
    one_sided = fixpoint.small_gain_certificate(jnp.ones(2), jnp.array([[0, 10.0], [0, 0]]))
    assert bool(one_sided.certified) and float(one_sided.margin) > 0.5
    # A NaN constant is never certified; nor a singular boundary case (ρ(Γ) = 1).
    assert not bool(
        fixpoint.small_gain_certificate(jnp.array([1, jnp.nan]), jnp.zeros((2, 2))).certified
    )
    ring = jnp.array([[0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    assert not bool(fixpoint.small_gain_certificate(jnp.ones(3), ring).certified)
    # Lists and integers are accepted as constants.
    assert bool(
        fixpoint.small_gain_certificate([1, 1], [[0, 0], [0, 0]], weights=[0.5, 0.5]).certified
    )
    # A dead channel (infinite level) gets no power; widely spread levels.
    np.testing.assert_allclose(
        datasets.water_filling(jnp.array([0.0, 10.0, jnp.inf]), 1.0), [1, 0, 0]
    )
    np.testing.assert_allclose(
        datasets.water_filling(jnp.array([0.0, 0.5, 1e300]), 2.0), [1.25, 0.75, 0]
    )
    # An OrderedDict state (flattened in insertion order) and a namedtuple state.
    from collections import OrderedDict, namedtuple

    def shrink(y, args):
        return 0.5 * y["a"][:1] + 0.1

    y0 = OrderedDict(b=jnp.ones(1), a=jnp.ones(3))
    fn = fixpoint.Blockwise(OrderedDict(b=shrink, a=lambda y, args: 0.9 * jnp.resize(y["b"], 3)))
    for order in ORDERS:
        sol = fixpoint.fixed_point(fn, y0, solver=solvers.BestResponse(1e-12, 1e-12, order=order))
        np.testing.assert_allclose(sol.value["b"], 0.1 / (1 - 0.45), rtol=1e-9)
    pair = namedtuple("pair", "u v")
    fn = fixpoint.Blockwise((lambda y, a: 0.5 * y.v, lambda y, a: 0.5 * y.u + 1.0))
    sol = fixpoint.fixed_point(
        fn,
        pair(jnp.zeros(2), jnp.zeros(2)),
        solver=solvers.BestResponse(1e-12, 1e-12, order="sequential"),
    )
    np.testing.assert_allclose(sol.value.v, 4 / 3, rtol=1e-9)
