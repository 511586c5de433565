"""Equilibrium models on sparse graphs: convergent graph solvers and implicit GNNs.

Both solve a fixed point over all nodes at once with `fixpoint.fixed_point` and
differentiate it implicitly (the existing adjoints), in memory and time linear
in the number of edges: the graph enters only through `jax.ops.segment_sum` over
its edges, never as a dense N×N matrix. Several graphs concatenated into one
`Graph` (`fixpoint.layers.batch_graphs`) are one solve over a block-diagonal operator: no
edge crosses between graphs, so each graph's answer is the one it gets alone
(to the solver's tolerance, which is checked over the whole batch).
"""

import functools as ft
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.core import Tracer
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray

import fixpoint
from fixpoint import internal, solvers

from ._graph import Graph
from ._settings import AbstractConfigurable

_MATRIX_FREE = tuple(
    c for c in (getattr(lx, n, None) for n in ("GMRES", "BiCGStab", "CG")) if isinstance(c, type)
)


def _check_sparse(name, solver, adjoint):
    """Refuse solvers and adjoints that would build a dense (N·k)×(N·k) matrix."""
    if not isinstance(solver, internal.AbstractSolver):
        raise TypeError(f"{name}: `solver` must be a `internal.AbstractSolver`, got {solver!r}.")
    if not isinstance(adjoint, fixpoint.AbstractAdjoint):
        raise TypeError(f"{name}: `adjoint` must be a `fixpoint.AbstractAdjoint`, got {adjoint!r}.")
    if isinstance(solver, solvers.Newton) and not isinstance(solver.linear_solver, _MATRIX_FREE):
        raise ValueError(
            f"{name}: `solver=Newton(linear_solver={type(solver.linear_solver).__name__}())` "
            "forms the dense Jacobian over all nodes (an (N·k)×(N·k) matrix: 6.4 GB at "
            "N = 1e4 with 16 heads in float32). Use a matrix-free solver: Picard, Anderson, "
            "Broyden, or Newton(linear_solver=lineax.GMRES(...))."
        )
    linear = getattr(adjoint, "linear_solver", None)
    if linear is not None and not isinstance(linear, _MATRIX_FREE):
        raise ValueError(
            f"{name}: `adjoint` with `linear_solver={type(linear).__name__}()` forms the dense "
            "Jacobian over all nodes for the backward solve (quadratic memory in N). Use "
            "`ImplicitAdjoint()` (matrix-free GMRES, the default) or a lineax iterative solver."
        )


def _default_steps(rate):
    # Picard on a `rate`-contraction reaches 1e-8 relative in log(1e-8)/log(rate) steps.
    return int(math.ceil(math.log(1e-8) / math.log(rate))) + 16


def _features(graph, node_size, edge_size, name, dtype):
    if not isinstance(graph, Graph):
        raise TypeError(f"{name}: expected a `fixpoint.layers.Graph`, got {type(graph).__name__}.")
    for field, size, what in (("nodes", node_size, "node_size"), ("edges", edge_size, "edge_size")):
        have = getattr(graph, field).shape[1]
        if size is not None and have != size:
            raise ValueError(
                f"{name}: `graph.{field}` has {have} features per row, but the layer was built "
                f"with `{what}={size}`."
            )
    return graph.nodes.astype(dtype), graph.edges.astype(dtype)


def _aggregate(values, graph, weights):
    """`out[i] = Σ_{e: receivers[e] = i} weights[e] · values[senders[e]]`."""
    msg = values[graph.senders] * weights
    return jax.ops.segment_sum(msg, graph.receivers, graph.num_nodes)


class _LinearMap(eqx.Module):
    """`z ↦ φ(γ A z + b)` for CGS, or with `offsets` the max-plus map
    `z_i ↦ φ(b_i + max_{e→i} (γ w_e z_{s_e} + c_e))`, with `temperature > 0` its
    smooth version (the max replaced by `τ·logsumexp(·/τ)`) (an Equinox module,
    so compiled loops are reused)."""

    gamma: float = eqx.field(static=True)
    nonlinear: bool = eqx.field(static=True)
    temperature: float = eqx.field(static=True, default=0.0)

    def __call__(self, z, args):
        weights, offsets, b, graph = args
        if offsets is None:
            out = self.gamma * _aggregate(z, graph, weights) + b
        else:
            cand = self.gamma * weights * z[graph.senders] + offsets
            best = jax.ops.segment_max(cand, graph.receivers, graph.num_nodes)
            has_in = (graph.in_degree() > 0)[:, None]
            best = jnp.where(has_in, best, 0.0)
            if self.temperature > 0:
                # τ·log Σ exp(cand/τ), shifted by the (constant) max for stability.
                tau = self.temperature
                shift = jax.lax.stop_gradient(best)
                mass = jax.ops.segment_sum(
                    jnp.exp((cand - shift[graph.receivers]) / tau),
                    graph.receivers,
                    graph.num_nodes,
                )
                best = jnp.where(has_in, shift + tau * jnp.log(jnp.where(has_in, mass, 1.0)), 0.0)
            out = b + best
        return jnp.tanh(out) if self.nonlinear else out


class _GraphEquilibrium(AbstractConfigurable):
    """What CGS and IGNN share: a matrix-free solver configuration and the solve."""

    solver: internal.AbstractSolver = eqx.field(static=True)
    adjoint: fixpoint.AbstractAdjoint = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    settings: ClassVar[tuple[str, ...]] = ("solver", "adjoint", "max_steps", "throw")

    def _rate(self) -> float:
        """The contraction factor that sets the default `max_steps`."""
        raise NotImplementedError  # pragma: no cover

    def _configure(self, *, solver, adjoint, max_steps, throw):
        name = type(self).__name__
        solver = solvers.Picard(1e-5, 1e-5) if solver is None else solver
        adjoint = fixpoint.ImplicitAdjoint() if adjoint is None else adjoint
        _check_sparse(name, solver, adjoint)
        self._store("solver", solver)
        self._store("adjoint", adjoint)
        self._store(
            "max_steps",
            _default_steps(self._rate())
            if max_steps is None
            else internal.check_int(max_steps, "max_steps", 1, owner=name),
        )
        self._store("throw", internal.check_bool(throw, "throw", owner=name))

    def _fixed_point(self, fn, y0, args, record_residuals=False):
        return fixpoint.fixed_point(
            fn,
            y0,
            args,
            solver=self.solver,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            throw=self.throw,
            record_residuals=record_residuals,
        )


class CGS(_GraphEquilibrium):
    """A convergent graph solver on sparse graphs.

    Park, Choo & Park, *Convergent Graph Solvers*, ICLR 2022.

    An attention message-passing encoder turns the graph into, per head `h`,
    edge weights `w_e ∈ [0, 1]` and a node vector `b`. Edge `e` carries node
    `s_e`'s state to node `r_e` (sender to receiver): `(A z)_i = Σ_{e: r_e = i}
    A_e z_{s_e}`, so each node aggregates over its *predecessors*. With the
    default normalisation each weight is divided by the in-degree of its
    receiver, so every row of `A` sums to at most 1 and `γ·A` is a contraction
    in the ∞-norm for *any* parameters (a unique fixed point, found by Picard
    iteration from any start). The layer solves

        `z = γ A z + b`     (or `z = tanh(γ A z + b)` with `nonlinear=True`)

    for all heads at once and decodes `[z, encoder features]` per node.

    **Edge direction and the paper.** Park et al.'s code divides each weight by
    the *sender's* out-degree and stores it at `A[src, dst]`, so each node
    aggregates over its *successors*. Our `"degree"` (divide by the receiver's
    in-degree, aggregate over predecessors) is their construction on the graph
    with its edges reversed; on a graph that holds every edge in both directions
    (an undirected graph) the two coincide. To reproduce the paper on a directed
    graph, reverse its edges (swap `senders` and `receivers`).

    **Arguments:**

    - `node_size`: the number of input features per node (`graph.nodes`' width).
    - `edge_size`: the number of features per edge (`graph.edges`' width; may
      be 0).
    - `out_size`: the number of output features per node.

    Keyword-only:

    - `hidden`: width of the encoder and decoder MLPs (default 64).
    - `heads`: the number of fixed-point systems (the state is `float[N, heads]`;
      default 16).
    - `gamma`: the contraction factor in `(0, 1)` (default 0.5).
    - `nonlinear`: iterate `tanh(γ A z + b)` instead (tanh is 1-Lipschitz, so the
      map is still a γ-contraction). Default `False`.
    - `normalisation` (default `"degree"`): `"degree"` divides each weight by
      the in-degree (the number of incoming edges, at least 1) of its receiver:
      the paper's normalisation applied to the graph with its edges reversed
      (see above). `"sum"` divides a receiver's weights by their total where it
      exceeds 1, so one edge can carry weight up to 1 (a max over incoming edges,
      as in value iteration, becomes representable); not in the paper. Rows sum
      to at most 1 either way. `"max"` replaces the sum by a max-plus map,
      `z_i = b_i + max_{e→i} (γ w_e z_{s_e} + c_e)` with learned edge offsets `c_e`
      (0 for nodes without incoming edges): a max of γ-Lipschitz maps, so again a
      γ-contraction in the ∞-norm for any parameters, and value iteration itself
      when `w = 1`, `c = r`, `b = 0`. Not in the CGS paper. `"softmax"` is its
      smooth version, `z_i = b_i + τ log Σ_{e→i} exp((γ w_e z_{s_e} + c_e)/τ)`
      (`τ = temperature`): logsumexp is monotone and shifts with its arguments,
      so this is a γ-contraction as well; it lies within `τ log(in-degree)` of
      the max, and unlike the max it passes gradient to every incoming edge.
    - `temperature`: `τ > 0` of `"softmax"` (default 0.1; unused otherwise).
    - `solver`: default `Picard(1e-5, 1e-5)`; any matrix-free solver. Newton with a
      dense linear solver is refused (it would form an N×N-sized Jacobian).
    - `adjoint`: default `ImplicitAdjoint()` (matrix-free GMRES); dense backward
      solves are refused likewise.
    - `max_steps`: default enough for Picard to reach 1e-8 at rate `gamma`.
    - `throw`: raise on a failed solve (`True`) or report it (`cgs.solve(graph).result`).
    - `key`: the PRNG key for the initial parameters.

    `cgs(graph) -> float[N, out_size]`; `cgs.solve(graph)` returns the
    `fixpoint.Solution` of the fixed point (`value: float[N, heads]`); graph
    outputs: `fixpoint.layers.graph_readout(cgs(graph), graph)`.
    """

    node_encoder: eqx.nn.MLP
    message: eqx.nn.Linear
    gate: eqx.nn.Linear
    weight_head: eqx.nn.MLP
    offset_head: eqx.nn.MLP | None
    bias_head: eqx.nn.Linear
    decoder: eqx.nn.MLP
    node_size: int = eqx.field(static=True)
    edge_size: int = eqx.field(static=True)
    heads: int = eqx.field(static=True)
    gamma: float = eqx.field(static=True)
    nonlinear: bool = eqx.field(static=True)
    normalisation: str = eqx.field(static=True)
    temperature: float = eqx.field(static=True)

    def __init__(
        self,
        node_size: int,
        edge_size: int,
        out_size: int,
        *,
        hidden: int = 64,
        heads: int = 16,
        gamma: float = 0.5,
        nonlinear: bool = False,
        normalisation: str = "degree",
        temperature: float = 0.1,
        solver: internal.AbstractSolver | None = None,
        adjoint: fixpoint.AbstractAdjoint | None = None,
        max_steps: int | None = None,
        throw: bool = True,
        key: PRNGKeyArray,
    ):
        node_size, edge_size, out_size, hidden, heads = (
            internal.check_int(v, name, low, owner="CGS")
            for v, name, low in (
                (node_size, "node_size", 1),
                (edge_size, "edge_size", 0),
                (out_size, "out_size", 1),
                (hidden, "hidden", 1),
                (heads, "heads", 1),
            )
        )
        gamma = internal.check_number(gamma, "gamma", "(0, 1)", owner="CGS")
        if normalisation not in ("degree", "sum", "max", "softmax"):
            raise ValueError(
                "CGS: `normalisation` must be 'degree', 'sum', 'max' or 'softmax', got "
                f"{normalisation!r}."
            )
        temperature = internal.check_number(temperature, "temperature", "> 0", owner="CGS")
        self.normalisation = normalisation
        self.temperature = float(temperature)
        k = jax.random.split(key, 7)
        edge_in = 2 * hidden + edge_size
        mlp = lambda i, o, depth, k: eqx.nn.MLP(i, o, hidden, depth, activation=jax.nn.gelu, key=k)
        self.node_encoder = mlp(node_size, hidden, 2, k[0])
        self.message = eqx.nn.Linear(edge_in, hidden, key=k[1])
        self.gate = eqx.nn.Linear(edge_in, 1, key=k[2])
        self.weight_head = mlp(edge_in, heads, 1, k[3])
        plus = normalisation in ("max", "softmax")
        self.offset_head = mlp(edge_in, heads, 1, k[6]) if plus else None
        self.bias_head = eqx.nn.Linear(hidden, heads, key=k[4])
        self.decoder = mlp(hidden + heads, out_size, 2, k[5])
        self.node_size, self.edge_size, self.heads = node_size, edge_size, heads
        self.gamma, self.nonlinear = float(gamma), bool(nonlinear)
        self._configure(solver=solver, adjoint=adjoint, max_steps=max_steps, throw=throw)

    def _rate(self) -> float:
        return self.gamma

    def _dtype(self):
        return self.bias_head.weight.dtype

    def encode(
        self, graph: Graph
    ) -> tuple[
        Float[Array, "N hidden"],
        tuple[Float[Array, "E heads"], Float[Array, "E heads"] | None],
        Float[Array, "N heads"],
    ]:
        """The encoder: node features, the edge terms of the map, and `b`.

        **Arguments:**

        - `graph`: a `fixpoint.layers.Graph` with `node_size` node features and
          `edge_size` edge features.

        **Returns:**

        `(h, (weights, offsets), b)`: node features `h[N, hidden]`; edge weights
        `[E, heads]`, normalised for `"degree"` and `"sum"` (each receiver's
        incoming weights sum to at most 1) and in `[0, 1]` as they are for
        `"max"` and `"softmax"`; the edge offsets `c[E, heads]` of `"max"` and
        `"softmax"` (`None` otherwise); and `b[N, heads]`.
        """
        nodes, edges = _features(graph, self.node_size, self.edge_size, "CGS", self._dtype())
        h = jax.vmap(self.node_encoder)(nodes)
        pair = lambda h: jnp.concatenate([h[graph.senders], h[graph.receivers], edges], axis=-1)
        # One round of gated attention messages gives each node its neighbourhood.
        e = pair(h)
        gates = jax.nn.sigmoid(jax.vmap(self.gate)(e))
        degree = jnp.maximum(graph.in_degree(), 1.0).astype(h.dtype)
        msgs = jax.ops.segment_sum(
            gates * jax.vmap(self.message)(e), graph.receivers, graph.num_nodes
        )
        h = h + jax.nn.gelu(msgs / degree[:, None])
        e = pair(h)
        weights = jax.nn.sigmoid(jax.vmap(self.weight_head)(e))  # in [0, 1]
        offsets = None
        if self.normalisation == "degree":
            weights = weights / degree[graph.receivers][:, None]
        elif self.normalisation == "sum":  # divide by the incoming total where it exceeds 1
            total = jax.ops.segment_sum(weights, graph.receivers, graph.num_nodes)
            weights = weights / jnp.maximum(total, 1.0)[graph.receivers]
        elif self.offset_head is not None:  # "max"/"softmax" (CGS+): a max of γ-contractions
            offsets = jax.vmap(self.offset_head)(e)
        b = jax.vmap(self.bias_head)(h)
        return h, (weights, offsets), b

    def solve(
        self, graph: Graph, *, z0: Array | None = None, record_residuals: bool = False
    ) -> fixpoint.Solution:
        """The fixed point `z[N, heads]` as a `fixpoint.Solution`.

        **Arguments:**

        - `graph`: a `fixpoint.layers.Graph`.
        - `z0`: the starting point, `float[N, heads]` (default zeros).
        - `record_residuals`: also record `stats["residual_history"]`, the
          residual norm per iteration (default `False`).

        **Returns:**

        A `fixpoint.Solution` with `value: float[N, heads]`.
        """
        _, edge_terms, b = self.encode(graph)
        return self._solve(edge_terms, b, graph, z0, record_residuals)

    def _solve(self, edge_terms, b, graph, z0, record_residuals=False):
        z0 = jnp.zeros_like(b) if z0 is None else z0
        tau = self.temperature if self.normalisation == "softmax" else 0.0
        fn = _LinearMap(self.gamma, self.nonlinear, tau)
        return self._fixed_point(fn, z0, (*edge_terms, b, graph), record_residuals)

    def __call__(self, graph: Graph) -> Array:
        """Encode, solve from zero and decode.

        **Arguments:**

        - `graph`: a `fixpoint.layers.Graph`.

        **Returns:**

        The node outputs, `float[N, out_size]`.
        """
        h, edge_terms, b = self.encode(graph)
        z = self._solve(edge_terms, b, graph, None).value
        return jax.vmap(self.decoder)(jnp.concatenate([z, h], axis=-1))


def _edge_weights(graph: Graph, column, dtype, owner: str, arg: str):
    """`graph.edges[:, column]` as edge weights in `dtype` (ones for `column=None`),
    checked to be finite and non-negative: at once when the values are concrete
    (the message names the first bad edge), else at run time (`eqx.error_if`). The
    messages name the caller `owner` and its argument `arg`."""
    if column is None:
        return jnp.ones(graph.num_edges, dtype)
    width = graph.edges.shape[1]
    if not 0 <= column < width:
        raise ValueError(
            f"{owner}: `{arg}={column}` is out of range for `graph.edges` with {width} columns."
        )
    w = graph.edges[:, column].astype(dtype)
    what = (
        f"{owner}: `{arg}={column}` makes `graph.edges[:, {column}]` the edge weights, which "
        "must be finite and non-negative"
    )
    if isinstance(w, Tracer):
        bad = jnp.any(~(jnp.isfinite(w) & (w >= 0)))
        return eqx.error_if(w, bad, f"{what}; an edge's weight is negative or not finite.")
    host = np.asarray(w)
    bad = np.flatnonzero(~(np.isfinite(host) & (host >= 0)))
    if bad.size:
        raise ValueError(f"{what}; edge {bad[0]} has weight {host[bad[0]]}.")
    return w


def _normalise(graph: Graph, w):
    d = 1.0 + graph.in_degree(w)  # the row sums of A + I
    inv = jax.lax.rsqrt(d)
    return w * inv[graph.senders] * inv[graph.receivers], 1.0 / d


def normalised_adjacency(
    graph: Graph, weight_column: int | None = None, dtype: DTypeLike | None = None
) -> tuple[Float[Array, " E"], Float[Array, " N"]]:
    """IGNN's `D^-1/2 (A + I) D^-1/2` as edge weights plus self-loop weights.

    `A_e = w_e` (the edge feature `graph.edges[:, weight_column]`, or 1), degrees
    `d_i = 1 + Σ_{e → i} w_e` (received: the row sums of `A + I`),
    `Â_e = w_e / sqrt(d_s d_r)` and the self-loop `1 / d_i`. The weights must be
    finite and non-negative (checked; under `jit` at run time). Then `Â` is
    similar to the row-stochastic `D^-1 (A + I)`, so its Perron root is exactly 1
    for every graph with at least one node.

    **Arguments:**

    - `graph`: a `fixpoint.layers.Graph`.
    - `weight_column`: the column of `graph.edges` holding the weights; `None`: 1.
    - `dtype`: of the result; default `graph.nodes.dtype`.

    **Returns:**

    `(edge_weights[E], self_weights[N])`.
    """
    dtype = graph.nodes.dtype if dtype is None else dtype
    w = _edge_weights(graph, weight_column, dtype, "normalised_adjacency", "weight_column")
    return _normalise(graph, w)


def _right(graph, ew, sw, v):
    """`(Â + I) v`."""
    return v + sw * v + _aggregate(v, graph, ew)


def _left(graph, ew, sw, u):
    """`(Â + I)ᵀ u`."""
    back = jax.ops.segment_sum(ew * u[graph.receivers], graph.senders, graph.num_nodes)
    return u + sw * u + back


def _perron_iteration(graph: Graph, ew, sw, max_iterations: int):
    """`perron_root`'s power iteration (no gradient): per node the right and left
    iterates `v`, `u` (positive), per graph the upper bound `min(max_i (Mv)_i / v_i,
    max_i (Mᵀu)_i / u_i)` on the Perron root of `M = Â + I` (`-inf` for a graph
    without nodes) and the number of steps it took."""
    ids, g = graph.node_graph(), graph.num_graphs
    dtype = jnp.result_type(ew, sw)
    tol = 1e-2 * float(np.sqrt(np.finfo(dtype).eps))
    tiny = float(np.finfo(dtype).tiny)
    right = ft.partial(_right, graph, ew, sw)
    left = ft.partial(_left, graph, ew, sw)
    segment_min = lambda x: -jax.ops.segment_max(-x, ids, g)  # noqa: E731

    def bracket(x, apply):
        """`M x` and, per graph, `lo ≤ ρ(M) ≤ hi` from `x > 0` (each graph's max 1).
        Besides the Collatz–Wielandt bounds, `x` cut to its entries `>= tol` is
        non-negative and non-zero, so `(M x_cut)_i ≥ μ x_i` on them gives `ρ(M) ≥ μ`
        too: on reducible graphs `x` tends to 0 on part of the graph, and it is this
        bound that closes."""
        mx = apply(x)
        ratio = mx / x
        keep = x >= tol
        cut = jnp.where(keep, apply(jnp.where(keep, x, 0.0)) / x, jnp.inf)
        lo = jnp.maximum(segment_min(ratio), segment_min(cut))
        return mx, jax.ops.segment_max(ratio, ids, g), lo

    def normalise(x):
        # Kept positive (against underflow), so that `max (Mx)_i / x_i` stays a bound.
        return jnp.maximum(x / jax.ops.segment_max(x, ids, g)[ids], tiny)

    def cond(c):
        _, _, i, _, done = c
        return (i < max_iterations) & ~jnp.all(done)

    def body(c):
        v, u, i, steps, done = c
        mv, hi_v, lo_v = bracket(v, right)
        mu, hi_u, lo_u = bracket(u, left)
        tight = (hi_v - lo_v <= tol * hi_v) & (hi_u - lo_u <= tol * hi_u)
        undefined = jnp.isnan(hi_v - lo_v) | jnp.isnan(hi_u - lo_u)  # NaN or Inf weights
        done = done | tight | undefined  # a stopped graph is frozen: graphs never couple
        go = ~done[ids]
        v = jnp.where(go, normalise(mv), v)
        u = jnp.where(go, normalise(mu), u)
        return v, u, i + 1, steps + (~done).astype(jnp.int32), done

    size = jax.ops.segment_sum(jnp.ones_like(ids), ids, g)
    ones = jnp.ones(graph.num_nodes, dtype)
    zero = jnp.zeros(g, jnp.int32)
    init = (ones, ones, jnp.array(0, jnp.int32), zero, size == 0)
    v, u, _, steps, _ = internal.compacted_while_loop(cond, body, init, None)
    bound = jnp.minimum(
        jax.ops.segment_max(right(v) / v, ids, g), jax.ops.segment_max(left(u) / u, ids, g)
    )
    return v, u, bound, steps


def perron_root(
    graph: Graph,
    edge_weights: Float[Array, " E"],
    self_weights: Float[Array, " N"],
    max_iterations: int = 1000,
) -> Float[Array, " graphs"]:
    """Per graph, the Perron–Frobenius eigenvalue `λ_pf` (the spectral radius) of
    the non-negative operator `Â` with off-diagonal `Â[r_e, s_e] += edge_weights[e]`
    and diagonal `self_weights`.

    Power iteration on the shifted operator `M = Â + I`, whose Perron root is
    `λ_pf + 1` and strictly dominant also when `Â` has `±λ` (bipartite graphs) or
    is nilpotent. Per graph, the right and left iterates `v`, `u > 0` give the
    Collatz–Wielandt bracket `min_i (Mv)_i / v_i ≤ λ_pf + 1 ≤ max_i (Mv)_i / v_i`
    (and the same for `Mᵀ` and `u`), and a second lower bound from each iterate's
    entries `>= tol` alone (the vector cut to them is still non-negative; on
    reducible graphs, whose Perron vectors vanish on part of the graph, it is the
    one that closes). Each graph stops on its own, frozen, once both its brackets
    are within `tol = 1e-2·sqrt(eps)` relative, or all after `max_iterations`: a
    batch never couples its graphs.

    The value is the smaller upper bound minus 1: never below `λ_pf` (up to
    rounding), and within `tol·(λ_pf + 1)` of it once the brackets closed. That
    takes about `log(tol) / log(|λ_2 + 1| / (λ_pf + 1))` steps (`λ_2` the next
    eigenvalue), more on reducible graphs (it grows with the diameter; a 40-node
    directed chain under `normalised_adjacency`: 321 steps), and a graph with
    equal roots chained one after another (a nilpotent chain: `(I + N)^k` grows
    only polynomially) may not close within `max_iterations`: its value is then
    a looser upper bound. A graph without nodes gets 0; one without edges its
    largest self weight (0 if none).

    Its gradient is taken: the eigenvalue derivative `dλ = uᵀ dÂ v / uᵀ v` at the
    computed right and left Perron vectors (exact once the brackets closed).

    **Arguments:**

    - `graph`: a `fixpoint.layers.Graph` (several graphs: one value each).
    - `edge_weights`: `float[E]`, non-negative.
    - `self_weights`: `float[N]`, non-negative.
    - `max_iterations`: the most power-iteration steps per graph.

    **Returns:**

    `float[num_graphs]`, one value per graph.
    """
    # Compiled once (for these shapes), also when called eagerly on its own.
    return _perron_root(graph, edge_weights, self_weights, max_iterations)


@eqx.filter_jit
def _perron_root(graph, edge_weights, self_weights, max_iterations):
    ids, g = graph.node_graph(), graph.num_graphs
    ew, sw = jax.lax.stop_gradient(edge_weights), jax.lax.stop_gradient(self_weights)
    v, u, bound, _ = _perron_iteration(graph, ew, sw, max_iterations)
    has_nodes = jax.ops.segment_sum(jnp.ones_like(ids), ids, g) > 0
    bound = jnp.where(has_nodes, bound - 1.0, 0.0)
    # The same eigenvalue as a differentiable quotient of the live weights.
    mv = _right(graph, edge_weights, self_weights, v)
    uv = jnp.where(has_nodes, jax.ops.segment_sum(u * v, ids, g), 1.0)
    quotient = jax.ops.segment_sum(u * mv, ids, g) / uv - 1.0
    return jax.lax.stop_gradient(bound) + quotient - jax.lax.stop_gradient(quotient)


class _IGNNMap(eqx.Module):
    def __call__(self, x, args):
        w, scale, edge_w, self_w, injected, graph = args
        ax = _aggregate(x, graph, edge_w[:, None]) + self_w[:, None] * x
        return jax.nn.relu((ax @ w.T) * scale + injected)


class IGNN(_GraphEquilibrium):
    """An implicit graph neural network on sparse graphs.

    Gu, Chang, Zhu, Sojoudi & El Ghaoui, *Implicit Graph Neural Networks*,
    NeurIPS 2020.

    The node states `X[N, hidden]` solve `X = relu(Â X Wᵀ + Â U Ωᵀ)` (node-major
    form of IGNN's `X = φ(W X A + Ω U A)`), with `Â` the normalised adjacency
    `D^-1/2 (A + I) D^-1/2` (`normalised_adjacency`). Well-posedness: each row of
    `W` is rescaled onto the L1 ball of radius `κ / λ_pf(Â)` (so `‖W‖∞ ≤ κ / λ_pf`,
    IGNN's sufficient condition), and `λ_pf(Â) = 1` exactly for every graph, of
    any direction and non-negative finite weights: `D` is the row sums of `A + I`
    (received weights plus one, from the same weights), so `Â` is similar to the
    row-stochastic `D^-1 (A + I)`, whose Perron root is 1. The radius is `κ`, for
    every graph of a batch alike (no power iteration: `perron_root` is for other
    operators). (IGNN projects Euclidean-ly onto the ball; this radial rescaling
    reaches the same ball.) Outputs: a linear readout of `[X, U]`.

    **Arguments:**

    - `node_size`: the number of input features per node.
    - `out_size`: the number of output features per node.

    Keyword-only:

    - `hidden`: the state width `m` (default 64).
    - `kappa`: in `(0, 1)`; the well-posedness margin (default 0.9).
    - `edge_weight_column`: use `graph.edges[:, column]` as the adjacency weights;
      gradients reach them. They must be finite and non-negative (checked when the
      layer is called; under `jit` at run time). `None` (default): unweighted.
    - `solver`: as in `CGS` (default `Picard(1e-5, 1e-5)`; dense Newton refused).
    - `adjoint`: as in `CGS` (default `ImplicitAdjoint()`; dense backward
      solves refused).
    - `max_steps`: default enough Picard steps to reach 1e-8 at rate `kappa`.
    - `throw`: raise on a failed solve (`True`, default) or report it
      (`ignn.solve(graph).result`).
    - `key`: the PRNG key for the initial parameters.

    `ignn(graph) -> float[N, out_size]`; `ignn.solve(graph)` returns the
    `fixpoint.Solution` of the node states.
    """

    omega: eqx.nn.Linear
    w: Array
    readout: eqx.nn.Linear
    node_size: int = eqx.field(static=True)
    kappa: float = eqx.field(static=True)
    edge_weight_column: int | None = eqx.field(static=True)

    def __init__(
        self,
        node_size: int,
        out_size: int,
        *,
        hidden: int = 64,
        kappa: float = 0.9,
        edge_weight_column: int | None = None,
        solver: internal.AbstractSolver | None = None,
        adjoint: fixpoint.AbstractAdjoint | None = None,
        max_steps: int | None = None,
        throw: bool = True,
        key: PRNGKeyArray,
    ):
        kappa = internal.check_number(kappa, "kappa", "(0, 1)", owner="IGNN")
        node_size, out_size, hidden = (
            internal.check_int(v, name, 1, owner="IGNN")
            for v, name in ((node_size, "node_size"), (out_size, "out_size"), (hidden, "hidden"))
        )
        if edge_weight_column is not None:
            edge_weight_column = internal.check_int(
                edge_weight_column, "edge_weight_column", 0, owner="IGNN"
            )
        k1, k2, k3 = jax.random.split(key, 3)
        self.omega = eqx.nn.Linear(node_size, hidden, use_bias=False, key=k1)
        self.w = jax.random.normal(k2, (hidden, hidden)) / hidden
        self.readout = eqx.nn.Linear(hidden + node_size, out_size, key=k3)
        self.node_size, self.kappa = node_size, float(kappa)
        self.edge_weight_column = edge_weight_column
        self._configure(solver=solver, adjoint=adjoint, max_steps=max_steps, throw=throw)

    def _rate(self) -> float:
        return self.kappa

    def _args(self, graph):
        dtype = self.w.dtype
        nodes, _ = _features(graph, self.node_size, None, "IGNN", dtype)
        w = _edge_weights(graph, self.edge_weight_column, dtype, "IGNN", "edge_weight_column")
        edge_w, self_w = _normalise(graph, w)
        # λ_pf(Â) = 1 for every graph (see the class docstring): the radius is κ.
        row_l1 = jnp.sum(jnp.abs(self.w), axis=1)  # [hidden]
        scale = jnp.minimum(1.0, self.kappa / jnp.maximum(row_l1, 1e-30))  # row scaling of W
        u = jax.vmap(self.omega)(nodes)
        injected = _aggregate(u, graph, edge_w[:, None]) + self_w[:, None] * u
        return nodes, (self.w, scale, edge_w, self_w, injected, graph)

    def solve(self, graph: Graph, *, z0: Array | None = None) -> fixpoint.Solution:
        """The node states `X[N, hidden]` as a `fixpoint.Solution`.

        **Arguments:**

        - `graph`: a `fixpoint.layers.Graph`.
        - `z0`: the starting point, `float[N, hidden]` (default zeros).

        **Returns:**

        A `fixpoint.Solution` with `value: float[N, hidden]`.
        """
        return self._solve(self._args(graph)[1], z0)

    def _solve(self, args, z0):
        z0 = jnp.zeros_like(args[4]) if z0 is None else z0
        return self._fixed_point(_IGNNMap(), z0, args)

    def __call__(self, graph: Graph) -> Array:
        """Solve from zero and read out `[X, U]` per node.

        **Arguments:**

        - `graph`: a `fixpoint.layers.Graph`.

        **Returns:**

        The node outputs, `float[N, out_size]`.
        """
        nodes, args = self._args(graph)
        x = self._solve(args, None).value
        return jax.vmap(self.readout)(jnp.concatenate([x, nodes], axis=-1))
