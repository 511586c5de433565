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


def _close_top(key, n, top=(1.168, 1.155)):
    """An `n x n` weight with top singular values `top`: close, so power iteration is slow."""
    k1, k2 = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (n, n), jnp.float64))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n), jnp.float64))
    s = jnp.concatenate([jnp.array(top), jnp.linspace(0.9, 0.1, n - 2)])
    return (u * s) @ v.T


def _with_lin(f, w):
    return eqx.tree_at(lambda f: f.lin.weight, f, w)


def test_spectral_norm_bounds_the_norm():
    f = _with_lin(Cell(6, 3, jax.random.key(0), scale=5.0), _close_top(jax.random.key(1), 6))
    g = layers.spectral_norm(f, bound=0.9)
    for layer in (g.lin, g.inj):
        # Scaled to the bound exactly (up to rounding), not merely near it.
        np.testing.assert_allclose(jnp.linalg.norm(layer.weight, 2), 0.9, rtol=1e-13)
    # Weights already inside the bound are unchanged, bit for bit; also in float32
    # for bounds `b` whose float64 square has a float32 root other than `b`.
    h = layers.spectral_norm(g, bound=10.0)
    np.testing.assert_array_equal(h.lin.weight, g.lin.weight)
    lin32 = jax.tree.map(lambda a: a.astype(jnp.float32), g.lin)
    bounds = [b for b in np.linspace(1.0, 1.1, 101) if np.float32(b) != np.sqrt(np.float32(b**2))]
    assert bounds
    for b in bounds[:2]:
        np.testing.assert_array_equal(layers.spectral_norm(lin32, float(b)).weight, lin32.weight)
    # A convolution: its weight reshaped to (out, in * taps); half precision works.
    conv = eqx.nn.Conv1d(3, 4, 5, use_bias=False, key=jax.random.key(2), dtype=jnp.float64)
    conv = eqx.tree_at(lambda c: c.weight, conv, (8 * conv.weight).astype(jnp.bfloat16))
    w = layers.spectral_norm(conv, bound=0.5).weight
    assert w.dtype == jnp.bfloat16
    norm = jnp.linalg.norm(w.astype(jnp.float64).reshape(4, -1), 2)
    np.testing.assert_allclose(norm, 0.5, rtol=2e-2)
    # A zero weight has a finite gradient (the scale is 1 there).
    grad = jax.jit(jax.grad(lambda w: jnp.sum(layers.spectral_norm(_with_lin(f, w)).lin.weight)))
    np.testing.assert_array_equal(grad(jnp.zeros((6, 6))), jnp.ones((6, 6)))
    with pytest.raises(ValueError, match="bound"):
        layers.spectral_norm(f, bound=0.0)


def test_spectral_norm_gradient_with_close_singular_values():
    w = _close_top(jax.random.key(1), 6)
    c = jax.random.normal(jax.random.key(2), (6, 6), jnp.float64)
    lin = eqx.nn.Linear(6, 6, use_bias=False, key=jax.random.key(3), dtype=jnp.float64)

    def loss(w):
        normalised = layers.spectral_norm(eqx.tree_at(lambda m: m.weight, lin, w), 0.9)
        return jnp.sum(c * normalised.weight)

    grad = jax.jit(jax.grad(loss))
    g = grad(w)
    np.testing.assert_allclose(g, finite_difference_grad(loss, w), rtol=1e-7, atol=1e-9)
    # Closed form: d/dW <C, b W / σ> = (b / σ)(C - <C, W> u vᵀ / σ), σ = u[:, 0]ᵀ W vt[0].
    u, s, vt = np.linalg.svd(np.asarray(w))
    exact = 0.9 / s[0] * (c - jnp.sum(c * w) / s[0] * np.outer(u[:, 0], vt[0]))
    np.testing.assert_allclose(g, exact, rtol=1e-10, atol=1e-12)
    # The same under vmap (a batch of weights, one of them within the bound).
    ws = jnp.stack([w, 2 * w, 0.5 * w])
    np.testing.assert_allclose(
        jax.vmap(grad)(ws), jnp.stack([grad(w) for w in ws]), rtol=1e-12, atol=1e-15
    )


def test_deq_gradient_through_spectral_norm():
    # Issue 31: with a power-iteration estimate the DEQ gradient missed finite differences.
    f = _with_lin(Cell(6, 3, jax.random.key(0)), _close_top(jax.random.key(1), 6))
    x = jnp.array([0.3, -1.0, 2.0])

    def loss(w, adjoint=None):
        deq = layers.DEQ(
            _with_lin(f, w),
            z_shape=(6,),
            solver=solvers.Anderson(1e-11, 1e-11),
            adjoint=adjoint,
            max_steps=200,
            normalise=lambda f: layers.spectral_norm(f, bound=0.9),
        )
        return jnp.sum(jnp.sin(deq(x)))

    w = f.lin.weight
    g = jax.grad(loss)(w)
    np.testing.assert_allclose(g, finite_difference_grad(loss, w), rtol=1e-6, atol=1e-9)
    unrolled = jax.grad(lambda w: loss(w, fixpoint.UnrolledAdjoint()))(w)
    np.testing.assert_allclose(unrolled, g, rtol=1e-8, atol=1e-12)


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


def test_spectral_norm_extreme_scales_and_bad_bounds():
    # float32 weights whose squared norm overflows or underflows are still bounded.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 4)).astype(np.float32)
    lin = eqx.nn.Linear(4, 4, key=jax.random.key(0))
    for scale, bound in ((1e20, 1.0), (1e-25, 1e-30)):
        layer = eqx.tree_at(lambda m: m.weight, lin, jnp.asarray(base * np.float32(scale)))
        out = np.asarray(layers.spectral_norm(layer, bound).weight, np.float64)
        assert np.linalg.norm(out, 2) <= bound * (1 + 1e-5)
    for bad in (np.float32(-1.0), np.float32("nan"), True):
        with pytest.raises((ValueError, TypeError), match="spectral_norm: `bound`"):
            layers.spectral_norm(lin, bad)


def _layers_with_settings():
    key = jax.random.key(1)
    return [
        _deq(),
        layers.MonDEQ(3, 4, key=key, dtype=jnp.float64),
        layers.ConvMonDEQ(1, 2, 4, key=key, dtype=jnp.float64),
        layers.CGS(2, 1, 1, hidden=4, heads=2, key=key),
        layers.IGNN(2, 1, hidden=4, key=key),
        layers.ParallelRNN(layers.DiagonalGRUCell(2, 3, key=key)),
    ]


@pytest.mark.parametrize("layer", _layers_with_settings(), ids=lambda m: type(m).__name__)
def test_with_settings_replaces_static_settings_only(layer, tmp_path):
    # Settings are static (a checkpoint neither holds nor overwrites them), so
    # `eqx.tree_at` cannot reach them; `with_settings` can, checked as the
    # constructor checks them, and the weights stay shared.
    name = type(layer).__name__
    assert "max_steps" in type(layer).settings and "throw" in type(layer).settings
    new = layer.with_settings(max_steps=7, throw=False)
    assert (new.max_steps, new.throw) == (7, False)
    assert (layer.max_steps, layer.throw) != (7, False)  # the original is unchanged
    for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(new), strict=True):
        assert a is b
    with pytest.raises(ValueError, match=rf"{name}: `max_steps` must be an int >= 1"):
        layer.with_settings(max_steps=0)
    with pytest.raises(TypeError, match=rf"{name}: `throw` must be a bool"):
        layer.with_settings(throw="no")
    with pytest.raises(TypeError, match=rf"{name}: `solver`"):
        layer.with_settings(solver=3)
    with pytest.raises(TypeError, match=r"'key' is not a setting; the settings are"):
        layer.with_settings(key=jax.random.key(0))
    # A checkpoint of the new layer loads into the old one and leaves its settings.
    path = tmp_path / "layer.eqx"
    eqx.tree_serialise_leaves(path, new)
    loaded = eqx.tree_deserialise_leaves(path, layer)
    assert (loaded.max_steps, loaded.throw) == (layer.max_steps, layer.throw)


def test_with_settings_changes_the_solve():
    deq = _deq()
    x = jnp.array([0.3, -1.0, 2.0])
    rough = deq.with_settings(solver=solvers.Picard(1e-3, 1e-3))
    sol, fine = rough.solve(x), deq.solve(x)
    np.testing.assert_allclose(sol.value, fine.value, atol=1e-2)
    assert not np.allclose(sol.value, fine.value, atol=1e-9, rtol=0)
    # `None` means the constructor's default.
    assert isinstance(rough.with_settings(solver=None).solver, solvers.Anderson)
