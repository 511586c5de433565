"""Compiled once per function, as `jax.jit` does: repeated eager calls of every entry
point trace the user's function once (counted here, never timed; the times are in
`bench/eager.py`), and `fixpoint.uncached()` opts out."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import fixpoint
from fixpoint import layers, solvers


class Counter:
    """Counts how often a function's Python body runs (i.e. it is traced)."""

    def __init__(self):
        self.n = 0

    def __call__(self, fn):
        def counted(*args):
            self.n += 1
            return fn(*args)

        return counted


def test_fixed_point_traces_a_plain_function_once():
    count = Counter()
    w = jnp.array([[0.5, 0.1], [0.0, 0.3]])
    f = count(lambda y, a: jnp.tanh(w @ y + a))  # a closure over an array, defined once
    solver = solvers.Picard(1e-6, 1e-6)
    for a in (jnp.array([0.1, 0.2]), jnp.array([0.3, -0.1]), jnp.array([1.0, 2.0])):
        sol = fixpoint.fixed_point(f, jnp.zeros(2), a, solver=solver)
        np.testing.assert_allclose(sol.value, jnp.tanh(w @ sol.value + a), atol=1e-5)
        after_first = count.n
    again = count.n
    fixpoint.fixed_point(f, jnp.zeros(2), jnp.array([0.5, 0.5]), solver=solver)
    fixpoint.root_find(f, jnp.zeros(2), jnp.array([0.5, 0.5]), solver=solvers.Newton(1e-6, 1e-6))
    assert after_first == again  # new `args` values: no new trace
    # A new solver setting is a new compiled loop (part of the key, like a static arg).
    fixpoint.fixed_point(f, jnp.zeros(2), jnp.zeros(2), solver=solvers.Picard(1e-5, 1e-5))
    assert count.n > again


def test_scan_traces_a_plain_function_once():
    count = Counter()
    step = count(lambda h, x: (0.5 * h + x, h))
    xs = jnp.arange(8.0)[:, None]
    for shift in (0.0, 1.0, 2.0):
        h, ys = fixpoint.scan(step, jnp.zeros(1), xs + shift, solver=solvers.Jacobi())
        want = jax.lax.scan(lambda h, x: (0.5 * h + x, h), jnp.zeros(1), xs + shift)[0]
        np.testing.assert_allclose(h, want, rtol=1e-5)
        if shift == 0.0:
            first = count.n
    assert count.n == first


def test_decode_traces_the_model_once():
    model = layers.CausalTransformer(
        7, max_len=16, d_model=16, num_heads=2, num_layers=1, key=jax.random.key(0)
    )
    count = Counter()
    plain = count(lambda t: model(t))  # a plain function, defined once
    solver = solvers.JacobiDecoding(window=4)
    outs = []
    for prompt in ([1, 2], [3, 4], [5, 6]):
        outs.append(fixpoint.decode(plain, jnp.array(prompt), 6, solver=solver))
        if prompt == [1, 2]:
            first = count.n
    assert count.n == first
    # The cached path of an Equinox model: its `extend` is traced for the first call only.
    calls = Counter()
    orig = type(model).extend
    try:
        type(model).extend = lambda self, *a: calls(orig)(self, *a)  # pyright: ignore
        sampled = [
            fixpoint.decode(model, jnp.array([1, 2]), 6, solver=solver, key=key, temperature=t)
            for key, t in zip(jax.random.split(jax.random.key(1), 3), (0.5, 1.0, 2.0), strict=True)
        ]
        first_extend = calls.n
        fixpoint.decode(model, jnp.array([2, 2]), 6, solver=solver, key=jax.random.key(9))
        assert calls.n == first_extend  # other prompt, key and temperature: no new trace
    finally:
        type(model).extend = orig  # pyright: ignore
    assert all(np.asarray(s).shape == (6,) for s in sampled)


def test_uncached_traces_every_call_and_sees_new_globals():
    count = Counter()
    scale = {"value": 0.5}  # a global the function reads
    f = count(lambda y, a: scale["value"] * y + a)
    solver = solvers.Picard(1e-8, 1e-8)
    one = fixpoint.fixed_point(f, jnp.zeros(()), jnp.ones(()), solver=solver).value
    scale["value"] = 0.75
    frozen = fixpoint.fixed_point(f, jnp.zeros(()), jnp.ones(()), solver=solver).value
    # jax.jit's rule: what the function read when first traced is baked in.
    np.testing.assert_allclose(frozen, one)
    np.testing.assert_allclose(one, 2.0, rtol=1e-6)
    before = count.n
    with fixpoint.uncached():
        fresh = fixpoint.fixed_point(f, jnp.zeros(()), jnp.ones(()), solver=solver).value
        fixpoint.fixed_point(f, jnp.zeros(()), jnp.ones(()), solver=solver)
    np.testing.assert_allclose(fresh, 4.0, rtol=1e-6)
    assert count.n >= before + 2  # traced on each call inside the block
    after = count.n
    fixpoint.fixed_point(f, jnp.zeros(()), jnp.ones(()), solver=solver)
    assert count.n == after  # outside it, the cached loop again


def test_unhashable_settings_are_traced_every_call_not_refused():
    class Unhashable(eqx.Module):
        # A static field that is unhashable: filter_jit could not key a cache on it.
        table: list = eqx.field(static=True)

        def __call__(self, y, a):
            return 0.5 * y + a + 0.0 * len(self.table)

    f = Unhashable([1, 2])
    for a in (1.0, 2.0):
        sol = fixpoint.fixed_point(
            f, jnp.zeros(()), jnp.asarray(a), solver=solvers.Picard(1e-8, 1e-8)
        )
        np.testing.assert_allclose(sol.value, 2 * a, rtol=1e-6)


def test_perron_root_compiles_once(monkeypatch):
    from fixpoint.layers import _graph_solvers as gs  # the private iteration, to count it

    count = Counter()
    monkeypatch.setattr(gs, "_perron_iteration", count(gs._perron_iteration))
    graph = layers.Graph(
        nodes=jnp.zeros((3, 1)),
        edges=jnp.zeros((3, 0)),
        senders=jnp.array([0, 1, 2]),
        receivers=jnp.array([1, 2, 0]),
    )
    values = [layers.perron_root(graph, jnp.full(3, s), jnp.zeros(3)) for s in (0.5, 0.25, 0.125)]
    np.testing.assert_allclose(jnp.stack(values).ravel(), [0.5, 0.25, 0.125], rtol=1e-5)
    assert count.n <= 1
