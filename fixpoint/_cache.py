"""When compiled work is reused across eager calls: `jax.jit`'s rule.

Every entry point compiles its loop with `equinox.filter_jit`: arrays (in `args`,
`xs`, a model's weights, an Equinox module's fields) are inputs of the compiled
function, and everything else (the function itself, Python numbers, solver
settings) is part of the cache key, by identity for a function. So a function
defined once and called again reuses the compiled loop, and what it reads
outside its arguments (globals, closed-over values) is baked in when it is first
traced, exactly as under `jax.jit`. `uncached()` opts out.
"""

import contextlib
import contextvars
import functools as ft
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TypeVar

import equinox as eqx
import jax

_UNCACHED: contextvars.ContextVar[bool] = contextvars.ContextVar("uncached", default=False)


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Trace the user's function again on every call inside this block.

    ```python
    with fixpoint.uncached():
        sol = fixpoint.fixed_point(f, y0, args, solver=solver)
    ```

    By default every entry point (`fixed_point`, `root_find`, `scan`, `decode`,
    and the layers through them) follows `jax.jit`'s rule: compiled work is
    reused across eager calls for the same function object, and whatever the
    function reads outside its arguments (a global, a closed-over array) is
    frozen when it is first traced. Pass values that change as arguments
    (`args`, `xs`, a model's fields). Inside this block nothing is cached:
    every call traces and compiles again, so a function that reads changing
    globals sees their current values. (A `lambda` written inline in each call
    is a new function each time, so it is traced and compiled each time under
    either rule.)

    The setting is a context variable: it holds in this thread (or task) until
    the block ends, also when the block raises.

    **Returns:**

    A context manager; it yields `None`.
    """
    token = _UNCACHED.set(True)
    try:
        yield
    finally:
        _UNCACHED.reset(token)


def may_cache(*trees: object) -> bool:
    """Whether an entry point may call its `filter_jit`-compiled core with `trees`.

    No inside `uncached()`, or when a non-array part is unhashable (a set, an
    object with `__eq__` but no `__hash__`): `filter_jit` keys its cache on them.
    """
    if _UNCACHED.get():
        return False
    static = eqx.filter(trees, eqx.is_array, inverse=True)
    leaves, treedef = jax.tree.flatten(static)
    try:
        hash(treedef)
        hash(tuple(leaves))
    except TypeError:
        return False
    return True


_T = TypeVar("_T")


def once_per_shapes(check: Callable[..., _T]) -> Callable[..., _T]:
    """`check(*args)` (a trace-time check such as a `jax.eval_shape` of the user's
    function) run once per function and argument shapes, as `jax.jit` traces once.

    The result is remembered (the last 256) under the key `filter_jit` would use:
    the non-array parts of `args` (a function by identity) and the shapes and
    dtypes of their arrays. Not remembered inside `uncached()` or for unhashable
    arguments. An exception raised by `check` is not remembered: the next call
    runs it again.

    **Arguments:**

    - `check`: the check, called with positional arguments only.

    **Returns:**

    A function of the same positional arguments that returns `check`'s result,
    calling `check` only for a key it has not seen (among the last 256).
    """
    results: OrderedDict = OrderedDict()

    @ft.wraps(check)
    def wrapped(*args):
        if not may_cache(*args):
            return check(*args)
        dynamic, static = eqx.partition(args, eqx.is_array)
        leaves, treedef = jax.tree.flatten(static)
        arrays, structure = jax.tree.flatten(dynamic)
        key = (treedef, tuple(leaves), structure, tuple((a.shape, a.dtype) for a in arrays))
        if key in results:
            results.move_to_end(key)
            return results[key]
        out = results[key] = check(*args)
        if len(results) > 256:
            results.popitem(last=False)
        return out

    return wrapped
