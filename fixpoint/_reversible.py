"""Reversible iterations and the adjoint that runs them backwards (RevDEQ).

A reversible solver's iteration is a two-step recurrence

    w_{k+1} = update(w_{k-1}, w_k, f(w_k)),    w_{-1} = w_0 = y0,

whose `update` can be solved for `w_{k-1}` (`revert`). The loop's iterate is
`w_k`; the solver's state carries `w_{k-1}`. `ReversibleAdjoint` keeps only the
last two iterates: its backward pass recovers `w_{k-1}` from `(w_k, w_{k+1})`
step by step and pulls the cotangent back through each step with one VJP of
`f`, so the gradient is that of the iteration itself (as `UnrolledAdjoint`
gives it) in memory that does not grow with the number of steps.

Backward recursion, for `k = N-1, ..., 0`, carrying `(w_k, w_{k+1}, b_k,
a_{k+1})` where `a_{k+1}` is the full cotangent of `w_{k+1}` and `b_k` the part
of `w_k`'s that step `k+1` gave:

    f_k = f(w_k)                          (with its VJP)
    w_{k-1} = revert(w_k, w_{k+1}, f_k)
    (d_prev, d_w, d_f) = VJP of update at (w_{k-1}, w_k, f_k), applied to a_{k+1}
    a_k = b_k + d_w + J_f(w_k)^T d_f,    b_{k-1} = d_prev,    θ̄ += ∂_θ f(w_k)^T d_f

and at the end `ȳ0 = a_0 + b_{-1}` (both `w_0` and `w_{-1}` are `y0`).
"""

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._adjoint import AbstractAdjoint
from ._checks import as_python_number, check_number
from ._custom_types import Failed, FlatY, Inputs, Primal, Rest
from ._errors import checked
from ._fixed_point_problem import Problem
from ._fixed_point_solver import AbstractSolver, Step
from ._manual import while_loop
from ._solution import RESULTS


class ReversibleState(NamedTuple):
    """The state of an `AbstractReversibleSolver`: the last two iterates.

    After the step at `w_k`, `current` is `w_k` and `previous` is `w_{k-1}`
    (both are `y0` before the first step). At the end of a solve that stopped
    at `w_N`, `previous` is `w_{N-1}`: with `w_N`, where the reversal starts.

    **Arguments:**

    - `current`: the last iterate evaluated, flat, shape `(n,)`.
    - `previous`: the one before it, flat, shape `(n,)`.
    """

    current: jax.Array
    previous: jax.Array


class AbstractReversibleSolver(AbstractSolver[ReversibleState]):
    """A solver whose iteration can be run backwards exactly (in exact arithmetic).

    The iteration is the two-step recurrence
    `w_{k+1} = update(w_{k-1}, w_k, f(w_k))` from `w_{-1} = w_0 = y0`, one
    evaluation of `f` per step, and `revert` solves it for `w_{k-1}`. This
    class implements `init` and `step` (do not override them); a subclass
    (a final `eqx.Module`) provides the fields `rtol`, `atol`, `norm` and the
    two methods below. `fixpoint.ReversibleAdjoint` differentiates any such
    solver by running it backwards.
    """

    @abc.abstractmethod
    def update(
        self, previous: Float[Array, " n"], y: Float[Array, " n"], fy: Float[Array, " n"]
    ) -> Float[Array, " n"]:
        """The next iterate `w_{k+1}` from `w_{k-1}`, `w_k` and `f(w_k)`.

        **Arguments:**

        - `previous`: `w_{k-1}`, flat, shape `(n,)`.
        - `y`: `w_k`, flat.
        - `fy`: `f(w_k)`, flat.

        **Returns:**

        `w_{k+1}`, flat, shape `(n,)`.
        """

    @abc.abstractmethod
    def revert(
        self, y: Float[Array, " n"], y_next: Float[Array, " n"], fy: Float[Array, " n"]
    ) -> Float[Array, " n"]:
        """The inverse of `update` in its first argument: `w_{k-1}` from `w_k`,
        `w_{k+1}` and `f(w_k)`.

        **Arguments:**

        - `y`: `w_k`, flat, shape `(n,)`.
        - `y_next`: `w_{k+1}`, flat.
        - `fy`: `f(w_k)`, flat.

        **Returns:**

        `w_{k-1}`, flat, shape `(n,)`.
        """

    def init(self, problem, y, args):
        del problem, args
        return ReversibleState(current=y, previous=y)

    def step(self, problem, y, args, state):
        ev = problem.evaluate(y, args)
        return Step(self.update(state.current, y, ev.fy), ReversibleState(y, state.current), ev)


_WHAT = "The backward pass of `ReversibleAdjoint`"
_HINT = (
    "Take fewer forward steps (a looser tolerance, or a smaller `beta`), use float64, or use "
    "`fixpoint.ImplicitAdjoint()`; `ReversibleAdjoint(rtol=...)` sets the accepted drift. "
    "Pass `throw=False` to get NaN gradients instead of an error."
)


class ReversibleAdjoint(AbstractAdjoint):
    """The exact gradient of a reversible iteration, in O(1) memory.

    Used with `fixpoint.solvers.Reversible` (or another
    `fixpoint.internal.AbstractReversibleSolver`) in `fixpoint.fixed_point`,
    `fixpoint.root_find` and the layers; any other solver is refused with a
    message. The forward solve keeps only its last two iterates; the backward
    pass runs the iteration backwards from them, recovering each earlier iterate
    from the two after it, and pulls the cotangent back through every step with
    one VJP of `fn`. The result is the gradient of the iteration itself, as
    `UnrolledAdjoint` computes it from stored checkpoints, also with respect to
    `y0`, for memory that does not grow with the number of steps and one VJP of
    `fn` per forward step. Reverse mode (`jax.grad`, `jax.vjp`; forward over
    reverse, as `jax.hessian`, works too); the forward loop is not compacted
    under `jax.vmap`.

    *How exact.* Each reversed step divides by `1 - beta`: a rounding error
    made while reversing grows by `1/|λ|` per step, `λ` the fastest-decaying
    mode of the two-step iteration. For an eigenvalue `μ` of `J_f` the modes
    solve `λ² = β μ λ + (1 - β)`, so `|λ| ≤ √(1 - beta)`, with equality only
    where `μ = 0` (for `β = 0.8`: a factor `√5 ≈ 2.2` per step where `f` is
    flat, 3.4 where `μ = 0.5`). After enough steps the recovered trajectory
    leaves the true one. The backward pass measures this at no cost: it ends
    at the start, which it knows. When the recovered start `ŵ_0` (or
    `ŵ_{-1}`) is farther from `y0` than `rtol` times the scale of the numbers,
    `max(‖y - y0‖, ‖y0‖, ‖y‖)` in the solver's norm, or the reversal
    overflowed, the gradient is refused: `fixpoint.SolveError` with
    `RESULTS.reversal_lost`, or NaN with `throw=False`. As a rule the
    reversal holds while that amplification stays below about `rtol / ε`
    (`ε` the dtype's machine epsilon): at `β = 0.8`, about a dozen steps in
    float32 and a few dozen in float64 (see `bench/reversible.py`). The
    check tests the trajectory, not the gradient: it is conservative, since
    the cotangent decays where the recovered trajectory is worst.

    **Arguments:**

    - `rtol`: the accepted drift of the recovered start, relative to the scale
      above (default `1e-2`); `None` accepts any finite reversal.

    A failed forward solve gives a NaN gradient wherever its cotangent is
    nonzero, as with every adjoint.

    McCallum et al., *Reversible Deep Equilibrium Models*, arXiv:2509.12917, 2025.
    """

    rtol: float | None = eqx.field(default=1e-2, converter=as_python_number)
    reverse_mode_only: ClassVar[bool] = True

    def __check_init__(self) -> None:
        if self.rtol is not None:
            check_number(self.rtol, "rtol", ">= 0", owner="ReversibleAdjoint")

    def apply(
        self,
        primal: Primal,
        residual,
        inputs: Inputs,
        y0: FlatY,
        tolerances: tuple[float, float],
        failed: Failed | None = None,
        throw: bool = True,
    ) -> tuple[FlatY, Rest]:
        """Refused: the reversal needs the solver and its state, which only
        `fixpoint.fixed_point` and `fixpoint.root_find` hand over (through
        `reverse`). `custom_fixed_point` / `custom_root` run a solver of the user's."""
        del primal, residual, inputs, y0, tolerances, failed, throw
        raise TypeError(
            "`ReversibleAdjoint` runs a `fixpoint.solvers.Reversible` iteration backwards, "
            "so it works with `fixpoint.fixed_point` and `fixpoint.root_find` (and layers "
            "that solve with them, such as `DEQ`) only, not with a solver of your own "
            "(`custom_fixed_point`, `custom_root`) nor with a layer that runs its own loop "
            "(`MonDEQ`'s operator splitting); use `fixpoint.ImplicitAdjoint()` or "
            "`fixpoint.UnrolledAdjoint()` here."
        )

    def reverse(
        self,
        primal: Primal,
        inputs: Inputs,
        y0: FlatY,
        solver: AbstractSolver,
        kind: str,
        failed: Failed,
        throw: bool,
    ) -> tuple[FlatY, Rest]:
        """Run the forward loop and attach the reversed iteration as its VJP.

        **Arguments:**

        - `primal`: as for `apply`; its `rest` is `(aux, result, stats, state)`,
          `state` the solver's final `ReversibleState` and `stats["num_steps"]`
          the number of steps to run backwards.
        - `inputs`: `(flat_fn, args, ...)` as the fixed-point family builds them.
        - `y0`: the flat initial guess.
        - `solver`: the forward solver; anything but an
          `AbstractReversibleSolver` is refused (a `TypeError`).
        - `kind`: `"fixed_point"` or `"root"` (the `Problem` kind).
        - `failed`: `failed(y, rest, inputs)`, whether the forward solve failed.
        - `throw`: whether a lost reversal raises (else NaN gradients).

        **Returns:**

        `(y, rest)` with `y` carrying the reversed iteration's VJP.
        """
        if not isinstance(solver, AbstractReversibleSolver):
            raise TypeError(
                "`ReversibleAdjoint` runs the iteration backwards and needs a reversible "
                f"solver (`fixpoint.solvers.Reversible`), got {type(solver).__name__}; for "
                "this solver use `fixpoint.ImplicitAdjoint()` (the implicit gradient) or "
                "`fixpoint.UnrolledAdjoint()` (through stored checkpoints)."
            )
        run = lambda i, y: primal(i, y, "lax", None)  # noqa: E731
        y, rest = _reversible(
            (inputs, y0),
            run=run,
            solver=solver,
            kind=kind,
            failed=failed,
            throw=throw,
            rtol=self.rtol,
        )
        return y, jax.lax.stop_gradient(rest)


@eqx.filter_custom_vjp
def _reversible(diff, *, run, solver, kind, failed, throw, rtol):
    del solver, kind, failed, throw, rtol
    return run(*diff)


@_reversible.def_fwd
def _reversible_fwd(perturbed, diff, *, run, solver, kind, failed, throw, rtol):
    del perturbed, solver, kind, failed, throw, rtol
    out = run(*diff)
    return out, out


@_reversible.def_bwd
def _reversible_bwd(residuals, ct, perturbed, diff, *, run, solver, kind, failed, throw, rtol):
    del run
    inputs, y0 = diff
    perturbed_inputs, perturbed_y0 = perturbed
    y, rest = residuals
    ct_y = ct[0] if ct[0] is not None else jnp.zeros_like(y)
    state: Any = rest[-1]
    steps = rest[2]["num_steps"]
    bad = failed(y, rest, inputs)
    # Only the inputs being differentiated: no buffer, and no check, for the rest
    # (an infinite derivative of a constant nobody asked about is not a failure).
    wanted = jax.tree.map(
        lambda x, p: bool(p) and eqx.is_inexact_array(x), inputs, perturbed_inputs
    )
    live, frozen = eqx.partition(inputs, wanted)

    def fmap(w, live):
        i = eqx.combine(live, frozen)
        return Problem(i[0], kind).evaluate(w, i[1]).fy

    def body(carry):
        k, w, w_next, b, a_next, grads = carry
        fw, vjp_f = jax.vjp(fmap, w, live)
        previous = solver.revert(w, w_next, fw)
        _, vjp_update = jax.vjp(solver.update, previous, w, fw)
        d_previous, d_w, d_f = vjp_update(a_next)
        dw, d_live = vjp_f(d_f)
        grads = jax.tree.map(jnp.add, grads, d_live)
        return k - 1, previous, w, d_previous, b + d_w + dw, grads

    zeros = jax.tree.map(jnp.zeros_like, live)
    init = (steps, state.previous, y, jnp.zeros_like(y), ct_y, zeros)
    _, w_m1, w_0, b, a, grads = while_loop(lambda c: c[0] > 0, body, init)
    ct_y0 = a + b
    # An all-zero cotangent (a masked-out sample) gives exactly zero, whatever
    # the Jacobians hold; a failed forward solve gives NaN where it matters.
    zero = jnp.all(ct_y == 0)
    finite = jnp.isfinite(ct_y0).all() if perturbed_y0 else jnp.array(True)
    for g in jax.tree.leaves(grads):
        finite = finite & jnp.isfinite(g).all()
    # The reversal ends at the start, which is known: how far it drifted,
    # relative to the scale of the numbers (rounding errors scale with the
    # iterates, not only with the distance travelled).
    drift = jnp.maximum(solver.norm(w_m1 - y0), solver.norm(w_0 - y0))
    scale = jnp.maximum(solver.norm(y - y0), jnp.maximum(solver.norm(y0), solver.norm(y)))
    ratio = drift / scale
    ratio = jnp.where(drift == 0, jnp.zeros_like(ratio), ratio)
    held = jnp.isfinite(ratio) & finite
    if rtol is not None:
        held = held & (ratio <= rtol)
    # A non-finite cotangent (from the loss itself) just propagates.
    lost = ~bad & ~zero & ~held & jnp.isfinite(ct_y).all()
    if throw:
        codes = jnp.where(lost, RESULTS.reversal_lost._value, RESULTS.successful._value)
        # On every output: a caller may use any one of them.
        grads, ct_y0 = checked((grads, ct_y0), codes, steps, ratio, _WHAT, _HINT)

    def nan_unless_zero(g):
        return jnp.where(zero, jnp.zeros_like(g), jnp.full_like(g, jnp.nan))

    def guard(g):
        return jnp.where(zero, jnp.zeros_like(g), jnp.where(bad | lost, nan_unless_zero(g), g))

    return (jax.tree.map(guard, grads), guard(ct_y0) if perturbed_y0 else None)
