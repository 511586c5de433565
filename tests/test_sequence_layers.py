"""`FixedPointRNN` and `ImplicitSSM`: fixed points in depth, parallel scans in time,
and the group word problems they are trained on."""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import directional_fd
from jax.flatten_util import ravel_pytree

import fixpoint
from fixpoint import datasets, solvers
from fixpoint.layers import FixedPointRNN, ImplicitSSM

T, N_IN, HIDDEN = 12, 3, 4
_XS = jax.random.normal(jax.random.key(1), (T, N_IN), jnp.float64)
# A strong mixer (weights x30), so `(I - Q_t)^{-1}` is far from the identity.
_RNN = FixedPointRNN(
    N_IN,
    HIDDEN,
    solver=solvers.Picard(1e-12, 1e-12),
    max_steps=400,
    dtype=jnp.float64,
    key=jax.random.key(0),
)
_RNN = eqx.tree_at(lambda r: r.f.mixer_weight, _RNN, 30 * _RNN.f.mixer_weight)


def _halve_mixer(f):
    return eqx.tree_at(lambda m: m.mixer_weight, f, f.mixer_weight / 2)


def _dense_recurrence(rnn, xs):
    """`h_t = (I - Q_t)^{-1} (Λ_t h_{t-1} + B x_t + b)` by `lax.scan` and a dense solve."""
    c = rnn.coefficients(xs)
    eye = jnp.eye(rnn.hidden_size, dtype=xs.dtype)

    def step(h, coeffs):
        decay, mixer, drive = coeffs
        h = jnp.linalg.solve(eye - mixer, decay * h + drive)
        return h, h

    return jax.lax.scan(step, jnp.zeros(rnn.hidden_size, xs.dtype), (c.decay, c.mixer, c.drive))[1]


def test_fixed_point_rnn_equals_the_dense_linear_recurrence():
    sol = _RNN.solve(_XS)
    assert sol.result == fixpoint.RESULTS.successful
    np.testing.assert_allclose(sol.value, _dense_recurrence(_RNN, _XS), atol=1e-10)
    c = _RNN.coefficients(_XS)
    # The mixer is strong here, and bounded for any weights.
    norms = jnp.linalg.norm(c.mixer, ord=2, axis=(1, 2))
    assert 0.5 < float(norms.max()) < _RNN.f.mixer_bound
    # Huge weights: Q_t tends to c M / ‖M‖_F (no overflow to zero).
    for scale in (1e4, 1e200):
        huge = eqx.tree_at(lambda r: r.f.mixer_weight, _RNN, scale * _RNN.f.mixer_weight)
        frob = jnp.linalg.norm(huge.coefficients(_XS).mixer, axis=(1, 2))
        np.testing.assert_allclose(frob, 0.9, rtol=1e-6)
    # `normalise` (a setting of every DEQ) is applied to the weights before a solve.
    halved = _RNN.with_settings(normalise=_halve_mixer)
    np.testing.assert_allclose(
        halved.coefficients(_XS).mixer,
        eqx.tree_at(lambda r: r.f.mixer_weight, _RNN, _RNN.f.mixer_weight / 2)
        .coefficients(_XS)
        .mixer,
    )
    assert float(jnp.abs(c.decay).max()) < 1
    # From zeros, the first iteration is the diagonal RNN (the mixer acts on zeros).
    one = _RNN.with_settings(max_steps=1, throw=False).solve(_XS).value
    diagonal = fixpoint.internal.linear_recurrence(fixpoint.internal.Time(), c.decay, c.drive)
    np.testing.assert_allclose(one, diagonal, atol=1e-12)
    # A warm start at the answer converges at once.
    assert int(_RNN.solve(_XS, sol.value).stats["num_steps"]) <= 1


def test_fixed_point_rnn_far_from_normal_is_reported_and_anderson_solves_it():
    """`Q_t ≈ −0.9 I` and `Λ_t ≈ 0.995`: the iteration's spectral radius is 0.9, but
    its error first grows by orders of magnitude. Plain iteration reports it (never
    a wrong answer); Anderson solves it."""
    rnn = FixedPointRNN(1, 2, throw=False, dtype=jnp.float64, key=jax.random.key(0))
    rnn = eqx.tree_at(
        lambda r: (r.f.mixer_weight, r.f.mixer_bias, r.f.decay_weight, r.f.decay_bias),
        rnn,
        (
            jnp.zeros((4, 1), jnp.float64),
            -1e3 * jnp.eye(2, dtype=jnp.float64).reshape(-1),
            jnp.zeros((2, 1), jnp.float64),
            jnp.full((2,), 3.0, jnp.float64),
        ),
    )
    xs = jnp.ones((16, 1), jnp.float64)
    picard = rnn.solve(xs)
    assert picard.result != fixpoint.RESULTS.successful
    anderson = rnn.with_settings(solver=solvers.Anderson(1e-10, 1e-10)).solve(xs)
    assert anderson.result == fixpoint.RESULTS.successful
    np.testing.assert_allclose(anderson.value, _dense_recurrence(rnn, xs), atol=1e-8)


def _rnn_loss(rnn, xs):
    return jnp.sum(jnp.sin(rnn(xs)))


def test_fixed_point_rnn_gradients_match_finite_differences_and_the_dense_recurrence():
    params, static = eqx.partition(_RNN, eqx.is_array)
    fn = lambda p, xs: _rnn_loss(eqx.combine(p, static), xs)
    grad = jax.jit(jax.grad(fn, argnums=(0, 1)))(params, _XS)
    flat, unravel = ravel_pytree((params, _XS))
    directional_fd(lambda p: fn(*unravel(p)), flat, ravel_pytree(grad)[0], directions=3)
    dense = jax.grad(
        lambda p, xs: jnp.sum(jnp.sin(_dense_recurrence(eqx.combine(p, static), xs))),
        argnums=(0, 1),
    )(params, _XS)
    for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(dense), strict=True):
        np.testing.assert_allclose(g, d, atol=1e-9, rtol=1e-8)


_SSM = ImplicitSSM(
    4,
    3,
    solver=solvers.Anderson(1e-12, 1e-12),
    max_steps=200,
    dtype=jnp.float64,
    key=jax.random.key(2),
)
# A feedback of 0.4 (not the initial 0.1): the fixed point is far from one pass.
_SSM = eqx.tree_at(lambda s: s.f.feedback, _SSM, jnp.full(4, 0.4, jnp.float64))
_SEQ = jax.random.normal(jax.random.key(3), (10, 4), jnp.float64)


def test_implicit_ssm_satisfies_its_fixed_point_equation_and_differs_from_one_pass():
    sol = _SSM.solve(_SEQ)
    assert sol.result == fixpoint.RESULTS.successful
    z = sol.value
    np.testing.assert_allclose(_SSM.f(z, _SEQ), z, atol=1e-9)
    one_pass = _SSM.diagonal(_SEQ)
    np.testing.assert_allclose(one_pass, _SSM.f(jnp.zeros_like(_SEQ), _SEQ), atol=0)
    assert float(jnp.abs(one_pass - z).max()) > 1e-2
    # Causal in time: changing the last input leaves the earlier outputs alone.
    later = _SSM(_SEQ.at[-1].add(1.0))
    np.testing.assert_allclose(later[:-1], z[:-1], atol=1e-9)
    # Mamba's decays in (0, 1) instead of the signed (-1, 1): another layer.
    unsigned = ImplicitSSM(
        4,
        3,
        solver=_SSM.solver,
        max_steps=200,
        signed=False,
        dtype=jnp.float64,
        key=jax.random.key(2),
    )
    unsigned = eqx.tree_at(lambda s: s.f.feedback, unsigned, _SSM.f.feedback)
    other = unsigned.solve(_SEQ)
    assert other.result == fixpoint.RESULTS.successful
    np.testing.assert_allclose(unsigned.f(other.value, _SEQ), other.value, atol=1e-9)
    assert float(jnp.abs(other.value - z).max()) > 1e-2


def test_implicit_ssm_gradients_match_finite_differences_and_unrolling():
    params, static = eqx.partition(_SSM, eqx.is_array)
    loss = lambda ssm, xs: jnp.sum(jnp.sin(ssm(xs)))
    fn = lambda p, xs: loss(eqx.combine(p, static), xs)
    grad = jax.jit(jax.grad(fn, argnums=(0, 1)))(params, _SEQ)
    flat, unravel = ravel_pytree((params, _SEQ))
    # eps 1e-5: the solves are accurate to about 1e-12, so the differences to 1e-7.
    directional_fd(lambda p: fn(*unravel(p)), flat, ravel_pytree(grad)[0], directions=3, eps=1e-5)
    # Unrolled plain iteration (differentiating through Anderson's least squares
    # is not a stable second method).
    unrolled = _SSM.with_settings(
        solver=solvers.Picard(1e-13, 1e-13), adjoint=fixpoint.UnrolledAdjoint(), max_steps=400
    )
    grad_u = jax.jit(jax.grad(loss, argnums=(0, 1)))(unrolled, _SEQ)
    for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_u), strict=True):
        np.testing.assert_allclose(g, u, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("layer", ["rnn", "ssm"])
def test_vmap_and_jit_equal_single_calls(layer):
    net, xs = (_RNN, _XS) if layer == "rnn" else (_SSM, _SEQ)
    batch = jnp.stack([xs, 0.5 * xs, -xs])
    sols = jax.vmap(net.solve)(batch)
    jitted = eqx.filter_jit(lambda n, x: n.solve(x))
    for i in range(3):
        single = net.solve(batch[i])
        np.testing.assert_allclose(sols.value[i], single.value, atol=1e-10)
        assert int(sols.stats["num_steps"][i]) == int(single.stats["num_steps"])
        np.testing.assert_allclose(jitted(net, batch[i]).value, single.value, atol=1e-12)


def test_a_solve_that_does_not_converge_reports_it():
    for net, xs in ((_RNN, _XS), (_SSM, _SEQ)):
        sol = net.with_settings(max_steps=2, throw=False).solve(xs)
        assert sol.result == fixpoint.RESULTS.max_steps_reached
        assert int(sol.stats["num_steps"]) == 2
        with pytest.raises(fixpoint.SolveError, match="max_steps_reached"):
            net.with_settings(max_steps=2).solve(xs)
    # A small budget in training (approximate fixed points, as in the implicit-SSM
    # paper): a sequence that failed is masked out of the loss by its result code
    # and contributes exactly zero; the others their gradients.
    # The second sequence starts at its answer (converged at once), the first cold.
    budget = _SSM.with_settings(max_steps=6, throw=False)
    batch = jnp.stack([_SEQ, _SEQ])
    z0 = jnp.stack([jnp.zeros_like(_SEQ), _SSM(_SEQ)])

    def masked(xs):
        sols = jax.vmap(budget.solve)(xs, z0)
        ok = sols.result == fixpoint.RESULTS.successful
        return jnp.sum(jnp.where(ok, jnp.sum(jnp.sin(sols.value), axis=(1, 2)), 0)), ok

    g, ok = jax.grad(masked, has_aux=True)(batch)
    np.testing.assert_array_equal(ok, [False, True])
    assert bool(jnp.isfinite(g).all()) and bool((g[0] == 0).all()) and bool((g[1] != 0).any())


def test_bad_shapes_and_options_are_named():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"`xs` must have shape \(T, 3\).*jax.vmap"):
        _RNN(jnp.stack([_XS, _XS]))
    with pytest.raises(ValueError, match=r"`xs` must have shape \(T, 4\)"):
        _SSM(jnp.ones((5, 3)))
    with pytest.raises(TypeError, match="`xs` must be a floating-point array"):
        _RNN(jnp.ones((5, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"`z0` must have shape \(12, 4\)"):
        _RNN.solve(_XS, jnp.zeros((12, 3)))
    with pytest.raises(ValueError, match=r"ImplicitSSM: `z0` must have shape \(10, 4\)"):
        _SSM.solve(_SEQ, jnp.zeros((9, 4)))
    with pytest.raises(TypeError, match="`z0` must be an array of dtype float64"):
        _SSM.solve(_SEQ, jnp.zeros((10, 4), jnp.float32))
    with pytest.raises(TypeError, match="`xs` has dtype float32, the layer's parameters float64"):
        _RNN(_XS.astype(jnp.float32))
    with pytest.raises(TypeError, match="`xs` has dtype float32"):
        _SSM.diagonal(_SEQ.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"FixedPointRNN: `mixer_bound` must lie in \(0, 1\)"):
        FixedPointRNN(2, 3, mixer_bound=1.0, key=key)
    with pytest.raises(ValueError, match="FixedPointRNN: `hidden_size`"):
        FixedPointRNN(2, 0, key=key)
    with pytest.raises(TypeError, match="ImplicitSSM: `state_size` must be an int"):
        ImplicitSSM(2, 1.5, key=key)
    with pytest.raises(TypeError, match="ImplicitSSM: `signed`"):
        ImplicitSSM(2, 2, signed=1, key=key)
    for net in (_RNN, _SSM):
        with pytest.raises(ValueError, match="dropout"):
            net.with_settings(dropout=0.1)
    assert _RNN.with_settings(solver=None).solver == solvers.Picard(1e-4, 1e-4)
    assert _SSM.with_settings(solver=None).solver == solvers.Anderson(1e-3, 1e-3)


def test_word_problem_labels_are_running_products():
    orders = {"parity": 2, "Z3": 3, "Z5": 5, "S3": 6, "A4": 12, "A5": 60, "S5": 120}
    assert set(orders) == set(datasets.GROUPS)
    for group, order in orders.items():
        table = datasets.multiplication_table(group)
        assert table.shape == (order, order)
        # A group: an identity (index 0), inverses, and associativity.
        np.testing.assert_array_equal(table[0], np.arange(order))
        assert all(sorted(row) == list(range(order)) for row in table)
        a, b, c = np.meshgrid(*[np.arange(order)] * 3, indexing="ij")
        np.testing.assert_array_equal(table[table[a, b], c], table[a, table[b, c]])
    abelian = datasets.multiplication_table("Z5")
    np.testing.assert_array_equal(abelian, abelian.T)
    s3 = datasets.multiplication_table("S3")
    assert (s3 != s3.T).any()
    # Labels against composing the permutations directly.
    perms = list(itertools.permutations(range(3)))
    tokens, labels = datasets.word_problem("S3", 5, 9, seed=3)
    assert tokens.dtype == labels.dtype == np.int32
    for i in range(5):
        state = tuple(range(3))
        for t in range(9):
            g = perms[tokens[i, t]]
            state = tuple(g[state[k]] for k in range(3))
            assert perms.index(state) == labels[i, t]
    again = datasets.word_problem("S3", 5, 9, seed=3)
    np.testing.assert_array_equal(again[0], tokens)
    with pytest.raises(ValueError, match="`group` must be one of"):
        datasets.word_problem("S4", 2, 3)
    with pytest.raises(ValueError, match="`length` must be an int >= 1"):
        datasets.word_problem("S3", 2, 0)
    with pytest.raises(TypeError, match="word_problem: `seed` must be an int"):
        datasets.word_problem("S3", 2, 3, seed=None)
