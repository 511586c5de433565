"""Operator splitting for monotone equilibria `z = σ(W z + b)` (monDEQ, monotone DBMs).

Winston & Kolter 2020, "Monotone operator equilibrium networks" (NeurIPS). With
`I - W ⪰ m I` (`m > 0`) the equilibrium is the unique zero of the strongly
monotone inclusion `0 ∈ (I - W) z - b + N(z)`, where `N` is the normal cone of
the non-negative orthant (whose resolvent, for every step size, is `relu`).
Forward–backward and Peaceman–Rachford splitting find it; unlike plain
iteration `z <- relu(W z + b)` they converge for every such `W` (forward–backward
for a small enough step, Peaceman–Rachford for any step).

More generally `σ` may be the proximal operator of any closed convex `f`
(`AbstractProximal`; `relu` is `NonNegative`): the equilibrium is then the zero of
`0 ∈ (I - W) z - b + ∂f(z)` and the steps use `prox_{αf}` (`MeanField`: the
sigmoid / softmax of a Boltzmann machine's mean-field update).

These solvers need the structure of the map (the linear operator `W`, its
monotonicity `m`, a resolvent, the nonlinearity's proximal operator), which
`fixpoint.fixed_point(fn, ...)` does not see, so they are called as
`solver.solve(operator, b, z0, nonlinearity=...)`. Gradients come from
`fixpoint.custom_fixed_point` on `z -> σ(W z + b)`: the splitting iteration
itself is never differentiated.
"""

import abc
from collections.abc import Callable
from typing import TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Float

import fixpoint
from fixpoint import internal

from ._proximal import AbstractProximal, NonNegative

# ---- the linear part ---------------------------------------------------------


class AbstractMonotoneLinear(eqx.Module):
    """The linear part `W` of a monotone equilibrium `z = relu(W z + b)`.

    A concrete operator promises `sym(I - W) ⪰ m I` with `m > 0` and provides:

    - `mv(z)`: the product `W z` (`z` of any fixed shape, e.g. `(n,)` or
      `(channels, length)`);
    - `lipschitz()`: `L = ‖I - W‖₂` (an upper bound is enough);
    - `resolvent(alpha)`: a function `v -> (I + α (I - W))⁻¹ v`, prepared once
      per solve (factorise here, apply cheaply in the returned function);
    - `monotonicity()`: the smallest eigenvalue of `sym(I - W) = (I - W + (I - W)ᵀ)/2`,
      which must be `≥ m` (a check, not used by the solvers);
    - the field `m` (an `AbstractVar[float]`): the monotonicity parameter.

    Winston & Kolter, *Monotone operator equilibrium networks*, NeurIPS 2020.
    """

    m: AbstractVar[float]

    @abc.abstractmethod
    def mv(self, z: Array) -> Array:
        """`W z`.

        **Arguments:**

        - `z`: a state of the operator's fixed shape (e.g. `(n,)`).

        **Returns:**

        `W z`, the shape of `z`.
        """

    @abc.abstractmethod
    def lipschitz(self) -> Float[Array, ""]:
        """`‖I - W‖₂`, or an upper bound on it.

        **Returns:**

        A scalar `L`; `ForwardBackward` takes its default step `m / L²` from it.
        """

    @abc.abstractmethod
    def resolvent(self, alpha: Float[Array, ""]) -> Callable[[Array], Array]:
        """`v -> (I + alpha (I - W))⁻¹ v`.

        Called once per solve: factorise here, apply cheaply in the returned
        function.

        **Arguments:**

        - `alpha`: the step size `α > 0`, a scalar.

        **Returns:**

        A function `v -> (I + α (I - W))⁻¹ v` on states of the operator's shape.
        """

    @abc.abstractmethod
    def monotonicity(self) -> Float[Array, ""]:
        """`λ_min(sym(I - W))`.

        A check of the claim `m` (it should be `>= m`); not used by the solvers.

        **Returns:**

        The smallest eigenvalue of `(I - W + (I - W)ᵀ)/2`, a scalar (or a lower
        bound on it).
        """


class MonotoneMatrix(AbstractMonotoneLinear):
    """A dense `n × n` matrix `W` with `sym(I - W) ⪰ m I`, acting on vectors `(n,)`.

    The resolvent `(I + α (I - W))⁻¹` is formed explicitly (a dense inverse) once per
    solve; each application is then one matvec. `lipschitz()` is the exact
    spectral norm (an SVD). The bound `m` is your claim: `monotonicity()` checks it.

    **Arguments:**

    - `W`: the `n × n` matrix, e.g. `(1 - m) I - AᵀA + B - Bᵀ` (`fixpoint.layers.MonDEQ.W()`).
    - `m`: the monotonicity parameter, a number `> 0`.
    """

    W: Float[Array, "n n"]
    m: float = eqx.field(static=True)

    def __init__(self, W: Float[Array, "n n"], m: float):
        m = internal.check_number(m, "m", "> 0", owner="MonotoneMatrix")
        shape = jnp.shape(W)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"MonotoneMatrix: `W` must be a square matrix, got shape {shape}.")
        self.W = W
        self.m = float(m)

    def _i_minus_w(self):
        return jnp.eye(self.W.shape[0], dtype=self.W.dtype) - self.W

    def mv(self, z: Array) -> Array:
        return self.W @ z

    def lipschitz(self) -> Float[Array, ""]:
        return jnp.linalg.norm(self._i_minus_w(), 2)

    def resolvent(self, alpha: Float[Array, ""]) -> Callable[[Array], Array]:
        eye = jnp.eye(self.W.shape[0], dtype=self.W.dtype)
        # An explicit inverse, as in the paper: each step is then one matvec. (Under
        # `vmap`, `lu_solve` on CPU is hundreds of times slower than a matvec.) The
        # matrix is well conditioned: its symmetric part is at least `(1 + α m) I`.
        inverse = jnp.linalg.inv(eye + alpha.astype(self.W.dtype) * self._i_minus_w())
        return lambda v: inverse @ v

    def monotonicity(self) -> Float[Array, ""]:
        a = self._i_minus_w()
        return jnp.linalg.eigvalsh(0.5 * (a + a.T))[0]


# ---- the shared loop ---------------------------------------------------------


class _Carry(eqx.Module):
    z: Array
    u: Array | None
    scalars: Array  # `internal.LoopScalars`, packed


def _iterate(solver, operator, b, sigma, z0, u0, update, max_steps, compaction=None):
    """Run `update(z, u, wz) -> (z, u)` until `σ(W z + b) ≈ z`; return a Solution.

    The residual `r = σ(W z + b) - z` is measured at the current iterate
    before each update, so the returned `value` is the iterate whose residual is
    reported. The loop stops on convergence (`internal.converged`: `norm(r / (atol +
    rtol |z|)) < 1`, with a residual that has fallen: see `internal.converged`), a
    non-finite residual (`nonfinite`), divergence (`norm(r)` above
    `divergence_ratio` times the smallest seen: `diverged`) or after `max_steps`
    updates (`max_steps_reached`). Finished samples of a `vmap` never move again.
    """
    dtype = jnp.finfo(z0.dtype).dtype
    Scalars = internal.LoopScalars

    def cond(c):
        return Scalars.read(c.scalars, dtype).running

    def body(c):
        prev = Scalars.read(c.scalars, dtype)
        wz = operator.mv(c.z)
        r = sigma(wz + b) - c.z
        rnorm = solver.norm(r)
        start = prev.first_norm(rnorm)
        finite = jnp.isfinite(rnorm)
        # The same test as `fixpoint.fixed_point`'s (for the splitting methods the
        # residual is measured directly; no separate step test).
        converged, residual_ok = internal.converged(
            solver.norm,
            r,
            c.z,
            None,
            solver.rtol,
            solver.atol,
            kind="fixed_point",
            start_norm=start,
            y0=z0,
        )
        converged = finite & converged
        diverged = finite & ~residual_ok & (rnorm > solver.divergence_ratio * prev.best)
        out_of_steps = prev.step >= max_steps
        result, done = internal.termination(converged, finite, diverged, out_of_steps)
        z_next, u_next = update(c.z, c.u, wz)
        keep = lambda old, new: jnp.where(done, old, new)
        return _Carry(
            z=keep(c.z, z_next),
            u=None if c.u is None else keep(c.u, u_next),
            scalars=prev.advance(rnorm, start, result, done, dtype),
        )

    init = _Carry(z=z0, u=u0, scalars=Scalars.initial(dtype))
    final = internal.compacted_while_loop(cond, body, init, compaction)
    result, stats = Scalars.outcome(final.scalars, dtype)
    return fixpoint.Solution(value=final.z, result=result, aux=None, stats=stats)


def _equilibrium_map(z, args):
    operator, b, sigma, failed = args
    # A failed solve's map is NaN, so its derivative is NaN (see `_solve`).
    return jnp.where(failed, jnp.nan, sigma(operator.mv(z) + b))


def _already_solved(z, args):
    # The splitting solve has run already (outside, on stop-gradient inputs, so
    # that its statistics can be returned): `custom_fixed_point` only needs to
    # attach the implicit gradient at its answer.
    del args
    return z


@eqx.filter_jit
def _run(solver, operator, b, sigma, z0, max_steps, compaction):
    """The splitting loop, compiled once per (solver, operator structure, shapes)."""
    u0 = solver.u_init(operator, b, z0)
    update = solver.update(operator, b, sigma)
    return _iterate(solver, operator, b, sigma, z0, u0, update, max_steps, compaction)


def _solve(solver, name, operator, b, z0, max_steps, throw, adjoint, compaction, sigma):
    """Checks, the splitting loop on stop-gradient inputs, then the implicit gradient."""
    if not isinstance(operator, AbstractMonotoneLinear):
        raise TypeError(
            f"{name}.solve: `operator` must be a `fixpoint.solvers.AbstractMonotoneLinear` "
            f"(e.g. `fixpoint.solvers.MonotoneMatrix(W, m)`), got {type(operator).__name__}."
        )
    internal.check_int(max_steps, "max_steps", 1, owner=f"{name}.solve")
    if not isinstance(adjoint, fixpoint.AbstractAdjoint):
        raise TypeError(f"{name}.solve: `adjoint` must be a fixpoint adjoint, got {adjoint!r}.")
    if isinstance(adjoint, fixpoint.UnrolledAdjoint):
        raise ValueError(
            f"{name}.solve: `UnrolledAdjoint` is not supported (the splitting loop is "
            "not differentiated); use `ImplicitAdjoint`, `PhantomAdjoint` or `NeumannAdjoint`."
        )
    internal.check_compaction(compaction, f"{name}.solve: `compaction`")
    if not isinstance(sigma, AbstractProximal):
        raise TypeError(
            f"{name}.solve: `nonlinearity` must be a `fixpoint.solvers.AbstractProximal` "
            f"(e.g. `NonNegative()` for relu, `MeanField(...)`), got {sigma!r}."
        )
    b = jnp.asarray(b)
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise TypeError(f"{name}.solve: `b` must be floating point, got dtype {b.dtype}.")
    z0 = jnp.zeros_like(b) if z0 is None else jnp.asarray(z0)
    if z0.shape != b.shape or z0.dtype != b.dtype:
        raise ValueError(
            f"{name}.solve: `z0` must have the shape and dtype of `b` "
            f"({b.shape}, {b.dtype}), got ({z0.shape}, {z0.dtype})."
        )
    wz_struct = jax.eval_shape(operator.mv, z0)
    if wz_struct.shape != b.shape or wz_struct.dtype != b.dtype:
        raise ValueError(
            f"{name}.solve: `operator.mv(z)` must have the shape and dtype of `b` "
            f"({b.shape}, {b.dtype}), got ({wz_struct.shape}, {wz_struct.dtype})."
        )
    try:
        sigma_struct = jax.eval_shape(sigma, z0)
    except Exception as e:
        raise ValueError(
            f"{name}.solve: `nonlinearity` cannot be applied to a state of shape {b.shape}: {e}"
        ) from e
    if sigma_struct.shape != b.shape or sigma_struct.dtype != b.dtype:
        raise ValueError(
            f"{name}.solve: `nonlinearity(v)` must have the shape and dtype of `b` "
            f"({b.shape}, {b.dtype}), got ({sigma_struct.shape}, {sigma_struct.dtype})."
        )

    op_nd, b_nd, sigma_nd, z0_nd = jax.tree.map(
        lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, (operator, b, sigma, z0)
    )
    sol = _run(solver, op_nd, b_nd, sigma_nd, z0_nd, max_steps, compaction)
    # The derivative of a failed solve is NaN where its cotangent is nonzero. The
    # loop's result code says which solves failed (the map is NaN there), so
    # `custom_fixed_point`'s own check of the returned point gets slack: recomputed
    # in another batch shape (compaction), a converged point's residual may differ
    # from the loop's by round-off, which must not turn its gradient into NaN.
    failed = sol.result != fixpoint.RESULTS.successful
    solve_fn = fixpoint.custom_fixed_point(
        _equilibrium_map, adjoint=adjoint, rtol=min(10 * solver.rtol, 0.5), atol=10 * solver.atol
    )(_already_solved)
    value = solve_fn(sol.value, (operator, b, sigma, failed))
    result, stats = sol.result, sol.stats
    if throw:
        value, result, stats = internal.checked(
            (value, result, stats),
            result._value,
            stats["num_steps"],
            stats["residual"],
            f"`{name}`",
        )
    return fixpoint.Solution(value=value, result=result, aux=None, stats=stats)


_IMPLICIT = fixpoint.ImplicitAdjoint()
_RELU = NonNegative()


def _check_common(solver):
    internal.check_tolerances(solver)
    internal.check_number(
        solver.divergence_ratio, "divergence_ratio", "> 1", owner=type(solver).__name__
    )


# One splitting step `(z, u, W z) -> (z_next, u_next)`; `u` is the auxiliary sequence
# (`None` for a method without one).
_Update: TypeAlias = Callable[[Array, Array | None, Array], tuple[Array, Array | None]]


class _AbstractSplitting(eqx.Module):
    """Shared `solve` of the splitting methods; each defines `update` and `u_init`."""

    rtol: AbstractVar[float]
    atol: AbstractVar[float]
    norm: AbstractVar[Callable]
    divergence_ratio: AbstractVar[float]

    @abc.abstractmethod
    def update(
        self, op: AbstractMonotoneLinear, bias: Array, nonlinearity: AbstractProximal
    ) -> _Update:
        """`step(z, u, wz) -> (z_next, u_next)` for this operator, bias and nonlinearity."""

    @abc.abstractmethod
    def u_init(self, op: AbstractMonotoneLinear, bias: Array, z0: Array) -> Array | None:
        """The auxiliary sequence's start (`None` if the method has none)."""

    def solve(
        self,
        operator: AbstractMonotoneLinear,
        b: Array,
        z0: Array | None = None,
        *,
        max_steps: int = 256,
        throw: bool = True,
        adjoint: fixpoint.AbstractAdjoint = _IMPLICIT,
        compaction: fixpoint.Compaction | None = fixpoint.Compaction(),
        nonlinearity: AbstractProximal = _RELU,
    ) -> fixpoint.Solution:
        """Solve `z = σ(W z + b)` where `W` is `operator` and `σ` is `nonlinearity`.

        **Arguments:**

        - `operator`: a `fixpoint.solvers.AbstractMonotoneLinear` (e.g. `MonotoneMatrix(W, m)`).
        - `b`: the bias `U x + b₀`; `z` has its shape and dtype.
        - `z0`: the starting point (default zeros).
        - `max_steps`: the largest number of updates.
        - `throw`: raise `fixpoint.SolveError` if the solve fails (under `vmap`: if
          any sample fails); with `False` read `sol.result` instead.
        - `adjoint`: how gradients are computed: the implicit function theorem on
          `z = relu(W z + b)` (`fixpoint.ImplicitAdjoint()`, default), or
          `PhantomAdjoint` / `NeumannAdjoint`. Gradients flow to the arrays in
          `operator` and to `b`, never to `z0`.
        - `compaction`: under `jax.vmap`, gather the unfinished samples into
          smaller batches as the others finish (`fixpoint.Compaction`; `None`:
          off). The answers, result codes and step counts do not change.
        - `nonlinearity`: `σ`, the proximal operator of a closed convex `f`
          (`fixpoint.solvers.AbstractProximal`); default `NonNegative()`, `relu`.
          Its arrays (e.g. `MeanField`'s observed values) get gradients too.

        **Returns:**

        A `fixpoint.Solution` with `stats["num_steps"]` and `stats["residual"]`,
        the norm of `σ(W z + b) - z` at `value`.
        """
        return _solve(
            self,
            type(self).__name__,
            operator,
            b,
            z0,
            max_steps,
            throw,
            adjoint,
            compaction,
            nonlinearity,
        )


class ForwardBackward(_AbstractSplitting):
    """Forward–backward splitting for `z = σ(W z + b)` (`σ = relu` by default).

        z <- prox_{αf}((1 - α) z + α (W z + b))

    a forward (gradient) step on `(I - W) z - b` followed by the resolvent of `∂f`,
    the nonlinearity's proximal operator with step `α` (`relu` for every `α` when
    `f` is the orthant's indicator; see `AbstractProximal`). With `sym(I - W) ⪰ m I`
    and `L = ‖I - W‖₂` it contracts with factor `sqrt(1 - 2αm + α²L²) < 1` for
    `0 < α < 2m/L²`; larger steps may diverge, which is reported (`RESULTS.diverged`, `nonfinite` or
    `max_steps_reached`), never silent. One product with `W` per step.

    Called as `solver.solve(operator, b, z0)` (see `solve`), not through
    `fixpoint.fixed_point`. Winston & Kolter, *Monotone operator equilibrium
    networks*, NeurIPS 2020; forward–backward splitting: Lions & Mercier,
    *Splitting algorithms for the sum of two nonlinear operators*, SIAM J.
    Numer. Anal. 1979.

    **Arguments:**

    - `rtol`: converged when `norm(r / (atol + rtol |z|)) < 1`, with
      `r = σ(W z + b) - z`; a number in `[0, 1)`.
    - `atol`: the absolute tolerance of that test, `>= 0`.
    - `norm`: the residual norm, default `fixpoint.max_norm`.

    Keyword-only:

    - `alpha`: the step size. `None` (default) uses `α = m / L²` with `m` the
      operator's monotonicity parameter and `L = operator.lipschitz()`, computed
      at every solve: the step that minimises the contraction bound above (to
      `sqrt(1 - m²/L²)`) and half the largest safe step.
    - `divergence_ratio`: stop with `RESULTS.diverged` once the residual norm
      exceeds this multiple of the smallest seen (default `1e4`).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    alpha: float | None = eqx.field(default=None, converter=internal.as_python_number, kw_only=True)
    divergence_ratio: float = eqx.field(
        default=1e4, converter=internal.as_python_number, kw_only=True
    )

    def __check_init__(self):
        _check_common(self)
        if self.alpha is not None:
            internal.check_number(self.alpha, "alpha", "> 0", owner="ForwardBackward")

    def step_size(self, operator: AbstractMonotoneLinear) -> Float[Array, ""]:
        """The step `α` used on `operator`: `alpha`, or `m / L²` when `alpha=None`.

        **Arguments:**

        - `operator`: the `AbstractMonotoneLinear` being solved.

        **Returns:**

        `α`, a scalar array.
        """
        if self.alpha is not None:
            return jnp.asarray(self.alpha)
        return operator.m / jnp.square(operator.lipschitz())

    def update(
        self, op: AbstractMonotoneLinear, bias: Array, nonlinearity: AbstractProximal
    ) -> _Update:
        alpha = self.step_size(op).astype(bias.dtype)

        def fb(z, u, wz):
            return nonlinearity.prox((1 - alpha) * z + alpha * (wz + bias), alpha), u

        return fb

    def u_init(self, op: AbstractMonotoneLinear, bias: Array, z0: Array) -> None:
        return None


class PeacemanRachford(_AbstractSplitting):
    """Peaceman–Rachford splitting for `z = σ(W z + b)` (`σ = relu` by default).

    With `V = (I + α (I - W))⁻¹` (the resolvent of the linear part, formed once
    per solve by `operator.resolvent`), starting from `u = z = z0`:

        u_½ = 2 z - u
        z_½ = V (u_½ + α b)
        u   = 2 z_½ - u_½
        z   = prox_{αf}(u)          (relu for the default nonlinearity)

    Because `I - W` is strongly monotone (`m > 0`) and Lipschitz, this converges
    linearly for *every* `α > 0` (the rate depends on `α`; the paper tunes it,
    `1` is its default; at `α = 1` the proximal step is `σ` itself, so the
    mean-field softmax needs no inner iterations). One product with `W` (for the
    residual) and one resolvent application per step.

    Called as `solver.solve(operator, b, z0)` (see `solve`), not through
    `fixpoint.fixed_point`. Winston & Kolter, *Monotone operator equilibrium
    networks*, NeurIPS 2020 (Algorithm 2); Peaceman & Rachford, *The numerical
    solution of parabolic and elliptic differential equations*, J. SIAM 1955;
    Lions & Mercier, *Splitting algorithms for the sum of two nonlinear
    operators*, SIAM J. Numer. Anal. 1979.

    **Arguments:**

    - `rtol`: converged when `norm(r / (atol + rtol |z|)) < 1`, with
      `r = σ(W z + b) - z`; a number in `[0, 1)`.
    - `atol`: the absolute tolerance of that test, `>= 0`.
    - `norm`: the residual norm, default `fixpoint.max_norm`.

    Keyword-only:

    - `alpha`: the step size, a number `> 0` (default `1.0`).
    - `divergence_ratio`: stop with `RESULTS.diverged` once the residual norm
      exceeds this multiple of the smallest seen (default `1e4`).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    alpha: float = eqx.field(default=1.0, converter=internal.as_python_number, kw_only=True)
    divergence_ratio: float = eqx.field(
        default=1e4, converter=internal.as_python_number, kw_only=True
    )

    def __check_init__(self):
        _check_common(self)
        internal.check_number(self.alpha, "alpha", "> 0", owner="PeacemanRachford")

    def update(
        self, op: AbstractMonotoneLinear, bias: Array, nonlinearity: AbstractProximal
    ) -> _Update:
        alpha = jnp.asarray(self.alpha, bias.dtype)
        resolve = op.resolvent(alpha)
        alpha_b = alpha * bias

        def pr(z, u, wz):
            del wz
            u_half = 2 * z - u
            z_half = resolve(u_half + alpha_b)
            u = 2 * z_half - u_half
            return nonlinearity.prox(u, alpha), u

        return pr

    def u_init(self, op: AbstractMonotoneLinear, bias: Array, z0: Array) -> Array:
        return z0
