"""Run by `test_parallel.py::test_data_parallel` with 4 forced CPU devices.

For `layers.DEQ`, `layers.MonDEQ` and `layers.ParallelRNN`: the loss and the
gradients of a batch split over 4 devices (`fixpoint.data_parallel`) equal one
device's; per-sample outputs stay split over the devices, gradients come back
replicated; each device compacts its own samples; and the per-device working
memory shrinks. Also plain SPMD (`jit` with a sharded batch) for the DEQ, and
the errors. Each program is compiled once (compiling dominates the run time).
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import fixpoint
from fixpoint import layers, solvers

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 4, jax.devices()
mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
split = NamedSharding(mesh, PartitionSpec("batch"))
f64 = jnp.float64
B = 64  # 16 per device: the default compaction applies on each device
B_DEQ = 256  # the DEQ's batch: large enough for the working-memory check


class Tanh(eqx.Module):
    lin: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(self.lin(z) + x)


def tanh_map(key, d, scale):
    f = Tanh(eqx.nn.Linear(d, d, key=key, dtype=f64))
    return eqx.tree_at(lambda m: m.lin.weight, f, scale * f.lin.weight)


def loss(model, xs, ys):
    """Mean squared error, and the per-sample outputs as `aux`."""
    out = jax.vmap(model)(xs)
    return jnp.mean((out - ys) ** 2), out


keys = jax.random.split(jax.random.key(0), 8)
models = {
    "DEQ": layers.DEQ(
        tanh_map(keys[0], 8, 0.9), solver=solvers.Anderson(1e-11, 1e-11), max_steps=300
    ),
    "MonDEQ": layers.MonDEQ(
        8, 8, solver=solvers.PeacemanRachford(1e-11, 1e-11), max_steps=500, dtype=f64, key=keys[1]
    ),
    "ParallelRNN": layers.ParallelRNN(
        eqx.nn.GRUCell(3, 4, key=keys[2], dtype=f64), solver=solvers.DEER(1e-11, 1e-11)
    ),
}
# Inputs with a spread of difficulty (different step counts per sample).
spread = jnp.linspace(0.1, 3.0, B, dtype=f64)
spread_deq = jnp.linspace(0.1, 3.0, B_DEQ, dtype=f64)
data = {
    "DEQ": (
        spread_deq[:, None] * jax.random.normal(keys[3], (B_DEQ, 8), f64),
        jnp.zeros((B_DEQ, 8), f64),
    ),
    "MonDEQ": (spread[:, None] * jax.random.normal(keys[4], (B, 8), f64), jnp.zeros((B, 8), f64)),
    "ParallelRNN": (
        jax.random.normal(keys[5], (B, 12, 3), f64),
        jnp.zeros((B, 12, 4), f64),
    ),
}


def assert_tree_close(a, b, what, rtol=1e-9, atol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=what)


def compiled(fn, *args):
    return eqx.filter_jit(fn).lower(*args).compile()


grad = eqx.filter_value_and_grad(loss, has_aux=True)
parallel = eqx.filter_value_and_grad(fixpoint.data_parallel(loss, mesh), has_aux=True)
for name, model in models.items():
    xs, ys = data[name]
    on_one = compiled(grad, model, xs, ys)
    on_four = compiled(parallel, model, xs, ys)
    (l1, out1), g1 = on_one(model, xs, ys)
    (l2, out2), g2 = on_four(model, xs, ys)
    np.testing.assert_allclose(l2, l1, rtol=1e-10, err_msg=name)
    assert_tree_close(out2, out1, name)
    assert_tree_close(g2, g1, name)
    # Per-sample outputs stay split over the devices; gradients come back whole.
    assert out2.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec("batch", *[None] * (out2.ndim - 1))), out2.ndim
    ), (name, out2.sharding)
    for leaf in jax.tree.leaves(eqx.filter(g2, eqx.is_array)):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4, name
    if name == "DEQ":
        # Plain SPMD: `jit` with the batch sharded, no `shard_map`.
        sharded = (model, jax.device_put(xs, split), jax.device_put(ys, split))
        spmd = compiled(grad, *sharded)
        (l3, out3), g3 = spmd(*sharded)
        np.testing.assert_allclose(l3, l1, rtol=1e-10, err_msg=name)
        assert_tree_close(g3, g1, name)
        spmd_text = spmd.compiled.as_text()
        deq_programs, deq_loss = (on_one, on_four), l1
    print("ok", name, "loss", float(l1), flush=True)

# Each device compacts its own samples: count the sample-evaluations of `f`.
# `z = x z + 1` converges at the rate x: one slow sample (x = 0.9) per device.
calls = []


class Counted(eqx.Module):
    def __call__(self, z, x):
        # Under `vmap` the callback runs once per sample and evaluation.
        jax.debug.callback(lambda _: calls.append(1), z[0])
        return x * z + 1


one_slow = jnp.where(jnp.arange(B) % 16 == 5, 0.9, 0.1)[:, None] * jnp.ones((B, 2), f64)


def steps_and_calls(compaction):
    deq = layers.DEQ(
        Counted(), solver=solvers.Picard(1e-11, 1e-11), max_steps=500, compaction=compaction
    )
    run = fixpoint.data_parallel(lambda m, xs: jax.vmap(m.solve)(xs).stats["num_steps"], mesh)
    calls.clear()
    steps = jax.block_until_ready(eqx.filter_jit(run)(deq, one_slow))
    return np.asarray(steps), len(calls)


steps_c, calls_c = steps_and_calls(fixpoint.Compaction())
steps_u, calls_u = steps_and_calls(None)
np.testing.assert_array_equal(steps_c, steps_u)
per_device_max = np.asarray(steps_u).reshape(4, -1).max(axis=1)
print("steps", steps_u.min(), "to", steps_u.max(), "; evaluations", calls_c, "vs", calls_u)
# Uncompacted, every sample runs to its device's slowest (plus the final check).
assert calls_u >= 16 * per_device_max.sum(), (calls_u, per_device_max)
assert calls_c < 0.6 * calls_u, (calls_c, calls_u)


def temp_bytes(c):
    return c.compiled.memory_analysis().temp_size_in_bytes


# Per-device working memory of the DEQ's training step above (batch 256).
on_one, on_four = deq_programs
one, four = temp_bytes(on_one), temp_bytes(on_four)
print("DEQ step, batch 256, temp bytes per device: one device", one, "data_parallel", four)
assert four < 0.4 * one, (four, one)
text = on_four.compiled.as_text()
counts = {op: len(re.findall(rf"\b{op}(-start)?\(", text)) for op in ("all-reduce", "all-gather")}
print("collectives, data_parallel:", counts)
reduced = re.findall(r"= (\(.*?\)|\w+\[[\d,]*\])[^=]*? all-reduce(?:-start)?\(", text)
print("all-reduced:", reduced)
# The loss's mean and the gradient's sum (one tuple); nothing is gathered.
assert counts["all-reduce"] <= 2 and counts["all-gather"] == 0, counts
# Plain SPMD (the DEQ's training step above) gathers only per-sample scalars
# (result codes, steps, residuals for the error check), never a sample's state
# or cotangent.
gathered = sorted(set(re.findall(r"= (\w+\[[\d,]*\])[^=]*? all-gather(?:-start)?\(", spmd_text)))
print("plain SPMD all-gathers:", gathered)
assert gathered and all("," not in g for g in gathered), gathered

# `throw=True` inside `shard_map`: each device checks its own samples (one
# sample on the first device fails here).
one_failing = jnp.where(jnp.arange(B) == 5, 0.9, 0.1)[:, None] * jnp.ones((B, 2), f64)
starved = layers.DEQ(Counted(), solver=solvers.Picard(1e-11, 1e-11), max_steps=20)
try:
    out = eqx.filter_jit(fixpoint.data_parallel(lambda m, xs: jax.vmap(m)(xs), mesh))(
        starved, one_failing
    )
    jax.block_until_ready(out)
    jax.effects_barrier()
except (fixpoint.SolveError, jax.errors.JaxRuntimeError) as e:  # raised in a callback
    assert "max_steps_reached" in str(e) and "1 of 16 samples" in str(e), e
else:
    raise AssertionError("a failed solve inside data_parallel did not raise")

# JAX's default mesh (`AxisType.Explicit` axes) with unsharded inputs: resharded.
explicit = jax.make_mesh((4,), ("batch",))
xs, ys = data["DEQ"]
value = eqx.filter_jit(fixpoint.data_parallel(loss, explicit))(models["DEQ"], xs, ys)[0]
np.testing.assert_allclose(value, deq_loss, rtol=1e-10)

# Solvers that reach equinox's closure conversion inside `shard_map` are
# refused with a message saying which, instead of an internal error.
for bad, what in (
    (layers.DEQ(Counted(), solver=solvers.Newton(1e-8, 1e-8)), "solvers.Newton"),
    (layers.DEQ(Counted(), adjoint=fixpoint.UnrolledAdjoint()), "UnrolledAdjoint"),
):
    try:
        eqx.filter_grad(fixpoint.data_parallel(lambda m, xs: jnp.mean(jax.vmap(m)(xs)), mesh))(
            bad, one_slow
        )
    except TypeError as e:
        assert what in str(e) and "shard_map" in str(e), e
    else:
        raise AssertionError(f"{what} inside data_parallel was accepted")

# Errors name the argument.
try:
    fixpoint.data_parallel(loss, mesh)(models["DEQ"], data["DEQ"][0][:62], data["DEQ"][1][:62])
except ValueError as e:
    assert "argument 1" in str(e) and "62" in str(e), e
else:
    raise AssertionError("an indivisible batch was accepted")
try:
    fixpoint.data_parallel(lambda m, xs: jnp.sum(xs > 0), mesh)(None, data["DEQ"][0])
except ValueError as e:
    assert "0-d" in str(e), e
else:
    raise AssertionError("a 0-d integer output was accepted")
try:
    fixpoint.data_parallel(lambda m, xs: jnp.mean(xs, axis=0), mesh)(None, data["DEQ"][0])
except ValueError as e:
    assert "leading axis" in str(e), e
else:
    raise AssertionError("an output without the batch axis was accepted")
print("all data-parallel checks passed")
