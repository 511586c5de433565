"""`fixpoint.lyapunov_estimate`: how fast a recurrence forgets (or amplifies) a
perturbation of its carry, which decides whether `fixpoint.scan` can solve it in
parallel in few iterations (Gonzalez, Kozachkov et al. 2025)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike
from jaxtyping import Array, Float, PyTree

from ._cache import may_cache
from ._checks import as_float_pytree, check_instance, check_int
from ._scan import Cell, _check_carry, _Flat, _length, check_carry_dtype


class LyapunovEstimate(eqx.Module):
    """The largest Lyapunov exponent of a recurrence along one trajectory, as
    returned by `fixpoint.lyapunov_estimate`.

    **Arguments:** (its fields)

    - `exponent`: the estimate, in nats per step (natural log of the growth of a
      perturbation of the carry, per step). Negative: perturbations die out and
      the recurrence is *predictable*; positive: they grow (chaos, or an
      unstable recurrence). `-inf` when a counted step maps a fresh random
      perturbation to zero (its Jacobian is zero: the carry is forgotten), and
      then `error` is NaN; NaN when the trajectory or its Jacobians are not
      finite.
    - `error`: the standard error of `exponent`, from the spread of the
      per-window exponents (`std / sqrt(windows)`); it assumes that windows are
      much longer than the time over which the growth rates are correlated.
    - `window_exponents`: the exponent of each window of consecutive steps after
      the burn-in, in scan order, shape `(windows,)`. A trend across windows
      says the recurrence is not stationary (or the burn-in is too short).
    - `amplification`: the largest growth of the tracked perturbation over any
      stretch of consecutive steps (burn-in included), as a natural log (0 when
      it never grows). It says whether the trajectory is determined in the
      working precision at all: rounding errors of relative size `eps` (the
      machine epsilon: `1.19e-7` in float32, `2.2e-16` in float64) grow to
      about `eps · exp(amplification)` (measured on GRUs: float32 `lax.scan`
      was 0.2 to 11 times that from float64, until the error reached the size
      of the states). When that approaches the scan's tolerance
      (`amplification > ln(tol / eps) − 2`: 4.7 for float32 at its default
      `1e-4`), even `lax.scan`'s answer is not determined to the tolerance, and
      two correct evaluations can differ by more. It is a lower bound on the
      worst case: one perturbation direction, not every one. NaN when the
      trajectory or its Jacobians are not finite.
    - `steps`: how many steps the exponent averages (the length minus the
      burn-in); a Python int.
    """

    exponent: Float[Array, ""]
    error: Float[Array, ""]
    window_exponents: Float[Array, " windows"]
    amplification: Float[Array, ""]
    steps: int = eqx.field(static=True)


def lyapunov_estimate(
    f: Cell,
    init: PyTree[Float[ArrayLike, "..."]],
    xs: PyTree[ArrayLike] = None,
    length: int | None = None,
    *,
    reverse: bool = False,
    windows: int = 10,
    burn_in: int | None = None,
    key: Array | None = None,
) -> LyapunovEstimate:
    """The largest Lyapunov exponent (LLE) of the recurrence `fixpoint.scan` would
    solve, along its sequential trajectory.

    ```python
    est = fixpoint.lyapunov_estimate(lambda h, x: (cell(x, h), None), h0, xs)
    if est.exponent < 0:  # predictable: DEER-type solvers converge in few iterations
        _, hs = fixpoint.scan(lambda h, x: (cell(x, h),) * 2, h0, xs, solver=solvers.DEER())
    ```

    With `h_t = f(h_{t-1}, x_t)[0]` and `J_t = ∂h_t/∂h_{t-1}`, the LLE is
    `λ = lim (1/T) log ‖J_T ⋯ J_1 v‖` for almost every `v`. It is estimated as
    Benettin et al. do: one tangent vector `v` (random, unit norm) is pushed
    through each step by a Jacobian-vector product and renormalised, and the logs
    of the growth factors are averaged over the steps after `burn_in` (summed
    with compensation, so long sequences lose no accuracy); the averages over
    `windows` blocks of consecutive steps give the error. Should a step map the
    tangent to zero (in floating point its other components may have died
    out), that step is measured again from a fresh random tangent.

    Why it matters (Gonzalez, Kozachkov et al., "Predictability enables
    parallelization of nonlinear state space models", NeurIPS 2025): the
    conditioning of the system that `fixpoint.solvers.DEER`, `QuasiDEER` and
    `ELK` solve is bounded independently of `T` when `λ < 0`, and degrades like
    `e^{λT}` when `λ > 0`. Predictable recurrences are solved in a number of
    iterations that hardly grows with `T`; chaotic ones need about `T`
    iterations, and `fixpoint.solvers.Sequential` is then the faster choice. The
    "Parallel scans" guide gives the measured rule.

    Cost: one evaluation of `f` with one forward-mode Jacobian-vector product
    per step, sequential in time (on the CPU 4 to 9 times `lax.scan` of the
    same cell: GRU, D = 8, `bench/lyapunov.py`); memory: the carry, one tangent
    and `2·windows + 6` numbers, whatever the length. It works under `jit`,
    `vmap` (e.g. over sequences, for one estimate each) and `grad`.

    **Arguments:**

    - `f`: `f(carry, x) -> (carry, y)`, as for `lax.scan` and `fixpoint.scan`;
      only the carry is used. The carry is a pytree of floating-point arrays of
      one dtype; its perturbations are measured in the 2-norm over all leaves.
    - `init`: the initial carry.
    - `xs`: the inputs, a pytree of arrays with a shared leading (time) axis; or
      `None` with `length`.
    - `length`: the number of steps, if `xs` is `None` (checked against `xs`
      otherwise).
    - `reverse`: run from the last step to the first, as `lax.scan`.
    - `windows`: the number of blocks the counted steps are split into for the
      error estimate; at least 2.
    - `burn_in`: leading steps (in scan order) left out of the average while the
      tangent turns towards the most expanding direction; default a tenth of
      the steps. The steps left must be at least `windows`.
    - `key`: a `jax.random` key for the initial tangent; default
      `jax.random.key(0)`, so the estimate is deterministic.

    **Returns:**

    A `fixpoint.LyapunovEstimate`: `exponent` (nats per step), `error`,
    `window_exponents`, `amplification` (whether the trajectory is determined in
    the working precision) and `steps`.
    """
    if not callable(f):
        raise TypeError(f"`f` must be callable, got {f!r}.")
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"`reverse` must be a bool, got {reverse!r}.")
    init = as_float_pytree(init, "init")
    check_carry_dtype(init)
    if sum(np.size(leaf) for leaf in jax.tree.leaves(init)) == 0:
        raise ValueError("`init` has no entries: there is no carry to perturb.")
    steps = _length(xs, length, "lyapunov_estimate")
    windows = check_int(windows, "windows", 2)
    if burn_in is None:
        burn_in = steps // 10
    burn_in = check_int(burn_in, "burn_in", 0)
    if steps - burn_in < windows:
        raise ValueError(
            f"`lyapunov_estimate` has {steps} steps, {max(steps - burn_in, 0)} of them "
            f"after `burn_in={burn_in}`, to split into `windows={windows}` blocks of at "
            "least one step; pass a longer sequence, fewer `windows` or a shorter `burn_in`."
        )
    if key is None:
        key = jax.random.key(0)
    check_instance(key, jax.Array, "key")
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError(f"`key` must be a typed key from `jax.random.key`, got dtype {key.dtype}.")
    statics = (f, init, xs, key)
    run = _compiled if may_cache(*statics) else _estimate
    return run(f, init, xs, key, steps=steps, burn_in=burn_in, windows=windows, reverse=reverse)


def _scaled_norm(v):
    """The 2-norm of `v` without overflow or underflow of the squares."""
    top = jnp.max(jnp.abs(v))
    safe = jnp.where((top > 0) & jnp.isfinite(top), top, 1)
    return jnp.where(jnp.isfinite(top), safe * jnp.linalg.norm(v / safe), top)


def _estimate(f, init, xs, key, *, steps, burn_in, windows, reverse):
    h0, unravel = ravel_pytree(init)
    x0 = jax.tree.map(lambda a: a[0], xs)
    _check_carry(f, init, x0, h0.dtype)
    cell = _Flat(f, unravel)
    # Logs and sums in at least float32 (for float16 carries), summed with
    # Kahan's compensation.
    acc = h0.dtype if jnp.finfo(h0.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    first, fresh_key = jax.random.split(key)
    v0 = jax.random.normal(first, h0.shape, h0.dtype)
    v0 = v0 / _scaled_norm(v0)
    counted = steps - burn_in

    def push(h, x, v):
        h_next, tangent = jax.jvp(lambda h: cell(h, x)[0], (h,), (v,))
        return h_next, tangent, _scaled_norm(tangent)

    def step(carry, x):
        h, v, t, sums, comp, log_size, lowest, amplification = carry
        h_next, tangent, growth = push(h, x, v)
        # A tangent mapped to exactly zero may only have lost, to rounding, the
        # components this step keeps: measure the step again from a fresh one
        # (its key made only then: a split at every step doubled the cost).

        def again(_):
            fresh = jax.random.normal(jax.random.fold_in(fresh_key, t), h.shape, h.dtype)
            return push(h, x, fresh / _scaled_norm(fresh))[1:]

        tangent, growth = jax.lax.cond(growth == 0, again, lambda _: (tangent, growth), None)
        gone = growth == 0  # also for a fresh tangent: the Jacobian is zero
        log_growth = jnp.log(growth).astype(acc)
        v = jnp.where(gone, v0, tangent / jnp.where(gone, 1, growth))
        # The perturbation's log size since the start, its lowest value so far,
        # and the largest rise from a low to a later value: the amplification.
        # An annihilated perturbation starts afresh at 0; NaN propagates.
        log_size = jnp.where(gone, 0, log_size + log_growth)
        amplification = jnp.maximum(amplification, jnp.where(gone, 0, log_size - lowest))
        lowest = jnp.where(gone, 0, jnp.minimum(lowest, log_size))
        # The window of step `t` (scan order); burn-in steps go to an extra slot.
        w = jnp.where(t < burn_in, windows, (t - burn_in) * windows // counted)
        # Kahan summation into slot `w`.
        y = log_growth - comp[w]
        total = sums[w] + y
        comp = comp.at[w].set(jnp.where(jnp.isfinite(total), (total - sums[w]) - y, 0))
        sums = sums.at[w].set(total)
        return (h_next, v, t + 1, sums, comp, log_size, lowest, amplification), None

    zero = jnp.zeros((), acc)
    slots = jnp.zeros(windows + 1, acc)
    start = (h0, v0, jnp.array(0), slots, slots, zero, zero, zero)
    final, _ = jax.lax.scan(step, start, xs, length=steps, reverse=reverse)
    sums, amplification = final[3][:windows], final[7]
    sizes = np.bincount(np.arange(counted) * windows // counted, minlength=windows)
    per_window = sums / jnp.asarray(sizes, acc)
    exponent = jnp.sum(sums) / counted
    error = jnp.std(per_window, ddof=1) / math.sqrt(windows)
    return LyapunovEstimate(exponent, error, per_window, amplification, counted)


_compiled = eqx.filter_jit(_estimate)
