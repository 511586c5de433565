"""Homotopy continuation: follow the path from an easy problem to the target."""

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

import fixpoint
from fixpoint import RESULTS, internal


class _State(NamedTuple):
    lam: jnp.ndarray  # where on the path the next iterate is meant to be
    at: jnp.ndarray  # λ of the iterate evaluated last
    step: jnp.ndarray  # the current step along the path, in λ
    start: jnp.ndarray  # G(y_0), which the homotopy removes as λ goes 0 -> 1
    started: jnp.ndarray  # whether `start` has been measured (at the first step)
    anchor: jnp.ndarray  # the last accepted point on the path
    anchor_lam: jnp.ndarray
    anchor_tangent: jnp.ndarray  # dy/dλ at the anchor
    corrections: jnp.ndarray  # Newton corrections since the last prediction
    last_norm: jnp.ndarray  # ‖H‖ at the previous correction
    accepted: jnp.ndarray  # points accepted on the path
    rejected: jnp.ndarray  # predictions rejected (step halved)


class Homotopy(internal.AbstractSolver):
    """Newton-homotopy continuation: from `y_0` along the path of roots of
    `H(y, λ) = G(y) − (1 − λ) G(y_0)` from `λ = 0` (where `y_0` is the root) to
    `λ = 1` (the problem itself), by prediction and correction.

    `G` is the root form (`root_find`: `fn`; `fixed_point`: `y − fn(y)`). Along
    the path the residual keeps its direction and shrinks, `G(y(λ)) = (1 −
    λ) G(y_0)`; it is the trajectory of the Newton flow, which full Newton steps
    only approximate: where Newton from `y_0` overshoots and diverges (`arctan`
    from `|y_0| > 1.39`), the path still leads to the root.

    Each step linearises `G` once (`jax.linearize`, then the dense Jacobian from
    `n` JVPs, so for small problems) and solves `J [c, t] = −[H, G(y_0)]` by one
    LU:

    - **correct**: while `‖H(y, λ)‖ > corrector_rtol · ‖G(y_0)‖`, a Newton step
      `y ← y + c` at fixed `λ`; a correction that does not shrink `‖H‖`, more
      than `max_corrections` of them, or a prediction that lands farther from
      the path than `‖G(y_0)‖`, rejects the prediction;
    - **predict**: once corrected, the point is accepted and the next one
      predicted along the tangent `dy/dλ = t`: `y ← y + h t`, `λ ← λ + h`. The
      step `h` doubles after a prediction needing at most one correction (up to
      `max_step`), and halves, from the last accepted point, after a rejection;
    - at `λ = 1` the corrections are Newton's method on `G` itself, until the
      loop's convergence test passes (as for `Newton`: the residual `G(y)`).

    If the step falls below `min_step` the path cannot be followed: a fold (the
    path turns back in `λ`, its tangent blowing up) or a singular Jacobian. The
    solve then ends with `RESULTS.path_ended`. A rejected point counts as a
    trial (never as divergence). `stats["path_points"]` and
    `stats["rejected"]` count accepted and rejected predictions, and
    `stats["lambda"]` is the `λ` of the returned point (1 once on the target;
    0 when `y_0` already meets the tolerance). A solve that runs out of steps
    mid-path returns its last iterate, which may be a prediction or correction
    off the path: `lambda` is where that point was meant to be.

    The gradient (`ImplicitAdjoint`) is that of the root reached, which does
    not depend on the path.

    Allgower and Georg, *Introduction to Numerical Continuation Methods*, SIAM
    2003 (predictor–corrector methods, chapter 2; the Newton homotopy); Ding et
    al., *Two sides of the same coin: bridging deep equilibrium models and
    neural ODEs via homotopy continuation* (HomoODE), NeurIPS 2023.

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test and of `H` (default
      `fixpoint.max_norm`).

    Keyword-only:

    - `initial_step`: the first step in `λ`, in `(0, 1]` (default 0.1).
    - `max_step`: the largest step in `λ`, in `(0, 1]` (default 0.5).
    - `min_step`: the step below which the path ends, in `(0, 1)` (default 1e-5).
    - `corrector_rtol`: how close to the path a point must be to be accepted,
      relative to `‖G(y_0)‖`, in `(0, 1)` (default 1e-3).
    - `max_corrections`: Newton corrections allowed per prediction before it is
      rejected, an int `>= 1` (default 5).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    initial_step: float = eqx.field(default=0.1, converter=internal.as_python_number, kw_only=True)
    max_step: float = eqx.field(default=0.5, converter=internal.as_python_number, kw_only=True)
    min_step: float = eqx.field(default=1e-5, converter=internal.as_python_number, kw_only=True)
    corrector_rtol: float = eqx.field(
        default=1e-3, converter=internal.as_python_number, kw_only=True
    )
    max_corrections: int = eqx.field(default=5, kw_only=True)
    # A prediction moves along the path: the step estimates no error.
    step_estimates_error: ClassVar[bool] = False

    def __check_init__(self):
        internal.check_tolerances(self)
        owner = "Homotopy"
        for name in ("initial_step", "max_step"):
            internal.check_number(getattr(self, name), name, "(0, 1]", owner=owner)
        internal.check_number(self.min_step, "min_step", "(0, 1)", owner=owner)
        internal.check_number(self.corrector_rtol, "corrector_rtol", "(0, 1)", owner=owner)
        internal.check_int(self.max_corrections, "max_corrections", 1, owner=owner)
        if not self.min_step <= self.initial_step <= self.max_step:
            raise ValueError(
                f"{owner}: need `min_step <= initial_step <= max_step`, got "
                f"{self.min_step}, {self.initial_step}, {self.max_step}."
            )

    def init(self, problem, y, args):
        rdtype = jnp.finfo(y.dtype).dtype
        zero = jnp.array(0)
        return _State(
            lam=jnp.array(0, rdtype),
            at=jnp.array(0, rdtype),
            step=jnp.array(self.initial_step, rdtype),
            start=jnp.zeros_like(y),
            started=jnp.array(False),
            anchor=y,
            anchor_lam=jnp.array(0, rdtype),
            anchor_tangent=jnp.zeros_like(y),
            corrections=zero,
            last_norm=jnp.array(jnp.inf, rdtype),
            accepted=zero,
            rejected=zero,
        )

    def step(self, problem, y, args, state):
        residual, jvp, aux = jax.linearize(lambda z: problem.residual(z, args), y, has_aux=True)
        ev = internal.Evaluation(fy=y - residual, residual=residual, aux=aux)
        work = y.dtype if jnp.finfo(y.dtype).bits >= 32 else jnp.dtype(jnp.float32)
        start = jnp.where(state.started, state.start, residual)
        lam = state.lam
        h_res = residual - (1 - lam).astype(y.dtype) * start
        # One LU for the correction and the tangent.
        eye = jnp.eye(y.shape[0], dtype=y.dtype)
        jac = jax.vmap(jvp, out_axes=1)(eye).astype(work)
        rhs = -jnp.stack([h_res, start], axis=1).astype(work)
        correction, tangent = jnp.linalg.solve(jac, rhs).astype(y.dtype).T
        h_norm = self.norm(h_res)
        scale = self.norm(start)
        at_end = lam >= 1
        finite = jnp.isfinite(h_norm) & jnp.all(jnp.isfinite(correction) & jnp.isfinite(tangent))
        stalled = (state.corrections > 0) & (h_norm > state.last_norm)
        # A prediction that lands farther from the path than the start's whole
        # residual (a nearly singular Jacobian makes the tangent huge) is
        # rejected at once, as a trial: never taken for divergence.
        overshot = state.started & (state.corrections == 0) & (h_norm > scale)
        too_many = (state.corrections >= self.max_corrections) & ~at_end
        reject = ~finite | stalled | too_many | overshot
        on_path = ~at_end & (h_norm <= self.corrector_rtol * scale) & ~reject
        # Accept: a new anchor, and a prediction along the tangent.
        grow = jnp.where(state.started & (state.corrections <= 1), 2 * state.step, state.step)
        grow = jnp.minimum(grow, self.max_step)
        ahead = jnp.minimum(grow, 1 - lam)
        # Reject: back to the anchor, with half the step.
        half = state.step / 2
        anchor = jnp.where(on_path, y, state.anchor)
        anchor_lam = jnp.where(on_path, lam, state.anchor_lam)
        anchor_tangent = jnp.where(on_path, tangent, state.anchor_tangent)
        step = jnp.where(on_path, grow, jnp.where(reject, half, state.step))
        back = jnp.minimum(half, 1 - anchor_lam)
        y_next = jnp.where(
            on_path,
            y + ahead.astype(y.dtype) * tangent,
            jnp.where(reject, anchor + back.astype(y.dtype) * anchor_tangent, y + correction),
        )
        lam_next = jnp.where(on_path, lam + ahead, jnp.where(reject, anchor_lam + back, lam))
        lam_next = jnp.where(lam_next >= 1 - 1e-12, jnp.ones_like(lam_next), lam_next)
        ended = reject & (half < self.min_step)
        moved = on_path | reject
        next_state = _State(
            lam=lam_next,
            at=lam,
            step=step,
            start=start,
            started=jnp.array(True),
            anchor=anchor,
            anchor_lam=anchor_lam,
            anchor_tangent=anchor_tangent,
            corrections=jnp.where(moved, 0, state.corrections + 1),
            last_norm=jnp.where(moved, jnp.inf, h_norm),
            accepted=state.accepted + on_path.astype(state.accepted.dtype),
            rejected=state.rejected + reject.astype(state.rejected.dtype),
        )
        result = RESULTS.where(ended, RESULTS.path_ended, RESULTS.successful)
        return internal.Step(y_next, next_state, ev, result, trial=reject)

    def stats(self, state):
        return {"path_points": state.accepted, "rejected": state.rejected, "lambda": state.at}
