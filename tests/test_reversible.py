"""`solvers.Reversible` and `ReversibleAdjoint`: the iteration run backwards gives
the unrolled gradient in memory that does not grow with the steps, and a
reversal that has lost its trajectory is refused, not returned."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import contraction, finite_difference_grad

import fixpoint
from fixpoint import solvers

N = 6
W = contraction(jax.random.PRNGKey(0), N, 0.5)
X = jax.random.normal(jax.random.PRNGKey(1), (N,), jnp.float64)
Y0 = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (N,), jnp.float64)
REVERSIBLE = solvers.Reversible(1e-6, 1e-6)


def layer(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


def _loss(adjoint, solver=REVERSIBLE, fn=layer, entry=fixpoint.fixed_point, **kw):
    def loss(args, y0):
        sol = entry(fn, y0, args, solver=solver, adjoint=adjoint, **kw)
        return jnp.sum(jnp.sin(sol.value))

    return loss


_grad = jax.jit(jax.grad(_loss(fixpoint.ReversibleAdjoint()), argnums=(0, 1)))
_unrolled = jax.jit(jax.grad(_loss(fixpoint.UnrolledAdjoint()), argnums=(0, 1)))


def _close(a, b, rtol):
    """Each leaf within `rtol`, relative to the largest entry of any leaf of `b`."""
    scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale)


def test_the_gradient_is_the_unrolled_one_also_for_y0():
    steps = fixpoint.fixed_point(layer, Y0, (W, X), solver=REVERSIBLE).stats["num_steps"]
    assert int(steps) > 15
    reversed_, unrolled = _grad((W, X), Y0), _unrolled((W, X), Y0)
    _close(reversed_, unrolled, 1e-9)
    assert float(jnp.max(jnp.abs(reversed_[1]))) > 1e-8  # the y0 gradient is not zero


@pytest.mark.parametrize("beta", [0.3, 0.95])
def test_root_find_and_other_relaxations(beta):
    solver = solvers.Reversible(1e-8, 1e-8, beta=beta)

    def g(y, args):  # the root form of `layer`
        return y - layer(y, args)

    kw = dict(solver=solver, fn=g, entry=fixpoint.root_find)
    rev = jax.grad(_loss(fixpoint.ReversibleAdjoint(), **kw), argnums=(0, 1))((W, X), Y0)
    unr = jax.grad(_loss(fixpoint.UnrolledAdjoint(), **kw), argnums=(0, 1))((W, X), Y0)
    _close(rev, unr, 1e-8)


def test_agrees_with_the_implicit_gradient_and_finite_differences():
    solver = solvers.Reversible(1e-9, 1e-9, beta=0.5)
    rev = jax.grad(_loss(fixpoint.ReversibleAdjoint(), solver))((W, X), Y0)
    imp = jax.grad(_loss(fixpoint.ImplicitAdjoint(), solver))((W, X), Y0)
    _close(rev, imp, 1e-6)
    fd = finite_difference_grad(lambda x: _loss(fixpoint.ImplicitAdjoint(), solver)((W, x), Y0), X)
    np.testing.assert_allclose(rev[1], fd, rtol=1e-6, atol=1e-8)


def _run_and_reverse(beta, steps, dtype):
    """The iteration run `steps` steps forward by the solver, then backwards by
    its `revert`: the largest error of the recovered start."""
    solver = solvers.Reversible(1e-3, 1e-3, beta=beta)
    w, x, y0 = (a.astype(dtype) for a in (contraction(jax.random.PRNGKey(3), 32, 0.9), X, Y0))
    w, x = w, jnp.resize(x, 32)
    y0 = jnp.resize(y0, 32)
    f = lambda z: jnp.tanh(w @ z + x)  # noqa: E731
    prev, y = y0, y0
    for _ in range(steps):
        prev, y = y, solver.update(prev, y, f(y))
    for _ in range(steps):
        prev, y = solver.revert(prev, y, f(prev)), prev
    return float(jnp.maximum(jnp.max(jnp.abs(y - y0)), jnp.max(jnp.abs(prev - y0))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_the_reversal_is_exact_for_few_steps_then_drifts(dtype):
    # A reversed step amplifies a rounding error by 1/|λ|, λ the iteration's
    # fastest-decaying mode: √5 per step for beta = 0.8 where J_f = 0, more
    # elsewhere (about 3 here). Measured: float64 4e-14 after 6
    # steps, 7e-12 after 10, 2e4 (nothing left) after 45; float32 5e-6 after
    # 4, 3e-3 after 10, 9e1 after 20.
    eps = float(jnp.finfo(dtype).eps)
    exact, few, lost = (4, 10, 45) if dtype == jnp.float64 else (2, 6, 20)
    assert _run_and_reverse(0.8, exact, dtype) < 100 * eps
    assert _run_and_reverse(0.8, few, dtype) < (1e-10 if dtype == jnp.float64 else 1e-3)
    assert _run_and_reverse(0.8, lost, dtype) > 1e-2
    # A smaller beta amplifies less per step.
    assert _run_and_reverse(0.3, lost, dtype) < 1e-3 * _run_and_reverse(0.8, lost, dtype)


def test_a_lost_reversal_is_refused():
    # A slow contraction at a tight tolerance: ~50 steps at beta = 0.8.
    w = contraction(jax.random.PRNGKey(0), N, 0.95)
    loss = _loss(fixpoint.ReversibleAdjoint(), solvers.Reversible(1e-9, 1e-9))
    with pytest.raises(Exception, match="reversal_lost"):
        jax.grad(loss)((w, X), Y0)
    quiet = _loss(fixpoint.ReversibleAdjoint(), solvers.Reversible(1e-9, 1e-9), throw=False)
    assert np.isnan(jax.grad(quiet)((w, X), Y0)[1]).all()
    # Unchecked (`rtol=None`): a number. The check is conservative: it tests the
    # recovered trajectory, not the gradient, which here is still close.
    unchecked = jax.grad(_loss(fixpoint.ReversibleAdjoint(None), solvers.Reversible(1e-9, 1e-9)))
    unrolled = jax.grad(_loss(fixpoint.UnrolledAdjoint(), solvers.Reversible(1e-9, 1e-9)))
    _close(unchecked((w, X), Y0), unrolled((w, X), Y0), 1e-4)


def test_a_failed_forward_solve_gives_nan_and_a_zero_cotangent_zero():
    loss = _loss(fixpoint.ReversibleAdjoint(), max_steps=5, throw=False)
    assert np.isnan(jax.grad(loss)((W, X), Y0)[1]).all()

    def masked(args, y0s):
        def one(y0, keep):
            sol = fixpoint.fixed_point(
                layer, y0, args, solver=REVERSIBLE, adjoint=fixpoint.ReversibleAdjoint(),
                max_steps=jnp.where(keep, 200, 5).astype(jnp.int32), throw=False,
            )  # fmt: skip
            return jnp.where(keep, jnp.sum(sol.value), 0.0)

        return jnp.sum(jax.vmap(one)(y0s, jnp.array([True, False, True])))

    y0s = jnp.stack([Y0, 2 * Y0, -Y0])
    (g_w, g_x), g_y0 = jax.grad(masked, argnums=(0, 1))((W, X), y0s)
    assert np.isfinite(g_w).all() and np.isfinite(g_x).all()
    np.testing.assert_array_equal(g_y0[1], 0.0)


def test_vmap_and_jit_agree_with_single_calls():
    y0s = jnp.stack([Y0, -Y0, 0 * Y0])
    batched = jax.vmap(lambda y0: _grad((W, X), y0))(y0s)
    for i in range(3):
        single = jax.grad(_loss(fixpoint.ReversibleAdjoint()), argnums=(0, 1))((W, X), y0s[i])
        _close(jax.tree.map(lambda a, i=i: a[i], batched), single, 1e-12)


def test_memory_does_not_grow_with_steps():
    def temp_bytes(steps):
        loss = _loss(fixpoint.ReversibleAdjoint(None), solvers.Reversible(1e-30, 1e-30),
                     max_steps=steps, throw=False)  # fmt: skip
        lowered = jax.jit(jax.grad(loss)).lower((W, X), Y0)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(10) == temp_bytes(1000)


class _Cell(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(self.lin(jnp.concatenate([z, x])))


def test_a_deq_layer_trains_through_the_reversal():
    cell = _Cell(eqx.nn.Linear(8, 5, key=jax.random.PRNGKey(0), dtype=jnp.float64))
    deq = fixpoint.layers.DEQ(
        cell, z_shape=(5,), solver=solvers.Reversible(1e-6, 1e-6),
        adjoint=fixpoint.ReversibleAdjoint(),
    )  # fmt: skip
    unrolled = deq.with_settings(adjoint=fixpoint.UnrolledAdjoint())
    x = jnp.arange(3.0)

    def grad(m):
        return eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))(m)

    _close(grad(deq), grad(unrolled), 1e-8)


def test_bad_options_and_pairings_are_named():
    with pytest.raises(ValueError, match="beta"):
        solvers.Reversible(1e-6, 1e-6, beta=1.0)
    with pytest.raises(ValueError, match="rtol"):
        fixpoint.ReversibleAdjoint(-1.0)
    with pytest.raises(TypeError, match="needs a reversible solver"):
        fixpoint.fixed_point(layer, Y0, (W, X), solver=solvers.Picard(1e-6, 1e-6),
                             adjoint=fixpoint.ReversibleAdjoint())  # fmt: skip
    with pytest.raises(TypeError, match="reverse mode only"):
        jax.jvp(lambda x: _loss(fixpoint.ReversibleAdjoint())((W, x), Y0), (X,), (X,))
    custom = fixpoint.custom_fixed_point(layer, adjoint=fixpoint.ReversibleAdjoint())(
        lambda y0, args: y0
    )
    with pytest.raises(TypeError, match="not with a solver of your own"):
        custom(Y0, (W, X))


def test_an_undifferentiated_input_with_an_infinite_derivative_is_not_a_failure():
    # d sqrt(c)/dc is infinite at c = 0; only `w` is differentiated.
    c = jnp.array([0.0, 0.25, 1.0, 0.0, 4.0, 0.5])

    def f(z, args):
        return jnp.tanh(args[0] @ z + jnp.sqrt(args[1]))

    def loss(w, adjoint):
        sol = fixpoint.fixed_point(f, Y0, (w, c), solver=REVERSIBLE, adjoint=adjoint)
        return jnp.sum(sol.value)

    _close(
        jax.grad(loss)(W, fixpoint.ReversibleAdjoint()),
        jax.grad(loss)(W, fixpoint.UnrolledAdjoint()),
        1e-9,
    )


def test_a_warm_start_is_not_refused_and_the_hessian_works():
    # Near the fixed point the distance travelled is tiny; the drift is judged
    # against the size of the numbers.
    y_star = fixpoint.fixed_point(layer, Y0, (W, X), solver=solvers.Picard(1e-14, 1e-14)).value
    warm = y_star + 1e-4

    def loss(x, adjoint, y0=warm):
        sol = fixpoint.fixed_point(layer, y0, (W, x), solver=REVERSIBLE, adjoint=adjoint)
        return jnp.sum(jnp.sin(sol.value))

    _close(
        jax.grad(loss)(X, fixpoint.ReversibleAdjoint()),
        jax.grad(loss)(X, fixpoint.UnrolledAdjoint()),
        1e-9,
    )
    hessian = jax.hessian(lambda x: loss(x, fixpoint.ReversibleAdjoint(), Y0))(X)
    reference = jax.hessian(lambda x: loss(x, fixpoint.UnrolledAdjoint(), Y0))(X)
    _close(hessian, reference, 1e-8)
