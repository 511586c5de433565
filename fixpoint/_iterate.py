"""The one jit-compiled loop that drives every solver."""

from typing import Any, Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp

from ._compact import Compaction, compacted_while_loop
from ._convergence import decide, measure
from ._manual import manual_axes, match_varying
from ._problem import Problem
from ._solution import RESULTS
from ._solver import AbstractSolver


class LoopOptions(eqx.Module):
    """Per-call settings of the loop (static)."""

    max_steps: int = eqx.field(static=True)
    divergence_ratio: float = eqx.field(static=True)
    record_residuals: bool = eqx.field(static=True)


class _Carry(eqx.Module):
    y: Any
    state: Any
    aux: Any
    step: jax.Array
    done: jax.Array
    result: RESULTS
    residual: jax.Array
    best: jax.Array
    start: jax.Array
    history: Any


def termination(converged, finite, diverged, out_of_steps, solver_result=None):
    """`(result, done)` for one step of a loop, in order of precedence.

    Converged beats everything; then a non-finite residual, divergence, a failure
    the solver reported (`solver_result`, if any), and running out of steps.
    Shared by every loop that reports `RESULTS` (also the splitting solvers).
    """
    failed = jnp.array(False) if solver_result is None else solver_result != RESULTS.successful
    if solver_result is None:
        solver_result = RESULTS.successful
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
                    RESULTS.where(out_of_steps, RESULTS.max_steps_reached, RESULTS.successful),
                ),
            ),
        ),
    )
    done = converged | ~finite | diverged | failed | out_of_steps
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

    Returns `(y, aux, result, stats)` where `y` is the iterate whose residual was
    measured last. Each body iteration makes one evaluation; the loop stops on
    convergence, a non-finite residual, divergence (residual norm above
    `divergence_ratio` times the smallest seen), a solver failure, or after
    `max_steps` updates. Finished samples of a `vmap` never move again, so every
    sample gets its own `num_steps` and `result`; with `compaction`, a `vmap`
    gathers the unfinished samples into smaller buckets as the others finish
    (`_compact.py`), which changes the cost, not the answer.
    """
    dtype = y0.dtype

    def init(ops):
        problem, y0, args = ops
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_struct)
        history = (
            jnp.full(options.max_steps + 1, jnp.nan, dtype) if options.record_residuals else None
        )
        return _Carry(
            y=y0,
            state=solver.init(problem, y0, args),
            aux=aux0,
            step=jnp.array(0),
            done=jnp.array(False),
            result=RESULTS.successful,
            residual=jnp.array(jnp.inf, dtype),
            best=jnp.array(jnp.inf, dtype),
            start=jnp.array(jnp.inf, dtype),
            history=history,
        )

    def cond(carry):
        return ~carry.done

    def body(carry, ops):
        problem, y0, args = ops
        step = solver.step(problem, carry.y, args, carry.state)
        ev, solver_result = step.evaluation, step.result
        # Every norm of the test in one reduction (`_convergence.py`). The
        # proposed step is the solver's estimate of the distance to the
        # solution (for Newton exactly so); requiring it to be small as well stops
        # an iterate that runs off to where the residual merely saturates. For
        # Picard the step *is* the residual.
        sizes = measure(
            solver.norm,
            ev.residual,
            carry.y,
            step.y_next - carry.y,
            solver.rtol,
            solver.atol,
            kind=problem.kind,
            y0=y0,
        )
        rnorm = sizes.residual
        first = carry.step == 0
        start = jnp.where(first, rnorm, carry.start)
        finite = jnp.isfinite(rnorm)
        converged, residual_ok = decide(
            sizes, solver.rtol, solver.atol, kind=problem.kind, start_norm=start
        )
        converged = finite & converged
        trial = jnp.asarray(step.trial)
        # A residual within tolerance is never "diverging" (e.g. after a best of 0).
        diverged = ~trial & ~residual_ok & (rnorm > options.divergence_ratio * carry.best)
        out_of_steps = carry.step >= options.max_steps
        # A non-finite residual at a trial point the solver is already backing off
        # from (a line search) is not the end of the solve.
        result, done = termination(converged, finite | trial, diverged, out_of_steps, solver_result)
        history = carry.history
        if history is not None:
            history = history.at[carry.step].set(rnorm)
        return _Carry(
            y=jnp.where(done, carry.y, step.y_next),
            state=step.state,
            aux=ev.aux,
            step=carry.step + jnp.where(done, 0, 1),
            done=done,
            result=result,
            residual=rnorm,
            best=jnp.minimum(carry.best, jnp.where(finite, rnorm, carry.best)),
            start=start,
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
            max_steps=options.max_steps + 1,
            buffers=buffers,
            kind="checkpointed",
            checkpoints=checkpoints,
        )
    stats = {"num_steps": final.step, "residual": final.residual}
    if options.record_residuals:
        stats["residual_history"] = final.history
    return final.y, final.aux, final.result, stats
