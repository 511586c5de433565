"""Batch compaction (`fixpoint.Compaction`): same answers, less work under `vmap`.

Every comparison is against the same solve with `compaction=None` at the same
commit: result codes and step counts identical, values equal to a few ulps.
The batch of 8 is compacted into buckets 8, 4, 2.
"""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVERS, finite_difference_grad

import fixpoint
from fixpoint import layers, solvers

D, B = 6, 8
COMPACT = fixpoint.Compaction(factor=2, min_batch=2)


def _problem():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    w = (q * rng.uniform(0.5, 1.0, D)) @ q.T
    # Contraction factors from easy to hard (the hardest do not converge within
    # a budget of 60 steps); one sample is not finite.
    s = np.array([0.3, 0.97, 0.5, 0.4, 0.999, 0.9, 0.6, 0.3])
    x = 0.1 * rng.normal(size=(B, D))
    x[7, 2] = np.nan
    return jnp.asarray(w), jnp.asarray(s), jnp.asarray(x)


W, S, X = _problem()


def _map(z, args):
    w, s, x = args
    return jnp.tanh(s * (w @ z) + x)


def _aux_map(z, args):
    out = _map(z, args)
    return out, {"size": jnp.sum(out**2)}


@ft.cache
def _batched(solver_name, compact, kind="fixed_point", has_aux=False, record=False):
    solver = SOLVERS[solver_name](1e-10, 1e-10)
    entry = fixpoint.fixed_point if kind == "fixed_point" else fixpoint.root_find
    fn = _aux_map if has_aux else _map
    if kind == "root":
        fn = lambda z, a: z - _map(z, a)  # noqa: E731

    def one(w, s, x):
        sol = entry(
            fn,
            jnp.zeros(D),
            (w, s, x),
            solver=solver,
            max_steps=60,
            throw=False,
            has_aux=has_aux,
            record_residuals=record,
            compaction=COMPACT if compact else None,
        )
        return sol.value, sol.result._value, sol.stats, sol.aux

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def _same(plain, compacted):
    value_p, code_p, stats_p, aux_p = plain
    value_c, code_c, stats_c, aux_c = compacted
    np.testing.assert_array_equal(code_p, code_c)
    np.testing.assert_array_equal(stats_p["num_steps"], stats_c["num_steps"])
    np.testing.assert_allclose(value_c, value_p, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(stats_c["residual"], stats_p["residual"], rtol=1e-10, atol=1e-14)
    if "residual_history" in stats_p:
        np.testing.assert_allclose(
            stats_c["residual_history"], stats_p["residual_history"], rtol=1e-10, atol=1e-15
        )
    assert jax.tree.structure(aux_p) == jax.tree.structure(aux_c)
    for a, b in zip(jax.tree.leaves(aux_p), jax.tree.leaves(aux_c), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12)


@pytest.mark.parametrize("name", ["picard", "anderson", "newton", "broyden"])
def test_codes_steps_and_values_match_the_plain_loop(name):
    plain = _batched(name, False)(W, S, X)
    compacted = _batched(name, True)(W, S, X)
    _same(plain, compacted)
    codes = {int(c) for c in np.asarray(compacted[1])}
    # The batch mixes successes with failures of both kinds the loop reports here.
    assert int(fixpoint.RESULTS.successful._value) in codes
    assert int(fixpoint.RESULTS.nonfinite._value) in codes
    if name == "picard":
        assert int(fixpoint.RESULTS.max_steps_reached._value) in codes


def test_root_find_aux_and_residual_history_match():
    _same(_batched("newton", False, "root")(W, S, X), _batched("newton", True, "root")(W, S, X))
    _same(
        _batched("picard", False, has_aux=True, record=True)(W, S, X),
        _batched("picard", True, has_aux=True, record=True)(W, S, X),
    )


def test_compaction_does_less_work():
    # `jax.debug.callback` under `vmap` runs once per sample and evaluation, so
    # it counts the work each loop does.
    calls = []

    def fn(z, args):
        s, x = args
        jax.debug.callback(lambda _: calls.append(1), s)
        return jnp.tanh(s * z + x)

    s = jnp.array([0.1] * 7 + [0.99])
    x = jnp.full((8, 3), 0.1)
    counts, steps = {}, {}
    for compact in (None, COMPACT):
        calls.clear()
        solve = jax.vmap(
            lambda s, x, c=compact: fixpoint.fixed_point(
                fn, jnp.zeros(3), (s, x), solver=solvers.Picard(1e-8, 1e-8), compaction=c
            ).stats["num_steps"]
        )
        steps[compact] = jax.block_until_ready(jax.jit(solve)(s, x))
        counts[compact] = len(calls)
    np.testing.assert_array_equal(steps[None], steps[COMPACT])
    slow, fast = int(steps[None][-1]), int(steps[None][0])
    assert counts[None] == 8 * (slow + 1)
    # Buckets 8 (until at most 4 run), 4, 2: the fast samples stop costing
    # once they are done.
    assert counts[COMPACT] < 8 * (fast + 1) + 2 * (slow + 1)


def _loss(w, x, compact, adjoint=None):
    s = S[:4]
    if adjoint is None:
        # The backward GMRES is compacted too (between restart cycles).
        adjoint = fixpoint.ImplicitAdjoint(compaction=COMPACT if compact else None)

    def one(s, x):
        return fixpoint.fixed_point(
            _map,
            jnp.zeros(D),
            (w, s, x),
            solver=solvers.Picard(1e-12, 1e-12),
            adjoint=adjoint,
            max_steps=2000,
            compaction=COMPACT if compact else None,
        ).value

    z = jax.vmap(one)(s, x)
    return jnp.sum(jnp.sin(z) * jnp.arange(1.0, 1.0 + D))


def test_gradients_grad_of_vmap_and_vmap_of_grad():
    x = X[:4]
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnums=2)
    gw, gx = grad(W, x, True)
    gw_plain, gx_plain = grad(W, x, False)
    np.testing.assert_allclose(gw, gw_plain, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gx, gx_plain, rtol=1e-9, atol=1e-12)
    fd = finite_difference_grad(lambda x_: _loss(W, x_, True), x)
    np.testing.assert_allclose(gx, fd, rtol=1e-6, atol=1e-8)

    # vmap of grad: per-sample gradients of the same loss.
    def per_sample(s, x):
        def f(x):
            return fixpoint.fixed_point(
                _map,
                jnp.zeros(D),
                (W, s, x),
                solver=solvers.Picard(1e-12, 1e-12),
                max_steps=2000,
                compaction=COMPACT,
            ).value

        return jax.grad(lambda x: jnp.sum(jnp.sin(f(x)) * jnp.arange(1.0, 1.0 + D)))(x)

    np.testing.assert_allclose(jax.jit(jax.vmap(per_sample))(S[:4], x), gx, rtol=1e-9, atol=1e-12)


def test_unrolled_adjoint_is_not_compacted_and_still_differentiates():
    x = X[:4]
    unrolled = fixpoint.UnrolledAdjoint()
    g = jax.jit(jax.grad(lambda x: _loss(W, x, True, unrolled)))(x)
    g_implicit = jax.jit(jax.grad(lambda x: _loss(W, x, True)))(x)
    np.testing.assert_allclose(g, g_implicit, rtol=1e-8, atol=1e-10)


def test_nested_vmap_and_eager_match():
    def one(s, x):
        return fixpoint.fixed_point(
            _map, jnp.zeros(D), (W, s, x), solver=solvers.Picard(1e-10, 1e-10), compaction=COMPACT
        ).value

    s2, x2 = S[:4].reshape(2, 2), X[:4].reshape(2, 2, D)
    nested = jax.jit(jax.vmap(jax.vmap(one)))(s2, x2)
    flat = jax.vmap(one)(S[:4], X[:4])  # eager
    np.testing.assert_allclose(nested.reshape(4, D), flat, rtol=1e-13)


def test_throw_under_vmap_names_the_failed_samples():
    codes = np.asarray(_batched("picard", True)(W, S, X)[1])
    failed = int(np.sum(codes != int(fixpoint.RESULTS.successful._value)))
    assert failed >= 2
    solve = jax.vmap(
        lambda s, x: (
            fixpoint.fixed_point(
                _map,
                jnp.zeros(D),
                (W, s, x),
                solver=solvers.Picard(1e-10, 1e-10),
                max_steps=60,
                compaction=COMPACT,
            ).value
        )
    )
    with pytest.raises(Exception, match=f"{failed} of 8 samples failed"):
        jax.block_until_ready(jax.jit(solve)(S, X))


def test_mondeq_splitting_loop_is_compacted_with_the_same_answers():
    x = jax.random.normal(jax.random.key(1), (8, 5), jnp.float64)
    x = x * jnp.linspace(0.1, 10, 8)[:, None]
    results = {}
    for compact in (None, COMPACT):
        model = layers.MonDEQ(
            5, 12, key=jax.random.key(0), dtype=jnp.float64, throw=False, compaction=compact
        )
        sol = jax.jit(jax.vmap(model.solve))(x)
        results[compact] = (sol.value, sol.result._value, sol.stats, None)
    assert len(set(np.asarray(results[None][2]["num_steps"]).tolist())) > 1
    _same(results[None], results[COMPACT])


def test_python_numbers_in_the_carry():
    # As `lax.while_loop`: a carry may hold Python numbers, and a body may return them.
    def run(x):
        return fixpoint.internal.compacted_while_loop(
            lambda c: c[1] < x, lambda c: (c[0] + 1, c[1] + 1.0), (0, 0.0), COMPACT
        )

    np.testing.assert_array_equal(run(3.0)[0], 3)
    np.testing.assert_array_equal(jax.vmap(run)(jnp.arange(4.0))[0], [0, 1, 2, 3])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="factor"):
        fixpoint.Compaction(factor=1)
    with pytest.raises(ValueError, match="min_bucket"):
        fixpoint.Compaction(min_bucket=0)
    with pytest.raises(TypeError, match="compaction"):
        fixpoint.fixed_point(
            _map, jnp.zeros(D), (W, S[0], X[0]), solver=solvers.Picard(1e-6, 1e-6), compaction=True
        )
    with pytest.raises(TypeError, match="compaction"):
        layers.MonDEQ(2, 3, key=jax.random.key(0), compaction="on")


def test_bucket_sizes():
    assert fixpoint.Compaction().sizes(8) == [8]  # below `min_batch`
    assert fixpoint.Compaction().sizes(64) == [64, 16, 4, 2]
    assert fixpoint.Compaction(factor=2, min_batch=2).sizes(8) == [8, 4, 2]
    assert fixpoint.Compaction(factor=2, min_batch=2, min_bucket=1).sizes(8) == [8, 4, 2, 1]
    assert fixpoint.Compaction(factor=4, min_bucket=2).sizes(256) == [256, 64, 16, 4, 2]
    assert fixpoint.Compaction(factor=2, min_batch=4).sizes(3) == [3]
    assert fixpoint.Compaction(factor=2, min_batch=2).sizes(5) == [5, 3, 2]


def _coupled(w, x, compaction, adjoint, on="y"):
    # `psum` over the `vmap` axis couples the samples: y_i = w cos(y_i) + mean(y) / 10 + x_i
    # (`on="y"`), or y_i = w cos(y_i) + mean(x) (`on="args"`: the Jacobian in `y` has no `psum`).
    batch = x.shape[0]

    def one(x):
        def f(y, a):
            if on == "y":
                return w * jnp.cos(y) + 0.1 * jax.lax.psum(y, "b") / batch + a
            return w * jnp.cos(y) + jax.lax.psum(a, "b") / batch

        solver = solvers.Picard(1e-12, 1e-12)
        return fixpoint.fixed_point(
            f, jnp.zeros(2), x, solver=solver, compaction=compaction, adjoint=adjoint
        ).value

    return jax.vmap(one, axis_name="b")(x)


def _coupled_as_one(w, x, on="y"):
    # The same equations as one solve of the whole batch.
    def f(y, x):
        if on == "y":
            return w * jnp.cos(y) + 0.1 * jnp.mean(y, axis=0) + x[:, None]
        return w * jnp.cos(y) + jnp.mean(x)

    zeros = jnp.zeros((x.shape[0], 2))
    return fixpoint.fixed_point(f, zeros, x, solver=solvers.Picard(1e-12, 1e-12)).value


@pytest.mark.parametrize("batch", [2, 8, 16])
def test_collective_over_the_vmap_axis(batch):
    # Buckets cannot follow a collective over the `vmap` axis: below `min_batch`
    # (16) the plain loop runs, from it a trace-time error names the way out.
    x = jnp.linspace(0.0, 1.0, batch)
    loss = lambda w, c, a: jnp.sum(jnp.sin(_coupled(w, x, c, a)))  # noqa: E731
    off = (None, fixpoint.ImplicitAdjoint(compaction=None))
    if batch >= 16:
        with pytest.raises(ValueError, match="axis 'b'.*`compaction=None`"):
            _coupled(0.5, x, fixpoint.Compaction(), off[1])
        with pytest.raises(ValueError, match=r"`ImplicitAdjoint\(compaction=None\)`"):
            jax.grad(loss)(0.5, None, fixpoint.ImplicitAdjoint())
        default = off
        # A collective on `args` alone is not in the derivative's linear solve
        # (its operator is the Jacobian in `y`): that solve may still be compacted.
        args_only = lambda w: jnp.sum(_coupled(w, x, None, fixpoint.ImplicitAdjoint(), "args"))  # noqa: E731
        t = jax.jvp(args_only, (0.5,), (1.0,))[1]
        g_one = jax.grad(lambda w: jnp.sum(_coupled_as_one(w, x, "args")))(0.5)
        np.testing.assert_allclose(t, g_one, rtol=1e-9)
    else:
        default = (fixpoint.Compaction(), fixpoint.ImplicitAdjoint())
    np.testing.assert_allclose(_coupled(0.5, x, *default), _coupled_as_one(0.5, x), rtol=1e-11)
    g = jax.jit(jax.grad(loss), static_argnums=(1, 2))(0.5, *default)
    g_one = jax.grad(lambda w: jnp.sum(jnp.sin(_coupled_as_one(w, x))))(0.5)
    np.testing.assert_allclose(g, g_one, rtol=1e-9)
    if batch == 2:
        fd = finite_difference_grad(lambda w: loss(w, *default), jnp.asarray(0.5))
        np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_collective_over_an_outer_vmap_axis():
    # Only the innermost `vmap` is compacted; a collective over an outer axis
    # would then couple other samples in each bucket (other step counts): refused
    # at trace time, while an inner batch below `min_batch` runs the plain loop.
    def nested(s, compaction):
        def one(s):
            f = lambda y, s: s * jnp.cos(y) + 0.04 * jax.lax.pmean(y, "b")  # noqa: E731
            solver = solvers.Picard(1e-12, 1e-12)
            return fixpoint.fixed_point(f, jnp.zeros(2), s, solver=solver, compaction=compaction)

        return jax.vmap(jax.vmap(one), axis_name="b")(s).value

    with pytest.raises(ValueError, match="axis 'b'.*`compaction=None`"):
        jax.eval_shape(lambda s: nested(s, fixpoint.Compaction()), jnp.zeros((2, 16)))
    s = jnp.linspace(0.1, 0.9, 32).reshape(16, 2)
    np.testing.assert_array_equal(nested(s, fixpoint.Compaction()), nested(s, None))
