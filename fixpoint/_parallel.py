"""`data_parallel`: run a batched function with each device on its share of the batch."""

import contextlib
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def data_parallel(
    fn: Callable,
    mesh: Mesh,
    *,
    axis: str | None = None,
    batch_argnums: Sequence[int] | None = None,
) -> Callable:
    """`fn` with the batch split over the devices of `mesh`, each solving its own share.

    `fn(*args)` is a function of a batch (say `loss(model, x, y)`, which
    `jax.vmap`s a layer over `x`). The returned function splits each batched
    argument along its leading axis into one contiguous share per device of
    `mesh`'s `axis`, copies the other arguments (the parameters) to every
    device, and runs `fn` on each share inside `jax.shard_map`. So every
    device runs its own loop, stops when *its* samples have converged, and
    compacts its own samples (`fixpoint.Compaction`); a device never waits
    for another inside the solve. Gradients of the replicated arguments are
    summed over the devices by XLA (`shard_map`'s transpose), so
    `jax.grad` of the result is the gradient of the whole batch.

    **Arguments:**

    - `fn`: the batched function. Array leaves of its arguments are split or
      copied; other leaves (an activation function, a solver) pass through.
    - `mesh`: a `jax.sharding.Mesh`, e.g. `jax.make_mesh((n,), ("batch",))`;
      on several hosts, the global mesh after `jax.distributed.initialize()`.
    - `axis`: the mesh axis to split the batch over (default: the mesh's only
      axis). Arguments are replicated over any other axes.
    - `batch_argnums`: the positions of the batched arguments (default: every
      argument but the first, the model). Their leading axis must be divisible
      by the number of devices along `axis`.

    **Returns:** a function of the same positional arguments. Of its outputs,
    each 0-d floating-point leaf (a mean loss, a mean step count) is averaged
    over the devices (`lax.pmean`): this is the mean over the whole batch when
    `fn` returns means, since every device holds as many samples. Every other
    leaf must have the device's share of the batch as its leading axis (an
    error says so otherwise) and comes back as one array, still split over the
    devices (it is never gathered to one device). 0-d integer or boolean
    outputs are refused: return them per sample, or as a float mean. `fn` may
    use collectives over `axis` (`lax.psum(x, axis)`).

    The `shard_map` runs with `check_vma=False`: the library's loops start from
    replicated guesses (a `zeros` initial state) that vary across devices once
    they meet the data, which JAX's check of varying mesh axes refuses for some
    solvers. Do the same in your own `shard_map` around a solve.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"data_parallel: `mesh` must be a `jax.sharding.Mesh`, got {mesh!r}.")
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"data_parallel: `mesh` has axes {mesh.axis_names}; pass `axis=` to name the "
                "one the batch is split over."
            )
        axis = str(mesh.axis_names[0])
    if axis not in mesh.axis_names:
        raise ValueError(f"data_parallel: `axis={axis!r}` is not an axis of `mesh` {mesh!r}.")
    devices = mesh.shape[axis]
    split, whole = PartitionSpec(axis), PartitionSpec()

    def run(*args, **kwargs):
        if kwargs:
            raise TypeError(
                f"data_parallel: pass every argument positionally (got keywords "
                f"{sorted(kwargs)}); `batch_argnums` counts positions."
            )
        batched = _batched_positions(batch_argnums, len(args))
        dynamic, static = eqx.partition(args, eqx.is_array)
        local_batch = _check_batched(dynamic, sorted(batched), devices, axis)
        specs = tuple(split if i in batched else whole for i in range(len(args)))
        types = getattr(mesh, "axis_types", None) or (None,) * len(mesh.axis_names)
        if types[mesh.axis_names.index(axis)] == AxisType.Explicit:
            # An Explicit mesh axis: every input must already carry its layout.
            dynamic = tuple(
                jax.tree.map(lambda a, s=spec: jax.sharding.reshard(a, NamedSharding(mesh, s)), d)
                for d, spec in zip(dynamic, specs, strict=True)
            )
        out_static = []

        def body(*dynamic):
            out = fn(*eqx.combine(dynamic, static))
            out, rest = eqx.partition(out, eqx.is_array)
            out_static.append(rest)
            return jax.tree.map(lambda a: jax.lax.pmean(a, axis) if _averaged(a) else a, out)

        # `check_vma=False`: the library's loops start from replicated guesses
        # (`zeros`) and vary once they meet the data, which JAX's type check of
        # varying mesh axes (`check_vma=True`) would refuse for some solvers.
        def mapped(out_specs):
            return jax.shard_map(
                body, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False
            )

        # One device's outputs (traced inside `shard_map`, so `fn` may use
        # collectives over `axis`), to find their layout.
        with _explained():
            local = jax.eval_shape(mapped(whole), *dynamic)
        out_specs = jax.tree_util.tree_map_with_path(
            lambda path, a: _out_spec(path, a, local_batch, split, whole), local
        )
        with _explained():
            out = mapped(out_specs)(*dynamic)
        return eqx.combine(out, out_static[-1])

    return run


_CLOSURE_HINT = (
    "data_parallel: a solve inside `shard_map` reached `equinox.filter_closure_convert`, "
    "which refuses arrays that carry a mesh sharding (every array inside `shard_map` "
    "does). Equinox and lineax use it in `equinox.internal.while_loop` (so "
    "`fixpoint.UnrolledAdjoint`) and in lineax's operators (so `fixpoint.solvers.Newton` and "
    "lineax backward solvers, `ImplicitAdjoint(linear_solver=lx.LU())`). Use "
    "`Picard`, `Anderson` or `Broyden` with `ImplicitAdjoint()` (its own GMRES), "
    "`PhantomAdjoint` or `NeumannAdjoint`; or plain SPMD (`jax.jit` with the batch "
    "sharded, no `data_parallel`)."
)


@contextlib.contextmanager
def _explained():
    try:
        yield
    except ValueError as e:
        if "Closure-converted function called with different" not in str(e):
            raise
        raise TypeError(_CLOSURE_HINT) from e


def _batched_positions(batch_argnums, n: int) -> set[int]:
    positions = tuple(range(1, n)) if batch_argnums is None else tuple(batch_argnums)
    for i in positions:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(
                f"data_parallel: `batch_argnums` names argument {i!r}, but the function was "
                f"called with {n} positional argument(s)."
            )
    return {i % n for i in positions}


def _check_batched(dynamic, positions, devices: int, axis: str) -> int:
    """The per-device batch; every batched leaf must share one divisible leading size."""
    sizes = {}
    for i in positions:
        leaves = jax.tree_util.tree_flatten_with_path(dynamic[i])[0]
        if not leaves:
            raise ValueError(f"data_parallel: argument {i} is batched but holds no arrays.")
        for path, a in leaves:
            where = f"argument {i}{jax.tree_util.keystr(path)}"
            if jnp.ndim(a) == 0:
                raise ValueError(
                    f"data_parallel: {where} is batched (`batch_argnums`) but is a scalar; a "
                    "batched argument has the batch as its leading axis."
                )
            sizes[where] = a.shape[0]
    if not sizes:
        raise ValueError("data_parallel: no batched argument (`batch_argnums` is empty).")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"data_parallel: batched arguments differ in batch size ({listed}).")
    (where, size), *_ = sizes.items()
    if size % devices:
        raise ValueError(
            f"data_parallel: {where} has a batch of {size}, which the {devices} devices of "
            f"mesh axis {axis!r} do not divide; pad the batch (and mask the padding out of "
            "the loss) or drop the remainder."
        )
    return size // devices


def _averaged(a) -> bool:
    return a.ndim == 0 and jnp.issubdtype(a.dtype, jnp.inexact)


def _out_spec(path, a, local_batch: int, split, whole):
    where = f"data_parallel: output{jax.tree_util.keystr(path)}"
    if _averaged(a):
        return whole
    if a.ndim == 0:
        raise ValueError(
            f"{where} is a 0-d {a.dtype} value, which cannot be averaged over the devices; "
            "return it per sample (with the batch as its leading axis) or as a float mean."
        )
    if a.shape[0] != local_batch:
        raise ValueError(
            f"{where} has shape {a.shape} on each device, whose {local_batch} samples it "
            "should lead with: a per-sample output keeps the batch as its leading axis. "
            "Return a batch statistic as a 0-d mean, and parameters-only values outside "
            "`data_parallel`."
        )
    return split
