"""Run by `test_scan.py::test_sharded_equals_unsharded` with 4 forced CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np

import fixpoint
from fixpoint import solvers

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 4, jax.devices()

TOL = dict(rtol=1e-11, atol=1e-11)
mesh = jax.make_mesh((4,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
key = jax.random.key(0)
w = 0.6 * jax.random.normal(key, (3, 3), jnp.float64)


def f(h, x):
    h = jnp.tanh(w @ h + x)
    return h, {"sum": jnp.sum(h), "h": h}


init = jnp.zeros(3, jnp.float64)
every = (
    solvers.Sequential(**TOL),
    solvers.Jacobi(**TOL),
    solvers.GaussSeidel(block_size=5, **TOL),
    solvers.DEER(**TOL),
    solvers.QuasiDEER(**TOL),
    solvers.ELK(**TOL),
)
# Padding is independent of the solver: a sweeping one and DEER suffice there.
# Every solver runs once (directions alternate), to keep this compile-bound
# check cheap. (The unsharded call is checked against `lax.scan` in
# test_scan.py; here every sharded result, value and gradient in one compiled
# call, is checked against it.)
cases = [  # divisible by 4, padded, shorter than the devices
    (64, [(s, i % 2 == 1) for i, s in enumerate(every)]),
    (61, [(every[0], True), (every[3], False)]),
    (3, [(every[1], False)]),
]
for n, chosen in cases:
    xs = jax.random.normal(jax.random.key(n), (n, 3), jnp.float64)
    for solver, reverse in chosen:
        ref = jax.lax.scan(f, init, xs, reverse=reverse)
        grad_ref = jax.grad(
            lambda xs, r=reverse: jnp.sum(jax.lax.scan(f, init, xs, reverse=r)[1]["h"] ** 2)
        )(xs)
        name = f"{type(solver).__name__} n={n} reverse={reverse}"

        def loss(xs, solver=solver, reverse=reverse):
            out = fixpoint.scan(f, init, xs, solver=solver, reverse=reverse, mesh=mesh)
            return jnp.sum(out[1]["h"] ** 2), out

        (_, sharded), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(xs)
        for a, c in zip(jax.tree.leaves(sharded), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(g, grad_ref, rtol=1e-8, atol=1e-10, err_msg=name)
        if n == 64:
            ys = sharded[1]["h"]
            assert len(ys.sharding.device_set) == 4, (name, ys.sharding)
        print("ok", name, flush=True)

# Each device holds only its chunk: the per-device working set shrinks with the device count.
xs = jax.random.normal(key, (16384, 3), jnp.float64)


def deer(xs, mesh):
    return fixpoint.scan(f, init, xs, solver=solvers.DEER(**TOL), mesh=mesh)


compiled = jax.jit(lambda xs: deer(xs, mesh)).lower(xs).compile()
plain = jax.jit(lambda xs: deer(xs, None)).lower(xs).compile()
m_sharded = compiled.memory_analysis().temp_size_in_bytes
m_plain = plain.memory_analysis().temp_size_in_bytes
print("temp bytes per device: sharded", m_sharded, "unsharded", m_plain)
assert m_sharded < 0.4 * m_plain
print("all sharded checks passed")
