"""Changing a layer's solve settings: `layer.with_settings(solver=..., ...)`.

The equilibrium layers keep their solve settings (`solver`, `adjoint`,
`max_steps`, `throw`, ...) as static fields: they are configuration, not
weights, so `eqx.tree_serialise_leaves` never writes or overwrites them, and a
change of solver recompiles instead of silently reusing a compiled loop. The
price is that `eqx.tree_at` cannot reach them (it walks leaves only); this is
the way to change them instead, validated by the same code as the constructor.
"""

import copy
from typing import ClassVar, Self

import equinox as eqx


class AbstractConfigurable(eqx.Module):
    """A layer whose solve settings can be replaced after construction.

    Subclasses name the settings in `settings` and validate and store them in
    `_configure(**settings)` (through `_store`), which their `__init__` calls too.
    """

    settings: ClassVar[tuple[str, ...]] = ()

    def _configure(self, **settings) -> None:  # pragma: no cover  (abstract)
        raise NotImplementedError

    def _store(self, name: str, value) -> None:
        # Works inside `__init__` and on the copy `with_settings` makes.
        object.__setattr__(self, name, value)

    def with_settings(self, **changes) -> Self:
        """A copy of this layer with some solve settings replaced (weights shared).

        ```python
        fast = deq.with_settings(solver=fp.solvers.Picard(1e-3, 1e-3), max_steps=20)
        ```

        The names are the constructor's (`type(layer).settings` lists them) and
        the values are checked as the constructor checks them (`None` means the
        constructor's default where it has one). A static setting is part of the
        compiled function's identity: give a function such as `normalise` once
        (a module-level function, not a new `lambda` per call), or every
        new value compiles again.
        """
        unknown = sorted(set(changes) - set(self.settings))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.with_settings: {', '.join(map(repr, unknown))} "
                f"{'is not a setting' if len(unknown) == 1 else 'are not settings'}; the "
                f"settings are {', '.join(self.settings)}. Weights change with "
                "`equinox.tree_at`; sizes and structure need a new layer."
            )
        new = copy.copy(self)
        current = {name: getattr(self, name) for name in self.settings}
        new._configure(**{**current, **changes})
        return new
