"""A solve in flat form: both the fixed-point map and the residual of one problem.

Every solver sees the problem through `Problem.evaluate`, which returns the
fixed-point form `f(y)` and the root form `G(y)` from one call of the user's
function. The conventions, chosen so that converting twice is the identity:

- `fixed_point(f)`: `G(y) = y - f(y)`;
- `root_find(g)`: `G(y) = g(y)` and the fixed-point map is `f(y) = y - g(y)`
  (Richardson iteration).
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
from jaxtyping import Array, Float, Int

from ._custom_types import Args, Aux


class Evaluation(eqx.Module):
    """`fn` evaluated at one iterate `y`, in both forms (`Problem.evaluate`).

    **Arguments:**

    - `fy`: the fixed-point map `f(y)`, flat, shape `(n,)`.
    - `residual`: the root form `G(y)`, flat, shape `(n,)`; zero at the solution.
    - `aux`: the auxiliary output of `fn` at `y` (`None` without `has_aux`).
    """

    fy: Float[Array, " n"]  # the fixed-point map f(y)
    residual: Float[Array, " n"]  # the root form G(y); zero at the solution
    aux: Any


class Problem(eqx.Module):
    """`fn(y_flat, args) -> (out_flat, aux)` together with which form `out` is in.

    What every solver is handed: it evaluates the problem through `evaluate`
    (both forms from one call of `fn`) or `residual` (the root form only).

    **Arguments:**

    - `fn`: `fn(y_flat, args) -> (out_flat, aux)`, the user's function on flat
      vectors.
    - `kind`: `"fixed_point"` (`out` is `f(y)`, and `G(y) = y - f(y)`) or
      `"root"` (`out` is `G(y)`, and `f(y) = y - G(y)`).
    - `blocks`: where `y0` is a tuple, list or dict of blocks (players), the flat
      slices `(start, stop)` of its top-level blocks, in the flat vector's
      order; else `None` (default). Solvers that update block by block
      (`solvers.BestResponse`) read it.
    """

    fn: Callable
    kind: Literal["fixed_point", "root"] = eqx.field(static=True)
    blocks: tuple[tuple[int, int], ...] | None = eqx.field(default=None, static=True)

    def evaluate(self, y: Float[Array, " n"], args: Args) -> Evaluation:
        """Call `fn` once at `y` and return both forms.

        **Arguments:**

        - `y`: the iterate, flat, shape `(n,)`.
        - `args`: the user's `args`, passed on to `fn`.

        **Returns:**

        An `Evaluation`: `f(y)`, `G(y)` and `fn`'s auxiliary output.
        """
        out, aux = self.fn(y, args)
        if self.kind == "fixed_point":
            return Evaluation(fy=out, residual=y - out, aux=aux)
        return Evaluation(fy=y - out, residual=out, aux=aux)

    def residual(self, y: Float[Array, " n"], args: Args) -> tuple[Float[Array, " n"], Aux]:
        """`(G(y), aux)`: the root form, e.g. for Jacobians.

        **Arguments:**

        - `y`: the iterate, flat, shape `(n,)`.
        - `args`: the user's `args`, passed on to `fn`.

        **Returns:**

        `(G(y), aux)`: the root form (shape `(n,)`) and `fn`'s auxiliary output.
        """
        out, aux = self.fn(y, args)
        if self.kind == "fixed_point":
            return y - out, aux
        return out, aux

    def evaluate_block(
        self, y: Float[Array, " n"], args: Args, k: int
    ) -> tuple[Float[Array, " m"], Aux]:
        """Block `k` of the fixed-point map `f(y)`, flat, and `fn`'s auxiliary output.

        With `fn` a `fixpoint.Blockwise`, only block `k`'s function is called (no
        auxiliary output: `None`); otherwise `fn` is evaluated whole and block
        `k` kept. Refused (a `TypeError` at trace time) without `blocks`.

        **Arguments:**

        - `y`: the iterate, flat, shape `(n,)`.
        - `args`: the user's `args`.
        - `k`: which block, a Python int in `[0, len(blocks))`.

        **Returns:**

        `(f(y)_k, aux)`: the block's slice of the fixed-point form (for
        `root_find`, `y_k − g(y)_k`), and the auxiliary output (`None` for a
        `Blockwise`).
        """
        if self.blocks is None:
            raise TypeError(
                "this solver updates one block at a time: `y0` must be a tuple, list or "
                "dict of blocks."
            )
        a, b = self.blocks[k]
        block = getattr(self.fn, "block", None)
        if block is None:
            ev = self.evaluate(y, args)
            return ev.fy[a:b], ev.aux
        out = block(y, args, k)
        return (out if self.kind == "fixed_point" else y[a:b] - out), None

    @property
    def num_components(self) -> int | None:
        """The number of components `n` when `fn` is a `fixpoint.FiniteSum`, else `None`.

        **Returns:**

        An `int` (static), or `None` for a problem that is not a finite sum.
        """
        return getattr(self.fn, "num_components", None)

    def evaluate_components(
        self, y: Float[Array, " n"], args: Args, indices: Int[Array, " b"]
    ) -> Float[Array, "b n"]:
        """Components of a finite sum at `y`, in the problem's own form.

        For `fixed_point` the rows are the maps `T_i(y)`, for `root_find` the
        operators `F_i(y)`; their mean over every `i` is what `evaluate` calls
        `out`. Refused (a `TypeError` at trace time) unless `fn` is a
        `fixpoint.FiniteSum`.

        **Arguments:**

        - `y`: the iterate, flat, shape `(n,)`.
        - `args`: the user's `args`.
        - `indices`: which components, an integer array of shape `(b,)` with
          values in `[0, num_components)`.

        **Returns:**

        The components' outputs, flat and stacked: shape `(b, n)`.
        """
        if self.num_components is None:
            raise TypeError(
                "this solver evaluates the components of a finite sum one at a time: "
                "pass `fn` as a `fixpoint.FiniteSum(component, num_components)`."
            )
        return self.fn.components(y, args, indices)  # pyright: ignore[reportAttributeAccessIssue]
