"""A map given block by block: the per-player form of a game's best responses.

`Blockwise` is what a user writes: called whole it is an ordinary `fn`, so every
solver accepts it; `solvers.BestResponse` with a sequential or random order
updates one block at a time and reaches each block's function through
`Problem.evaluate_block`, so a sweep costs one evaluation of each block instead
of one whole evaluation per block.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._checks import outputs_as_arrays
from ._custom_types import Args, Y


def block_keys(y: Any) -> list:
    """The top-level keys of a tuple, list, namedtuple, dict or `OrderedDict` `y`, in
    JAX's flattening order (so `ravel_pytree`'s): dict keys (sorted for a dict,
    in insertion order for an `OrderedDict`), else positions."""
    paths = jax.tree_util.tree_flatten_with_path(y, is_leaf=lambda x: x is not y)[0]
    keys = []
    for path, _ in paths:
        entry = path[0]
        keys.append(entry.key if isinstance(entry, jax.tree_util.DictKey) else len(keys))
    return keys


def is_blocks(y: Any) -> bool:
    """Whether `y` is a non-empty tuple, list or dict (of blocks)."""
    return isinstance(y, (tuple, list, dict)) and len(y) > 0


def blocks_of(y: Any) -> tuple[tuple[int, int], ...] | None:
    """The flat slices `(start, stop)` of `y`'s top-level blocks (the children of a
    tuple, list or dict, in JAX's flattening order, which is `ravel_pytree`'s), or
    `None` if `y` is not one."""
    if not is_blocks(y):
        return None
    parts = jax.tree_util.tree_flatten(y, is_leaf=lambda x: x is not y)[0]
    sizes = [int(sum(np.size(leaf) for leaf in jax.tree.leaves(p))) for p in parts]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return tuple((int(bounds[i]), int(bounds[i + 1])) for i in range(len(sizes)))


class Blockwise(eqx.Module):
    """A map whose state is a tuple or dict of blocks, given one function per block.

    `Blockwise(fns)(y, args)` has the structure of `y`, block `k` being
    `fns[k](y, args)`: each function sees the whole state and returns its own
    block (a player's best response to the others). Pass it as the `fn` of
    `fixpoint.fixed_point`; every solver accepts it (called whole, it evaluates
    every block), and `fixpoint.solvers.BestResponse` with
    `order="sequential"` or `"random"` evaluates one block per update, so a
    sweep over `K` blocks costs one evaluation of each (with a plain `fn`, a
    sweep costs `K` whole evaluations).

    ```python
    def player_1(y, args):
        return best_response(y[1], args)  # y = (y_1, y_2)

    fn = fixpoint.Blockwise((player_1, player_2))
    ```

    **Arguments:**

    - `fns`: a tuple, list or dict of functions `fns[k](y, args) -> block_k`,
      with the top-level structure of `y` (the same keys for a dict); each
      output has the structure, shapes and dtypes of `y`'s block `k`. No
      auxiliary output: `has_aux=True` is refused.
    """

    fns: Any

    def __check_init__(self):
        if not isinstance(self.fns, (tuple, list, dict)) or len(self.fns) == 0:
            raise TypeError(
                "Blockwise: `fns` must be a non-empty tuple, list or dict of functions, "
                f"one per block, got {type(self.fns).__name__}."
            )
        for k in self.fns if isinstance(self.fns, dict) else range(len(self.fns)):
            if not callable(self.fns[k]):
                raise TypeError(f"Blockwise: `fns[{k!r}]` must be callable, got {self.fns[k]!r}.")

    def __call__(self, y: Y, args: Args) -> Y:
        """Every block's function at `y`.

        **Arguments:**

        - `y`: the state, a tuple, list or dict of blocks.
        - `args`: passed on to each block's function.

        **Returns:**

        A pytree like `y`, block `k` being `fns[k](y, args)`.
        """
        _, treedef = jax.tree_util.tree_flatten(y, is_leaf=lambda x: x is not y)
        return jax.tree_util.tree_unflatten(treedef, [self.fns[k](y, args) for k in block_keys(y)])


class FlatBlock(eqx.Module):
    """One block's function on flat vectors: `(y_flat, args) -> block_flat` (to be hoisted)."""

    fn: Callable
    unravel: Callable = eqx.field(static=True)
    what: str = eqx.field(static=True)

    def __call__(self, y, args):
        return ravel_pytree(outputs_as_arrays(self.fn(self.unravel(y), args), self.what))[0]


class FlatBlockwise(eqx.Module):
    """A `Blockwise` on flat vectors, as `Problem.fn`: `(y_flat, args) -> (out, None)`.

    `blocks` are the hoisted `FlatBlock`s, in `ravel_pytree`'s order; their
    closed-over arrays are leaves, so gradients reach them through the whole
    call and the single blocks alike.
    """

    blocks: tuple

    def block(self, y, args, k: int):
        """Block `k`'s output, flat."""
        return self.blocks[k](y, args)

    def __call__(self, y, args):
        return jnp.concatenate([b(y, args) for b in self.blocks]).astype(y.dtype), None
