"""A game with known structure for the demos: multi-user power control over
parallel channels, each user best-responding by water-filling (Scutari, Palomar
and Barbarossa 2008)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray

import fixpoint


def water_filling(level: Float[Array, " N"], power: Float[Array, ""]) -> Float[Array, " N"]:
    """The power allocation `p(k) = [μ − level(k)]⁺` with `Σ_k p(k) = power`.

    The water level `μ` is found by bisection (which fixes the set of channels
    in use), then computed exactly from that set, `μ = (power + Σ_active
    level) / |active|`, so the result is exact up to rounding and
    differentiable in `level` and `power` away from a change of the active
    set. A dead channel (an infinite level) gets no power.

    **Arguments:**

    - `level`: the noise-plus-interference level of each channel over the
      user's own gain, shape `(N,)`.
    - `power`: the user's power budget, a positive scalar.

    **Returns:**

    The allocation, shape `(N,)`, non-negative, summing to `power`.
    """
    # The level lies between the best channel's and that plus all the power.
    lo = jnp.min(level)
    hi = lo + power

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        over = jnp.sum(jnp.maximum(mid - level, 0)) > power
        return jnp.where(over, lo, mid), jnp.where(over, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 100, body, (lo, hi))
    active = level < (lo + hi) / 2
    count = jnp.maximum(jnp.sum(active), 1).astype(level.dtype)
    mu = (power + jnp.sum(jnp.where(active, level, 0))) / count
    return jnp.maximum(mu - level, 0)


class InterferenceGame(eqx.Module):
    """K users share N parallel channels; each maximises its own rate
    `Σ_k log(1 + G_qq(k) p_q(k) / (σ_q²(k) + Σ_{r≠q} G_rq(k) p_r(k)))` under a
    power budget, so its best response is water-filling against the others'
    interference. The state is a tuple of the users' allocations, each of shape
    `(N,)`.

    **Arguments:**

    - `gains`: power gains, shape `(K, K, N)`: `gains[r, q, k] = G_rq(k)`, from
      transmitter `r` into receiver `q` on channel `k`.
    - `noise`: `σ_q²(k)`, shape `(K, N)`.
    - `power`: the budgets `P_q`, shape `(K,)`.
    """

    gains: Float[Array, "K K N"]
    noise: Float[Array, "K N"]
    power: Float[Array, " K"]

    @property
    def num_users(self) -> int:
        """`K`, the number of users."""
        return self.gains.shape[0]

    def level(self, p: tuple, q: int) -> Float[Array, " N"]:
        """User `q`'s noise-plus-interference over its own gain, given `p`."""
        interference = self.noise[q] + sum(
            self.gains[r, q] * p[r] for r in range(self.num_users) if r != q
        )
        return interference / self.gains[q, q]

    def best_response(self, p: tuple, q: int) -> Float[Array, " N"]:
        """User `q`'s water-filling answer to the others' allocations in `p`."""
        return water_filling(self.level(p, q), self.power[q])

    def responses(self) -> fixpoint.Blockwise:
        """The best responses as a `fixpoint.Blockwise` over the tuple state
        (one function per user: a sequential sweep costs one water-filling per
        user)."""
        return fixpoint.Blockwise(
            tuple(lambda p, args, q=q: self.best_response(p, q) for q in range(self.num_users))
        )

    def start(self) -> tuple:
        """Every user spreading its power evenly."""
        n = self.gains.shape[2]
        return tuple(
            jnp.full((n,), 1.0, self.noise.dtype) * self.power[q] / n for q in range(self.num_users)
        )

    def interference_ratios(self) -> Float[Array, "K K"]:
        """`S_qr = max_k G_rq(k) / G_qq(k)` for `r ≠ q` (zero diagonal): Scutari et
        al.'s matrix, whose spectral radius below one suffices for a unique
        equilibrium and convergence of every iterative water-filling order."""
        own = jnp.stack([self.gains[q, q] for q in range(self.num_users)])  # (K, N)
        ratio = jnp.max(jnp.transpose(self.gains, (1, 0, 2)) / own[:, None, :], axis=2)
        return ratio * (1 - jnp.eye(self.num_users, dtype=ratio.dtype))

    def constants(self) -> fixpoint.GameConstants:
        """Global constants of `F(p) = p − WF(p)`: water-filling is the Euclidean
        projection of `−level` onto `{p ≥ 0, Σ p = P}` (nonexpansive) and `level`
        depends on `p_r` through `diag(G_rq / G_qq)`, so `μ_q = 1` (`∂F_q/∂p_q =
        I`), `L_qr ≤ S_qr`, and the own-block Lipschitz constant is 1."""
        k = self.num_users
        one = jnp.ones((k,), self.noise.dtype)
        return fixpoint.GameConstants(
            mu=one, coupling=self.interference_ratios(), lipschitz=one, local=False
        )


def interference_game(
    key: PRNGKeyArray,
    num_users: int,
    num_channels: int,
    *,
    cross: float = 0.05,
    power: float = 1.0,
    noise: float = 0.1,
    dtype: DTypeLike = jnp.float64,
) -> InterferenceGame:
    """A random `InterferenceGame`: Rayleigh-faded power gains (exponential
    draws), direct ones `0.5 + Exp(1)/2`, cross ones `cross · Exp(1)`.

    **Arguments:**

    - `key`: the PRNG key.
    - `num_users`, `num_channels`: `K` and `N`.
    - `cross`: the mean cross gain relative to the direct one (default 0.05):
      larger means more coupling (and, past a point, no contraction).
    - `power`: every user's budget (default 1).
    - `noise`: the noise power on every channel (default 0.1).
    - `dtype`: the float dtype (default float64).

    **Returns:**

    An `InterferenceGame`.
    """
    fading = jax.random.exponential(key, (num_users, num_users, num_channels), dtype)
    eye = jnp.eye(num_users, dtype=dtype)[:, :, None]
    gains = eye * (0.5 + fading / 2) + (1 - eye) * cross * fading
    return InterferenceGame(
        gains=gains,
        noise=jnp.full((num_users, num_channels), noise, dtype),
        power=jnp.full((num_users,), power, dtype),
    )
