"""Adjoints: how a solve is differentiated. Passed as `adjoint=` to every entry point."""

import abc
from typing import ClassVar, NoReturn

import equinox as eqx
import jax
import lineax as lx

from ._checks import as_python_number, check_int, check_number
from ._compact import Compaction, check_compaction
from ._custom_types import Failed, FlatY, Inputs, LinearSolve, Primal, Residual, Rest
from ._fixed_point_solver import check_relative_tolerance
from ._implicit import implicit_solve, poison_cotangent, zero_for_zero_cotangent
from ._linear import gmres_solve, lineax_solve, series_solve


class AbstractAdjoint(eqx.Module):
    """How to differentiate a solve: the base class of every adjoint.

    An adjoint is passed as `adjoint=` to `fixpoint.fixed_point`,
    `fixpoint.root_find`, `fixpoint.custom_fixed_point`, `fixpoint.custom_root`
    and the layers. The ones provided are `ImplicitAdjoint`, `PhantomAdjoint`,
    `NeumannAdjoint` and `UnrolledAdjoint`.

    A subclass must implement `apply` (below): run the forward loop and attach a
    derivative rule to its output. The derivative of a failed solve must be NaN
    wherever its cotangent is nonzero (and zero where it is zero). An adjoint has
    no `throw` of its own: the entry point's one switch covers the forward and
    the backward solve.

    `reverse_mode_only` (a class attribute, default False): whether the
    adjoint's rule is a VJP only, so that forward mode is refused with a
    message that points to `ImplicitAdjoint`.
    """

    reverse_mode_only: ClassVar[bool] = False

    @abc.abstractmethod
    def apply(
        self,
        primal: Primal,
        residual: Residual,
        inputs: Inputs,
        y0: FlatY,
        tolerances: tuple[float, float],
        failed: Failed | None = None,
        throw: bool = True,
    ) -> tuple[FlatY, Rest]:
        """Run `primal` and attach this adjoint's derivative rule.

        Called by the entry points, with the problem in flat form.

        **Arguments:**

        - `primal`: `primal(inputs, y0, loop, checkpoints) -> (y, rest)` runs the
          forward loop; `loop` is `"lax"` (a `lax.while_loop`, not
          reverse-differentiable) or `"checkpointed"` (reverse-differentiable,
          with `checkpoints` checkpoints, `None` for a default).
        - `residual`: `residual(y, inputs)`, the root form `G(y, inputs)` of the
          problem (`y - f(y)` for a fixed point, `g(y)` for a root), flat.
        - `inputs`: a pytree of every array a gradient may flow to (the user's
          `args` and the closed-over parameters of `fn`).
        - `y0`: the flat initial guess, shape `(n,)`.
        - `tolerances`: the forward solver's `(rtol, atol)`, from which an
          adjoint may take default backward tolerances.
        - `failed`: `failed(y, rest, inputs) -> bool` says whether the forward
          solve failed (then the derivative must be NaN where its cotangent is
          nonzero); `None`: never.
        - `throw`: the entry point's `throw`: a failed backward solve raises
          `fixpoint.SolveError` (`True`) or gives NaN derivatives (`False`).

        **Returns:**

        `(y, rest)` as `primal` returns them, with `y` (flat, shape `(n,)`)
        carrying this adjoint's derivative rule.
        """


class _AbstractImplicit(AbstractAdjoint):
    """Adjoints of the form `dy = -A⁻¹ J_θG dθ` with `A⁻¹` some (approximate) solve."""

    @abc.abstractmethod
    def linear_solve(self, tolerances: tuple[float, float], throw: bool) -> LinearSolve:
        """The `solve(matvec, b)` used for `A⁻¹` (raising or NaN on failure, by `throw`)."""

    def apply(
        self,
        primal: Primal,
        residual: Residual,
        inputs: Inputs,
        y0: FlatY,
        tolerances: tuple[float, float],
        failed: Failed | None = None,
        throw: bool = True,
    ) -> tuple[FlatY, Rest]:
        run = lambda i, y: primal(i, y, "lax", None)  # noqa: E731
        solve = self.linear_solve(tolerances, throw)
        return implicit_solve(run, residual, inputs, y0, solve, failed=failed)


class ImplicitAdjoint(_AbstractImplicit):
    """Exact gradients by the implicit function theorem, in O(1) memory.

    At the solution `y*`, `J_G · dy = -J_θG · dθ` is solved matrix-free: only JVPs
    (forward mode) or VJPs (reverse mode) of `fn` are used. Works with `jax.jvp`,
    `jax.grad`, `jax.vmap`, and for second derivatives.

    **Arguments:**

    - `rtol`, `atol`: the backward tolerances. Default: `rtol` = the larger of
      the forward solver's `rtol` and `atol` (the gradient is then about as
      accurate as the solution), `atol = 0`.

    Keyword-only:

    - `linear_solver`: `None` (default): fixpoint's restarted GMRES, matrix-free,
      stopping on the relative residual `|A x - b|₂ <= max(atol, rtol |b|₂)`.
      Or any lineax solver, e.g. `lineax.LU()` (forms the dense Jacobian: fine
      for small problems) or `lineax.GMRES(...)`; its answer is checked against
      the same bound (with a 10x margin).
    - `restart`, `max_restarts`: GMRES's Krylov dimension and restart budget.
    - `compaction`: under `jax.vmap`, GMRES gathers the right-hand sides that
      are still unsolved into smaller batches between restart cycles
      (`fixpoint.Compaction`; `None`: off). Not used with a lineax solver.

    A failed backward solve (true residual above ten times the tolerance, or
    non-finite) raises `fixpoint.SolveError` or gives a NaN gradient, by the
    entry point's `throw`.

    Implicit differentiation of an equilibrium as in Bai, Kolter & Koltun, *Deep
    Equilibrium Models*, NeurIPS 2019; GMRES is Saad & Schultz, *GMRES: A
    generalized minimal residual algorithm for solving nonsymmetric linear
    systems*, SIAM J. Sci. Stat. Comput. 1986.
    """

    rtol: float | None = eqx.field(default=None, converter=as_python_number)
    atol: float | None = eqx.field(default=None, converter=as_python_number)
    linear_solver: lx.AbstractLinearSolver | None = eqx.field(default=None, kw_only=True)
    restart: int = eqx.field(default=20, converter=as_python_number, kw_only=True)
    max_restarts: int = eqx.field(default=50, converter=as_python_number, kw_only=True)
    compaction: Compaction | None = eqx.field(default=Compaction(), kw_only=True)

    def __check_init__(self) -> None:
        for name in ("rtol", "atol"):
            if getattr(self, name) is not None:
                check_number(getattr(self, name), name, ">= 0", owner="ImplicitAdjoint")
        check_relative_tolerance(self.rtol, "ImplicitAdjoint: `rtol`")
        for name in ("restart", "max_restarts"):
            check_int(getattr(self, name), name, 1, owner="ImplicitAdjoint")
        check_compaction(self.compaction, "ImplicitAdjoint: `compaction`")
        if self.linear_solver is not None and not isinstance(
            self.linear_solver, lx.AbstractLinearSolver
        ):
            raise TypeError(
                "ImplicitAdjoint: `linear_solver` must be None or a lineax solver, "
                f"got {self.linear_solver!r}."
            )

    def linear_solve(self, tolerances: tuple[float, float], throw: bool) -> LinearSolve:
        rtol = max(tolerances) if self.rtol is None else self.rtol
        atol = 0.0 if self.atol is None else self.atol
        if self.linear_solver is None:
            return gmres_solve(rtol, atol, self.restart, self.max_restarts, throw, self.compaction)
        return lineax_solve(self.linear_solver, rtol, atol, throw)


class PhantomAdjoint(_AbstractImplicit):
    """The k-step phantom gradient: cheap, approximate.

    Equal to differentiating `steps` damped iterations
    `z <- (1 - damping) z + damping f(z)` started at the solution, with the
    Jacobians taken at the solution. `steps=1, damping=1` is the Jacobian-free
    (one-step, JFB) gradient. The error shrinks as `steps` grows on a
    contraction. For `root_find` the map is `y - g(y)`.

    Phantom gradients: Geng, Zhang, Bai, Wang & Lin, *On Training Implicit
    Models*, NeurIPS 2021. Jacobian-free backpropagation: Fung, Heaton, Li,
    McKenzie, Osher & Yin, *JFB: Jacobian-Free Backpropagation for Implicit
    Networks*, AAAI 2022.

    **Arguments:**

    Keyword-only:

    - `steps`: the number `k` of damped iterations differentiated, an integer
      `>= 1` (default 5).
    - `damping`: the damping `λ` in `(0, 1]` of those iterations (default 0.5).
    """

    steps: int = eqx.field(default=5, converter=as_python_number, kw_only=True)
    damping: float = eqx.field(default=0.5, converter=as_python_number, kw_only=True)

    def __check_init__(self) -> None:
        check_int(self.steps, "steps", 1, owner="PhantomAdjoint")
        check_number(self.damping, "damping", "(0, 1]", owner="PhantomAdjoint")

    def linear_solve(self, tolerances: tuple[float, float], throw: bool) -> LinearSolve:
        return series_solve(self.steps, self.damping, throw)


class NeumannAdjoint(_AbstractImplicit):
    """Truncated Neumann series `(I - J_f)⁻¹ ≈ Σ_{i<terms} J_f^i`.

    Exact as `terms → ∞` when the spectral radius of `J_f` at the solution is
    below one; the error decays like `ρ^terms`. For `root_find` the map is
    `y - g(y)`.

    **Arguments:**

    Keyword-only:

    - `terms`: the number of terms of the series, an integer `>= 1` (default 10).
    """

    terms: int = eqx.field(default=10, converter=as_python_number, kw_only=True)

    def __check_init__(self) -> None:
        check_int(self.terms, "terms", 1, owner="NeumannAdjoint")

    def linear_solve(self, tolerances: tuple[float, float], throw: bool) -> LinearSolve:
        return series_solve(self.terms, 1.0, throw)


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagate through every iteration (reverse mode only).

    Memory is bounded by recursive checkpointing (`equinox.internal.while_loop`
    with `kind="checkpointed"`). Also gives a gradient with respect to `y0`.
    Forward mode (`jax.jvp`) is refused with a message that points to
    `ImplicitAdjoint`.

    **Arguments:**

    Keyword-only:

    - `checkpoints`: the number of checkpoints, an integer `>= 1`; `None`
      (default) picks a number that grows with `log(max_steps)`.
    """

    checkpoints: int | None = eqx.field(default=None, converter=as_python_number, kw_only=True)
    reverse_mode_only: ClassVar[bool] = True

    def __check_init__(self) -> None:
        if self.checkpoints is not None:
            check_int(self.checkpoints, "checkpoints", 1, owner="UnrolledAdjoint")

    def apply(
        self,
        primal: Primal,
        residual: Residual,
        inputs: Inputs,
        y0: FlatY,
        tolerances: tuple[float, float],
        failed: Failed | None = None,
        throw: bool = True,
    ) -> tuple[FlatY, Rest]:
        # No linear solve, so nothing for `throw` to govern in the backward pass.
        del residual, tolerances, throw
        # A masked sample must contribute exactly zero, even where its
        # iterations' Jacobians hold NaN (see `zero_for_zero_cotangent`).
        y, rest = zero_for_zero_cotangent(
            lambda i, y: primal(i, y, "checkpointed", self.checkpoints), inputs, y0
        )
        if failed is not None:
            bad = jax.lax.stop_gradient(failed(y, rest, inputs))
            y = poison_cotangent(y, bad)
        return y, rest


def explain_forward_mode(adjoint: AbstractAdjoint, error: TypeError) -> NoReturn:
    """A readable error for forward mode through an adjoint that differentiates
    the iterations in reverse (`UnrolledAdjoint`, `ReversibleAdjoint`); else re-raise."""
    if adjoint.reverse_mode_only and "forward-mode" in str(error):
        raise TypeError(
            f"`{type(adjoint).__name__}` backpropagates through the iterations and supports "
            "reverse mode only (`jax.grad`, `jax.vjp`); for forward mode (`jax.jvp`, "
            "`jax.jacfwd`) use `fixpoint.ImplicitAdjoint()`."
        ) from None
    raise error
