"""Run by `test_parallel.py::test_two_processes` as 2 processes x 2 CPU devices.

`python tests/multihost_check.py PORT PROCESS_ID`: the multi-host recipe of the
docs (Training across devices and hosts) on one machine. Both paths on a 4-device
mesh that spans the two processes: a `layers.DEQ` loss and gradient with the batch
split by `fixpoint.data_parallel`, and `fixpoint.scan` with the time axis split by
`mesh=`; each against the same computation on this process alone.
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_x64", True)
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import fixpoint  # noqa: E402
from fixpoint import layers, solvers  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
me = jax.process_index()
f64 = jnp.float64
key = jax.random.split(jax.random.key(0), 4)


class Tanh(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(self.lin(z) + x)


# 1. Data-parallel: every process holds half of the batch of 32.
f = Tanh(eqx.nn.Linear(6, 6, key=key[0], dtype=f64))
deq = layers.DEQ(
    eqx.tree_at(lambda m: m.lin.weight, f, 0.8 * f.lin.weight),
    solver=solvers.Anderson(1e-11, 1e-11),
    max_steps=200,
)
xs = jax.random.normal(key[1], (32, 6), f64)  # the same on both processes


def loss(model, xs):
    return jnp.mean(jax.vmap(model)(xs) ** 2)


mesh = jax.make_mesh((4,), ("batch",))
params, static = eqx.partition(deq, eqx.is_array)
replicated = eqx.combine(jax.device_put(params, NamedSharding(mesh, PartitionSpec())), static)
local = np.asarray(xs)[16 * me : 16 * (me + 1)]
global_xs = jax.make_array_from_process_local_data(
    NamedSharding(mesh, PartitionSpec("batch")), local
)
value, grads = eqx.filter_jit(eqx.filter_value_and_grad(fixpoint.data_parallel(loss, mesh)))(
    replicated, global_xs
)
# This process alone, on its own first device, on the whole batch.
ref_value, ref_grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(deq, xs)
np.testing.assert_allclose(np.asarray(value), ref_value, rtol=1e-10)
for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-9, atol=1e-12)
print(me, "data-parallel ok", float(value), flush=True)

# 2. A time-sharded scan: every process holds half of the 64 steps.
time_mesh = jax.make_mesh((4,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
w = 0.6 * jax.random.normal(key[2], (3, 3), f64)
us = jax.random.normal(key[3], (64, 3), f64)


def cell(h, u):
    h = jnp.tanh(w @ h + u)
    return h, h


h0 = jnp.zeros(3, f64)
global_us = jax.make_array_from_process_local_data(
    NamedSharding(time_mesh, PartitionSpec("time")), np.asarray(us)[32 * me : 32 * (me + 1)]
)
run = jax.jit(
    lambda us: fixpoint.scan(cell, h0, us, solver=solvers.DEER(1e-11, 1e-11), mesh=time_mesh)
)
final, hs = run(global_us)
hs = multihost_utils.process_allgather(hs, tiled=True)
ref_final, ref_hs = jax.lax.scan(cell, h0, us)
np.testing.assert_allclose(hs, ref_hs, rtol=1e-9, atol=1e-12)
np.testing.assert_allclose(np.asarray(final), ref_final, rtol=1e-9, atol=1e-12)
print(me, "time-sharded scan ok", flush=True)
print(me, "all multi-host checks passed", flush=True)
