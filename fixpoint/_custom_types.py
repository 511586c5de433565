"""Type aliases shared across fixpoint."""

from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeAlias

from jaxtyping import Array, Bool, Float, PyTree

Y: TypeAlias = PyTree[Array]
Args: TypeAlias = PyTree[Any]
Aux: TypeAlias = PyTree[Any]
FlatY: TypeAlias = Float[Array, " n"]
Fn: TypeAlias = Callable[[Y, Args], Any]
Norm: TypeAlias = Callable[[Float[Array, " n"]], Float[Array, ""]]
# A tolerance: a static Python float, or a traced scalar where a loop scales one
# (the scan adjoint's `atol`).
Tolerance: TypeAlias = float | Float[Array, ""]

# What an adjoint works with (`AbstractAdjoint.apply`): the problem in flat form,
# `inputs` being every array a gradient may flow to.
Inputs: TypeAlias = PyTree[Any]
Rest: TypeAlias = PyTree[Any]  # what the forward loop returns besides `y` (codes, stats)
Loop: TypeAlias = Literal["lax", "checkpointed"]
Primal: TypeAlias = Callable[[Inputs, FlatY, Loop, int | None], tuple[FlatY, Rest]]
Residual: TypeAlias = Callable[[FlatY, Inputs], FlatY]
Failed: TypeAlias = Callable[[FlatY, Rest, Inputs], Bool[Array, ""]]
# `solve(matvec, b, transpose_of=None) -> x` for `lax.custom_linear_solve` (`_linear.py`).
LinearSolve: TypeAlias = Callable[..., FlatY]


class HasTolerances(Protocol):
    """A solver with tolerance fields, as `fixpoint.internal.check_tolerances` reads them:
    `rtol`, `atol` (a number, or `None` for a default) and `norm` (a callable).

    The fields are `Any` here because their values are what is being checked,
    and because pyright sees an Equinox field with a `converter` as a descriptor
    that matches no narrower protocol member.
    """

    rtol: Any
    atol: Any
    norm: Any
