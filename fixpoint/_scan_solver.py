"""The protocol of the scan solvers: iterations on a whole trajectory at once.

`fixpoint.scan` turns `h_t = cell(h_{t-1}, x_t)` into one fixed-point problem
on the trajectory `H = (h_1, ..., h_T)`: `H = F(H)` with
`F(H)_t = cell(h_{t-1}, x_t)` (and `h_0` given). A scan solver proposes the next
trajectory from the current one; the loop in `_scan.py` tests convergence step by
step and guarantees progress, so every solver gets the same termination, result
codes and `≤ T` iteration bound.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, PyTree

from ._custom_types import Norm
from ._time import Time, linear_recurrence


class ScanProblem(eqx.Module):
    """`cell(h, x) -> h_next` on flat states, with `h0` and the inputs `xs`.

    Trajectories are `(T, D)` arrays (a device's chunk of time when sharded).
    With `reverse=True` the recurrence runs from the last step to the first:
    `h_t = cell(h_{t+1}, x_t)`, as `lax.scan(..., reverse=True)`.

    Built by `fixpoint.scan` and handed to the scan solvers.

    **Arguments:**

    - `cell`: `cell(h, x) -> h_next` on flat states `float[D]`.
    - `h0`: the initial state, `float[D]`.
    - `xs`: the inputs, a pytree with time on every leaf's leading axis.
    - `time`: the time axis (`Time`), local or sharded.
    - `reverse`: run from the last step to the first (default `False`).
    - `linear`: whether `cell` is affine in `h` (an adjoint's recurrence, a JVP
      or VJP of the forward cell); it changes only how `refinement` runs by
      default. Default `False`.
    """

    cell: Callable
    h0: Float[Array, " D"]
    xs: Any
    time: Time
    reverse: bool = eqx.field(static=True, default=False)
    # An adjoint's recurrence (`cell` affine in `h`, a JVP or VJP of the forward
    # cell): it changes only how `refinement` runs by default.
    linear: bool = eqx.field(static=True, default=False)

    def prev(self, h: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """Each step's previous state in scan order (`h0` for the first step)."""
        return self.time.shift(h, self.h0, self.reverse)

    def evaluate(self, h: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """`F(H)`: every step from its predecessor, all in parallel."""
        return jax.vmap(self.cell)(self.prev(h), self.xs)

    def jacobians(
        self, h: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T D"], Float[Array, "T D D"]]:
        """`(F(H), J)` with the dense per-step Jacobians `J_t = ∂cell/∂h` `(T, D, D)`."""

        def one(hp, x):
            out = self.cell(hp, x)
            return out, out

        jac, fh = jax.vmap(jax.jacfwd(one, has_aux=True))(self.prev(h), self.xs)
        return fh, jac

    def diagonals(
        self, h: Float[Array, "T D"], assume_diagonal: bool, batch_size: int
    ) -> tuple[Float[Array, "T D"], Float[Array, "T D"]]:
        """`(F(H), diag J)` with the diagonals of the per-step Jacobians, `(T, D)`.

        With `assume_diagonal=True` the Jacobian is taken to be diagonal and its
        diagonal is one JVP with a vector of ones (exact for cells whose state
        dimensions interact only through the inputs). Otherwise the diagonal is
        extracted exactly with one JVP per state dimension, `batch_size` at a
        time, so memory stays `O(T · D · batch_size)`.
        """
        hp = self.prev(h)
        if assume_diagonal:
            fn = lambda hp: jax.vmap(self.cell)(hp, self.xs)  # noqa: E731
            return jax.jvp(fn, (hp,), (jnp.ones_like(hp),))
        dim = hp.shape[1]
        if dim == 0:  # no state: no diagonal (and no unit vectors to push)
            return jax.vmap(self.cell)(hp, self.xs), jnp.zeros_like(hp)
        chunk = min(dim, batch_size)

        def one_step(hp_t, x_t):
            # `(cell, diag ∂cell/∂h)` at one step: JVPs with the unit vectors
            # `chunk` at a time, each keeping its own coordinate (the primal is
            # shared by the vmapped tangents, so it is computed once).
            cell = lambda z: self.cell(z, x_t)  # noqa: E731

            def block(start):
                eye = jax.nn.one_hot(start + jnp.arange(chunk), dim, dtype=hp_t.dtype)
                out, cols = jax.vmap(lambda e: jax.jvp(cell, (hp_t,), (e,)))(eye)
                idx = jnp.minimum(start + jnp.arange(chunk), dim - 1)
                return out[0], cols[jnp.arange(chunk), idx]

            starts = jnp.arange(0, dim, chunk)
            if starts.shape[0] == 1:
                return block(starts[0])
            outs, diags = jax.lax.map(block, starts)
            return outs[0], diags.reshape(-1)[:dim]

        return jax.vmap(one_step)(hp, self.xs)

    def sweep(self, length: int) -> Float[Array, "T D"]:
        """The sequential answer itself: `lax.scan` of the cell from `h0`, `length` steps.

        Depth `T`, memory `O(T·D)`; needs an unsharded time axis.
        """
        if self.time.axis_name is not None:
            raise ValueError("ScanProblem.sweep needs an unsharded time axis.")

        def body(h, x):
            nxt = self.cell(h, x)
            return nxt, nxt

        return jax.lax.scan(body, self.h0, self.xs, length, reverse=self.reverse)[1]

    def refinement_method(self, method: str = "auto") -> str:
        """`"sweep"` or `"newton"`: how `refinement(h, method)` runs here."""
        if method not in ("auto", "sweep", "newton"):
            raise ValueError(f"refinement: unknown method {method!r}.")
        if method != "auto":
            return method
        cpu = jax.default_backend() == "cpu"
        unsharded = self.time.axis_name is None
        sweep = cpu and unsharded and (not self.linear or self.newton_method() == "sequential")
        return "sweep" if sweep else "newton"

    def refinement_is_exact(self, method: str = "auto") -> bool:
        """Whether `refinement(h, method)` is the sequential answer itself (a sweep)."""
        return self.refinement_method(method) == "sweep"

    def refinement(self, h: Float[Array, "T D"], method: str = "auto") -> Float[Array, "T D"]:
        """A trajectory accurate to (at least) first order in the residuals of `h`.

        What the `refine` of solvers without dense Jacobians returns, and so the
        certificate of their answer:

        - `"newton"`: one Newton step on the whole trajectory, `newton_step(h)`;
          the loop certifies `h` when it moves no step beyond the tolerance.
        - `"sweep"`: the sequential answer itself (`sweep(T)`), exact, so the
          loop returns it as the answer (`AbstractScanSolver.exact`). Unsharded
          only.
        - `"auto"` (default): `"sweep"` on the CPU with time unsharded, except
          for an adjoint's linear recurrence (`linear=True`) at `D < 16`;
          `"newton"` otherwise. Measured on the CPU (GRU, T = 1e4, float32,
          `QuasiDEER` forward): D = 4 / 8 / 12: 5.8 / 10.1 / 17.5 ms with the
          sweep, 17.0 / 14.1 / 28.3 ms with the parallel Newton step, which
          also often needed a second round; at D = 32 the sweep takes 3.6 ms,
          the sequential Newton step 10.4 and the parallel one 47. An adjoint's
          sweep costs a VJP per step, and below `D = 16` its recurrences go to
          `DEER`, whose Newton step solves them exactly.
        """
        if self.refinement_method(method) == "sweep":
            return self.sweep(h.shape[0])
        return self.newton_step(h)

    def newton_method(self, method: str = "auto") -> str:
        """`"parallel"` or `"sequential"`: how `newton_step(h, method)` runs here."""
        if method not in ("auto", "parallel", "sequential"):
            raise ValueError(f"newton_step: unknown method {method!r}.")
        if method != "auto":
            return method
        cpu = jax.default_backend() == "cpu"
        unsharded = self.time.axis_name is None
        return "sequential" if cpu and unsharded and self.h0.shape[-1] >= 16 else "parallel"

    def newton_step(self, h: Float[Array, "T D"], method: str = "auto") -> Float[Array, "T D"]:
        """`H - E`: one Newton step on the whole trajectory.

        `E` solves `E_t = A_t E_{t-1} + r_t` (`A_t = ∂cell/∂h`, `r = H - F(H)`),
        the first-order error of `H` against the sequential answer (a `refine`
        of solvers without a sweep). Two ways to the same `E`:

        - `"parallel"`: the dense Jacobians (`D` JVPs per step) and one
          associative scan of `D×D` matrices: depth `O(log T)`, work
          `O(T·D³ log T)`, memory `O(T·D²)`.
        - `"sequential"`: `E` by a `lax.scan` over time, one JVP per step with
          `E_{t-1}` as the tangent: depth `T`, work `O(T)` JVPs, memory `O(T·D)`.
          Not available when time is sharded over devices.
        - `"auto"` (default): sequential when the default backend
          (`jax.default_backend()`, not the device of a placed array) is the
          CPU, `D >= 16` and time is unsharded: a CPU gains little from the
          parallel scan's depth, and its `D³` matrix products cost more (GRU,
          T = 1e4, D = 32: 8 ms against 50 ms; at D = 8: 5.8 against 1.8 ms);
          parallel otherwise.
        """
        method = self.newton_method(method)
        if method == "parallel":
            fh, jac = self.jacobians(h)
            return h + linear_recurrence(self.time, jac, fh - h, self.reverse)
        if self.time.axis_name is not None:
            raise ValueError("newton_step: `method='sequential'` needs an unsharded time axis.")
        hp = self.prev(h)
        fh = jax.vmap(self.cell)(hp, self.xs)

        def one(e_prev, inputs):
            hp_t, x_t, r_t = inputs
            e = jax.jvp(lambda z: self.cell(z, x_t), (hp_t,), (e_prev,))[1] + r_t
            return e, e

        inputs = (hp, self.xs, fh - h)
        _, e = jax.lax.scan(one, jnp.zeros_like(h[0]), inputs, reverse=self.reverse)
        return h + e


class AbstractScanSolver(eqx.Module):
    """An algorithm for `fixpoint.scan`.

    Each iteration of the loop calls `linearise`, which evaluates `F` once at the
    current trajectory `H` (plus whatever derivatives the solver uses), then
    measures every step's residual `H - F(H)`, and then calls `update` with the
    mask `frozen` of the leading steps (in scan order) that already meet the
    tolerance. The loop keeps those steps unchanged, sets the first unconverged
    step to its exact value `F(H)_p`, and discards non-finite proposals, so each
    iteration fixes at least one more step whatever the solver proposes. A
    solver should treat the frozen steps as exact (zero residual, zero update),
    so that its proposal for the later steps is consistent with them.

    Once every step meets the tolerance, the loop calls `refine` instead of
    `update` and certifies the trajectory only when the refinement (an estimate
    of the accumulated error) is within the tolerance as well. A proposal that
    is the sequential answer itself (`exact`) needs no certificate: finite, it
    is returned and the solve stops.

    `rtol`, `atol` and `norm` define both tests of step `t` (`fixpoint.internal.meets`):
    `norm(v_t / (atol + rtol |h_t|)) < 1` for the residual
    `v_t = h_t - cell(h_{t-1}, x_t)` and for the refinement's move. A tolerance
    of `None` (every built-in solver's default) is resolved at trace time from
    the carry's dtype by `fixpoint.internal.scan_tolerances`.

    A subclass (a final `eqx.Module`) provides the fields `rtol`, `atol`
    (`float | None`) and `norm`, and implements `init`, `linearise`, `update`
    and `refine`; it may override `refine_by_update`, `window_length`, `exact`
    and `linear_solver`.
    """

    rtol: AbstractVar[float | None]
    atol: AbstractVar[float | None]
    norm: AbstractVar[Norm]

    @property
    def refine_by_update(self) -> bool:
        """True when `refine` is exactly `update` with no step frozen (default False).

        Then the loop calls `update` alone, with the frozen mask cleared once
        every step meets the tolerance, instead of choosing between `update` and
        `refine` by a `lax.cond` (cheaper: XLA fuses across no branch).

        **Returns:**

        A Python bool (static).
        """
        return False

    def window_length(self, length: int) -> int | None:
        """How many steps one iteration of the per-step phase evaluates (static).

        `None` (default): the whole trajectory. An int `w < length`: a sliding
        window of `w` steps from the first unconverged one (`fixpoint.internal.iterate_scan`);
        `linearise`, `update` and `init` then see a `ScanProblem` of `w` steps
        whose `h0` is the state before the window, and `state` is None (a
        windowed solver keeps no state). Certification still covers the whole
        trajectory. Needs an unsharded time axis.

        **Arguments:**

        - `length`: the length `T` of the (local) trajectory.

        **Returns:**

        `None`, or the window length, an int below `length`.
        """
        del length
        return None

    def exact(self, problem: ScanProblem) -> tuple[bool, bool]:
        """`(update_exact, refine_exact)`: whether `update` / `refine` return the
        sequential answer itself on `problem` (static; default `(False, False)`).

        A finite exact proposal needs no certificate: the loop returns it and
        stops `successful` (a refinement that is `problem.sweep(T)`, an update
        that sweeps the whole sequence from `h0`). Otherwise the loop measures
        the next trajectory, or certifies against the refinement.

        **Arguments:**

        - `problem`: the `ScanProblem` being solved (read statically).

        **Returns:**

        `(update_exact, refine_exact)`, two Python bools.
        """
        return False, False

    @abc.abstractmethod
    def init(self, problem: ScanProblem, h: Float[Array, "T D"]) -> PyTree:
        """Initial state for the trajectory guess `h`.

        **Arguments:**

        - `problem`: the `ScanProblem` being solved.
        - `h`: the initial trajectory guess, `(T, D)`.

        **Returns:**

        The solver state, a pytree of arrays (a loop carry: fixed structure,
        shapes and dtypes), or `None`.
        """

    @abc.abstractmethod
    def linearise(
        self, problem: ScanProblem, h: Float[Array, "T D"], state: PyTree
    ) -> tuple[Float[Array, "T D"], PyTree]:
        """`(F(h), derivatives)`: one evaluation, and what `update` needs (or None).

        **Arguments:**

        - `problem`: the `ScanProblem` being solved.
        - `h`: the current trajectory, `(T, D)`.
        - `state`: the solver state.

        **Returns:**

        `(fh, derivatives)`: `F(h)`, i.e. `cell(h_{t-1}, x_t)` at every step,
        `(T, D)`; and whatever `update`/`refine` need (e.g. Jacobians), or
        `None`.
        """

    @abc.abstractmethod
    def update(
        self,
        problem: ScanProblem,
        h: Float[Array, "T D"],
        fh: Float[Array, "T D"],
        derivatives: PyTree,
        frozen: Bool[Array, " T"],
        state: PyTree,
    ) -> tuple[Float[Array, "T D"], PyTree]:
        """`(h_next, state)`: the proposed trajectory, given `F(h)` and the frozen mask.

        **Arguments:**

        - `problem`: the `ScanProblem` being solved.
        - `h`: the current trajectory, `(T, D)`.
        - `fh`: `F(h)` from `linearise`, `(T, D)`.
        - `derivatives`: what `linearise` returned besides `F(h)`.
        - `frozen`: `bool[T]`, the leading steps (in scan order) that already
          meet the tolerance; treat them as exact.
        - `state`: the solver state.

        **Returns:**

        `(h_next, state)`: the proposed trajectory, `(T, D)`, and the new state.
        """

    def linear_solver(self, problem: ScanProblem) -> "AbstractScanSolver":
        """The solver of the adjoint's linear recurrences on `problem` (default: itself).

        `fixpoint.scan`'s backward pass solves `v_t = A_t v_{t-1} + b_t` (or its
        transpose) through the same loop, with `adjoint_solver` (default: the
        forward solver). A solver may hand that linear problem to another one
        that is cheaper on it.

        **Arguments:**

        - `problem`: the adjoint's (linear) `ScanProblem`.

        **Returns:**

        An `AbstractScanSolver` (default: `self`).
        """
        return self

    @abc.abstractmethod
    def refine(
        self,
        problem: ScanProblem,
        h: Float[Array, "T D"],
        fh: Float[Array, "T D"],
        derivatives: PyTree,
        state: PyTree,
    ) -> tuple[Float[Array, "T D"], PyTree]:
        """`(h_refined, state)` once every step of `h` meets the per-step tolerance.

        `h_refined` must be accurate to first order in the residuals `h - F(h)`
        (a Newton step on the whole trajectory, `problem.newton_step(h)`, or the
        exact sequential answer, `problem.sweep(T)`; `problem.refinement(h)`
        picks the cheaper here): the loop certifies `h` only if `h_refined`
        differs from it by less than the tolerance at every step, so that the
        error accumulated along the sequence is within the tolerance too, and
        then returns `h_refined`. A refinement that `exact` declares exact is
        returned as soon as it is finite, without that comparison.

        **Arguments:**

        - `problem`: the `ScanProblem` being solved.
        - `h`: the current trajectory, `(T, D)`, every step within tolerance.
        - `fh`: `F(h)` from `linearise`, `(T, D)`.
        - `derivatives`: what `linearise` returned besides `F(h)`.
        - `state`: the solver state.

        **Returns:**

        `(h_refined, state)`: the refined trajectory, `(T, D)`, and the new
        state.
        """


# Per-step tolerances used when a scan solver's `rtol`/`atol` is None, by dtype.
# float32: measured by `bench/scan_tolerance.py` (GRU, D = 8 and 32, T = 1e3 and
# 1e4): at 1e-4 the certified answer is as close to float64 `lax.scan` as float32
# `lax.scan` is (scales 1 and 3), with fewer iterations than at 1e-6, and a
# cell near the edge of chaos (scale 6) converges in 361-502 iterations instead of running to
# T = 1000. float64: the certified answer lies within 1e-10 of `lax.scan`
# (tested). 16-bit floats: a hundred times float32's, not measured.
SCAN_TOLERANCES = {"float64": 1e-6, "float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}


def scan_tolerances(solver: AbstractScanSolver, dtype: DTypeLike) -> tuple[float, float]:
    """`(rtol, atol)` of `solver` for a carry of `dtype`: its own, or the dtype's default.

    The defaults (`SCAN_TOLERANCES`): `1e-6` for float64, `1e-4` for float32,
    `1e-2` for float16 and bfloat16 — the same for `rtol` and `atol`.

    **Arguments:**

    - `solver`: a scan solver; a tolerance of `None` takes the default.
    - `dtype`: the carry's dtype.

    **Returns:**

    `(rtol, atol)` as Python floats.

    **Raises:**

    `TypeError` when a tolerance is `None` and `dtype` has no default.
    """
    default = SCAN_TOLERANCES.get(jnp.dtype(dtype).name)
    if default is None and (solver.rtol is None or solver.atol is None):
        raise TypeError(
            f"{type(solver).__name__}: no default tolerance for a carry of dtype "
            f"{jnp.dtype(dtype).name}; pass `rtol=` and `atol=`."
        )
    rtol = default if solver.rtol is None else solver.rtol
    atol = default if solver.atol is None else solver.atol
    return float(rtol), float(atol)  # pyright: ignore[reportArgumentType]
