"""Trace-time validation with messages that name the offending argument."""

import re
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def as_float_pytree(y0, name: str = "y0"):
    """Convert the leaves of `y0` to arrays; every leaf must be floating point."""
    leaves, treedef = jax.tree.flatten(y0)
    if not leaves:
        raise ValueError(f"`{name}` must contain at least one array; got an empty pytree.")
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(y0)[0]:
        if not eqx.is_array_like(leaf):
            raise TypeError(
                f"`{name}{jax.tree_util.keystr(path)}` must be an array or number, "
                f"got {type(leaf).__name__}."
            )
        arr = jnp.asarray(leaf)
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(
                f"`{name}{jax.tree_util.keystr(path)}` has dtype {arr.dtype}; fixpoint "
                "solves over real floating-point values. Cast it, e.g. "
                f"`{name}.astype(jnp.float32)`."
            )
        out.append(arr)
    return jax.tree.unflatten(treedef, out)


def outputs_as_arrays(out, what: str = "fn(y, args)"):
    """`out` with Python numbers turned into arrays; anything else that is not an
    array (a string, an object) is an error naming where it sits in `out`."""

    def convert(path, leaf):
        if eqx.is_array(leaf):
            return leaf
        if eqx.is_array_like(leaf):
            return jnp.asarray(leaf)
        raise TypeError(
            f"`{what}` must return arrays (or Python numbers); at "
            f"`{what}{jax.tree_util.keystr(path)}` it returned {type(leaf).__name__} "
            f"{leaf!r:.60}."
        )

    return jax.tree_util.tree_map_with_path(convert, out)


def check_output(
    out_struct,
    y0,
    has_aux: bool,
    name: str,
    fn: str = "`fn`",
    call: str = "fn(y0, args)",
    root: str = "y0",
):
    """Check that `fn(y0, args)` has the structure, shapes and dtypes of `y0`
    (`fn` and `call` name the function and the call in the messages, `root`
    what `y0` is, e.g. `y0[1]` for one block)."""
    if has_aux:
        if not (isinstance(out_struct, tuple) and len(out_struct) == 2):
            raise ValueError(
                f"`{name}` was called with `has_aux=True`, so `fn` must return a "
                f"pair `(y, aux)`; it returned {_describe(out_struct)}."
            )
        out_struct = out_struct[0]
    y_struct = jax.tree.structure(y0)
    o_struct = jax.tree.structure(out_struct)
    if y_struct != o_struct:
        hint = (
            " (did you forget `has_aux=True`?)"
            if isinstance(out_struct, tuple) and len(out_struct) == 2 and call == "fn(y0, args)"
            else ""
        )
        raise ValueError(
            f"{fn} must return a pytree with the same structure as `{root}`{hint}.\n"
            f"  {root}: {y_struct}\n  {call}: {o_struct}"
        )
    for (path, y), o in zip(
        jax.tree_util.tree_flatten_with_path(y0)[0], jax.tree.leaves(out_struct), strict=True
    ):
        where = f"{root}{jax.tree_util.keystr(path)}"
        if tuple(o.shape) != tuple(y.shape):
            raise ValueError(
                f"{fn} changed the shape of `{where}`: {root} has shape {tuple(y.shape)}, "
                f"{call} has shape {tuple(o.shape)}."
            )
        if o.dtype != y.dtype:
            raise TypeError(
                f"{fn} changed the dtype of `{where}`: {root} has dtype {y.dtype}, "
                f"{call} has dtype {o.dtype}. Make {fn} return the dtype it is "
                "given (or cast `y0`)."
            )


def as_python_number(value: Any) -> Any:
    """A NumPy scalar (`np.float32(0.5)`, `np.int64(5)`, `np.bool_(True)`) as the
    Python number it holds; anything else unchanged, for a validator to judge.

    Use it as an option field's converter (`eqx.field(default=1.0,
    converter=as_python_number)`): an option then never carries a NumPy dtype
    into the computation (a `np.float64` option would promote float32 iterates).

    **Arguments:**

    - `value`: anything.

    **Returns:**

    `bool`, `int` or `float` for a NumPy bool, integer or floating scalar;
    otherwise `value` itself.
    """
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _who(name: str, owner: str | None) -> str:
    return f"{owner}: `{name}`" if owner else f"`{name}`"


def check_int(
    value: object, name: str, minimum: int | None = None, *, owner: str | None = None
) -> int:
    """`value` as a Python int; a readable error unless it is an integer (Python
    or NumPy, not a bool) of at least `minimum`.

    **Arguments:**

    - `value`: the option to check.
    - `name`: the option's name, for the message.
    - `minimum`: the smallest value allowed; `None` (default): no bound.
    - `owner`: prefixes the message (`"Anderson: `history` must be ..."`);
      `None` (default): no prefix.

    **Returns:**

    `value` as a Python `int`.

    **Raises:**

    `TypeError` if `value` is not an integer; `ValueError` if it is below
    `minimum`.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{_who(name, owner)} must be an int, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{_who(name, owner)} must be an int >= {minimum}, got {value!r}.")
    return int(value)


_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


def check_number(
    value: object, name: str, allowed: str | None = None, *, owner: str | None = None
) -> float | int:
    """`value` as a Python number; a readable error unless it is a real number
    (Python or NumPy, not a bool, not a JAX array) in `allowed`.

    **Arguments:**

    - `value`: the option to check.
    - `name`: the option's name, for the message.
    - `allowed`: an interval, `"(0, 1]"`, `"[0, 1)"`, or a bound, `"> 0"`,
      `">= 0"`, `"<= 1"`, `"< 1"`; `None` (default) admits every real number
      but NaN.
    - `owner`: prefixes the message (e.g. `"Anderson"`); `None`: no prefix.

    **Returns:**

    `value` as a Python `int` or `float`.

    **Raises:**

    `TypeError` if `value` is not a real number; `ValueError` if it lies outside
    `allowed` (or `allowed` cannot be read).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        hint = (
            " (a static option: pass a Python number, not a JAX array)"
            if isinstance(value, jax.Array)
            else ""
        )
        raise TypeError(f"{_who(name, owner)} must be a real number{hint}, got {value!r}.")
    number: float | int = as_python_number(value)
    if allowed is None:
        ok, says = number == number, "must not be NaN"
    elif m := _INTERVAL.match(allowed):
        lo, hi = float(m[2]), float(m[3])
        ok = (lo <= number if m[1] == "[" else lo < number) and (
            number <= hi if m[4] == "]" else number < hi
        )
        says = f"must lie in {allowed}"
    elif m := _BOUND.match(allowed):
        bound = float(m[2])
        ok = {
            ">=": number >= bound,
            ">": number > bound,
            "<=": number <= bound,
            "<": number < bound,
        }[m[1]]
        says = f"must be a number {allowed}"
    else:
        raise ValueError(f"check_number: cannot read the range {allowed!r}.")
    if not ok:
        raise ValueError(f"{_who(name, owner)} {says}, got {number!r}.")
    return number


def check_bool(value: object, name: str, *, owner: str | None = None) -> bool:
    """`value` as a Python bool; a readable error unless it is one (or `np.bool_`).

    **Arguments:**

    - `value`: the option to check.
    - `name`: the option's name, for the message.
    - `owner`: prefixes the message; `None` (default): no prefix.

    **Returns:**

    `value` as a Python `bool`.

    **Raises:**

    `TypeError` unless `value` is a `bool` or `np.bool_`.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{_who(name, owner)} must be a bool, got {value!r}.")
    return bool(value)


def check_instance(value: object, cls: type, name: str, *, owner: str | None = None) -> None:
    """A readable error naming `name` unless `value` is an instance of `cls`.

    **Arguments:**

    - `value`: the option to check.
    - `cls`: the class it must be an instance of (a subclass's instance passes);
      the message names it where users find it (`fixpoint.solvers.X`, ...).
    - `name`: the option's name, for the message.
    - `owner`: prefixes the message; `None` (default): no prefix.

    **Raises:**

    `TypeError` unless `isinstance(value, cls)`.
    """
    if not isinstance(value, cls):
        raise TypeError(
            f"{_who(name, owner)} must be an instance of `{_public_name(cls)}` (or a "
            f"subclass), got {value!r}."
        )


def _public_name(cls: type) -> str:
    """Where users find `cls`: `fixpoint.X`, `fixpoint.internal.X`, ..."""
    for where in ("fixpoint", "fixpoint.internal", "fixpoint.solvers", "fixpoint.layers"):
        module = sys.modules.get(where)
        if module is not None and getattr(module, cls.__name__, None) is cls:
            return f"{where}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(x) -> str:
    return f"{type(x).__name__} {jax.tree.structure(x)}"
