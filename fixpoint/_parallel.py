"""`data_parallel`: run a batched function with each device on its share of the batch."""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec


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

    **Returns:** a function with `fn`'s signature. Of its outputs, each 0-d
    floating-point leaf (a mean loss, a mean step count) is averaged over the
    devices (`lax.pmean`): this is the mean over the whole batch when `fn`
    returns means, since every device holds as many samples. Every other leaf
    must have the batch as its leading axis and comes back as one array, still
    split over the devices (it is never gathered to one device). 0-d integer or
    boolean outputs are refused: return them per sample, or as a float mean.
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

    def run(*args):
        batched = _batched_positions(batch_argnums, len(args))
        dynamic, static = eqx.partition(args, eqx.is_array)
        for i in sorted(batched):
            _check_batched(dynamic[i], i, devices, axis)
        specs = tuple(split if i in batched else whole for i in range(len(args)))
        # What one device sees, to find the outputs' layout before the call.
        local = tuple(
            jax.tree.map(lambda a: _share(a, devices), d) if i in batched else d
            for i, d in enumerate(dynamic)
        )
        out_struct = eqx.filter_eval_shape(lambda *d: fn(*eqx.combine(d, static)), *local)
        out_dynamic, out_static = eqx.partition(out_struct, _is_struct)
        out_specs = jax.tree_util.tree_map_with_path(
            lambda path, a: _out_spec(path, a, split, whole), out_dynamic
        )

        def body(*dynamic):
            out = eqx.filter(fn(*eqx.combine(dynamic, static)), eqx.is_array)
            return jax.tree.map(lambda a: jax.lax.pmean(a, axis) if a.ndim == 0 else a, out)

        out = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs)(*dynamic)
        return eqx.combine(out, out_static)

    return run


def _batched_positions(batch_argnums, n: int) -> set[int]:
    positions = tuple(range(1, n)) if batch_argnums is None else tuple(batch_argnums)
    for i in positions:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(
                f"data_parallel: `batch_argnums` names argument {i!r}, but the function was "
                f"called with {n} positional argument(s)."
            )
    return {i % n for i in positions}


def _check_batched(tree, i: int, devices: int, axis: str) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"data_parallel: argument {i} is batched but holds no arrays.")
    for path, a in leaves:
        where = f"argument {i}{jax.tree_util.keystr(path)}"
        if jnp.ndim(a) == 0:
            raise ValueError(
                f"data_parallel: {where} is batched (`batch_argnums`) but is a scalar; a "
                "batched argument has the batch as its leading axis."
            )
        if a.shape[0] % devices:
            raise ValueError(
                f"data_parallel: {where} has a batch of {a.shape[0]}, which the {devices} "
                f"devices of mesh axis {axis!r} do not divide; pad the batch (and mask the "
                "padding out of the loss) or drop the remainder."
            )


def _share(a, devices: int):
    return jax.ShapeDtypeStruct((a.shape[0] // devices, *a.shape[1:]), a.dtype)


def _is_struct(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _out_spec(path, a, split, whole):
    if a.ndim > 0:
        return split
    if jnp.issubdtype(a.dtype, jnp.floating):
        return whole
    raise ValueError(
        f"data_parallel: output{jax.tree_util.keystr(path)} is a 0-d {a.dtype} value, which "
        "cannot be averaged over the devices; return it per sample (with the batch as its "
        "leading axis) or as a floating-point mean."
    )
