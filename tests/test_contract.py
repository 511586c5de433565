"""The convergence contract: what `successful` guarantees, and no silent wrong answers.

One regression test per report of issue #9, in float32 where the report was
float32 and in float64.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from helpers import SOLVERS

import fixpoint
from fixpoint import layers, solvers

OK = fixpoint.RESULTS.successful
DTYPES = [jnp.float32, jnp.float64]
SCAN_SOLVERS = {
    "sequential": solvers.Sequential,
    "jacobi": solvers.Jacobi,
    "gauss_seidel": lambda: solvers.GaussSeidel(block_size=16),
    "deer": solvers.DEER,
    "quasi_deer": solvers.QuasiDEER,
    "elk": solvers.ELK,
    "picard_sum": solvers.PicardSum,
}


# ---- 1. scans: small per-step residuals are not a small error -----------------


def _integrator(h, x):
    return h + x, None


@pytest.mark.parametrize("name", SCAN_SOLVERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_integrator_accumulated_error(name, dtype):
    # Every step's residual (5e-7) is within atol = 1e-6 from the start, but
    # the error adds up to 5e-3 along the sequence.
    xs = jnp.full((10_000, 2), 5e-7, dtype)
    final, _, sol = fixpoint.scan(
        _integrator, jnp.zeros(2, dtype), xs, solver=SCAN_SOLVERS[name](), return_solution=True
    )
    assert bool(sol.result == OK)
    exact = jax.lax.scan(lambda h, x: (h + x, h + x), jnp.zeros(2, dtype), xs)[1]
    tol = 1e-6 + 1e-6 * jnp.abs(exact)
    assert bool(jnp.all(jnp.abs(sol.value - exact) <= 2 * tol)), name
    np.testing.assert_allclose(final, 5e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_warm_start_is_certified(dtype):
    xs = jnp.full((10_000, 2), 1e-3, dtype)
    guess = jnp.cumsum(xs * 1.0005, axis=0)  # each step's residual is 5e-7
    final, _, sol = fixpoint.scan(
        _integrator,
        jnp.zeros(2, dtype),
        xs,
        solver=solvers.Jacobi(),
        guess=guess,
        return_solution=True,
    )
    assert bool(sol.result == OK)
    want, _ = jax.lax.scan(_integrator, jnp.zeros(2, dtype), xs)  # 10.0004 in float32
    np.testing.assert_allclose(final, want, rtol=2e-6)


def _gru(d, scale, dtype, key):
    cell = eqx.nn.GRUCell(4, d, key=key, dtype=dtype)
    return eqx.tree_at(lambda c: c.weight_hh, cell, cell.weight_hh * scale)


@pytest.mark.parametrize("name", ["jacobi", "gauss_seidel", "quasi_deer", "elk", "deer"])
def test_scan_long_memory_gru_within_tolerance(name, getkey):
    # QuasiDEER and ELK used to stop with errors ~10x the tolerance here.
    cell = _gru(16, 3.0, jnp.float64, getkey())
    xs = jax.random.normal(getkey(), (600, 4))
    f = lambda h, x: (cell(x, h), cell(x, h))  # noqa: E731
    _, want = jax.lax.scan(f, jnp.zeros(16), xs)
    _, ys, sol = fixpoint.scan(
        f, jnp.zeros(16), xs, solver=SCAN_SOLVERS[name](), return_solution=True
    )
    assert bool(sol.result == OK)
    tol = 1e-6 + 1e-6 * jnp.abs(want)
    assert float(jnp.max(jnp.abs(ys - want) / tol)) <= 2.0


# ---- 2. no fixed point or root: never successful ------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SOLVERS)
def test_no_root_is_not_successful(name, dtype):
    sol = fixpoint.root_find(
        lambda y, a: jnp.tanh(y) + 2.0,
        jnp.zeros(1, dtype),
        solver=SOLVERS[name](1e-4, 1e-4),
        throw=False,
    )
    assert not bool(sol.result == OK)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SOLVERS)
def test_runaway_fixed_point_is_not_successful(name, dtype):
    # Under the old rule y = 100 "converged": |1| < 0.01 + 0.01 * 100.
    sol = fixpoint.fixed_point(
        lambda y, a: y + 1.0,
        jnp.zeros(1, dtype),
        solver=SOLVERS[name](1e-2, 1e-2),
        throw=False,
        max_steps=500,
    )
    assert not bool(sol.result == OK)


def test_splitting_loop_shares_the_rule():
    # A monotone problem converges; the residual test is the shared one.
    w = solvers.MonotoneMatrix(0.5 * jnp.eye(3), 0.5)
    sol = solvers.PeacemanRachford(1e-8, 0.0).solve(w, jnp.array([1.0, -1.0, 0.0]))
    assert bool(sol.result == OK)
    np.testing.assert_allclose(sol.value, [2.0, 0.0, 0.0], atol=1e-7)


# ---- 3. the gradient of a failed solve is NaN, and a masked one poisons nothing --

ADJOINTS = {
    "implicit": fixpoint.ImplicitAdjoint(),
    "implicit_lu": fixpoint.ImplicitAdjoint(linear_solver=lx.LU()),
    "phantom": fixpoint.PhantomAdjoint(),
    "neumann": fixpoint.NeumannAdjoint(),
    "unrolled": fixpoint.UnrolledAdjoint(),
}


def _cos_solve(a, adjoint, dtype):
    # Every root of y = cos(5 y) repels Picard: the solve ends at max_steps.
    return fixpoint.fixed_point(
        lambda y, a: jnp.cos(a * y),
        jnp.ones(1, dtype),
        a,
        solver=solvers.Picard(1e-6, 1e-6),
        throw=False,
        adjoint=adjoint,
        max_steps=64,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_failed_solve_has_nan_gradient(adjoint, dtype):
    a = jnp.asarray(5.0, dtype)
    sol = _cos_solve(a, ADJOINTS[adjoint], dtype)
    assert not bool(sol.result == OK)
    g = jax.grad(lambda a: _cos_solve(a, ADJOINTS[adjoint], dtype).value.sum())(a)
    assert bool(jnp.isnan(g))
    if adjoint != "unrolled":  # forward mode too
        t = jax.jvp(lambda a: _cos_solve(a, ADJOINTS[adjoint], dtype).value, (a,), (1.0 * a,))[1]
        assert bool(jnp.all(jnp.isnan(t)))


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_masked_failed_sample_does_not_poison_the_batch(adjoint):
    # One shared parameter `w`; sample 1 fails (a = 5), sample 0 converges.
    adj = ADJOINTS[adjoint]

    def solve(w, a):
        return fixpoint.fixed_point(
            lambda y, args: w * jnp.cos(args * y),
            jnp.ones(1),
            a,
            solver=solvers.Picard(1e-8, 1e-8),
            throw=False,
            adjoint=adj,
            max_steps=200,
        )

    def loss(w, a):
        sol = jax.vmap(lambda a: solve(w, a))(a)
        ok = sol.result == OK
        return jnp.sum(jnp.where(ok[:, None], sol.value, 0.0))

    a = jnp.array([0.5, 5.0])
    sol = jax.vmap(lambda a: solve(1.0, a))(a)
    assert np.asarray(sol.result == OK).tolist() == [True, False]
    g = jax.grad(loss)(1.0, a)
    g_alone = jax.grad(lambda w: solve(w, a[0]).value.sum())(1.0)
    np.testing.assert_allclose(g, g_alone, rtol=1e-6)


def test_custom_fixed_point_checks_the_returned_point():
    fn = lambda y, a: jnp.cos(a * y)  # noqa: E731

    @fixpoint.custom_fixed_point(fn)
    def sloppy(y0, a):
        return y0  # never iterates: cos(y0) != y0

    @fixpoint.custom_fixed_point(fn, rtol=1e-10, atol=1e-10)
    def good(y0, a):
        y = y0
        for _ in range(200):
            y = fn(y, a)
        return y

    assert bool(jnp.isnan(jax.grad(lambda a: sloppy(jnp.ones(1), a).sum())(1.0)))
    g = jax.grad(lambda a: good(jnp.ones(1), a).sum())(1.0)
    y = good(jnp.ones(1), 1.0)[0]
    # y = cos(a y): dy/da = -sin(a y) y / (1 + a sin(a y)) at a = 1.
    np.testing.assert_allclose(g, -jnp.sin(y) * y / (1 + jnp.sin(y)), rtol=1e-8)


# ---- 4. loading a checkpoint keeps the settings ------------------------------


def test_checkpoint_keeps_solver_settings(tmp_path, getkey):
    key = getkey()
    saved = layers.MonDEQ(3, 4, key=key, solver=solvers.PeacemanRachford(1e-5, 1e-5))
    eqx.tree_serialise_leaves(tmp_path / "m.eqx", saved)
    like = layers.MonDEQ(
        3,
        4,
        key=key,
        solver=solvers.PeacemanRachford(rtol=1e-2, atol=1e-3),
        adjoint=fixpoint.PhantomAdjoint(),
    )
    loaded = eqx.tree_deserialise_leaves(tmp_path / "m.eqx", like)
    assert loaded.solver.rtol == 1e-2 and isinstance(loaded.adjoint, fixpoint.PhantomAdjoint)

    rnn = layers.ParallelRNN(eqx.nn.GRUCell(2, 3, key=key), solver=solvers.DEER(1e-5, 1e-5))
    eqx.tree_serialise_leaves(tmp_path / "r.eqx", rnn)
    like = layers.ParallelRNN(
        eqx.nn.GRUCell(2, 3, key=key),
        solver=solvers.ELK(rtol=1e-3),
        adjoint_solver=solvers.Jacobi(),
    )
    loaded = eqx.tree_deserialise_leaves(tmp_path / "r.eqx", like)
    assert isinstance(loaded.solver, solvers.ELK) and loaded.solver.rtol == 1e-3
    assert isinstance(loaded.adjoint_solver, solvers.Jacobi)


# ---- 5. throw=True under jit, whichever output is used ------------------------


def test_throw_under_jit_when_only_stats_are_used():
    @jax.jit
    def steps(a):
        sol = fixpoint.fixed_point(
            lambda y, a: jnp.cos(a * y), jnp.ones(1), a, solver=solvers.Picard(1e-6, 1e-6)
        )
        return sol.stats["num_steps"], sol.result == OK

    with pytest.raises(Exception, match="max_steps_reached"):
        jax.block_until_ready(steps(5.0))

    @jax.jit
    def mondeq_steps(b):
        w = solvers.MonotoneMatrix(0.5 * jnp.eye(2), 0.5)
        return solvers.PeacemanRachford(1e-12, 1e-12).solve(w, b, max_steps=2).stats["num_steps"]

    with pytest.raises(Exception, match="max_steps_reached"):
        jax.block_until_ready(mondeq_steps(jnp.array([1.0, 2.0])))


# ---- 6. atol = 0 and exact solutions -----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_exact_solution_with_zero_atol(name, dtype):
    sol = fixpoint.fixed_point(
        lambda y, a: jax.nn.relu(y - 1.0),
        jnp.full(2, 0.5, dtype),
        solver=SOLVERS[name](1e-4, 0.0),
        throw=False,
    )
    assert bool(sol.result == OK)
    assert int(sol.stats["num_steps"]) <= 3
    np.testing.assert_array_equal(sol.value, 0.0)


def test_scaled_size_zero_over_zero():
    norm = fixpoint.max_norm
    assert float(fixpoint.internal.scaled_size(norm, jnp.zeros(2), jnp.zeros(2), 1e-4, 0.0)) == 0.0
    assert float(
        fixpoint.internal.scaled_size(norm, jnp.array([0.0, 1e-30]), jnp.zeros(2), 1e-4, 0.0)
    ) == (np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_division_free_max_norm_test_equals_the_scaled_norm(dtype):
    # The loop tests `max |v / scale| < 1` for the max-norm by comparisons alone
    # (`_convergence._misses`); it must decide exactly as the division would,
    # also at the boundary (`|v|` one ulp either side of the scale), for NaN,
    # inf, subnormals and zero scales.
    from fixpoint._convergence import _misses, _ratio

    rng = np.random.default_rng(0)
    tiny = np.finfo(dtype).smallest_subnormal
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, tiny, 1.0, -1.0, 1e30], dtype)
    ref = rng.standard_normal(4000).astype(dtype)
    ref = np.concatenate([ref, special, special[:, None].repeat(len(special), 1).ravel()])
    v = np.concatenate([rng.standard_normal(4000).astype(dtype), special, np.tile(special, 9)])
    cases = []
    for rtol, atol in [(1e-3, 1e-6), (1e-3, 0.0), (0.0, 1e-6), (0.0, 0.0)]:
        scale = (dtype(atol) + dtype(rtol) * np.abs(ref)).astype(dtype)
        # |v| exactly at, one ulp below and one ulp above the scale.
        at = np.concatenate([scale, np.nextafter(scale, 0), np.nextafter(scale, np.inf)])
        for vv, rr in [(v, ref), (at, np.tile(ref, 3)), (-at, np.tile(ref, 3))]:
            cases.append((vv, rr, rtol, atol))
    for vv, rr, rtol, atol in cases:
        vv, rr = jnp.asarray(vv, dtype), jnp.asarray(rr, dtype)
        by_division = jnp.abs(_ratio(vv, rr, rtol, atol)) < 1  # `scaled_size` entrywise
        by_comparison = _misses(vv, rr, rtol, atol) < 1
        np.testing.assert_array_equal(by_comparison, by_division)


def test_picard_keeps_the_step_test_for_a_user_norm():
    # Undamped Picard's step test is skipped only for the library's (even)
    # norms; a user `norm` keeps it, even one that is not symmetric (review).
    solver = solvers.Picard(1e-3, 1e-6, norm=lambda v: jnp.sum(v))
    sol = fixpoint.fixed_point(lambda y, a: 0.5 * y + 1.0, jnp.zeros(3), solver=solver)
    assert int(sol.stats["num_steps"]) > 0
    np.testing.assert_allclose(sol.value, 2.0, rtol=1e-2)


def test_scan_failed_solve_has_nan_gradient_and_masks_cleanly(getkey):
    w = 0.5 * jax.random.normal(getkey(), (3, 3))
    xs = jax.random.normal(getkey(), (2, 40, 3))

    def run(w, xs, max_steps):
        f = lambda h, x: (jnp.tanh(w @ h + x), None)  # noqa: E731
        _, _, sol = fixpoint.scan(
            f,
            jnp.zeros(3),
            xs,
            solver=solvers.Jacobi(),
            max_steps=max_steps,
            throw=False,
            return_solution=True,
        )
        return sol

    assert not bool(run(w, xs[0], 2).result == OK)
    g = jax.grad(lambda w: run(w, xs[0], 2).value.sum())(w)
    assert bool(jnp.all(jnp.isnan(g)))

    def masked(w):
        # Sample 0 gets the full budget, sample 1 fails; the loss masks it out.
        sol0, sol1 = run(w, xs[0], 60), run(w, xs[1], 2)
        return sol0.value.sum() + jnp.where(sol1.result == OK, sol1.value.sum(), 0.0)

    g = jax.grad(masked)(w)
    g0 = jax.grad(lambda w: run(w, xs[0], 60).value.sum())(w)
    np.testing.assert_allclose(g, g0, rtol=1e-9)


def test_forward_mode_of_failed_solve_is_nan_even_if_the_start_is_flat():
    # At y0 = 0, d/da tanh(a y) vanishes: the derivative must still be NaN.
    f = lambda y, a: jnp.tanh(a * y) + 0.5  # noqa: E731

    def run(a):
        return fixpoint.fixed_point(
            f, jnp.zeros(1), a, solver=solvers.Picard(1e-10, 1e-10), throw=False, max_steps=2
        ).value

    assert bool(jnp.all(jnp.isnan(jax.jvp(run, (0.5,), (1.0,))[1])))
    assert bool(jnp.all(jnp.isnan(jax.jacfwd(run)(0.5))))
    xs = jnp.linspace(-1, 1, 20)[:, None]

    def scan_loss(a):
        f = lambda h, x: (jnp.tanh(a * h + x), h)  # noqa: E731
        return fixpoint.scan(
            f, jnp.zeros(1), xs, solver=solvers.Jacobi(1e-8, 1e-8), throw=False, max_steps=2
        )[1].sum()

    assert bool(jnp.isnan(jax.jvp(scan_loss, (1.5,), (1.0,))[1]))
