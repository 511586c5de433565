"""Type aliases shared across fixpoint."""

from collections.abc import Callable
from typing import Any, TypeAlias

from jaxtyping import Array, Float, PyTree

Y: TypeAlias = PyTree[Array]
Args: TypeAlias = PyTree[Any]
Aux: TypeAlias = PyTree[Any]
FlatY: TypeAlias = Float[Array, " n"]
Fn: TypeAlias = Callable[[Y, Args], Any]
Norm: TypeAlias = Callable[[Float[Array, " n"]], Float[Array, ""]]
