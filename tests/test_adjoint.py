"""Gradients: every solver × adjoint against finite differences and each other."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import SOLVERS, contraction, finite_difference_grad

import fixpoint
from fixpoint import solvers

EXACT_ADJOINTS = {
    "implicit": fixpoint.ImplicitAdjoint(),
    "implicit_lu": fixpoint.ImplicitAdjoint(linear_solver=lx.LU()),
    "unrolled": fixpoint.UnrolledAdjoint(),
}


def _setup(n=5, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w = contraction(k1, n, 0.8)
    x = jax.random.normal(k2, (n,), jnp.float64)
    c = jax.random.normal(k3, (n,), jnp.float64)
    return w, x, c


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
@pytest.mark.parametrize("name", SOLVERS)
def test_gradient_matches_finite_differences(name, adjoint):
    w, x, c = _setup()

    def loss(x):
        sol = fixpoint.fixed_point(
            lambda z, x: jnp.tanh(w @ z + x),
            jnp.zeros(5),
            x,
            solver=SOLVERS[name](1e-12, 1e-12),
            adjoint=EXACT_ADJOINTS[adjoint],
            max_steps=500,
        )
        return jnp.dot(c, sol.value) + jnp.sum(sol.value**2)

    grad = jax.grad(loss)(x)
    fd = finite_difference_grad(loss, x)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["picard", "anderson", "newton", "broyden"])
def test_implicit_equals_unrolled(name):
    w, x, c = _setup(n=8, seed=1)

    def loss(x, adjoint):
        sol = fixpoint.fixed_point(
            lambda z, x: jnp.tanh(w @ z + x),
            jnp.zeros(8),
            x,
            solver=SOLVERS[name](1e-13, 1e-13),
            adjoint=adjoint,
            max_steps=500,
        )
        return jnp.dot(c, sol.value)

    implicit = jax.grad(loss)(x, fixpoint.ImplicitAdjoint(rtol=1e-13, atol=1e-13))
    unrolled = jax.grad(loss)(x, fixpoint.UnrolledAdjoint())
    np.testing.assert_allclose(implicit, unrolled, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["newton", "newton_krylov", "broyden"])
def test_root_find_gradient(name):
    # y^3 + y = a: dy/da = 1 / (3 y^2 + 1).
    a = jnp.array([0.3, -0.7, 1.1])
    y = fixpoint.root_find(lambda y, a: y**3 + y - a, jnp.zeros(3), a, solver=SOLVERS[name]()).value
    g = jax.grad(
        lambda a: jnp.sum(
            fixpoint.root_find(
                lambda y, a: y**3 + y - a, jnp.zeros(3), a, solver=SOLVERS[name]()
            ).value
        )
    )(a)
    np.testing.assert_allclose(g, 1 / (3 * y**2 + 1), rtol=1e-8)


def test_gradient_flows_to_closed_over_arrays_and_pytree_args():
    w, x, c = _setup()

    def loss(w, args):
        def fn(z, args):
            return {"p": jnp.tanh(w @ z["q"] + args["x"]), "q": 0.5 * z["p"] + args["s"] * c}

        y0 = {"p": jnp.zeros(5), "q": jnp.zeros(5)}
        sol = fixpoint.fixed_point(fn, y0, args, solver=solvers.Anderson(1e-12, 1e-12))
        return jnp.sum(sol.value["p"] ** 2) + jnp.sum(sol.value["q"])

    # `args` may hold non-arrays: they pass through untouched.
    def loss_ws(w, s):
        return loss(w, {"x": x, "s": s, "label": "not an array"})

    s = jnp.array(0.3)
    gw, gs = jax.grad(loss_ws, argnums=(0, 1))(w, s)
    np.testing.assert_allclose(
        gw, finite_difference_grad(lambda w: loss_ws(w, s), w), rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(gs, finite_difference_grad(lambda s: loss_ws(w, s), s), rtol=1e-6)


def test_implicit_gradient_wrt_y0_is_zero():
    w, x, _ = _setup()
    g = jax.grad(
        lambda y0: jnp.sum(
            fixpoint.fixed_point(
                lambda z, x: jnp.tanh(w @ z + x), y0, x, solver=solvers.Picard(1e-12, 1e-12)
            ).value
        )
    )(jnp.ones(5))
    np.testing.assert_array_equal(g, 0.0)


def test_forward_mode_and_transpose_consistency():
    w, x, c = _setup()

    def solve(x):
        return fixpoint.fixed_point(
            lambda z, x: jnp.tanh(w @ z + x), jnp.zeros(5), x, solver=solvers.Anderson(1e-12, 1e-12)
        ).value

    v = jnp.linspace(-1.0, 1.0, 5)
    u = c
    _, jv = jax.jvp(solve, (x,), (v,))
    _, vjp = jax.vjp(solve, x)
    (ju,) = vjp(u)
    np.testing.assert_allclose(jnp.dot(u, jv), jnp.dot(ju, v), rtol=1e-10)
    # And forward mode against finite differences.
    eps = 1e-6
    np.testing.assert_allclose(
        jv, (solve(x + eps * v) - solve(x - eps * v)) / (2 * eps), rtol=1e-6, atol=1e-9
    )


def test_vmap_of_grad_and_grad_of_vmap():
    w, _, c = _setup()
    xs = jax.random.normal(jax.random.key(3), (4, 5), jnp.float64)

    def loss(x):
        return jnp.dot(
            c,
            fixpoint.fixed_point(
                lambda z, x: jnp.tanh(w @ z + x),
                jnp.zeros(5),
                x,
                solver=solvers.Anderson(1e-12, 1e-12),
            ).value,
        )

    loop = jnp.stack([jax.grad(loss)(x) for x in xs])
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(loss)))(xs), loop, rtol=1e-9)
    np.testing.assert_allclose(
        jax.grad(lambda xs: jnp.sum(jax.vmap(loss)(xs)))(xs), loop, rtol=1e-9
    )


def test_hessian_vector_product():
    w, x, c = _setup()

    def loss(x):
        z = fixpoint.fixed_point(
            lambda z, x: jnp.tanh(w @ z + x), jnp.zeros(5), x, solver=solvers.Picard(1e-13, 1e-13)
        ).value
        return jnp.sum(z**3) + jnp.dot(c, z)

    v = jnp.ones(5)
    hvp = jax.jvp(jax.grad(loss), (x,), (v,))[1]
    eps = 1e-5
    fd = (jax.grad(loss)(x + eps * v) - jax.grad(loss)(x - eps * v)) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=1e-6, atol=1e-9)


def test_aux_is_differentiable():
    w, x, _ = _setup()

    def loss(x):
        sol = fixpoint.fixed_point(
            lambda z, x: (jnp.tanh(w @ z + x), jnp.sum(z**2)),
            jnp.zeros(5),
            x,
            solver=solvers.Anderson(1e-12, 1e-12),
            has_aux=True,
        )
        return sol.aux

    np.testing.assert_allclose(jax.grad(loss)(x), finite_difference_grad(loss, x), rtol=1e-6)


def test_phantom_and_neumann_errors_shrink():
    # Contraction with eigenvalues spread over [-0.95, 0.95] (symmetric W).
    n = 20
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (n, n), jnp.float64))
    w = q @ jnp.diag(jnp.linspace(-0.95, 0.95, n)) @ q.T
    c = jax.random.normal(jax.random.key(1), (n,), jnp.float64)
    x = 0.1 * jax.random.normal(jax.random.key(2), (n,), jnp.float64)

    def grad(adjoint):
        return jax.grad(
            lambda x: jnp.dot(
                c,
                fixpoint.fixed_point(
                    lambda z, x: jnp.tanh(w @ z + x),
                    jnp.zeros(n),
                    x,
                    solver=solvers.Anderson(1e-12, 1e-12),
                    adjoint=adjoint,
                ).value,
            )
        )(x)

    exact = grad(fixpoint.ImplicitAdjoint())
    ks = [1, 5, 20, 80]  # each k is a compile of its own
    rel = lambda g: float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))  # noqa: E731
    neumann = [rel(grad(fixpoint.NeumannAdjoint(terms=k))) for k in ks]
    phantom = [rel(grad(fixpoint.PhantomAdjoint(steps=k, damping=0.5))) for k in ks]
    # Measured: Neumann 0.74, 0.56, 0.27, 0.10, 0.019, 2.1e-3, 8.2e-5;
    #           phantom (damping 0.5) 0.86, 0.75, 0.51, 0.29, 0.11, 0.021, 1.6e-3.
    assert all(a > b for a, b in zip(neumann, neumann[1:], strict=False))
    assert all(a > b for a, b in zip(phantom, phantom[1:], strict=False))
    assert neumann[0] > 0.3 and phantom[0] > 0.3
    assert neumann[-1] < 1e-4 and phantom[-1] < 3e-3
    # The truncated series error is bounded by rho^k / (1 - rho).
    for k, e in zip(ks, neumann, strict=True):
        assert e <= 0.95**k / 0.05
    # One-step (JFB) is PhantomAdjoint(steps=1, damping=1): the gradient through f alone.
    jfb = grad(fixpoint.PhantomAdjoint(steps=1, damping=1.0))
    z = fixpoint.fixed_point(
        lambda z, x: jnp.tanh(w @ z + x), jnp.zeros(n), x, solver=solvers.Anderson(1e-12, 1e-12)
    ).value
    np.testing.assert_allclose(jfb, c * (1 - jnp.tanh(w @ z + x) ** 2), rtol=1e-9)


@pytest.mark.parametrize("throw", [False, True])
def test_failed_backward_solve_is_never_silent(throw):
    w, x, _ = _setup()
    # GMRES limited to one iteration cannot reach 1e-12.
    # One `throw` for both directions: the solve's (the forward solve succeeds).
    adjoint = fixpoint.ImplicitAdjoint(linear_solver=lx.GMRES(1e-12, 1e-12, max_steps=1, restart=1))

    def loss(x):
        return jnp.sum(
            fixpoint.fixed_point(
                lambda z, x: jnp.tanh(w @ z + x),
                jnp.zeros(5),
                x,
                solver=solvers.Picard(1e-12, 1e-12),
                adjoint=adjoint,
                throw=throw,
            ).value
        )

    if throw:
        with pytest.raises(Exception, match="backward .*linear solve failed"):
            jax.block_until_ready(jax.jit(jax.grad(loss))(x))
    else:
        g = jax.jit(jax.grad(loss))(x)
        assert np.all(np.isnan(g))
        # Forward mode flags it the same way.
        assert np.all(np.isnan(jax.jvp(loss, (x,), (jnp.ones(5),))[1]))


def test_custom_fixed_point_and_custom_root():
    w, x, c = _setup()
    fn = lambda z, x: jnp.tanh(w @ z + x)  # noqa: E731

    @fixpoint.custom_fixed_point(fn)
    def my_solver(y0, x):
        return jax.lax.fori_loop(0, 300, lambda _, z: fn(z, x), y0)

    @fixpoint.custom_root(lambda z, x: z - fn(z, x))
    def my_root_solver(y0, x):
        return jax.lax.fori_loop(0, 300, lambda _, z: fn(z, x), y0)

    reference = jax.grad(
        lambda x: jnp.dot(
            c, fixpoint.fixed_point(fn, jnp.zeros(5), x, solver=solvers.Newton(1e-13, 1e-13)).value
        )
    )(x)
    for solver in (my_solver, my_root_solver):

        def loss(x, solver=solver):
            return jnp.dot(c, solver(jnp.zeros(5), x))

        np.testing.assert_allclose(jax.grad(loss)(x), reference, rtol=1e-8)
        _, t = jax.jvp(loss, (x,), (jnp.ones(5),))
        np.testing.assert_allclose(t, jnp.sum(reference), rtol=1e-8)


def test_custom_fixed_point_checks_solver_output():
    @fixpoint.custom_fixed_point(lambda z, x: z)
    def bad_solver(y0, x):
        return y0[:2]

    with pytest.raises(ValueError, match="changed the shape"):
        bad_solver(jnp.zeros(3), None)


def _temp_bytes(adjoint, steps):
    w, x, _ = _setup(n=16)

    def loss(x):
        sol = fixpoint.fixed_point(
            lambda z, x: jnp.tanh(w @ z + x),
            jnp.zeros(16),
            x,
            solver=solvers.Picard(1e-30, 1e-30),
            adjoint=adjoint,
            max_steps=steps,
            throw=False,
        )
        return jnp.sum(sol.value)

    return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes


def test_implicit_memory_does_not_grow_with_steps():
    implicit = [_temp_bytes(fixpoint.ImplicitAdjoint(), s) for s in (10, 100, 1000)]
    assert implicit[0] == implicit[1] == implicit[2]
    # Storing every step (one checkpoint per step) grows linearly.
    unrolled = [_temp_bytes(fixpoint.UnrolledAdjoint(checkpoints=s), s) for s in (10, 100, 1000)]
    assert unrolled[2] > 5 * unrolled[1] > 25 * unrolled[0] / 5
    assert unrolled[2] > 10 * implicit[2]


# ---- a masked failed sample whose map is NaN at its start (issue 31, 6) -------

MASKING_ADJOINTS = {
    **EXACT_ADJOINTS,
    "neumann": fixpoint.NeumannAdjoint(terms=30),
    "phantom": fixpoint.PhantomAdjoint(),
}
_X = jnp.array([1.0, 2.0, -7.0, 3.0])
_GOOD = np.array([0, 1, 3])  # x = -7: no real fixed point, and sqrt(0.4 y - 7) is NaN at y0


def _sqrt_solve(w, x, adjoint=EXACT_ADJOINTS["implicit"], kind="fixed_point"):
    fs = lambda y, p: jnp.sqrt(p[0] * y + p[1])  # noqa: E731
    entry, fn = (fixpoint.fixed_point, fs)
    if kind == "root":
        entry, fn = (fixpoint.root_find, lambda y, p: y - fs(y, p))
    solver = solvers.Anderson(1e-10, 1e-10)
    return entry(fn, jnp.ones(2), (w, x), solver=solver, throw=False, adjoint=adjoint)


def _masked_sqrt_loss(w, x, adjoint=EXACT_ADJOINTS["implicit"], kind="fixed_point"):
    def one(x):
        sol = _sqrt_solve(w, x, adjoint, kind)
        return jnp.where(sol.result == fixpoint.RESULTS.successful, sol.value.sum(), 0.0)

    return jax.vmap(one)(x).sum()


def _sqrt_dy_dw(w, x):
    # y = sqrt(w y + x): y = (w + r) / 2 with r = sqrt(w² + 4x), so dy/dw = (1 + w / r) / 2.
    return (1 + w / np.sqrt(w**2 + 4 * np.asarray(x))) / 2


@pytest.mark.parametrize(
    "adjoint, kind",
    [(a, "fixed_point") for a in MASKING_ADJOINTS] + [("implicit", "root"), ("unrolled", "root")],
)
def test_masked_sample_with_nan_map_at_start_contributes_zero(adjoint, kind):
    # A zero cotangent gives exactly zero, whatever the failed sample's Jacobian
    # holds (here NaN, at every point its solve visited).
    adj = MASKING_ADJOINTS[adjoint]
    grad = jax.jit(jax.grad(lambda w, x: _masked_sqrt_loss(w, x, adj, kind)))
    g = grad(0.4, _X)
    assert np.isfinite(g)
    if adjoint == "phantom":  # approximate by design: against itself on the good samples
        np.testing.assert_allclose(g, grad(0.4, _X[_GOOD]), rtol=1e-12)
    else:
        np.testing.assert_allclose(g, 2 * np.sum(_sqrt_dy_dw(0.4, _X[_GOOD])), rtol=1e-8)


def test_masked_sample_with_nan_map_at_start_against_good_samples_alone():
    ok = jax.vmap(lambda x: _sqrt_solve(0.4, x).result == fixpoint.RESULTS.successful)(_X)
    assert np.asarray(ok).tolist() == [True, True, False, True]
    grad = jax.jit(jax.grad(_masked_sqrt_loss))
    g = grad(0.4, _X)
    np.testing.assert_allclose(g, grad(0.4, _X[_GOOD]), rtol=1e-12)
    loss = lambda w: _masked_sqrt_loss(w, _X)  # noqa: E731
    np.testing.assert_allclose(g, finite_difference_grad(loss, jnp.asarray(0.4)), rtol=1e-6)

    # Forward mode, per sample: the failed sample's derivative is NaN exactly
    # where its own tangent is nonzero, and zero where it is zero.
    def values(x):
        return jax.vmap(lambda x: _sqrt_solve(0.4, x).value)(x)

    jac = jax.jit(jax.jacfwd(values))(_X)
    failed = np.asarray(jac[2])  # d value_2 / d x, shape (2, 4)
    assert np.all(np.isnan(failed[:, 2]))
    np.testing.assert_array_equal(failed[:, _GOOD], 0.0)
    dy_dx = 1 / np.sqrt(0.16 + 4 * np.asarray(_X[_GOOD]))
    np.testing.assert_allclose(jac[_GOOD, 0, _GOOD], dy_dx, rtol=1e-8)
