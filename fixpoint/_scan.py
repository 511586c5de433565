"""`fixpoint.scan`: `jax.lax.scan`, evaluated as a fixed point over time."""

import functools as ft
from collections.abc import Callable
from typing import Literal, TypeAlias, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike
from jaxtyping import Array, Float, PyTree

from ._cache import may_cache
from ._checks import as_float_pytree, check_instance, check_int
from ._errors import checked
from ._fixed_point_setup import _strong, failed_at
from ._implicit import implicit_solve
from ._manual import hoist
from ._scan_loop import EXTRA_STEPS, iterate_scan, scan_linear_solve
from ._scan_solver import AbstractScanSolver, ScanProblem, scan_tolerances
from ._solution import Solution
from ._time import Time

# `f(carry, x) -> (carry, y)`, as for `lax.scan`.
Cell: TypeAlias = Callable[[PyTree[Array], PyTree[Array]], tuple[PyTree[Array], PyTree[Array]]]


@overload
def scan(
    f: Cell,
    init: PyTree[Float[ArrayLike, "..."]],
    xs: PyTree[ArrayLike] = None,
    length: int | None = None,
    *,
    solver: AbstractScanSolver,
    reverse: bool = False,
    guess: PyTree[ArrayLike] = None,
    max_steps: int | None = None,
    throw: bool = True,
    adjoint_solver: AbstractScanSolver | None = None,
    record_residuals: bool = False,
    return_solution: Literal[False] = False,
    mesh: Mesh | None = None,
) -> tuple[PyTree[Array], PyTree[Array]]: ...


@overload
def scan(
    f: Cell,
    init: PyTree[Float[ArrayLike, "..."]],
    xs: PyTree[ArrayLike] = None,
    length: int | None = None,
    *,
    solver: AbstractScanSolver,
    reverse: bool = False,
    guess: PyTree[ArrayLike] = None,
    max_steps: int | None = None,
    throw: bool = True,
    adjoint_solver: AbstractScanSolver | None = None,
    record_residuals: bool = False,
    return_solution: Literal[True],
    mesh: Mesh | None = None,
) -> tuple[PyTree[Array], PyTree[Array], Solution]: ...


@overload
def scan(
    f: Cell,
    init: PyTree[Float[ArrayLike, "..."]],
    xs: PyTree[ArrayLike] = None,
    length: int | None = None,
    *,
    solver: AbstractScanSolver,
    reverse: bool = False,
    guess: PyTree[ArrayLike] = None,
    max_steps: int | None = None,
    throw: bool = True,
    adjoint_solver: AbstractScanSolver | None = None,
    record_residuals: bool = False,
    return_solution: bool = False,
    mesh: Mesh | None = None,
) -> tuple[PyTree[Array], PyTree[Array]] | tuple[PyTree[Array], PyTree[Array], Solution]: ...


def scan(
    f: Cell,
    init: PyTree[Float[ArrayLike, "..."]],
    xs: PyTree[ArrayLike] = None,
    length: int | None = None,
    *,
    solver: AbstractScanSolver,
    reverse: bool = False,
    guess: PyTree[ArrayLike] = None,
    max_steps: int | None = None,
    throw: bool = True,
    adjoint_solver: AbstractScanSolver | None = None,
    record_residuals: bool = False,
    return_solution: bool = False,
    mesh: Mesh | None = None,
) -> tuple[PyTree[Array], PyTree[Array]] | tuple[PyTree[Array], PyTree[Array], Solution]:
    """`jax.lax.scan(f, init, xs, length, reverse)`, solved in parallel over time.

    The carries `h_1, ..., h_T` of `h_t, y_t = f(h_{t-1}, x_t)` are the fixed
    point of `H ↦ (f(h_{t-1}, x_t)[0])_t`; `solver` finds it by updating every
    step at once (see `fixpoint.solvers.Jacobi`, `fixpoint.solvers.DEER`, ...). The answer is that
    of `lax.scan` to the solver's tolerance; every solver needs at most `T`
    iterations. Gradients (forward and reverse mode) follow the implicit
    function theorem: the adjoint is a linear recurrence solved by the same
    parallel method, at memory independent of the number of iterations.

    **Arguments:**

    - `f`: `f(carry, x) -> (carry, y)`, as for `lax.scan`. The carry must be a
      pytree of floating-point arrays of one dtype, kept by `f`.
    - `init`: the initial carry.
    - `xs`: the inputs, a pytree of arrays with a shared leading (time) axis; or
      `None` with `length`.
    - `length`: the number of steps, if `xs` is `None` (checked against `xs`
      otherwise).
    - `solver`: a scan solver: `fixpoint.solvers.Sequential()`, `Jacobi()`,
      `GaussSeidel(block_size=...)`, `PicardSum()`, `DEER()`, `QuasiDEER()`, `ELK()`.
      `Jacobi(window=w)` and `PicardSum(window=w)` evaluate a sliding window
      of `w` steps per iteration (not with `mesh=`).
    - `reverse`: run from the last step to the first, as `lax.scan`.
    - `guess`: a starting trajectory of carries (leading axis `T`), e.g. the
      answer of a previous call; default: `init` at every step.
    - `max_steps`: the largest number of iterations; default `T + 16` (`T`
      padded to a multiple of the devices with `mesh=`): `T` always suffices in
      exact arithmetic, the rest leaves room for the rounding of a last step.
    - `throw`: raise `fixpoint.SolveError` when the solve fails (any sample,
      under `vmap`; under `jit` it arrives inside JAX's runtime error, with the
      same message); with `False` read the result code (`return_solution=True`).
      Also applies to the backward solves of a gradient (NaN with `False`).
    - `adjoint_solver`: the scan solver for the backward linear recurrences;
      default `solver`.
    - `record_residuals`: also record the largest per-step residual at every
      iteration in `stats["residual_history"]`.
    - `return_solution`: also return a `fixpoint.Solution`.
    - `mesh`: a `jax.sharding.Mesh` with one axis: the time axis is split into
      one contiguous chunk per device (`shard_map`), so each device holds only
      its chunk of the trajectory and of the solver's work arrays. The outputs
      stay sharded when the number of devices divides `T`; otherwise `T` is
      padded at the end (steps after the last cannot change earlier ones) and
      the outputs are gathered before the padding is cut off.

    **Returns:** `(final_carry, ys)`, or `(final_carry, ys, solution)` with
    `return_solution=True`: `solution.value` is the trajectory of carries
    (leading axis `T`; on success the certifying refinement, e.g. DEER's last
    Newton update, which moved no step beyond the tolerance and is the more
    accurate answer, or an exact one: a sequential sweep, which ends the solve
    once it is finite), `solution.result` a `RESULTS` item, and `solution.stats`
    has `num_steps` (iterations), `residual` (largest per-step residual norm of
    the trajectory measured before that refinement; 0 when unsharded
    `Sequential` returns its sweep, the sequential answer by construction),
    `converged_steps` (leading steps, in scan order, within tolerance) and,
    with `record_residuals=True`, `residual_history`.
    """
    if not callable(f):
        raise TypeError(f"`f` must be callable, got {f!r}.")
    check_instance(solver, AbstractScanSolver, "solver")
    if adjoint_solver is None:
        adjoint_solver = solver
    check_instance(adjoint_solver, AbstractScanSolver, "adjoint_solver")
    for name, value in (
        ("reverse", reverse),
        ("throw", throw),
        ("record_residuals", record_residuals),
        ("return_solution", return_solution),
    ):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    if mesh is not None and (not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1):
        raise ValueError(f"`mesh` must be a `jax.sharding.Mesh` with one axis, got {mesh!r}.")
    if mesh is not None and mesh.axis_types[0] != AxisType.Auto:
        raise ValueError(
            "`mesh` must have an automatic axis (`AxisType.Auto`), e.g. "
            "`jax.make_mesh((n,), ('time',), axis_types=(jax.sharding.AxisType.Auto,))`; "
            f"got {mesh.axis_types[0]}."
        )
    init = as_float_pytree(init, "init")
    check_carry_dtype(init)
    steps = _length(xs, length)
    if max_steps is not None:
        check_int(max_steps, "max_steps", 1)
    h0, unravel = ravel_pytree(init)
    h_guess = _guess(guess, init, steps, h0)
    devices = 1 if mesh is None else mesh.devices.size
    for name, s in (("solver", solver), ("adjoint_solver", adjoint_solver)):
        window = s.window_length(steps)
        if mesh is not None and window is not None and window < steps:
            raise ValueError(
                f"`{name}={type(s).__name__}(window={window})` slides a window along an "
                "unsharded time axis; with `mesh=` drop the window (or the mesh)."
            )
    if max_steps is None:
        max_steps = steps + (-steps % devices) + EXTRA_STEPS  # padded steps converge too
    # Compiled once per function, as `jax.jit` would (see `_cache.py`).
    statics = (f, init, xs, solver, adjoint_solver, mesh)
    run = _compiled if may_cache(*statics) else _scan_core
    h, ys, result, stats = run(
        f,
        init,
        xs,
        h_guess,
        steps=steps,
        solver=solver,
        adjoint_solver=adjoint_solver,
        max_steps=max_steps,
        throw=throw,
        reverse=reverse,
        record_residuals=record_residuals,
        extrapolate=guess is None,
        mesh=mesh,
    )
    if throw:
        h, ys, result, stats = checked(
            (h, ys, result, stats), result._value, stats["num_steps"], stats["residual"], "`scan`"
        )
    final = unravel(h[0] if reverse else h[-1])
    if not return_solution:
        return final, ys
    trajectory = jax.vmap(unravel)(h)
    return final, ys, Solution(value=trajectory, result=result, aux=None, stats=stats)


def _scan_core(f, init, xs, h_guess, *, steps, mesh, reverse, **options):
    x0 = jax.tree.map(lambda a: a[0], xs)
    h0, unravel = ravel_pytree(init)
    # At trace time, so that a cached call does not trace `f` again.
    _check_carry(f, init, x0, h0.dtype)
    cell = hoist(_Flat(f, unravel), h0, x0)
    inputs = jax.tree.map(_strong, (cell, xs, h0))
    devices = 1 if mesh is None else mesh.devices.size
    pad = -steps % devices
    if pad:
        # Padding goes after the last step in scan order: it cannot change the others.
        inputs, h_guess = _pad(inputs, h_guess, pad, reverse)
    run = ft.partial(_solve, reverse=reverse, **options)
    if mesh is None:
        h, ys, result, stats = run(inputs, h_guess, time=Time())
    else:
        h, ys, result, stats = _sharded(run, mesh, inputs, h_guess)
    if pad:
        cut = slice(pad, None) if reverse else slice(0, steps)
        if mesh is not None:
            # A sharded axis cannot be cut to a length the devices do not divide.
            h, ys = jax.tree.map(lambda a: _place(a, mesh, PartitionSpec()), (h, ys))
        h, ys = jax.tree.map(lambda a: a[cut], (h, ys))
    return h, ys, result, stats


_compiled = eqx.filter_jit(_scan_core)


def _solve(
    inputs,
    h_guess,
    *,
    time,
    solver,
    adjoint_solver,
    max_steps,
    throw,
    reverse,
    record_residuals,
    extrapolate,
):
    """The scan on one device (or inside `shard_map`, on one chunk of time)."""

    def problem(inputs):
        cell, xs, h0 = inputs
        return ScanProblem(lambda hp, x: cell(hp, x)[0], h0, xs, time, reverse)

    def primal(inputs, h):
        rtol, atol = scan_tolerances(solver, h.dtype)
        h, result, stats = iterate_scan(
            solver,
            problem(inputs),
            h,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            record_residuals=record_residuals,
            extrapolate=extrapolate,
        )
        return h, (result, stats)

    def residual(h, inputs):
        return h - problem(inputs).evaluate(h)

    solve_at = scan_linear_solve(adjoint_solver, throw, time, reverse)
    h, (result, stats) = implicit_solve(
        primal, residual, inputs, h_guess, solve_at, at_point=True, failed=_failed
    )
    cell, xs, h0 = inputs
    ys = jax.vmap(cell)(time.shift(h, h0, reverse), xs)[1]
    return h, ys, result, stats


_failed = failed_at(0)  # the result code is `rest[0]`


def _sharded(run, mesh, inputs, h_guess):
    axis = mesh.axis_names[0]
    time = Time(axis, mesh.devices.size)
    (cell, xs, h0), static = eqx.partition(inputs, eqx.is_array)
    split, whole = PartitionSpec(axis), PartitionSpec()

    def body(cell, xs, h0, h_guess):
        return run(eqx.combine((cell, xs, h0), static), h_guess, time=time)

    in_specs = (whole, split, whole, split)
    args = jax.tree.map(
        lambda spec, x: jax.tree.map(lambda a: _place(a, mesh, spec), x),
        in_specs,
        (cell, xs, h0, h_guess),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=(split, split, whole, whole),
        check_vma=False,
    )(*args)


def _place(a, mesh, spec):
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))


class _Flat(eqx.Module):
    """`f` on a flat carry: `(h_flat, x) -> (h_next_flat, y)`."""

    fn: Callable
    unravel: Callable = eqx.field(static=True)

    def __call__(self, h, x):
        carry, y = self.fn(self.unravel(h), x)
        return ravel_pytree(carry)[0], y


def _length(xs, length, name: str = "scan") -> int:
    leaves = jax.tree.leaves(xs)
    if length is not None:
        length = check_int(length, "length", 1)
    if not leaves:
        if length is None:
            raise ValueError(f"`{name}` needs `xs` with a leading time axis, or `length`.")
        return length
    lengths = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(xs)[0]:
        if not eqx.is_array_like(leaf) or np.ndim(leaf) == 0:
            raise ValueError(
                f"`xs{jax.tree_util.keystr(path)}` must be an array with a leading time "
                f"axis, got {type(leaf).__name__} with shape {np.shape(leaf)}."
            )
        lengths[jax.tree_util.keystr(path)] = np.shape(leaf)[0]
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"xs{k}: {v}" for k, v in lengths.items())
        raise ValueError(f"Every leaf of `xs` must have the same leading length; got {listed}.")
    steps = next(iter(lengths.values()))
    if length is not None and length != steps:
        raise ValueError(f"`length={length}` does not match the leading axis of `xs` ({steps}).")
    if steps < 1:
        raise ValueError("`xs` has length 0: there is nothing to scan.")
    return steps


def check_carry_dtype(init):
    """Every leaf of `init` has one dtype (before it is raveled: under strict
    promotion raveling mixed dtypes fails with JAX's own message)."""
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(init)}
    if len(dtypes) > 1:
        raise TypeError(
            f"Every leaf of `init` must have the same dtype, got {sorted(map(str, dtypes))}."
        )


def _check_carry(f, init, x0, dtype):
    check_carry_dtype(init)
    out = eqx.filter_eval_shape(f, init, x0)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "`f` must return a pair `(carry, y)`, as for `lax.scan`; it returned "
            f"{type(out).__name__} {jax.tree.structure(out)}."
        )
    carry = out[0]
    if jax.tree.structure(carry) != jax.tree.structure(init):
        raise ValueError(
            "`f` must return a carry with the structure of `init`.\n"
            f"  init:            {jax.tree.structure(init)}\n"
            f"  f(init, x)[0]:   {jax.tree.structure(carry)}"
        )
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(init)[0], jax.tree.leaves(carry), strict=True
    ):
        where = f"init{jax.tree_util.keystr(path)}"
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"`f` changed `{where}` from {a.dtype}{list(a.shape)} to "
                f"{b.dtype}{list(b.shape)}; the carry must keep its shape and dtype."
            )


def _guess(guess, init, steps, h0):
    if guess is None:
        return jnp.broadcast_to(h0, (steps, h0.shape[0]))
    if jax.tree.structure(guess) != jax.tree.structure(init):
        raise ValueError(
            "`guess` must have the structure of `init` (with a leading time axis): "
            f"{jax.tree.structure(guess)} vs {jax.tree.structure(init)}."
        )
    for (path, g), a in zip(
        jax.tree_util.tree_flatten_with_path(guess)[0], jax.tree.leaves(init), strict=True
    ):
        if np.shape(g) != (steps, *a.shape):
            raise ValueError(
                f"`guess{jax.tree_util.keystr(path)}` must have shape {(steps, *a.shape)}, "
                f"got {np.shape(g)}."
            )
    leaves = [jnp.asarray(g, h0.dtype).reshape(steps, -1) for g in jax.tree.leaves(guess)]
    return jnp.concatenate(leaves, axis=1)


def _pad(inputs, h_guess, pad, reverse):
    cell, xs, h0 = inputs

    def extend(a):
        edge = a[:1] if reverse else a[-1:]
        fill = jnp.repeat(edge, pad, axis=0)
        return jnp.concatenate([fill, a] if reverse else [a, fill])

    return (cell, jax.tree.map(extend, xs), h0), extend(h_guess)
