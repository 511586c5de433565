"""`layers.CGS` and `layers.IGNN`: fixed points on sparse graphs, their gradients,
batching, padding, permutation equivariance and bad input."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import fixpoint
from fixpoint import layers, solvers
from fixpoint.layers._graph_solvers import _perron_iteration

F, G = 3, 2
TIGHT = solvers.Picard(1e-13, 1e-13)


def _f64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


def _graph(seed, n=9, e=30):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, n, e)
    r = (s + rng.integers(1, n, e)) % n  # no self-loops
    return layers.Graph(
        jnp.asarray(rng.normal(size=(n, F))),
        jnp.asarray(rng.uniform(0.1, 1.0, size=(e, G))),
        jnp.asarray(s, jnp.int32),
        jnp.asarray(r, jnp.int32),
    )


def _cgs(**kw):
    return _f64(layers.CGS(F, G, 2, hidden=8, heads=3, solver=TIGHT, key=jax.random.key(0), **kw))


def _ignn(**kw):
    m = layers.IGNN(F, 2, hidden=6, edge_weight_column=0, solver=TIGHT, key=jax.random.key(1), **kw)
    return _f64(m)


@pytest.fixture(scope="module")
def cgs():
    return _cgs()


@pytest.fixture(scope="module")
def ignn():
    return _ignn()


_JIT = eqx.filter_jit(lambda model, graph: model(graph))
_SOLVE = eqx.filter_jit(lambda model, graph: model.solve(graph))


def _dense(graph, weights):
    a = np.zeros((graph.num_nodes, graph.num_nodes))
    np.add.at(a, (np.asarray(graph.receivers), np.asarray(graph.senders)), np.asarray(weights))
    return a


def test_cgs_fixed_point_equals_dense_solve(cgs):
    graph = _graph(0)
    _, (weights, _), b = cgs.encode(graph)
    sol = _SOLVE(cgs, graph)
    assert bool(sol.result == fixpoint.RESULTS.successful)
    for h in range(cgs.heads):
        a = _dense(graph, weights[:, h])
        want = np.linalg.solve(np.eye(graph.num_nodes) - cgs.gamma * a, np.asarray(b[:, h]))
        np.testing.assert_allclose(sol.value[:, h], want, rtol=1e-10, atol=1e-12)


def test_cgs_contraction_for_any_parameters():
    # Wild parameters: every receiver's weights still sum to <= 1, and the solve converges.
    graph = _graph(1, n=30, e=200)
    for seed, norm in enumerate(("degree", "sum", "max", "softmax")):
        key = jax.random.key(seed)
        m = layers.CGS(F, G, 2, hidden=8, heads=4, nonlinear=seed == 1, normalisation=norm, key=key)
        m = jax.tree.map(lambda a: 30.0 * a if eqx.is_inexact_array(a) else a, m)
        _, (weights, _), _ = m.encode(graph)
        if norm in ("degree", "sum"):
            rows = jax.ops.segment_sum(weights, graph.receivers, graph.num_nodes)
            assert float(rows.max()) <= 1.0 + 1e-6
        sol = m.solve(graph)
        assert bool(sol.result == fixpoint.RESULTS.successful)


def test_cgs_permutation_equivariant(cgs):
    graph = _graph(2)
    perm = np.random.default_rng(0).permutation(graph.num_nodes)
    inv = np.argsort(perm)
    permuted = layers.Graph(
        graph.nodes[perm],
        graph.edges,
        jnp.asarray(inv[np.asarray(graph.senders)], jnp.int32),
        jnp.asarray(inv[np.asarray(graph.receivers)], jnp.int32),
    )
    np.testing.assert_allclose(_JIT(cgs, permuted), _JIT(cgs, graph)[perm], atol=1e-10)


def test_batched_and_padded_equal_separate(cgs, ignn):
    graphs = [_graph(3, n=7, e=20), _graph(4, n=9, e=25)]
    batch = layers.batch_graphs(graphs)
    padded = layers.pad_graph(batch, 20, 60)
    for model in (cgs, ignn):
        together = _JIT(model, batch)
        np.testing.assert_allclose(_JIT(model, padded)[:16], together, atol=1e-10)
        np.testing.assert_allclose(together[:7], _JIT(model, graphs[0]), atol=1e-10)
        np.testing.assert_allclose(together[7:], _JIT(model, graphs[1]), atol=1e-10)
    # Concrete graphs are joined on the host; traced ones by JAX ops: the same graph.
    traced = jax.jit(lambda a, b: layers.pad_graph(layers.batch_graphs([a, b]), 20, 60))(*graphs)
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(padded), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def _fd_check(loss, xs, eps=1e-6, picks=3, fixed=()):
    """Gradients of `loss(*xs)` against central differences along random directions
    (none along the arguments numbered in `fixed`); one compile for the loss and
    one for its gradient."""
    loss = jax.jit(loss)
    g = jax.jit(jax.grad(loss, argnums=tuple(range(len(xs)))))(*xs)
    rng = np.random.default_rng(0)
    for _ in range(picks):
        ds = [
            jnp.zeros_like(x) if i in fixed else rng.normal(size=x.shape) for i, x in enumerate(xs)
        ]
        plus = loss(*(x + eps * d for x, d in zip(xs, ds, strict=True)))
        minus = loss(*(x - eps * d for x, d in zip(xs, ds, strict=True)))
        directional = sum(jnp.vdot(gi, d) for gi, d in zip(g, ds, strict=True))
        np.testing.assert_allclose(directional, (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-9)
    return g


@pytest.mark.parametrize("which", ["cgs", "cgs-max", "cgs-softmax", "ignn"])
def test_gradients_finite_differences_and_unrolled(cgs, ignn, which):
    graph = _graph(5)
    make = {
        "cgs": _cgs,
        "cgs-max": lambda **kw: _cgs(normalisation="max", **kw),
        "cgs-softmax": lambda **kw: _cgs(normalisation="softmax", **kw),
        "ignn": _ignn,
    }[which]
    model = {"cgs": cgs, "ignn": ignn}.get(which) or make()
    unrolled = make(adjoint=fixpoint.UnrolledAdjoint())

    def loss(m, nodes, edges):
        out = m(layers.Graph(nodes, edges, graph.senders, graph.receivers))
        return jnp.sum(jnp.sin(out))

    # Node and edge features together (for IGNN the edges enter through the weight
    # column); the max-normalised CGS is checked on its node features only.
    fixed = (1,) if which == "cgs-max" else ()
    xs = (graph.nodes, graph.edges)
    g = _fd_check(ft.partial(loss, model), xs, fixed=fixed)
    g_unrolled = jax.jit(jax.grad(ft.partial(loss, unrolled), argnums=(0, 1)))(*xs)
    for i, (a, b) in enumerate(zip(g, g_unrolled, strict=True)):
        if i not in fixed:
            assert float(jnp.abs(a).max()) > 0
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: loss(m, graph.nodes, graph.edges)))(model)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(float(jnp.abs(leaf).max()) > 0 for leaf in leaves)  # every parameter learns


def _perron(graph):
    ew, sw = layers.normalised_adjacency(graph)
    return np.asarray(layers.perron_root(graph, ew, sw)), ew, sw


# `perron_root`'s relative tolerance in float64: its value is an upper bound on
# `λ_pf + 1` within this of the true value once its bracket has closed.
PERRON_TOL = 1e-2 * np.sqrt(np.finfo(np.float64).eps)
_PERRON = jax.jit(layers.perron_root)
# Per graph, the upper bound on `λ_pf + 1` and the number of steps (private:
# `perron_root` returns the bound minus 1).
_PERRON_ITERATION = jax.jit(lambda g, ew, sw: _perron_iteration(g, ew, sw, 1000)[2:])


def _spectral_radius(graph, ew, sw):
    return np.max(np.abs(np.linalg.eigvals(_dense(graph, ew) + np.diag(np.asarray(sw)))))


def _chain(n, seed=0):
    """A directed chain `0 → 1 → … → n-1` with random features and weights."""
    rng = np.random.default_rng(seed)
    return layers.Graph(
        jnp.asarray(rng.normal(size=(n, F))),
        jnp.asarray(rng.uniform(0.1, 1.0, size=(n - 1, G))),
        jnp.arange(n - 1, dtype=jnp.int32),
        jnp.arange(1, n, dtype=jnp.int32),
    )


def _star(n=31):
    """An undirected star: node 0 joined both ways to nodes 1..n-1."""
    leaves = np.arange(1, n)
    hub = np.zeros(n - 1, np.int64)
    return layers.Graph(
        jnp.asarray(np.random.default_rng(0).normal(size=(n, F))),
        jnp.ones((2 * (n - 1), G)),
        jnp.asarray(np.concatenate([hub, leaves]), jnp.int32),
        jnp.asarray(np.concatenate([leaves, hub]), jnp.int32),
    )


def _edgeless(n):
    return layers.Graph(
        jnp.zeros((n, F)), jnp.zeros((0, G)), jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.int32)
    )


def test_perron_root_per_graph():
    # An undirected graph (λ = 1 for D^-1/2 (A+I) D^-1/2), a directed chain and a
    # bipartite cycle; batched together, each keeps its own value.
    undirected = _graph(6, n=8, e=20)
    s, r = np.asarray(undirected.senders), np.asarray(undirected.receivers)
    undirected = layers.Graph(
        jnp.zeros((8, F)),
        jnp.zeros((40, G)),
        jnp.asarray(np.concatenate([s, r]), jnp.int32),
        jnp.asarray(np.concatenate([r, s]), jnp.int32),
    )
    chain = layers.Graph(
        jnp.zeros((6, F)),
        jnp.zeros((5, G)),
        jnp.arange(5, dtype=jnp.int32),
        jnp.arange(1, 6, dtype=jnp.int32),
    )
    ring = np.arange(6)
    cycle = layers.Graph(
        jnp.zeros((6, F)),
        jnp.zeros((12, G)),
        jnp.asarray(np.concatenate([ring, (ring + 1) % 6]), jnp.int32),
        jnp.asarray(np.concatenate([(ring + 1) % 6, ring]), jnp.int32),
    )
    singles = []
    for g in (undirected, chain, cycle):
        lam, ew, sw = _perron(g)
        true = _spectral_radius(g, ew, sw)
        assert true - 1e-12 <= lam[0] <= true + PERRON_TOL * (true + 1), (lam, true)
        singles.append(lam[0])
    lam, _, _ = _perron(layers.batch_graphs([undirected, chain, cycle]))
    np.testing.assert_allclose(lam, singles, rtol=1e-9)


def test_perron_root_empty_and_edgeless_graphs_do_not_couple_a_batch():
    # Issue 31: an empty graph made the batch's stop test NaN, stopping every graph's
    # power iteration at step 0 (the star got 3.842). Each graph on its own: empty
    # graphs get 0, graphs without edges their largest self weight.
    star = _star()
    alone, ew, sw = _perron(star)
    np.testing.assert_allclose(alone, [1.0], rtol=0, atol=2 * PERRON_TOL)  # λ + 1 to tol
    batch = layers.batch_graphs([star, _edgeless(0), _edgeless(4), _edgeless(3)])
    sw = jnp.concatenate([sw, jnp.asarray([0.2, 0.7, 0.1, 0.4]), jnp.zeros(3)])
    lam = layers.perron_root(batch, ew, sw)
    np.testing.assert_allclose(lam, [alone[0], 0.0, 0.7, 0.0], rtol=1e-12)


def test_ignn_batch_with_empty_graph_equals_alone(ignn):
    star = _star()
    together = _JIT(ignn, layers.batch_graphs([star, _edgeless(0)]))
    np.testing.assert_allclose(together, _JIT(ignn, star), atol=1e-10)


def test_perron_root_reducible_chain_tight_and_stops_early():
    # A directed chain is reducible: IGNN's normalisation gives a left Perron vector
    # (1, 0, …, 0), and self weights with one clear maximum a right one that
    # vanishes before it. Each graph stops when its own bound is tight, well
    # before `max_iterations` (the stop test used to run all 1000 steps here).
    chain = _chain(40)
    ew, sw = layers.normalised_adjacency(chain)
    sw_peak = np.random.default_rng(1).uniform(0.0, 0.5, 40)
    sw_peak[17] = 1.0
    cases = [(ew, sw), (ew, jnp.asarray(sw_peak))]
    lams = []
    for ew_, sw_ in cases:
        lam = float(_PERRON(chain, ew_, sw_)[0])
        true = _spectral_radius(chain, ew_, sw_)
        assert true - 1e-12 <= lam <= true + PERRON_TOL * (true + 1), (lam, true)
        lams.append(lam)
    batch = layers.batch_graphs([chain, chain])
    both = [jnp.concatenate([a, b]) for a, b in zip(*cases, strict=True)]
    bound, steps = _PERRON_ITERATION(batch, *both)
    np.testing.assert_allclose(bound - 1.0, lams, rtol=1e-12)  # as alone
    assert np.all(np.asarray(steps) < 1000), steps


def test_perron_root_gradient_is_eigenvalue_derivative():
    # dλ/dM_ij = u_i v_j / uᵀv with the dense left and right Perron vectors.
    graph = _graph(6, n=8, e=20)
    rng = np.random.default_rng(2)
    ew = jnp.asarray(rng.uniform(0.1, 1.0, graph.num_edges))
    sw = jnp.asarray(rng.uniform(0.0, 1.0, graph.num_nodes))
    g_ew, g_sw = jax.grad(lambda a, b: layers.perron_root(graph, a, b)[0], argnums=(0, 1))(ew, sw)
    dense = _dense(graph, ew) + np.diag(np.asarray(sw))
    vals, right = np.linalg.eig(dense)
    vals_t, left = np.linalg.eig(dense.T)
    v = np.real(right[:, np.argmax(vals.real)])
    u = np.real(left[:, np.argmax(vals_t.real)])
    s, r = np.asarray(graph.senders), np.asarray(graph.receivers)
    np.testing.assert_allclose(g_ew, u[r] * v[s] / (u @ v), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g_sw, u * v / (u @ v), rtol=1e-6, atol=1e-9)


def test_ignn_normalised_adjacency_has_perron_root_one():
    # `Â = D^-1/2 (A + I) D^-1/2` with `D` the row sums of `A + I` (received weights
    # plus one) is similar to the row-stochastic `D^-1 (A + I)`: its Perron root is
    # exactly 1 for any direction and non-negative weights, which IGNN relies on.
    # Parallel edges, self-loop edges, zero weights and a node without edges.
    rng = np.random.default_rng(3)
    n, e = 12, 40
    s, r = rng.integers(0, n - 1, e), rng.integers(0, n - 1, e)
    w = rng.uniform(0.0, 3.0, (e, G)) * (rng.uniform(size=(e, 1)) > 0.2)
    graph = layers.Graph(
        jnp.zeros((n, F)), jnp.asarray(w), jnp.asarray(s, jnp.int32), jnp.asarray(r, jnp.int32)
    )
    for column in (None, 0, 1):
        ew, sw = layers.normalised_adjacency(graph, column)
        np.testing.assert_allclose(_spectral_radius(graph, ew, sw), 1.0, rtol=1e-12)


def test_ignn_uses_the_exact_perron_root(ignn):
    # On a directed chain a node sees only the nodes before it, so the first 30
    # nodes of a 2000-node chain get the outputs of the 30-node chain. Power
    # iteration over-estimated the long chain's root (1.0017 after its 1000 steps,
    # against 1) and shrank its `W` more.
    long = _chain(2000)
    short = layers.Graph(long.nodes[:30], long.edges[:29], long.senders[:29], long.receivers[:29])
    model = eqx.tree_at(lambda m: m.w, ignn, 50.0 * ignn.w)  # every row on the ball
    out = _JIT(model, layers.batch_graphs([long, short]))
    np.testing.assert_allclose(out[:30], out[2000:], atol=1e-10)


def test_ignn_edge_weights_checked(ignn):
    graph = _graph(9)
    names = r"`edge_weight_column=0`.*`graph.edges\[:, 0\]`"
    for bad in (-0.5, np.nan, np.inf):
        g = layers.Graph(graph.nodes, graph.edges.at[4, 0].set(bad), graph.senders, graph.receivers)
        with pytest.raises(ValueError, match=names + ".*edge 4"):
            ignn(g)
        with pytest.raises(RuntimeError, match=names + ".*finite and non-negative"):
            _JIT(ignn, g)
        with pytest.raises(ValueError, match=r"`weight_column=0`.*edge 4"):
            layers.normalised_adjacency(g, 0)


def test_batch_graphs_feature_widths_differ():
    a, b = _graph(0), _graph(1)
    wide = layers.Graph(jnp.zeros((9, F + 1)), b.edges, b.senders, b.receivers)
    with pytest.raises(ValueError, match=r"`graphs\[1\].nodes` has 4 .*`graphs\[0\].nodes` has 3"):
        layers.batch_graphs([a, wide])
    narrow = layers.Graph(b.nodes, b.edges[:, :1], b.senders, b.receivers)
    with pytest.raises(ValueError, match=r"`graphs\[2\].edges` has 1 .*`graphs\[0\].edges` has 2"):
        layers.batch_graphs([a, b, narrow])


def test_ignn_well_posed_for_any_parameters():
    graph = _graph(7, n=25, e=120)
    for seed in range(3):
        m = layers.IGNN(F, 2, hidden=6, edge_weight_column=1, key=jax.random.key(seed))
        m = eqx.tree_at(lambda t: t.w, m, 50.0 * m.w)  # far outside the ball: projected
        sol = m.solve(graph)
        assert bool(sol.result == fixpoint.RESULTS.successful)


def test_bad_input(cgs):
    graph = _graph(8)
    with pytest.raises(ValueError, match="`senders` has 3 entries but `receivers` has 2"):
        layers.Graph(
            graph.nodes, jnp.zeros((3, G)), jnp.zeros(3, jnp.int32), jnp.zeros(2, jnp.int32)
        )
    with pytest.raises(ValueError, match=r"`receivers\[1\] = 9` is out of range for 9 nodes"):
        layers.Graph(
            graph.nodes, jnp.zeros((2, G)), jnp.zeros(2, jnp.int32), jnp.array([0, 9], jnp.int32)
        )
    with pytest.raises(ValueError, match="`edges` has 4 rows but there are 2 edges"):
        layers.Graph(
            graph.nodes, jnp.zeros((4, G)), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32)
        )
    with pytest.raises(ValueError, match="`n_node` must be int"):
        layers.Graph(graph.nodes, graph.edges, graph.senders, graph.receivers, n_node=jnp.ones(1))
    with pytest.raises(ValueError, match="`graph.nodes` has 4 features per row.*`node_size=3`"):
        cgs(layers.Graph(jnp.zeros((9, 4)), graph.edges, graph.senders, graph.receivers))
    with pytest.raises(ValueError, match="`graph.edges` has 1 features per row.*`edge_size=2`"):
        cgs(layers.Graph(graph.nodes, graph.edges[:, :1], graph.senders, graph.receivers))
    with pytest.raises(ValueError, match="forms the dense Jacobian"):
        layers.CGS(F, G, 2, solver=solvers.Newton(1e-6, 1e-6), key=jax.random.key(0))
    with pytest.raises(ValueError, match="dense .*backward solve"):
        layers.IGNN(
            F, 2, adjoint=fixpoint.ImplicitAdjoint(linear_solver=lx.LU()), key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match="`gamma` must lie in"):
        layers.CGS(F, G, 2, gamma=1.0, key=jax.random.key(0))
    # Newton-Krylov is matrix-free: allowed.
    layers.CGS(
        F,
        G,
        2,
        solver=solvers.Newton(1e-6, 1e-6, linear_solver=lx.GMRES(1e-6, 1e-6)),
        key=jax.random.key(0),
    )


def test_softmax_plus_is_within_tau_log_degree_of_max_plus():
    # Same parameters (same key); the smooth map's fixed point lies above the max-plus
    # one by at most τ·log(max in-degree) / (1 - γ), so it approaches it as τ → 0.
    graph = _graph(1, n=30, e=200)

    def make(**kw):
        m = layers.CGS(F, G, 2, hidden=8, heads=4, solver=TIGHT, key=jax.random.key(3), **kw)
        return _f64(m)

    hard = make(normalisation="max")
    z_hard = np.asarray(hard.solve(graph).value)
    degree = float(np.asarray(graph.in_degree()).max())
    for tau in (0.1, 1e-3):
        soft = make(normalisation="softmax", temperature=tau)
        gap = np.asarray(soft.solve(graph).value) - z_hard
        bound = tau * np.log(degree) / (1 - hard.gamma)
        assert gap.min() >= -1e-9 and gap.max() <= bound + 1e-9, (tau, gap.min(), gap.max())
    with pytest.raises(ValueError, match="`temperature` must be a number > 0"):
        layers.CGS(F, G, 2, normalisation="softmax", temperature=0.0, key=jax.random.key(0))
