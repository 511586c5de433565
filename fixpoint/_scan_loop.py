"""The loop that drives every scan solver, and the linear solves of its adjoint."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._convergence import row_sizes, rows_meet
from ._custom_types import Tolerance
from ._fixed_point_loop import termination
from ._linear import flag_failure
from ._manual import while_loop
from ._scan_solver import AbstractScanSolver, ScanProblem, scan_tolerances
from ._solution import RESULTS
from ._time import Time

# Iterations allowed beyond `T` by default: the per-step phase needs at most `T`;
# certification usually needs one refinement (two when it corrects a trajectory).
EXTRA_STEPS = 16


class _Carry(eqx.Module):
    h: Any
    state: Any
    step: jax.Array
    done: jax.Array
    result: RESULTS
    residual: jax.Array
    converged_steps: jax.Array
    history: Any


def iterate_scan(
    solver: AbstractScanSolver,
    problem: ScanProblem,
    h: Float[Array, "T D"],
    *,
    rtol: Tolerance,
    atol: Tolerance,
    max_steps: int,
    record_residuals: bool = False,
    extrapolate: bool = False,
) -> tuple[Float[Array, "T D"], RESULTS, dict[str, Array]]:
    """Iterate `solver` on the trajectory `h` (`(T, D)`, or a device's chunk).

    Each iteration evaluates `F(H)` once (`solver.linearise`) and measures
    every step's residual `r_t = h_t - cell(h_{t-1}, x_t)` against
    `atol + rtol·|h_t|` (`fixpoint.internal.meets`). Two phases:

    - **Per-step phase** (some step misses the tolerance). Let `p` be the first
      such step in scan order. The next trajectory keeps the steps before `p`
      unchanged ("frozen"; the solver's `update` is told which), sets step `p`
      to its exact value `F(H)_p`, and takes the solver's proposal after `p`,
      except where that proposal is not finite. So after `k` such iterations
      at least the first `k` steps meet the tolerance: `T` iterations always
      bring every step within it, whatever the solver proposes.
    - **Certification** (every step meets it). Small residuals do not make a
      small error: the error `E = H - H*` against the sequential answer obeys
      `E_t ≈ A_t E_{t-1} + r_t` (`A_t = ∂cell/∂h`), so residuals add up along
      the sequence (an integrator `h + x` accumulates all of them). The solver's
      `refine` returns a trajectory accurate to first order in `r` (a Newton
      step on the whole trajectory, i.e. `H - E` with `E` from that linear
      recurrence). The solve is `successful` only when the refinement moves no
      step by more than the tolerance, i.e. when the estimated accumulated
      error meets the same per-step test; otherwise the loop continues from the
      refined trajectory.
    - **Exact proposals** (`solver.exact(problem)`, static). A refinement or an
      update that is the sequential answer itself (a sweep of the whole
      sequence from `h0`) needs no certificate: once finite, it is returned
      and the solve stops `successful` (an exact update counts as a step).

    - **Sliding window** (`solver.window_length(T) = w < T`, unsharded). The
      per-step phase evaluates only the `w` steps from the first unconverged
      one (the last `w` steps once fewer are left), with the same rules on
      that window, so an iteration costs `w` evaluations of the cell, not `T`.
      Steps ahead of the window keep their guess until it reaches them; with
      `extrapolate=True` (the default guess) a step the window has never
      reached starts from the latest state evaluated. The step set to its
      exact value counts as converged at once (so `T` iterations still
      suffice). Once every step meets the tolerance, certification runs on the
      whole trajectory as above. A solve that stops in this phase
      (`nonfinite`, `max_steps_reached`) returns the last window as measured,
      and its `residual` is that window's (steps ahead were never measured).

    Stops with `successful` as above; `nonfinite` when the exact value at step
    `p` is not finite (the sequential scan itself would produce it);
    `max_steps_reached` after `max_steps` updates.

    **Arguments:**

    - `solver`: the scan solver.
    - `problem`: the `ScanProblem` (cell, `h0`, inputs, time axis).
    - `h`: the initial trajectory guess, `(T, D)` (a device's chunk when
      sharded).
    - `rtol`, `atol`: the per-step tolerances (resolved: not `None`; `atol` may
      be a traced scalar, as the scan adjoint scales it).
    - `max_steps`: the largest number of updates.
    - `record_residuals`: also return `stats["residual_history"]` (default
      `False`).
    - `extrapolate`: with a sliding window, start a step the window has never
      reached from the latest state evaluated (default `False`: keep its guess;
      `fixpoint.scan` sets it when no `guess` is given).

    **Returns:**

    `(h, result, stats)`: `h` is the certified refinement on success (the last
    Newton update, within tolerance of the measured trajectory) or the exact
    proposal, else the measured trajectory; `result` a `fixpoint.RESULTS`;
    `stats` has `num_steps`, `residual` (the largest per-step residual norm,
    measured at the trajectory before refinement), `converged_steps` (how many
    leading steps met the tolerance) and, if asked, `residual_history`.
    """
    time = problem.time
    length = h.shape[0]
    total = length * time.size
    order = time.order(length, problem.reverse)
    dtype = h.dtype
    update_exact, refine_exact = solver.exact(problem)
    history = jnp.full(max_steps + 1, jnp.nan, dtype) if record_residuals else None
    init = _Carry(
        h=h,
        state=solver.init(problem, h),
        step=jnp.array(0),
        done=jnp.array(False),
        result=RESULTS.successful,
        residual=jnp.array(jnp.inf, dtype),
        converged_steps=jnp.array(0),
        history=history,
    )

    def body(c):
        fh, derivatives = solver.linearise(problem, c.h, c.state)
        r = c.h - fh
        ok = rows_meet(solver.norm, r, c.h, rtol, atol)
        fh_finite = jnp.all(jnp.isfinite(fh), axis=1)
        # Three scalars from one reduction over time: `p`, the first step (in
        # scan order) that misses the tolerance; `q`, the first that misses it
        # *and* has a non-finite `F(H)` (so `q >= p`, and `F(H)_p` is finite
        # exactly when `q != p`); and whether every residual is exactly zero.
        firsts = time.min(
            jnp.stack(
                [
                    jnp.where(ok, total, order),
                    jnp.where(ok | fh_finite, total, order),
                    jnp.all(r == 0, axis=1).astype(order.dtype),
                ],
                axis=1,
            ),
            axis=0,
        )
        p, q = firsts[0], firsts[1]
        all_ok = p >= total
        finite = all_ok | (q != p)
        frozen = order < p

        def advance(state):
            return solver.update(problem, c.h, fh, derivatives, frozen, state)

        def refine(state):
            return solver.refine(problem, c.h, fh, derivatives, state)

        if solver.refine_by_update:
            # `refine` is `update` with nothing frozen: no branch. (Measured, DEER,
            # GRU D = 32, T = 1e4, CPU: a `lax.cond` here cost 23 ms of 55 per
            # iteration; XLA cannot fuse the Jacobians into a branch's scan.)
            h_next, state = solver.update(problem, c.h, fh, derivatives, frozen & ~all_ok, c.state)
        else:
            # `all_ok` is the same on every device, so this is a real branch
            # (except under `vmap`, where both sides run).
            h_next, state = jax.lax.cond(all_ok, refine, advance, c.state)
        proposal_finite = jnp.all(jnp.isfinite(h_next), axis=1)
        fallback = jnp.where(fh_finite[:, None], fh, c.h)
        proposal = jnp.where(proposal_finite[:, None], h_next, fallback)
        all_finite = time.all(proposal_finite)
        if refine_exact:
            # The refinement is the sequential answer itself: finite, it is the
            # answer, whatever its distance from `H` (no second round).
            certified = all_finite
        else:
            # A non-finite refinement certifies nothing (its fallback `F(H)` differs
            # from `H` only by the residuals that already passed).
            certified = time.all(
                rows_meet(solver.norm, proposal - c.h, c.h, rtol, atol) & proposal_finite
            )
        # Zero residuals everywhere: every step is exactly the cell of its
        # predecessor, i.e. the sequential answer itself (whatever the
        # refinement says; e.g. an infinite Jacobian times a zero error is NaN).
        exact = firsts[2] == 1
        out_of_steps = c.step >= max_steps
        converged = all_ok & (certified | exact)
        # An update that is the sequential answer itself (unsharded `Sequential`)
        # ends the solve as soon as it is finite: it counts as a step.
        exact_update = ~all_ok & all_finite & ~out_of_steps if update_exact else jnp.array(False)
        at = (order == p)[:, None]
        locked = jnp.where(frozen[:, None], c.h, jnp.where(at, fh, proposal))
        h_next = jnp.where(all_ok | exact_update, proposal, locked)
        result, done = termination(converged | exact_update, finite, jnp.array(False), out_of_steps)
        residual = time.max(row_sizes(solver.norm, r))
        # Certified: the refinement (for DEER, the last Newton update) moved no
        # step beyond the tolerance and is the better answer, so it is returned;
        # so is an exact update. Any other stop keeps the measured trajectory
        # (also an exact one, whose refinement may be NaN).
        keep_proposal = (converged & certified & ~exact) | exact_update
        h_next = jnp.where(done & ~keep_proposal, c.h, h_next)
        history = c.history
        if history is not None:
            history = history.at[c.step].set(residual)
        if update_exact:
            # The returned sweep is the sequential answer: every step is exactly
            # the cell of its predecessor (residual 0, all steps converged).
            residual = jnp.where(exact_update, 0, residual).astype(dtype)
            p = jnp.where(exact_update, total, p)
        return _Carry(
            h=h_next,
            state=state,
            step=c.step + jnp.where(done & ~exact_update, 0, 1),
            done=done,
            result=result,
            residual=residual,
            converged_steps=jnp.minimum(p, total),
            history=history,
        )

    window = solver.window_length(length)
    if window is not None and window < length:
        if time.axis_name is not None:
            raise ValueError(
                f"{type(solver).__name__}: a window (`window={window}`) needs an unsharded "
                "time axis; drop `mesh=` or the window."
            )
        if jax.tree.leaves(init.state):
            raise TypeError(
                f"{type(solver).__name__}: a solver with a window must keep no state "
                "(`init` returning None)."
            )
        init = _window_phase(solver, problem, init, window, rtol, atol, max_steps, extrapolate)
    final = while_loop(lambda c: ~c.done, body, init)
    stats = {
        "num_steps": final.step,
        "residual": final.residual,
        "converged_steps": final.converged_steps,
    }
    if record_residuals:
        stats["residual_history"] = final.history
    return final.h, final.result, stats


def _window_phase(solver, problem, init, window, rtol, atol, max_steps, extrapolate):
    """The per-step phase of `iterate_scan` on a sliding window of `window` steps.

    Runs until every step meets the tolerance (then `iterate_scan`'s own loop
    certifies the whole trajectory), a non-finite exact value, or `max_steps`.
    `converged_steps` is the first unconverged step in scan order, as there.
    """
    length = init.h.shape[0]
    reverse = problem.reverse
    local = jnp.arange(window)

    def index(s):
        """The array index of scan position `s`."""
        return length - 1 - s if reverse else s

    def body(carry):
        c, frontier = carry
        p = c.converged_steps
        s = jnp.minimum(p, length - window)  # the window's first step, in scan order
        lo = length - s - window if reverse else s  # its first row in the array
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, lo, window)  # noqa: E731
        h = rows(c.h)
        order = window - 1 - local if reverse else local  # each row's place in the window
        scan_pos = s + order
        if extrapolate:
            # Steps the window never reached start from the latest state evaluated.
            latest = jnp.where(frontier > 0, c.h[index(jnp.maximum(frontier - 1, 0))], problem.h0)
            h = jnp.where((scan_pos >= frontier)[:, None], latest, h)
        start = jnp.where(s > 0, c.h[index(jnp.maximum(s - 1, 0))], problem.h0)
        sub = ScanProblem(
            problem.cell, start, jax.tree.map(rows, problem.xs), Time(), reverse, problem.linear
        )
        fh, derivatives = solver.linearise(sub, h, None)
        r = h - fh
        ok = rows_meet(solver.norm, r, h, rtol, atol) | (order < p - s)
        fh_finite = jnp.all(jnp.isfinite(fh), axis=1)
        firsts = jnp.min(
            jnp.stack([jnp.where(ok, window, order), jnp.where(ok | fh_finite, window, order)]),
            axis=1,
        )
        p_local, q_local = firsts[0], firsts[1]
        finite = (p_local >= window) | (q_local != p_local)
        frozen = order < p_local
        h_next, _ = solver.update(sub, h, fh, derivatives, frozen, None)
        proposal_finite = jnp.all(jnp.isfinite(h_next), axis=1)
        proposal = jnp.where(proposal_finite[:, None], h_next, jnp.where(fh_finite[:, None], fh, h))
        at = (order == p_local)[:, None]
        h_next = jnp.where(frozen[:, None], h, jnp.where(at, fh, proposal))
        # A window whose steps all meet the tolerance needs no update: it is not
        # counted (as the full loop's certifying measurement), nor stopped by
        # `max_steps` (which bounds updates).
        needs_update = p_local < window
        out_of_steps = (c.step >= max_steps) & needs_update
        result, done = termination(jnp.array(False), finite, jnp.array(False), out_of_steps)
        residual = jnp.max(row_sizes(solver.norm, r))
        history = c.history
        if history is not None:
            history = history.at[c.step].set(residual)
        # A stop keeps the measured window (with its extrapolated steps), so that
        # `converged_steps` and `residual` describe the returned trajectory.
        # Otherwise the first unconverged step is now its exact value from a
        # frozen predecessor: it counts as converged at once (so `T` iterations
        # suffice, as without a window, and a window of 1 is the sequential scan).
        written = jnp.where(done, h, h_next)
        c = _Carry(
            h=jax.lax.dynamic_update_slice_in_dim(c.h, written, lo, axis=0),
            state=c.state,
            step=c.step + jnp.where(done | ~needs_update, 0, 1),
            done=done,
            result=result,
            residual=residual,
            converged_steps=s + jnp.where(done, p_local, jnp.minimum(p_local + 1, window)),
            history=history,
        )
        return c, jnp.maximum(frontier, s + window)

    def cond(carry):
        c, _ = carry
        return ~c.done & (c.converged_steps < length)

    return while_loop(cond, body, (init, jnp.array(0)))[0]


_HINT = (
    "Pass `throw=False` to `fixpoint.scan` to get NaN gradients instead, or choose "
    "another solver for the backward recurrence with `adjoint_solver=`."
)


def scan_linear_solve(solver: AbstractScanSolver, throw: bool, time, reverse: bool):
    """The backward solve of `fixpoint.scan`'s implicit rule, at a solution.

    Returns `solve_at(h, inputs) -> solve(matvec, b, transpose_of=None)`. The
    operator `I - ∂F/∂H` is block bidiagonal, so both solves are linear
    recurrences, run by `solver` through the same loop as the forward pass:

    - forward (JVP): `v_t = A_t v_{t-1} + b_t`, in the scan's direction;
    - transposed (VJP): `λ_t = b_t + A_{t+1}ᵀ λ_{t+1}`, in the opposite direction,

    with `A_t = ∂cell/∂h` at `(h_{t-1}, x_t)`. Tolerance: the solver's `rtol`,
    and `max(rtol, atol) · max|b|` as `atol`. A solve that does not converge
    raises (`throw=True`) or returns NaN.
    """

    def solve_at(h, inputs):
        cell_fn, xs, h0 = inputs
        cell = lambda hp, x: cell_fn(hp, x)[0]  # noqa: E731
        hp = time.shift(h, h0, reverse)
        total = h.shape[0] * time.size
        zero = jnp.zeros_like(h0)

        def solve(matvec, b, transpose_of=None):
            del matvec
            if transpose_of is None:

                def tangent(v, inp):
                    b_t, hp_t, x_t = inp
                    return jax.jvp(lambda z: cell(z, x_t), (hp_t,), (v,))[1] + b_t

                problem = ScanProblem(tangent, zero, (b, hp, xs), time, reverse, linear=True)
            else:
                x_next = jax.tree.map(lambda a: time.shift(a, a[0], not reverse), xs)
                order = time.order(h.shape[0], reverse)
                has_next = order < total - 1

                def cotangent(lam, inp):
                    b_t, h_t, x_t, m = inp
                    g = jax.vjp(lambda z: cell(z, x_t), h_t)[1](lam)[0]
                    return jnp.where(m, g, 0) + b_t

                inputs = (b, h, x_next, has_next)
                problem = ScanProblem(cotangent, zero, inputs, time, not reverse, linear=True)
            rtol, atol = scan_tolerances(solver, b.dtype)
            scale = max(rtol, atol) * time.max(jnp.abs(b))
            active = solver.linear_solver(problem)
            x, result, stats = iterate_scan(
                active,
                problem,
                jnp.zeros_like(b),
                rtol=rtol,
                atol=scale,
                max_steps=total + EXTRA_STEPS,
                extrapolate=True,
            )
            failed = result != RESULTS.successful
            steps, res = stats["num_steps"], stats["residual"]
            return flag_failure(x, failed, steps, res, throw, _HINT)

        return solve

    return solve_at
