"""Data-parallel DEQ training on scikit-learn's digits: the batch split over devices.

One process (on a CPU, `--devices` fakes that many devices):

    python examples/data_parallel.py --devices 4

Several processes (hosts), each with its own devices: start one per host, with
the same coordinator address (host 0's, any free port) and its own id:

    python examples/data_parallel.py --coordinator HOST0:12355 --num-processes 2 --process-id 0
    python examples/data_parallel.py --coordinator HOST0:12355 --num-processes 2 --process-id 1

(On one machine, `HOST0` is `localhost`; `--devices 2` gives each CPU process
two devices.) Each process loads only its share of every batch; the global
batch is assembled by `jax.make_array_from_process_local_data`.

The training step is `fixpoint.data_parallel(loss, mesh)` under
`eqx.filter_value_and_grad` and `eqx.filter_jit`: each device solves its own
samples' equilibria (and stops, and compacts, on its own), and XLA sums the
parameter gradients over the devices. Needs `pip install -e ".[dev]"`
(scikit-learn and tqdm). Prints the loss, test accuracy and solver steps per
epoch, and saves the model with `eqx.tree_serialise_leaves`.
"""

import argparse
import os
import sys
from typing import Any


def parse():
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=256, help="global batch size")
    p.add_argument("--coordinator", default=None, help="host:port of process 0")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--save", default="data_parallel_deq.eqx")
    return p.parse_args()


args = parse()
# Must be set before JAX starts; only CPU devices are faked (a GPU host uses its own).
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fixpoint  # noqa: E402
from fixpoint import layers, solvers  # noqa: E402

if args.num_processes > 1:
    # Collectives between CPU processes (GPUs and TPUs use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
main = jax.process_index() == 0


def log(*what):
    if main:
        print(*what, flush=True)


class Block(eqx.Module):
    """`f(z, x) = tanh(W z + x)`: the layer whose equilibrium the DEQ finds."""

    w: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(self.w(z) + x)


class Classifier(eqx.Module):
    embed: eqx.nn.Linear
    deq: layers.DEQ
    head: eqx.nn.Linear

    def __init__(self, key, hidden=64):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Linear(64, hidden, key=k1)
        block = Block(eqx.nn.Linear(hidden, hidden, key=k2))
        # `normalise` keeps the map a contraction, so every sample converges.
        self.deq = layers.DEQ(
            block,
            solver=solvers.Anderson(1e-4, 1e-4),
            max_steps=40,
            normalise=lambda f: layers.spectral_norm(f, 0.9),
        )
        self.head = eqx.nn.Linear(hidden, 10, key=k3)

    def __call__(self, x):
        sol = self.deq.solve(self.embed(x))
        return self.head(sol.value), sol.stats["num_steps"]


def loss(model, x, y):
    """Mean cross-entropy over the batch; per-sample solver steps as `aux`."""
    logits, steps = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), steps


mesh = jax.make_mesh((jax.device_count(),), ("batch",))
split = NamedSharding(mesh, PartitionSpec("batch"))
whole = NamedSharding(mesh, PartitionSpec())
if args.batch % jax.device_count():
    sys.exit(f"--batch {args.batch} must be divisible by the {jax.device_count()} devices")
log(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh {dict(mesh.shape)}")

digits: Any = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(x_all))
train, test = order[:1500], order[1500:1780]  # 280 test digits: 4, 8 and 7 divide it


def global_batch(rows):
    """This process's share of `rows` (all processes pass the same rows), as one array."""
    share = np.array_split(rows, jax.process_count())[jax.process_index()]
    x, y = x_all[share], y_all[share]
    return (
        jax.make_array_from_process_local_data(split, x),
        jax.make_array_from_process_local_data(split, y),
    )


# Every process builds the same parameters from the same key; `whole` replicates them.
params, static = eqx.partition(Classifier(jax.random.key(0)), eqx.is_array)
model = eqx.combine(jax.device_put(params, whole), static)
optimiser = optax.adam(1e-2)
# Replicated like the parameters (a step count made on one device would recompile `step`).
opt_state = jax.device_put(optimiser.init(eqx.filter(model, eqx.is_array)), whole)
parallel_loss = fixpoint.data_parallel(loss, mesh)


@eqx.filter_jit
def step(model, opt_state, x, y):
    (value, steps), grads = eqx.filter_value_and_grad(parallel_loss, has_aux=True)(model, x, y)
    updates, opt_state = optimiser.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, value, jnp.mean(steps)


def correct(model, x, y):
    logits = jax.vmap(model)(x)[0]
    return jnp.mean(jnp.argmax(logits, axis=-1) == y, dtype=jnp.float32)


accuracy = eqx.filter_jit(fixpoint.data_parallel(correct, mesh))


x_test, y_test = global_batch(test)
rng = np.random.default_rng(1)
batches = len(train) // args.batch
for epoch in range(args.epochs):
    perm = rng.permutation(train)
    losses, steps = [], []
    for b in tqdm(range(batches), desc=f"epoch {epoch + 1}", disable=not main, leave=False):
        x, y = global_batch(perm[b * args.batch : (b + 1) * args.batch])
        model, opt_state, value, mean_steps = step(model, opt_state, x, y)
        losses.append(float(value))
        steps.append(float(mean_steps))
    acc = float(accuracy(model, x_test, y_test))
    log(
        f"epoch {epoch + 1}: train loss {np.mean(losses):.3f}, test accuracy {acc:.3f}, "
        f"mean solver steps {np.mean(steps):.1f}"
    )

if main:
    eqx.tree_serialise_leaves(args.save, model)
    log(f"saved {args.save}")
