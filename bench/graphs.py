"""Convergent graph solvers and implicit GNNs against finite-depth GNNs, and their scaling.

Tasks (generated offline by `fixpoint.datasets`; no downloads):

- `gvi`: graph value iteration on random deterministic MDPs (20–50 states, 5–10
  actions, discount 0.9); test set from another seed and an out-of-distribution
  set with 50–100 states. Metrics: MAPE (`|V* − V̂| / |V*|`, divided by the true
  value), MAE, policy accuracy (greedy backup on `V̂` against the optimal policy).
- `chains`: IGNN's long-range chains (2 classes × 20 chains of length L, the class
  only in each chain's first node), accuracy on held-out chains for L in `--lengths`.
- `flow`: steady-state pressure on random Delaunay pore networks, MSE.
- `classify`: four families of random graphs, graph-level accuracy (mean readout).

Models, sized to similar parameter counts (printed): `layers.CGS` (γ = `--gamma`;
`cgs` with CGS's degree normalisation, `cgs-max` with the max-plus map, `cgs-soft`
with its smooth (logsumexp, τ = 0.1) version),
`layers.IGNN` (κ = 0.9), and the baselines `layers.GCN` / `layers.GIN` (depth 3).
Each is trained the same way (Adam, cosine decay, `--steps` steps, batches of
`--batch` graphs padded to static shapes with `layers.pad_graph`) for every seed in
`--seeds`; the table reports mean ± std over seeds, the fixed-point solver's steps
at evaluation (mean over test graphs) and the training time. Node-level targets
(GVI values, flow pressures) are standardised with the training set's mean and
std; the metrics see the predictions mapped back.

Scaling (`--scaling`): forward + backward time (`jax.value_and_grad` of a sum of
squares of the node outputs with respect to the parameters, median of steady-state
calls with `block_until_ready`, compile apart) and compiled memory
(`memory_analysis()`: temp + arguments + outputs − aliases) of `layers.CGS` (16
heads) against a dense implementation of the same model (the same encoder, then the
`[heads, N, N]` matrix and the same solver and adjoint) on random graphs with 5
incoming edges per node, N in `--sizes`. Above `--dense-run-max` nodes the dense
version is only compiled: its memory comes from `memory_analysis`, it is not run.

Run: `python bench/graphs.py --tasks gvi chains flow classify --scaling`
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

import fixpoint  # noqa: E402
from fixpoint import datasets, layers  # noqa: E402

# --------------------------------------------------------------------------- models


def _abstract_params(build):
    """`datasets.count_params(build())` without building (shapes only)."""
    return datasets.count_params(eqx.filter_eval_shape(build))


_FIXED_HIDDEN = {"ignn": 96, "gcn": 96, "gin": 64}


def make_model(kind, node_size, edge_size, out_size, key, gamma, sizing="match"):
    """A model of `kind`; with `sizing="match"` IGNN and the baselines get the hidden
    size whose parameter count is closest to the CGS's (hidden 64, 16 heads)."""
    if kind in ("ignn", "gcn", "gin"):
        build = {
            "ignn": lambda h: layers.IGNN(node_size, out_size, hidden=h, key=key),
            "gcn": lambda h: layers.GCN(node_size, edge_size, out_size, hidden=h, depth=3, key=key),
            "gin": lambda h: layers.GIN(node_size, edge_size, out_size, hidden=h, depth=3, key=key),
        }[kind]
        if sizing == "fixed":
            return build(_FIXED_HIDDEN[kind])
        target = _abstract_params(
            lambda: make_model("cgs-soft", node_size, edge_size, out_size, key, gamma)
        )
        best = min(range(8, 513, 4), key=lambda h: abs(_abstract_params(lambda: build(h)) - target))
        return build(best)
    if kind in ("cgs", "cgs-max", "cgs-soft"):
        norm = {"cgs": "degree", "cgs-max": "max", "cgs-soft": "softmax"}[kind]
        return layers.CGS(
            node_size,
            edge_size,
            out_size,
            hidden=64,
            heads=16,
            gamma=gamma,
            normalisation=norm,
            key=key,
        )
    raise ValueError(kind)


@eqx.filter_jit
def _num_steps(model, graph):
    return model.solve(graph).stats["num_steps"]


def solver_steps(model, graph):
    if isinstance(model, (layers.CGS, layers.IGNN)):
        return float(_num_steps(model, graph))
    return float("nan")


# --------------------------------------------------------------------------- tasks


def _padded_shape(examples):
    """`(nodes, edges)` that every graph of `examples` pads to (one padding node)."""
    return (
        max(ex.graph.num_nodes for ex in examples) + 1,
        max(ex.graph.num_edges for ex in examples),
    )


def _pad(graph, nodes, edges):
    return layers.pad_graph(graph, nodes, edges)


class Task:
    """A dataset, a loss and a metric; batches padded to one static shape."""

    def __init__(self, name, args):
        self.name = name
        if name == "gvi":
            self.train = datasets.gvi_dataset(256, seed=0)
            self.tests = {
                "test": datasets.gvi_dataset(64, seed=1),
                "ood": datasets.gvi_dataset(32, states=(50, 100), seed=2),
            }
            self.out, self.graph_level = 1, False
        elif name == "flow":
            self.train = datasets.flow_dataset(256, seed=0)
            self.tests = {"test": datasets.flow_dataset(64, seed=1)}
            self.out, self.graph_level = 1, False
        elif name == "classify":
            self.train = datasets.graph_classification_dataset(512, seed=0)
            self.tests = {"test": datasets.graph_classification_dataset(128, seed=1)}
            self.out, self.graph_level = len(datasets.GRAPH_FAMILIES), True
        else:
            raise ValueError(name)
        g0 = self.train[0].graph
        self.node_size, self.edge_size = g0.nodes.shape[1], g0.edges.shape[1]
        self.batch = args.batch
        # Node targets are standardised with the training set's mean and std (the
        # model predicts (y - mean) / std; metrics see the prediction mapped back).
        self.mean, self.std = 0.0, 1.0
        if not self.graph_level:
            ys = np.concatenate([self.target(ex) for ex in self.train])
            self.mean, self.std = float(ys.mean()), float(ys.std())
        n = max(ex.graph.num_nodes for ex in self.train)
        e = max(ex.graph.num_edges for ex in self.train)
        self.shape = (self.batch * n + 1, self.batch * e)

    def target(self, ex):
        if self.name == "gvi":
            return np.asarray(ex.value, np.float32)
        if self.name == "flow":
            return np.asarray(ex.pressure, np.float32)
        return np.asarray(ex.label)

    def batch_arrays(self, exs):
        graph = layers.batch_graphs([ex.graph for ex in exs])
        padded = _pad(graph, *self.shape)
        if self.graph_level:
            y = np.zeros(len(exs) + 1, np.int32)
            y[: len(exs)] = [ex.label for ex in exs]
            mask = np.zeros(len(exs) + 1, np.float32)
            mask[: len(exs)] = 1
        else:
            y = np.zeros(self.shape[0], np.float32)
            y[: graph.num_nodes] = np.concatenate([self.target(ex) for ex in exs])
            mask = np.zeros(self.shape[0], np.float32)
            mask[: graph.num_nodes] = 1
        return padded, jnp.asarray(y), jnp.asarray(mask)

    def loss(self, model, graph, y, mask):
        out = model(graph)
        if self.graph_level:
            logits = layers.graph_readout(out, graph, reduce="mean")
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(mask * ce) / jnp.sum(mask)
        return jnp.sum(mask * (out[:, 0] - (y - self.mean) / self.std) ** 2) / jnp.sum(mask)

    def evaluate(self, model, predict):
        results = {}
        raw = predict
        for split, ds in self.tests.items():
            # Every graph of a split is padded to one static shape: one compile per
            # split (padding changes no real node's output; tested).
            shape = _padded_shape(ds)

            def predict(m, g, shape=shape):
                out = np.asarray(raw(m, _pad(g, *shape)))[: g.num_nodes]
                return out if self.graph_level else out * self.std + self.mean

            if self.name == "gvi":
                ms = [
                    datasets.gvi_metrics(np.asarray(predict(model, ex.graph))[:, 0], ex)
                    for ex in ds
                ]
                for k in ms[0]:
                    results[f"{split}_{k}"] = float(np.mean([m[k] for m in ms]))
            elif self.name == "flow":
                mse = [
                    datasets.flow_mse(np.asarray(predict(model, ex.graph))[:, 0], ex.pressure)
                    for ex in ds
                ]
                results[f"{split}_mse"] = float(np.mean(mse))
            else:
                right = []
                for ex in ds:
                    out = predict(model, ex.graph)
                    logits = layers.graph_readout(jnp.asarray(out), ex.graph, reduce="mean")
                    right.append(int(np.argmax(np.asarray(logits)[0]) == ex.label))
                results[f"{split}_accuracy"] = float(np.mean(right))
        first = list(self.tests.values())[0][:8]
        shape = _padded_shape(first)
        results["solver_steps"] = float(
            np.mean([solver_steps(model, _pad(ex.graph, *shape)) for ex in first])
        )
        return results


def train(task, kind, seed, args):
    model = make_model(
        kind,
        task.node_size,
        task.edge_size,
        task.out,
        jax.random.key(seed),
        args.gamma,
        args.sizing,
    )
    optim = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps))
    state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state, graph, y, mask):
        loss, grads = eqx.filter_value_and_grad(task.loss)(model, graph, y, mask)
        updates, state = optim.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in tqdm(range(args.steps), desc=f"{task.name}/{kind}/{seed}", mininterval=5, leave=False):
        idx = rng.choice(len(task.train), task.batch, replace=False)
        model, state, loss = step(model, state, *task.batch_arrays([task.train[i] for i in idx]))
    jax.block_until_ready(loss)
    train_s = time.perf_counter() - t0
    predict = eqx.filter_jit(lambda m, g: m(g))
    res = task.evaluate(model, predict)
    res.update(train_s=train_s, final_loss=float(loss), params=datasets.count_params(model))
    return res


def chains_run(length, kind, seed, args):
    data = datasets.chains_dataset(length, seed=seed)
    g = data.graph
    model = make_model(
        kind, g.nodes.shape[1], g.edges.shape[1], 2, jax.random.key(seed), args.gamma, args.sizing
    )
    optim = optax.adam(optax.cosine_decay_schedule(args.lr, args.chain_steps))
    state = optim.init(eqx.filter(model, eqx.is_array))
    labels = jnp.asarray(data.labels)
    mask = jnp.asarray(data.train_mask, jnp.float32)

    def loss_fn(m):
        ce = optax.softmax_cross_entropy_with_integer_labels(m(g), labels)
        return jnp.sum(mask * ce) / jnp.sum(mask)

    @eqx.filter_jit
    def step(m, s):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(m)
        updates, s = optim.update(grads, s, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), s, loss

    t0 = time.perf_counter()
    for _ in range(args.chain_steps):
        model, state, loss = step(model, state)
    jax.block_until_ready(loss)
    train_s = time.perf_counter() - t0
    logits = eqx.filter_jit(lambda m: m(g))(model)
    return dict(
        test_accuracy=datasets.node_accuracy(np.asarray(logits), data.labels, data.test_mask),
        solver_steps=solver_steps(model, g),
        train_s=train_s,
        params=datasets.count_params(model),
    )


def summarise(rows, metric_keys):
    out = {}
    for k in metric_keys:
        vals = np.array([r[k] for r in rows], float)
        out[k] = (float(np.mean(vals)), float(np.std(vals)))
    return out


# --------------------------------------------------------------------------- scaling


class DenseCGS(eqx.Module):
    """`layers.CGS` with the fixed point over a dense `[heads, N, N]` matrix."""

    cgs: layers.CGS

    def __call__(self, graph):
        h, (weights, _), b = self.cgs.encode(graph)
        n = graph.num_nodes
        a = jnp.zeros((self.cgs.heads, n, n), b.dtype)
        a = a.at[:, graph.receivers, graph.senders].add(weights.T)
        fn = lambda z, a: self.cgs.gamma * jnp.einsum("hij,jh->ih", a, z) + b
        sol = fixpoint.fixed_point(
            fn,
            jnp.zeros_like(b),
            a,
            solver=self.cgs.solver,
            adjoint=self.cgs.adjoint,
            max_steps=self.cgs.max_steps,
            throw=self.cgs.throw,
        )
        return jax.vmap(self.cgs.decoder)(jnp.concatenate([sol.value, h], axis=-1))


def random_graph(n, degree, rng):
    receivers = np.repeat(np.arange(n), degree)
    senders = (receivers + rng.integers(1, n, receivers.size)) % n
    return layers.Graph(
        jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
        jnp.asarray(rng.uniform(size=(receivers.size, 2)), jnp.float32),
        jnp.asarray(senders, jnp.int32),
        jnp.asarray(receivers, jnp.int32),
    )


def scaling(args):
    cgs = layers.CGS(4, 2, 1, hidden=32, heads=16, key=jax.random.key(0))
    rows = []

    def fwd_bwd(m, g):
        return eqx.filter_value_and_grad(lambda m: jnp.sum(m(g) ** 2))(m)

    for n in args.sizes:
        graph = random_graph(n, 5, np.random.default_rng(n))
        for name, model in (("sparse", cgs), ("dense", DenseCGS(cgs))):
            row = dict(n=n, edges=graph.num_edges, model=name)
            params, static = eqx.partition(model, eqx.is_array)
            fn = jax.jit(lambda p, g, static=static: fwd_bwd(eqx.combine(p, static), g))
            t0 = time.perf_counter()
            compiled = fn.lower(params, graph).compile()
            row["compile_s"] = time.perf_counter() - t0
            mem = _common.memory_of(compiled)
            row.update(mem)
            row["mem_bytes"] = mem.get("total", 0)
            if name == "dense" and n > args.dense_run_max:
                row["status"] = "compiled only (memory_analysis)"
            else:
                jax.block_until_ready(compiled(params, graph))  # warm-up
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(params, graph))
                    times.append(time.perf_counter() - t0)
                row["time_s"] = float(np.median(times))
                row["status"] = "ran"
            rows.append(row)
            print(
                f"N={n:>7} {name:6} mem {row['mem_bytes'] / 2**20:10.1f} MiB  "
                f"time {_common.fmt_time(row.get('time_s'))}  ({row['status']})",
                flush=True,
            )
    return rows


# --------------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="*", default=["gvi", "chains"])
    p.add_argument(
        "--models", nargs="+", default=["cgs", "cgs-max", "cgs-soft", "ignn", "gcn", "gin"]
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--chain-steps", type=int, default=300)
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    # Above GVI's discount 0.9, so that a max-plus head can reach γ·w = 0.9 with w < 1.
    p.add_argument("--gamma", type=float, default=0.95)
    p.add_argument(
        "--sizing",
        choices=["match", "fixed"],
        default="match",
        help="match: IGNN, GCN and GIN sized to the CGS's parameter count; fixed: "
        "hidden 96 / 96 / 64 (the chains results were run so)",
    )
    p.add_argument("--scaling", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 100000])
    p.add_argument("--dense-run-max", type=int, default=5000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--name", default="graphs", help="results/<name>_<platform>.json")
    args = p.parse_args()
    payload = dict(
        args=vars(args),
        versions=_common.versions(),
        git=_common.git_state(),
        device=_common.device_info(),
        tasks={},
        scaling=None,
    )
    for name in args.tasks:
        if name == "chains":
            for length in args.lengths:
                for kind in args.models:
                    runs = [chains_run(length, kind, s, args) for s in args.seeds]
                    summary = summarise(runs, ["test_accuracy", "solver_steps", "train_s"])
                    payload["tasks"][f"chains-{length}/{kind}"] = dict(runs=runs, summary=summary)
                    print(f"chains L={length:<4} {kind:5}", _fmt(summary), flush=True)
            continue
        task = Task(name, args)
        for kind in args.models:
            runs = [train(task, kind, s, args) for s in args.seeds]
            keys = [k for k in runs[0] if k not in ("params",)]
            summary = summarise(runs, keys)
            payload["tasks"][f"{name}/{kind}"] = dict(
                runs=runs, summary=summary, params=runs[0]["params"]
            )
            print(f"{name:9} {kind:5} params {runs[0]['params']:6d}", _fmt(summary), flush=True)
        _common.write_json(args.name, payload)
    if args.scaling:
        payload["scaling"] = scaling(args)
    print("wrote", _common.write_json(args.name, payload))


def _fmt(summary):
    return "  ".join(f"{k} {m:.4g}±{s:.2g}" for k, (m, s) in summary.items())


if __name__ == "__main__":
    main()
