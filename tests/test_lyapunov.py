"""`fixpoint.lyapunov_estimate` on recurrences with known exponents."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixpoint as fp


def linear(a):
    return lambda h, x: (a * h + x, None)


@pytest.mark.parametrize("a", [0.5, 1.2, -0.9])
def test_scalar_linear(a):
    est = fp.lyapunov_estimate(linear(a), jnp.zeros(1), jnp.ones((60, 1)))
    assert est.steps == 54
    np.testing.assert_allclose(est.exponent, np.log(abs(a)), rtol=1e-12)
    np.testing.assert_allclose(est.window_exponents, np.log(abs(a)), rtol=1e-12)
    assert est.error < 1e-12


def test_diagonal_linear_is_largest_eigenvalue():
    d = jnp.array([0.2, -0.9, 0.5])
    est = fp.lyapunov_estimate(linear(d), jnp.zeros(3), jnp.ones((400, 3)))
    np.testing.assert_allclose(est.exponent, np.log(0.9), rtol=1e-9)


def test_dense_linear_with_complex_eigenvalues(getkey):
    # A rotation by 1 radian scaled by 0.95, and a real eigenvalue 0.6, in a random
    # basis: the largest |eigenvalue| is 0.95, although no vector keeps its direction.
    c, s = np.cos(1.0), np.sin(1.0)
    block = np.array([[0.95 * c, -0.95 * s, 0], [0.95 * s, 0.95 * c, 0], [0, 0, 0.6]])
    basis = np.asarray(jax.random.normal(getkey(), (3, 3)))
    a = jnp.asarray(basis @ block @ np.linalg.inv(basis))
    est = fp.lyapunov_estimate(lambda h, x: (a @ h, None), jnp.ones(3), length=4000)
    np.testing.assert_allclose(est.exponent, np.log(0.95), atol=3e-3)


def test_random_growth_rates_give_the_mean_and_its_error(getkey):
    # h ↦ exp(r_t) h with r_t ~ N(mu, sigma²) i.i.d.: the exponent is the sample mean
    # of the counted r_t, and its error sigma / sqrt(steps).
    mu, sigma, steps = -0.3, 0.5, 20_000
    r = mu + sigma * jax.random.normal(getkey(), (steps, 1))
    est = fp.lyapunov_estimate(lambda h, x: (jnp.exp(x) * h, None), jnp.ones(1), r, burn_in=0)
    np.testing.assert_allclose(est.exponent, jnp.mean(r), rtol=1e-10)
    assert abs(est.exponent - mu) < 4 * est.error
    assert 0.5 < est.error / (sigma / np.sqrt(steps)) < 2


def tanh_network(gain, width=64, seed=0):
    w = jax.random.normal(jax.random.key(seed), (width, width)) * gain / np.sqrt(width)
    xs = 0.1 * jax.random.normal(jax.random.key(seed + 1), (2000, width))
    return (lambda h, x: (jnp.tanh(w @ h + x), None)), jnp.full(width, 0.1), xs


def test_tanh_network_contracting_and_chaotic():
    f, h0, xs = tanh_network(0.5)
    contracting = fp.lyapunov_estimate(f, h0, xs)
    assert contracting.exponent + 4 * contracting.error < 0
    f, h0, xs = tanh_network(2.5)
    chaotic = fp.lyapunov_estimate(f, h0, xs)
    assert chaotic.exponent - 4 * chaotic.error > 0


def test_pytree_carry_equals_flat_carry():
    d = jnp.array([0.3, 0.8, -0.5])
    flat = fp.lyapunov_estimate(linear(d), jnp.zeros(3), jnp.ones((100, 3)))

    def split(h, x):
        return {"a": d[:1] * h["a"] + x[:1], "b": d[1:] * h["b"] + x[1:]}, None

    tree = fp.lyapunov_estimate(split, {"a": jnp.zeros(1), "b": jnp.zeros(2)}, jnp.ones((100, 3)))
    np.testing.assert_allclose(tree.exponent, flat.exponent, rtol=1e-12)
    np.testing.assert_allclose(tree.exponent, np.log(0.8), rtol=1e-4)  # transient: 1/T


def test_jit_vmap_and_reverse_agree_with_eager():
    f, h0, xs = tanh_network(1.5, width=16)
    xs = xs[:300, :16]
    eager = fp.lyapunov_estimate(f, h0[:16], xs)
    jitted = eqx.filter_jit(lambda xs: fp.lyapunov_estimate(f, h0[:16], xs))(xs)
    np.testing.assert_allclose(jitted.exponent, eager.exponent, rtol=1e-12)
    np.testing.assert_allclose(jitted.window_exponents, eager.window_exponents, rtol=1e-12)
    batch = jnp.stack([xs, xs[::-1]])
    both = jax.vmap(lambda xs: fp.lyapunov_estimate(f, h0[:16], xs))(batch)
    np.testing.assert_allclose(both.exponent[0], eager.exponent, rtol=1e-12)
    # `reverse=True` meets the inputs in the opposite order, burn-in included.
    backwards = fp.lyapunov_estimate(f, h0[:16], xs, reverse=True)
    np.testing.assert_allclose(backwards.exponent, both.exponent[1], rtol=1e-12)
    np.testing.assert_allclose(backwards.window_exponents, both.window_exponents[1], atol=1e-10)


def test_float32():
    f = lambda h, x: (0.5 * h, None)  # noqa: E731
    est = fp.lyapunov_estimate(f, jnp.zeros(2, jnp.float32), length=50)
    assert est.exponent.dtype == jnp.float32
    np.testing.assert_allclose(est.exponent, np.log(0.5), rtol=1e-6)


def test_forgotten_carry_is_minus_infinity():
    est = fp.lyapunov_estimate(lambda h, x: (x, None), jnp.zeros(2), jnp.ones((30, 2)))
    assert est.exponent == -np.inf


def test_non_finite_trajectory_is_not_a_number():
    est = fp.lyapunov_estimate(lambda h, x: (h * x, None), jnp.ones(1), jnp.full((30, 1), jnp.nan))
    assert np.isnan(est.exponent)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(f=1), TypeError, "`f` must be callable"),
        (dict(init=jnp.zeros(2, jnp.int32)), TypeError, "`init` has dtype int32"),
        (dict(xs={"a": jnp.ones((5, 2)), "b": jnp.ones((6, 2))}), ValueError, "same leading"),
        (dict(windows=1), ValueError, "`windows` must be an int >= 2"),
        (dict(burn_in=-1), ValueError, "`burn_in` must be an int >= 0"),
        (dict(burn_in=25), ValueError, "`burn_in=25`"),
        (dict(key=0), TypeError, "`key`"),
        (dict(key=jax.random.PRNGKey(0)), TypeError, "typed key"),
        (dict(reverse=1), TypeError, "`reverse` must be a bool"),
        (dict(f=lambda h, x: h), ValueError, "pair `\\(carry, y\\)`"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    call = dict(f=lambda h, x: (0.5 * h + x, None), init=jnp.zeros(2), xs=jnp.ones((30, 2)))
    call.update(kwargs)
    with pytest.raises(error, match=match):
        fp.lyapunov_estimate(call.pop("f"), call.pop("init"), call.pop("xs"), **call)


def test_amplification_is_the_largest_rise():
    # Growth e^{r_t} per step with r = (-1, 2, 2, -3, 1, 1, 1, -5): the cumulative
    # log size is 0, -1, 1, 3, 0, 1, 2, 3, -2, and its largest rise is 3 - (-1) = 4.
    r = jnp.array([-1.0, 2, 2, -3, 1, 1, 1, -5])[:, None]
    est = fp.lyapunov_estimate(lambda h, x: (jnp.exp(x) * h, None), jnp.ones(1), r, windows=2)
    np.testing.assert_allclose(est.amplification, 4.0, rtol=1e-12)
    shrinking = fp.lyapunov_estimate(linear(0.5), jnp.zeros(1), jnp.ones((30, 1)))
    assert shrinking.amplification == 0
    growing = fp.lyapunov_estimate(linear(1.2), jnp.zeros(1), jnp.ones((30, 1)))
    np.testing.assert_allclose(growing.amplification, 30 * np.log(1.2), rtol=1e-12)
    # An annihilated perturbation starts afresh: rises across it do not count.
    gate = jnp.array([2.0, 0.0, 1.5, 1.5, 1.0])[:, None]
    est = fp.lyapunov_estimate(lambda h, x: (x * h, None), jnp.ones(1), gate, windows=2)
    np.testing.assert_allclose(est.amplification, 2 * np.log(1.5), rtol=1e-12)


def test_amplification_predicts_when_float32_is_undetermined():
    # A contracting network keeps float32 lax.scan near float64; a strongly expanding
    # one does not, and its amplification says so (ln(1e-4 / 1.19e-7) - 2 ≈ 4.7).
    width = 32
    xs = 0.1 * jax.random.normal(jax.random.key(1), (300, width))
    for gain, determined in ((0.5, True), (3.0, False)):
        w = jax.random.normal(jax.random.key(0), (width, width)) * gain / np.sqrt(width)
        est = fp.lyapunov_estimate(
            lambda h, x, w=w: (jnp.tanh(w @ h + x), None), jnp.zeros(width), xs
        )
        hs = {}
        for dtype in (jnp.float32, jnp.float64):
            w_, xs_ = w.astype(dtype), xs.astype(dtype)
            step = lambda h, x, w_=w_: (jnp.tanh(w_ @ h + x),) * 2  # noqa: E731
            hs[dtype] = jax.lax.scan(step, jnp.zeros(width, dtype), xs_)[1]
        off = float(jnp.max(jnp.abs(hs[jnp.float32].astype(jnp.float64) - hs[jnp.float64])))
        assert (est.amplification < 4.7) == determined, (gain, est.amplification)
        assert (off < 1e-4) == determined, (gain, off)


def test_extreme_growth_factors_are_measured():
    # The 2-norm is taken after scaling: no underflow of tiny growth, no overflow.
    tiny = jax.nn.sigmoid(jnp.float32(-50.0))
    est = fp.lyapunov_estimate(lambda h, x: (tiny * h, None), jnp.ones(4, jnp.float32), length=50)
    np.testing.assert_allclose(est.exponent, np.log(tiny), rtol=1e-5)
    huge = fp.lyapunov_estimate(
        lambda h, x: (jnp.sin(jnp.float32(1e20) * h), None),
        jnp.full(3, 0.3, jnp.float32),
        length=50,
    )
    assert np.isfinite(huge.exponent) and huge.exponent > 30


def test_a_tangent_lost_to_rounding_is_measured_again():
    # Coordinate 0 grows ×1.5 and is reset to 0 every 500 steps, coordinate 1 grows
    # ×1.2: in float32 the tangent's coordinate 1 underflows relative to coordinate 0,
    # and a reset maps it to exactly zero, although the carry is not forgotten.
    x = np.ones(2000, np.float32)
    x[499::500] = 0

    def f(h, x):
        return jnp.stack([1.5 * x, jnp.full_like(x, 1.2)]) * h, None

    est = fp.lyapunov_estimate(f, jnp.zeros(2, jnp.float32), jnp.asarray(x), windows=2)
    assert np.isfinite(est.exponent) and est.exponent > 0


def test_long_float32_sequences_keep_their_accuracy():
    est = fp.lyapunov_estimate(
        lambda h, x: (0.9 * h, None), jnp.ones(1, jnp.float32), length=200_000, burn_in=0
    )
    np.testing.assert_allclose(est.exponent, np.log(np.float32(0.9)), rtol=2e-6)


def test_non_finite_amplification_and_numpy_length():
    est = fp.lyapunov_estimate(lambda h, x: (h * x, None), jnp.ones(1), jnp.full((30, 1), jnp.nan))
    assert np.isnan(est.amplification)
    est = fp.lyapunov_estimate(lambda h, x: (0.5 * h, None), jnp.zeros(1), length=np.int64(40))
    assert type(est.steps) is int and est.steps == 36


@pytest.mark.parametrize(
    "init, error, match",
    [
        (jnp.zeros(0), ValueError, "`init` has no entries"),
        ({"a": jnp.zeros(1), "b": jnp.zeros(1, jnp.float32)}, TypeError, "same dtype"),
    ],
)
def test_bad_carries_are_named(init, error, match):
    with pytest.raises(error, match=match):
        fp.lyapunov_estimate(lambda h, x: (h, None), init, length=20)


def test_gradient_against_finite_differences():
    # The exponent of h ↦ a h + x is log|a|, whose derivative is 1/a.
    def exponent(a):
        return fp.lyapunov_estimate(
            lambda h, x: (a * h + x, None), jnp.zeros(2), jnp.ones((40, 2))
        ).exponent

    a = 0.7
    g = jax.grad(exponent)(a)
    fd = (exponent(a + 1e-6) - exponent(a - 1e-6)) / 2e-6
    np.testing.assert_allclose(g, 1 / a, rtol=1e-9)
    np.testing.assert_allclose(g, fd, rtol=1e-6)
