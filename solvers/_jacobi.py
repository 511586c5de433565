"""Scan solvers that only evaluate the cell: Sequential, Jacobi, block Gauss–Seidel, PicardSum.

Song et al. 2021, "Accelerating Feedforward Computation via Parallel Nonlinear
Equation Solving": the steps of a recurrence form a triangular nonlinear system;
Jacobi updates every step at once, Gauss–Seidel sweeps through them in order,
and hybrids do Gauss–Seidel inside blocks with Jacobi across blocks. All bring
every step within tolerance in at most `T` iterations.

Certification (once every step meets the tolerance, see `internal.iterate_scan`)
takes `ScanProblem.refinement`: on the CPU (time unsharded) the sequential answer
itself, one `lax.scan` of the cell (memory `O(T·D)`), which is returned; otherwise
one parallel Newton step (dense Jacobians, `D` JVPs per step, memory `O(T·D²)`),
against which the trajectory is certified. Unsharded `Sequential` is exact after
its first sweep and stops there.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

import fixpoint
from fixpoint import internal


class _AbstractEvaluateOnly(internal.AbstractScanSolver):
    """Solvers that need only `F(H)` (no derivatives) and keep no state."""

    def __check_init__(self):
        internal.check_tolerances(self, allow_default=True)

    def init(self, problem, h):
        return None

    def linearise(self, problem, h, state):
        return problem.evaluate(h), None

    def exact(self, problem):
        # `refine` is `problem.refinement(h)` (Jacobi, GaussSeidel).
        return False, problem.refinement_is_exact()


class _AbstractWindowed(_AbstractEvaluateOnly):
    """Evaluate-only solvers with an optional sliding window.

    `window` (default None, the whole sequence): with an int `w`, each
    iteration evaluates only the `w` steps from the first unconverged one, a
    window that slides as steps converge (ParaDiGMS's sliding window; an
    iteration costs `w` evaluations instead of `T`; steps the window has not
    reached start from the latest state evaluated, unless `guess=` is given;
    certification still covers the whole sequence; time unsharded only).
    """

    # None: the dtype's default (`internal.scan_tolerances`)
    rtol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    atol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    window: int | None = eqx.field(default=None, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        _check_window(self)

    def window_length(self, length):
        return self.window


class Jacobi(_AbstractWindowed):
    """Jacobi iteration over time: `h_t <- cell(h_{t-1}, x_t)` for every `t` at once.

    Each iteration costs one parallel evaluation of the cell and fixes at least
    one more step; recurrences that forget their past quickly (contracting in
    the state) converge in far fewer than `T` iterations.

    Song, Meng, Liao & Ermon, *Accelerating Feedforward Computation via
    Parallel Nonlinear Equation Solving*, ICML 2021.

    **Arguments:**

    - `rtol`: the per-step relative tolerance; `None` (default): by the carry's
      dtype (`1e-6` float64, `1e-4` float32, see
      `fixpoint.internal.scan_tolerances`).
    - `atol`: the per-step absolute tolerance; `None` (default): as `rtol`.
    - `norm`: the per-step norm (default `fixpoint.max_norm`).

    Keyword-only:

    - `window`: `None` (default): the whole sequence; an int `w >= 1`: each
      iteration evaluates only the `w` steps from the first unconverged one, a
      window that slides as steps converge (the docs, "Parallel
      scans").
    """

    def update(self, problem, h, fh, derivatives, frozen, state):
        return fh, state

    def refine(self, problem, h, fh, derivatives, state):
        # Jacobi's own update moves each step by its residual only, which says
        # nothing of the error accumulated along the sequence: certify by Newton.
        return problem.refinement(h), state


class GaussSeidel(_AbstractEvaluateOnly):
    """Block Gauss–Seidel / Jacobi hybrid: sequential inside blocks of `block_size` steps.

    Every block starts from the current value of the step before it (Jacobi
    across blocks) and runs its `block_size` steps sequentially (`lax.scan`), all
    blocks in parallel. Each iteration fixes at least `block_size` more steps, so
    `ceil(T / block_size)` iterations always suffice; `block_size=1` is Jacobi.

    Song, Meng, Liao & Ermon, *Accelerating Feedforward Computation via
    Parallel Nonlinear Equation Solving*, ICML 2021.

    **Arguments:**

    - `rtol`: the per-step relative tolerance; `None` (default): by the carry's
      dtype (`1e-6` float64, `1e-4` float32, see
      `fixpoint.internal.scan_tolerances`).
    - `atol`: the per-step absolute tolerance; `None` (default): as `rtol`.
    - `norm`: the per-step norm (default `fixpoint.max_norm`).

    Keyword-only:

    - `block_size`: the number of steps per block, an int `>= 1` (default 16).
    """

    # None: the dtype's default (`internal.scan_tolerances`)
    rtol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    atol: float | None = eqx.field(default=None, converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    block_size: int = eqx.field(default=16, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_int(self.block_size, "block_size", 1, owner="GaussSeidel")

    def update(self, problem, h, fh, derivatives, frozen, state):
        return block_sweep(problem, h, self.block_size), state

    def refine(self, problem, h, fh, derivatives, state):
        return problem.refinement(h), state


class PicardSum(_AbstractWindowed):
    """Picard iteration in integral form over time: each update is one prefix sum.

    `h_t <- h_0 + Σ_{s≤t} (cell(h_{s-1}, x_s) - h_{s-1})`, the Picard iteration
    that ParaDiGMS (Shih et al. 2023) uses to sample diffusion models in
    parallel; equivalently quasi-DEER with the identity as every step's
    Jacobian, so an update costs one parallel evaluation of the cell (no
    derivatives) and one cumulative sum. It is made for cells that are close to
    the identity in the state, `h + dt·g(h, x)` (ODE and SDE integrators,
    diffusion samplers, residual updates): there a change early in the sequence
    moves every later step almost one for one, which `PicardSum` propagates in
    one iteration where `Jacobi` moves it one step per iteration. On cells far
    from the identity (a GRU, a contracting map) its proposals overshoot; the
    loop's safeguard still brings every step within tolerance in at most `T`
    iterations, but `QuasiDEER` or `Jacobi` are the better choice there.

    Certification and the adjoint as `Jacobi` (`ScanProblem.refinement`; the
    adjoint's recurrences, near the identity too for such cells, go through
    this solver).

    Shih, Belkhale, Ermon, Sadigh & Anari, *Parallel Sampling of Diffusion
    Models*, NeurIPS 2023 (ParaDiGMS).

    **Arguments:**

    - `rtol`: the per-step relative tolerance; `None` (default): by the carry's
      dtype (`1e-6` float64, `1e-4` float32, see
      `fixpoint.internal.scan_tolerances`).
    - `atol`: the per-step absolute tolerance; `None` (default): as `rtol`.
    - `norm`: the per-step norm (default `fixpoint.max_norm`).

    Keyword-only:

    - `window`: `None` (default): the whole sequence; an int `w >= 1`: each
      iteration evaluates only the `w` steps from the first unconverged one, a
      window that slides as steps converge (the docs, "Parallel
      scans").
    """

    def update(self, problem, h, fh, derivatives, frozen, state):
        # Frozen steps are exact: no residual, so no change before the first
        # unfrozen step, which moves to `F(H)_p` exactly.
        r = jnp.where(frozen[:, None], 0, fh - h)
        return h + problem.time.associative_scan(jnp.add, r, reverse=problem.reverse), state

    def refine(self, problem, h, fh, derivatives, state):
        # The identity is not the cell's Jacobian, so its prefix sum is no
        # first-order error estimate: certify by `refinement`, as `Jacobi`.
        return problem.refinement(h), state


class Sequential(_AbstractEvaluateOnly):
    """The reference: one sequential sweep (`lax.scan`) over the whole sequence.

    Unsharded, the first sweep is the answer and the solve stops. When the time
    axis is sharded, each device sweeps its own chunk from the state the
    previous device currently holds, so one iteration per device suffices.

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

    def update(self, problem, h, fh, derivatives, frozen, state):
        return block_sweep(problem, h, h.shape[0]), state

    def exact(self, problem):
        # Unsharded, both sweep the whole sequence from `h0`.
        unsharded = problem.time.axis_name is None
        return unsharded, unsharded

    def refine(self, problem, h, fh, derivatives, state):
        if problem.time.axis_name is None:
            # One sweep is the sequential answer itself: its distance is the error.
            return problem.sweep(h.shape[0]), state
        # Sharded, a sweep starts each chunk from the state the previous device
        # holds, so errors at chunk boundaries would go unseen.
        return problem.refinement(h), state


def block_sweep(problem: internal.ScanProblem, h, block: int):
    """Sequential sweeps over blocks of `block` steps, all blocks in parallel.

    Block `j` starts from the current predecessor of its first step (in scan
    order). The chunk is padded at its end to a multiple of `block` with copies
    of its last input; the padded steps are computed and dropped.
    """
    length = h.shape[0]
    hp, xs = problem.prev(h), problem.xs
    if problem.reverse:
        hp, xs = jax.tree.map(lambda a: jnp.flip(a, 0), (hp, xs))
    pad = -length % block
    if pad:
        hp, xs = jax.tree.map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), (hp, xs)
        )
    blocks = (length + pad) // block
    starts = hp[::block]
    xs_blocks = jax.tree.map(lambda a: a.reshape(blocks, block, *a.shape[1:]), xs)

    def sweep(start, x_block):
        def body(carry, x):
            nxt = problem.cell(carry, x)
            return nxt, nxt

        return jax.lax.scan(body, start, x_block, length=block)[1]

    out = jax.vmap(sweep)(starts, xs_blocks).reshape(length + pad, -1)[:length]
    return jnp.flip(out, 0) if problem.reverse else out


def _check_window(solver):
    if solver.window is not None:
        internal.check_int(solver.window, "window", 1, owner=type(solver).__name__)
