"""Layers whose equilibrium is unique by construction: `SubhomogeneousDEQ` (a
contraction in Thompson's metric for any weights) and `MonotoneDBM` (a strongly
convex mean-field free energy), and the proximal operators of the mean-field
nonlinearity the splitting solvers use for it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import directional_fd
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize, minimize_scalar

import fixpoint
from fixpoint import solvers
from fixpoint.layers import MonotoneDBM, SubhomogeneousDEQ, thompson_distance
from fixpoint.solvers import MeanField

# ---- the proximal operator of the mean-field nonlinearity ----------------------


def _negentropy(q):
    return np.sum(np.where(q > 0, q * np.log(np.maximum(q, 1e-300)), 0.0))


def _prox_objective_categorical(q, v, alpha):
    return alpha * (_negentropy(q) - 0.5 * q @ q) + 0.5 * np.sum((q - v) ** 2)


def _numerical_categorical_prox(v, alpha):
    k = len(v)
    res = minimize(
        _prox_objective_categorical,
        np.full(k, 1 / k),
        args=(v, alpha),
        method="SLSQP",
        bounds=[(1e-15, 1)] * k,
        constraints=[dict(type="eq", fun=lambda q: q.sum() - 1)],
        options=dict(ftol=1e-15, maxiter=2000),
    )
    return res.x / res.x.sum()  # SLSQP meets the constraint to ~1e-11 only


def _numerical_binary_prox(v, alpha):
    def objective(q):
        ent = q * np.log(q) + (1 - q) * np.log(1 - q)
        return alpha * (ent - 0.5 * q * q) + 0.5 * (q - v) ** 2

    return minimize_scalar(
        objective, bounds=(1e-15, 1 - 1e-15), method="bounded", options=dict(xatol=1e-14)
    ).x


_prox = jax.jit(lambda mf, v, alpha: mf.prox(v, alpha))


@pytest.mark.parametrize("alpha", [0.01, 0.3, 1.0, 2.5, 20.0])
def test_mean_field_prox_minimises_its_objective(alpha):
    """`MeanField.prox(v, α)` against a numerical minimisation of
    `α f(q) + ½‖q − v‖²` (SLSQP on the simplex, bounded scalar search), in float64;
    at `α = 1` it is the sigmoid / softmax itself."""
    rng = np.random.default_rng(0)
    mf = MeanField(3, 2, 4)
    for scale in (0.1, 1.0, 5.0, 30.0):
        v = rng.normal(size=mf.size) * scale
        q = np.asarray(_prox(mf, jnp.asarray(v), jnp.asarray(alpha)))
        qb, qg = mf.split(q)
        vb, vg = mf.split(v)
        for i in range(3):
            assert abs(qb[i] - _numerical_binary_prox(vb[i], alpha)) < 1e-6
        for g in range(2):
            reference = _numerical_categorical_prox(np.asarray(vg[g]), alpha)
            ours = np.asarray(qg[g])
            assert abs(ours.sum() - 1) < 1e-12
            # The minimiser is unique: ours is at least as low, and close.
            ours_value = _prox_objective_categorical(ours, vg[g], alpha)
            reference_value = _prox_objective_categorical(reference, vg[g], alpha)
            assert ours_value <= reference_value + 1e-13 * (1 + abs(reference_value))
            np.testing.assert_allclose(ours, reference, atol=1e-5)
    v = jnp.asarray(rng.normal(size=mf.size) * 4)
    at_one = _prox(mf, v, jnp.asarray(1.0))
    np.testing.assert_allclose(at_one, mf(v), atol=1e-15)
    # float32: the same answer to its precision, no NaN at large inputs.
    big = jnp.asarray(rng.normal(size=mf.size) * 80, jnp.float32)
    out32 = _prox(mf, big, jnp.asarray(alpha, jnp.float32))
    out64 = _prox(mf, big.astype(jnp.float64), jnp.asarray(alpha))
    np.testing.assert_allclose(out32, out64, atol=2e-5)


def test_mean_field_clamps_observed_variables_and_names_bad_input():
    observed = jnp.array([True, False, True])
    values = jnp.array([1.0, 0.2, 0.0, 0.0, 1.0])
    mf = MeanField(1, 2, 2, observed=observed, values=values)
    out = mf.prox(jnp.zeros(5), jnp.asarray(0.3))
    np.testing.assert_allclose(out[:1], 1.0)
    np.testing.assert_allclose(out[3:], [0.0, 1.0])
    np.testing.assert_allclose(out[1:3], [0.5, 0.5], atol=1e-12)
    with pytest.raises(ValueError, match="categories"):
        MeanField(1, 2, 1)
    with pytest.raises(ValueError, match="at least one unit"):
        MeanField(0, 0, 2)
    with pytest.raises(ValueError, match="together"):
        MeanField(1, 1, 2, observed=jnp.array([True, False]))
    with pytest.raises(ValueError, match=r"`observed` must be a boolean array of shape \(2,\)"):
        MeanField(1, 1, 2, observed=jnp.array([1, 0]), values=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`values` must be a float array of shape \(3,\)"):
        MeanField(1, 1, 2, observed=jnp.array([True, False]), values=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"state must have shape \(3,\)"):
        MeanField(1, 1, 2)(jnp.zeros(4))
    with pytest.raises(ValueError, match="`alpha` must be > 0"):
        MeanField(1, 1, 2).prox(jnp.zeros(3), 0.0)


def test_mean_field_prox_at_alpha_one_differentiates_like_sigma():
    mf = MeanField(2, 2, 3)
    v = jnp.linspace(-2.0, 3.0, mf.size)
    np.testing.assert_allclose(
        jax.jit(jax.jacrev(lambda v: mf.prox(v, 1.0)))(v), jax.jacrev(mf)(v), atol=1e-12
    )


# ---- the monotone Boltzmann machine -------------------------------------------

_DBM = MonotoneDBM(3, 4, 3, key=jax.random.key(0), dtype=jnp.float64)
_DBM = eqx.tree_at(
    lambda d: (d.A, d.bias),
    _DBM,
    (4 * _DBM.A, 2 * jax.random.normal(jax.random.key(1), (_DBM.size,), jnp.float64)),
)
_OBSERVED = jnp.array([True, False, False, True, False, False, False])
_VALUES = jnp.zeros(_DBM.size).at[0].set(1.0).at[3:6].set(jnp.array([0.0, 1.0, 0.0]))
_tight = _DBM.with_settings(solver=solvers.PeacemanRachford(1e-12, 1e-12), max_steps=2000)
_solve = eqx.filter_jit(lambda d, o, v, q0: d.solve(o, v, q0))


def _random_start(key, dbm):
    kb, kg = jax.random.split(key)
    qb = jax.random.uniform(kb, (dbm.binary,), jnp.float64)
    qg = jax.nn.softmax(3 * jax.random.normal(kg, (dbm.groups, dbm.categories), jnp.float64))
    return jnp.concatenate([qb, qg.ravel()])


def test_dbm_couplings_are_a_boltzmann_machine_and_monotone_for_any_weights():
    v = np.concatenate([np.arange(3), 3 + np.repeat(np.arange(4), 3)])
    same = v[:, None] == v[None, :]
    for scale in (0.1, 1.0, 30.0):
        dbm = eqx.tree_at(lambda d: d.A, _DBM, scale * _DBM.A)
        W = np.asarray(dbm.W())
        np.testing.assert_array_equal(W, W.T)
        assert np.all(W[same] == 0)  # no unit couples to its own variable
        eig = np.linalg.eigvalsh(np.eye(dbm.size) - W)
        assert eig[0] >= dbm.m - 1e-12
        assert bool(dbm.is_monotone())
        # The rescaling touches only variables above the bound.
        a, a_hat = np.asarray(dbm.A), np.asarray(dbm.factor())
        norms = np.linalg.norm(a[:, :3], axis=0) ** 2
        np.testing.assert_allclose(a_hat[:, :3][:, norms <= 0.9], a[:, :3][:, norms <= 0.9])


@pytest.mark.parametrize("evidence", [False, True])
def test_dbm_mean_field_fixed_point_is_unique_and_minimises_the_free_energy(evidence):
    observed, values = (_OBSERVED, _VALUES) if evidence else (None, None)
    for scale in (30.0, 1.0):  # any weights; the last one is checked further below
        dbm = eqx.tree_at(lambda d: d.A, _tight, scale * _tight.A)
        answers = [
            _solve(dbm, observed, values, _random_start(jax.random.key(k), dbm)) for k in range(6)
        ]
        for sol in answers:
            assert sol.result == fixpoint.RESULTS.successful
            np.testing.assert_allclose(sol.value, answers[0].value, atol=1e-10)
    q = answers[0].value
    # The mean-field equations, with the evidence clamped.
    sigma = _tight.nonlinearity(observed, values)
    np.testing.assert_allclose(sigma(_tight.W() @ q + _tight.bias), q, atol=1e-11)
    if evidence:
        np.testing.assert_allclose(q[0], 1.0)
        np.testing.assert_allclose(q[3:6], [0.0, 1.0, 0.0])
    else:
        # Numerically minimise the free energy over the product of simplices
        # (binary means by a sigmoid, groups by a softmax): the same point.
        def energy(theta):
            qb = jax.nn.sigmoid(theta[:3])
            qg = jax.nn.softmax(theta[3:].reshape(4, 3), axis=-1)
            return _tight.free_energy(jnp.concatenate([qb, qg.ravel()]))

        fun = jax.jit(jax.value_and_grad(energy))
        res = minimize(
            lambda t: [np.asarray(a) for a in fun(jnp.asarray(t))],
            np.zeros(15),
            jac=True,
            method="BFGS",
            options=dict(gtol=1e-12),
        )
        qb = jax.nn.sigmoid(res.x[:3])
        qg = jax.nn.softmax(res.x[3:].reshape(4, 3), axis=-1)
        np.testing.assert_allclose(jnp.concatenate([qb, qg.ravel()]), q, atol=1e-6)
        assert float(_tight.free_energy(q)) <= res.fun + 1e-12


def test_dbm_solvers_agree_and_prox_steps_are_used():
    """Peaceman–Rachford at α = 1 (softmax steps) and α = 0.4, and forward–backward
    (its default small step: the proximal operator at α ≠ 1) give one answer."""
    reference = _solve(_tight, _OBSERVED, _VALUES, None).value
    for solver in (
        solvers.PeacemanRachford(1e-11, 1e-11, alpha=0.4),
        solvers.ForwardBackward(1e-11, 1e-11),
    ):
        dbm = _tight.with_settings(solver=solver, max_steps=20_000)
        sol = _solve(dbm, _OBSERVED, _VALUES, None)
        assert sol.result == fixpoint.RESULTS.successful
        np.testing.assert_allclose(sol.value, reference, atol=1e-9)


def _dense_implicit_grad(dbm, observed, values, q):
    """d(sum(sin q))/d(bias) by the implicit function theorem, densely."""
    sigma = dbm.nonlinearity(observed, values)
    W = dbm.W()
    jac_q = jax.jacfwd(lambda z: sigma(W @ z + dbm.bias))(q)
    jac_b = jax.jacfwd(lambda b: sigma(W @ q + b))(dbm.bias)
    cot = jnp.cos(q)
    return jnp.linalg.solve((jnp.eye(q.size) - jac_q).T, cot) @ jac_b


def test_dbm_gradients_match_finite_differences_and_a_dense_solve():
    def loss(params):
        a, bias, values = params
        dbm = eqx.tree_at(lambda d: (d.A, d.bias), _tight, (a, bias))
        return jnp.sum(jnp.sin(dbm(_OBSERVED, values)))

    params = (_tight.A, _tight.bias, _VALUES)
    grad = jax.jit(jax.grad(loss))(params)
    flat, unravel = ravel_pytree(params)
    directional_fd(lambda p: loss(unravel(p)), flat, ravel_pytree(grad)[0])
    q = _tight(_OBSERVED, _VALUES)
    np.testing.assert_allclose(
        grad[1], _dense_implicit_grad(_tight, _OBSERVED, _VALUES, q), atol=1e-9
    )


def test_dbm_vmap_and_jit_equal_single_calls_and_bad_input_is_named():
    observed = jnp.stack([_OBSERVED, ~_OBSERVED, jnp.zeros_like(_OBSERVED)])
    values = jnp.stack([_VALUES, _VALUES, _VALUES])
    batched = jax.vmap(lambda o, v: _DBM.solve(o, v))(observed, values)
    for i in range(3):
        single = _DBM.solve(observed[i], values[i])
        np.testing.assert_allclose(batched.value[i], single.value, atol=1e-12)
        assert int(batched.stats["num_steps"][i]) == int(single.stats["num_steps"])
    with pytest.raises(ValueError, match=r"`m` must lie in \(0, 1\)"):
        MonotoneDBM(2, 1, 2, m=1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="categories"):
        MonotoneDBM(2, 1, 1, key=jax.random.key(0))
    with pytest.raises(TypeError, match="PeacemanRachford"):
        MonotoneDBM(2, 1, 2, solver=solvers.Picard(1e-3, 1e-3), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`observed` must be a boolean array of shape \(7,\)"):
        _DBM.solve(jnp.ones(6, bool), _VALUES)
    with pytest.raises(TypeError, match="dtype"):
        _DBM.solve(_OBSERVED, _VALUES.astype(jnp.float32))
    with pytest.raises(TypeError, match="nonlinearity"):
        solvers.PeacemanRachford(1e-3, 1e-3).solve(
            _DBM.operator(), _DBM.bias, nonlinearity=jax.nn.softmax
        )


def test_dbm_failed_solve_reports_its_result_and_only_its_gradient_is_nan():
    dbm = _DBM.with_settings(max_steps=2, throw=False)
    sol = dbm.solve(_OBSERVED, _VALUES)
    assert sol.result == fixpoint.RESULTS.max_steps_reached
    with pytest.raises(fixpoint.SolveError):
        _DBM.with_settings(max_steps=2).solve(_OBSERVED, _VALUES)
    # In a batch (compacted), a sample that fails gets NaN derivatives, the others
    # finite ones: the loop's result code decides, not a re-check of the point.
    # Half the batch starts at its answer (converged at once), half from the
    # default start (not within 3 steps).
    hard = _DBM.with_settings(max_steps=3, throw=False)
    answer = _tight.solve(_OBSERVED, _VALUES).value
    observed = jnp.stack([_OBSERVED] * 6)
    values = jnp.stack([_VALUES] * 6)
    q0 = jnp.stack([answer, _tight.nonlinearity(_OBSERVED, _VALUES)(jnp.zeros(_DBM.size))] * 3)
    sols = jax.vmap(hard.solve)(observed, values, q0)
    failed = np.asarray(sols.result != fixpoint.RESULTS.successful)
    np.testing.assert_array_equal(failed, [False, True] * 3)
    grads = jax.grad(lambda v: jnp.sum(jax.vmap(hard)(observed, v, q0) ** 2))(values)
    per_sample_nan = np.asarray(jnp.isnan(grads).any(axis=1))
    np.testing.assert_array_equal(per_sample_nan, failed)


def test_dbm_with_one_kind_of_unit():
    for sizes in ((6, 0, 2), (0, 3, 4)):
        dbm = MonotoneDBM(*sizes, key=jax.random.key(0), dtype=jnp.float64)
        sol = dbm.solve()
        assert sol.result == fixpoint.RESULTS.successful
        assert bool(dbm.is_monotone())
    with pytest.raises(ValueError, match=r"state must have shape \(12,\)"):
        dbm.free_energy(jnp.zeros(5))


# ---- the subhomogeneous DEQ ----------------------------------------------------

_SUB = SubhomogeneousDEQ(
    5,
    12,
    key=jax.random.key(3),
    dtype=jnp.float64,
    solver=solvers.Picard(0.0, 1e-12),
    max_steps=500,
)
_X = jax.random.normal(jax.random.key(4), (5,), jnp.float64)
_sub_solve = eqx.filter_jit(lambda d, x, z0: d.solve(x, z0))


def _scaled(deq, scale):
    return eqx.tree_at(lambda d: d.f.weight, deq, scale * deq.f.weight)


def test_subhomogeneous_map_is_subhomogeneous_for_any_weights():
    """`|F'(z)| z ≤ μ F(z)` entrywise at random positive points, weights of any scale."""
    for scale in (0.1, 10.0, 1000.0):
        f = _scaled(_SUB, scale).f
        for k in range(5):
            z = jnp.exp(2 * jax.random.normal(jax.random.key(k), (12,), jnp.float64))
            jac = jax.jacfwd(f)(z, _X)
            assert bool(jnp.all(jnp.abs(jac) @ z <= f.mu * f(z, _X) * (1 + 1e-12)))
            assert bool(jnp.all(f(z, _X) >= 1))


def test_subhomogeneous_fixed_point_is_unique_from_every_start_at_every_scale():
    for scale in (1.0, 100.0, 10_000.0):
        deq = _scaled(_SUB, scale)
        ref = _sub_solve(deq, _X, None)
        assert ref.result == fixpoint.RESULTS.successful
        for k in range(5):
            z0 = jnp.exp(4 * jax.random.normal(jax.random.key(10 + k), (12,), jnp.float64))
            z0 = z0 if k else -z0  # also a start outside the cone
            sol = _sub_solve(deq, _X, z0)
            assert sol.result == fixpoint.RESULTS.successful
            assert float(thompson_distance(sol.value, ref.value)) < 1e-10
        # The a-posteriori bound holds against a far more accurate answer.
        loose = deq.with_settings(solver=solvers.Picard(0.0, 1e-3))
        z = _sub_solve(loose, _X, None).value
        assert float(thompson_distance(z, ref.value)) <= float(deq.error_bound(_X, z))


def test_subhomogeneous_contracts_at_rate_mu_in_thompsons_metric():
    deq = _scaled(_SUB, 50.0)
    z_star = _sub_solve(deq, _X, None).value
    z = jnp.full((12,), 1e-3, jnp.float64)
    d0 = float(thompson_distance(z, z_star))
    for k in range(1, 8):
        z = deq.f(z, _X)
        assert float(thompson_distance(z, z_star)) <= deq.mu**k * d0 * (1 + 1e-9)


def test_subhomogeneous_gradients_match_finite_differences_and_unrolling():
    def loss(deq, x):
        return jnp.sum(jnp.sin(deq(x)))

    params, static = eqx.partition(_SUB, eqx.is_array)
    fn = lambda p, x: loss(eqx.combine(p, static), x)
    grad = jax.jit(jax.grad(fn, argnums=(0, 1)))(params, _X)
    flat, unravel = ravel_pytree((params, _X))
    directional_fd(lambda p: fn(*unravel(p)), flat, ravel_pytree(grad)[0])
    unrolled = _SUB.with_settings(adjoint=fixpoint.UnrolledAdjoint())
    grad_u = jax.jit(jax.grad(loss, argnums=(0, 1)))(unrolled, _X)
    for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_u), strict=True):
        np.testing.assert_allclose(g, u, atol=1e-9, rtol=1e-8)


def test_subhomogeneous_vmap_jit_and_bad_options():
    xs = jax.random.normal(jax.random.key(5), (3, 5), jnp.float64)
    batched = jax.vmap(_SUB)(xs)
    for i in range(3):
        np.testing.assert_allclose(batched[i], _SUB(xs[i]), atol=1e-12)
    assert _SUB.mu == 0.5
    with pytest.raises(ValueError, match=r"`mu` must lie in \(0, 1\)"):
        SubhomogeneousDEQ(2, 3, mu=1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="hidden_size"):
        SubhomogeneousDEQ(2, 0, key=jax.random.key(0))
    sol = _SUB.with_settings(max_steps=2, throw=False).solve(_X)
    assert sol.result == fixpoint.RESULTS.max_steps_reached
    with pytest.raises(ValueError, match="dropout"):
        _SUB.with_settings(dropout=0.1)
    assert _SUB.with_settings(solver=None).solver == solvers.Picard(0.0, 1e-4)


def test_subhomogeneous_large_weights_and_degree_near_one():
    """The residual is Thompson's distance, which never grows: no divergence alarm
    while `z` grows towards a large fixed point; an overflow is `nonfinite`."""
    x = jnp.ones(5)
    for mu, scale in ((0.8, 64.0), (0.9, 16.0), (0.5, 1e6)):
        deq = SubhomogeneousDEQ(
            5, 16, mu=mu, max_steps=300, key=jax.random.key(0), dtype=jnp.float32
        )
        deq = _scaled(deq, scale)
        x32 = x.astype(jnp.float32)
        sol = deq.solve(x32)
        assert sol.result == fixpoint.RESULTS.successful
        assert float(sol.stats["residual"]) < 1e-4
        assert float(deq.error_bound(x32, sol.value)) < 1e-4 / (1 - mu) * 1.01
    deq = SubhomogeneousDEQ(5, 16, mu=0.9, throw=False, key=jax.random.key(0), dtype=jnp.float32)
    assert _scaled(deq, 1e5).solve(x.astype(jnp.float32)).result == fixpoint.RESULTS.nonfinite
