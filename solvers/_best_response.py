"""Best-response iteration for games: simultaneous, sequential or random order."""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax

import fixpoint
from fixpoint import internal

_ORDERS = ("simultaneous", "sequential", "random")


class BestResponse(internal.AbstractSolver):
    """Best responses, block by block: Jacobi, Gauss–Seidel or randomised sweeps.

    For a state that is a tuple or dict of blocks (players, users), `fn`'s block
    `k` being player `k`'s best response to the others. One step is one sweep:

    - `order="simultaneous"` (Jacobi): every block from the last values at once,
      `y ← (1 − α) y + α f(y)`; one evaluation of `fn` per sweep.
    - `order="sequential"` (Gauss–Seidel): block after block in order, each from
      the newest values of the others.
    - `order="random"`: as sequential, in a fresh random order every sweep
      (randomised Gauss–Seidel).

    A sequential or random sweep evaluates block `k` at a state whose earlier
    blocks were already updated. With `fn` a `fixpoint.Blockwise` (one function
    per block) a sweep costs one evaluation of each block's function, as much
    as one whole evaluation; with a plain `fn` each update evaluates `fn`
    whole and keeps one block, nominally `K` whole evaluations per sweep (where
    `fn` is plain JAX, XLA drops the work of the blocks whose outputs are
    discarded: in `bench/games.py` both forms take the same time). The random order
    depends only on `seed` (every sample of a `jax.vmap` gets the same one),
    but under `jax.vmap` it is picked by a `lax.switch` on a batched index,
    which evaluates every block's branch at each update (`K` times the work).

    *What is tested.* For the sequential orders the residual is the sweep's own,
    `(y − sweep(y)) / α`, whose zeros are `fn`'s fixed points: `‖y − f(y)‖ ≤
    (1 + L)·‖(y − sweep(y)) / α‖` (`L` the Lipschitz constant of `f` in the max
    norm over blocks), so `stats["residual"]` and `successful` refer to the
    sweep; for the simultaneous order it is `y − f(y)`, as for `Picard`. The
    implicit gradient is that of `fn`'s fixed point either way.

    Scutari, Palomar and Barbarossa, *Asynchronous Iterative Water-Filling for
    Gaussian Frequency-Selective Interference Channels*, IEEE Trans. Inf.
    Theory 2008 (simultaneous and sequential iterative water-filling).

    **Arguments:**

    - `rtol`: the relative tolerance, a number in `[0, 1)`.
    - `atol`: the absolute tolerance, a number `>= 0` (not both zero).
    - `norm`: the norm of the convergence test (default `fixpoint.max_norm`).

    Keyword-only:

    - `order`: `"simultaneous"` (default), `"sequential"` or `"random"`.
    - `damping`: `α` in `(0, 1]` (default 1): each block moves this fraction
      of the way to its best response (`fixpoint.small_gain_certificate`'s
      `step_size` is one under which the simultaneous order contracts).
    - `seed`: the seed of the random order, an integer in `[0, 2**32)`.
    """

    rtol: float = eqx.field(converter=internal.as_python_number)
    atol: float = eqx.field(converter=internal.as_python_number)
    norm: Callable = fixpoint.max_norm
    order: str = eqx.field(default="simultaneous", kw_only=True)
    damping: float = eqx.field(default=1.0, converter=internal.as_python_number, kw_only=True)
    seed: int = eqx.field(default=0, converter=internal.as_python_number, kw_only=True)
    step_estimates_error: ClassVar[bool] = True

    def __check_init__(self):
        internal.check_tolerances(self)
        if self.order not in _ORDERS:
            raise ValueError(
                f"BestResponse: `order` must be one of {', '.join(map(repr, _ORDERS))}, "
                f"got {self.order!r}."
            )
        internal.check_number(self.damping, "damping", "(0, 1]", owner="BestResponse")
        internal.check_int(self.seed, "seed", 0, owner="BestResponse")
        if self.seed >= 2**32:
            raise ValueError(f"BestResponse: `seed` must be below 2**32, got {self.seed}.")

    def drift_rate(self):
        # The simultaneous order is Picard (Krasnoselskii–Mann with damping α).
        return self.damping if self.order == "simultaneous" else None

    def _blocks(self, problem):
        blocks = problem.blocks
        if blocks is None:
            raise TypeError(
                "BestResponse: `y0` must be a tuple, list or dict of blocks (one per player); "
                "got a single array. Wrap it, e.g. `y0 = (y_1, y_2)`."
            )
        return blocks

    def init(self, problem, y, args):
        self._blocks(problem)
        if self.order == "random":
            return jax.random.PRNGKey(self.seed)
        return None

    def step(self, problem, y, args, state):
        blocks = self._blocks(problem)
        alpha = self.damping
        if self.order == "simultaneous":
            ev = problem.evaluate(y, args)
            y_next = ev.fy if alpha == 1 else y + alpha * (ev.fy - y)
            return internal.Step(y_next, state, ev)

        def update(k, z):
            a, b = blocks[k]
            new, aux = problem.evaluate_block(z, args, k)
            if alpha != 1:
                new = z[a:b] + alpha * (new - z[a:b])
            return z.at[a:b].set(new.astype(z.dtype)), aux

        z = y
        aux = None
        if self.order == "sequential":
            for k in range(len(blocks)):
                z, aux_k = update(k, z)
                aux = aux_k if k == 0 else aux
        else:
            state, sub = jax.random.split(state)
            perm = jax.random.permutation(sub, len(blocks))
            branches = [lambda z, k=k: update(k, z) for k in range(len(blocks))]
            for j in range(len(blocks)):
                z, aux_j = jax.lax.switch(perm[j], branches, z)
                aux = aux_j if j == 0 else aux
        if alpha == 1:
            ev = internal.Evaluation(fy=z, residual=y - z, aux=aux)
        else:
            residual = (y - z) / alpha
            ev = internal.Evaluation(fy=y - residual, residual=residual, aux=aux)
        return internal.Step(z, state, ev)
