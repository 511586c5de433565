"""Recurrent networks evaluated in parallel over time with `fixpoint.scan`."""

import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

import fixpoint
from fixpoint import internal, solvers

from ._settings import AbstractConfigurable


class DiagonalGRUCell(eqx.Module):
    """A GRU whose recurrent weights are diagonal, so its state Jacobian is diagonal.

    `z = σ(W_z x + u_z ⊙ h + b_z)`, `r = σ(W_r x + u_r ⊙ h + b_r)`,
    `n = tanh(W_n x + b_n + r ⊙ (u_n ⊙ h + c_n))`, `h' = (1 - z) ⊙ n + z ⊙ h`.
    Each state dimension depends on the previous state only through itself, so
    `∂h'/∂h` is diagonal and quasi-DEER with `assume_diagonal=True` *is* Newton's
    method (the construction of ParaRNN, Danieli et al. 2025). Dimensions mix
    through the inputs (and through stacked layers).

    Called as `cell(x, h)`, like `equinox.nn.GRUCell`. The GRU: Cho, van
    Merriënboer, Gulcehre, Bahdanau, Bougares, Schwenk & Bengio, *Learning Phrase
    Representations using RNN Encoder–Decoder for Statistical Machine
    Translation*, EMNLP 2014.

    **Arguments:**

    - `input_size`: the width of `x`.
    - `hidden_size`: the width of the state `h`.

    Keyword-only:

    - `key`: the PRNG key for the initial parameters (uniform, as
      `equinox.nn.GRUCell`; the diagonal recurrent weights in `[-1, 1]`).
    - `dtype`: the parameters' dtype (default float32).
    """

    weight_ih: Float[Array, "gates input"]
    weight_hh: Float[Array, " gates"]
    bias: Float[Array, " gates"]
    bias_n: Float[Array, " hidden"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    diagonal_jacobian: ClassVar[bool] = True

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        key: PRNGKeyArray,
        dtype: DTypeLike | None = None,
    ):
        dtype = jnp.float32 if dtype is None else dtype
        k1, k2, k3, k4 = jax.random.split(key, 4)
        bound = 1 / math.sqrt(hidden_size)
        uniform = lambda k, shape, b: jax.random.uniform(k, shape, dtype, -b, b)  # noqa: E731
        self.weight_ih = uniform(k1, (3 * hidden_size, input_size), bound)
        self.weight_hh = uniform(k2, (3 * hidden_size,), 1.0)
        self.bias = uniform(k3, (3 * hidden_size,), bound)
        self.bias_n = uniform(k4, (hidden_size,), bound)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def __call__(
        self, x: Float[Array, " input"], h: Float[Array, " hidden"]
    ) -> Float[Array, " hidden"]:
        """One step of the cell.

        **Arguments:**

        - `x`: the input, `float[input_size]`.
        - `h`: the state, `float[hidden_size]`.

        **Returns:**

        The next state `h'`, `float[hidden_size]`.
        """
        gx = self.weight_ih @ x + self.bias
        uz, ur, un = jnp.split(self.weight_hh, 3)
        gz, gr, gn = jnp.split(gx, 3)
        z = jax.nn.sigmoid(gz + uz * h)
        r = jax.nn.sigmoid(gr + ur * h)
        n = jnp.tanh(gn + r * (un * h + self.bias_n))
        return (1 - z) * n + z * h


class _Step(eqx.Module):
    """`cell(x, h)` as a scan step `(h, x) -> (h_next, None)`."""

    cell: Callable

    def __call__(self, h, x):
        return self.cell(x, h), None


class ParallelRNN(AbstractConfigurable):
    """Run `cell(x, h) -> h` over a whole sequence, solved in parallel over time.

    Equal to the sequential loop `h_t = cell(x_t, h_{t-1})` to the solver's
    tolerance, and differentiable by the implicit rule of `fixpoint.scan`.

    Parallel evaluation by Newton's method over time: Lim, Zhu, Selfridge &
    Kasim, *Parallelizing non-linear sequential models over the sequence
    length*, ICLR 2024 (DEER); Gonzalez, Warrington, Smith & Linderman, *Towards
    Scalable and Stable Parallelization of Nonlinear RNNs*, NeurIPS 2024
    (quasi-DEER).

    **Arguments:**

    - `cell`: `equinox.nn.GRUCell`, `equinox.nn.LSTMCell` (its state is the pair
      `(h, c)`), `DiagonalGRUCell`, or any callable `cell(x, h) -> h`.
    - `solver`: a scan solver. Default: `QuasiDEER(assume_diagonal=True)` for
      cells with `diagonal_jacobian = True` (exact Newton there), else `DEER()`.
    - `adjoint_solver`: the scan solver for the backward recurrences (default
      `solver`).
    - `max_steps`: iteration budget (default `T`, which always suffices).
    - `throw`: raise if a solve fails (see `fixpoint.scan`).
    - `mesh`: shard the time axis over the devices of this mesh. (To split a
      batch of sequences over devices instead, wrap the loss in
      `fixpoint.data_parallel`.)

    Calling `rnn(xs, h0=None)` with `xs` of shape `(T, input_size)` returns all
    hidden states, with a leading time axis (for an LSTM the pair `(hs, cs)`).
    `h0` defaults to zeros (needs `cell.hidden_size`); `guess` warm-starts the
    trajectory (e.g. the states of the previous training step).
    `rnn.solve(xs, h0=None)` returns the `fixpoint.Solution` instead (its
    `value` is the states; with `record_residuals=True` its stats hold the
    residual history), as every equilibrium layer's `solve` does.
    """

    cell: Callable
    # Settings, not weights: static, so a checkpoint never replaces them.
    solver: internal.AbstractScanSolver = eqx.field(static=True)
    adjoint_solver: internal.AbstractScanSolver | None = eqx.field(static=True)
    max_steps: int | None = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True)
    settings: ClassVar[tuple[str, ...]] = ("solver", "adjoint_solver", "max_steps", "throw", "mesh")

    def __init__(
        self,
        cell: Callable,
        *,
        solver: internal.AbstractScanSolver | None = None,
        adjoint_solver: internal.AbstractScanSolver | None = None,
        max_steps: int | None = None,
        throw: bool = True,
        mesh: Mesh | None = None,
    ):
        if not callable(cell):
            raise TypeError(f"ParallelRNN: `cell` must be callable, got {cell!r}.")
        self.cell = cell
        self._configure(
            solver=solver,
            adjoint_solver=adjoint_solver,
            max_steps=max_steps,
            throw=throw,
            mesh=mesh,
        )

    def _configure(self, *, solver, adjoint_solver, max_steps, throw, mesh):
        if solver is None:
            if getattr(self.cell, "diagonal_jacobian", False):
                solver = solvers.QuasiDEER(assume_diagonal=True)
            else:
                solver = solvers.DEER()
        owner = "ParallelRNN"
        internal.check_instance(solver, internal.AbstractScanSolver, "solver", owner=owner)
        if adjoint_solver is not None:
            internal.check_instance(
                adjoint_solver, internal.AbstractScanSolver, "adjoint_solver", owner=owner
            )
        if max_steps is not None:
            max_steps = internal.check_int(max_steps, "max_steps", 1, owner=owner)
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"ParallelRNN: `mesh` must be a `jax.sharding.Mesh`, got {mesh!r}.")
        self._store("solver", solver)
        self._store("adjoint_solver", adjoint_solver)
        self._store("max_steps", max_steps)
        self._store("throw", internal.check_bool(throw, "throw", owner=owner))
        self._store("mesh", mesh)

    def initial_state(
        self,
    ) -> Float[Array, " hidden"] | tuple[Float[Array, " hidden"], Float[Array, " hidden"]]:
        """Zeros shaped like the cell's state."""
        size = getattr(self.cell, "hidden_size", None)
        if size is None:
            raise ValueError(
                "ParallelRNN: pass `h0`; the cell has no `hidden_size` to build a zero state."
            )
        floats = jax.tree.leaves(eqx.filter(self.cell, eqx.is_inexact_array))
        dtype = floats[0].dtype if floats else jnp.float32
        zero = jnp.zeros(size, dtype)
        return (zero, zero) if isinstance(self.cell, eqx.nn.LSTMCell) else zero

    def solve(
        self,
        xs: PyTree[Array],
        h0: PyTree[Array] | None = None,
        *,
        guess: PyTree[Array] | None = None,
        record_residuals: bool = False,
    ) -> fixpoint.Solution:
        """Solve for all hidden states; returns the `fixpoint.Solution` (`value`: the states)."""
        if h0 is None:
            h0 = self.initial_state()
        out = fixpoint.scan(
            _Step(self.cell),  # a pytree, so compiled work is reused across calls
            h0,
            xs,
            solver=self.solver,
            guess=guess,
            max_steps=self.max_steps,
            throw=self.throw,
            adjoint_solver=self.adjoint_solver,
            record_residuals=record_residuals,
            return_solution=True,
            mesh=self.mesh,
        )
        return out[2]  # pyright: ignore[reportGeneralTypeIssues]

    def __call__(
        self,
        xs: PyTree[Array],
        h0: PyTree[Array] | None = None,
        *,
        guess: PyTree[Array] | None = None,
    ) -> PyTree[Array]:
        """All hidden states, with a leading time axis (see `solve`)."""
        return self.solve(xs, h0, guess=guess).value
