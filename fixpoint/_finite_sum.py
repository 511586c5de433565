"""A problem that is a mean of components: `T(y) = (1/n) Σ_i T_i(y)`.

`FiniteSum` is what a user writes: called whole it is an ordinary `fn`, so
every solver accepts it; a solver that samples components (e.g.
`solvers.VarianceReducedHalpern`) reaches them through
`Problem.num_components` and `Problem.evaluate_components`, which the flat
form below provides.
"""

import inspect
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._checks import check_int, outputs_as_arrays
from ._custom_types import Args, Y


class FiniteSum(eqx.Module):
    """A map or operator given as the mean of `num_components` components.

    `FiniteSum(fn, n)(y, args) = (1/n) Σ_{i<n} fn(y, args, i)`. Pass it as the
    `fn` of `fixpoint.fixed_point` (the components are maps `T_i` and the
    problem is `y = mean_i T_i(y)`) or of `fixpoint.root_find` (the components
    are operators `F_i` and the problem is `mean_i F_i(y) = 0`). Every solver
    accepts it: called whole, it evaluates every component (under `jax.vmap`
    over `i`). `fixpoint.solvers.VarianceReducedHalpern` evaluates components
    one at a time and reaches a tolerance with fewer component evaluations than
    the full-batch solvers; see the solver guide.

    ```python
    def component(y, args, i):  # least squares: one row of A y = b per component
        a, b = args
        return y - step * a[i] * (a[i] @ y - b[i])

    sol = fixpoint.fixed_point(fixpoint.FiniteSum(component, n), y0, (a, b), solver=solver)
    ```

    **Arguments:**

    - `fn`: `fn(y, args, i) -> out`, one component; `i` is an integer scalar
      array in `[0, num_components)` (index your data with it). `out` has the
      structure, shapes and dtypes of `y`. No auxiliary output: `has_aux=True`
      is refused.
    - `num_components`: the number of components `n`, an integer `>= 1`.
    """

    fn: Callable
    num_components: int = eqx.field(static=True)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(f"FiniteSum: `fn` must be callable, got {self.fn!r}.")
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):  # a builtin without a signature: not checked
            signature = None
        if signature is not None:
            try:
                signature.bind(None, None, None)
            except TypeError:
                raise TypeError(
                    f"FiniteSum: `fn` must take three arguments, `fn(y, args, i)` (`i` "
                    f"the component's index); its signature is {signature}."
                ) from None
        check_int(self.num_components, "num_components", 1, owner="FiniteSum")

    def __call__(self, y: Y, args: Args) -> Y:
        """The mean of every component at `y`.

        **Arguments:**

        - `y`: the point, a pytree.
        - `args`: passed on to each component.

        **Returns:**

        `(1/n) Σ_i fn(y, args, i)`, a pytree like `y`.
        """
        indices = jnp.arange(self.num_components, dtype=jnp.int32)
        outs = jax.vmap(lambda i: outputs_as_arrays(self.fn(y, args, i), "fn(y, args, i)"))(indices)
        return jax.tree.map(lambda o: jnp.mean(o, axis=0).astype(o.dtype), outs)


class FlatComponent(eqx.Module):
    """One component on flat vectors: `(y_flat, args, i) -> out_flat` (to be hoisted)."""

    fn: Callable
    unravel: Callable = eqx.field(static=True)

    def __call__(self, y, args, i):
        out = outputs_as_arrays(self.fn(self.unravel(y), args, i), "fn(y, args, i)")
        return ravel_pytree(out)[0]


class FlatSum(eqx.Module):
    """A `FiniteSum` on flat vectors, as `Problem.fn`: `(y_flat, args) -> (mean, None)`.

    `component` is the hoisted `FlatComponent`; its closed-over arrays are
    leaves, so gradients reach them through the whole call and the components
    alike.
    """

    component: Callable
    num_components: int = eqx.field(static=True)

    def components(self, y, args, indices):
        """`out_i` for each `i` of `indices` (shape `(b,)`), stacked: shape `(b, n)`."""
        return jax.vmap(lambda i: self.component(y, args, i))(indices)

    def __call__(self, y, args):
        indices = jnp.arange(self.num_components, dtype=jnp.int32)
        return jnp.mean(self.components(y, args, indices), axis=0).astype(y.dtype), None
