"""Adjoints: how a solve is differentiated. Passed as `adjoint=` to every entry point."""

import abc

import equinox as eqx
import lineax as lx

from ._implicit import implicit_solve
from ._linear import lineax_solve, series_solve


class AbstractAdjoint(eqx.Module):
    """How to differentiate a solve.

    `apply(primal, residual, inputs, y0, loop)` returns `(y, rest)` where `primal`
    runs the forward loop (`loop` is `"lax"` or a checkpointed kind) and `residual`
    is the root form `G(y, inputs)` of the problem.
    """

    @abc.abstractmethod
    def apply(self, primal, residual, inputs, y0, tolerances):
        """Run `primal` and attach this adjoint's derivative rule."""


class _AbstractImplicit(AbstractAdjoint):
    """Adjoints of the form `dy = -A⁻¹ J_θG dθ` with `A⁻¹` some (approximate) solve."""

    @abc.abstractmethod
    def linear_solve(self, tolerances):
        """The `solve(matvec, b)` used for `A⁻¹`."""

    def apply(self, primal, residual, inputs, y0, tolerances):
        run = lambda i, y: primal(i, y, "lax", None)  # noqa: E731
        return implicit_solve(run, residual, inputs, y0, self.linear_solve(tolerances))


class ImplicitAdjoint(_AbstractImplicit):
    """Exact gradients by the implicit function theorem, in O(1) memory.

    At the solution `y*`, `J_G · dy = -J_θG · dθ` is solved matrix-free: only JVPs
    (forward mode) or VJPs (reverse mode) of `fn` are used. Works with `jax.jvp`,
    `jax.grad`, `jax.vmap`, and for second derivatives.

    **Arguments:**

    - `linear_solver`: a lineax solver. Default `lineax.GMRES` with the forward
      solver's `rtol`/`atol` (restart 20). `lineax.LU()` forms the dense Jacobian:
      fine for small problems.
    - `rtol`, `atol`: tolerances for the default GMRES; `None` takes the forward
      solver's.
    - `throw`: on a failed backward solve (the true residual `|A x - b|` above
      tolerance, or non-finite), `True` raises `fixpoint.SolveError`; `False`
      returns a NaN gradient (the documented failure signal, never a plausible
      wrong number).
    """

    linear_solver: lx.AbstractLinearSolver | None = None
    rtol: float | None = None
    atol: float | None = None
    throw: bool = True

    def linear_solve(self, tolerances):
        rtol = tolerances[0] if self.rtol is None else self.rtol
        atol = tolerances[1] if self.atol is None else self.atol
        solver = self.linear_solver
        if solver is None:
            solver = lx.GMRES(rtol=rtol, atol=atol, restart=20, stagnation_iters=20)
        return lineax_solve(solver, rtol, atol, self.throw)


class PhantomAdjoint(_AbstractImplicit):
    """The k-step phantom gradient (Geng et al. 2021): cheap, approximate.

    Equal to differentiating `steps` damped iterations
    `z <- (1 - damping) z + damping f(z)` started at the solution, with the
    Jacobians taken at the solution. `steps=1, damping=1` is the Jacobian-free
    (one-step, JFB) gradient of Fung et al. 2022. The error shrinks as `steps`
    grows on a contraction. For `root_find` the map is `y - g(y)`.
    """

    steps: int = 5
    damping: float = 0.5
    throw: bool = True

    def __check_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"PhantomAdjoint: `steps` must be an int >= 1, got {self.steps!r}.")
        if not 0 < self.damping <= 1:
            raise ValueError(f"PhantomAdjoint: `damping` must lie in (0, 1], got {self.damping!r}.")

    def linear_solve(self, tolerances):
        return series_solve(self.steps, self.damping, self.throw)


class NeumannAdjoint(_AbstractImplicit):
    """Truncated Neumann series `(I - J_f)⁻¹ ≈ Σ_{i<terms} J_f^i`.

    Exact as `terms → ∞` when the spectral radius of `J_f` at the solution is
    below one; the error decays like `ρ^terms`.
    """

    terms: int = 10
    throw: bool = True

    def __check_init__(self):
        if not isinstance(self.terms, int) or self.terms < 1:
            raise ValueError(f"NeumannAdjoint: `terms` must be an int >= 1, got {self.terms!r}.")

    def linear_solve(self, tolerances):
        return series_solve(self.terms, 1.0, self.throw)


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagate through every iteration (reverse mode only).

    Memory is bounded by recursive checkpointing (`equinox.internal.while_loop`
    with `kind="checkpointed"`): `checkpoints=None` picks a number that grows
    with `log(max_steps)`. Also gives a gradient with respect to `y0`.
    """

    checkpoints: int | None = None

    def __check_init__(self):
        if self.checkpoints is not None and (
            not isinstance(self.checkpoints, int) or self.checkpoints < 1
        ):
            raise ValueError(
                "UnrolledAdjoint: `checkpoints` must be None or an int >= 1, "
                f"got {self.checkpoints!r}."
            )

    def apply(self, primal, residual, inputs, y0, tolerances):
        del residual, tolerances
        return primal(inputs, y0, "checkpointed", self.checkpoints)
