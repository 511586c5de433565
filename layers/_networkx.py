"""Reading a networkx graph into NumPy arrays, for `Graph.from_networkx`.

networkx is imported only here, when called (the `graphs` extra).
"""

from collections.abc import Sequence

import numpy as np

_WHERE = "Graph.from_networkx"


def _names(names, arg: str) -> list[str]:
    """`None`, one attribute name or a sequence of names, as a list of names."""
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    if isinstance(names, Sequence) and all(isinstance(n, str) for n in names):
        return list(names)
    raise TypeError(
        f"{_WHERE}: `{arg}` must be None, an attribute name (str) or a sequence of "
        f"attribute names, got {names!r}."
    )


def _column(labels, values, name: str, arg: str, what: str) -> np.ndarray:
    """The values of attribute `name` (one scalar or vector per item) as `float64[n, k]`."""
    if not values:
        return np.zeros((0, 0))
    try:  # the fast path: every value numeric, all of one size
        out = np.asarray(values)
        if out.dtype.kind in "biuf" and out.ndim in (1, 2):
            return out.reshape(len(values), -1).astype(np.float64)
    except (TypeError, ValueError):
        pass
    rows, first = [], None
    for label, value in zip(labels, values, strict=True):
        try:
            x = np.asarray(value)
        except (TypeError, ValueError):
            x = np.asarray(value, dtype=object)
        if x.dtype.kind not in "biuf" or x.ndim > 1:
            raise ValueError(
                f"{_WHERE}: `{arg}`: attribute {name!r} of {what} {label!r} must be a real "
                f"number or a vector of them, got {value!r}."
            )
        if first is None:
            first = label
        elif x.size != rows[0].size:
            raise ValueError(
                f"{_WHERE}: `{arg}`: attribute {name!r} has {x.size} values on {what} "
                f"{label!r} but {rows[0].size} on {what} {first!r}; every {what} needs the "
                "same number."
            )
        rows.append(x.reshape(-1).astype(np.float64))
    return np.stack(rows)  # e.g. scalars mixed with vectors of one entry


def _features(labels, attrs, names: list[str], arg: str, what: str) -> np.ndarray:
    """The attributes `names` of every item, their columns side by side: `float64[n, k]`."""
    columns = [np.zeros((len(labels), 0))]
    for name in names:
        missing = [label for label, a in zip(labels, attrs, strict=True) if name not in a]
        if missing:
            raise ValueError(
                f"{_WHERE}: `{arg}`: {what} {missing[0]!r} has no attribute {name!r} "
                f"({len(missing)} of {len(labels)} {what}s lack it)."
            )
        columns.append(_column(labels, [a[name] for a in attrs], name, arg, what))
    return np.concatenate(columns, axis=1)


def networkx_arrays(graph, node_features, edge_features):
    """`(nodes, edges, senders, receivers)` of a networkx graph, as NumPy arrays
    (features float64, indices int64); see `Graph.from_networkx`."""
    try:
        import networkx as nx
    except ImportError:
        raise ImportError(
            f'{_WHERE} needs networkx, which is not installed: pip install "fixpoint-jax[graphs]"'
        ) from None
    if not isinstance(graph, nx.Graph):
        raise TypeError(
            f"{_WHERE}: `graph` must be a networkx graph (Graph, DiGraph, MultiGraph or "
            f"MultiDiGraph), got {type(graph).__name__}."
        )
    node_names = _names(node_features, "node_features")
    edge_names = _names(edge_features, "edge_features")

    node_labels = list(graph.nodes)
    index = {v: i for i, v in enumerate(node_labels)}
    nodes = _features(
        node_labels, [graph.nodes[v] for v in node_labels], node_names, "node_features", "node"
    )

    if isinstance(graph, nx.MultiGraph):  # MultiDiGraph too
        listed = [((u, v, k), d) for u, v, k, d in graph.edges(keys=True, data=True)]
    else:
        listed = [((u, v), d) for u, v, d in graph.edges(data=True)]
    edge_labels = [e for e, _ in listed]
    edges = _features(edge_labels, [d for _, d in listed], edge_names, "edge_features", "edge")
    pairs = np.asarray([(index[e[0]], index[e[1]]) for e in edge_labels], np.int64)
    pairs = pairs.reshape(-1, 2)
    senders, receivers = pairs[:, 0], pairs[:, 1]
    if not graph.is_directed():  # the other direction of every edge but self-loops
        back = np.flatnonzero(senders != receivers)
        senders, receivers = (
            np.concatenate([senders, receivers[back]]),
            np.concatenate([receivers, senders[back]]),
        )
        edges = np.concatenate([edges, edges[back]])
    return nodes, edges, senders, receivers
