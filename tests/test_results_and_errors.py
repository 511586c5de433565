"""Every result code on purpose; every bad input gets a readable error."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SOLVERS

import fixpoint
from fixpoint import solvers

P = solvers.Picard(1e-8, 1e-8)


def test_successful():
    sol = fixpoint.fixed_point(lambda y, _: 0.5 * y + 1, jnp.zeros(2), solver=P)
    assert bool(sol.result == fixpoint.RESULTS.successful)


def test_max_steps_reached():
    sol = fixpoint.fixed_point(
        lambda y, _: jnp.cos(y), jnp.zeros(2), solver=P, max_steps=3, throw=False
    )
    assert bool(sol.result == fixpoint.RESULTS.max_steps_reached)
    assert int(sol.stats["num_steps"]) == 3
    # The value is the iterate whose residual is reported.
    np.testing.assert_allclose(
        sol.stats["residual"], jnp.max(jnp.abs(jnp.cos(sol.value) - sol.value))
    )


@pytest.mark.parametrize("name", SOLVERS)
def test_diverged_stops_early(name):
    # x -> 1.5 x + 1 has the fixed point -2, but iteration from 0 runs away.
    sol = fixpoint.fixed_point(
        lambda y, _: 1.5 * y + 1,
        jnp.zeros(3),
        solver=SOLVERS[name](),
        throw=False,
        max_steps=10_000,
    )
    if name.startswith(("newton", "anderson", "broyden")):
        # Methods that see the linear structure find the (repelling) fixed point
        # (Broyden after its first rejected trial teaches it the Jacobian's sign).
        assert bool(sol.result == fixpoint.RESULTS.successful)
        np.testing.assert_allclose(sol.value, -2.0, rtol=1e-8)
    else:
        assert bool(sol.result == fixpoint.RESULTS.diverged)
        assert int(sol.stats["num_steps"]) <= 40


def test_nonfinite_y0():
    sol = fixpoint.fixed_point(
        lambda y, _: jnp.cos(y), jnp.array([jnp.nan, 1.0]), solver=P, throw=False
    )
    assert bool(sol.result == fixpoint.RESULTS.nonfinite)
    assert int(sol.stats["num_steps"]) == 0


@pytest.mark.parametrize("name", SOLVERS)
def test_nonfinite_from_fn(name):
    # log(y) + 10 = 0 from y = 1: every method's first step lands at y < 0.
    # Solvers that can back off from a non-finite trial point do so and solve it.
    sol = fixpoint.root_find(
        lambda y, _: jnp.log(y) + 10, jnp.ones(1), solver=SOLVERS[name](), throw=False
    )
    if name.startswith("picard"):
        assert bool(sol.result == fixpoint.RESULTS.nonfinite)
    else:
        assert bool(sol.result == fixpoint.RESULTS.successful)
        np.testing.assert_allclose(sol.value, np.exp(-10.0), rtol=1e-6)
    # Non-finite at the start: nothing to back off to.
    sol = fixpoint.root_find(
        lambda y, _: jnp.log(y) + 10, -jnp.ones(1), solver=SOLVERS[name](), throw=False
    )
    assert bool(sol.result == fixpoint.RESULTS.nonfinite)


def test_nonfinite_args():
    sol = fixpoint.fixed_point(
        lambda y, a: 0.5 * y + a, jnp.zeros(2), jnp.array([1.0, jnp.inf]), solver=P, throw=False
    )
    assert bool(sol.result == fixpoint.RESULTS.nonfinite)


def _nan_at_7(y, a):
    # A contraction whose 8th entry turns NaN once the iterate passes 0.5 there.
    out = 0.5 * y + a
    return out.at[7].set(jnp.where(y[7] > 0.5, jnp.nan, out[7]))


@pytest.mark.parametrize("n", [64, 5000, 300_000])
def test_one_nan_among_many_entries(n):
    # XLA:CPU's library max-reduction (4096 entries or more) drops NaNs; the norms
    # must not: one NaN entry is `nonfinite`, never `max_steps_reached` or success.
    y0, a = jnp.zeros(n, jnp.float32), jnp.ones(n, jnp.float32)
    sol = fixpoint.fixed_point(_nan_at_7, y0, a, solver=solvers.Picard(1e-5, 1e-5), throw=False)
    assert bool(sol.result == fixpoint.RESULTS.nonfinite)
    assert not np.isfinite(float(sol.stats["residual"]))
    x = jnp.ones(n, jnp.float32).at[n // 3].set(jnp.nan)
    for norm in (fixpoint.max_norm, jax.jit(fixpoint.max_norm)):
        assert np.isnan(float(norm(x)))
    assert float(fixpoint.max_norm(x.at[n // 3].set(-3.0))) == 3.0


def test_one_nan_in_a_large_batch():
    # Under `vmap` the batch's norms are one reduction of batch × entries: 2048
    # samples of 4 entries, one of them NaN from the start.
    batch = jnp.zeros((2048, 4), jnp.float32)
    a = jnp.ones((2048, 4), jnp.float32).at[1000, 2].set(jnp.nan)
    solve = lambda y0, a: fixpoint.fixed_point(  # noqa: E731
        lambda y, a: 0.5 * y + a, y0, a, solver=solvers.Picard(1e-5, 1e-5), throw=False
    )
    sol = jax.vmap(solve)(batch, a)
    codes = np.asarray(sol.result._value)
    assert codes[1000] == fixpoint.RESULTS.nonfinite._value
    assert np.all(np.delete(codes, 1000) == fixpoint.RESULTS.successful._value)
    rows = jnp.abs(a).at[5, 0].set(jnp.inf)
    norms = np.asarray(jax.jit(jax.vmap(fixpoint.max_norm))(rows))
    assert np.isnan(norms[1000]) and norms[5] == np.inf and np.all(np.delete(norms, [5, 1000]) == 1)


def test_linear_solve_failed():
    # g(y) = y^2 + 1 at y = 0: the Jacobian is singular, the residual is not zero.
    sol = fixpoint.root_find(
        lambda y, _: y**2 + 1, jnp.zeros(1), solver=solvers.Newton(1e-8, 1e-8), throw=False
    )
    assert bool(sol.result == fixpoint.RESULTS.linear_solve_failed)


def test_throw_eager_message():
    with pytest.raises(fixpoint.SolveError, match=r"result `max_steps_reached` after 3 steps"):
        fixpoint.fixed_point(lambda y, _: jnp.cos(y), jnp.zeros(2), solver=P, max_steps=3)


def test_throw_under_jit_message():
    @jax.jit
    def run(y0):
        return fixpoint.fixed_point(lambda y, _: 1.5 * y + 1, y0, solver=P).value

    with pytest.raises(Exception, match=r"result `diverged` after \d+ steps"):
        jax.block_until_ready(run(jnp.zeros(2)))


def test_throw_under_vmap_names_failing_sample():
    def run(c):
        return fixpoint.fixed_point(lambda y, c: c * y + 1, jnp.zeros(2), c, solver=P).value

    with pytest.raises(Exception, match=re.escape("(1 of 3 samples failed; the first is #1)")):
        jax.block_until_ready(jax.jit(jax.vmap(run))(jnp.array([0.5, 1.5, 0.2])))


def test_throw_false_batch_survives_one_failure():
    def run(c):
        return fixpoint.fixed_point(lambda y, c: c * y + 1, jnp.zeros(2), c, solver=P, throw=False)

    sol = jax.jit(jax.vmap(run))(jnp.array([0.5, 1.5, 0.2]))
    ok = np.asarray(sol.result == fixpoint.RESULTS.successful)
    np.testing.assert_array_equal(ok, [True, False, True])
    np.testing.assert_allclose(sol.value[0], 2.0, rtol=1e-7)
    np.testing.assert_allclose(sol.value[2], 1.25, rtol=1e-7)


def test_record_residuals():
    sol = fixpoint.fixed_point(
        lambda y, _: 0.5 * y + 1, jnp.zeros(2), solver=P, record_residuals=True, max_steps=64
    )
    hist = np.asarray(sol.stats["residual_history"])
    n = int(sol.stats["num_steps"])
    assert hist.shape == (65,)
    np.testing.assert_allclose(hist[: n + 1], 0.5 ** np.arange(n + 1), rtol=1e-12)
    assert np.all(np.isnan(hist[n + 1 :]))
    np.testing.assert_allclose(hist[n], sol.stats["residual"])


# ---- bad input --------------------------------------------------------------


def test_shape_mismatch_names_leaf():
    with pytest.raises(ValueError, match=r"changed the shape of `y0\['b'\]`"):
        fixpoint.fixed_point(
            lambda y, _: {"a": y["a"], "b": y["b"][:1]},
            {"a": jnp.zeros(2), "b": jnp.zeros(3)},
            solver=P,
        )


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="changed the dtype of `y0`"):
        fixpoint.fixed_point(lambda y, _: y.astype(jnp.float32), jnp.zeros(2), solver=P)


def test_pytree_mismatch():
    with pytest.raises(ValueError, match="same structure as `y0`"):
        fixpoint.fixed_point(lambda y, _: [y], jnp.zeros(2), solver=P)


def test_forgot_has_aux():
    with pytest.raises(ValueError, match="did you forget `has_aux=True`"):
        fixpoint.fixed_point(lambda y, _: (y, 1.0), jnp.zeros(2), solver=P)


def test_has_aux_needs_pair():
    with pytest.raises(ValueError, match="`has_aux=True`"):
        fixpoint.fixed_point(lambda y, _: y, jnp.zeros(2), solver=P, has_aux=True)


def test_has_aux_value():
    sol = fixpoint.fixed_point(
        lambda y, _: (0.5 * y + 1, {"sq": y**2}), jnp.zeros(2), solver=P, has_aux=True
    )
    np.testing.assert_allclose(sol.aux["sq"], sol.value**2)


def test_integer_y0():
    with pytest.raises(TypeError, match="`y0` has dtype int"):
        fixpoint.fixed_point(lambda y, _: y, jnp.zeros(2, int), solver=P)


def test_non_array_y0():
    with pytest.raises(TypeError, match=r"`y0\['a'\]` must be an array"):
        fixpoint.fixed_point(lambda y, _: y, {"a": "text"}, solver=P)


def test_empty_y0():
    with pytest.raises(ValueError, match="`y0` must contain at least one array"):
        fixpoint.fixed_point(lambda y, _: y, {}, solver=P)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: solvers.Picard(-1.0, 1e-6), "`rtol` must be a non-negative"),
        (lambda: solvers.Picard(1e-6, -1.0), "`atol` must be a non-negative"),
        (lambda: solvers.Picard(0.0, 0.0), "cannot both be zero"),
        (lambda: solvers.Picard(1e-6, 1e-6, damping=0.0), "`damping` must lie in"),
        (lambda: solvers.Picard(1e-6, 1e-6, damping=1.5), "`damping` must lie in"),
        (lambda: solvers.Anderson(1e-6, 1e-6, history=0), "`history` must be an int >= 1"),
        (lambda: solvers.Anderson(1e-6, 1e-6, ridge=-1.0), "`ridge` must be a number >= 0"),
        (lambda: solvers.Broyden(1e-6, 1e-6, history=0), "`history` must be an int >= 1"),
        (
            lambda: solvers.Newton(1e-6, 1e-6, linear_solver="lu"),
            "`linear_solver` must be a lineax",
        ),
        (lambda: fixpoint.PhantomAdjoint(steps=0), "`steps` must be an int >= 1"),
        (lambda: fixpoint.NeumannAdjoint(terms=0), "`terms` must be an int >= 1"),
        (lambda: fixpoint.UnrolledAdjoint(checkpoints=0), "`checkpoints` must be an int >= 1"),
    ],
)
def test_invalid_options(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# Every option that takes a Python number takes a NumPy scalar, through one shared
# set of validators, and stores the Python number (a NumPy float64 option would
# otherwise promote float32 iterates).
_NUMPY_OPTIONS = [
    lambda: solvers.Anderson(np.float32(1e-6), np.float64(1e-6), history=np.int64(5)),
    lambda: solvers.Anderson(1e-6, 1e-6, damping=np.float32(0.5), max_weight=np.int32(10)),
    lambda: solvers.Broyden(1e-6, 1e-6, history=np.int32(3), min_step=np.float64(0.01)),
    lambda: solvers.Picard(1e-6, 1e-6, damping=np.float32(0.5)),
    lambda: solvers.Newton(1e-6, 1e-6, damping=np.float64(0.9)),
    lambda: solvers.Halpern(1e-6, 1e-6, restart_ratio=np.float32(0.5)),
    lambda: solvers.GaussSeidel(block_size=np.int64(4)),
    lambda: solvers.Jacobi(window=np.int64(8)),
    lambda: solvers.ELK(lambda_0=np.float32(0.5), batch_size=np.int16(4)),
    lambda: solvers.PeacemanRachford(1e-6, 1e-6, alpha=np.float32(0.5)),
    lambda: solvers.JacobiDecoding(window=np.int64(5)),
    lambda: solvers.LookaheadDecoding(ngram=np.int8(3)),
    lambda: fixpoint.ImplicitAdjoint(rtol=np.float32(1e-8), restart=np.int64(5)),
    lambda: fixpoint.PhantomAdjoint(steps=np.int64(2), damping=np.float32(0.5)),
    lambda: fixpoint.NeumannAdjoint(terms=np.int64(3)),
    lambda: fixpoint.UnrolledAdjoint(checkpoints=np.int64(3)),
    lambda: fixpoint.Compaction(factor=np.int64(2), min_batch=np.int32(4)),
]


@pytest.mark.parametrize("make", _NUMPY_OPTIONS)
def test_numpy_scalars_are_options(make):
    module = make()
    for name, value in vars(module).items():
        assert not isinstance(value, np.generic), f"{type(module).__name__}.{name}"


def test_numpy_scalars_are_layer_options(getkey):
    from fixpoint import layers

    cgs = layers.CGS(3, 1, 4, gamma=np.float32(0.5), temperature=np.float32(0.25), key=getkey())
    ignn = layers.IGNN(3, 2, kappa=np.float32(0.75), max_steps=np.int64(20), key=getkey())
    deq = layers.DEQ(lambda z, x: z, max_steps=np.int32(10), dropout=np.float32(0.1))
    mon = layers.MonDEQ(2, 3, m=np.float64(0.5), max_steps=np.int64(9), key=getkey())
    assert (cgs.gamma, cgs.temperature, ignn.kappa, ignn.max_steps) == (0.5, 0.25, 0.75, 20)
    assert type(cgs.gamma) is float and type(ignn.max_steps) is int
    assert (deq.max_steps, mon.m, mon.max_steps) == (10, 0.5, 9)
    assert type(deq.dropout) is float and type(mon.m) is float
    with pytest.raises(ValueError, match="CGS: `gamma` must lie in \\(0, 1\\), got 1.5"):
        layers.CGS(3, 1, 4, gamma=np.float32(1.5), key=getkey())
    with pytest.raises(TypeError, match="IGNN: `kappa` must be a real number"):
        layers.IGNN(3, 2, kappa=True, key=getkey())


def test_float32_solve_with_numpy_float64_options():
    # A NumPy float64 damping must not promote a float32 solve.
    solver = solvers.Picard(np.float64(1e-5), np.float64(1e-5), damping=np.float64(0.5))
    sol = fixpoint.fixed_point(lambda y, _: 0.5 * y + 1, jnp.zeros(2, jnp.float32), solver=solver)
    assert sol.value.dtype == jnp.float32
    np.testing.assert_allclose(sol.value, 2.0, rtol=1e-4)


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="histroy"):
        solvers.Anderson(1e-6, 1e-6, histroy=3)
    with pytest.raises(TypeError, match="tol"):
        fixpoint.fixed_point(lambda y, _: y, jnp.zeros(1), solver=P, tol=1e-3)


def test_bad_entry_arguments():
    with pytest.raises(ValueError, match="`max_steps` must be an int >= 1"):
        fixpoint.fixed_point(lambda y, _: y, jnp.zeros(1), solver=P, max_steps=0)
    with pytest.raises(TypeError, match="`max_steps` must be an int"):
        fixpoint.fixed_point(lambda y, _: y, jnp.zeros(1), solver=P, max_steps=2.5)
    with pytest.raises(TypeError, match="`solver` must be an instance"):
        fixpoint.fixed_point(lambda y, _: y, jnp.zeros(1), solver="picard")
    with pytest.raises(TypeError, match="`adjoint` must be an instance"):
        fixpoint.fixed_point(lambda y, _: y, jnp.zeros(1), solver=P, adjoint="implicit")
    with pytest.raises(TypeError, match="`fn` must be callable"):
        fixpoint.fixed_point(3, jnp.zeros(1), solver=P)
    with pytest.raises(ValueError, match="`divergence_ratio` must be a number > 1"):
        fixpoint.fixed_point(lambda y, _: y, jnp.zeros(1), solver=P, divergence_ratio=0.5)


def test_errors_at_trace_time_under_jit():
    # Bad shapes fail while tracing, before anything runs.
    traced = eqx.filter_jit(lambda y: fixpoint.fixed_point(lambda y, _: y[:1], y, solver=P))
    with pytest.raises(ValueError, match="changed the shape"):
        traced(jnp.zeros(3))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_loop_scalars_round_trip_exactly(dtype):
    # The loop carries its counters as the bits of floats: any count, any
    # result code and every residual norm must come back exactly, also through
    # the selects of a `vmap`ped loop and a gather.
    S = fixpoint.internal.LoopScalars
    big = 2**31 - 5 if jnp.finfo(dtype).bits <= 32 else 2**40 + 3
    residual = jnp.asarray(np.finfo(np.float16).tiny / 3, dtype)  # a subnormal in float16
    packed = jnp.stack(
        [
            S(
                residual, jnp.asarray(np.inf, dtype), jnp.asarray(np.nan, dtype), step, res, run
            ).pack(dtype)
            for step, res, run in [(0, 0, True), (big, 3, False), (1, 4, True)]
        ]
    )
    packed = jax.jit(lambda p: jnp.where(jnp.array([True, False, True])[:, None], p, p[::-1]))(
        packed
    )[jnp.array([2, 1, 0])]
    out = jax.vmap(lambda p: S.read(p, dtype))(packed)
    assert out.residual.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out.step), [1, big, 0])
    np.testing.assert_array_equal(np.asarray(out.result), [4, 3, 0])
    np.testing.assert_array_equal(np.asarray(out.running), [True, False, True])
    np.testing.assert_array_equal(np.asarray(out.residual, np.float64), float(residual))
    assert np.all(np.isinf(np.asarray(out.best, np.float64)))
    assert np.all(np.isnan(np.asarray(out.start, np.float64)))
    result, stats = S.outcome(packed[1], dtype)
    assert bool(result == fixpoint.RESULTS.nonfinite)
    assert int(stats["num_steps"]) == big


def test_deq_called_on_a_batch_suggests_vmap(getkey):
    from fixpoint import layers

    w = jax.random.normal(getkey(), (8, 8)) / 16
    xs = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"jax\.vmap\(deq\)\(xs\)"):
        layers.DEQ(lambda z, x: jnp.tanh(w @ z + x))(xs)  # w @ z fails on z of shape (4, 8)
    with pytest.raises(ValueError, match=r"jax\.vmap\(deq\)\(xs\)"):
        layers.DEQ(lambda z, x: jnp.tanh(z + x), z_shape=(8,))(xs)  # returns shape (4, 8)


def test_integer_layer_options_are_validated(getkey):
    from fixpoint import layers

    ignn = layers.IGNN(3, 2, hidden=np.int64(4), edge_weight_column=np.int64(1), key=getkey())
    assert type(ignn.edge_weight_column) is int and ignn.w.shape == (4, 4)
    cgs = layers.CGS(3, 1, 2, hidden=np.int64(4), heads=np.int32(2), key=getkey())
    assert type(cgs.heads) is int
    with pytest.raises(TypeError, match="IGNN: `edge_weight_column` must be an int"):
        layers.IGNN(3, 2, edge_weight_column=True, key=getkey())
    with pytest.raises(TypeError, match="IGNN: `edge_weight_column` must be an int"):
        layers.IGNN(3, 2, edge_weight_column=1.0, key=getkey())
    with pytest.raises(TypeError, match="CGS: `hidden` must be an int"):
        layers.CGS(3, 1, 2, hidden=4.0, key=getkey())
    with pytest.raises(TypeError, match="ELK: `adaptive` must be a bool"):
        solvers.ELK(adaptive=1e-6)
