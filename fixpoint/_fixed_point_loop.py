"""The one jit-compiled loop that drives every solver."""

from typing import Any, Literal, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float

from ._compact import Compaction, compacted_while_loop
from ._convergence import decide, measure
from ._fixed_point_problem import Problem
from ._fixed_point_solver import AbstractSolver
from ._manual import manual_axes, match_varying
from ._norm import max_norm, rms_norm, two_norm
from ._solution import RESULTS, result_from_code


class LoopOptions(eqx.Module):
    """Per-call settings of the loop: static, but for a `max_steps` given as an
    integer array (a run-time budget, traced under `filter_jit`: changing it
    compiles nothing again)."""

    max_steps: int | jax.Array
    divergence_ratio: float = eqx.field(static=True)
    record_residuals: bool = eqx.field(static=True)

    def static_max_steps(self, what: str) -> int:
        """`max_steps` as a Python int, for `what` needs one at trace time."""
        if isinstance(self.max_steps, int):
            return self.max_steps
        raise TypeError(
            f"{what} needs `max_steps` as a Python int (its buffer or checkpoints are "
            "sized by it), not a run-time budget (an array)."
        )


class _Carry(eqx.Module):
    y: Any
    state: Any
    aux: Any
    scalars: jax.Array  # `LoopScalars`, packed, then the watch's numbers (if any)
    history: Any


# Infeasibility detection (`AbstractSolver.drift_rate`). It only ever replaces
# `max_steps_reached`: a solve that converges within its budget is never called
# infeasible. (Stopping early at step 64 on a steady drift was tried and
# refused by review: gradient descent on logcosh from 100, `tanh(z + 1e-4)`
# from 0, Halpern on a rotation by 0.003 rad, value iteration with γ = 0.9999
# all look like translations for hundreds of steps and converge later.)
#
# At every checkpoint `k = 8, 16, 32, ...` and at the last step the loop looks
# at the drift `d_k = (y_0 − y_k) / (k · rate)`, which estimates the infimal
# displacement vector `v`. A check *agrees* when
# - the distance travelled grows in proportion to the steps: `‖y_0 − y_k‖` is
#   `k / k'` times its value at the previous checkpoint `k'`, within 5 %;
# - the residual matches the drift, in direction and size: `‖r_k − d_k‖ ≤ 5 %`
#   of `‖d_k‖` (on an averaged map with no fixed point `r_k → v` as well);
# - the residual has stopped falling: `‖r_k‖ ≥ 99.5 %` of `‖r_{k'}‖`.
# When the budget runs out, the last step's check and the two checkpoints
# before it all agreeing make the result `infeasible` instead of
# `max_steps_reached`. What it says: the iterates were drifting steadily when
# the budget ended, so a fixed point, if any, lies at least half the distance
# travelled away (Fejér-monotone iterates stay within `2‖y_0 − y*‖` of `y_0`).
# The norms are the solver's own.
#
# Cost: two more vectors in the convergence test's one reduction and four
# numbers at the end of the packed scalars, at every step: `bench/batch.py
# --part overhead` (Picard, batch 1) 0.23-0.25 -> 0.25-0.28 µs per step at
# d = 64, 2.64-2.65 -> 2.68-2.77 at d = 256. (A `lax.cond` taken only at checkpoints made a step 20x
# slower; carrying the last drift as a vector, or a reduction of its own, 2-3x.)
_PACKED = 6  # the length of `LoopScalars.pack`; the watch's numbers follow
_FIRST_MARK = 8
_AGREEING = 3
_DRIFT_TOL = 0.05
_FLAT = 0.995


def _new_watch(rdtype):
    """The watch's carry: at the last checkpoint, `‖y_0 − y‖` and the residual
    norm; the count of agreeing checkpoints in a row; and `1 / (k · rate)` for
    the coming step `k` (carried as a float: scaling by the step count, which
    the loop unpacks from its scalars, held the convergence test's reduction
    back). It travels at the end of the loop's packed scalars (one carried
    array: as an array of its own it cost more again)."""
    return jnp.array([0, jnp.inf, 0, 1], _pack_dtypes(rdtype)[0])


def _watch_vectors(watch, y0, y, residual):
    """The vectors whose norms the watch needs: `y_0 − y_k` and `r_k − d_k`."""
    travelled = y0 - y
    return (travelled, residual - travelled * watch[3].astype(y.dtype))


def _watch_step(watch, sizes, rnorm, rate, k, max_steps):
    """`(watch, infeasible)` after measuring the residual (norm `rnorm`) at `y_k`;
    `sizes` are the norms of `_watch_vectors`' vectors."""
    mark = (k >= _FIRST_MARK) & ((k & (k - 1)) == 0)
    final = k >= max_steps
    # The checkpoint before step k: k / 2 at a checkpoint, else the largest
    # power of two below `max_steps` (the last step's check).
    if isinstance(max_steps, int):
        before = 1 << (max_steps.bit_length() - 1)
        before = max(before // 2 if before == max_steps else before, 1)  # max_steps = 1: 1
    else:  # a run-time budget: the same, from the bits of `max_steps − 1`
        below = jnp.maximum(max_steps - 1, 1)
        before = jnp.left_shift(1, jnp.iinfo(below.dtype).bits - 1 - jax.lax.clz(below))
    ratio = jnp.where(mark, 2, max_steps / before).astype(watch.dtype)
    distance, mismatch = (x.astype(watch.dtype) for x in sizes)
    last_distance, last_rnorm, agree, inv_scale = watch[0], watch[1], watch[2], watch[3]
    steady = jnp.abs(distance - ratio * last_distance) <= _DRIFT_TOL * distance
    matched = mismatch <= _DRIFT_TOL * distance * inv_scale
    flat = rnorm.astype(watch.dtype) >= _FLAT * last_rnorm
    ok = (k > _FIRST_MARK) & steady & matched & flat & (distance > 0)
    infeasible = final & ok & (agree >= _AGREEING - 1)
    agree = jnp.where(ok, agree + 1, 0)
    kept = jnp.where(mark, jnp.stack([distance, rnorm.astype(watch.dtype), agree]), watch[:3])
    following = 1 / ((k + 1).astype(watch.dtype) * rate)
    return jnp.concatenate([kept, following[None]]), infeasible


class LoopScalars(NamedTuple):
    """A loop's bookkeeping, carried as one array (`pack` / `LoopScalars.read`).

    For solver authors writing a loop of their own (the splitting solvers do):
    `LoopScalars.initial(dtype)` is the packed start, `LoopScalars.read(packed,
    dtype)` unpacks at the top of the body, `advance(...)` makes the next one,
    `outcome(...)` gives the `RESULTS` item and the stats at the end.

    A `NamedTuple` of scalar arrays; the packed form is a `(6,)` float array
    (float64 for float64 residual norms, else float32) in which the counters
    travel as the bits of a float of the same width.

    **Arguments:**

    - `residual`: the last residual norm.
    - `best`: the smallest finite residual norm so far.
    - `start`: the first residual norm.
    - `step`: the number of updates made (an integer).
    - `result`: the value of a `RESULTS` item (an integer code).
    - `running`: whether the loop goes on (a bool).
    """

    residual: jax.Array  # the last residual norm
    best: jax.Array  # the smallest finite residual norm so far
    start: jax.Array  # the first residual norm
    step: jax.Array  # updates made
    result: jax.Array  # the value of a `RESULTS` item
    running: jax.Array  # whether the loop goes on (bool)

    # Why one array: every scalar the body returns as an output of its own is
    # a kernel of its own, and XLA:CPU runs independent small kernels
    # concurrently, paying a hand-off to its thread pool each time. One array
    # makes the body's bookkeeping one kernel at the end of a chain (d = 64,
    # batch 1: 0.78 -> 0.42 µs per Picard step). The counters travel as the
    # bits of a float of the same width: exact, whatever their size, as only
    # copies, gathers and selects touch them.

    @staticmethod
    def initial(dtype: DTypeLike) -> Float[Array, " 6"]:
        """The packed scalars before the first step (residual norms of `dtype`).

        **Arguments:**

        - `dtype`: the dtype of the residual norms.

        **Returns:**

        The packed `(6,)` array: norms `inf`, step 0, `RESULTS.successful`,
        running.
        """
        return LoopScalars(
            residual=jnp.asarray(jnp.inf),
            best=jnp.asarray(jnp.inf),
            start=jnp.asarray(jnp.inf),
            step=jnp.asarray(0),
            result=jnp.asarray(RESULTS.successful._value),
            running=jnp.asarray(True),
        ).pack(dtype)

    @staticmethod
    def read(packed: Float[Array, " 6"], dtype: DTypeLike) -> "LoopScalars":
        """Unpack the scalars (the inverse of `pack`).

        **Arguments:**

        - `packed`: the packed `(6,)` array.
        - `dtype`: the dtype of the residual norms (the norms come back in it).

        **Returns:**

        A `LoopScalars` of scalar arrays.
        """
        fdtype, idtype = _pack_dtypes(dtype)

        def ints(x):
            return jax.lax.bitcast_convert_type(x, idtype)

        return LoopScalars(
            residual=packed[0].astype(dtype),
            best=packed[1].astype(dtype),
            start=packed[2].astype(dtype),
            step=ints(packed[3]).astype(jnp.asarray(0).dtype),
            result=ints(packed[4]).astype(RESULTS.successful._value.dtype),
            running=ints(packed[5]).astype(bool),
        )

    def pack(self, dtype: DTypeLike) -> Float[Array, " 6"]:
        """Pack the scalars into one array (the inverse of `LoopScalars.read`).

        **Arguments:**

        - `dtype`: the dtype of the residual norms (it picks the packed width).

        **Returns:**

        The packed `(6,)` float array.
        """
        fdtype, idtype = _pack_dtypes(dtype)

        def bits(x):
            return jax.lax.bitcast_convert_type(jnp.asarray(x).astype(idtype), fdtype)

        floats = [jnp.asarray(x).astype(fdtype) for x in (self.residual, self.best, self.start)]
        return jnp.stack(floats + [bits(self.step), bits(self.result), bits(self.running)])

    def first_norm(self, rnorm: Float[Array, ""]) -> Float[Array, ""]:
        """The starting residual norm, given this step's `rnorm`.

        **Arguments:**

        - `rnorm`: the residual norm measured at this step.

        **Returns:**

        `rnorm` at step 0, else the recorded `start`.
        """
        return jnp.where(self.step == 0, rnorm, self.start)

    def advance(
        self,
        rnorm: Float[Array, ""],
        start: Float[Array, ""],
        result: RESULTS,
        done: Bool[Array, ""],
        dtype: DTypeLike,
    ) -> Float[Array, " 6"]:
        """The packed scalars after a step that measured `rnorm` and decided `done`.

        **Arguments:**

        - `rnorm`: the residual norm measured at this step.
        - `start`: the starting residual norm (`first_norm(rnorm)`).
        - `result`: this step's `RESULTS` item (from `termination`).
        - `done`: whether the loop stops here (then the step count stays).
        - `dtype`: the dtype of the residual norms.

        **Returns:**

        The packed `(6,)` array: `best` updated with a finite `rnorm`, `step`
        incremented unless `done`, `running = ~done`.
        """
        finite = jnp.isfinite(rnorm)
        return LoopScalars(
            residual=rnorm,
            best=jnp.minimum(self.best, jnp.where(finite, rnorm, self.best)),
            start=start,
            step=self.step + jnp.where(done, 0, 1),
            result=jnp.asarray(result._value),
            running=~done,
        ).pack(dtype)

    @staticmethod
    def outcome(packed: Float[Array, " 6"], dtype: DTypeLike) -> tuple[RESULTS, dict[str, Array]]:
        """`(result, {"num_steps", "residual"})` of a finished loop.

        **Arguments:**

        - `packed`: the packed `(6,)` array after the last step.
        - `dtype`: the dtype of the residual norms.

        **Returns:**

        `(result, stats)`: the `RESULTS` item and a dict with `num_steps` and
        `residual` (the last residual norm).
        """
        s = LoopScalars.read(packed, dtype)
        result = result_from_code(s.result)
        return result, {"num_steps": s.step, "residual": s.residual}


def _pack_dtypes(dtype):
    """`(float dtype, int dtype)` of the packed scalars for residual norms of `dtype`."""
    if jnp.finfo(dtype).bits > 32:
        return jnp.float64, jnp.int64
    return jnp.float32, jnp.int32


def termination(
    converged: Bool[Array, ""],
    finite: Bool[Array, ""],
    diverged: Bool[Array, ""],
    out_of_steps: Bool[Array, ""],
    solver_result: RESULTS | None = None,
    infeasible: Bool[Array, ""] | None = None,
) -> tuple[RESULTS, Bool[Array, ""]]:
    """`(result, done)` for one step of a loop, in order of precedence.

    Converged beats everything; then a non-finite residual, divergence, a failure
    the solver reported (`solver_result`, if any), detected infeasibility, and
    running out of steps. Shared by every loop that reports `RESULTS` (also the
    splitting solvers).

    **Arguments:**

    - `converged`: whether this step's convergence test passed.
    - `finite`: whether the residual (norm) is finite.
    - `diverged`: whether the residual has grown past the divergence bound.
    - `out_of_steps`: whether the step limit is reached.
    - `solver_result`: a failure the solver reported at this step (a `RESULTS`
      item, e.g. from `Step.result`), or `None` (default) for none.
    - `infeasible`: whether the loop detected that the map has no fixed point
      (`RESULTS.infeasible`), or `None` (default) for no detection.

    **Returns:**

    `(result, done)`: the `RESULTS` item (`successful` while running on) and
    whether the loop stops (a boolean scalar).
    """
    failed = jnp.array(False) if solver_result is None else solver_result != RESULTS.successful
    if solver_result is None:
        solver_result = RESULTS.successful
    if infeasible is None:
        infeasible = jnp.array(False)
    result = RESULTS.where(
        converged,
        RESULTS.successful,
        RESULTS.where(
            ~finite,
            RESULTS.nonfinite,
            RESULTS.where(
                diverged,
                RESULTS.diverged,
                RESULTS.where(
                    failed,
                    solver_result,
                    RESULTS.where(
                        infeasible,
                        RESULTS.infeasible,
                        RESULTS.where(out_of_steps, RESULTS.max_steps_reached, RESULTS.successful),
                    ),
                ),
            ),
        ),
    )
    done = converged | ~finite | diverged | failed | infeasible | out_of_steps
    return result, done


def iterate(
    solver: AbstractSolver,
    problem: Problem,
    y0,
    args,
    aux_struct,
    options: LoopOptions,
    kind: Literal["lax", "checkpointed"] = "lax",
    checkpoints: int | None = None,
    compaction: Compaction | None = None,
):
    """Run `solver` on `problem` from the flat `y0`.

    Returns `(y, aux, result, stats, state)` where `y` is the iterate whose
    residual was measured last and `state` the solver's state after the last
    step. Each body iteration makes one evaluation; the loop stops on
    convergence, a non-finite residual, divergence (residual norm above
    `divergence_ratio` times the smallest seen), a solver failure, or after
    `max_steps` updates. Finished samples of a `vmap` never move again, so every
    sample gets its own `num_steps` and `result`; with `compaction`, a `vmap`
    gathers the unfinished samples into smaller buckets as the others finish
    (`_compact.py`), which changes the cost, not the answer.
    """
    dtype = y0.dtype
    rdtype = jnp.finfo(dtype).dtype  # of the residual norms
    rate = solver.drift_rate() if problem.kind == "fixed_point" else None

    def init(ops):
        problem, y0, args = ops
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_struct)
        history = (
            jnp.full(options.static_max_steps("`record_residuals=True`") + 1, jnp.nan, dtype)
            if options.record_residuals
            else None
        )
        return _Carry(
            y=y0,
            state=solver.init(problem, y0, args),
            aux=aux0,
            scalars=LoopScalars.initial(rdtype)
            if rate is None
            else jnp.concatenate([LoopScalars.initial(rdtype), _new_watch(rdtype)]),
            history=history,
        )

    def cond(carry):
        return LoopScalars.read(carry.scalars[:_PACKED], rdtype).running

    def body(carry, ops):
        problem, y0, args = ops
        prev = LoopScalars.read(carry.scalars[:_PACKED], rdtype)
        step = solver.step(problem, carry.y, args, carry.state)
        ev, solver_result = step.evaluation, step.result
        # Every norm of the test in one reduction (`_convergence.py`). The
        # proposed step is the solver's estimate of the distance to the
        # solution (for Newton exactly so); requiring it to be small as well stops
        # an iterate that runs off to where the residual merely saturates. Where
        # the step is `f(y) - y` (undamped Picard), it is exactly `-G(y)` and, for
        # the library's norms (even: `norm(-v) == norm(v)` bit for bit), its test
        # the residual's own, so it is not measured twice. A solver whose step is
        # no error estimate (Halpern's) says so and is not tested on it.
        same = (
            problem.kind == "fixed_point"
            and step.y_next is ev.fy
            and solver.norm in (max_norm, rms_norm, two_norm)
        )
        tested = solver.step_estimates_error and not same
        watch, extra = (None, ()) if rate is None else (carry.scalars[_PACKED:], ())
        if watch is not None:
            extra = _watch_vectors(watch, y0, carry.y, ev.residual)
        sizes = measure(
            solver.norm,
            ev.residual,
            carry.y,
            step.y_next - carry.y if tested else None,
            solver.rtol,
            solver.atol,
            kind=problem.kind,
            y0=y0,
            extra=extra,
        )
        rnorm = sizes.residual
        start = prev.first_norm(rnorm)
        finite = jnp.isfinite(rnorm)
        converged, residual_ok = decide(
            sizes, solver.rtol, solver.atol, kind=problem.kind, start_norm=start
        )
        converged = finite & converged
        trial = jnp.asarray(step.trial)
        # A residual within tolerance is never "diverging" (e.g. after a best of 0).
        reference = start if solver.diverges_from_start else prev.best
        diverged = ~trial & ~residual_ok & (rnorm > options.divergence_ratio * reference)
        recorded = rnorm
        if step.exact is not True:
            # An estimated evaluation (a sampled finite sum) neither converges nor
            # diverges, and the recorded norm stays that of the last exact one
            # (unless it is not finite: that ends the solve and is reported).
            exact = jnp.asarray(step.exact)
            converged = converged & exact
            diverged = diverged & exact
            recorded = jnp.where(exact | ~finite, rnorm, prev.residual)
        out_of_steps = prev.step >= options.max_steps
        infeasible = None
        if watch is not None:
            watch, infeasible = _watch_step(
                watch, sizes.extra, rnorm, rate, prev.step, options.max_steps
            )
        # A non-finite residual at a trial point the solver is already backing off
        # from (a line search) is not the end of the solve.
        result, done = termination(
            converged, finite | trial, diverged, out_of_steps, solver_result, infeasible
        )
        history = carry.history
        if history is not None:
            history = history.at[prev.step].set(recorded)
        return _Carry(
            y=jnp.where(done, carry.y, step.y_next),
            state=step.state,
            aux=ev.aux,
            scalars=prev.advance(recorded, start, result, done, rdtype)
            if watch is None
            else jnp.concatenate([prev.advance(recorded, start, result, done, rdtype), watch]),
            history=history,
        )

    operands = (problem, y0, args)
    if kind == "lax":
        final = compacted_while_loop(cond, lambda c: body(c, operands), init(operands), compaction)
    else:
        if manual_axes():
            raise TypeError(
                "`UnrolledAdjoint` cannot run inside `shard_map` (so not inside "
                "`fixpoint.data_parallel`): its checkpointed loop "
                "(`equinox.internal.while_loop`) closure-converts with a check that refuses "
                "arrays carrying a mesh sharding. Use `ImplicitAdjoint()` there."
            )
        # Differentiated through (`UnrolledAdjoint`): never compacted.
        buffers = (lambda c: c.history) if options.record_residuals else None
        final = eqxi.while_loop(
            cond,
            lambda c: body(c, operands),
            match_varying(lambda c: body(c, operands), init(operands)),
            max_steps=options.static_max_steps("`UnrolledAdjoint`") + 1,
            buffers=buffers,
            kind="checkpointed",
            checkpoints=checkpoints,
        )
    result, stats = LoopScalars.outcome(final.scalars[:_PACKED], rdtype)
    if options.record_residuals:
        stats["residual_history"] = final.history
    if rate is not None:
        # The drift of the returned iterate: on `infeasible`, the estimate of `v`.
        k = stats["num_steps"]
        scale = jnp.maximum(k, 1).astype(dtype) * rate
        stats["displacement"] = jnp.where(k > 0, (y0 - final.y) / scale, jnp.zeros_like(y0))
    own = solver.stats(final.state)
    clash = sorted(set(own) & {"num_steps", "residual", "residual_history", "displacement"})
    if clash:
        raise ValueError(f"{type(solver).__name__}.stats: the loop's own stats {clash} taken.")
    return final.y, final.aux, result, {**stats, **own}, final.state
