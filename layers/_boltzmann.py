"""Monotone deep Boltzmann machines: mean-field inference with a unique fixed point.

Feng, Winston & Kolter 2023, "Monotone deep Boltzmann machines" (TMLR). A
Boltzmann machine over binary and categorical units (one-hot `x`) with energy
`E(x) = −½ xᵀ W x − bᵀ x`, `W` symmetric with zero blocks on its diagonal (no unit
couples to itself), has the naive mean-field free energy

    F(q) = −½ qᵀ W q − bᵀ q − Σ H(q_v)

over the units' marginals `q`, whose stationary points are the mean-field fixed
points `q = σ(W q + b)` (sigmoid / softmax per variable). Writing
`F(q) = ½ qᵀ (I − W) q − bᵀ q + Σ [−H(q_v) − ½‖q_v‖²]`, the bracket is convex on the
simplex (`1/q ≥ 1`), so `F` is strongly convex whenever `I − W ⪰ m I`: one
stationary point, the global mean-field optimum, found from any start by operator
splitting with the softmax's proximal operator (`fixpoint.solvers.MeanField`).

The parameterisation here: `W = −ÂᵀÂ` with the blocks of each variable set to zero,
where `Â` is a free matrix `A` whose columns are rescaled, per variable, so that
`‖Â_v‖₂² ≤ 1 − m`. Then `I − W = I − blkdiag(Â_vᵀÂ_v) + ÂᵀÂ ⪰ m I` for *any* `A`,
and the couplings between different variables (`−Â_uᵀÂ_v`) are otherwise free.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import fixpoint
from fixpoint import internal
from fixpoint.solvers import ForwardBackward, MeanField, MonotoneMatrix, PeacemanRachford

from ._mondeq import _IMPLICIT, _AbstractMonotone, _is_monotone


def _variable_of_unit(binary: int, groups: int, categories: int) -> np.ndarray:
    return np.concatenate(
        [np.arange(binary), binary + np.repeat(np.arange(groups), categories)]
    ).astype(np.int32)


class MonotoneDBM(_AbstractMonotone):
    """Mean-field inference in a general Boltzmann machine with a unique fixed point.

    Feng, Winston & Kolter, *Monotone deep Boltzmann machines*, TMLR 2023.

    The machine has `binary` binary units and `groups` categorical units with
    `categories` states each, all possibly coupled to each other (no restricted
    structure). Its marginals `q = [q_binary, q_groups.ravel()]` solve the
    mean-field equations `q = σ(W q + b)` (sigmoid on binary units, softmax within
    each group; observed variables clamped to their values), whose solution is the
    unique minimiser of the mean-field free energy (`free_energy`) because
    `I − W ⪰ m I` by construction (`W()` says how), for any parameters and any
    evidence. `solve` finds it by operator splitting with the proximal operator of
    the softmax (`fixpoint.solvers.MeanField`); gradients with respect to the
    parameters and the observed values come from the implicit function theorem.

    **Arguments:**

    - `binary`, `groups`, `categories`: the units (`categories >= 2`; either kind
      may be absent).

    Keyword-only:

    - `rank`: the number of rows of the factor `A` (default: the number of units,
      `binary + groups · categories`).
    - `m`: the monotonicity parameter in `(0, 1)` (default `0.1`): `I − W ⪰ m I`.
    - `solver`: `fixpoint.solvers.PeacemanRachford` (default, `rtol = atol = 1e-5`,
      `alpha = 1`, where the proximal step is the softmax itself) or
      `ForwardBackward` (its steps use the proximal operator at `α ≠ 1`).
    - `max_steps`, `adjoint`, `throw`, `compaction`: as for `fixpoint.layers.MonDEQ`.
    - `dtype`: the parameters' dtype (default: JAX's default float).
    - `key`: a `jax.random` key (the factor is uniform in `±1/sqrt(rank)`, the
      biases zero).
    """

    A: Float[Array, "rank units"]
    bias: Float[Array, " units"]
    binary: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    categories: int = eqx.field(static=True)
    m: float = eqx.field(static=True, converter=internal.as_python_number)
    solver: PeacemanRachford | ForwardBackward = eqx.field(static=True)
    max_steps: int = eqx.field(static=True, converter=internal.as_python_number)
    adjoint: fixpoint.AbstractAdjoint = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    compaction: fixpoint.Compaction | None = eqx.field(static=True)
    settings: ClassVar[tuple[str, ...]] = _AbstractMonotone.settings

    def __init__(
        self,
        binary: int,
        groups: int,
        categories: int,
        *,
        rank: int | None = None,
        m: float = 0.1,
        solver: PeacemanRachford | ForwardBackward | None = None,
        max_steps: int = 100,
        adjoint: fixpoint.AbstractAdjoint = _IMPLICIT,
        throw: bool = True,
        compaction: fixpoint.Compaction | None = fixpoint.Compaction(),
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        owner = "MonotoneDBM"
        layout = MeanField(binary, groups, categories)  # checks the sizes
        m = internal.check_number(m, "m", "(0, 1)", owner=owner)
        rank = layout.size if rank is None else internal.check_int(rank, "rank", 1, owner=owner)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        lim = 1 / np.sqrt(rank)
        self.A = jax.random.uniform(key, (rank, layout.size), dtype, -lim, lim)
        self.bias = jnp.zeros((layout.size,), dtype)
        self.binary, self.groups, self.categories = layout.binary, layout.groups, layout.categories
        self.m = float(m)
        self._configure(
            solver=solver,
            max_steps=max_steps,
            adjoint=adjoint,
            throw=throw,
            compaction=compaction,
        )

    # ---- the parameterisation -------------------------------------------------

    @property
    def size(self) -> int:
        """The number of units, `binary + groups · categories` (the length of `q`)."""
        return self.binary + self.groups * self.categories

    @property
    def variables(self) -> int:
        """The number of variables, `binary + groups` (the length of `observed`)."""
        return self.binary + self.groups

    def factor(self) -> Float[Array, "rank units"]:
        """`Â`: `A` with each variable's columns rescaled so that `‖Â_v‖₂² ≤ 1 − m`.

        **Returns:**

        `Â`, the shape of `A`. A variable whose block already satisfies the bound
        is unchanged.
        """
        sq_bin = jnp.sum(self.A[:, : self.binary] ** 2, axis=0)
        if self.groups:
            a_cat = self.A[:, self.binary :].reshape(-1, self.groups, self.categories)
            gram = jnp.einsum("rgk,rgl->gkl", a_cat, a_cat)
            sq_cat = jnp.linalg.eigvalsh(gram)[..., -1]
        else:
            sq_cat = jnp.zeros((0,), self.A.dtype)
        squared = jnp.concatenate([sq_bin, sq_cat]).astype(self.A.dtype)
        limit = 1 - self.m
        # min(1, sqrt(limit / ‖Â_v‖²)), written to have a finite derivative at 0.
        scale = jnp.sqrt(limit / jnp.maximum(squared, limit))
        per_unit = scale[_variable_of_unit(self.binary, self.groups, self.categories)]
        return self.A * per_unit

    def W(self) -> Float[Array, "units units"]:
        """The couplings: `W = −ÂᵀÂ` with the blocks of each variable zeroed.

        Symmetric, zero on each variable's diagonal block (a Boltzmann machine's
        pairwise potentials), and `I − W = I − blkdiag(Â_vᵀÂ_v) + ÂᵀÂ ⪰ m I`
        because every `‖Â_v‖₂² ≤ 1 − m` (see `factor`).
        """
        a = self.factor()
        v = _variable_of_unit(self.binary, self.groups, self.categories)
        different = jnp.asarray(v[:, None] != v[None, :], a.dtype)
        return -different * (a.T @ a)

    def operator(self) -> MonotoneMatrix:
        """`W` as the `fixpoint.solvers.MonotoneMatrix` the splitting solvers take."""
        return MonotoneMatrix(self.W(), self.m)

    def monotonicity(self) -> Float[Array, ""]:
        """The smallest eigenvalue of `I − W` (symmetric); at least `m` up to round-off."""
        return self.operator().monotonicity()

    def is_monotone(self, atol: float | None = None) -> Bool[Array, ""]:
        """Whether `monotonicity() ≥ m − atol` (default `atol`: round-off, as
        `fixpoint.layers.MonDEQ.is_monotone`)."""
        return _is_monotone(self.operator(), atol)

    # ---- inference ------------------------------------------------------------

    def nonlinearity(
        self,
        observed: Bool[Array, " variables"] | None = None,
        values: Float[Array, " units"] | None = None,
    ) -> MeanField:
        """The mean-field nonlinearity with this evidence (`fixpoint.solvers.MeanField`).

        **Arguments:** `observed` and `values` as for `solve`.

        **Returns:**

        A `fixpoint.solvers.MeanField` with this machine's layout.
        """
        return MeanField(
            self.binary, self.groups, self.categories, observed=observed, values=values
        )

    def solve(
        self,
        observed: Bool[Array, " variables"] | None = None,
        values: Float[Array, " units"] | None = None,
        q0: Float[Array, " units"] | None = None,
    ) -> fixpoint.Solution:
        """The mean-field marginals given the evidence, with result code and statistics.

        **Arguments:**

        - `observed`: `None` (no evidence) or a boolean array `(binary + groups,)`,
          one entry per variable (binary units first, then the groups).
        - `values`: the observed values in the layout of `q`, `(size,)`: a mean in
          `[0, 1]` per binary unit and a distribution (usually one-hot,
          `jax.nn.one_hot`) per group; read only where `observed`.
        - `q0`: a starting point `(size,)`; default `σ(0)` with the evidence
          clamped (one half, uniform distributions). Any start gives the same
          answer.

        **Returns:**

        A `fixpoint.Solution` whose `value` is `q`, with `stats["num_steps"]` and
        `stats["residual"]` (max-norm of `σ(W q + b) − q`). `split(q)` separates
        the binary means from the groups' distributions.
        """
        sigma = self.nonlinearity(observed, values)
        if sigma.values is not None and sigma.values.dtype != self.A.dtype:
            raise TypeError(
                f"MonotoneDBM: `values` must have the parameters' dtype {self.A.dtype}, got "
                f"{sigma.values.dtype}."
            )
        if q0 is None:
            q0 = sigma(jnp.zeros((self.size,), self.A.dtype))
        return self.solver.solve(
            self.operator(),
            self.bias,
            q0,
            max_steps=self.max_steps,
            throw=self.throw,
            adjoint=self.adjoint,
            compaction=self.compaction,
            nonlinearity=sigma,
        )

    def __call__(
        self,
        observed: Bool[Array, " variables"] | None = None,
        values: Float[Array, " units"] | None = None,
        q0: Float[Array, " units"] | None = None,
    ) -> Float[Array, " units"]:
        """The mean-field marginals `q` (see `solve`)."""
        return self.solve(observed, values, q0).value

    def split(self, q: Float[Array, " units"]) -> tuple[Array, Array]:
        """`(q_binary (binary,), q_groups (groups, categories))` from a state `q`."""
        return self.nonlinearity().split(q)

    def free_energy(self, q: Float[Array, " units"]) -> Float[Array, ""]:
        """The naive mean-field free energy `−½ qᵀ W q − bᵀ q − Σ_v H(q_v)`.

        Strongly convex over the product of simplices (see the module notes), so
        the marginals `solve` returns minimise it, among states that agree with
        the evidence.

        **Arguments:**

        - `q`: marginals `(size,)`: means in `[0, 1]`, distributions per group.

        **Returns:**

        The free energy, a scalar.
        """
        qb, qg = self.split(q)
        xlogx = lambda p: jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0)
        negentropy = jnp.sum(xlogx(qb) + xlogx(1 - qb)) + jnp.sum(xlogx(qg))
        return -0.5 * q @ self.W() @ q - self.bias @ q + negentropy
