"""The DEQ layer and the training tools."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import finite_difference_grad

import fixpoint
from fixpoint import layers, solvers


class Cell(eqx.Module):
    lin: eqx.nn.Linear
    inj: eqx.nn.Linear

    def __init__(self, n, m, key, scale=0.5):
        k1, k2 = jax.random.split(key)
        lin = eqx.nn.Linear(n, n, key=k1, dtype=jnp.float64)
        self.lin = eqx.tree_at(lambda l_: l_.weight, lin, lin.weight * scale)
        self.inj = eqx.nn.Linear(m, n, key=k2, dtype=jnp.float64)

    def __call__(self, z, x):
        return jnp.tanh(self.lin(z) + self.inj(x))


def _deq(**kwargs):
    f = Cell(6, 3, jax.random.key(0))
    kwargs.setdefault("solver", solvers.Anderson(1e-11, 1e-11))
    return layers.DEQ(f, z_shape=(6,), max_steps=200, **kwargs)


def test_output_is_an_equilibrium():
    deq = _deq()
    x = jnp.array([0.3, -1.0, 2.0])
    z = deq(x)
    np.testing.assert_allclose(deq.f(z, x), z, atol=1e-10)


def test_gradient_matches_finite_differences_and_unrolled():
    deq = _deq()
    x = jnp.array([0.3, -1.0, 2.0])

    def loss(w, deq=deq):
        d = eqx.tree_at(lambda d: d.f.lin.weight, deq, w)
        return jnp.sum(d(x) ** 2)

    w = deq.f.lin.weight
    g = jax.grad(loss)(w)
    np.testing.assert_allclose(g, finite_difference_grad(loss, w), rtol=1e-6, atol=1e-9)
    unrolled = _deq(adjoint=fixpoint.UnrolledAdjoint())
    np.testing.assert_allclose(jax.grad(lambda w: loss(w, unrolled))(w), g, rtol=1e-8)


def test_batched_stats_are_per_sample():
    deq = _deq()
    xs = jnp.stack([jnp.zeros(3), jnp.ones(3), 5 * jnp.ones(3)])
    sol = jax.vmap(deq.solve)(xs)
    assert sol.stats["num_steps"].shape == (3,)
    assert len(set(np.asarray(sol.stats["num_steps"]).tolist())) > 1
    assert bool(jnp.all(sol.result == fixpoint.RESULTS.successful))


def test_diverging_deq_is_reported_not_silent():
    f = Cell(6, 3, jax.random.key(0), scale=20.0)  # strongly expansive
    deq = layers.DEQ(f, z_shape=(6,), solver=solvers.Picard(1e-6, 1e-6), max_steps=100, throw=False)
    sol = deq.solve(jnp.ones(3))
    assert not bool(sol.result == fixpoint.RESULTS.successful)
    with pytest.raises(fixpoint.SolveError):
        layers.DEQ(f, z_shape=(6,), solver=solvers.Picard(1e-6, 1e-6), max_steps=100)(jnp.ones(3))


def test_dropout_mask_is_fixed_across_iterations():
    deq = _deq(dropout=0.5)
    x = jnp.array([0.3, -1.0, 2.0])
    key = jax.random.key(1)
    z = deq(x, key=key)
    mask = deq.mask(jnp.zeros(6), key, False)
    # z is the equilibrium of the masked map with that one mask.
    np.testing.assert_allclose(mask * deq.f(z, x), z, atol=1e-9)
    np.testing.assert_allclose(deq(x, inference=True), _deq()(x))
    with pytest.raises(ValueError, match="needs `key=`"):
        deq(x)


def test_jacobian_penalty_is_unbiased():
    f = Cell(6, 3, jax.random.key(0))
    z, x = jnp.linspace(-1, 1, 6), jnp.ones(3)
    exact = jnp.sum(jax.jacfwd(lambda z: f(z, x))(z) ** 2)
    estimates = jax.vmap(lambda k: layers.jacobian_penalty(f, z, x, k))(
        jax.random.split(jax.random.key(0), 4000)
    )
    # Mean of 4000 single-sample estimates: within 4 standard errors.
    se = jnp.std(estimates) / jnp.sqrt(4000.0)
    assert abs(float(jnp.mean(estimates) - exact)) < 4 * float(se)


def test_spectral_radius_estimate():
    w = jax.random.normal(jax.random.key(3), (10, 10), jnp.float64) / 3
    f = lambda z, x: jnp.tanh(w @ z + x)  # noqa: E731
    est = layers.spectral_radius(f, jnp.zeros(10), jnp.zeros(10), jax.random.key(1), iters=300)
    np.testing.assert_allclose(est, jnp.max(jnp.abs(jnp.linalg.eigvals(w))), rtol=1e-2)


def test_spectral_norm_bounds_the_norm():
    f = Cell(6, 3, jax.random.key(0), scale=5.0)
    g = layers.spectral_norm(f, bound=0.9)
    for layer in (g.lin, g.inj):
        assert float(jnp.linalg.norm(layer.weight, 2)) <= 0.9 + 1e-6
    # Weights already inside the bound are unchanged.
    h = layers.spectral_norm(g, bound=10.0)
    np.testing.assert_allclose(h.lin.weight, g.lin.weight)


def test_weight_norm_wraps_layers():
    f = layers.weight_norm(Cell(6, 3, jax.random.key(0)))
    assert isinstance(f.lin, eqx.nn.WeightNorm)
    x = jnp.ones(3)
    np.testing.assert_allclose(
        f(jnp.zeros(6), x), Cell(6, 3, jax.random.key(0))(jnp.zeros(6), x), rtol=1e-12
    )


def test_correction_iterates_approach_the_equilibrium():
    deq = _deq(solver=solvers.Picard(1e-11, 1e-11))
    x = jnp.array([0.3, -1.0, 2.0])
    z = deq(x)
    its = layers.correction_iterates(deq, x, steps=(1, 3, 10))
    errs = [float(jnp.max(jnp.abs(i - z))) for i in its]
    assert errs[0] > errs[1] > errs[2]


def test_smoke_training_loss_falls():
    key = jax.random.key(0)
    xs = jax.random.normal(key, (64, 3), jnp.float64)
    ys = jnp.sin(xs.sum(axis=1))
    deq = _deq(solver=solvers.Anderson(1e-6, 1e-6))
    head = eqx.nn.Linear(6, 1, key=jax.random.key(5), dtype=jnp.float64)
    model = (deq, head)
    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    def loss(model):
        deq, head = model
        pred = jax.vmap(lambda x: head(deq(x))[0])(xs)
        return jnp.mean((pred - ys) ** 2)

    @eqx.filter_jit
    def step(model, state):
        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, state = opt.update(grads, state)
        return eqx.apply_updates(model, updates), state, value

    losses = []
    # optax's bias correction mixes a Python float with an int32 step count,
    # which the tests' strict promotion mode refuses; allow it here only.
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(60):
            model, state, value = step(model, state)
            losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0]
