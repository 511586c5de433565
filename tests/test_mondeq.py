"""Monotone operator equilibrium networks: splitting solvers and the MonDEQ layers.

Every function called more than once is jitted once at module level (`filter_jit`
caches by the layer's static configuration), so the file stays fast.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fixpoint
from fixpoint import solvers
from fixpoint.layers import CircularConvMonotone, ConvMonDEQ, MonDEQ
from fixpoint.solvers import ForwardBackward, MonotoneMatrix, PeacemanRachford

TOL = 1e-12
PR = PeacemanRachford(TOL, TOL)
FB = ForwardBackward(TOL, TOL)
FAILED = (
    fixpoint.RESULTS.diverged,
    fixpoint.RESULTS.max_steps_reached,
    fixpoint.RESULTS.nonfinite,
)


def _fc(
    solver: PeacemanRachford | ForwardBackward = PR,
    *,
    scale=1.0,
    key=0,
    max_steps=20_000,
    throw=True,
    m=0.1,
    sizes=(4, 10),
):
    net = MonDEQ(
        *sizes, m=m, solver=solver, max_steps=max_steps, throw=throw, key=jax.random.key(key)
    )
    return _scaled(net, scale)


def _conv(
    solver: PeacemanRachford | ForwardBackward = PR,
    *,
    scale=1.0,
    key=0,
    max_steps=20_000,
    throw=True,
    length=10,
):
    net = ConvMonDEQ(
        1,
        3,
        length,
        3,
        m=0.1,
        solver=solver,
        max_steps=max_steps,
        throw=throw,
        key=jax.random.key(key),
    )
    return _scaled(net, scale)


def _scaled(net, scale):
    return eqx.tree_at(lambda n: (n.A, n.B), net, (scale * net.A, scale * net.B))


def _x(kind, key, batch=()):
    shape = (4,) if kind == "fc" else (1, 10)
    return jax.random.normal(jax.random.key(key), (*batch, *shape))


def _ok(sol):
    return np.asarray(sol.result == fixpoint.RESULTS.successful)


_jsolve = eqx.filter_jit(lambda net, x, z0: net.solve(x, z0))


def _solve(net, x, z0=None):
    z0 = jnp.zeros(jax.eval_shape(net, x).shape) if z0 is None else z0
    return _jsolve(net, x, z0)


_vsolve = eqx.filter_jit(lambda net, xs, z0s: jax.vmap(net.solve)(xs, z0s))


def _dense(op: CircularConvMonotone, shape):
    """`W` as a dense matrix, from products with `op.mv`."""
    n = int(np.prod(shape))
    return jax.jacfwd(lambda v: op.mv(v.reshape(shape)).reshape(-1))(jnp.zeros(n, op.A.dtype))


def _numpy_circular_conv_matrix(kernel, length):
    """A reference: the dense matrix of the 1-D circular cross-correlation, with loops."""
    kernel = np.asarray(kernel)
    c_out, c_in, k = kernel.shape
    mat = np.zeros((c_out, length, c_in, length))
    for o in range(c_out):
        for i in range(length):
            for c in range(c_in):
                for j in range(k):
                    mat[o, i, c, (i + j - (k - 1) // 2) % length] += kernel[o, c, j]
    return mat.reshape(c_out * length, c_in * length)


def _conv_matrix(kernel, length):
    """The same matrix as `_numpy_circular_conv_matrix`, differentiably, in jnp."""
    k = kernel.shape[-1]
    eye = jnp.eye(length, dtype=kernel.dtype)
    shifts = [jnp.roll(eye, j - (k - 1) // 2, axis=1) for j in range(k)]
    out = jnp.kron(kernel[:, :, 0], shifts[0])
    for j in range(1, k):
        out = out + jnp.kron(kernel[:, :, j], shifts[j])
    return out


# ---- the monotone parameterisation -----------------------------------------------


@eqx.filter_jit
def _dense_checks(net):
    return net.W(), net.monotonicity(), net.is_monotone()


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monotone_bound_dense(seed, scale):
    m = 0.05
    net = _fc(m=m, key=seed, scale=scale, sizes=(3, 12))
    w, mono, ok = _dense_checks(net)
    i_w = np.eye(12) - np.asarray(w)
    sym = 0.5 * (i_w + i_w.T)
    a = np.asarray(net.A)
    np.testing.assert_allclose(sym, m * np.eye(12) + a.T @ a, atol=1e-12 * scale**2)
    lam = np.linalg.eigvalsh(sym)[0]
    assert lam >= m - 1e-12 * scale**2
    np.testing.assert_allclose(mono, lam, rtol=1e-8, atol=1e-12 * scale**2)
    assert bool(ok)


def test_monotone_check_is_not_vacuous():
    net = _fc(m=0.05, sizes=(3, 12))
    w, lam, _ = _dense_checks(net)
    fake = MonotoneMatrix(w + (lam - 0.025) * jnp.eye(12), 0.05)  # sym(I - W) ⪰ 0.025 I only
    np.testing.assert_allclose(fake.monotonicity(), 0.025, rtol=1e-8)


@eqx.filter_jit
def _conv_checks(net, v):
    op = net.operator()
    return (
        _dense(op, (3, *net.shape)),
        net.monotonicity(),
        op.lipschitz(),
        net.is_monotone(),
        op.resolvent(jnp.array(0.7))(v),
    )


@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("dim", [1, 2])
def test_monotone_bound_conv(dim, scale):
    """The FFT (per-frequency) quantities against dense ones; 2-D with an even kernel."""
    if dim == 1:
        net = _conv(scale=scale)
    else:
        net = _scaled(ConvMonDEQ(2, 3, (4, 5), (3, 2), m=0.1, key=jax.random.key(3)), scale)
    v = jax.random.normal(jax.random.key(4), (3, *net.shape))
    w, mono, lip, ok, rv = _conv_checks(net, v)
    i_w = np.eye(w.shape[0]) - np.asarray(w)
    lam = np.linalg.eigvalsh(0.5 * (i_w + i_w.T))[0]
    assert lam >= net.m - 1e-12 * scale**2
    np.testing.assert_allclose(mono, lam, rtol=1e-8, atol=1e-12 * scale**2)
    np.testing.assert_allclose(lip, np.linalg.norm(i_w, 2), rtol=1e-10)
    assert bool(ok)
    rv = np.asarray(rv).reshape(-1)
    np.testing.assert_allclose((np.eye(len(rv)) + 0.7 * i_w) @ rv, np.asarray(v).reshape(-1))


def test_conv_operator_against_numpy_reference():
    net, length = _conv(), 10
    a = _numpy_circular_conv_matrix(net.A, length)
    b = _numpy_circular_conv_matrix(net.B, length)
    w = (1 - net.m) * np.eye(3 * length) - a.T @ a + b - b.T
    np.testing.assert_allclose(_conv_checks(net, jnp.zeros((3, length)))[0], w, atol=1e-13)
    x = _x("conv", 6)
    sol = _solve(net, x)
    z = np.asarray(sol.value).reshape(-1)
    u = _numpy_circular_conv_matrix(net.U, length)
    bias = np.repeat(np.asarray(net.bias), length)
    r = np.maximum(w @ z + u @ np.asarray(x).reshape(-1) + bias, 0) - z
    assert bool(_ok(sol)) and np.max(np.abs(r)) < 1e-11


# ---- the equilibrium ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_unique_equilibrium_from_random_starts(kind):
    make = _fc if kind == "fc" else _conv
    x = _x(kind, 7)
    values = []
    for solver in (PR, FB):
        net = make(solver)
        z0s = 10 * jax.random.normal(jax.random.key(8), (12, *jax.eval_shape(net, x).shape))
        sol = _vsolve(net, jnp.broadcast_to(x, (12, *x.shape)), z0s)
        assert np.all(_ok(sol))
        assert np.all(np.asarray(sol.stats["residual"]) < 1e-11)
        values.append(np.asarray(sol.value))
    values = np.concatenate(values)
    np.testing.assert_allclose(values, np.broadcast_to(values[0], values.shape), atol=1e-9)
    assert np.any(values[0] > 0) and np.any(values[0] == 0)  # relu is active and inactive


@pytest.mark.parametrize("solver", [PR, FB])
def test_output_solves_equilibrium_equation(solver):
    net = _fc(solver)
    x = _x("fc", 9)
    sol = _solve(net, x)
    z = np.asarray(sol.value)
    w, u, b = (np.asarray(a) for a in (net.W(), net.U, net.bias))
    r = np.maximum(w @ z + u @ np.asarray(x) + b, 0) - z
    assert bool(_ok(sol)) and np.max(np.abs(r)) < 1e-11
    np.testing.assert_allclose(sol.stats["residual"], np.max(np.abs(r)), rtol=1e-6, atol=1e-15)


def test_steps_fb_vs_pr():
    """PR needs far fewer steps than FB with its safe default step `m / L²`."""
    net = _fc()
    op = net.operator()
    alpha = float(FB.step_size(op))
    np.testing.assert_allclose(alpha, net.m / np.linalg.norm(np.eye(10) - net.W(), 2) ** 2)
    x = _x("fc", 10)
    pr, fb = _solve(net, x), _solve(_fc(FB), x)
    assert bool(_ok(pr)) and bool(_ok(fb))
    assert 5 * int(pr.stats["num_steps"]) < int(fb.stats["num_steps"])
    np.testing.assert_allclose(pr.value, fb.value, atol=1e-10)


# ---- honest failure reports -------------------------------------------------------


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_pr_converges_where_large_step_fb_fails(kind):
    make = _fc if kind == "fc" else _conv
    x = _x(kind, 11)
    base = make(PR, scale=3.0)
    alpha_max = 2 * base.m / float(base.operator().lipschitz()) ** 2
    # alpha = 1 is plain iteration z <- relu(W z + b): far above the safe 2m/L².
    bad = ForwardBackward(TOL, TOL, alpha=1.0)
    assert alpha_max < 0.05
    sol_pr = _solve(base, x)
    assert bool(_ok(sol_pr))
    alphas = (0.05, 5.0) if kind == "fc" else ()
    for alpha in alphas:  # PR converges for any alpha > 0
        sol = _solve(make(PeacemanRachford(TOL, TOL, alpha=alpha), scale=3.0), x)
        assert bool(_ok(sol))
        np.testing.assert_allclose(sol.value, sol_pr.value, atol=1e-10)
    sol_fb = _solve(make(bad, scale=3.0, throw=False), x)
    assert any(bool(sol_fb.result == r) for r in FAILED)
    assert not bool(_ok(sol_fb))
    assert not float(sol_fb.stats["residual"]) < 1e-6
    if kind == "fc":
        with pytest.raises(Exception, match="`ForwardBackward` failed with result `diverged`"):
            jax.block_until_ready(_solve(make(bad, scale=3.0), x).value)


def test_max_steps_reached_is_reported():
    sol = _solve(_fc(FB, max_steps=5, throw=False), _x("fc", 12))
    assert bool(sol.result == fixpoint.RESULTS.max_steps_reached)
    assert int(sol.stats["num_steps"]) == 5


@pytest.mark.parametrize("solver", [PR, FB])
def test_nonfinite_ends_the_loop(solver):
    net = _fc(solver, max_steps=5, throw=False)
    nan_x = jnp.array([1.0, jnp.nan, 0.0, 0.0])
    for x, z0 in [(nan_x, jnp.zeros(10)), (jnp.ones(4), jnp.full(10, jnp.inf))]:
        sol = _solve(net, x, z0)
        assert bool(sol.result == fixpoint.RESULTS.nonfinite)
        assert int(sol.stats["num_steps"]) == 0


# ---- gradients ---------------------------------------------------------------------


def _grad_checks(net, x, reference):
    """Gradients w.r.t. every parameter and `x`: finite differences, and `reference`."""
    params, static = eqx.partition(net, eqx.is_array)
    flat, unravel = ravel_pytree((params, x))
    c = jax.random.normal(jax.random.key(12), x.shape[:-1] + (jax.eval_shape(net, x[0]).size,))

    def loss(flat, solve):
        p, x = unravel(flat)
        z = jax.vmap(lambda x: solve(eqx.combine(p, static), x).reshape(-1))(x)
        return jnp.sum(c * z) + 0.5 * jnp.sum(z**2)

    # One compiled function serves the gradient and the finite differences.
    value_and_grad = jax.jit(jax.value_and_grad(lambda f: loss(f, lambda net, x: net(x))))
    grad = value_and_grad(flat)[1]
    eps, fd = 1e-5, np.zeros(flat.size)
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps)
        fd[i] = (float(value_and_grad(flat + e)[0]) - float(value_and_grad(flat - e)[0])) / (
            2 * eps
        )
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)
    ref = jax.jit(jax.grad(lambda f: loss(f, reference)))(flat)
    np.testing.assert_allclose(grad, ref, rtol=1e-8, atol=1e-10)


def _anderson(fn, z0, args):
    """The second method: Anderson on `fixed_point`, dense (LU) implicit adjoint."""
    solver = solvers.Anderson(1e-13, 1e-13)
    adjoint = fixpoint.ImplicitAdjoint(linear_solver=lx.LU())
    return fixpoint.fixed_point(fn, z0, args, solver=solver, max_steps=2000, adjoint=adjoint).value


def test_gradients_fc():
    """Forward-backward, a batch of two under `vmap` (inside `jit` and `grad`)."""
    net = _fc(FB, m=0.2, sizes=(3, 6))

    def reference(net, x):
        fn = lambda z, args: jax.nn.relu(args[0] @ z + args[1])
        return _anderson(fn, jnp.zeros(6), (net.W(), net.U @ x + net.bias))

    _grad_checks(net, jax.random.normal(jax.random.key(14), (2, 3)), reference)


def test_gradients_conv():
    """Peaceman–Rachford with the FFT resolvent, one sample."""
    net = ConvMonDEQ(1, 2, 6, 3, m=0.2, solver=PR, max_steps=5000, key=jax.random.key(15))

    def reference(net, x):
        # Dense W and U, built independently of the layer's convolution code.
        a, b, u = (_conv_matrix(k, 6) for k in (net.A, net.B, net.U))
        w = (1 - net.m) * jnp.eye(12) - a.T @ a + b - b.T
        fn = lambda z, args: jax.nn.relu(args[0] @ z + args[1])
        return _anderson(fn, jnp.zeros(12), (w, u @ x[0] + jnp.repeat(net.bias, 6)))

    _grad_checks(net, jax.random.normal(jax.random.key(16), (1, 1, 6)), reference)


# ---- transformations ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_jit_vmap_agree_with_plain_calls(kind):
    net = _fc() if kind == "fc" else _conv()
    xs = _x(kind, 18, (5,))
    xs = xs * jnp.arange(1, 6, dtype=xs.dtype).reshape(-1, *(1,) * (xs.ndim - 1))
    zero = jnp.zeros(jax.eval_shape(net, xs[0]).shape)
    single = [_solve(net, x, zero) for x in xs]
    if kind == "fc":
        plain = net.solve(xs[1])  # no jit at all
        np.testing.assert_allclose(plain.value, single[1].value, atol=1e-14)
        assert int(plain.stats["num_steps"]) == int(single[1].stats["num_steps"])
    # Warm-start sample 0 at its own solution: it takes 0 steps while the others run.
    z0s = jnp.stack([single[0].value] + [zero] * 4)
    batched = _vsolve(net, xs, z0s)
    steps = np.asarray(batched.stats["num_steps"])
    assert steps[0] == 0 and np.all(steps[1:] > 0)
    assert len(set(steps[1:].tolist())) > 1  # steps really are per sample
    assert np.all(_ok(batched))
    for i, sol in enumerate(single):
        np.testing.assert_allclose(batched.value[i], sol.value, atol=1e-12)
        if i > 0:
            assert steps[i] == int(sol.stats["num_steps"])


# ---- options and errors ------------------------------------------------------------


def test_bad_options():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="alpha"):
        PeacemanRachford(1e-6, 1e-6, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        ForwardBackward(1e-6, 1e-6, alpha=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        ForwardBackward(-1.0, 1e-6)
    with pytest.raises(ValueError, match="divergence_ratio"):
        PeacemanRachford(1e-6, 1e-6, divergence_ratio=1.0)
    with pytest.raises(ValueError, match="`m`"):
        MonDEQ(2, 3, m=0.0, key=key)
    with pytest.raises(TypeError, match="solver"):
        MonDEQ(2, 3, solver=solvers.Picard(1e-6, 1e-6), key=key)  # pyright: ignore
    with pytest.raises(TypeError, match="adjoint"):
        MonDEQ(2, 3, adjoint=fixpoint.UnrolledAdjoint(), key=key)
    with pytest.raises(ValueError, match="shape"):
        ConvMonDEQ(1, 2, (2, 3, 4), 3, key=key)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvMonDEQ(1, 2, (8, 8), (3,), key=key)
    net = MonDEQ(2, 3, key=key)
    with pytest.raises(ValueError, match=r"`x` must have shape \(2,\)"):
        net(jnp.zeros((4, 2)))
    op = net.operator()
    with pytest.raises(ValueError, match="`z0`"):
        PR.solve(op, jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(TypeError, match="operator"):
        PR.solve(net.W(), jnp.zeros(3))  # pyright: ignore
    with pytest.raises(ValueError, match="UnrolledAdjoint"):
        PR.solve(op, jnp.zeros(3), adjoint=fixpoint.UnrolledAdjoint())


def test_circular_conv_operator_checks_its_arguments():
    kernel = jnp.zeros((2, 2, 3, 3))
    with pytest.raises(ValueError, match="`m`"):
        CircularConvMonotone(kernel, kernel, 0.0, (4, 4))
    with pytest.raises(ValueError, match="`A` must have shape"):
        CircularConvMonotone(jnp.zeros((2, 3, 3, 3)), kernel, 0.5, (4, 4))
    with pytest.raises(ValueError, match="`B` must have shape"):
        CircularConvMonotone(kernel, jnp.zeros((2, 3, 3, 3)), 0.5, (4, 4))
    with pytest.raises(ValueError, match="same shape"):
        CircularConvMonotone(kernel, jnp.zeros((2, 2, 1, 1)), 0.5, (4, 4))
