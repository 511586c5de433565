"""The nonlinearity of a monotone equilibrium `z = σ(W z + b)`, as a proximal operator.

Operator splitting solves `0 ∈ (I - W) z - b + ∂f(z)` for a closed convex `f`; its
zero is the equilibrium `z = σ(W z + b)` exactly when `σ = prox_f`, and the splitting
steps need the proximal operator of `α f` for their step size `α`
(`prox_{αf}(v) = argmin_q α f(q) + ½‖q - v‖²`). Two nonlinearities:

- `NonNegative`: `f` the indicator of the orthant, `σ = relu = prox_{αf}` for every
  `α` (Winston & Kolter's monDEQ).
- `MeanField`: mean-field marginals of binary units (`σ = sigmoid`) and categorical
  groups (`σ = softmax` per group), with clamped (observed) units. The mean-field
  update `q = softmax(W q + b)` is the proximal operator of
  `f(q) = Σ q log q − ½‖q‖²` on the simplex (convex there, since `1/q ≥ 1`), so a
  Boltzmann machine whose `I − W` is strongly monotone has exactly one mean-field
  fixed point and the splitting methods find it (Feng, Winston & Kolter, *Monotone
  deep Boltzmann machines*, TMLR 2023).

`prox_{αf}` for `α ≠ 1` has no closed form in elementary functions: with `s = log q`
each coordinate solves `α s + (1 − α) eˢ = v − c` and the group's normaliser `c`
makes the probabilities sum to one. Both are monotone scalar equations, convex or
concave on known sides, solved by Newton iterations started where they move
monotonically onto the root: round-off in a fixed number of steps.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.core import Tracer
from jaxtyping import Array, Bool, Float

from fixpoint import internal


class AbstractProximal(eqx.Module):
    """The nonlinearity `σ = prox_f` of a monotone equilibrium `z = σ(W z + b)`.

    `f` is a closed convex function; `σ` is its proximal operator with step one, so
    the equilibrium is the zero of the monotone inclusion
    `0 ∈ (I − W) z − b + ∂f(z)`, which `fixpoint.solvers.ForwardBackward` and
    `fixpoint.solvers.PeacemanRachford` solve with steps of `prox_{αf}`.

    A concrete nonlinearity provides `__call__(v)` (`σ(v) = prox_f(v)`, also
    what the implicit gradient differentiates) and `prox(v, alpha)`
    (`prox_{αf}(v)` for a step `α > 0`).

    Winston & Kolter, *Monotone operator equilibrium networks*, NeurIPS 2020;
    Feng, Winston & Kolter, *Monotone deep Boltzmann machines*, TMLR 2023.
    """

    @abc.abstractmethod
    def __call__(self, v: Array) -> Array:
        """`σ(v) = prox_f(v)`.

        **Arguments:**

        - `v`: a state of the equilibrium's shape.

        **Returns:**

        `σ(v)`, the shape of `v`.
        """

    @abc.abstractmethod
    def prox(self, v: Array, alpha: Float[Array, ""]) -> Array:
        """`prox_{αf}(v) = argmin_q α f(q) + ½‖q − v‖²`.

        **Arguments:**

        - `v`: a state of the equilibrium's shape.
        - `alpha`: the step `α > 0`, a scalar.

        **Returns:**

        `prox_{αf}(v)`, the shape of `v`.
        """


class NonNegative(AbstractProximal):
    """`σ = relu`: `f` is the indicator of the non-negative orthant.

    `prox_{αf} = relu` for every step `α`. The nonlinearity of the monDEQ layers
    (`fixpoint.layers.MonDEQ`), and the splitting solvers' default. Winston &
    Kolter, *Monotone operator equilibrium networks*, NeurIPS 2020.
    """

    def __call__(self, v: Array) -> Array:
        return jax.nn.relu(v)

    def prox(self, v: Array, alpha: Float[Array, ""]) -> Array:
        del alpha
        return jax.nn.relu(v)


# ---- scalar monotone equations -------------------------------------------------


def _binary_prox(v, alpha, steps):
    """`prox_{αf}` for `f(q) = q log q + (1 − q) log(1 − q) − ½ q²` on `[0, 1]`.

    Optimality: `α s + (1 − α) σ(s) = v` for `s = logit(q)`, an increasing equation
    whose left side is convex on one side of `s = 0` and concave on the other. Newton
    started on the side of the root where it moves monotonically onto it: from `0`
    for `α < 1` (convex left of zero, concave right of it), and from the end of the
    bracket `s ∈ [(v − max(0, 1 − α))/α, (v − min(0, 1 − α))/α]` on the root's side
    for `α > 1`.
    """
    lo = (v - jnp.maximum(0, 1 - alpha)) / alpha
    hi = (v - jnp.minimum(0, 1 - alpha)) / alpha
    negative_root = 0.5 * (1 - alpha) > v
    start = jnp.where(alpha <= 1, 0, jnp.where(negative_root, lo, hi)).astype(v.dtype)

    def body(_, s):
        p = jax.nn.sigmoid(s)
        g = alpha * s + (1 - alpha) * p - v
        return jnp.clip(s - g / (alpha + (1 - alpha) * p * (1 - p)), lo, hi)

    return jax.nn.sigmoid(jax.lax.fori_loop(0, steps, body, start))


def _log_probability(z, alpha, steps):
    """The `s ≤ 0` with `α s + (1 − α) eˢ = α z`, elementwise (`α > 0`, scalar).

    With `u = s + log(|1 − α|/α)` and `w = z + log(|1 − α|/α)` this is
    `u + eᵘ = w` for `α < 1` (convex, increasing: Newton from `u₀ = log w` if
    `w > 1`, else `w`, both right of the root, moves monotonically onto it) and
    `u − eᵘ = w` for `α > 1` (concave, increasing where `s ≤ 0`: Newton from the
    left, `u₀ = w`). At `α = 1`, `s = z`.
    """
    exact = alpha == 1
    # At α = 1 the answer is `z`; the discarded iteration then runs the `α < 1` form,
    # whose slope `1 + eᵘ` never vanishes (so its derivative, zeroed, is not NaN).
    below = alpha <= 1
    shift = jnp.log(jnp.where(exact, 1, jnp.abs(1 - alpha)) / alpha)
    w = z + shift
    sign = jnp.where(below, 1, -1).astype(z.dtype)
    start = jnp.where(below & (w > 1), jnp.log(jnp.maximum(w, 1)), w)
    top = jnp.where(below, jnp.inf, shift)  # s ≤ 0

    def body(_, u):
        e = jnp.exp(u)
        return jnp.minimum(u - (u + sign * e - w) / (1 + sign * e), top)

    s = jax.lax.fori_loop(0, steps, body, jnp.minimum(start, top)) - shift
    return jnp.where(exact, z, jnp.minimum(s, 0))


def _categorical_prox(v, alpha, steps):
    """`prox_{αf}` for `f(q) = Σ q log q − ½‖q‖²` on the simplex, over the last axis.

    Optimality: `α log qᵢ + (1 − α) qᵢ = vᵢ − c` with `c` such that `Σ qᵢ = 1`.
    Each `qᵢ(c)` is increasing and convex in `vᵢ − c` (`_log_probability`), so
    `Σ qᵢ(c) − 1` is decreasing and convex in `c`: Newton from the left of its root,
    `c₀` where the largest `qᵢ` is one, moves monotonically onto it.
    """

    def q_of(c):
        q = jnp.exp(_log_probability((v - c[..., None]) / alpha, alpha, steps))
        return q, q / (alpha + (1 - alpha) * q)  # q and -dq/dc

    def body(_, c):
        q, slope = q_of(c)
        return c + (jnp.sum(q, axis=-1) - 1) / jnp.sum(slope, axis=-1)

    c0 = jnp.max(v, axis=-1) - (1 - alpha)  # where the largest qᵢ is one
    c = jax.lax.fori_loop(0, steps, body, c0)
    q = q_of(c)[0]
    return q / jnp.sum(q, axis=-1, keepdims=True)


class MeanField(AbstractProximal):
    """Mean-field marginals of a Boltzmann machine's binary and categorical units.

    The state `q` lists `binary` unit means (`P(unit = 1)`) and then `groups`
    categorical units with `categories` states each, group by group:
    `q = [q_binary (binary,), q_categorical (groups · categories,)]`.
    `σ` is the sigmoid on the binary units and the softmax within each group: the
    mean-field update `q = σ(W q + b)` of a Boltzmann machine with energy
    `−½ xᵀ W x − bᵀ x` (one-hot `x` for the categorical units, `W` symmetric with
    zero blocks on its diagonal).

    `σ = prox_f` for `f(q) = Σ q log q + (1 − q) log(1 − q) − ½ q²` over the binary
    units plus `Σ q log q − ½‖q‖²` over each group's simplex (convex because every
    `q ≤ 1`). `prox(v, α) = prox_{αf}(v)` solves the optimality conditions
    `α logit(q) + (1 − α) q = v` (binary) and `α log qᵢ + (1 − α) qᵢ = vᵢ − c`,
    `Σ qᵢ = 1` (categorical) by monotone Newton iterations; at `α = 1` it is
    exactly `σ`.

    Observed (clamped) variables: `f` gets the indicator of their observed value,
    whose proximal operator is that value for every step, so inference with evidence
    is the same kind of monotone equilibrium.

    Feng, Winston & Kolter, *Monotone deep Boltzmann machines*, TMLR 2023.

    **Arguments:**

    - `binary`: the number of binary units, `>= 0`.
    - `groups`: the number of categorical units, `>= 0`.
    - `categories`: the number of states of each categorical unit, `>= 2`.

    Keyword-only:

    - `observed`: `None` (nothing observed) or a boolean array with one entry per
      variable, `(binary + groups,)`: the binary units first, then the groups.
    - `values`: the observed values, in the layout of `q` (`(binary + groups ·
      categories,)`: a mean in `[0, 1]` per binary unit, a distribution, usually
      one-hot, per group). Read only where `observed`; needed with it.
    - `newton_steps`: the iterations of each Newton solve in `prox` (default
      `12`; each solve starts where its iterates move monotonically onto the
      root, and reaches float64 round-off in about ten for any `α` and input).
    """

    binary: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    categories: int = eqx.field(static=True)
    observed: Bool[Array, " variables"] | None
    values: Float[Array, " units"] | None
    newton_steps: int = eqx.field(static=True)

    def __init__(
        self,
        binary: int,
        groups: int,
        categories: int,
        *,
        observed: Bool[Array, " variables"] | None = None,
        values: Float[Array, " units"] | None = None,
        newton_steps: int = 12,
    ):
        owner = "MeanField"
        self.binary = internal.check_int(binary, "binary", 0, owner=owner)
        self.groups = internal.check_int(groups, "groups", 0, owner=owner)
        self.categories = internal.check_int(categories, "categories", 2, owner=owner)
        self.newton_steps = internal.check_int(newton_steps, "newton_steps", 1, owner=owner)
        if self.binary + self.groups == 0:
            raise ValueError(f"{owner}: needs at least one unit (`binary` or `groups` > 0).")
        if (observed is None) != (values is None):
            raise ValueError(f"{owner}: pass `observed` and `values` together (or neither).")
        if observed is not None:
            observed = jnp.asarray(observed)
            values = jnp.asarray(values)
            if observed.shape != (self.variables,) or observed.dtype != jnp.bool_:
                raise ValueError(
                    f"{owner}: `observed` must be a boolean array of shape ({self.variables},) "
                    f"(binary + groups), got {observed.dtype}{list(observed.shape)}."
                )
            if values.shape != (self.size,) or not jnp.issubdtype(values.dtype, jnp.floating):
                raise ValueError(
                    f"{owner}: `values` must be a float array of shape ({self.size},) "
                    f"(binary + groups · categories), got {values.dtype}{list(values.shape)}."
                )
        self.observed = observed
        self.values = values

    @property
    def variables(self) -> int:
        """The number of variables, `binary + groups`."""
        return self.binary + self.groups

    @property
    def size(self) -> int:
        """The length of the state `q`, `binary + groups · categories`."""
        return self.binary + self.groups * self.categories

    def split(self, q: Float[Array, " units"]) -> tuple[Array, Array]:
        """The binary means and the groups' distributions of a state.

        **Arguments:**

        - `q`: a state, `(binary + groups · categories,)`.

        **Returns:**

        `(q_binary, q_groups)`: shapes `(binary,)` and `(groups, categories)`.
        """
        self._check(q)
        return q[: self.binary], q[self.binary :].reshape(self.groups, self.categories)

    def _join(self, binary, groups):
        return jnp.concatenate([binary, groups.reshape(-1)])

    def _clamp(self, q):
        if self.observed is None or self.values is None:
            return q
        per_unit = jnp.concatenate(
            [
                self.observed[: self.binary],
                jnp.repeat(self.observed[self.binary :], self.categories),
            ]
        )
        return jnp.where(per_unit, self.values.astype(q.dtype), q)

    def _check(self, v):
        if jnp.shape(v) != (self.size,):
            raise ValueError(
                f"MeanField: the state must have shape ({self.size},) (binary + groups · "
                f"categories), got {tuple(v.shape)}."
            )

    def __call__(self, v: Float[Array, " units"]) -> Float[Array, " units"]:
        self._check(v)
        b, g = self.split(v)
        return self._clamp(self._join(jax.nn.sigmoid(b), jax.nn.softmax(g, axis=-1)))

    def prox(self, v: Float[Array, " units"], alpha: Float[Array, ""]) -> Float[Array, " units"]:
        self._check(v)
        if not isinstance(alpha, Tracer) and not float(alpha) > 0:
            raise ValueError(f"MeanField.prox: `alpha` must be > 0, got {alpha!r}.")
        alpha = jnp.asarray(alpha, v.dtype)
        b, g = self.split(v)
        out = self._join(
            _binary_prox(b, alpha, self.newton_steps),
            _categorical_prox(g, alpha, self.newton_steps),
        )
        return self._clamp(out)
