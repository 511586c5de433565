"""`Graph`: a sparse graph (or a batch of disjoint graphs) as a pytree, and helpers.

Edges are directed `senders[e] → receivers[e]`; a message along an edge is
aggregated at its receiver. Several graphs concatenated into one `Graph`
(`batch_graphs`) are one disconnected graph: `n_node[g]` nodes of graph `g`
follow those of graph `g - 1`, and no edge crosses between them. `pad_graph`
appends one padding graph so that batches have static shapes.
"""

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int

from ._networkx import networkx_arrays

if TYPE_CHECKING:
    import networkx as nx


class Graph(eqx.Module):
    """A directed graph with node and edge features (a pytree; works under `jit`/`vmap`).

    **Arguments:**

    - `nodes`: `float[N, F]` node features.
    - `edges`: `float[E, G]` edge features (`G` may be 0).
    - `senders`: `int[E]`, the edge `e` goes `senders[e] → receivers[e]`.
    - `receivers`: `int[E]`, where each edge's message is aggregated.
    - `n_node`: `int[num_graphs]`, the number of nodes of each graph when several
      are concatenated (their sum is `N`); `None` for a single graph.

    Shapes are checked when the graph is built; index ranges too when the indices
    are concrete (`Graph.check_indices` under `jit`). Errors name the field.
    """

    nodes: Float[Array, "N F"]
    edges: Float[Array, "E G"]
    senders: Int[Array, " E"]
    receivers: Int[Array, " E"]
    n_node: Int[Array, " graphs"] | None = None

    def __check_init__(self):
        for name in ("nodes", "edges"):
            x = getattr(self, name)
            if jnp.ndim(x) != 2 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                shape = "(N, F)" if name == "nodes" else "(E, G)"
                raise ValueError(
                    f"Graph: `{name}` must be a float array of shape {shape}, "
                    f"got {jnp.result_type(x)}{list(jnp.shape(x))}."
                )
        for name in ("senders", "receivers"):
            x = getattr(self, name)
            if jnp.ndim(x) != 1 or not jnp.issubdtype(jnp.result_type(x), jnp.integer):
                raise ValueError(
                    f"Graph: `{name}` must be an int array of shape (E,), "
                    f"got {jnp.result_type(x)}{list(jnp.shape(x))}."
                )
        e_s, e_r, e_f = len(self.senders), len(self.receivers), jnp.shape(self.edges)[0]
        if e_s != e_r:
            raise ValueError(
                f"Graph: `senders` has {e_s} entries but `receivers` has {e_r}; each edge "
                "needs one of each."
            )
        if e_f != e_s:
            raise ValueError(
                f"Graph: `edges` has {e_f} rows but there are {e_s} edges (`senders`); give "
                "one feature row per edge (shape (E, 0) for none)."
            )
        if self.n_node is not None and (
            jnp.ndim(self.n_node) != 1
            or not jnp.issubdtype(jnp.asarray(self.n_node).dtype, jnp.integer)
        ):
            raise ValueError(
                "Graph: `n_node` must be int[num_graphs], got "
                f"{jnp.asarray(self.n_node).dtype}{list(jnp.shape(self.n_node))}."
            )
        self.check_indices()

    @classmethod
    def from_networkx(
        cls,
        graph: "nx.Graph",
        /,
        *,
        node_features: str | Sequence[str] | None = None,
        edge_features: str | Sequence[str] | None = None,
        dtype: DTypeLike = jnp.float32,
    ) -> "Graph":
        """A `Graph` from a networkx graph (needs networkx: `pip install "fixpoint-jax[graphs]"`).

        Nodes are numbered `0 … N-1` in the order of `list(graph.nodes)`, whatever
        their networkx names: node `list(graph.nodes)[i]` is row `i` of `nodes`. A
        directed graph keeps its edges `u → v` in the order of `graph.edges`. An
        undirected graph gets every edge in both directions: first `u → v` for each
        `(u, v)` of `graph.edges`, then `v → u` for each in the same order, with the
        same features; a self-loop is its own reverse and appears once. A multigraph
        keeps every parallel edge, each with its own features (sum aggregation then
        counts an edge as often as it appears).

        **Arguments:**

        - `graph`: a `networkx.Graph`, `DiGraph`, `MultiGraph` or `MultiDiGraph`.
        - `node_features`: the name of a node attribute holding a number or a vector
          (of the same length on every node), or a sequence of such names whose
          values are placed side by side as columns, in that order. `None` (or `()`):
          no features, `nodes` is `float[N, 0]` (it still fixes the number of nodes;
          the layers need features, so replace it before use).
        - `edge_features`: the same for edge attributes; `None`: `edges` is `float[E, 0]`.
        - `dtype`: the float dtype of the features (default float32, as the layers).

        **Returns:**

        A single `Graph` (`n_node=None`) with int32 `senders` and `receivers`. With
        no nodes (or no edges) there is nothing to read a feature width from, so
        `nodes` (`edges`) then has 0 columns.

        Errors (a non-networkx `graph`, a missing attribute, sizes that differ
        between nodes or edges, a value that is not a real number) name the argument
        and the first offending node or edge.
        """
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"Graph.from_networkx: `dtype` must be a float dtype, got {dtype!r}.")
        nodes, edges, senders, receivers = networkx_arrays(graph, node_features, edge_features)
        return cls(
            nodes=jnp.asarray(nodes.astype(dtype)),
            edges=jnp.asarray(edges.astype(dtype)),
            senders=jnp.asarray(senders.astype(np.int32)),
            receivers=jnp.asarray(receivers.astype(np.int32)),
        )

    @property
    def num_nodes(self) -> int:
        """The number of nodes `N` (static: the first dimension of `nodes`).

        **Returns:**

        A Python int.
        """
        return jnp.shape(self.nodes)[0]

    @property
    def num_edges(self) -> int:
        """The number of edges `E` (static: the length of `senders`).

        **Returns:**

        A Python int.
        """
        return jnp.shape(self.senders)[0]

    @property
    def num_graphs(self) -> int:
        """The number of graphs in the batch: 1 without `n_node`, else its length.

        **Returns:**

        A Python int.
        """
        return 1 if self.n_node is None else jnp.shape(self.n_node)[0]

    def check_indices(self) -> None:
        """Raise if an index is out of range or `n_node` does not add up (when concrete)."""
        n = self.num_nodes
        for name in ("senders", "receivers"):
            x = getattr(self, name)
            if isinstance(x, Tracer):
                continue
            x = np.asarray(x)
            bad = np.flatnonzero((x < 0) | (x >= n))
            if bad.size:
                raise ValueError(
                    f"Graph: `{name}[{bad[0]}] = {x[bad[0]]}` is out of range for {n} nodes."
                )
        if self.n_node is not None and not isinstance(self.n_node, Tracer):
            total = int(np.sum(np.asarray(self.n_node)))
            if total != n or np.any(np.asarray(self.n_node) < 0):
                raise ValueError(
                    f"Graph: `n_node` {np.asarray(self.n_node).tolist()} must be non-negative "
                    f"and sum to the number of nodes {n}."
                )
        if self.n_node is not None and not any(
            isinstance(x, Tracer) for x in (self.n_node, self.senders, self.receivers)
        ):
            n_node = np.asarray(self.n_node)
            g = np.repeat(np.arange(n_node.size), n_node)  # NumPy: no compile per shape
            s, r = np.asarray(self.senders), np.asarray(self.receivers)
            cross = np.flatnonzero(g[s] != g[r])
            if cross.size:
                e = cross[0]
                raise ValueError(
                    f"Graph: edge {e} ({s[e]} → {r[e]}) joins graph {g[s[e]]} to graph "
                    f"{g[r[e]]}; edges of a batch must stay inside their graph."
                )

    def node_graph(self) -> Int[Array, " N"]:
        """The graph index of every node (all zeros for a single graph)."""
        if self.n_node is None:
            return jnp.zeros(self.num_nodes, jnp.int32)
        ids = jnp.arange(self.num_graphs, dtype=jnp.int32)
        return jnp.repeat(ids, self.n_node, total_repeat_length=self.num_nodes)

    def in_degree(self, weights: Float[Array, " E"] | None = None) -> Float[Array, " N"]:
        """Per node, the number (or total `weights`) of edges it receives."""
        w = jnp.ones(self.num_edges, self.nodes.dtype) if weights is None else weights
        return jax.ops.segment_sum(w, self.receivers, self.num_nodes)


def _on_host(arrays) -> bool:
    """Whether `arrays` may be joined on the host: no tracers, nothing sharded."""
    for a in arrays:
        if isinstance(a, Tracer):
            return False
        if isinstance(a, jax.Array) and len(a.devices()) > 1:
            return False
    return True


def _concat(arrays, like):
    """`jnp.concatenate(arrays)`, on the host (NumPy) when the arrays are concrete:
    eager JAX ops would compile anew for every new shape, and batches of random
    graphs have many. The result goes to the device of `like` (if a JAX array)."""
    if not _on_host([*arrays, like]):
        return jnp.concatenate([jnp.asarray(a) for a in arrays])
    out = np.concatenate([np.asarray(a) for a in arrays])
    if isinstance(like, jax.Array):
        return jax.device_put(out, next(iter(like.devices())))
    return jnp.asarray(out)


def batch_graphs(graphs: Iterable[Graph]) -> Graph:
    """Concatenate graphs into one disconnected `Graph` with `n_node` set (NumPy, eager).

    Node indices of each graph are shifted by the number of nodes before it; a
    graph that is itself a batch contributes each of its graphs to `n_node`.
    Concrete inputs are joined on the host (NumPy), traced ones with `jnp`.

    **Arguments:**

    - `graphs`: the graphs, an iterable of `Graph` (at least one) with the same
      node-feature and edge-feature widths.

    **Returns:**

    One `Graph` with int32 `senders`/`receivers` and `n_node` the node counts.

    **Raises:**

    `ValueError` for no graphs or differing feature widths.
    """
    graphs = list(graphs)
    if not graphs:
        raise ValueError("batch_graphs: `graphs` is empty.")
    for field in ("nodes", "edges"):
        widths = [jnp.shape(getattr(g, field))[1] for g in graphs]
        for i, width in enumerate(widths):
            if width != widths[0]:
                raise ValueError(
                    f"batch_graphs: `graphs[{i}].{field}` has {width} features per row but "
                    f"`graphs[0].{field}` has {widths[0]}; batched graphs need the same widths."
                )
    offsets = np.cumsum([0] + [g.num_nodes for g in graphs[:-1]])
    n_node = []
    for g in graphs:
        n_node.extend([g.num_nodes] if g.n_node is None else np.asarray(g.n_node).tolist())
    xp = np if _on_host([x for g in graphs for x in jax.tree.leaves(g)]) else jnp
    shift = lambda field: [  # noqa: E731
        xp.asarray(getattr(g, field)).astype(np.int32) + np.int32(o)
        for g, o in zip(graphs, offsets, strict=True)
    ]
    like = graphs[0].nodes
    return Graph(
        nodes=_concat([g.nodes for g in graphs], like),
        edges=_concat([g.edges for g in graphs], like),
        senders=_concat(shift("senders"), like),
        receivers=_concat(shift("receivers"), like),
        n_node=_concat([np.asarray(n_node, np.int32)], like),
    )


def pad_graph(graph: Graph, num_nodes: int, num_edges: int) -> Graph:
    """`graph` padded to exactly `num_nodes` nodes and `num_edges` edges.

    The padding is one extra graph (an extra entry in `n_node`) of zero-feature
    nodes whose padding edges are self-loops on its first node; it never touches
    the real graphs. Needs `num_nodes > graph.num_nodes` (room for at least one
    padding node) and `num_edges >= graph.num_edges`. Drop the padding graph's
    outputs with `graph.n_node` (the last entry) or a mask of the first
    `graph.num_nodes` nodes.

    **Arguments:**

    - `graph`: the `Graph` (or batch) to pad.
    - `num_nodes`: the node count after padding, `> graph.num_nodes`.
    - `num_edges`: the edge count after padding, `>= graph.num_edges`.

    **Returns:**

    A `Graph` with `num_nodes` nodes, `num_edges` edges and `n_node` ending with
    the padding graph's size.

    **Raises:**

    `ValueError` when there is no room for a padding node or too few edges.
    """
    n, e = graph.num_nodes, graph.num_edges
    if num_nodes <= n or num_edges < e:
        raise ValueError(
            f"pad_graph: need `num_nodes` > {n} (at least one padding node) and "
            f"`num_edges` >= {e}; got num_nodes={num_nodes}, num_edges={num_edges}."
        )
    n_node = jnp.array([n], jnp.int32) if graph.n_node is None else graph.n_node
    # On the host when concrete (see `_concat`); as JAX ops under a trace.
    xp = np if _on_host(jax.tree.leaves(graph)) else jnp
    pad_index = xp.full(num_edges - e, n, graph.senders.dtype)
    like = graph.nodes
    return Graph(
        nodes=_concat(
            [graph.nodes, xp.zeros((num_nodes - n, graph.nodes.shape[1]), graph.nodes.dtype)], like
        ),
        edges=_concat(
            [graph.edges, xp.zeros((num_edges - e, graph.edges.shape[1]), graph.edges.dtype)], like
        ),
        senders=_concat([graph.senders, pad_index], like),
        receivers=_concat([graph.receivers, pad_index], like),
        n_node=_concat(
            [xp.asarray(n_node).astype(np.int32), xp.array([num_nodes - n], np.int32)], like
        ),
    )
