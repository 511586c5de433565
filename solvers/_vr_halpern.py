"""Halpern's anchored iteration on a finite sum, with a variance-reduced estimate of the map."""

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

import fixpoint
from fixpoint import internal


class _State(NamedTuple):
    anchor: jnp.ndarray  # the point every step is pulled back towards
    count: jnp.ndarray  # steps since the anchor was set (`k`)
    anchor_norm: jnp.ndarray  # the residual norm at the anchor (restarts only)
    estimate: jnp.ndarray  # the estimate of the mean at `previous`
    previous: jnp.ndarray  # the iterate the estimate belongs to
    since: jnp.ndarray  # steps since the last full evaluation
    steps: jnp.ndarray  # steps made (the sampling key's counter)
    period: jnp.ndarray  # the largest gap between full steps now (halved on a rise)
    last_full: jnp.ndarray  # the exact residual norm at the last full step
    full_steps: jnp.ndarray  # full steps made
    evaluations: jnp.ndarray  # component evaluations made (a float: no int32 overflow)


class VarianceReducedHalpern(internal.AbstractSolver):
    """Halpern's iteration on a finite sum `T = (1/n) Σ_i T_i`, sampling components.

    For a problem given as a `fixpoint.FiniteSum`. Each step is Halpern's,
    `y_{k+1} = β_k y_0 + (1 − β_k) T̃(y_k)` with `β_k = 1/(k+2)`, but `T̃` is a
    recursive variance-reduced estimate of `T` (the PAGE / SARAH estimator of
    Cai, Alacaoglu and Diakonikolas 2023): at a *full* step every component is
    evaluated, `T̃(y_k) = T(y_k)`; at the others a batch `S` of `b` components
    is drawn uniformly (with replacement) and
    `T̃(y_k) = T̃(y_{k−1}) + (1/b) Σ_{i∈S} (T_i(y_k) − T_i(y_{k−1}))`,
    which costs `2b` component evaluations instead of `n`. Halpern's steps
    shrink like `1/k`, so the estimate's error, which grows with the distance
    moved since the last full step, shrinks at the residual's own `O(1/k)` rate
    when full steps come every `~n/b` steps: with `b ≈ √n` a step costs `~3√n`
    evaluations on average instead of `n`, and the component evaluations to
    reach a residual `ε` are `Õ(n + √n L/ε)` instead of `O(n L/ε)` (the paper's
    bound, for components that are `L`-Lipschitz on average and a mean that is
    cocoercive, e.g. `T` nonexpansive and each `T_i` Lipschitz). An operator that
    is only monotone, such as an unregularised bilinear game, is not covered:
    there the paper runs Halpern on the resolvent `(I + ηF)^{-1}`, solved
    inexactly by an inner variance-reduced method, which is not built here
    (add a small `μ‖·‖²` regularisation, which makes the game cocoercive).

    The schedule here is deterministic: the gap between full steps is
    `min(max(⌊k/2⌋, 1), period)`, `k` the steps since the anchor (so full
    steps come geometrically often at first, while Halpern's steps are large,
    then every `period` steps). `period` starts at `refresh_every` and is
    halved whenever an exact residual comes out more than twice the one at the
    previous full step: the sign that the estimate has drifted (components
    whose Lipschitz constants vary widely make it noisy), down to 1, which is
    full-batch Halpern; an *estimated* residual that large makes the next step
    full. A batch of `2b ≥ n` evaluations makes every step full.

    **What `successful` means.** The convergence test runs only at full steps,
    on the exact residual `y − T(y)`: a successful solve is certified exactly
    as with `Halpern` (a sampled step never converges, never diverges, and
    `stats["residual"]` is the norm of the last exact residual). So the
    solve stops at most `refresh_every` steps after the tolerance is met.
    `stats["component_evaluations"]` counts every component evaluated (a float
    of the state's precision: exact below `2^53` in float64, `2^24` in
    float32); `stats["full_steps"]` and `stats["sampled_steps"]` are the exact
    counts it comes from (`n` evaluations per full step, `2b` per sampled one).

    **When it pays.** The saving needs many steps between restarts: with
    `restart_ratio` each restart begins a new geometric schedule, so on a fast
    problem (a few steps per restart) nearly every step is full and the cost is
    Halpern's. The analysis assumes components that are Lipschitz *on average*
    (in mean square) with a constant comparable to the mean's; when a few
    components dominate, the estimate is noisy and the adaptive period falls
    back towards full steps (a larger `batch_size` keeps more of the saving).

    **Where it pays.** In evaluations, for one large finite sum. Under
    `jax.vmap` the choice between a full and a sampled step becomes a select,
    so both are computed for every sample: the counts stay those of the
    algorithm, the time does not drop. No infeasibility detection (the drift
    is watched on exact residuals only by the full-batch solvers).

    Cai, Alacaoglu and Diakonikolas, *Variance reduced Halpern iteration for
    finite-sum monotone inclusions*, ICLR 2024 (arXiv:2310.02987); Li et al.,
    *PAGE: a simple and optimal probabilistic gradient estimator*, ICML 2021.

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test (default `fixpoint.max_norm`).

    Keyword-only:

    - `batch_size`: components per sampled step, an int `>= 1`; `None`
      (default): `⌈√n⌉`.
    - `refresh_every`: the largest gap between full steps, an int `>= 1`;
      `None` (default): `⌈√n⌉`.
    - `restart_ratio`: `None` (default) or a number in `(0, 1)`: as in
      `Halpern`, restart from the current iterate once the exact residual norm
      has fallen to this fraction of its value at the anchor (decided at full
      steps); on a contraction this makes the rate linear.
    - `seed`: the seed of the component sampling, an int in `[0, 2^32)`
      (default 0).
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    batch_size: int | None = eqx.field(default=None, kw_only=True)
    refresh_every: int | None = eqx.field(default=None, kw_only=True)
    restart_ratio: float | None = eqx.field(
        default=None, converter=internal.as_python_number, kw_only=True
    )
    seed: int = eqx.field(default=0, kw_only=True)
    # The pull towards the anchor does not vanish at a fixed point.
    step_estimates_error: ClassVar[bool] = False
    # Its residual dips (nearly to zero on a rotation) and rises again: divergence
    # is judged against the first residual, not the smallest.
    diverges_from_start: ClassVar[bool] = True

    def __check_init__(self):
        internal.check_tolerances(self)
        owner = "VarianceReducedHalpern"
        for name in ("batch_size", "refresh_every"):
            if getattr(self, name) is not None:
                internal.check_int(getattr(self, name), name, 1, owner=owner)
        if self.restart_ratio is not None:
            internal.check_number(self.restart_ratio, "restart_ratio", "(0, 1)", owner=owner)
        internal.check_int(self.seed, "seed", 0, owner=owner)
        if self.seed >= 2**32:
            raise ValueError(f"{owner}: `seed` must be an int below 2**32, got {self.seed!r}.")

    def sizes(self, num_components: int) -> tuple[int, int]:
        """`(batch_size, refresh_every)` for `num_components` components.

        **Arguments:**

        - `num_components`: the number of components `n`.

        **Returns:**

        The batch size and the largest gap between full steps, the defaults
        `⌈√n⌉` filled in.
        """
        root = math.ceil(math.sqrt(num_components))
        return self.batch_size or root, self.refresh_every or root

    def init(self, problem, y, args):
        n = _components(problem)
        rdtype = jnp.finfo(y.dtype).dtype
        zero = jnp.array(0)
        return _State(
            anchor=y,
            count=zero,
            anchor_norm=jnp.array(jnp.inf, rdtype),
            estimate=jnp.zeros_like(y),
            previous=y,
            since=zero,
            steps=zero,
            period=jnp.array(self.sizes(n)[1]),
            last_full=jnp.array(jnp.inf, rdtype),
            full_steps=zero,
            evaluations=jnp.array(0, rdtype),
        )

    def step(self, problem, y, args, state):
        n = _components(problem)
        b, _ = self.sizes(n)
        gap = jnp.clip(state.count // 2, 1, state.period)
        # A sampled step of 2b ≥ n evaluations would cost more than a full one.
        full = (state.count == 0) | (state.since >= gap) | (2 * b >= n)
        key = jax.random.fold_in(jax.random.key(self.seed), state.steps)

        def whole():
            indices = jnp.arange(n, dtype=jnp.int32)
            return jnp.mean(problem.evaluate_components(y, args, indices), axis=0)

        def sampled():
            indices = jax.random.randint(key, (b,), 0, n, dtype=jnp.int32)
            new = problem.evaluate_components(y, args, indices)
            old = problem.evaluate_components(state.previous, args, indices)
            return state.estimate + jnp.mean(new - old, axis=0)

        out = jax.lax.cond(full, whole, sampled).astype(y.dtype)
        if problem.kind == "fixed_point":
            ev = internal.Evaluation(fy=out, residual=y - out, aux=None)
        else:
            ev = internal.Evaluation(fy=y - out, residual=out, aux=None)
        anchor, count, anchor_norm = state.anchor, state.count, state.anchor_norm
        rnorm = self.norm(ev.residual)
        # An exact residual more than twice the last exact one: the estimate
        # drifted, so full steps come twice as often from now on.
        # An estimated one that large makes the next step full.
        rose = rnorm > 2 * state.last_full
        period = jnp.where(full & rose, jnp.maximum(state.period // 2, 1), state.period)
        last_full = jnp.where(full, rnorm, state.last_full)
        since = jnp.where(full, 1, jnp.where(rose, state.period, state.since + 1))
        if self.restart_ratio is not None:
            anchor_norm = jnp.where(count == 0, rnorm, anchor_norm)
            # Decided on exact residuals only; a NaN never restarts.
            again = full & (count > 0) & (rnorm <= self.restart_ratio * anchor_norm)
            anchor = jnp.where(again, y, anchor)
            count = jnp.where(again, 0, count)
            anchor_norm = jnp.where(again, rnorm, anchor_norm)
        beta = (1 / (count + 2)).astype(y.dtype)
        y_next = beta * anchor + (1 - beta) * ev.fy
        next_state = _State(
            anchor=anchor,
            count=count + 1,
            anchor_norm=anchor_norm,
            estimate=out,
            previous=y,
            since=since,
            steps=state.steps + 1,
            period=period,
            last_full=last_full,
            full_steps=state.full_steps + full.astype(state.full_steps.dtype),
            evaluations=state.evaluations + jnp.where(full, n, 2 * b).astype(rnorm.dtype),
        )
        return internal.Step(y_next, next_state, ev, exact=full)

    def stats(self, state):
        return {
            "component_evaluations": state.evaluations,
            "full_steps": state.full_steps,
            "sampled_steps": state.steps - state.full_steps,
        }


def _components(problem) -> int:
    n = problem.num_components
    if n is None:
        raise TypeError(
            "VarianceReducedHalpern: `fn` must be a `fixpoint.FiniteSum(component, "
            "num_components)` (it samples the components); for a plain `fn` use "
            "`solvers.Halpern`."
        )
    return n
