"""Offline graph tasks: NumPy generators with exact targets, and their metrics.

Tasks (all deterministic given `seed`; graphs carry float32 features and int32
indices, targets are NumPy arrays):

- `gvi_dataset`: graph value iteration on random MDPs (Convergent Graph Solvers,
  Park et al. 2022), scored by `gvi_metrics`.
- `flow_dataset`: steady-state Kirchhoff flow on random Delaunay pore networks,
  scored by `flow_mse` (needs scipy: `pip install "fixpoint-jax[graphs]"`).
- `chains_dataset`: long-range chains whose class sits in the first node only
  (IGNN, Gu et al. 2020), scored by `node_accuracy`.
- `graph_classification_dataset`: four families of random graphs matched in node
  and (roughly) edge count (needs networkx: `pip install "fixpoint-jax[graphs]"`).
"""

from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Bool, Float, Int, PyTree

from fixpoint.layers import Graph, batch_graphs

# ---------------------------------------------------------------------------
# helpers


def _require(module: str, what: str) -> None:
    """A readable error naming the extra to install when `module` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"fixpoint.datasets.{what} needs {module}, which is not installed: "
            'pip install "fixpoint-jax[graphs]"'
        )


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"`seed` must be an int, got {seed!r}.")
    return np.random.default_rng(int(seed))


def _range(name, r) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in r)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a pair (low, high) of ints, got {r!r}.") from None
    if lo > hi or lo < 1:
        raise ValueError(f"`{name}` must satisfy 1 <= low <= high, got {r!r}.")
    return lo, hi


def _graph(nodes, edges, senders, receivers) -> Graph:
    return Graph(
        nodes=jnp.asarray(np.asarray(nodes, np.float32)),
        edges=jnp.asarray(np.asarray(edges, np.float32)),
        senders=jnp.asarray(np.asarray(senders, np.int32)),
        receivers=jnp.asarray(np.asarray(receivers, np.int32)),
    )


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------
# 1. graph value iteration


class GVIExample(NamedTuple):
    """One MDP of `gvi_dataset` (or several, from `batch_gvi`).

    A `NamedTuple`.

    **Arguments:**

    - `graph`: nodes `[1, na / 10]` (a constant and the in-degree), edges
      `[reward, discount]`; the edge `j → i` is the action "move from `j` to `i`".
    - `value`: `float64[N]`, the optimal values `V*`.
    - `policy`: `int[N]`, per state `i` the *edge index* `e` (with `receivers[e] == i`)
      that maximises `r_e + discount · V*[senders[e]]`.
    """

    graph: Graph
    value: np.ndarray
    policy: np.ndarray


def _segment_max_np(values, segments, n):
    out = np.full(n, -np.inf)
    np.maximum.at(out, segments, values)
    return out


def _segment_argmax_np(values, segments, n):
    """Per segment, the smallest index attaining the maximum (`-1` for an empty one)."""
    best = _segment_max_np(values, segments, n)
    hit = np.flatnonzero(values == best[segments])
    idx = np.full(n, len(values))
    np.minimum.at(idx, segments[hit], hit)
    return np.where(idx == len(values), -1, idx)


def gvi_backup(
    value: Float[ArrayLike, " N"],
    rewards: Float[ArrayLike, " E"],
    discount: Float[ArrayLike, " E"] | Float[ArrayLike, ""],
    senders: Int[ArrayLike, " E"],
    receivers: Int[ArrayLike, " E"],
    num_nodes: int,
) -> Float[np.ndarray, " N"]:
    """The Bellman backup `(T V)(i) = max_{e: j → i} [r_e + discount · V(j)]` (NumPy, float64).

    **Arguments:**

    - `value`: `float[N]`, the values `V`.
    - `rewards`: `float[E]`, the edge rewards.
    - `discount`: `float[E]` (or a scalar), the edge discounts.
    - `senders`: `int[E]`, each edge's source state `j`.
    - `receivers`: `int[E]`, each edge's target state `i`.
    - `num_nodes`: `N`.

    **Returns:**

    `float64[N]`, `T V` (`-inf` at a state that receives no edge).
    """
    q = _f64(rewards) + _f64(discount) * _f64(value)[np.asarray(senders)]
    return _segment_max_np(q, np.asarray(receivers), num_nodes)


def gvi_dataset(
    num_graphs: int,
    *,
    states: tuple[int, int] = (20, 50),
    actions: tuple[int, int] = (5, 10),
    discount: float = 0.9,
    seed: int,
) -> list[GVIExample]:
    """Random deterministic MDPs on graphs with their optimal values and policies.

    Each MDP has `ns ~ U{states}` states and `na ~ U{actions}` (bounds inclusive);
    every state `i` receives `na` edges `j → i` from distinct states `j ≠ i`, with
    rewards `r ~ U(-1, 1)`. `V*` solves `V(i) = max_{j → i} [r_ji + discount · V(j)]`
    and is found by value iteration until the largest change is below `1e-8` (so
    the Bellman residual of `value` is below `1e-8` too). Edges are sorted by
    receiver.

    The MDP is exactly what the float32 graph says: rewards and discount are
    rounded to float32 *before* solving, so `V*` recomputed from `graph.edges` (in
    float64) agrees to the solver tolerance.

    Node features: `[1, na / 10]`; edge features: `[reward, discount]`.

    **Arguments:**

    - `num_graphs`: the number of MDPs.

    Keyword-only:

    - `states`: the inclusive range of `ns` (default `(20, 50)`).
    - `actions`: the inclusive range of `na` (default `(5, 10)`; needs every
      `na < ns`).
    - `discount`: the discount factor, in `[0, 1)` (default 0.9).
    - `seed`: the NumPy seed.

    The graph value iteration task of Park, Choo & Park, *Convergent Graph Solvers*, ICLR 2022.

    **Returns:**

    A list of `num_graphs` `GVIExample`s.
    """
    s_lo, s_hi = _range("states", states)
    a_lo, a_hi = _range("actions", actions)
    if a_hi >= s_lo:
        raise ValueError(
            f"gvi_dataset: every state needs `na` distinct other states as senders, so the "
            f"largest `actions` ({a_hi}) must be below the smallest `states` ({s_lo})."
        )
    if not 0 <= discount < 1:
        raise ValueError(f"gvi_dataset: `discount` must lie in [0, 1), got {discount!r}.")
    rng = _rng(seed)
    gamma = float(np.float32(discount))
    out = []
    for _ in range(num_graphs):
        ns = int(rng.integers(s_lo, s_hi + 1))
        na = int(rng.integers(a_lo, a_hi + 1))
        scores = rng.random((ns, ns))
        np.fill_diagonal(scores, np.inf)  # never a self-loop
        senders = np.argsort(scores, axis=1)[:, :na].reshape(-1)  # na distinct j ≠ i per row
        receivers = np.repeat(np.arange(ns), na)
        rewards = rng.uniform(-1.0, 1.0, ns * na).astype(np.float32).astype(np.float64)
        v = np.zeros(ns)
        while True:
            v_new = gvi_backup(v, rewards, gamma, senders, receivers, ns)
            change = np.max(np.abs(v_new - v))
            v = v_new
            if change < 1e-8:
                break
        q = rewards + gamma * v[senders]
        policy = _segment_argmax_np(q, receivers, ns)
        nodes = np.stack([np.ones(ns), np.full(ns, na / 10)], axis=1)
        edges = np.stack([rewards, np.full(ns * na, gamma)], axis=1)
        out.append(GVIExample(_graph(nodes, edges, senders, receivers), v, policy))
    return out


def batch_gvi(examples: Iterable[GVIExample]) -> GVIExample:
    """Several `GVIExample`s as one: the graphs batched (`batch_graphs`), `value`
    concatenated, `policy` shifted to the batched edge indices.

    **Arguments:**

    - `examples`: the examples (at least one).

    **Returns:**

    One `GVIExample` holding them all.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("batch_gvi: `examples` is empty.")
    offsets = np.cumsum([0] + [ex.graph.num_edges for ex in examples[:-1]])
    return GVIExample(
        batch_graphs([ex.graph for ex in examples]),
        np.concatenate([_f64(ex.value) for ex in examples]),
        np.concatenate(
            [np.asarray(ex.policy) + o for ex, o in zip(examples, offsets, strict=True)]
        ),
    )


def gvi_metrics(
    value_pred: Float[ArrayLike, " N"] | Float[ArrayLike, "N 1"],
    example: GVIExample | Iterable[GVIExample],
) -> dict[str, float]:
    """Score predicted values against `V*` (NumPy, float64).

    - `mape`: `mean |V* − V̂| / |V*|` (a fraction, not per cent), divided by the
      *true* value; states with `|V*| < 1e-8` are left out (`nan` if all are).
    - `mae`: `mean |V* − V̂|`.
    - `policy_accuracy`: the fraction of states where the greedy backup on `V̂`
      (the first edge `e → i` maximising `r_e + discount · V̂[senders[e]]`) is
      optimal, i.e. `r_e + discount · V*[senders[e]] >= V*(i) − 1e-6` (so ties
      between optimal edges count as correct).

    **Arguments:**

    - `value_pred`: `float[N]` (or `[N, 1]`), the predicted values.
    - `example`: a `GVIExample` (one, or a batch from `batch_gvi`) or a list of them.

    **Returns:**

    A dict `{"mape", "mae", "policy_accuracy"}` of Python floats.
    """
    if not isinstance(example, GVIExample):
        example = batch_gvi(example)
    graph, v_true = example.graph, _f64(example.value)
    v_pred = _f64(value_pred).reshape(-1)
    if v_pred.shape != v_true.shape:
        raise ValueError(
            f"gvi_metrics: `value_pred` has {v_pred.size} values for {v_true.size} states."
        )
    edges = _f64(graph.edges)
    rewards, gamma = edges[:, 0], edges[:, 1]
    s, r, n = np.asarray(graph.senders), np.asarray(graph.receivers), graph.num_nodes
    err = np.abs(v_true - v_pred)
    ok = np.abs(v_true) >= 1e-8
    mape = float(np.mean(err[ok] / np.abs(v_true[ok]))) if ok.any() else float("nan")
    chosen = _segment_argmax_np(rewards + gamma * v_pred[s], r, n)
    q_true = rewards + gamma * v_true[s]
    best = _segment_max_np(q_true, r, n)
    has = chosen >= 0
    correct = has & (q_true[np.maximum(chosen, 0)] >= best - 1e-6)
    return {
        "mape": mape,
        "mae": float(np.mean(err)),
        "policy_accuracy": float(np.mean(correct[has])) if has.any() else float("nan"),
    }


# ---------------------------------------------------------------------------
# 2. steady-state flow


class FlowExample(NamedTuple):
    """One network of `flow_dataset`.

    A `NamedTuple`.

    **Arguments:**

    - `graph`: nodes `[x, y, is_inlet, is_outlet, boundary_value]`, edges
      `[conductance / max conductance, length]`, both directions of every throat.
    - `pressure`: `float64[N]`, the exact steady-state pressure.
    """

    graph: Graph
    pressure: np.ndarray


def flow_dataset(
    num_graphs: int, *, nodes: tuple[int, int] = (30, 60), seed: int
) -> list[FlowExample]:
    """Steady-state pressure on random pore networks (Kirchhoff's law, solved exactly).

    Each network has `n ~ U{nodes}` (inclusive) pores at uniform random points of
    the unit square, joined by the Delaunay triangulation; each throat has a radius
    `ρ ~ U(0.05, 0.15)`, a length `ℓ` (the Euclidean distance) and the conductance
    `g = ρ⁴ / ℓ` (Hagen–Poiseuille, constants dropped), stored as `g / max g`.
    Pressure is fixed to `1` on inlets (`x < 0.1`) and `0` on outlets (`x > 0.9`);
    an empty face gets the node of smallest (largest) `x`. Interior pressures solve
    `Σ_j g_ij (p_i − p_j) = 0` (`scipy.sparse.linalg.spsolve`), using the stored
    float32 conductances so that the law holds for the graph as given.

    **Arguments:**

    - `num_graphs`: the number of networks.

    Keyword-only:

    - `nodes`: inclusive range of the number of pores (at least 4; default
      `(30, 60)`).
    - `seed`: the NumPy seed.

    **Returns:**

    A list of `num_graphs` `FlowExample`s.
    """
    _require("scipy", "flow_dataset")
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla
    from scipy.spatial import Delaunay

    lo, hi = _range("nodes", nodes)
    if lo < 4:
        raise ValueError(f"flow_dataset: need at least 4 nodes, got `nodes={nodes!r}`.")
    rng = _rng(seed)
    out = []
    for _ in range(num_graphs):
        n = int(rng.integers(lo, hi + 1))
        xy = rng.random((n, 2))
        tri = Delaunay(xy)
        simplices = tri.simplices
        pairs = np.concatenate([simplices[:, [0, 1]], simplices[:, [1, 2]], simplices[:, [0, 2]]])
        pairs = np.unique(np.sort(pairs, axis=1), axis=0)
        length = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
        radius = rng.uniform(0.05, 0.15, len(pairs))
        g = radius**4 / length
        g = (g / g.max()).astype(np.float32).astype(np.float64)
        inlet, outlet = xy[:, 0] < 0.1, xy[:, 0] > 0.9
        if not inlet.any():
            inlet[np.argmin(xy[:, 0])] = True
        if not outlet.any():
            outlet[np.argmax(xy[:, 0])] = True
        fixed = inlet | outlet
        p = np.where(inlet, 1.0, 0.0)
        senders = np.concatenate([pairs[:, 0], pairs[:, 1]])
        receivers = np.concatenate([pairs[:, 1], pairs[:, 0]])
        g2 = np.concatenate([g, g])
        lap = sp.coo_matrix((-g2, (receivers, senders)), shape=(n, n)).tocsr()
        lap = lap + sp.diags(np.bincount(receivers, g2, n))
        free = np.flatnonzero(~fixed)
        if free.size:
            rhs = -lap[free][:, np.flatnonzero(fixed)] @ p[fixed]
            p[free] = spla.spsolve(lap[free][:, free].tocsc(), rhs)
        node_feats = np.stack([xy[:, 0], xy[:, 1], inlet, outlet, np.where(inlet, 1.0, 0.0)], 1)
        edge_feats = np.stack([g2, np.concatenate([length, length])], axis=1)
        out.append(FlowExample(_graph(node_feats, edge_feats, senders, receivers), p))
    return out


def flow_mse(
    pred: Float[ArrayLike, " N"] | Float[ArrayLike, "N 1"],
    target: Float[ArrayLike, " N"] | Float[ArrayLike, "N 1"],
    mask: Bool[ArrayLike, " N"] | None = None,
) -> float:
    """Mean squared error between predicted and true pressures (over `mask` if given).

    **Arguments:**

    - `pred`: the predicted pressures, `float[N]` (or `[N, 1]`).
    - `target`: the true pressures, `float[N]` (or `[N, 1]`).
    - `mask`: optional `bool[N]`, e.g. the interior nodes (`~(is_inlet | is_outlet)`).

    **Returns:**

    The mean squared error, a Python float (computed in float64).
    """
    pred, target = _f64(pred).reshape(-1), _f64(target).reshape(-1)
    sq = (pred - target) ** 2
    return float(np.mean(sq if mask is None else sq[np.asarray(mask, bool).reshape(-1)]))


# ---------------------------------------------------------------------------
# 3. long-range chains


class ChainsDataset(NamedTuple):
    """The chains of `chains_dataset`, all in one batched `Graph` (one graph per chain).

    A `NamedTuple`.

    **Arguments:**

    - `graph`: nodes `float[N, feature_size]`, edges `float[E, 1]` (ones).
    - `labels`: `int[N]`, the class of each node's chain.
    - `train_mask`: `bool[N]`, the training nodes (whole chains).
    - `test_mask`: `bool[N]`, the test nodes (whole chains; disjoint from
      `train_mask`).
    """

    graph: Graph
    labels: np.ndarray
    train_mask: np.ndarray
    test_mask: np.ndarray


def chains_dataset(
    length: int, *, num_chains_per_class: int = 20, seed: int, feature_size: int = 2
) -> ChainsDataset:
    """Two classes of chains whose class is visible only at one end (IGNN's chains task).

    `2 · num_chains_per_class` chains of `length` nodes, in random order, batched
    into one `Graph` with `n_node = [length, length, ...]`. Each chain is
    undirected, as in IGNN: edges `k → k+1` and `k+1 → k`. The first node of a
    chain of class `c` has feature `1` in column `c` (a one-hot of the class in
    columns 0–1); every other feature is zero. Every node is labelled with its
    chain's class. Per class, a random half of the chains (rounded down) is for
    training and the rest for testing: the split is by chain, never by node.

    **Arguments:**

    - `length`: nodes per chain (`>= 1`); information must travel `length − 1` hops.

    Keyword-only:

    - `num_chains_per_class`: chains per class (`>= 2`, so both splits hold both
      classes; default 20).
    - `seed`: the NumPy seed.
    - `feature_size`: node feature width (`>= 2`; columns past 1 are zero;
      default 2).

    The chains task of Gu, Chang, Zhu, Sojoudi & El Ghaoui, *Implicit Graph Neural Networks*,
    NeurIPS 2020.

    **Returns:**

    A `ChainsDataset`.
    """
    if length < 1 or num_chains_per_class < 2 or feature_size < 2:
        raise ValueError(
            "chains_dataset: need `length >= 1`, `num_chains_per_class >= 2` and "
            f"`feature_size >= 2`; got {length}, {num_chains_per_class}, {feature_size}."
        )
    rng = _rng(seed)
    num_chains = 2 * num_chains_per_class
    classes = rng.permutation(np.repeat(np.arange(2), num_chains_per_class))
    train_chain = np.zeros(num_chains, bool)
    for c in range(2):
        members = rng.permutation(np.flatnonzero(classes == c))
        train_chain[members[: num_chains_per_class // 2]] = True
    n = num_chains * length
    nodes = np.zeros((n, feature_size))
    starts = np.arange(num_chains) * length
    nodes[starts, classes] = 1.0
    k = np.arange(length - 1)
    fwd_s = (starts[:, None] + k[None, :]).reshape(-1)
    senders = np.concatenate([fwd_s, fwd_s + 1])
    receivers = np.concatenate([fwd_s + 1, fwd_s])
    g = _graph(nodes, np.ones((len(senders), 1)), senders, receivers)
    g = Graph(g.nodes, g.edges, g.senders, g.receivers, jnp.full(num_chains, length, jnp.int32))
    labels = np.repeat(classes, length).astype(np.int32)
    train = np.repeat(train_chain, length)
    return ChainsDataset(g, labels, train, ~train)


def node_accuracy(
    pred: Float[ArrayLike, "N C"] | Int[ArrayLike, " N"],
    labels: Int[ArrayLike, " N"],
    mask: Bool[ArrayLike, " N"] | None = None,
) -> float:
    """Accuracy of node predictions (over `mask` if given, e.g. `test_mask`).

    **Arguments:**

    - `pred`: `float[N, C]` logits (argmax taken) or `int[N]` predicted classes.
    - `labels`: `int[N]`, the true classes.
    - `mask`: optional `bool[N]`, the nodes scored.

    **Returns:**

    The fraction of correct nodes, a Python float.
    """
    classes = np.asarray(pred)
    if classes.ndim == 2:
        classes = np.argmax(classes, axis=1)
    hit = classes.reshape(-1) == np.asarray(labels).reshape(-1)
    return float(np.mean(hit if mask is None else hit[np.asarray(mask, bool).reshape(-1)]))


# ---------------------------------------------------------------------------
# 4. graph classification


class ClassificationExample(NamedTuple):
    """One graph of `graph_classification_dataset`.

    A `NamedTuple`.

    **Arguments:**

    - `graph`: nodes `[1, degree / 10]`, edges `[1]` (both directions of every
      undirected edge).
    - `label`: its family, an index into `GRAPH_FAMILIES`.
    """

    graph: Graph
    label: int


GRAPH_FAMILIES = ("erdos_renyi", "barabasi_albert", "watts_strogatz", "random_geometric")
"""The families of `graph_classification_dataset`, by label: `GRAPH_FAMILIES[label]`
names the networkx generator of a `ClassificationExample` (0 Erdős–Rényi, 1
Barabási–Albert, 2 Watts–Strogatz, 3 random geometric)."""


def _family_graph(label: int, n: int, seed: int):
    _require("networkx", "graph_classification_dataset")
    import networkx as nx

    if label == 0:  # expected 2n edges
        return nx.erdos_renyi_graph(n, 4 / (n - 1), seed=seed)
    if label == 1:  # 2(n - 2) edges
        return nx.barabasi_albert_graph(n, 2, seed=seed)
    if label == 2:  # 2n edges
        return nx.watts_strogatz_graph(n, 4, 0.2, seed=seed)
    # about 2n edges: mean degree π r² (n − 1) ≈ 4, inflated for the square's border
    radius = 1.1 * np.sqrt(4 / (np.pi * (n - 1)))
    return nx.random_geometric_graph(n, radius, seed=seed)


def graph_classification_dataset(
    num_graphs: int, *, nodes: tuple[int, int] = (20, 40), seed: int
) -> list[ClassificationExample]:
    """Random graphs of four families (networkx generators), to be told apart.

    Labels (see `GRAPH_FAMILIES`): 0 Erdős–Rényi (`p = 4 / (n − 1)`), 1
    Barabási–Albert (`m = 2`), 2 Watts–Strogatz (`k = 4`, rewiring `0.2`), 3
    random geometric (radius for mean degree ≈ 4). All have `n ~ U{nodes}` nodes
    and mean degree about 4 (about `2n` undirected edges), so neither size nor edge
    count gives the class away. Classes are balanced (`i mod 4`, shuffled), so all
    four appear once `num_graphs >= 4`. Node features: `[1, degree / 10]`; edge
    features: `[1]`; each undirected edge appears in both directions.

    **Arguments:**

    - `num_graphs`: the number of graphs.

    Keyword-only:

    - `nodes`: inclusive range of the number of nodes (at least 5; default
      `(20, 40)`).
    - `seed`: the NumPy seed.

    **Returns:**

    A list of `num_graphs` `ClassificationExample`s.
    """
    lo, hi = _range("nodes", nodes)
    if lo < 5:
        raise ValueError(f"graph_classification_dataset: need >= 5 nodes, got {nodes!r}.")
    rng = _rng(seed)
    labels = rng.permutation(np.arange(num_graphs) % len(GRAPH_FAMILIES))
    out = []
    for label in labels:
        n = int(rng.integers(lo, hi + 1))
        nxg = _family_graph(int(label), n, int(rng.integers(2**31 - 1)))
        for v, degree in nxg.degree:  # no self-loops: the degree is the in-degree
            nxg.nodes[v]["features"] = (1.0, degree / 10)
        for _, _, attrs in nxg.edges(data=True):
            attrs["weight"] = 1.0
        graph = Graph.from_networkx(nxg, node_features="features", edge_features="weight")
        out.append(ClassificationExample(graph, int(label)))
    return out


def count_params(module: PyTree) -> int:
    """The number of scalar parameters (inexact array entries) in `module`; also
    for an abstract module (`eqx.filter_eval_shape`), whose leaves are shapes.

    **Arguments:**

    - `module`: any pytree (an Equinox module); leaves with a floating or
      complex dtype count, integer and boolean arrays and non-arrays do not.

    **Returns:**

    The total number of entries, a Python int.
    """
    leaves = jax.tree_util.tree_leaves(module)
    inexact = (x for x in leaves if hasattr(x, "dtype") and hasattr(x, "shape"))
    return int(sum(x.size for x in inexact if jnp.issubdtype(x.dtype, jnp.inexact)))
