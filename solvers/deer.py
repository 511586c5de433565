"""Newton over time: DEER, quasi-DEER and ELK.

Lim et al. 2024, "Parallelizing non-linear sequential models over the sequence
length" (DEER); Gonzalez et al. 2024, "Towards Scalable and Stable
Parallelization of Nonlinear RNNs" (quasi-DEER, ELK).

Linearising `h_t = cell(h_{t-1}, x_t)` around the current trajectory gives, for
the update `Δ = H_new - H`, the linear recurrence `Δ_t = A_t Δ_{t-1} + r_t` with
`A_t = ∂cell/∂h` and `r_t = cell(h_{t-1}, x_t) - h_t`: one associative scan.
"""

from collections.abc import Callable

import jax.numpy as jnp

import fixpoint

_RTOL = _ATOL = 1e-6


class DEER(fixpoint.AbstractScanSolver):
    """Newton's method on the whole trajectory, with dense per-step Jacobians.

    Quadratic convergence near the solution; each iteration forms all `T`
    Jacobians (`jacfwd`, `D` JVPs per step) and solves the linear recurrence by
    one associative scan of `D×D` matrices at the highest matmul precision.
    Memory `O(T·D²)`. On unstable or chaotic dynamics Newton can overshoot
    wildly; the loop's safeguard still bounds the iterations by `T`, and `ELK`
    is the stable alternative.

    **Arguments:** `rtol`, `atol`, `norm` (per step; default max-norm).
    """

    rtol: float = _RTOL
    atol: float = _ATOL
    norm: Callable = fixpoint.max_norm

    def __check_init__(self):
        fixpoint.check_tolerances(self)

    def init(self, problem, h):
        return None

    def step(self, problem, h, state):
        fh, jac = problem.jacobians(h)
        delta = fixpoint.linear_recurrence(problem.time, jac, fh - h, problem.reverse)
        return fixpoint.ScanStep(h + delta, state, fh)


class QuasiDEER(fixpoint.AbstractScanSolver):
    """Quasi-Newton with the diagonals of the per-step Jacobians (`O(T·D)` memory).

    Each iteration solves a diagonal linear recurrence (elementwise associative
    scan). Exact Newton when the cell's Jacobian *is* diagonal (e.g.
    `layers.DiagonalGRUCell`, ParaRNN's construction): then pass
    `assume_diagonal=True` and the diagonal costs one JVP instead of `D`.

    **Arguments:**

    - `rtol`, `atol`, `norm`: per-step tolerance (default max-norm).
    - `assume_diagonal`: take `diag(J) = J · 1` (one JVP); right only for
      cells with diagonal Jacobians, otherwise a cruder quasi-Newton.
    - `batch_size`: how many of the `D` JVPs extracting the exact diagonal
      run at once (memory `O(T·D·batch_size)`).
    """

    rtol: float = _RTOL
    atol: float = _ATOL
    norm: Callable = fixpoint.max_norm
    assume_diagonal: bool = False
    batch_size: int = 32

    def __check_init__(self):
        fixpoint.check_tolerances(self)
        _check_batch(self)

    def init(self, problem, h):
        return None

    def step(self, problem, h, state):
        fh, diag = problem.diagonals(h, self.assume_diagonal, self.batch_size)
        delta = fixpoint.linear_recurrence(problem.time, diag, fh - h, problem.reverse)
        return fixpoint.ScanStep(h + delta, state, fh)


class ELK(fixpoint.AbstractScanSolver):
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
    sum of squared residuals fell, the step is kept and `λ` shrinks
    (×`decrease`); when it rose, the step is retaken from the last accepted
    trajectory with `λ` grown (×`increase`). Memory `O(T·D)`.

    **Arguments:** `damping` (the initial or fixed `λ ≥ 0`), `adaptive`,
    `decrease`, `increase`, `rtol`, `atol`, `norm`, `assume_diagonal`,
    `batch_size` (as `QuasiDEER`).
    """

    damping: float = 1.0
    adaptive: bool = True
    decrease: float = 0.3
    increase: float = 4.0
    rtol: float = _RTOL
    atol: float = _ATOL
    norm: Callable = fixpoint.max_norm
    assume_diagonal: bool = False
    batch_size: int = 32

    def __check_init__(self):
        fixpoint.check_tolerances(self)
        _check_batch(self)
        if not isinstance(self.damping, (int, float)) or not self.damping >= 0:
            raise ValueError(f"ELK: `damping` must be a number >= 0, got {self.damping!r}.")
        if not 0 < self.decrease < 1 or not self.increase > 1:
            raise ValueError(
                "ELK: need 0 < `decrease` < 1 < `increase`, got "
                f"{self.decrease!r} and {self.increase!r}."
            )

    def init(self, problem, h):
        if not self.adaptive:
            return None
        lam = jnp.asarray(self.damping, h.dtype)
        return (lam, jnp.asarray(jnp.inf, h.dtype), h, jnp.zeros_like(h), jnp.zeros_like(h))

    def step(self, problem, h, state):
        fh, a = problem.diagonals(h, self.assume_diagonal, self.batch_size)
        r = fh - h
        if not self.adaptive:
            delta = kalman_smoother(problem.time, a, r, self.damping, problem.reverse)
            return fixpoint.ScanStep(h + delta, state, fh)
        lam, best, h_old, a_old, r_old = state
        merit = problem.time.sum(jnp.where(jnp.isfinite(r), r * r, jnp.inf))
        better = merit < best
        lam = jnp.where(better, lam * self.decrease, jnp.maximum(lam, 1e-6) * self.increase)
        pairs = ((h, h_old), (a, a_old), (r, r_old))
        h_base, a, r = (jnp.where(better, new, old) for new, old in pairs)
        delta = kalman_smoother(problem.time, a, r, lam, problem.reverse)
        state = (lam, jnp.where(better, merit, best), h_base, a, r)
        return fixpoint.ScanStep(h_base + delta, state, fh)


def kalman_smoother(time, a, r, damping, reverse=False):
    """Posterior means of `Δ_t = a_t Δ_{t-1} + r_t + w_t`, `0 = Δ_t + v_t` (elementwise).

    `w_t ~ N(0, 1)`, `v_t ~ N(0, 1/damping)`, `Δ_{-1} = 0` exactly. All in
    parallel over time: the filter variance obeys the Riccati recurrence
    `P_t = (a_t² P_{t-1} + 1) / (damping (a_t² P_{t-1} + 1) + 1)`, a Möbius map
    of `P_{t-1}`, so its prefix compositions are products of 2×2 matrices.
    """
    lam = jnp.asarray(damping, a.dtype)
    a2 = a * a
    one = jnp.ones_like(a)
    mobius = jnp.stack([jnp.stack([a2, one], -1), jnp.stack([lam * a2, (lam + 1) * one], -1)], -2)
    prefix = time.associative_scan(_compose, mobius, reverse=reverse)
    p = prefix[..., 0, 1] / prefix[..., 1, 1]  # applied to P_{-1} = 0
    p_prev = time.shift(p, jnp.zeros_like(p[0]), reverse)
    p_pred = a2 * p_prev + 1
    gain = 1 / (lam * p_pred + 1)  # 1 - K_t
    m = fixpoint.linear_recurrence(time, gain * a, gain * r, reverse)
    back = not reverse
    a_next = time.shift(a, jnp.zeros_like(a[0]), back)
    r_next = time.shift(r, jnp.zeros_like(r[0]), back)
    p_pred_next = time.shift(p_pred, jnp.ones_like(p_pred[0]), back)
    g = p * a_next / p_pred_next
    e = m - g * (a_next * m + r_next)
    return fixpoint.linear_recurrence(time, g, e, back)


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
    if not isinstance(solver.assume_diagonal, bool):
        raise TypeError(
            f"{type(solver).__name__}: `assume_diagonal` must be a bool, "
            f"got {solver.assume_diagonal!r}."
        )
    size = solver.batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(
            f"{type(solver).__name__}: `batch_size` must be an int >= 1, got {size!r}."
        )
