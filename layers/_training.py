"""Training tools for equilibrium models: regularisers, diagnostics, normalisation."""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

import fixpoint


def jacobian_penalty(f: Callable, z: Array, x: Array, key: PRNGKeyArray, samples: int = 1):
    """Hutchinson estimate of `‖∂f/∂z‖_F²` at `(z, x)` (Bai et al. 2021).

    `E_ε ‖εᵀ J‖² = ‖J‖_F²` for `ε ~ N(0, I)`; each sample costs one VJP. Unbiased;
    add `λ · penalty / z.size` to the loss to keep the equilibrium well
    conditioned (fewer solver steps).
    """
    _, vjp = jax.vjp(lambda z: f(z, x), z)
    eps = jax.random.normal(key, (samples, *z.shape), z.dtype)
    return jnp.mean(jax.vmap(lambda e: jnp.sum(vjp(e)[0] ** 2))(eps))


def spectral_radius(f: Callable, z: Array, x: Array, key: PRNGKeyArray, iters: int = 100):
    """Estimate the spectral radius of `∂f/∂z` at `(z, x)` with JVPs only.

    Below one means the equilibrium is locally attracting for Picard iteration.
    Uses Gelfand's formula `ρ = lim ‖J^k v‖^(1/k)`: the geometric mean of the
    growth factors `‖J v_k‖` of normalised power iterates over the second half of
    `iters` steps. Unlike the last growth factor alone, this also converges when
    the dominant eigenvalues are a complex pair.
    """
    z = jax.lax.stop_gradient(z)

    def jv(v):
        return jax.jvp(lambda z: f(z, x), (z,), (v,))[1]

    burn_in = iters // 2

    def body(i, carry):
        v, log_growth = carry
        w = jv(v)
        norm = jnp.linalg.norm(w)
        log_growth = log_growth + jnp.where(i >= burn_in, jnp.log(norm), 0.0)
        return w / (norm + jnp.finfo(z.dtype).tiny), log_growth

    v = jax.random.normal(key, z.shape, z.dtype)
    init = (v / jnp.linalg.norm(v), jnp.zeros((), z.dtype))
    _, log_growth = jax.lax.fori_loop(0, iters, body, init)
    return jnp.exp(log_growth / (iters - burn_in))


def correction_iterates(deq, x: Array, steps: Sequence[int], z0: Array | None = None):
    """Intermediate iterates for the fixed-point correction loss (Bai et al. 2022).

    Runs `deq`'s solver from `z0` for each budget in `steps` (no gradient through
    the solve) and applies one differentiable step of `f` to each, so a loss on
    them trains `f` to reach the equilibrium in fewer steps:
    `sum_i γ^(N-i) · loss(correction_iterates(deq, x, steps)[i])`.
    """
    f = deq.prepared()
    z0 = deq.initial(x, z0)
    out = []
    for k in steps:
        sol = fixpoint.fixed_point(
            lambda z, a: a[0](z, a[1]),
            z0,
            (jax.lax.stop_gradient(f), x),
            solver=deq.solver,
            max_steps=int(k),
            throw=False,
            adjoint=fixpoint.PhantomAdjoint(1, 1.0),
        )
        out.append(f(jax.lax.stop_gradient(sol.value), x))
    return out


def _is_weighted(x):
    return isinstance(x, (eqx.nn.Linear, eqx.nn.Conv))


def spectral_norm(module, bound: float = 1.0, iters: int = 30):
    """Rescale every `Linear`/`Conv` weight in `module` to spectral norm ≤ `bound`.

    A pure function: apply it once per forward pass (`DEQ(..., normalise=...)`),
    gradients flow through the rescaling. The norm is estimated by `iters` power
    iterations on the weight reshaped to `(out, -1)`. For a `Linear` layer that
    is its operator norm. For a convolution with `K` kernel taps it is the usual
    proxy; the operator norm is at most `sqrt(K)` times it (the convolution is
    `[W_1 … W_K]` applied to `K` shifted copies of the input), so pass
    `bound / sqrt(K)` when `f` must provably contract.
    """

    def normalise(layer):
        w = layer.weight
        mat = w.reshape(w.shape[0], -1)
        v = jnp.ones(mat.shape[1], mat.dtype) / jnp.sqrt(mat.shape[1])

        def body(_, v):
            u = mat.T @ (mat @ v)
            return u / (jnp.linalg.norm(u) + jnp.finfo(mat.dtype).tiny)

        v = jax.lax.stop_gradient(jax.lax.fori_loop(0, iters, body, v))
        sigma = jnp.linalg.norm(mat @ v)
        scale = jnp.minimum(1.0, bound / (sigma + jnp.finfo(mat.dtype).tiny))
        return eqx.tree_at(lambda lyr: lyr.weight, layer, w * scale)

    return jax.tree.map(
        lambda x: normalise(x) if _is_weighted(x) else x, module, is_leaf=_is_weighted
    )


def weight_norm(module):
    """Wrap every `Linear`/`Conv` in `module` in `equinox.nn.WeightNorm`."""
    return jax.tree.map(
        lambda x: eqx.nn.WeightNorm(x) if _is_weighted(x) else x, module, is_leaf=_is_weighted
    )
