"""What `fixed_point` and `root_find` share: checks, flattening, adjoint, Solution."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.flatten_util import ravel_pytree

from ._adjoint import AbstractAdjoint, explain_forward_mode
from ._blockwise import Blockwise, FlatBlock, FlatBlockwise, block_keys, blocks_of
from ._cache import may_cache
from ._checks import (
    as_float_pytree,
    check_bool,
    check_instance,
    check_int,
    check_number,
    check_output,
    outputs_as_arrays,
)
from ._compact import check_compaction
from ._errors import checked
from ._finite_sum import FiniteSum, FlatComponent, FlatSum
from ._fixed_point_loop import LoopOptions, iterate
from ._fixed_point_problem import Problem
from ._fixed_point_solver import AbstractSolver
from ._manual import hoist
from ._reversible import ReversibleAdjoint
from ._solution import RESULTS, Solution


class _Flat(eqx.Module):
    """The user's `fn` on flat vectors: `(y_flat, args) -> (out_flat, aux)`."""

    fn: Callable
    unravel: Callable = eqx.field(static=True)
    has_aux: bool = eqx.field(static=True)

    def __call__(self, y, args):
        out = outputs_as_arrays(self.fn(self.unravel(y), args))
        out, aux = out if self.has_aux else (out, None)
        return ravel_pytree(out)[0], aux


def solve(
    name,
    kind,
    fn,
    y0,
    args,
    *,
    solver,
    max_steps,
    throw,
    has_aux,
    adjoint,
    record_residuals,
    divergence_ratio,
    compaction,
) -> Solution:
    check_instance(solver, AbstractSolver, "solver")
    check_compaction(compaction)
    check_instance(adjoint, AbstractAdjoint, "adjoint")
    max_steps = check_budget(max_steps)
    for label, value in (
        ("throw", throw),
        ("has_aux", has_aux),
        ("record_residuals", record_residuals),
    ):
        check_bool(value, label)
    divergence_ratio = check_number(divergence_ratio, "divergence_ratio", "> 1")
    options = LoopOptions(max_steps, divergence_ratio, record_residuals)
    y0 = as_float_pytree(y0)
    # Compiled once per function, as `jax.jit` would (see `_cache.py`).
    statics = (fn, args, solver, adjoint, options, compaction)
    run = _compiled if may_cache(*statics) else _core
    try:
        sol = run(name, kind, fn, y0, args, solver, adjoint, options, has_aux, compaction, throw)
    except TypeError as e:
        explain_forward_mode(adjoint, e)
    if throw:
        # Every output depends on the check, so it runs whichever one is used;
        # on concrete results (an eager call) it raises `SolveError` right here.
        sol = checked(
            sol, sol.result._value, sol.stats["num_steps"], sol.stats["residual"], f"`{name}`"
        )
    return sol


def _core(
    name, kind, fn, y0, args, solver, adjoint, options, has_aux, compaction, throw
) -> Solution:
    y0_flat, unravel, inputs, aux_struct = setup(name, fn, y0, args, has_aux)
    blocks = blocks_of(y0)
    if eqx.is_array(options.max_steps):
        # A run-time budget travels with the inputs: an adjoint's derivative rule
        # may not close over a traced value (it gets no tangent: an integer).
        inputs = (*inputs, options.max_steps)

    # The reversible adjoint also needs the solver and its final state (the last
    # two iterates), which it runs backwards.
    reversing = isinstance(adjoint, ReversibleAdjoint)

    def primal(inputs, y, loop, checkpoints):
        f, a = inputs[:2]
        opts = options
        if len(inputs) == 3:
            opts = eqx.tree_at(lambda o: o.max_steps, options, inputs[2])
        problem = Problem(f, kind, blocks)
        # Not compacted when reversing: compaction's `custom_vmap` inside the
        # reversal's `custom_vjp` breaks forward-over-reverse (`jax.hessian`).
        y, aux, result, stats, state = iterate(
            solver,
            problem,
            y,
            a,
            aux_struct,
            opts,
            loop,
            checkpoints,
            None if reversing else compaction,
        )
        return y, ((aux, result, stats, state) if reversing else (aux, result, stats))

    if reversing:
        y_flat, rest = adjoint.reverse(primal, inputs, y0_flat, solver, kind, _failed, throw)
        aux, result, stats = rest[:3]
    else:
        y_flat, (aux, result, stats) = adjoint.apply(
            primal, residual_fn(kind), inputs, y0_flat, (solver.rtol, solver.atol), _failed, throw
        )
    if has_aux:
        # Evaluated again at the (differentiable) solution so that gradients flow
        # through `aux` under every adjoint.
        aux = inputs[0](y_flat, inputs[1])[1]
    if "displacement" in stats:
        stats = {**stats, "displacement": unravel(stats["displacement"])}
    return Solution(value=unravel(y_flat), result=result, aux=aux, stats=stats)


_compiled = eqx.filter_jit(_core)


def setup(name, fn, y0, args, has_aux):
    """Check `fn` against `y0` and put the problem in flat, differentiable form.

    Returns `(y0_flat, unravel, inputs, aux_struct)` where `inputs = (flat_fn,
    args)` holds every array a gradient may flow to: `args` and the arrays `fn`
    closes over (hoisted by closure conversion).
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {fn!r}.")
    for kind in (FiniteSum, Blockwise):
        if has_aux and isinstance(fn, kind):
            raise TypeError(
                f"`{name}`: `has_aux=True` cannot be used with a `fixpoint.{kind.__name__}` "
                "`fn`: its parts return the value only."
            )
    y0 = as_float_pytree(y0)
    if isinstance(fn, Blockwise):
        _check_blockwise(name, fn, y0, args)
    if isinstance(fn, FiniteSum):
        # One component first, so that a wrong output is named as the component's.
        part = eqx.filter_eval_shape(
            lambda y, a: outputs_as_arrays(fn.fn(y, a, jnp.int32(0)), "fn(y, args, i)"), y0, args
        )
        check_output(part, y0, False, name, "the `FiniteSum` component", "fn(y0, args, 0)")
    out_struct = eqx.filter_eval_shape(lambda y, a: outputs_as_arrays(fn(y, a)), y0, args)
    check_output(out_struct, y0, has_aux, name)
    aux_struct = out_struct[1] if has_aux else None
    y0_flat, unravel = ravel_pytree(y0)
    if isinstance(fn, FiniteSum):
        # One component hoisted: the whole call and every sampled batch of
        # components share its closed-over arrays (so gradients reach them).
        component = hoist(FlatComponent(fn.fn, unravel), y0_flat, args, jnp.int32(0))
        flat_cc = FlatSum(component, fn.num_components)
    elif isinstance(fn, Blockwise):
        # One hoisted function per block: the whole call is their concatenation.
        flat_cc = FlatBlockwise(
            tuple(
                hoist(FlatBlock(fn.fns[k], unravel, f"fns[{k!r}](y, args)"), y0_flat, args)
                for k in block_keys(y0)
            )
        )
    else:
        flat_cc = hoist(_Flat(fn, unravel, has_aux), y0_flat, args)
    # Weakly typed scalars (e.g. a Python float under `grad`) come back from
    # `custom_jvp` as Python-like scalars; strong-typed arrays stay arrays.
    inputs = jax.tree.map(_strong, (flat_cc, args))
    return y0_flat, unravel, inputs, aux_struct


def _check_blockwise(name, fn, y0, args):
    """A `Blockwise` needs `y0` of blocks with the same keys, and each block's
    function must return its block's structure, shapes and dtypes (named)."""
    if not isinstance(y0, (tuple, list, dict)) or (
        isinstance(y0, dict) != isinstance(fn.fns, dict)
        or sorted(block_keys(y0), key=repr) != sorted(block_keys(fn.fns), key=repr)
    ):
        got = (
            f"a dict with keys {list(y0)}"
            if isinstance(y0, dict)
            else (type(y0).__name__ if isinstance(y0, (tuple, list)) else "a single array")
        )
        raise ValueError(
            f"`{name}`: a `fixpoint.Blockwise` `fn` needs `y0` with the same blocks as its "
            f"`fns` ({block_keys(fn.fns)}), got {got}"
            + (f" of {len(y0)} blocks" if isinstance(y0, (tuple, list)) else "")
            + "."
        )
    for k in block_keys(y0):
        part = eqx.filter_eval_shape(
            lambda y, a, k=k: outputs_as_arrays(fn.fns[k](y, a), f"fns[{k!r}](y, args)"),
            y0,
            args,
        )
        check_output(
            part,
            y0[k],
            False,
            name,
            f"the `Blockwise` block {k!r}",
            f"fns[{k!r}](y0, args)",
            root=f"y0[{k!r}]",
        )


def residual_fn(kind):
    """`residual(y_flat, inputs) -> G(y)`, the root form used by the adjoints."""

    def residual(y, inputs):
        return Problem(inputs[0], kind).residual(y, inputs[1])[0]

    return residual


def failed_at(index):
    """`failed(y, rest, inputs)` for an adjoint: the result code is `rest[index]`."""

    def failed(y, rest, inputs):
        del y, inputs
        return rest[index] != RESULTS.successful

    return failed


_failed = failed_at(1)


def check_budget(max_steps):
    """`max_steps` as a Python int `>= 1`, or a run-time budget: an integer scalar
    JAX array (traced under `jit`; changing it compiles nothing again)."""
    if isinstance(max_steps, np.ndarray) and max_steps.shape == ():
        max_steps = max_steps[()]  # a NumPy scalar: static, as a NumPy integer is
    if not isinstance(max_steps, jax.Array):
        return check_int(max_steps, "max_steps", 1)
    if max_steps.shape != () or not jnp.issubdtype(max_steps.dtype, jnp.integer):
        raise TypeError(
            "`max_steps` must be a Python int or an integer scalar array (a run-time "
            f"budget), got an array of shape {max_steps.shape} and dtype {max_steps.dtype}."
        )
    # The loop's own counter's dtype (strict promotion refuses a mix); larger
    # values are capped, not wrapped.
    counter = jnp.asarray(0).dtype
    if not isinstance(max_steps, Tracer):
        value = int(max_steps)
        if not 1 <= value <= jnp.iinfo(counter).max:
            raise ValueError(
                f"`max_steps` must be at least 1 (and at most {jnp.iinfo(counter).max}), "
                f"got {value}."
            )
    if jnp.iinfo(max_steps.dtype).max > jnp.iinfo(counter).max:
        max_steps = jnp.minimum(max_steps, jnp.iinfo(counter).max)
    return max_steps.astype(counter)


def _strong(x):
    if eqx.is_array(x) and getattr(x, "weak_type", False):
        return jnp.asarray(x, dtype=x.dtype)
    return x
