"""Trace-time validation with messages that name the offending argument."""

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


def check_output(out_struct, y0, has_aux: bool, name: str):
    """Check that `fn(y0, args)` has the structure, shapes and dtypes of `y0`."""
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
            if isinstance(out_struct, tuple) and len(out_struct) == 2
            else ""
        )
        raise ValueError(
            f"`fn` must return a pytree with the same structure as `y0`{hint}.\n"
            f"  y0:          {y_struct}\n  fn(y0, args): {o_struct}"
        )
    for (path, y), o in zip(
        jax.tree_util.tree_flatten_with_path(y0)[0], jax.tree.leaves(out_struct), strict=True
    ):
        where = f"y0{jax.tree_util.keystr(path)}"
        if tuple(o.shape) != tuple(y.shape):
            raise ValueError(
                f"`fn` changed the shape of `{where}`: y0 has shape {tuple(y.shape)}, "
                f"fn(y0, args) has shape {tuple(o.shape)}."
            )
        if o.dtype != y.dtype:
            raise TypeError(
                f"`fn` changed the dtype of `{where}`: y0 has dtype {y.dtype}, "
                f"fn(y0, args) has dtype {o.dtype}. Make `fn` return the dtype it is "
                "given (or cast `y0`)."
            )


def check_int(value, name: str, minimum: int):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def check_bool(value, name: str):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")


def check_instance(value, cls, name: str):
    if not isinstance(value, cls):
        raise TypeError(
            f"`{name}` must be an instance of `{cls.__module__.split('.')[0]}."
            f"{cls.__name__}` (or a subclass), got {value!r}."
        )


def _describe(x) -> str:
    return f"{type(x).__name__} {jax.tree.structure(x)}"
