"""Subhomogeneous deep equilibrium models: a unique fixed point for any weights.

Sittoni & Tudisco 2024, "Subhomogeneous Deep Equilibrium Models" (ICML), after
nonlinear Perron–Frobenius theory (Lemmens & Nussbaum, *Nonlinear Perron–Frobenius
Theory*, 2012). A map `F` of the open positive orthant into itself is
*μ-subhomogeneous* when `|F'(z)| z ≤ μ F(z)` entrywise for every `z > 0`. Then
`u ↦ log F(eᵘ)` has a Jacobian `diag(F)⁻¹ F' diag(z)` of max-norm at most `μ`, so
`F` is `μ`-Lipschitz in Thompson's metric `d_T(y, z) = ‖log y − log z‖_∞`, and with
`μ < 1` Banach's theorem in the complete metric space `(ℝⁿ₊₊, d_T)` gives one fixed
point `z*`, reached from every positive start by plain iteration at the rate
`d_T(z_k, z*) ≤ μᵏ d_T(z_0, z*)`, with the computable bound
`d_T(z, z*) ≤ d_T(z, F(z)) / (1 − μ)`.

The layer iterates in log coordinates, `u ↦ log F(eᵘ)` (the same iterates as plain
iteration of `F`): there the residual is `d_T(F(z), z)`, which a contraction never
lets grow, so no solver mistakes the growth of `z` towards a large fixed point for
divergence, and the tolerance is a tolerance in Thompson's metric.

The layer here: `F(z; x) = (1 + relu(|W| z + relu(U x + b)))^μ` (elementwise power).
With `t = |W| z + relu(U x + b) ≥ 0` on the cone, `|F'(z)| z = μ (1 + t)^{μ−1} |W| z
≤ μ (1 + t)^{μ−1} (1 + t) = μ F(z)`, for *any* `W`, `U`, `b`: no norm constraint on
the weights. `F ≥ 1`, so every start (also zero, also outside the cone) is in the
cone after one step.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

import fixpoint
from fixpoint import internal, solvers

from ._deq import FixedMapDEQ


class _LogApply(eqx.Module):
    """`u ↦ log F(eᵘ, x)`: the map in log coordinates (a module, so compiled loops
    are reused across calls)."""

    def __call__(self, u, args):
        f, x = args
        return jnp.log(f(jnp.exp(u), x))


_log_apply = _LogApply()


class SubhomogeneousMap(eqx.Module):
    """`F(z, x) = (1 + relu(|W| z + relu(U x + b)))^μ`, μ-subhomogeneous on `z > 0`.

    The map a `fixpoint.layers.SubhomogeneousDEQ` iterates (its `f`). Positive
    (`F ≥ 1`) and μ-subhomogeneous for any weights, so it is a contraction of
    rate `μ` in Thompson's metric. Sittoni & Tudisco, *Subhomogeneous Deep
    Equilibrium Models*, ICML 2024.

    **Arguments:**

    - `weight`: `W`, `(hidden, hidden)`; only `|W|` enters.
    - `input_weight`: `U`, `(hidden, in)`.
    - `bias`: `b`, `(hidden,)`.
    - `mu`: the degree `μ`, a number in `(0, 1)`.
    """

    weight: Float[Array, "hidden hidden"]
    input_weight: Float[Array, "hidden in"]
    bias: Float[Array, " hidden"]
    mu: float = eqx.field(static=True, converter=internal.as_python_number)

    def __call__(self, z: Float[Array, " hidden"], x: Float[Array, " in"]) -> Array:
        """`F(z, x)`, shape `(hidden,)`."""
        drive = jax.nn.relu(self.input_weight @ x + self.bias)
        return (1 + jax.nn.relu(jnp.abs(self.weight) @ z + drive)) ** self.mu


def thompson_distance(y: Array, z: Array) -> Float[Array, ""]:
    """Thompson's metric on the positive orthant, `d_T(y, z) = ‖log y − log z‖_∞`.

    **Arguments:**

    - `y`, `z`: positive arrays of one shape.

    **Returns:**

    `max |log y − log z|`, a scalar (`inf` where an entry is not positive).
    """
    safe = lambda a: jnp.log(jnp.where(a > 0, a, 0))
    return jnp.max(jnp.abs(safe(y) - safe(z)))


_DEFAULT_SOLVER = solvers.Picard(0.0, 1e-4)


class SubhomogeneousDEQ(FixedMapDEQ):
    """A DEQ whose fixed point exists and is unique for any weights.

    Sittoni & Tudisco, *Subhomogeneous Deep Equilibrium Models*, ICML 2024.

    `deq(x)` is the fixed point `z* = F(z*, x)` of
    `F(z, x) = (1 + relu(|W| z + relu(U x + b)))^μ` (`SubhomogeneousMap`, stored
    as `deq.f`): positive and μ-subhomogeneous on the positive orthant for every
    `W`, `U`, `b`, hence (nonlinear Perron–Frobenius theory) a contraction of rate
    `μ < 1` in Thompson's metric `d_T(y, z) = ‖log y − log z‖_∞`. So `z*` exists, is
    unique, and plain iteration (`fixpoint.solvers.Picard`, the default) reaches it
    from every start with `d_T(z_k, z*) ≤ μᵏ d_T(z_0, z*)`.

    The solver runs in log coordinates, on `u ↦ log F(eᵘ, x)` from
    `u_0 = log F(z0, x)` (one application of `F` puts any start, also zero or
    negative, into the cone): the iterates are plain iteration's, the residual
    (`stats["residual"]`) is `d_T(F(z), z)`, which the contraction never lets
    grow however large `W` is, and the default tolerance `atol = 1e-4` is in
    Thompson's metric, so a converged `z` satisfies
    `d_T(z, z*) ≤ atol / (1 − μ)` (`error_bound` computes the bound for any `z`).
    `solve(x).value` is `z`, not `u`. `z*` grows like `‖W‖^{μ/(1−μ)}`; where it
    overflows the dtype the result is `nonfinite`, never a wrong number.

    Everything else is `fixpoint.layers.DEQ`'s: `solve(x, z0)` returns the
    `fixpoint.Solution`, gradients are implicit by default, settings change
    with `with_settings`, and `jax.vmap` maps over a batch. There is no dropout
    (a zeroed entry leaves the cone).

    **Arguments:**

    - `in_size`, `hidden_size`: the sizes of `x` and `z`.

    Keyword-only:

    - `mu`: the degree of subhomogeneity `μ`, a number in `(0, 1)` (default `0.5`):
      the contraction rate in Thompson's metric. Smaller is faster to solve and
      less expressive.
    - `solver`: default `fixpoint.solvers.Picard(0.0, 1e-4)` (tolerance `1e-4` on
      `d_T(F(z), z)`), which the theorem covers; any other solver of
      `fixpoint.solvers` runs (on `u = log z`) but is not covered by it.
    - `adjoint`, `max_steps` (default `100`), `throw`, `compaction`: as for
      `fixpoint.layers.DEQ`.
    - `dtype`: the parameters' dtype (default: JAX's default float).
    - `key`: a `jax.random` key. `U` and `b` are uniform in `±1/sqrt(in_size)`,
      `W` in `±1/hidden_size` (so the rows of `|W|` sum to about ½ and the input
      is not drowned by the recurrence; any scale keeps the guarantee).
    """

    default_solver: ClassVar[internal.AbstractSolver] = _DEFAULT_SOLVER
    no_dropout_reason: ClassVar[str] = (
        "a zeroed entry leaves the positive cone, where the guarantee holds"
    )

    def __init__(
        self,
        in_size: int,
        hidden_size: int,
        *,
        mu: float = 0.5,
        solver: internal.AbstractSolver | None = None,
        adjoint: fixpoint.AbstractAdjoint | None = None,
        max_steps: int = 100,
        throw: bool = True,
        compaction: fixpoint.Compaction | None = fixpoint.Compaction(),
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        owner = "SubhomogeneousDEQ"
        mu = internal.check_number(mu, "mu", "(0, 1)", owner=owner)
        for name, size in (("in_size", in_size), ("hidden_size", hidden_size)):
            internal.check_int(size, name, 1, owner=owner)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        kw, ku, kb = jax.random.split(key, 3)

        def uniform(k, shape, fan_in):
            lim = 1 / np.sqrt(fan_in)
            return jax.random.uniform(k, shape, dtype, -lim, lim)

        f = SubhomogeneousMap(
            # Uniform in ±1/hidden: the rows of |W| sum to about ½, so the recurrence
            # does not drown the input (any scale is allowed; this one trains well).
            weight=uniform(kw, (hidden_size, hidden_size), hidden_size**2),
            input_weight=uniform(ku, (hidden_size, in_size), in_size),
            bias=uniform(kb, (hidden_size,), in_size),
            mu=float(mu),
        )
        super().__init__(
            f,
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
            z_shape=(hidden_size,),
            compaction=compaction,
        )

    def solve(
        self,
        x: Array,
        z0: Array | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        record_residuals: bool = False,
        max_steps: int | Int[Array, ""] | None = None,
    ) -> fixpoint.Solution:
        """Solve for the fixed point of one input; returns the `fixpoint.Solution`.

        **Arguments:**

        - `x`: one input, `(in_size,)`.
        - `z0`: the starting state (any real vector; default zeros).
        - `key`, `inference`: accepted for `fixpoint.layers.DEQ`'s signature;
          unused (no dropout).
        - `record_residuals`, `max_steps`: as for `fixpoint.layers.DEQ.solve`.

        **Returns:**

        A `fixpoint.Solution` whose `value` is `z*` and whose
        `stats["residual"]` is `d_T(F(z), z)` at `value`.
        """
        del key, inference
        z0 = self.initial(x, z0)
        f = self.prepared()
        self.check(f, x, z0)
        sol = self._fixed_point(_log_apply, jnp.log(f(z0, x)), (f, x), max_steps, record_residuals)
        return eqx.tree_at(lambda s: s.value, sol, jnp.exp(sol.value))

    @property
    def mu(self) -> float:
        """The degree of subhomogeneity `μ`: the contraction rate in Thompson's metric."""
        return self.f.mu  # type: ignore[attr-defined]

    def error_bound(self, x: Float[Array, " in"], z: Float[Array, " hidden"]) -> Float[Array, ""]:
        """A guaranteed bound on the distance from `z` to the fixed point for `x`.

        `d_T(z, z*) ≤ d_T(z, F(z)) / (1 − μ)` (Banach's a-posteriori bound in
        Thompson's metric), so `z*` lies within a factor `exp(bound)` of `z`,
        entry by entry. Dropout is not applied.

        **Arguments:**

        - `x`: one input, `(in_size,)`.
        - `z`: a positive state, `(hidden_size,)`, e.g. `deq(x)`.

        **Returns:**

        The bound, a scalar (`inf` if `z` has an entry `≤ 0`).
        """
        hidden = self.f.weight.shape[0]  # type: ignore[attr-defined]
        if jnp.shape(z) != (hidden,):
            raise ValueError(
                f"SubhomogeneousDEQ.error_bound: `z` must have shape ({hidden},), got "
                f"{tuple(jnp.shape(z))}."
            )
        f = self.prepared()
        return thompson_distance(z, f(z, x)) / (1 - self.mu)
