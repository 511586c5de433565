"""Newton over time: DEER, quasi-DEER and ELK.

Lim et al. 2024, "Parallelizing non-linear sequential models over the sequence
length" (DEER); Gonzalez et al. 2024, "Towards Scalable and Stable
Parallelization of Nonlinear RNNs" (quasi-DEER, ELK).

Linearising `h_t = cell(h_{t-1}, x_t)` around the current trajectory gives, for
the update `Δ = H_new - H`, the linear recurrence `Δ_t = A_t Δ_{t-1} + r_t` with
`A_t = ∂cell/∂h` and `r_t = cell(h_{t-1}, x_t) - h_t`: one associative scan.
"""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp

import fixpoint
from fixpoint import internal

from ._jacobi import Sequential


class DEER(internal.AbstractScanSolver):
    """Newton's method on the whole trajectory, with dense per-step Jacobians.

    Quadratic convergence near the solution; each iteration forms all `T`
    Jacobians (`jacfwd`, `D` JVPs per step) and solves the linear recurrence by
    one associative scan of `D×D` matrices at the highest matmul precision.
    Memory `O(T·D²)`. Its unfrozen Newton step certifies the answer (the
    first-order accumulated error). On unstable or chaotic dynamics Newton can
    overshoot wildly; the loop's safeguard still bounds the iterations by `T`,
    and `ELK` is the stable alternative. The adjoint's linear recurrences go to
    `Sequential` on the CPU at `D >= 16` (time unsharded), where one sweep
    costs far less than an associative scan of `D×D` matrices.

    Lim, Zhu, Selfridge & Kasim, *Parallelizing non-linear sequential models
    over the sequence length*, ICLR 2024 (DEER).

    **Arguments:**

    - `rtol`: the per-step relative tolerance; `None` (default): by the carry's
      dtype (`1e-6` float64, `1e-4` float32, see
      `fixpoint.internal.scan_tolerances`).
    - `atol`: the per-step absolute tolerance; `None` (default): as `rtol`.
    - `norm`: the per-step norm (default `fixpoint.max_norm`).
    """

    # None: the dtype's default (`internal.scan_tolerances`)
    rtol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    atol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm

    def __check_init__(self):
        internal.check_tolerances(self, allow_default=True)

    def init(self, problem, h):
        return None

    def linearise(self, problem, h, state):
        return problem.jacobians(h)

    def update(self, problem, h, fh, jac, frozen, state):
        delta = internal.linear_recurrence(
            problem.time, jac, _residual(h, fh, frozen), problem.reverse
        )
        return h + delta, state

    def refine(self, problem, h, fh, jac, state):
        # The unfrozen Newton step: exactly the first-order accumulated error.
        return self.update(problem, h, fh, jac, jnp.zeros(h.shape[0], bool), state)

    @property
    def refine_by_update(self) -> bool:
        return True

    def linear_solver(self, problem):
        return _linear_solver(self, problem)


class QuasiDEER(internal.AbstractScanSolver):
    """Quasi-Newton with the diagonals of the per-step Jacobians (`O(T·D)` memory).

    Each iteration solves a diagonal linear recurrence (elementwise associative
    scan). Exact Newton when the cell's Jacobian *is* diagonal (e.g.
    `fixpoint.layers.DiagonalGRUCell`, ParaRNN's construction): then pass
    `assume_diagonal=True` and the diagonal costs one JVP instead of `D`.

    Certification (once every step meets the tolerance) needs the error
    accumulated along the sequence, which the diagonal does not give: it takes
    `ScanProblem.refinement`: on the CPU (time unsharded) the sequential answer
    itself, one `lax.scan` of the cell, which is then returned (memory
    `O(T·D)`; cheaper there than any Newton step); otherwise one Newton step
    with dense Jacobians (`D` JVPs per step, memory `O(T·D²)` for that
    iteration). With `assume_diagonal=True` the diagonal step itself is used,
    exact if (and only if) the Jacobian really is diagonal. The adjoint's
    linear recurrences go to `DEER` (memory `O(T·D²)`), or to `Sequential` on
    the CPU at `D >= 16`; with `assume_diagonal=True` they stay with this solver.

    Gonzalez, Warrington, Smith & Linderman, *Towards Scalable and Stable
    Parallelization of Nonlinear RNNs*, NeurIPS 2024 (quasi-DEER).

    **Arguments:**

    - `rtol`: the per-step relative tolerance; `None` (default): by the carry's
      dtype (`1e-6` float64, `1e-4` float32, see
      `fixpoint.internal.scan_tolerances`).
    - `atol`: the per-step absolute tolerance; `None` (default): as `rtol`.
    - `norm`: the per-step norm (default `fixpoint.max_norm`).

    Keyword-only:

    - `assume_diagonal`: take `diag(J) = J · 1` (one JVP); right only for
      cells with diagonal Jacobians, otherwise a cruder quasi-Newton (default
      `False`).
    - `batch_size`: how many of the `D` JVPs extracting the exact diagonal
      run at once (memory `O(T·D·batch_size)`; default 32).
    """

    # None: the dtype's default (`internal.scan_tolerances`)
    rtol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    atol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    assume_diagonal: bool = eqx.field(default=False, kw_only=True)
    batch_size: int = eqx.field(default=32, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_tolerances(self, allow_default=True)
        _check_batch(self)

    def init(self, problem, h):
        return None

    def linearise(self, problem, h, state):
        return problem.diagonals(h, self.assume_diagonal, self.batch_size)

    def update(self, problem, h, fh, diag, frozen, state):
        delta = internal.linear_recurrence(
            problem.time, diag, _residual(h, fh, frozen), problem.reverse
        )
        return h + delta, state

    def exact(self, problem):
        return False, not self.assume_diagonal and problem.refinement_is_exact()

    def refine(self, problem, h, fh, diag, state):
        if self.assume_diagonal:
            # Exact Newton for the diagonal cells this option is meant for.
            return self.update(problem, h, fh, diag, jnp.zeros(h.shape[0], bool), state)
        return problem.refinement(h), state

    @property
    def refine_by_update(self) -> bool:
        return self.assume_diagonal

    def linear_solver(self, problem):
        return _linear_solver(self, problem)


class ELK(internal.AbstractScanSolver):
    """Levenberg–Marquardt over time as a Kalman smoother (quasi-ELK).

    The update minimises `Σ_t |Δ_t - a_t Δ_{t-1} - r_t|² + λ Σ_t |Δ_t|²` with
    `a_t` the diagonal of the step Jacobian. That is the posterior mean of a
    linear-Gaussian state-space model (dynamics `Δ_t = a_t Δ_{t-1} + r_t +` unit
    noise, observations `0 = Δ_t +` noise of variance `1/λ`), found by a
    parallel Kalman filter and Rauch–Tung–Striebel smoother: the filter
    variances by an associative scan of 2×2 Möbius maps, the means by two
    diagonal linear recurrences (forward, then backward). `λ = 0` is
    quasi-DEER; larger `λ` takes shorter, safer steps, so the iterates stay
    bounded on unstable or chaotic dynamics where (quasi-)DEER overshoots.

    With `adaptive=True` (default) `λ` is a trust-region parameter: when the
    sum of squared residuals fell (or grew by less than 1 %, which the loop's
    exact setting of the first unconverged step alone can cause), the step is
    kept and `λ` shrinks (×`decrease`); otherwise the step is retaken from the
    last accepted trajectory with `λ` grown (×`increase`). Memory `O(T·D)`, except for the
    certifying iteration and the adjoint, which are those of `QuasiDEER`.

    Gonzalez, Warrington, Smith & Linderman, *Towards Scalable and Stable
    Parallelization of Nonlinear RNNs*, NeurIPS 2024 (ELK); the
    smoother is Rauch, Tung & Striebel, *Maximum likelihood estimates of linear
    dynamic systems*, AIAA J. 1965.

    **Arguments:**

    - `rtol`: the per-step relative tolerance; `None` (default): by the carry's
      dtype (`1e-6` float64, `1e-4` float32, see
      `fixpoint.internal.scan_tolerances`).
    - `atol`: the per-step absolute tolerance; `None` (default): as `rtol`.
    - `norm`: the per-step norm (default `fixpoint.max_norm`).

    Keyword-only:

    - `lambda_0`: the initial (or, with `adaptive=False`, fixed) `λ ≥ 0`
      (default 1): larger is more cautious, the opposite of a fixed-point
      solver's `damping`.
    - `adaptive`: adapt `λ` as a trust-region parameter (default `True`).
    - `decrease`: the factor in `(0, 1)` by which `λ` shrinks after a kept
      step (default 0.3).
    - `increase`: the factor `> 1` by which `λ` grows after a rejected step
      (default 4).
    - `assume_diagonal`: as `QuasiDEER` (default `False`).
    - `batch_size`: as `QuasiDEER` (default 32).
    """

    # None: the dtype's default (`internal.scan_tolerances`)
    rtol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    atol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    lambda_0: float = eqx.field(default=1.0, converter=internal.as_python_number, kw_only=True)
    adaptive: bool = eqx.field(default=True, kw_only=True)
    decrease: float = eqx.field(default=0.3, converter=internal.as_python_number, kw_only=True)
    increase: float = eqx.field(default=4.0, converter=internal.as_python_number, kw_only=True)
    assume_diagonal: bool = eqx.field(default=False, kw_only=True)
    batch_size: int = eqx.field(default=32, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_tolerances(self, allow_default=True)
        _check_batch(self)
        internal.check_number(self.lambda_0, "lambda_0", ">= 0", owner="ELK")
        internal.check_bool(self.adaptive, "adaptive", owner="ELK")
        internal.check_number(self.decrease, "decrease", "(0, 1)", owner="ELK")
        internal.check_number(self.increase, "increase", "> 1", owner="ELK")

    def init(self, problem, h):
        if not self.adaptive:
            return None
        lam = jnp.asarray(self.lambda_0, h.dtype)
        return (lam, jnp.asarray(jnp.inf, h.dtype), h, jnp.zeros_like(h), jnp.zeros_like(h))

    def linearise(self, problem, h, state):
        return problem.diagonals(h, self.assume_diagonal, self.batch_size)

    def update(self, problem, h, fh, a, frozen, state):
        r = _residual(h, fh, frozen)
        smooth = lambda a, r, lam: kalman_smoother(  # noqa: E731
            problem.time, a, r, lam, problem.reverse, frozen
        )
        if not self.adaptive:
            return h + smooth(a, r, self.lambda_0), state
        lam, best, h_old, a_old, r_old = state
        merit = problem.time.sum(jnp.where(jnp.isfinite(r), r * r, jnp.inf))
        # Kept unless the merit grew by more than `_SLACK`: the loop sets the first
        # unconverged step to its exact value, and that alone raises the merit of
        # even a zero step by about `2 r_p·r_{p+1}` (relative `2/T` on a cell near
        # the identity). With a strict decrease such a step could never be kept
        # again once `λ` is large, and `λ` would grow without end (a 1000-step
        # diffusion sampler ran 1000 iterations at the loop's one step each).
        better = merit < best * (1 + _SLACK)
        lam = jnp.where(better, lam * self.decrease, jnp.maximum(lam, 1e-6) * self.increase)
        pairs = ((h, h_old), (a, a_old), (r, r_old))
        h_base, a, r = (jnp.where(better, new, old) for new, old in pairs)
        state = (lam, jnp.where(better, merit, best), h_base, a, r)
        # Retaking a step from the last accepted trajectory: the steps frozen since
        # then stay frozen (the loop keeps them), so they get no residual here.
        return h_base + smooth(a, jnp.where(frozen[:, None], 0, r), lam), state

    def exact(self, problem):
        return False, not self.assume_diagonal and problem.refinement_is_exact()

    def refine(self, problem, h, fh, a, state):
        if self.assume_diagonal:
            return h + internal.linear_recurrence(problem.time, a, fh - h, problem.reverse), state
        return problem.refinement(h), state

    def linear_solver(self, problem):
        return _linear_solver(self, problem)


# The relative growth of the merit that `ELK` still accepts (see `ELK.update`).
# Measured, float32: a 1000-step probability-flow sampler (D = 16) takes 13
# iterations at 1e-2 (1000 at 1e-3 and with a strict decrease); a GRU near the edge
# of chaos (D = 8, weights ×6, T = 1000) 483 (434 with a strict decrease, 590 at 1e-1).
_SLACK = 1e-2


def kalman_smoother(time, a, r, damping, reverse=False, frozen=None):
    """Posterior means of `Δ_t = a_t Δ_{t-1} + r_t + w_t`, `0 = Δ_t + v_t` (elementwise).

    `w_t ~ N(0, q_t)`, `v_t ~ N(0, 1/damping)`, `Δ_{-1} = 0` exactly, with
    `q_t = 1`, except `q_t = 0` on `frozen` steps (there `r_t` must be 0 too,
    so `Δ_t = 0` is known exactly). All in parallel over time: the filter
    variance obeys the Riccati recurrence
    `P_t = (a_t² P_{t-1} + q_t) / (damping (a_t² P_{t-1} + q_t) + 1)`, a Möbius
    map of `P_{t-1}`, so its prefix compositions are products of 2×2 matrices.
    """
    lam = jnp.asarray(damping, a.dtype)
    a2 = a * a
    q = jnp.ones_like(a) if frozen is None else jnp.broadcast_to(~frozen[:, None], a.shape)
    q = q.astype(a.dtype)
    mobius = jnp.stack([jnp.stack([a2, q], -1), jnp.stack([lam * a2, lam * q + 1], -1)], -2)
    prefix = time.associative_scan(_compose, mobius, reverse=reverse)
    p = prefix[..., 0, 1] / prefix[..., 1, 1]  # applied to P_{-1} = 0
    p_prev = time.shift(p, jnp.zeros_like(p[0]), reverse)
    p_pred = a2 * p_prev + q
    gain = 1 / (lam * p_pred + 1)  # 1 - K_t
    m = internal.linear_recurrence(time, gain * a, gain * r, reverse)
    back = not reverse
    a_next = time.shift(a, jnp.zeros_like(a[0]), back)
    r_next = time.shift(r, jnp.zeros_like(r[0]), back)
    p_pred_next = time.shift(p_pred, jnp.ones_like(p_pred[0]), back)
    # Inside a frozen prefix both variances vanish and the smoother gain is 0.
    g = jnp.where(p_pred_next > 0, p * a_next / jnp.where(p_pred_next > 0, p_pred_next, 1), 0)
    e = m - g * (a_next * m + r_next)
    return internal.linear_recurrence(time, g, e, back)


def _linear_solver(solver, problem):
    """The adjoint's linear recurrences of DEER, QuasiDEER and ELK.

    Where `newton_step` is the sequential sweep (the CPU at `D >= 16`),
    `Sequential`: one sweep solves them, instead of `D` JVPs of the linear map
    per step and an associative scan of `D×D` matrices (GRU, D = 32, T = 1e4,
    float32, DEER: forward+gradient 294 -> 183 ms, the forward 146 ms).
    Elsewhere `DEER`: on a linear recurrence its first Newton step is the
    answer, and its second certifies it without a branch (QuasiDEER, GRU,
    D = 8, T = 1e4, CPU: forward+gradient 24.9 -> 17.5 ms, the forward
    11 ms). With `assume_diagonal=True` the solver itself.
    """
    if getattr(solver, "assume_diagonal", False):
        return solver
    if problem.newton_method() == "sequential":
        return Sequential(solver.rtol, solver.atol, solver.norm)
    if isinstance(solver, DEER):
        return solver
    return DEER(solver.rtol, solver.atol, solver.norm)


def _residual(h, fh, frozen):
    """`F(H) - H`, zero on the frozen steps (they are taken as exact)."""
    return jnp.where(frozen[:, None], 0, fh - h)


def _compose(x, y):
    """`y ∘ x` for batches of 2×2 matrices, rescaled (a Möbius map is scale-free)."""
    out = jnp.stack(
        [
            jnp.stack(
                [
                    y[..., 0, 0] * x[..., 0, 0] + y[..., 0, 1] * x[..., 1, 0],
                    y[..., 0, 0] * x[..., 0, 1] + y[..., 0, 1] * x[..., 1, 1],
                ],
                -1,
            ),
            jnp.stack(
                [
                    y[..., 1, 0] * x[..., 0, 0] + y[..., 1, 1] * x[..., 1, 0],
                    y[..., 1, 0] * x[..., 0, 1] + y[..., 1, 1] * x[..., 1, 1],
                ],
                -1,
            ),
        ],
        -2,
    )
    return out / jnp.max(jnp.abs(out), axis=(-2, -1), keepdims=True)


def _check_batch(solver):
    owner = type(solver).__name__
    internal.check_bool(solver.assume_diagonal, "assume_diagonal", owner=owner)
    internal.check_int(solver.batch_size, "batch_size", 1, owner=owner)
