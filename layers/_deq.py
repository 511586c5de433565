"""`DEQ`: a deep equilibrium layer over any Equinox module `f(z, x)`."""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

import fixpoint
from fixpoint import internal, solvers

from ._settings import AbstractConfigurable


class _Apply(eqx.Module):
    """`f(z, x)` (times the dropout mask) with everything it uses in `args`: an
    Equinox module, so `fixed_point` may reuse its compiled loop across calls."""

    def __call__(self, z, args):
        f, x, mask = args
        out = f(z, x)
        return out if mask is None else out * mask


_apply = _Apply()


_BATCH_HINT = (
    " If `x` is a batch: a DEQ solves for one input, so map it over the batch with "
    "`jax.vmap(deq)(xs)`."
)


def _shape(z_shape):
    if z_shape is None:
        return None
    if isinstance(z_shape, (int, np.integer)) and not isinstance(z_shape, bool):
        z_shape = (z_shape,)
    if not isinstance(z_shape, (tuple, list)) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in z_shape
    ):
        raise TypeError(f"DEQ: `z_shape` must be a tuple of ints (or an int), got {z_shape!r}.")
    return tuple(int(d) for d in z_shape)


class DEQ(AbstractConfigurable):
    """A deep equilibrium layer: `z* = f(z*, x)`, differentiated implicitly.

    `deq(x)` returns the equilibrium for one input (use `jax.vmap` for a batch:
    every sample converges, and is reported, on its own). `deq.solve(x)` returns
    the whole `fixpoint.Solution`, with `stats["num_steps"]`, `stats["residual"]`
    and `result` per sample.

    Bai, Kolter & Koltun, *Deep Equilibrium Models*, NeurIPS 2019.

    **Arguments:**

    - `f`: an Equinox module (or any callable pytree) called as `f(z, x)`.

    Keyword-only:

    - `solver`: any solver from `solvers` (default `Anderson(1e-4, 1e-4)`).
    - `adjoint`: any adjoint from `fixpoint` (default `ImplicitAdjoint()`).
    - `max_steps`: the solver's step budget (default 50).
    - `throw`: raise on a failed forward solve (`True`, default), or return the last
      iterate with its result code (`False`: read `deq.solve(x).result`; a failed
      solve is never silent in the stats).
    - `z_shape`: the shape of `z`; default: the shape of `x`.
    - `dropout`: variational dropout rate in `[0, 1)` (default 0): one mask per
      forward pass (per sample), applied to `f`'s output at every iteration, so
      the map stays the same map during the solve. Needs `key=` in training;
      pass `inference=True` to turn it off.
    - `normalise`: a function applied to `f` once per forward pass before the
      solve, e.g. `fixpoint.layers.spectral_norm` (gradients flow through it);
      `None` (default): none.
    - `compaction`: as for `fixpoint.fixed_point`: under `jax.vmap`, samples
      that have converged stop costing (default `fixpoint.Compaction()`;
      `None`: off).

    The settings (`solver` … `compaction`) are static fields: checkpoints never
    hold them, and `deq.with_settings(solver=..., max_steps=...)` returns a copy
    with new ones (the weights shared).

    To split a batch over several devices, wrap the loss in
    `fixpoint.data_parallel`: each device then solves (and compacts) its own share.
    """

    f: Callable
    solver: internal.AbstractSolver = eqx.field(static=True)
    adjoint: fixpoint.AbstractAdjoint = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    z_shape: tuple[int, ...] | None = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    normalise: Callable | None = eqx.field(static=True)
    compaction: fixpoint.Compaction | None = eqx.field(static=True)
    settings: ClassVar[tuple[str, ...]] = (
        "solver",
        "adjoint",
        "max_steps",
        "throw",
        "dropout",
        "normalise",
        "compaction",
    )

    def __init__(
        self,
        f: Callable,
        *,
        solver: internal.AbstractSolver | None = None,
        adjoint: fixpoint.AbstractAdjoint | None = None,
        max_steps: int = 50,
        throw: bool = True,
        z_shape: tuple[int, ...] | None = None,
        dropout: float = 0.0,
        normalise: Callable | None = None,
        compaction: fixpoint.Compaction | None = fixpoint.Compaction(),
    ):
        if not callable(f):
            raise TypeError(f"DEQ: `f` must be callable as f(z, x), got {f!r}.")
        self.f = f
        self.z_shape = _shape(z_shape)
        self._configure(
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
            dropout=dropout,
            normalise=normalise,
            compaction=compaction,
        )

    def _configure(self, *, solver, adjoint, max_steps, throw, dropout, normalise, compaction):
        solver = solvers.Anderson(1e-4, 1e-4) if solver is None else solver
        adjoint = fixpoint.ImplicitAdjoint() if adjoint is None else adjoint
        internal.check_instance(solver, internal.AbstractSolver, "solver", owner="DEQ")
        internal.check_instance(adjoint, fixpoint.AbstractAdjoint, "adjoint", owner="DEQ")
        self._store("solver", solver)
        self._store("adjoint", adjoint)
        self._store("max_steps", internal.check_int(max_steps, "max_steps", 1, owner="DEQ"))
        self._store("throw", internal.check_bool(throw, "throw", owner="DEQ"))
        self._store("dropout", internal.check_number(dropout, "dropout", "[0, 1)", owner="DEQ"))
        if normalise is not None and not callable(normalise):
            raise TypeError(f"DEQ: `normalise` must be None or callable, got {normalise!r}.")
        self._store("normalise", normalise)
        internal.check_compaction(compaction, "DEQ: `compaction`")
        self._store("compaction", compaction)

    def prepared(self) -> Callable:
        """`f` after `normalise` (what one forward pass iterates).

        **Returns:**

        `normalise(f)`, or `f` itself without `normalise`.
        """
        return self.f if self.normalise is None else self.normalise(self.f)

    def mask(
        self, z0: Array, key: PRNGKeyArray | None, inference: bool
    ) -> Float[Array, "..."] | None:
        """The variational dropout mask of one forward pass (or `None`).

        **Arguments:**

        - `z0`: the starting state; the mask has its shape and dtype.
        - `key`: the PRNG key of this pass (needed when `dropout > 0`).
        - `inference`: `True` turns dropout off.

        **Returns:**

        `None` when `dropout == 0` or `inference`; else a mask of kept entries
        scaled by `1 / (1 - dropout)`.

        **Raises:**

        `ValueError` when `dropout > 0`, not `inference`, and no `key`.
        """
        if self.dropout == 0 or inference:
            return None
        if key is None:
            raise ValueError("DEQ: `dropout > 0` needs `key=` (or `inference=True`).")
        keep = jax.random.bernoulli(key, 1 - self.dropout, z0.shape)
        return keep.astype(z0.dtype) / (1 - self.dropout)

    def initial(self, x: Array, z0: Array | None) -> Array:
        """The starting state: `z0` if given, else zeros.

        **Arguments:**

        - `x`: the input (floating point); the zeros take its dtype, and its
          shape unless `z_shape` is set.
        - `z0`: a starting state, or `None`.

        **Returns:**

        `z0`, or zeros of shape `z_shape` (default `x.shape`) and `x`'s dtype.
        """
        if z0 is not None:
            return z0
        x_dtype = getattr(x, "dtype", None)
        if x_dtype is None or not jnp.issubdtype(x_dtype, jnp.floating):
            raise TypeError(
                f"DEQ: `x` must be a floating-point array (the state `z` takes its dtype), "
                f"got {type(x).__name__} with dtype {x_dtype}. Cast it, e.g. "
                "`x.astype(jnp.float32)`, or pass a float `z0`."
            )
        shape = x.shape if self.z_shape is None else self.z_shape
        return jnp.zeros(shape, x.dtype)

    def check(self, f: Callable, x: Array, z0: Array) -> None:
        """Trace-time check that `f(z, x)` accepts `z0` and returns its shape and dtype
        (once per `f` and shapes: a repeated call does not trace `f` again).

        **Arguments:**

        - `f`: the (prepared) map.
        - `x`: the input.
        - `z0`: the starting state.

        **Raises:**

        `ValueError` naming the shapes when the call fails or changes the shape
        or dtype of `z`.
        """
        _check_f(self.z_shape is not None, f, x, z0)

    def solve(
        self,
        x: Array,
        z0: Array | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        record_residuals: bool = False,
        max_steps: int | Int[Array, ""] | None = None,
    ) -> fixpoint.Solution:
        """Solve for the equilibrium of one input; returns the `fixpoint.Solution`.

        **Arguments:**

        - `x`: one input (floating point).
        - `z0`: the starting state (warm start); default zeros (see `initial`).
        - `key`: the PRNG key for dropout (needed when `dropout > 0`).
        - `inference`: turn dropout off (default `False`).
        - `record_residuals`: also record `stats["residual_history"]` (default
          `False`).
        - `max_steps`: this call's step budget instead of the layer's; an
          integer array is a run-time budget, which a training schedule may
          change between calls of a compiled step without compiling again (see
          `fixpoint.fixed_point`). `None` (default): the layer's `max_steps`.

        **Returns:**

        A `fixpoint.Solution` whose `value` is `z*`.
        """
        z0 = self.initial(x, z0)
        f = self.prepared()
        self.check(f, x, z0)
        args = (f, x, self.mask(z0, key, inference))
        return self._fixed_point(_apply, z0, args, max_steps, record_residuals)

    def _fixed_point(self, fn, z0, args, max_steps, record_residuals) -> fixpoint.Solution:
        """`fixpoint.fixed_point(fn, z0, args)` with this layer's solve settings (and
        this call's `max_steps`, if given)."""
        return fixpoint.fixed_point(
            fn,
            z0,
            args,
            solver=self.solver,
            adjoint=self.adjoint,
            max_steps=self.max_steps if max_steps is None else max_steps,
            throw=self.throw,
            record_residuals=record_residuals,
            compaction=self.compaction,
        )

    def __call__(
        self,
        x: Array,
        z0: Array | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        max_steps: int | Int[Array, ""] | None = None,
    ) -> Array:
        """The equilibrium `z*` for one input `x`.

        **Arguments:**

        - `x`: one input (floating point).
        - `z0`: the starting state; default zeros.
        - `key`: the PRNG key for dropout (needed when `dropout > 0`).
        - `inference`: turn dropout off (default `False`).
        - `max_steps`: this call's step budget (a run-time budget if an integer
          array), as in `solve`; `None` (default): the layer's.

        **Returns:**

        `z*`, the shape of `z0` (`z_shape`, default `x.shape`).
        """
        return self.solve(x, z0, key=key, inference=inference, max_steps=max_steps).value


class FixedMapDEQ(DEQ):
    """A `DEQ` subclass whose map is built in: its own default solver, no dropout.

    Subclasses set `default_solver` and `no_dropout_reason` (class attributes).
    Not public: the layers built on it document their settings themselves.
    """

    default_solver: ClassVar[internal.AbstractSolver]
    no_dropout_reason: ClassVar[str]

    def __init__(self, f: Callable, **settings):
        super().__init__(f, **settings)

    def _configure(self, *, solver, adjoint, max_steps, throw, dropout, normalise, compaction):
        if dropout:
            raise ValueError(
                f"{type(self).__name__}: `dropout` must be 0 ({self.no_dropout_reason}), "
                f"got {dropout!r}."
            )
        super()._configure(
            solver=self.default_solver if solver is None else solver,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
            dropout=0.0,
            normalise=normalise,
            compaction=compaction,
        )


@internal.once_per_shapes
def _check_f(z_shape_given: bool, f: Callable, x: Array, z0: Array) -> None:
    where = "`z_shape`" if z_shape_given else "`x`'s shape (no `z_shape` given)"
    try:
        out = eqx.filter_eval_shape(f, z0, x)
    except Exception as e:
        raise ValueError(
            f"DEQ: calling `f(z, x)` with `z` of shape {tuple(z0.shape)} (from {where}) "
            f"and `x` of shape {tuple(jnp.shape(x))} failed. If the state has another "
            "shape than the input, pass `z_shape=` (or `z0=`)." + _BATCH_HINT
        ) from e
    if getattr(out, "shape", None) != z0.shape or getattr(out, "dtype", None) != z0.dtype:
        raise ValueError(
            f"DEQ: `f(z, x)` must return the shape and dtype of `z`: `z` is "
            f"{z0.dtype}{list(z0.shape)} (from {where}), `f` returned "
            f"{getattr(out, 'dtype', type(out).__name__)}{list(getattr(out, 'shape', []))}. "
            "Pass `z_shape=` with the shape `f` returns." + _BATCH_HINT
        )
