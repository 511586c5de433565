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
from jaxtyping import Array, Float

from ._custom_types import Args, Aux


class Evaluation(eqx.Module):
    """`fn` evaluated at one iterate `y`."""

    fy: Float[Array, " n"]  # the fixed-point map f(y)
    residual: Float[Array, " n"]  # the root form G(y); zero at the solution
    aux: Any


class Problem(eqx.Module):
    """`fn(y_flat, args) -> (out_flat, aux)` together with which form `out` is in."""

    fn: Callable
    kind: Literal["fixed_point", "root"] = eqx.field(static=True)

    def evaluate(self, y: Float[Array, " n"], args: Args) -> Evaluation:
        out, aux = self.fn(y, args)
        if self.kind == "fixed_point":
            return Evaluation(fy=out, residual=y - out, aux=aux)
        return Evaluation(fy=y - out, residual=out, aux=aux)

    def residual(self, y: Float[Array, " n"], args: Args) -> tuple[Float[Array, " n"], Aux]:
        """`(G(y), aux)`: the root form, e.g. for Jacobians."""
        out, aux = self.fn(y, args)
        if self.kind == "fixed_point":
            return y - out, aux
        return out, aux
