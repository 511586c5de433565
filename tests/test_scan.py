"""`fixpoint.scan` against `jax.lax.scan`: every solver, forward and gradients."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixpoint
from fixpoint import layers, solvers
from fixpoint.solvers._deer import kalman_smoother

TOL = dict(rtol=1e-11, atol=1e-11)
SCAN_SOLVERS = {
    "sequential": solvers.Sequential(**TOL),
    "jacobi": solvers.Jacobi(**TOL),
    "gauss_seidel": solvers.GaussSeidel(block_size=7, **TOL),
    "deer": solvers.DEER(**TOL),
    "quasi_deer": solvers.QuasiDEER(**TOL),
    "quasi_deer_batched": solvers.QuasiDEER(batch_size=2, **TOL),
    "elk": solvers.ELK(**TOL),
    "elk_fixed": solvers.ELK(lambda_0=0.1, adaptive=False, **TOL),
    # Far from the identity on these cells: the loop's safeguard carries it.
    "picard_sum": solvers.PicardSum(**TOL),
}
T = 60


def _gru(key, d=3, n_in=2, scale=1.0):
    cell = eqx.nn.GRUCell(n_in, d, key=key, dtype=jnp.float64)
    return eqx.tree_at(lambda c: c.weight_hh, cell, cell.weight_hh * scale)


def _cells(key):
    """(name, f(params, h, x) -> (h, y), params, init) for a GRU, an LSTM and a user cell."""
    k1, k2, k3 = jax.random.split(key, 3)
    gru = _gru(k1, n_in=3)
    lstm = eqx.nn.LSTMCell(3, 3, key=k2, dtype=jnp.float64)
    w = 0.5 * jax.random.normal(k3, (3, 3), jnp.float64)

    def gru_f(p, h, x):
        h = p(x, h)
        return h, jnp.sum(h**2)

    def lstm_f(p, hc, x):
        hc = p(x, hc)
        return hc, {"h": hc[0], "x": x}

    def user_f(p, carry, x):
        # a pytree carry with two leaves
        a, b = carry["a"], carry["b"]
        a = jnp.sin(p @ a + x[:3]) + 0.1 * b
        b = jnp.tanh(b * x[0] + a[:1])
        return {"a": a, "b": b}, a[0] * b[0]

    zeros = jnp.zeros(3, jnp.float64)
    return [
        ("gru", gru_f, gru, zeros),
        ("lstm", lstm_f, lstm, (zeros, zeros)),
        ("user", user_f, w, {"a": zeros, "b": jnp.zeros(1, jnp.float64)}),
    ]


def _xs(key, n=T, d=3):
    return jax.random.normal(key, (n, d), jnp.float64)


def _weighted(out):
    leaves = jax.tree.leaves(out)
    weights = [
        (1 + jnp.arange(leaf.size) % 5).reshape(leaf.shape).astype(leaf.dtype) for leaf in leaves
    ]
    return sum(jnp.sum(jnp.sin(leaf) * w) for leaf, w in zip(leaves, weights, strict=True))


def _loss(scanner, f, p, init, xs, reverse=False):
    return _weighted(scanner(lambda h, x: f(p, h, x), init, xs, reverse=reverse))


# Every solver forwards; `reverse=True` for the solvers with direction-dependent code
# (block sweeps, the associative scans, the Kalman smoother's backward pass).
# Each case runs one of the three cells, in rotation (compiling dominates, and the
# pytree handling is the solvers' common front end): every cell meets Newton-type,
# fixed-point-type and reverse solvers, and every solver with a reverse case sees
# two different cells.
_FORWARD = {name: i % 3 for i, name in enumerate(SCAN_SOLVERS)}
CASES = [(name, False, cell) for name, cell in _FORWARD.items()] + [
    (name, True, (_FORWARD[name] + 1) % 3)
    for name in ("gauss_seidel", "deer", "quasi_deer", "elk", "picard_sum")
]


@pytest.mark.parametrize(("name", "reverse", "cell"), CASES)
def test_matches_lax_scan(name, reverse, cell, getkey):
    solver = SCAN_SOLVERS[name]
    xs = _xs(getkey())
    for cell_name, f, p, init in _cells(getkey())[cell : cell + 1]:
        g = lambda h, x, f=f, p=p: f(p, h, x)  # noqa: E731
        ref = jax.lax.scan(g, init, xs, reverse=reverse)

        def loss_and_out(p, init, xs, f=f):
            out = fixpoint.scan(lambda h, x: f(p, h, x), init, xs, solver=solver, reverse=reverse)
            return _weighted(out), out

        # Values and gradients from one compiled call (compiling dominates here).
        (_, out), grad = jax.jit(jax.value_and_grad(loss_and_out, argnums=(0, 1, 2), has_aux=True))(
            p, init, xs
        )
        assert jax.tree.structure(out) == jax.tree.structure(ref), cell_name
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9, err_msg=cell_name)

        grad_ref = jax.grad(_loss, argnums=(2, 3, 4))(jax.lax.scan, f, p, init, xs, reverse)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_ref), strict=True):
            # The bar for float64: 1e-9.
            np.testing.assert_allclose(
                a, b, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(b))), err_msg=cell_name
            )


def test_gradient_matches_finite_differences(getkey):
    _, f, p, init = _cells(getkey())[0]
    xs = _xs(getkey(), n=20)
    solver = solvers.DEER(**TOL)
    ours = lambda *a, **k: fixpoint.scan(*a, solver=solver, **k)  # noqa: E731
    g = jax.grad(_loss, argnums=4)(ours, f, p, init, xs)
    direction = jax.random.normal(getkey(), xs.shape, jnp.float64)
    eps = 1e-6
    fd = (
        _loss(ours, f, p, init, xs + eps * direction)
        - _loss(ours, f, p, init, xs - eps * direction)
    ) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, direction), fd, rtol=1e-7)


def test_forward_mode_matches_lax_scan(getkey):
    _, f, p, init = _cells(getkey())[0]
    xs, t = _xs(getkey()), _xs(getkey())
    ref = jax.jvp(lambda xs: jax.lax.scan(lambda h, x: f(p, h, x), init, xs), (xs,), (t,))
    solver = solvers.QuasiDEER(**TOL)
    out = jax.jvp(
        lambda xs: fixpoint.scan(lambda h, x: f(p, h, x), init, xs, solver=solver), (xs,), (t,)
    )
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)


def test_float32_gradients_match_lax_scan(getkey):
    """The issue's float32 bar, at the default tolerance of the solvers."""
    cell = eqx.nn.GRUCell(2, 8, key=getkey(), dtype=jnp.float32)
    xs = jax.random.normal(getkey(), (200, 2), jnp.float32)

    def loss(cell, scanner):
        _, hs = scanner(lambda h, x: (cell(x, h),) * 2, jnp.zeros(8, jnp.float32), xs)
        return jnp.sum(hs * jnp.cos(jnp.arange(8.0, dtype=jnp.float32)))

    ref = jax.grad(loss)(cell, jax.lax.scan)
    for solver in (solvers.DEER(), solvers.QuasiDEER(), solvers.ELK()):
        scanner = lambda *a, s=solver: fixpoint.scan(*a, solver=s)  # noqa: E731
        g = jax.jit(jax.grad(lambda c, scanner=scanner: loss(c, scanner)))(cell)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True):
            scale = float(jnp.max(jnp.abs(b)))
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale, type(solver).__name__


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.float64, 1e-6)])
def test_default_tolerances_follow_the_dtype(dtype, tol, getkey):
    """`rtol = atol = None` resolves per dtype: the same solve as passing the value."""
    assert fixpoint.internal.scan_tolerances(solvers.QuasiDEER(), dtype) == (tol, tol)
    assert fixpoint.internal.scan_tolerances(solvers.QuasiDEER(atol=0.5), dtype) == (tol, 0.5)
    cell = eqx.nn.GRUCell(2, 4, key=getkey(), dtype=dtype)
    xs = jax.random.normal(getkey(), (100, 2), dtype)

    @jax.jit
    def run(xs):
        out = [
            fixpoint.scan(
                lambda h, x: (cell(x, h),) * 2,
                jnp.zeros(4, dtype),
                xs,
                solver=s,
                return_solution=True,
            )
            for s in (solvers.QuasiDEER(), solvers.QuasiDEER(tol, tol))
        ]
        return [(o[1], o[2].stats["num_steps"]) for o in out]

    (h_default, n_default), (h_given, n_given) = run(xs)
    assert int(n_default) == int(n_given)
    np.testing.assert_array_equal(h_default, h_given)


@pytest.mark.parametrize("solver", [solvers.QuasiDEER(), solvers.ELK()], ids=["quasi_deer", "elk"])
def test_adjoint_recurrences_go_to_deer(solver, getkey):
    """Below D = 16 (and everywhere off the CPU) the adjoint's linear recurrences go
    to DEER, whose first Newton step solves them exactly and whose second certifies."""
    a = 0.9 * jax.random.normal(getkey(), (T, 3, 3), jnp.float64) / jnp.sqrt(3.0)
    b = jax.random.normal(getkey(), (T, 3), jnp.float64)
    cell = lambda h, x: x[0] @ h + x[1]  # noqa: E731
    problem = fixpoint.internal.ScanProblem(
        cell, jnp.zeros(3, jnp.float64), (a, b), fixpoint.internal.Time(), linear=True
    )
    active = solver.linear_solver(problem)
    assert isinstance(active, solvers.DEER)
    assert type(solver)(assume_diagonal=True).linear_solver(problem) == type(solver)(
        assume_diagonal=True
    )
    assert problem.refinement_method() == "newton"  # a linear recurrence at D < 16
    out, result, stats = fixpoint.internal.iterate_scan(
        active, problem, jnp.zeros((T, 3), jnp.float64), rtol=1e-10, atol=1e-10, max_steps=T
    )
    exact = jax.lax.scan(lambda h, x: (cell(h, x),) * 2, jnp.zeros(3, jnp.float64), (a, b))[1]
    assert result == fixpoint.RESULTS.successful and int(stats["num_steps"]) == 1
    np.testing.assert_allclose(out, exact, rtol=1e-10, atol=1e-12)


def test_exact_proposals_end_the_solve(getkey):
    """A sweep of the whole sequence is the answer: unsharded `Sequential` stops after
    its first sweep, and a refinement by sweep (the CPU) is returned without a second
    round, even where it moves steps far beyond the tolerance."""
    cell = _gru(getkey(), n_in=3, scale=3.0)
    xs = _xs(getkey())
    h0 = jnp.zeros(3, jnp.float64)
    f = lambda h, x: (cell(x, h),) * 2  # noqa: E731
    ref = jax.lax.scan(f, h0, xs)[1]
    problem = fixpoint.internal.ScanProblem(
        lambda h, x: cell(x, h), h0, xs, fixpoint.internal.Time()
    )
    assert problem.refinement_method() == "sweep"
    assert solvers.Sequential().exact(problem) == (True, True)
    assert solvers.QuasiDEER().exact(problem) == (False, True)
    assert solvers.QuasiDEER(assume_diagonal=True).exact(problem) == (False, False)
    assert solvers.DEER().exact(problem) == (False, False)
    _, ys, sol = fixpoint.scan(f, h0, xs, solver=solvers.Sequential(), return_solution=True)
    assert sol.result == fixpoint.RESULTS.successful and int(sol.stats["num_steps"]) == 1
    # The stats describe the returned sweep, not the guess it replaced.
    assert int(sol.stats["converged_steps"]) == xs.shape[0]
    assert float(sol.stats["residual"]) == 0.0
    np.testing.assert_allclose(ys, ref, rtol=1e-14, atol=1e-14)

    # Loose per-step tolerance: the residuals pass long before the trajectory is
    # right, so the sweep moves it by far more than the tolerance. It is returned
    # at once; certifying against it (as against a Newton step) takes more rounds.
    class Certifying(solvers.QuasiDEER):
        def exact(self, problem):
            return False, False

    loose = dict(rtol=0.1, atol=0.1)
    _, ys, sol = fixpoint.scan(f, h0, xs, solver=solvers.QuasiDEER(**loose), return_solution=True)
    _, ys_c, sol_c = fixpoint.scan(f, h0, xs, solver=Certifying(**loose), return_solution=True)
    assert sol.result == sol_c.result == fixpoint.RESULTS.successful
    assert int(sol.stats["num_steps"]) < int(sol_c.stats["num_steps"])
    np.testing.assert_allclose(ys, ref, rtol=1e-14, atol=1e-14)  # the sweep itself


@pytest.mark.parametrize(
    "solver",
    [
        solvers.Sequential(),
        solvers.Jacobi(),
        solvers.GaussSeidel(block_size=2),
        solvers.DEER(),
        solvers.QuasiDEER(),
        solvers.ELK(),
        solvers.Jacobi(norm=fixpoint.rms_norm),
    ],
    ids=lambda s: type(s).__name__,
)
def test_empty_carry(solver):
    """A carry with no entries: the outputs alone, as `lax.scan` gives them."""
    xs = jnp.arange(5.0)
    f = lambda c, x: (c, x * 2)  # noqa: E731
    ref = jax.lax.scan(f, jnp.zeros((0,)), xs)
    carry, ys, sol = fixpoint.scan(f, jnp.zeros((0,)), xs, solver=solver, return_solution=True)
    assert sol.result == fixpoint.RESULTS.successful and carry.shape == (0,)
    np.testing.assert_array_equal(ys, ref[1])


def test_length_only_and_solution(getkey):
    def f(h, _):
        h = jnp.cos(h)
        return h, h

    init = jnp.array([0.3, -1.0])
    ref = jax.lax.scan(f, init, None, length=50)
    carry, ys, sol = fixpoint.scan(
        f, init, None, 50, solver=solvers.DEER(**TOL), return_solution=True, record_residuals=True
    )
    np.testing.assert_allclose(ys, ref[1], atol=1e-10)
    np.testing.assert_allclose(carry, ref[0], atol=1e-10)
    np.testing.assert_allclose(sol.value, ref[1], atol=1e-10)
    assert sol.result == fixpoint.RESULTS.successful
    assert int(sol.stats["converged_steps"]) == 50
    steps = int(sol.stats["num_steps"])
    history = np.asarray(sol.stats["residual_history"])
    assert np.all(np.isfinite(history[: steps + 1])) and np.all(np.isnan(history[steps + 1 :]))
    assert history[steps] == sol.stats["residual"] and history[steps] < 1e-10


@pytest.mark.parametrize("name", ["sequential", "gauss_seidel", "jacobi"])
def test_length_only_sweeping_solvers(name):
    def f(h, _):
        return jnp.cos(h), h

    init = jnp.array(0.5, jnp.float64)
    ref = jax.lax.scan(f, init, None, length=6)
    for reverse in (False, True):
        out = fixpoint.scan(f, init, None, 6, solver=SCAN_SOLVERS[name], reverse=reverse)
        np.testing.assert_allclose(out[1], jax.lax.scan(f, init, None, 6, reverse=reverse)[1])
    np.testing.assert_allclose(out[0], ref[0])


def test_refinement_never_breaks_the_length_bound():
    """A chaotic tanh RNN where quasi-Newton's unfrozen refinement undoes converged steps."""
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    n = int(jax.random.randint(k[2], (), 8, 60))
    w = (2 + 3 * float(jax.random.uniform(k[0]))) * jax.random.normal(k[0], (3, 3)) / np.sqrt(3)
    xs = jax.random.normal(k[1], (n, 3))
    w, xs = w.astype(jnp.float64), xs.astype(jnp.float64)
    f = lambda c, x: (jnp.tanh(w @ c + x), None)  # noqa: E731
    init = jnp.zeros(3, jnp.float64)
    for tol in (1e-3, 1e-5):
        solver = solvers.QuasiDEER(rtol=tol, atol=tol)
        _, _, sol = fixpoint.scan(f, init, xs, solver=solver, throw=False, return_solution=True)
        assert sol.result == fixpoint.RESULTS.successful
        assert int(sol.stats["num_steps"]) <= n
        residual = sol.value - jax.vmap(lambda c, x: jnp.tanh(w @ c + x))(
            jnp.concatenate([init[None], sol.value[:-1]]), xs
        )
        assert np.all(np.abs(residual) < tol * (1 + np.abs(sol.value)))
    g = jax.grad(
        lambda xs: jnp.sum(
            fixpoint.scan(lambda c, x: (jnp.tanh(w @ c + x),) * 2, init, xs, solver=solver)[1]
        )
    )(xs)
    assert np.all(np.isfinite(g))


def test_throw_covers_integer_outputs():
    """Only an integer output is used: the run-time check must still run under jit."""

    def f(c, x):
        c = jnp.tanh(1.5 * c[::-1] + x)
        return c, jnp.argmax(c)

    xs = jax.random.normal(jax.random.PRNGKey(0), (20, 2), jnp.float64)
    init = jnp.array([0.1, 0.2], jnp.float64)
    run = jax.jit(
        lambda xs: fixpoint.scan(f, init, xs, solver=solvers.Jacobi(**TOL), max_steps=2)[1]
    )
    with pytest.raises(Exception, match="max_steps_reached"):
        run(xs).block_until_ready()


def test_guess_warm_start(getkey):
    _, f, p, init = _cells(getkey())[0]
    xs = _xs(getkey())
    g = lambda h, x: f(p, h, x)  # noqa: E731
    _, ys, cold = fixpoint.scan(g, init, xs, solver=solvers.Jacobi(**TOL), return_solution=True)
    _, ys2, warm = fixpoint.scan(
        g, init, xs, solver=solvers.Jacobi(**TOL), guess=cold.value, return_solution=True
    )
    assert int(warm.stats["num_steps"]) == 0 < int(cold.stats["num_steps"])
    np.testing.assert_allclose(ys2, ys)


def test_newton_diverges_but_steps_stay_bounded_by_length(getkey):
    """Recurrent weights x6: plain DEER blows up; the safeguard keeps it ≤ T iterations."""
    n = 200
    cell = _gru(getkey(), d=4, scale=6.0)
    xs = jax.random.normal(getkey(), (n, 2), jnp.float64)
    f = lambda h, x: (cell(x, h), None)  # noqa: E731
    init = jnp.zeros(4, jnp.float64)
    ref = jax.lax.scan(lambda h, x: (cell(x, h),) * 2, init, xs)[1]

    # Unsafeguarded Newton on the trajectory (DEER's step applied as is).
    problem = fixpoint.internal.ScanProblem(
        lambda h, x: cell(x, h), init, xs, fixpoint.internal.Time()
    )

    @jax.jit
    def newton(h):
        fh, jac = solvers.DEER().linearise(problem, h, None)
        return solvers.DEER().update(problem, h, fh, jac, jnp.zeros(n, bool), None)[0]

    h = jnp.zeros((n, 4), jnp.float64)
    biggest = 0.0
    for _ in range(8):
        h = newton(h)
        biggest = max(biggest, float(jnp.max(jnp.abs(h))))
    assert not biggest < 1e3, "premise: raw Newton should run off on this recurrence"

    for solver in (solvers.DEER(**TOL), solvers.QuasiDEER(**TOL), solvers.ELK(**TOL)):
        _, _, sol = jax.jit(
            lambda xs, solver=solver: fixpoint.scan(
                f, init, xs, solver=solver, return_solution=True
            )
        )(xs)
        assert sol.result == fixpoint.RESULTS.successful
        assert int(sol.stats["num_steps"]) <= n
        # Chaotic: tiny per-step residuals are amplified along the trajectory.
        np.testing.assert_allclose(sol.value, ref, atol=1e-6)


def test_elk_iterates_stay_bounded(getkey):
    n = 200
    cell = _gru(getkey(), d=4, scale=6.0)
    xs = jax.random.normal(getkey(), (n, 2), jnp.float64)
    f = lambda h, x: (cell(x, h), None)  # noqa: E731
    init = jnp.zeros(4, jnp.float64)
    biggest = {}
    for name, solver in (("elk", solvers.ELK(**TOL)), ("deer", solvers.DEER(**TOL))):
        values = []
        for k in (2, 20):
            _, _, sol = jax.jit(
                lambda xs, solver=solver, k=k: fixpoint.scan(
                    f, init, xs, solver=solver, max_steps=k, throw=False, return_solution=True
                )
            )(xs)
            assert np.all(np.isfinite(sol.value))
            values.append(float(jnp.max(jnp.abs(sol.value))))
        biggest[name] = max(values)
    # A GRU state stays in [-1, 1]; ELK's iterates stay near that box, DEER's do not.
    assert biggest["elk"] < 2.0
    assert biggest["deer"] > 10 * biggest["elk"]


def test_diagonal_gru_newton(getkey):
    cell = layers.DiagonalGRUCell(3, 5, key=getkey(), dtype=jnp.float64)
    h = jax.random.normal(getkey(), (5,), jnp.float64)
    x = jax.random.normal(getkey(), (3,), jnp.float64)
    jac = jax.jacfwd(lambda h: cell(x, h))(h)
    np.testing.assert_allclose(jac, jnp.diag(jnp.diag(jac)), atol=0)

    xs = jax.random.normal(getkey(), (500, 3), jnp.float64)
    rnn = layers.ParallelRNN(cell, solver=solvers.QuasiDEER(assume_diagonal=True, **TOL))
    sol = rnn.solve(xs)
    hs = sol.value
    np.testing.assert_array_equal(rnn(xs), hs)  # `__call__` is `solve(...).value`
    ref = jax.lax.scan(lambda h, x: (cell(x, h),) * 2, jnp.zeros(5, jnp.float64), xs)[1]
    np.testing.assert_allclose(hs, ref, atol=1e-10)
    assert int(sol.stats["num_steps"]) <= 8  # Newton: a handful, not hundreds


def test_parallel_rnn_cells(getkey):
    xs = jax.random.normal(getkey(), (80, 2), jnp.float64)
    for cell in (
        eqx.nn.GRUCell(2, 4, key=getkey(), dtype=jnp.float64),
        eqx.nn.LSTMCell(2, 4, key=getkey(), dtype=jnp.float64),
    ):
        rnn = layers.ParallelRNN(cell)
        assert isinstance(rnn.solver, solvers.DEER)
        hs = rnn(xs)
        h0 = rnn.initial_state()
        ref = jax.lax.scan(lambda h, x, c=cell: (c(x, h),) * 2, h0, xs)[1]
        for a, b in zip(jax.tree.leaves(hs), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert isinstance(
        layers.ParallelRNN(layers.DiagonalGRUCell(2, 3, key=getkey())).solver, solvers.QuasiDEER
    )
    with pytest.raises(ValueError, match="h0"):
        layers.ParallelRNN(lambda x, h: h)(xs)
    with pytest.raises(TypeError, match="solver"):
        layers.ParallelRNN(cell, solver=solvers.Picard(1e-6, 1e-6))


def test_parallel_rnn_trains(getkey):
    """A gradient step through ParallelRNN equals one through lax.scan."""
    cell = eqx.nn.GRUCell(2, 4, key=getkey(), dtype=jnp.float64)
    xs = jax.random.normal(getkey(), (50, 2), jnp.float64)

    def loss(cell, parallel):
        if parallel:
            hs = layers.ParallelRNN(cell, solver=solvers.DEER(**TOL))(xs)
        else:
            hs = jax.lax.scan(lambda h, x: (cell(x, h),) * 2, jnp.zeros(4, jnp.float64), xs)[1]
        return jnp.mean((hs[-10:] - 0.5) ** 2)

    g = eqx.filter_grad(loss)(cell, True)
    ref = eqx.filter_grad(loss)(cell, False)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_vmap_and_jit_agree(getkey):
    _, f, p, init = _cells(getkey())[0]
    batch = jax.random.normal(getkey(), (4, T, 3), jnp.float64)
    batch = batch.at[0].multiply(0.01)  # an easier sample: fewer iterations
    run = lambda xs: fixpoint.scan(
        lambda h, x: f(p, h, x),
        init,
        xs,  # noqa: E731
        solver=solvers.Jacobi(**TOL),
        return_solution=True,
    )
    out = jax.vmap(run)(batch)
    for i in range(4):
        single = run(batch[i])
        np.testing.assert_allclose(out[1][i], single[1], rtol=1e-12)
        assert int(out[2].stats["num_steps"][i]) == int(single[2].stats["num_steps"])
    steps = np.asarray(out[2].stats["num_steps"])
    assert steps[0] < steps.max()  # each sample stops on its own


def test_grad_of_vmap(getkey):
    _, f, p, init = _cells(getkey())[0]
    batch = jax.random.normal(getkey(), (3, 30, 3), jnp.float64)

    def loss(p, scanner):
        ys = jax.vmap(lambda xs: scanner(lambda h, x: f(p, h, x), init, xs)[1])(batch)
        return jnp.sum(ys)

    ref = jax.grad(loss)(p, jax.lax.scan)
    g = jax.grad(loss)(p, lambda *a: fixpoint.scan(*a, solver=solvers.DEER(**TOL)))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_no_retrace(getkey):
    _, f, p, init = _cells(getkey())[0]

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(xs):
        return fixpoint.scan(lambda h, x: f(p, h, x), init, xs, solver=solvers.DEER(**TOL))

    run(_xs(getkey()))
    run(_xs(getkey()))


def test_result_codes_and_errors(getkey):
    _, f, p, init = _cells(getkey())[0]
    xs = _xs(getkey())
    g = lambda h, x: f(p, h, x)  # noqa: E731
    _, _, sol = fixpoint.scan(
        g, init, xs, solver=solvers.Jacobi(**TOL), max_steps=3, throw=False, return_solution=True
    )
    assert sol.result == fixpoint.RESULTS.max_steps_reached
    assert 3 <= int(sol.stats["converged_steps"]) < T
    with pytest.raises(fixpoint.SolveError, match="max_steps_reached"):
        fixpoint.scan(g, init, xs, solver=solvers.Jacobi(**TOL), max_steps=3)
    with pytest.raises(Exception, match="max_steps_reached"):
        jax.jit(lambda xs: fixpoint.scan(g, init, xs, solver=solvers.Jacobi(**TOL), max_steps=3))(
            xs
        ).block_until_ready()

    # A NaN input at step 20: the sequential scan itself is non-finite from there on.
    bad = xs.at[20].set(jnp.nan)
    for solver in (solvers.Jacobi(**TOL), solvers.DEER(**TOL), solvers.ELK(**TOL)):
        _, _, sol = fixpoint.scan(g, init, bad, solver=solver, throw=False, return_solution=True)
        assert sol.result == fixpoint.RESULTS.nonfinite
        assert int(sol.stats["converged_steps"]) == 20


def test_backward_failure_is_flagged():
    """An infinite Jacobian at the solution: the backward recurrence is not finite."""

    def f(h, x):
        h = 0.5 * jnp.sqrt(jnp.abs(h)) + x  # d/dh is infinite at h = 0
        return h, h

    init = jnp.zeros(1, jnp.float64)
    xs = jnp.array([[0.0], [1.0], [0.5]], jnp.float64)
    ys = fixpoint.scan(f, init, xs, solver=solvers.Jacobi(**TOL))[1]
    np.testing.assert_allclose(ys, jax.lax.scan(f, init, xs)[1])

    def loss(xs, throw):
        return jnp.sum(fixpoint.scan(f, init, xs, solver=solvers.Jacobi(**TOL), throw=throw)[1])

    assert np.all(np.isnan(jax.grad(loss)(xs, False)))
    with pytest.raises(Exception, match="backward"):
        jax.grad(loss)(xs, True)


def test_bad_inputs_fail_at_trace_time():
    def f(h, x):
        return h * x, x

    init = jnp.zeros(2)
    xs = jnp.ones((5, 2))
    s = solvers.Jacobi()
    with pytest.raises(ValueError, match="same leading length"):
        fixpoint.scan(f, init, {"a": xs, "b": jnp.ones((4, 2))}, solver=s)
    with pytest.raises(ValueError, match="length=6"):
        fixpoint.scan(f, init, xs, 6, solver=s)
    with pytest.raises(ValueError, match="`length`"):
        fixpoint.scan(f, init, None, solver=s)
    with pytest.raises(TypeError, match="init"):
        fixpoint.scan(f, jnp.zeros(2, jnp.int32), xs, solver=s)
    with pytest.raises(ValueError, match="pair"):
        fixpoint.scan(lambda h, x: h, init, xs, solver=s)
    with pytest.raises(ValueError, match="structure of `init`"):
        fixpoint.scan(lambda h, x: ((h, h), x), init, xs, solver=s)
    with pytest.raises(ValueError, match="shape and dtype"):
        fixpoint.scan(lambda h, x: (jnp.zeros(3), x), init, xs, solver=s)
    with pytest.raises(TypeError, match="solver"):
        fixpoint.scan(f, init, xs, solver=solvers.Picard(1e-6, 1e-6))
    with pytest.raises(TypeError, match="reverse"):
        fixpoint.scan(f, init, xs, solver=s, reverse="yes")
    with pytest.raises(ValueError, match="guess"):
        fixpoint.scan(f, init, xs, solver=s, guess=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="xs"):
        fixpoint.scan(f, init, {"a": 1.0}, solver=s)
    with pytest.raises(ValueError, match="mesh"):
        fixpoint.scan(f, init, xs, solver=s, mesh="devices")
    with pytest.raises(ValueError, match="block_size"):
        solvers.GaussSeidel(block_size=0)
    with pytest.raises(ValueError, match="lambda_0"):
        solvers.ELK(lambda_0=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        solvers.DEER(rtol=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fixpoint.scan(f, init, xs, solver=s, tolerance=1e-3)


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_recurrence(diagonal, reverse, getkey):
    n, d = 37, 3
    a = 0.9 * jax.random.normal(getkey(), (n, d) if diagonal else (n, d, d), jnp.float64)
    b = jax.random.normal(getkey(), (n, d), jnp.float64)
    x = fixpoint.internal.linear_recurrence(fixpoint.internal.Time(), a, b, reverse)
    ref, prev = np.zeros((n, d)), np.zeros(d)
    for t in range(n - 1, -1, -1) if reverse else range(n):
        prev = (a[t] * prev if diagonal else a[t] @ prev) + b[t]
        ref[t] = prev
    np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.3, 5.0])
def test_kalman_smoother_solves_levenberg_marquardt(lam, reverse, getkey):
    """ELK's step minimises |Δ_t - a_t Δ_{t-1} - r_t|² + λ|Δ|² (dense check, per dim)."""
    n, d = 25, 2
    a = 2.0 * jax.random.normal(getkey(), (n, d), jnp.float64)  # unstable: |a| > 1 often
    r = jax.random.normal(getkey(), (n, d), jnp.float64)
    delta = kalman_smoother(fixpoint.internal.Time(), a, r, lam, reverse)
    for k in range(d):
        ak, rk = np.asarray(a[:, k]), np.asarray(r[:, k])
        if reverse:
            ak, rk = ak[::-1], rk[::-1]
        lower = np.eye(n) - np.diag(ak[1:], -1)
        ref = np.linalg.solve(lower.T @ lower + lam * np.eye(n), lower.T @ rk)
        got = np.asarray(delta[:, k])
        np.testing.assert_allclose(got[::-1] if reverse else got, ref, rtol=1e-8, atol=1e-10)


def test_sharded_equals_unsharded():
    """Four CPU devices (a subprocess: the device count is fixed when JAX starts)."""
    script = Path(__file__).with_name("sharded_scan_check.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all sharded checks passed" in out.stdout


class _BranchedDEER(solvers.DEER):
    """DEER through the loop's `lax.cond` between `update` and `refine`."""

    @property
    def refine_by_update(self) -> bool:
        return False


def test_refine_by_update_equals_the_branch():
    # DEER skips the loop's branch (`refine_by_update`): the same iterates, step
    # counts, in both directions.
    cell = _gru(jax.random.key(5), d=4, n_in=2, scale=2.0)
    xs = jax.random.normal(jax.random.key(6), (300, 2), jnp.float64)
    f = lambda h, x: (cell(x, h), None)  # noqa: E731
    init = jnp.zeros(4, jnp.float64)

    @jax.jit
    def run(xs):
        out = []
        for solver in (solvers.DEER(), _BranchedDEER()):
            for reverse in (False, True):
                _, _, sol = fixpoint.scan(
                    f, init, xs, solver=solver, reverse=reverse, return_solution=True
                )
                out.append((sol.value, sol.stats["num_steps"]))
        return out

    out = run(xs)
    fast, branched = out[:2], out[2:]
    for (a, n), (b, m) in zip(fast, branched, strict=True):
        assert int(n) == int(m) and int(n) > 2
        np.testing.assert_array_equal(a, b)


def test_deer_returns_its_last_newton_update():
    # At its default tolerance (1e-6) DEER's measured trajectory is only ~1e-7
    # from the sequential answer, but the certifying Newton step (which moved no
    # step beyond the tolerance) converges quadratically: it is what is returned.
    cell = _gru(jax.random.key(3), d=8, n_in=4)
    xs = jax.random.normal(jax.random.key(4), (1000, 4), jnp.float64)
    f = lambda h, x: (cell(x, h), None)  # noqa: E731
    init = jnp.zeros(8, jnp.float64)
    ref = jax.lax.scan(f, init, xs)[0]
    carry, _, sol = jax.jit(
        lambda xs: fixpoint.scan(f, init, xs, solver=solvers.DEER(), return_solution=True)
    )(xs)
    assert bool(sol.result == fixpoint.RESULTS.successful)
    np.testing.assert_allclose(carry, ref, rtol=0, atol=1e-10)
    # The residual reported is the measured trajectory's, far above the error
    # of the returned one: the two differ.
    assert float(sol.stats["residual"]) > 1e-9


@pytest.mark.parametrize("reverse", [False, True])
def test_newton_step_sequential_equals_parallel(reverse):
    # The two ways to one Newton step on the whole trajectory: the associative
    # scan of dense Jacobians, and the JVP sweep over time (the CPU default for
    # D >= 16). Same answer to rounding, in either direction.
    cell = _gru(jax.random.key(5), d=16, n_in=3)
    xs = _xs(jax.random.key(6), n=50)
    h0 = jnp.zeros(16, jnp.float64)
    problem = fixpoint.internal.ScanProblem(
        lambda h, x: cell(x, h), h0, xs, fixpoint.internal.Time(), reverse
    )
    h = jax.random.normal(jax.random.key(7), (50, 16), jnp.float64)
    par = problem.newton_step(h, method="parallel")
    seq = problem.newton_step(h, method="sequential")
    np.testing.assert_allclose(seq, par, rtol=1e-12, atol=1e-12)
    # On the CPU at D = 16 the default is the sequential sweep.
    np.testing.assert_array_equal(problem.newton_step(h), seq)
    with pytest.raises(ValueError, match="unknown method"):
        problem.newton_step(h, method="dense")
    # The certificate on the CPU, unsharded: the sequential answer itself, except
    # for an adjoint's linear recurrence below D = 16 (there the Newton step).
    ref = jax.lax.scan(lambda c, x: (cell(x, c),) * 2, h0, xs, reverse=reverse)[1]
    np.testing.assert_array_equal(problem.sweep(50), ref)
    np.testing.assert_array_equal(problem.refinement(h), ref)
    np.testing.assert_array_equal(problem.refinement(h, "newton"), seq)
    with pytest.raises(ValueError, match="unknown method"):
        problem.refinement(h, method="exact")
    small = fixpoint.internal.ScanProblem(
        lambda h, x: h[:3] * x, h0[:3], xs, fixpoint.internal.Time(), reverse
    )
    assert small.refinement_method() == "sweep" and small.newton_method() == "parallel"
    np.testing.assert_array_equal(small.refinement(h[:, :3]), small.sweep(50))
    linear = dataclasses.replace(small, linear=True)
    assert linear.refinement_method() == "newton"
    np.testing.assert_array_equal(linear.refinement(h[:, :3]), linear.newton_step(h[:, :3]))
    assert dataclasses.replace(problem, linear=True).refinement_method() == "sweep"


class _NewtonCertifiedQuasiDEER(solvers.QuasiDEER):
    """QuasiDEER certified by the parallel Newton step (the default off the CPU)."""

    def refine(self, problem, h, fh, diag, state):
        return problem.newton_step(h, "parallel"), state


@pytest.mark.parametrize("name", ["quasi_deer", "elk", "jacobi", "quasi_deer_newton"])
def test_sequential_certification_matches_lax_scan(name):
    # D = 16: on the CPU these solvers certify with the sequential answer (and
    # QuasiDEER and ELK hand the adjoint's recurrences to `Sequential`); the last
    # case certifies by the parallel Newton step instead (the accelerators'
    # default). Values and gradients still equal `lax.scan`.
    cell = _gru(jax.random.key(8), d=16, n_in=3)
    xs = _xs(jax.random.key(9), n=40)
    h0 = jnp.zeros(16, jnp.float64)
    f = lambda c, h, x: (c(x, h), h)  # noqa: E731
    solver = SCAN_SOLVERS.get(name) or _NewtonCertifiedQuasiDEER(**TOL)

    def loss(c, xs):
        out = fixpoint.scan(lambda h, x: f(c, h, x), h0, xs, solver=solver)
        return _weighted(out), out

    (_, out), grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(cell, xs)
    ref = jax.lax.scan(lambda h, x: f(cell, h, x), h0, xs)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)
    grad_ref = eqx.filter_grad(lambda c: _weighted(jax.lax.scan(lambda h, x: f(c, h, x), h0, xs)))(
        cell
    )
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(b))))
