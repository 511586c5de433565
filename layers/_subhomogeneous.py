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

The layer here: `F(z; x) = (1 + relu(|W| z + relu(U x + b)))^μ` (elementwise power).
With `t = |W| z + relu(U x + b) ≥ 0` on the cone, `|F'(z)| z = μ (1 + t)^{μ−1} |W| z
≤ μ (1 + t)^{μ−1} (1 + t) = μ F(z)`, for *any* `W`, `U`, `b`: no norm constraint on
the weights. `F ≥ 1`, so every start (also zero, also outside the cone) is in the
cone after one step.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray

import fixpoint
from fixpoint import internal, solvers

from ._deq import DEQ


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


class SubhomogeneousDEQ(DEQ):
    """A DEQ whose fixed point exists and is unique for any weights.

    Sittoni & Tudisco, *Subhomogeneous Deep Equilibrium Models*, ICML 2024.

    `deq(x)` is the fixed point `z* = F(z*, x)` of
    `F(z, x) = (1 + relu(|W| z + relu(U x + b)))^μ` (`SubhomogeneousMap`, stored
    as `deq.f`): positive and μ-subhomogeneous on the positive orthant for every
    `W`, `U`, `b`, hence (nonlinear Perron–Frobenius theory) a contraction of rate
    `μ < 1` in Thompson's metric `d_T(y, z) = ‖log y − log z‖_∞`. So `z*` exists, is
    unique, and plain iteration (`fixpoint.solvers.Picard`, the default) reaches it
    from every start with `d_T(z_k, z*) ≤ μᵏ d_T(z_0, z*)`; `error_bound` turns the
    last step into a guaranteed bound on `d_T(z, z*)`. The max-norm relative
    residual test of the solvers, `‖F(z) − z‖_∞ < rtol · |z|` (here `z ≥ 1`), is
    a test on `d_T(z, F(z))`, the quantity that bound uses.

    Everything else is `fixpoint.layers.DEQ`'s: `solve(x, z0)` returns the
    `fixpoint.Solution`, gradients are implicit by default, settings change
    with `with_settings`, and `jax.vmap` maps over a batch.

    **Arguments:**

    - `in_size`, `hidden_size`: the sizes of `x` and `z`.

    Keyword-only:

    - `mu`: the degree of subhomogeneity `μ`, a number in `(0, 1)` (default `0.5`):
      the contraction rate in Thompson's metric. Smaller is faster to solve and
      less expressive.
    - `solver`: default `fixpoint.solvers.Picard(1e-4, 1e-6)`, which the theorem
      covers; any other solver of `fixpoint.solvers` runs but is not covered by it.
    - `adjoint`, `max_steps` (default `100`), `throw`, `dropout`, `compaction`: as
      for `fixpoint.layers.DEQ`.
    - `dtype`: the parameters' dtype (default: JAX's default float).
    - `key`: a `jax.random` key. `U` and `b` are uniform in `±1/sqrt(in_size)`,
      `W` in `±1/hidden_size` (so the rows of `|W|` sum to about ½ and the input
      is not drowned by the recurrence; any scale keeps the guarantee).
    """

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
        dropout: float = 0.0,
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
            solver=solvers.Picard(1e-4, 1e-6) if solver is None else solver,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
            z_shape=(hidden_size,),
            dropout=dropout,
            compaction=compaction,
        )

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
        f = self.prepared()
        return thompson_distance(z, f(z, x)) / (1 - self.mu)
