"""How fast a fixed-point iteration contracts near a point, and certificates for
games: the local rate (`contraction_estimate`) and the small-gain certificate of a
game with block (player) structure (`game_constants`, `small_gain_certificate`).

For a game whose state is a tuple or dict of players' blocks `y = (y_1, ..., y_K)`
and whose map `f` is the players' best responses, the game operator is
`F(y) = y − f(y)`. Each block `F_i` is `μ_i`-strongly monotone in its own block and
`L_ij`-Lipschitz in block `j`; with weights `w > 0`,
`⟨F(x) − F(y), x − y⟩_w ≥ α*(w) ‖x − y‖_w²` where `α*(w) = ½ λ_min(D^-½ C D^-½)`,
`C_ii = 2 w_i μ_i`, `C_ij = −(w_i L_ij + w_j L_ji)`, `D = diag(w)`. A positive
`α*` makes `F` strongly monotone in the weighted norm, so the equilibrium is unique
and the damped iteration `y ← y − η F(y)` (Picard with damping `η`) contracts.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PRNGKeyArray

from ._blockwise import blocks_of
from ._checks import as_float_pytree, check_int


def spectral_radius_jvp(
    jv: Callable[[Array], Array], v0: Array, iters: int
) -> tuple[Float[Array, ""], Array]:
    """Gelfand's estimate of the spectral radius of a linear map given as `jv`.

    Power iteration from `v0`; the estimate is the geometric mean of the growth
    factors `‖J v_k‖` over the second half of the `iters` steps (which also
    converges when the dominant eigenvalues are a complex pair). Used by
    `fixpoint.contraction_estimate` and `fixpoint.layers.spectral_radius`.

    **Arguments:**

    - `jv`: `v -> J v`, e.g. a JVP.
    - `v0`: the start vector (any nonzero vector of `J`'s size).
    - `iters`: the number of power-iteration steps (the second half is averaged).

    **Returns:**

    `(radius, v)`: the estimate, a scalar, and the last normalised iterate.
    """
    burn_in = iters // 2
    tiny = jnp.finfo(v0.dtype).tiny

    def body(i, carry):
        v, log_growth = carry
        w = jv(v)
        norm = jnp.linalg.norm(w)
        log_growth = log_growth + jnp.where(i >= burn_in, jnp.log(norm), 0.0)
        return w / (norm + tiny), log_growth

    init = (v0 / jnp.linalg.norm(v0), jnp.zeros((), v0.dtype))
    v, log_growth = jax.lax.fori_loop(0, iters, body, init)
    return jnp.exp(log_growth / (iters - burn_in)), v


class ContractionEstimate(eqx.Module):
    """The local rate of the iteration `y ← f(y)` at a point (`contraction_estimate`).

    **Arguments:**

    - `rate`: the spectral radius of `f`'s Jacobian at the point: the asymptotic
      factor by which Picard iteration shrinks the error there (below one: the
      fixed point attracts).
    - `eigenvalue`: the dominant eigenvalue (a complex scalar; one of a complex
      pair), from the last power iterates: accurate when it is a simple real
      eigenvalue or a simple complex pair set apart from the rest of the
      spectrum, rough otherwise (several of nearly the same modulus).
    - `damping`: a suggested damping `α` for `y ← (1 − α) y + α f(y)`: 1 where
      `rate < 1`; else the `α` in `(0, 1]` that minimises the dominant
      eigenvalue's factor `|1 − α + α λ|`, `(1 − Re λ) / |1 − λ|²`, if that
      factor is then below one; NaN where no damping helps (a real eigenvalue
      `≥ 1`). Other eigenvalues may then dominate: check with a second
      estimate of the damped map.
    - `damped_rate`: the dominant eigenvalue's factor `|1 − α + α λ|` with that
      damping.
    """

    rate: Float[Array, ""]
    eigenvalue: Array
    damping: Float[Array, ""]
    damped_rate: Float[Array, ""]


def contraction_estimate(
    fn: Callable,
    y: Any,
    args: Any = None,
    *,
    iterations: int = 100,
    key: PRNGKeyArray | None = None,
) -> ContractionEstimate:
    """Estimate how fast `y ← fn(y, args)` contracts near `y`, with JVPs only.

    The rate is the spectral radius of `fn`'s Jacobian at `y` (power iteration on
    JVPs, Gelfand's formula over the second half of the iterations); the dominant
    eigenvalue comes from the last three power iterates (a least-squares fit of
    `J² v ≈ a J v + b v`, whose roots are the dominant pair, real or complex).
    A local, asymptotic estimate: it says nothing about points far from `y`.

    **Arguments:**

    - `fn`: `fn(y, args) -> y_next`, with the structure, shapes and dtypes of `y`.
    - `y`: the point (a pytree of floating-point arrays); no gradient flows to it.
    - `args`: passed to `fn`.
    - `iterations`: power-iteration steps, an integer `>= 4` (default 100).
    - `key`: the PRNG key of the random start vector (default `PRNGKey(0)`).

    **Returns:**

    A `fixpoint.ContractionEstimate`: `rate`, `eigenvalue`, a suggested
    `damping` and the `damped_rate` it gives the dominant eigenvalue.
    """
    check_int(iterations, "iterations", 4, owner="contraction_estimate")
    if not callable(fn):
        raise TypeError(f"contraction_estimate: `fn` must be callable, got {fn!r}.")
    y = as_float_pytree(y)
    flat, unravel = ravel_pytree(jax.lax.stop_gradient(y))
    out = jax.eval_shape(lambda y: fn(y, args), y)
    if jax.tree.structure(out) != jax.tree.structure(y) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(y), strict=True)
    ):
        raise ValueError(
            "contraction_estimate: `fn(y, args)` must return the structure, shapes and "
            f"dtypes of `y`: got {out} for `y` of {jax.eval_shape(lambda: y)}."
        )

    def flat_fn(v):
        return ravel_pytree(fn(unravel(v), args))[0]

    def jv(v):
        return jax.jvp(flat_fn, (flat,), (v,))[1]

    key = jax.random.PRNGKey(0) if key is None else key
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    rate, v = spectral_radius_jvp(jv, v0, iterations)
    w1 = jv(v)
    w2 = jv(w1)
    basis = jnp.stack([w1, v], axis=1)
    (a, b), *_ = jnp.linalg.lstsq(basis, w2)
    cdtype = jnp.complex128 if a.dtype == jnp.float64 else jnp.complex64
    a_c, root = a.astype(cdtype), jnp.sqrt((a * a + 4 * b).astype(cdtype))
    roots = jnp.stack([(a_c + root) / 2, (a_c - root) / 2])
    lam = roots[jnp.argmax(jnp.abs(roots))]
    one = jnp.ones((), rate.dtype)
    best = (1 - lam.real) / jnp.abs(1 - lam) ** 2
    alpha = jnp.minimum(best, one).astype(rate.dtype)
    factor = jnp.abs((1 - alpha).astype(cdtype) + alpha.astype(cdtype) * lam).astype(rate.dtype)
    helps = (alpha > 0) & (factor < 1)
    damping = jnp.where(rate < 1, one, jnp.where(helps, alpha, jnp.nan))
    damped = jnp.where(rate < 1, rate, jnp.where(helps, factor, jnp.nan))
    return ContractionEstimate(rate=rate, eigenvalue=lam, damping=damping, damped_rate=damped)


# ----------------------------------------------------------------------- games


def _as_float(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


class GameConstants(eqx.Module):
    """The constants of a game's operator `F(y) = y − f(y)`, block by block.

    Give them yourself as global bounds (then a certificate is a proof), or
    estimate them at a point with `fixpoint.game_constants` (then `local=True`
    and a certificate says only what holds near that point).

    **Arguments:**

    - `mu`: `μ_i`, the strong-monotonicity constant of `F_i` in its own block,
      shape `(K,)`.
    - `coupling`: `L_ij`, the Lipschitz constant of `F_i` in block `j`, shape
      `(K, K)` (the diagonal is ignored).
    - `lipschitz`: the Lipschitz constant of `F_i` in its own block, shape `(K,)`,
      or `None` (then a certificate gives no step size or rate).
    - `local`: whether the constants are estimates at one point.
    """

    mu: Float[Array, " K"] = eqx.field(converter=lambda x: _as_float(x))
    coupling: Float[Array, "K K"] = eqx.field(converter=lambda x: _as_float(x))
    lipschitz: Float[Array, " K"] | None = eqx.field(
        default=None, converter=lambda x: None if x is None else _as_float(x)
    )
    local: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        k = np.shape(self.mu)
        if len(k) != 1 or np.shape(self.coupling) != (k[0], k[0]):
            raise ValueError(
                "GameConstants: `mu` must have shape (K,) and `coupling` (K, K), got "
                f"{np.shape(self.mu)} and {np.shape(self.coupling)}."
            )
        if self.lipschitz is not None and np.shape(self.lipschitz) != k:
            raise ValueError(
                f"GameConstants: `lipschitz` must have shape {k}, got {np.shape(self.lipschitz)}."
            )


def game_constants(fn: Callable, y: Any, args: Any = None) -> GameConstants:
    """Estimate a game's constants at `y` from the Jacobian of `F(y) = y − fn(y, args)`.

    `μ_i = λ_min(sym(∂F_i/∂y_i))`, `L_ij = ‖∂F_i/∂y_j‖₂` and the own-block
    Lipschitz constant `‖∂F_i/∂y_i‖₂`, from the dense Jacobian (`jax.jacfwd`:
    small games). They hold at `y` only (`local=True`): a certificate built on
    them is a local estimate, not a proof.

    **Arguments:**

    - `fn`: the best-response map `fn(y, args) -> y_next`, same structure as `y`.
    - `y`: the point, a tuple, list or dict of blocks (the players).
    - `args`: passed to `fn`.

    **Returns:**

    A `fixpoint.GameConstants` with `local=True`.
    """
    y = as_float_pytree(y)
    blocks = blocks_of(y)
    if blocks is None or len(blocks) < 2:
        raise TypeError(
            "game_constants: `y` must be a tuple, list or dict of at least two blocks "
            f"(one per player), got {type(y).__name__}."
        )
    flat, unravel = ravel_pytree(jax.lax.stop_gradient(y))
    jac = jax.jacfwd(lambda v: v - ravel_pytree(fn(unravel(v), args))[0])(flat)
    k = len(blocks)
    mu, lip = [], []
    coupling = [[jnp.zeros((), flat.dtype)] * k for _ in range(k)]
    for i, (a, b) in enumerate(blocks):
        own = jac[a:b, a:b]
        mu.append(jnp.linalg.eigvalsh((own + own.T) / 2)[0])
        lip.append(jnp.linalg.norm(own, 2))
        for j, (c, d) in enumerate(blocks):
            if i != j:
                coupling[i][j] = jnp.linalg.norm(jac[a:b, c:d], 2)
    return GameConstants(
        mu=jnp.stack(mu),
        coupling=jnp.stack([jnp.stack(row) for row in coupling]),
        lipschitz=jnp.stack(lip),
        local=True,
    )


class SmallGainCertificate(eqx.Module):
    """The result of `fixpoint.small_gain_certificate`.

    **Arguments:**

    - `certified`: whether the weighted margin is positive: `F` is then strongly
      monotone in the `w`-weighted norm, the equilibrium unique and the damped
      iteration below contracting (globally for global constants; near the
      point for `local` ones).
    - `margin`: `α*(w) = ½ λ_min(D^-½ C D^-½)`, the strong-monotonicity modulus in
      the norm `‖y‖_w² = Σ_i w_i ‖y_i‖²`.
    - `weights`: the weights `w` (normalised to sum to `K`).
    - `euclidean_margin`: `α*` with all weights 1 (plain monotonicity).
    - `lipschitz`: a bound `ℓ_w = ‖D^½ Λ D^-½‖₂` on `F`'s Lipschitz constant in
      that norm (`Λ` the block constants), or NaN without own-block constants.
    - `step_size`: `η = α*/ℓ_w²`, the damping of `y ← y − η F(y) = (1 − η) y +
      η f(y)` that contracts fastest by this bound (any `η < 2α*/ℓ_w²`
      contracts); NaN if not certified or without `lipschitz`.
    - `rate`: its contraction factor `√(1 − α*²/ℓ_w²)` in the weighted norm.
    - `local`: whether the constants were estimates at one point.
    """

    certified: Array
    margin: Float[Array, ""]
    weights: Float[Array, " K"]
    euclidean_margin: Float[Array, ""]
    lipschitz: Float[Array, ""]
    step_size: Float[Array, ""]
    rate: Float[Array, ""]
    local: bool = eqx.field(static=True)


def _margin(mu, coupling, w):
    c = -(w[:, None] * coupling + (w[:, None] * coupling).T)
    c = c - jnp.diag(jnp.diag(c)) + jnp.diag(2 * w * mu)
    s = 1 / jnp.sqrt(w)
    return jnp.linalg.eigvalsh(s[:, None] * c * s[None, :])[0] / 2


def _best_weights(mu, coupling, steps):
    """The weights: for two blocks coupled both ways the closed form; else a start that
    certifies whenever the comparison matrix `M` (`M_ii = μ_i`, `M_ij = −L_ij`)
    is a nonsingular M-matrix (`ρ(Γ) < 1`, `Γ_ij = L_ij / μ_i`), improved by
    gradient ascent on `log w`."""
    k = mu.shape[0]
    off = coupling * (1 - jnp.eye(k, dtype=coupling.dtype))
    if k == 2 and not isinstance(off, Tracer) and bool((off[0, 1] > 0) & (off[1, 0] > 0)):
        # λ_min of the weighted 2x2 is μ1 + μ2 − √((μ1 − μ2)² + (L12 + t L21)²/t)
        # for w = (1, t): best at t = L12 / L21. (One-sided coupling: the best t
        # is a limit; the general start below certifies.)
        return jnp.stack([jnp.ones_like(off[0, 1]), off[0, 1] / off[1, 0]])
    # C = D M + Mᵀ D with D = diag(w). For a nonsingular M-matrix, q = M⁻¹1 > 0
    # and p = M⁻ᵀ1 > 0, and w = p / q gives C q = D M q + Mᵀ D q = p + p > 0
    # with C a Z-matrix, so C is positive definite (the classic diagonal
    # Lyapunov solution). Otherwise start from all ones.
    m = jnp.diag(mu) - off
    ones = jnp.ones_like(mu)
    q = jnp.linalg.solve(m, ones)
    p = jnp.linalg.solve(m.T, ones)
    valid = jnp.all(q > 0) & jnp.all(p > 0) & jnp.all(jnp.isfinite(q)) & jnp.all(jnp.isfinite(p))
    w0 = jnp.where(valid, p / jnp.where(valid, q, 1), ones)
    s0 = jnp.log(w0)

    def value(s):
        return _margin(mu, off, jnp.exp(s - jnp.mean(s)))

    grad = jax.grad(value)

    def body(_, carry):
        s, best_s, best, lr = carry
        g = grad(s)
        s_new = s + lr * g / (jnp.linalg.norm(g) + 1e-30)
        v = value(s_new)
        better = v > best
        return (
            jnp.where(better, s_new, s),
            jnp.where(better, s_new, best_s),
            jnp.where(better, v, best),
            jnp.where(better, lr * 1.2, lr * 0.5),
        )

    init = (s0, s0, value(s0), jnp.asarray(0.5, mu.dtype))
    _, best_s, _, _ = jax.lax.fori_loop(0, steps, body, init)
    return jnp.exp(best_s - jnp.mean(best_s))


def small_gain_certificate(
    constants: GameConstants | Any,
    coupling: Any = None,
    *,
    lipschitz: Any = None,
    weights: Any = None,
    steps: int = 300,
) -> SmallGainCertificate:
    """Certify that a game's equilibrium is unique and the damped best-response
    iteration contracts, by weighted strong monotonicity (a small-gain condition).

    With the block constants of `F(y) = y − f(y)` (see `fixpoint.GameConstants`)
    it forms `C_ii = 2 w_i μ_i`, `C_ij = −(w_i L_ij + w_j L_ji)` and the margin
    `α*(w) = ½ λ_min(D^-½ C D^-½)`, `D = diag(w)`; certified when `α* > 0`. The
    weights, unless given: for two blocks coupled both ways the best ones in
    closed form, `w = (1, L12/L21)` (margin `½(μ1 + μ2 − √((μ1 − μ2)² + 4 L12
    L21))`); else
    `w = (M⁻ᵀ1) / (M⁻¹1)` (`M_ii = μ_i`, `M_ij = −L_ij`), which certifies
    whenever `M` is a nonsingular M-matrix (`ρ(Γ) < 1`, `Γ_ij = L_ij / μ_i`),
    improved by `steps` steps of gradient ascent on `log w` (the best seen is
    kept). A margin within rounding of zero (`100 ε` times the largest
    constant), or constants that are not finite or negative couplings, are
    not certified. With global bounds the
    certificate is a proof; with `fixpoint.game_constants`' estimates it is
    `local`.

    Small-Gain Nash: certified contraction to Nash equilibria in differentiable
    games, 2025; the weighted-monotonicity argument is the small-gain theorem's.

    **Arguments:**

    - `constants`: a `fixpoint.GameConstants`, or the array `μ` (shape `(K,)`)
      with `coupling` next.
    - `coupling`: `L_ij`, shape `(K, K)`, when `constants` is `μ`.
    - `lipschitz`: own-block Lipschitz constants, shape `(K,)`, when
      `constants` is `μ` (optional: for the step size and rate).
    - `weights`: `w`, shape `(K,)`, all positive: use these instead of choosing.
    - `steps`: gradient-ascent steps for `K > 2` (default 300).

    **Returns:**

    A `fixpoint.SmallGainCertificate`.
    """
    if not isinstance(constants, GameConstants):
        if coupling is None:
            raise TypeError(
                "small_gain_certificate: pass a `fixpoint.GameConstants`, or `mu` and "
                "`coupling` (global bounds)."
            )
        dtype = jnp.result_type(float)
        constants = GameConstants(
            mu=jnp.asarray(constants, dtype),
            coupling=jnp.asarray(coupling, dtype),
            lipschitz=None if lipschitz is None else jnp.asarray(lipschitz, dtype),
        )
    check_int(steps, "steps", 0, owner="small_gain_certificate")
    mu, lip = constants.mu, constants.lipschitz
    k = mu.shape[0]
    off = constants.coupling * (1 - jnp.eye(k, dtype=constants.coupling.dtype))
    if weights is None:
        w = _best_weights(mu, off, steps)
    else:
        w = jnp.asarray(weights, mu.dtype)
        if w.shape != (k,):
            raise ValueError(
                f"small_gain_certificate: `weights` must have shape ({k},), got {w.shape}."
            )
        if not isinstance(w, Tracer) and not bool(jnp.all(w > 0)):
            raise ValueError("small_gain_certificate: `weights` must all be positive.")
    w = w * k / jnp.sum(w)
    margin = _margin(mu, off, w)
    euclid = _margin(mu, off, jnp.ones_like(w))
    if lip is None:
        ell = jnp.full((), jnp.nan, mu.dtype)
    else:
        lam = off + jnp.diag(lip)
        s = jnp.sqrt(w)
        ell = jnp.linalg.norm(s[:, None] * lam / s[None, :], 2)
    sound = (
        jnp.all(jnp.isfinite(mu))
        & jnp.all(jnp.isfinite(off))
        & jnp.all(off >= 0)
        & jnp.all(jnp.isfinite(w))
        & jnp.all(w > 0)
    )
    scale = jnp.maximum(jnp.max(jnp.abs(mu)), jnp.max(jnp.abs(off)))
    certified = sound & (margin > 100 * jnp.finfo(mu.dtype).eps * scale)
    ok = certified & jnp.isfinite(ell)
    step = jnp.where(ok, margin / ell**2, jnp.nan)
    rate = jnp.where(ok, jnp.sqrt(jnp.maximum(1 - (margin / ell) ** 2, 0.0)), jnp.nan)
    return SmallGainCertificate(
        certified=certified,
        margin=margin,
        weights=w,
        euclidean_margin=euclid,
        lipschitz=ell,
        step_size=step,
        rate=rate,
        local=constants.local,
    )
