import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixpoint import datasets, layers


def _np(x, dtype=np.float64):
    return np.asarray(x, dtype)


# ---------------------------------------------------------------------------
# graph value iteration


@pytest.fixture(scope="module")
def gvi():
    return datasets.gvi_dataset(6, seed=0)


def test_gvi_bellman_and_policy(gvi):
    for ex in gvi:
        g = ex.graph
        assert g.nodes.dtype == jnp.float32 and g.edges.dtype == jnp.float32
        assert g.senders.dtype == jnp.int32 and g.receivers.dtype == jnp.int32
        s, r, n = np.asarray(g.senders), np.asarray(g.receivers), g.num_nodes
        rewards, gamma = _np(g.edges[:, 0]), _np(g.edges[:, 1])
        assert np.all(np.abs(rewards) <= 1) and np.allclose(gamma, np.float32(0.9))
        backup = datasets.gvi_backup(ex.value, rewards, gamma, s, r, n)
        assert np.max(np.abs(backup - ex.value)) < 1e-7
        # the policy is an incoming edge of each state that attains the maximum
        assert ex.policy.shape == (n,)
        assert np.array_equal(r[ex.policy], np.arange(n))
        q = rewards + gamma * ex.value[s]
        assert np.max(np.abs(q[ex.policy] - ex.value)) < 1e-7


def test_gvi_structure(gvi):
    for ex in gvi:
        g = ex.graph
        s, r, n = np.asarray(g.senders), np.asarray(g.receivers), g.num_nodes
        assert 20 <= n <= 50
        na = int(round(float(g.nodes[0, 1]) * 10))
        assert 5 <= na <= 10
        assert np.all(np.bincount(r, minlength=n) == na)
        assert np.all(s != r)
        for i in range(n):
            assert len(set(s[r == i].tolist())) == na
        assert np.all(np.asarray(g.nodes[:, 0]) == 1)


def test_gvi_metrics(gvi):
    for ex in gvi[:2]:
        m = datasets.gvi_metrics(ex.value, ex)
        assert m == {"mape": 0.0, "mae": 0.0, "policy_accuracy": 1.0}
        # MAPE divides by the true value
        m = datasets.gvi_metrics(1.1 * ex.value, ex)
        assert m["mape"] == pytest.approx(0.1, rel=1e-9)
        assert m["mae"] == pytest.approx(0.1 * np.mean(np.abs(ex.value)), rel=1e-9)
        # a constant prediction makes the greedy policy pick by reward alone
        assert datasets.gvi_metrics(np.zeros(ex.graph.num_nodes), ex)["policy_accuracy"] < 1
    values = np.concatenate([ex.value for ex in gvi])
    batched = datasets.batch_gvi(gvi)
    assert datasets.gvi_metrics(values, gvi)["policy_accuracy"] == 1.0
    assert datasets.gvi_metrics(values[:, None], batched)["mape"] == 0.0
    assert np.array_equal(
        np.asarray(batched.graph.receivers)[batched.policy], np.arange(len(values))
    )


def test_gvi_metrics_ties_and_zero_values():
    # every reward 0: V* = 0 everywhere, every edge optimal
    s = np.array([1, 2, 0, 2, 0, 1])
    r = np.array([0, 0, 1, 1, 2, 2])
    graph = layers.Graph(
        nodes=jnp.ones((3, 2), jnp.float32),
        edges=jnp.stack([jnp.zeros(6, jnp.float32), jnp.full(6, 0.5, jnp.float32)], 1),
        senders=jnp.asarray(s, jnp.int32),
        receivers=jnp.asarray(r, jnp.int32),
    )
    ex = datasets.GVIExample(graph, np.zeros(3), np.array([0, 2, 4]))
    m = datasets.gvi_metrics(np.array([0.0, 0.0, 1.0]), ex)  # state 0 picks edge 1: a tie
    assert m["policy_accuracy"] == 1.0
    assert np.isnan(m["mape"]) and m["mae"] == pytest.approx(1 / 3)


def test_gvi_deterministic_and_ood():
    a = datasets.gvi_dataset(2, seed=3)
    b = datasets.gvi_dataset(2, seed=3)
    c = datasets.gvi_dataset(2, seed=4)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x.graph.edges), np.asarray(y.graph.edges))
        assert np.array_equal(np.asarray(x.graph.senders), np.asarray(y.graph.senders))
        assert np.array_equal(x.value, y.value) and np.array_equal(x.policy, y.policy)
    assert not np.array_equal(a[0].value[:5], c[0].value[:5])
    for ex in datasets.gvi_dataset(2, states=(50, 100), seed=1):
        assert 50 <= ex.graph.num_nodes <= 100
        assert datasets.gvi_metrics(ex.value, ex)["policy_accuracy"] == 1.0
    with pytest.raises(ValueError, match="actions"):
        datasets.gvi_dataset(1, states=(5, 6), actions=(5, 10), seed=0)


# ---------------------------------------------------------------------------
# flow


def test_flow_kirchhoff_and_boundaries():
    data = datasets.flow_dataset(4, seed=0)
    again = datasets.flow_dataset(4, seed=0)
    for ex, ex2 in zip(data, again, strict=True):
        g, p = ex.graph, ex.pressure
        assert np.array_equal(p, ex2.pressure)
        n = g.num_nodes
        assert 30 <= n <= 60 and g.nodes.shape == (n, 5) and g.edges.shape[1] == 2
        s, r = np.asarray(g.senders), np.asarray(g.receivers)
        cond, length = _np(g.edges[:, 0]), _np(g.edges[:, 1])
        # both directions of every throat, same features
        fwd = {(a, b): (c, ell) for a, b, c, ell in zip(s, r, cond, length, strict=True)}
        assert all(fwd[(b, a)] == v for (a, b), v in fwd.items())
        assert np.all(cond > 0) and np.max(cond) == 1.0 and np.all(length > 0)
        xy = _np(g.nodes[:, :2])
        inlet, outlet = _np(g.nodes[:, 2]) == 1, _np(g.nodes[:, 3]) == 1
        assert inlet.any() and outlet.any() and not (inlet & outlet).any()
        assert np.all(xy[inlet & (xy[:, 0] >= 0.1), 0] == xy[:, 0].min())
        assert np.array_equal(_np(g.nodes[:, 4]), inlet.astype(np.float64))
        assert np.all(p[inlet] == 1) and np.all(p[outlet] == 0)
        interior = ~(inlet | outlet)
        net = np.bincount(r, cond * (p[r] - p[s]), minlength=n)
        assert np.max(np.abs(net[interior])) < 1e-8
        assert np.all(p >= -1e-12) and np.all(p <= 1 + 1e-12)
        assert 0 < datasets.flow_mse(np.zeros(n), p) <= 1
        assert datasets.flow_mse(p[:, None], p, interior) == 0


# ---------------------------------------------------------------------------
# chains


@pytest.mark.parametrize("length", [1, 6])
def test_chains(length):
    data = datasets.chains_dataset(length, seed=0)
    g = data.graph
    chains = 40
    n = chains * length
    assert g.nodes.shape == (n, 2) and g.num_edges == 2 * chains * (length - 1)
    assert np.array_equal(np.asarray(g.n_node), np.full(chains, length))
    nodes = np.asarray(g.nodes)
    starts = np.arange(chains) * length
    assert np.array_equal(np.flatnonzero(nodes.any(axis=1)), starts)
    labels = data.labels.reshape(chains, length)
    assert np.all(labels == labels[:, :1])
    assert np.array_equal(np.argmax(nodes[starts], axis=1), labels[:, 0])
    assert np.bincount(labels[:, 0]).tolist() == [20, 20]
    train, test = data.train_mask, data.test_mask
    assert not (train & test).any() and (train | test).all()
    tr = train.reshape(chains, length)
    assert np.all(tr == tr[:, :1])
    for c in range(2):
        assert tr[labels[:, 0] == c, 0].sum() == 10
    # a chain: each inner node has two neighbours, the ends one
    if length > 1:
        deg = np.bincount(np.asarray(g.receivers), minlength=n).reshape(chains, length)
        assert np.all(deg[:, 0] == 1) and np.all(deg[:, -1] == 1) and np.all(deg[:, 1:-1] == 2)
    assert datasets.node_accuracy(np.eye(2)[data.labels], data.labels, test) == 1.0
    wide = datasets.chains_dataset(length, num_chains_per_class=3, seed=1, feature_size=5)
    assert wide.graph.nodes.shape == (6 * length, 5)


# ---------------------------------------------------------------------------
# graph classification


def test_graph_classification():
    data = datasets.graph_classification_dataset(24, seed=0)
    assert sorted({ex.label for ex in data}) == [0, 1, 2, 3]
    ratio = {c: [] for c in range(4)}
    for ex in data:
        g = ex.graph
        n = g.num_nodes
        assert 20 <= n <= 40 and g.nodes.shape == (n, 2) and g.edges.shape == (g.num_edges, 1)
        s, r = np.asarray(g.senders), np.asarray(g.receivers)
        assert np.all(s != r)
        pairs = set(zip(s.tolist(), r.tolist(), strict=True))
        assert len(pairs) == len(s) and all((b, a) in pairs for a, b in pairs)
        assert np.allclose(_np(g.nodes[:, 1]) * 10, np.bincount(r, minlength=n), atol=1e-5)
        ratio[ex.label].append(g.num_edges / n)
    for c in range(4):  # mean degree about 4 in every family
        assert 3 < np.mean(ratio[c]) < 5


def test_graph_classification_uses_from_networkx_unchanged():
    # The generator's graphs equal its former hand-made conversion of the same
    # networkx graphs (same random draws): edges (u, v) then all (v, u), nodes
    # [1, degree / 10], edges [1], float32 and int32.
    from fixpoint.datasets._graphs import _family_graph

    data = datasets.graph_classification_dataset(8, nodes=(5, 12), seed=3)
    rng = np.random.default_rng(3)
    labels = rng.permutation(np.arange(8) % 4)
    for ex, label in zip(data, labels, strict=True):
        n = int(rng.integers(5, 13))
        nxg = _family_graph(int(label), n, int(rng.integers(2**31 - 1)))
        pairs = np.asarray(list(nxg.edges()), np.int64).reshape(-1, 2)
        senders = np.concatenate([pairs[:, 0], pairs[:, 1]])
        receivers = np.concatenate([pairs[:, 1], pairs[:, 0]])
        degree = np.bincount(receivers, minlength=n)
        nodes = np.stack([np.ones(n), degree / 10], axis=1).astype(np.float32)
        g = ex.graph
        assert ex.label == label and g.n_node is None
        assert g.nodes.dtype == jnp.float32 and g.senders.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(g.nodes), nodes)
        np.testing.assert_array_equal(np.asarray(g.edges), np.ones((len(senders), 1)))
        np.testing.assert_array_equal(np.asarray(g.senders), senders)
        np.testing.assert_array_equal(np.asarray(g.receivers), receivers)


# ---------------------------------------------------------------------------
# Graph.from_networkx


@pytest.fixture(scope="module")
def nx():
    return pytest.importorskip("networkx")


def _edge_list(g):
    return list(zip(np.asarray(g.senders).tolist(), np.asarray(g.receivers).tolist(), strict=True))


def test_from_networkx_undirected_doubles_edges(nx):
    # Node names are not integers and not sorted: rows follow `list(G.nodes)`.
    G = nx.Graph()
    G.add_node("b", pos=[1.0, 2.0], mass=3)
    G.add_node("a", pos=(4.0, 5.0), mass=6)
    G.add_node("c", pos=np.array([7.0, 8.0]), mass=9.5)
    G.add_edge("b", "a", w=0.5)
    G.add_edge("a", "c", w=2)
    G.add_edge("c", "c", w=7.0)  # a self-loop is its own reverse: once
    g = layers.Graph.from_networkx(G, node_features=("pos", "mass"), edge_features="w")
    assert list(G.nodes) == ["b", "a", "c"]
    assert g.nodes.dtype == jnp.float32 and g.edges.dtype == jnp.float32
    assert g.senders.dtype == jnp.int32 and g.receivers.dtype == jnp.int32 and g.n_node is None
    np.testing.assert_array_equal(np.asarray(g.nodes), [[1, 2, 3], [4, 5, 6], [7, 8, 9.5]])
    # (u, v) in the order of G.edges, then (v, u) in the same order, features copied
    forward = [(0, 1), (1, 2), (2, 2)]
    assert [("b", "a"), ("a", "c"), ("c", "c")] == list(G.edges)
    assert _edge_list(g) == forward + [(1, 0), (2, 1)]
    np.testing.assert_array_equal(np.asarray(g.edges), [[0.5], [2], [7], [0.5], [2]])
    # float64 on request; a single name and a sequence of one name agree
    g64 = layers.Graph.from_networkx(G, node_features=["mass"], dtype=jnp.float64)
    assert g64.nodes.dtype == jnp.float64 and g64.edges.shape == (5, 0)
    np.testing.assert_array_equal(np.asarray(g64.nodes), [[3], [6], [9.5]])


def test_from_networkx_directed_and_multigraph(nx):
    G = nx.DiGraph()
    G.add_nodes_from([("z", {"x": 1}), (3, {"x": 2}), ("a", {"x": 3})])
    G.add_edges_from(
        [(3, "z", {"w": [1, 2]}), ("z", "a", {"w": [3, 4]}), ("a", "z", {"w": [5, 6]})]
    )
    g = layers.Graph.from_networkx(G, node_features="x", edge_features="w")
    np.testing.assert_array_equal(np.asarray(g.nodes), [[1], [2], [3]])
    assert _edge_list(g) == [(0, 2), (1, 0), (2, 0)]  # as G.edges lists them: by sender
    np.testing.assert_array_equal(np.asarray(g.edges), [[3, 4], [1, 2], [5, 6]])
    np.testing.assert_array_equal(np.asarray(g.in_degree()), [2, 0, 1])
    # a multigraph keeps every parallel edge, undirected ones in both directions
    M = nx.MultiGraph([(0, 1, {"w": 1.0}), (0, 1, {"w": 2.0}), (1, 2, {"w": 3.0})])
    m = layers.Graph.from_networkx(M, edge_features="w")
    assert _edge_list(m) == [(0, 1), (0, 1), (1, 2), (1, 0), (1, 0), (2, 1)]
    np.testing.assert_array_equal(np.asarray(m.edges)[:, 0], [1, 2, 3, 1, 2, 3])
    assert m.nodes.shape == (3, 0)
    md = layers.Graph.from_networkx(nx.MultiDiGraph([(0, 1), (0, 1), (1, 0)]))
    assert _edge_list(md) == [(0, 1), (0, 1), (1, 0)]


def test_from_networkx_empty_and_edgeless(nx):
    empty = layers.Graph.from_networkx(nx.Graph(), node_features="x", edge_features="w")
    assert empty.nodes.shape == (0, 0) and empty.edges.shape == (0, 0) and empty.num_edges == 0
    edgeless = layers.Graph.from_networkx(nx.empty_graph(4))
    assert edgeless.nodes.shape == (4, 0) and edgeless.edges.shape == (0, 0)
    path = layers.Graph.from_networkx(nx.path_graph(3, create_using=nx.DiGraph))
    batch = layers.batch_graphs([path, empty, edgeless])
    np.testing.assert_array_equal(np.asarray(batch.n_node), [3, 0, 4])
    assert _edge_list(batch) == [(0, 1), (1, 2)]


def test_from_networkx_bad_input(nx, monkeypatch):
    G = nx.Graph()
    G.add_node(0, x=[1.0, 2.0], s="text")
    G.add_node(1, x=[3.0])
    G.add_edge(0, 1, w=1.0)
    G.add_edge(1, 2)
    from_nx = layers.Graph.from_networkx
    with pytest.raises(TypeError, match="`graph` must be a networkx graph.*got list"):
        from_nx([(0, 1)])
    with pytest.raises(TypeError, match="`node_features` must be None, an attribute name"):
        from_nx(G, node_features=3)
    with pytest.raises(TypeError, match="`edge_features` must be None"):
        from_nx(G, edge_features={"w"})
    with pytest.raises(ValueError, match="`node_features`: node 2 has no attribute 'x'"):
        from_nx(G, node_features="x")
    with pytest.raises(ValueError, match=r"`edge_features`: edge \(1, 2\) has no attribute 'w'"):
        from_nx(G, edge_features="w")
    H = G.subgraph([0, 1])
    with pytest.raises(ValueError, match="`node_features`: attribute 'x' has 1 values on node 1 "):
        from_nx(H, node_features="x")
    with pytest.raises(ValueError, match="`node_features`: attribute 's' of node 0 must be a real"):
        from_nx(nx.Graph(H.subgraph([0])), node_features="s")
    with pytest.raises(ValueError, match="`dtype` must be a float dtype"):
        from_nx(G, dtype=jnp.int32)
    monkeypatch.setitem(sys.modules, "networkx", None)  # import fails
    with pytest.raises(ImportError, match=r'needs networkx.*pip install "fixpoint-jax\[graphs\]"'):
        from_nx(G)


# ---------------------------------------------------------------------------
# baselines


def _permute(graph, node_perm, edge_perm):
    inv = np.argsort(node_perm)
    return layers.Graph(
        nodes=graph.nodes[node_perm],
        edges=graph.edges[edge_perm],
        senders=jnp.asarray(inv[np.asarray(graph.senders)[edge_perm]], jnp.int32),
        receivers=jnp.asarray(inv[np.asarray(graph.receivers)[edge_perm]], jnp.int32),
    )


@pytest.fixture(scope="module")
def flow_graphs():
    return [ex.graph for ex in datasets.flow_dataset(2, nodes=(12, 20), seed=5)]


@pytest.fixture(scope="module")
def batched(flow_graphs):
    return layers.batch_graphs(flow_graphs)


_forward = eqx.filter_jit(lambda model, graph: model(graph))
_readout = jax.jit(layers.graph_readout, static_argnums=2)


@pytest.fixture(scope="module")
def models():
    k1, k2 = jax.random.split(jax.random.key(0))
    return [
        layers.GCN(5, 2, 3, hidden=16, depth=2, key=k1, edge_weight_column=0, dtype=jnp.float64),
        layers.GIN(5, 2, 3, hidden=16, depth=2, key=k2, dtype=jnp.float64),
    ]


def _cast(model, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)


def test_shapes_dtypes_and_count(models, batched, flow_graphs):
    g = batched
    for dtype in (jnp.float32, jnp.float64):
        for model in models:
            out = _forward(_cast(model, dtype), g)
            assert out.shape == (g.num_nodes, 3) and out.dtype == dtype
            assert np.all(np.isfinite(np.asarray(out)))
            for reduce in ("mean", "sum", "max"):
                pooled = _readout(out, g, reduce)
                assert pooled.shape == (2, 3) and pooled.dtype == dtype
    single = layers.graph_readout(jnp.ones((flow_graphs[0].num_nodes, 3)), flow_graphs[0])
    assert single.shape == (1, 3)
    gcn, gin = models
    assert gcn.readout.weight.dtype == jnp.float64
    assert datasets.count_params(gcn) == (5 * 16 + 16) + (16 * 16 + 16) + (16 * 3 + 3)
    per_layer = (18 * 16 + 16) + 2 * (16 * 16 + 16)  # message, 2-layer MLP
    assert datasets.count_params(gin) == (5 * 16 + 16) + 2 * per_layer + 2 + (16 * 3 + 3)


def test_readout_values(batched, flow_graphs):
    g = batched
    x = jnp.asarray(np.random.default_rng(0).normal(size=(g.num_nodes, 2)))
    n0 = flow_graphs[0].num_nodes
    parts = [np.asarray(x[:n0]), np.asarray(x[n0:])]
    for reduce, fn in (("mean", np.mean), ("sum", np.sum), ("max", np.max)):
        want = np.stack([fn(p, axis=0) for p in parts])
        got = _readout(x, g, reduce)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


def test_permutation_equivariance(models, flow_graphs):
    g = flow_graphs[0]
    rng = np.random.default_rng(1)
    node_perm, edge_perm = rng.permutation(g.num_nodes), rng.permutation(g.num_edges)
    gp = _permute(g, node_perm, edge_perm)
    for model in models:
        out, out_p = _forward(model, g), _forward(model, gp)
        np.testing.assert_allclose(np.asarray(out_p), np.asarray(out)[node_perm], atol=1e-12)


def test_batched_equals_separate(models, batched, flow_graphs):
    g = batched
    padded = layers.pad_graph(g, g.num_nodes + 3, g.num_edges + 5)
    for model in models:
        want = np.concatenate([np.asarray(_forward(model, x)) for x in flow_graphs])
        np.testing.assert_allclose(np.asarray(_forward(model, g)), want, atol=1e-12)
        np.testing.assert_allclose(
            np.asarray(_forward(model, padded))[: g.num_nodes], want, atol=1e-12
        )


def test_gcn_matches_dense_reference(flow_graphs):
    g = flow_graphs[0]
    n = g.num_nodes
    s, r = np.asarray(g.senders), np.asarray(g.receivers)
    h = np.random.default_rng(2).normal(size=(n, 3))
    for w in (None, _np(g.edges[:, 0])):
        a = np.zeros((n, n))
        np.add.at(a, (r, s), 1.0 if w is None else w)
        a_hat = a + np.eye(n)
        d = a_hat.sum(axis=1) ** -0.5
        want = (d[:, None] * a_hat * d[None, :]) @ h
        got = layers.gcn_aggregate(jnp.asarray(h), g, None if w is None else jnp.asarray(w))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


def _avals(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for param in eqn.params.values():
            sub = getattr(param, "jaxpr", param)
            if hasattr(sub, "eqns"):
                yield from _avals(sub)


def test_no_dense_matrix(models, flow_graphs):
    g = flow_graphs[1]
    n = g.num_nodes
    assert n not in (16, 3, 5, 2, g.num_edges)
    for model in models:
        jaxpr = jax.make_jaxpr(lambda m, x: m(x))(model, g).jaxpr
        shapes = list(_avals(jaxpr))
        assert (n, 16) in shapes  # the walk sees the node arrays
        assert all(sh.count(n) < 2 for sh in shapes)
