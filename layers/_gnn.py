"""Finite-depth GNN baselines for the graph solvers: `GCN`, `GIN` (node
outputs) and `graph_readout` (graph outputs). None of them builds a dense
`N × N` matrix.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray

from ._graph import Graph

# ---------------------------------------------------------------------------
# baselines


def _mlp_dtype(dtype: DTypeLike | None) -> DTypeLike:
    return jnp.float32 if dtype is None else dtype


def _apply(linear: eqx.nn.Linear, x):
    return x @ linear.weight.T + (0 if linear.bias is None else linear.bias)


def gcn_aggregate(
    h: Float[Array, "N K"], graph: Graph, edge_weight: Float[Array, " E"] | None = None
) -> Float[Array, "N K"]:
    """`D^-1/2 (A + I) D^-1/2 h` by segment sums, with `A[r, s] = w_e` for each edge `s → r`.

    `D = diag(1 + in-weight)` (the row sums of `A + I`); for a graph with both
    directions of each edge this is the usual symmetric GCN normalisation. Weights
    must be non-negative.

    **Arguments:**

    - `h`: `float[N, K]` node values.
    - `graph`: the graph.
    - `edge_weight`: optional `float[E]` edge weights (default: all ones).

    Kipf & Welling, *Semi-Supervised Classification with Graph Convolutional
    Networks*, ICLR 2017.

    **Returns:**

    `float[N, K]`, the aggregated node values.
    """
    n = graph.num_nodes
    w = (
        jnp.ones(graph.num_edges, h.dtype)
        if edge_weight is None
        else jnp.asarray(edge_weight).astype(h.dtype)
    )
    deg = 1 + jax.ops.segment_sum(w, graph.receivers, n)
    inv_sqrt = jax.lax.rsqrt(deg)
    coef = w * inv_sqrt[graph.senders] * inv_sqrt[graph.receivers]
    msgs = coef[:, None] * h[graph.senders]
    return jax.ops.segment_sum(msgs, graph.receivers, n) + h / deg[:, None]


class GCN(eqx.Module):
    """A finite-depth graph convolutional network, per node.

    Kipf & Welling, *Semi-Supervised Classification with Graph Convolutional
    Networks*, ICLR 2017.

    `depth` layers `h ← relu(Â h W + b)` with `Â = D^-1/2 (A + I) D^-1/2`
    (`gcn_aggregate`, sparse), then a linear readout: `gcn(graph) -> float[N, out_size]`.
    Edge features are ignored except, optionally, one column used as edge weights.
    Inputs are cast to the parameters' dtype.

    **Arguments:**

    - `node_size`: the graph's node feature width.
    - `edge_size`: the graph's edge feature width.
    - `out_size`: outputs per node.

    Keyword-only:

    - `hidden`: hidden width (default 64).
    - `depth`: the number of graph convolutions, `>= 1` (default 3).
    - `key`: a JAX PRNG key.
    - `edge_weight_column`: the column of `graph.edges` to use as (non-negative)
      edge weights, e.g. `0` for the flow conductances; `None`: unit weights.
    - `dtype`: parameter dtype (default float32).
    """

    layers: list[eqx.nn.Linear]
    readout: eqx.nn.Linear
    edge_weight_column: int | None = eqx.field(static=True)

    def __init__(
        self,
        node_size: int,
        edge_size: int,
        out_size: int,
        *,
        hidden: int = 64,
        depth: int = 3,
        key: PRNGKeyArray,
        edge_weight_column: int | None = None,
        dtype: DTypeLike | None = None,
    ):
        if depth < 1:
            raise ValueError(f"GCN: `depth` must be >= 1, got {depth}.")
        if edge_weight_column is not None and not 0 <= edge_weight_column < edge_size:
            raise ValueError(
                f"GCN: `edge_weight_column={edge_weight_column}` is not a column of "
                f"{edge_size} edge features."
            )
        dtype = _mlp_dtype(dtype)
        keys = jax.random.split(key, depth + 1)
        sizes = [node_size] + [hidden] * depth
        self.layers = [
            eqx.nn.Linear(a, b, key=k, dtype=dtype)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys[:-1], strict=True)
        ]
        self.readout = eqx.nn.Linear(hidden, out_size, key=keys[-1], dtype=dtype)
        self.edge_weight_column = edge_weight_column

    def __call__(self, graph: Graph) -> Float[Array, "N out"]:
        """Apply the network to every node of `graph`.

        **Arguments:**

        - `graph`: a `fixpoint.layers.Graph` with `node_size` node features.

        **Returns:**

        `float[N, out_size]`.
        """
        dtype = self.readout.weight.dtype
        h = graph.nodes.astype(dtype)
        w = None
        if self.edge_weight_column is not None:
            w = graph.edges[:, self.edge_weight_column].astype(dtype)
        for layer in self.layers:
            h = jax.nn.relu(gcn_aggregate(_apply(layer, h), graph, w))
        return _apply(self.readout, h)


class GIN(eqx.Module):
    """A finite-depth graph isomorphism network with edge features (GIN/GINE), per node.

    After a linear encoder, each of `depth` layers computes
    `h_i ← relu(MLP((1 + ε) h_i + Σ_{e: j → i} relu(W [h_j, edge_e] + b)))`
    (sum aggregation, learnt `ε` per layer, a 2-layer ReLU MLP), so edge features
    such as the GVI rewards enter every message. A linear readout gives
    `gin(graph) -> float[N, out_size]`. Inputs are cast to the parameters' dtype.

    **Arguments:**

    - `node_size`: the graph's node feature width.
    - `edge_size`: the graph's edge feature width.
    - `out_size`: outputs per node.

    Keyword-only:

    - `hidden`: hidden width (default 64).
    - `depth`: the number of GIN layers, `>= 1` (default 3).
    - `key`: a JAX PRNG key.
    - `dtype`: parameter dtype (default float32).

    Xu, Hu, Leskovec & Jegelka, *How Powerful are Graph Neural Networks?*, ICLR
    2019 (GIN); with edge features as in Hu, Liu, Gomes, Zitnik, Liang, Pande &
    Leskovec, *Strategies for Pre-training Graph Neural Networks*, ICLR 2020
    (GINE).
    """

    encoder: eqx.nn.Linear
    messages: list[eqx.nn.Linear]
    mlps: list[tuple[eqx.nn.Linear, eqx.nn.Linear]]
    eps: Float[Array, " depth"]
    readout: eqx.nn.Linear

    def __init__(
        self,
        node_size: int,
        edge_size: int,
        out_size: int,
        *,
        hidden: int = 64,
        depth: int = 3,
        key: PRNGKeyArray,
        dtype: DTypeLike | None = None,
    ):
        if depth < 1:
            raise ValueError(f"GIN: `depth` must be >= 1, got {depth}.")
        dtype = _mlp_dtype(dtype)
        k_enc, k_out, *ks = jax.random.split(key, 2 + 3 * depth)
        lin = lambda a, b, k: eqx.nn.Linear(a, b, key=k, dtype=dtype)
        self.encoder = lin(node_size, hidden, k_enc)
        self.messages = [lin(hidden + edge_size, hidden, k) for k in ks[:depth]]
        self.mlps = [
            (lin(hidden, hidden, k1), lin(hidden, hidden, k2))
            for k1, k2 in zip(ks[depth : 2 * depth], ks[2 * depth :], strict=True)
        ]
        self.eps = jnp.zeros(depth, dtype)
        self.readout = lin(hidden, out_size, k_out)

    def __call__(self, graph: Graph) -> Float[Array, "N out"]:
        """Apply the network to every node of `graph`.

        **Arguments:**

        - `graph`: a `fixpoint.layers.Graph` with `node_size` node features.

        **Returns:**

        `float[N, out_size]`.
        """
        dtype = self.readout.weight.dtype
        s, r, n = graph.senders, graph.receivers, graph.num_nodes
        e = graph.edges.astype(dtype)
        h = _apply(self.encoder, graph.nodes.astype(dtype))
        for i, (msg, (l1, l2)) in enumerate(zip(self.messages, self.mlps, strict=True)):
            m = jax.nn.relu(_apply(msg, jnp.concatenate([h[s], e], axis=1)))
            agg = jax.ops.segment_sum(m, r, n)
            z = (1 + self.eps[i]) * h + agg
            h = jax.nn.relu(_apply(l2, jax.nn.relu(_apply(l1, z))))
        return _apply(self.readout, h)


def graph_readout(
    node_values: Float[Array, "N K"], graph: Graph, reduce: str = "mean"
) -> Float[Array, "graphs K"]:
    """Pool node values per graph of a batch (`[1, K]` for a single graph).

    **Arguments:**

    - `node_values`: `float[N, K]`.
    - `graph`: the (batched) graph; nodes are assigned by `graph.node_graph()`.
    - `reduce`: `"mean"` (default), `"sum"` or `"max"` (an empty graph gives
      0, 0, `-inf`).

    **Returns:**

    `float[num_graphs, K]`, one row per graph.
    """
    if reduce not in ("mean", "sum", "max"):
        raise ValueError(f'graph_readout: `reduce` must be "mean", "sum" or "max", got {reduce!r}.')
    seg, num = graph.node_graph(), graph.num_graphs
    if reduce == "max":
        return jax.ops.segment_max(node_values, seg, num)
    total = jax.ops.segment_sum(node_values, seg, num)
    if reduce == "sum":
        return total
    count = jax.ops.segment_sum(jnp.ones(graph.num_nodes, node_values.dtype), seg, num)
    return total / jnp.maximum(count, 1)[:, None]
