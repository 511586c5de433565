"""`fixpoint.decode`: greedy autoregressive decoding as a fixed point over positions.

The new tokens `t_1 … t_N` of greedy decoding are the fixed point of
`T ↦ (argmax model(prompt ⧺ T)[P + n - 1])_n`: each position's token is the
model's choice given the tokens before it. A decoding solver guesses a window
of positions at once; one model call re-predicts all of them. As in the scan
loop, the leading positions whose context is exact are accepted ("frozen"),
so each call fixes at least one more token and `N` calls always suffice. Unlike
the scan loop, convergence here is exact equality of tokens and the window
slides, so decoding has its own small loop rather than `iterate_scan`.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_int
from ._solution import RESULTS, Solution


class AbstractDecodingSolver(eqx.Module):
    """A parallel decoding method: how many positions one model call proposes.

    The loop (`fixpoint.decode`) calls the model on the whole buffer, accepts the
    longest prefix of the window whose context was exact (at least one token),
    and takes the model's predictions as the next guesses for the rest of the
    window. A solver decides the window through `max_window` (static: it sizes
    the compiled loop).
    """

    @property
    @abc.abstractmethod
    def max_window(self) -> int:
        """The largest window this solver proposes (static)."""


def decode(
    model,
    prompt,
    max_new_tokens: int,
    *,
    solver: AbstractDecodingSolver,
    eos_id: int | None = None,
    fill_id: int = 0,
    return_solution: bool = False,
):
    """Greedy decoding of `max_new_tokens` tokens after `prompt`, in parallel.

    **Arguments:**

    - `model`: `model(tokens) -> logits`, mapping `int32[L]` to `float[L, V]`
      causally (row `t` depends only on `tokens[:t+1]` and scores the token at
      `t + 1`), with `L = len(prompt) + max_new_tokens` (static; positions not
      yet decoded hold guesses).
    - `prompt`: `int[P]`, `P ≥ 1`. For a batch, `jax.vmap` over prompts: each row
      stops on its own.
    - `max_new_tokens`: `N ≥ 1`.
    - `solver`: `solvers.SequentialDecoding()` or `solvers.JacobiDecoding(window)`.
    - `eos_id`: once an accepted token is `eos_id`, decoding stops and every
      later position is `eos_id`.
    - `fill_id`: the initial guess at every undecoded position.
    - `return_solution`: also return a `fixpoint.Solution`.

    **Returns:** `int32[N]`, the new tokens; with `return_solution=True`,
    `(tokens, solution)` where `solution.value` is the tokens, `solution.result`
    is `successful` (or `nonfinite` if the model produced a NaN/Inf logit where
    a token was chosen), and `solution.stats` has `model_calls`, `iterations`
    (the same here: one call per iteration), `tokens_per_call` (tokens decoded,
    up to and including EOS, per call) and `fixed_at` (`int32[N]`: the iteration
    at which each position was accepted, -1 after EOS).
    """
    if not callable(model):
        raise TypeError(f"`model` must be callable as model(tokens) -> logits, got {model!r}.")
    if not isinstance(solver, AbstractDecodingSolver):
        raise TypeError(
            "`solver` must be a decoding solver (`solvers.SequentialDecoding()`, "
            f"`solvers.JacobiDecoding(window)`), got {solver!r}."
        )
    check_int(max_new_tokens, "max_new_tokens", 1)
    if not isinstance(return_solution, (bool, np.bool_)):
        raise TypeError(f"`return_solution` must be a bool, got {return_solution!r}.")
    prompt = jnp.asarray(prompt)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"`prompt` must hold integer token ids, got dtype {prompt.dtype}.")
    if prompt.ndim != 1 or prompt.shape[0] < 1:
        raise ValueError(
            f"`prompt` must have shape (P,) with P >= 1, got {prompt.shape}; for a batch "
            "of prompts use `jax.vmap`."
        )
    prompt = prompt.astype(jnp.int32)
    length = prompt.shape[0] + max_new_tokens
    out = jax.eval_shape(model, jax.ShapeDtypeStruct((length,), jnp.int32))
    if not (
        isinstance(out, jax.ShapeDtypeStruct)
        and len(out.shape) == 2
        and out.shape[0] == length
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise ValueError(
            f"`model` must map int32[{length}] (the prompt plus `max_new_tokens`) to float "
            f"logits of shape ({length}, V); it returned {out}."
        )
    vocab = out.shape[1]
    for name, value in (("eos_id", eos_id), ("fill_id", fill_id)):
        if value is not None:
            check_int(value, name, 0)
            if value >= vocab:
                raise ValueError(f"`{name}={value}` is outside the vocabulary of size {vocab}.")
    tokens, stats, result = _decode(
        model, prompt, max_new_tokens, solver.max_window, eos_id, fill_id
    )
    if not return_solution:
        return tokens
    return tokens, Solution(value=tokens, result=result, aux=None, stats=stats)


class _Carry(eqx.Module):
    buf: jax.Array  # int32[L]: prompt, accepted tokens, then guesses
    accepted: jax.Array  # number of accepted new tokens
    calls: jax.Array
    fixed_at: jax.Array  # int32[N]
    done: jax.Array
    finite: jax.Array


def _decode(model, prompt, n, window, eos_id, fill_id):
    p = prompt.shape[0]
    positions = jnp.arange(n)
    buf = jnp.concatenate([prompt, jnp.full(n, fill_id, jnp.int32)])
    init = _Carry(
        buf=buf,
        accepted=jnp.array(0),
        calls=jnp.array(0),
        fixed_at=jnp.full(n, -1, jnp.int32),
        done=jnp.array(False),
        finite=jnp.array(True),
    )

    def body(c):
        logits = model(c.buf)
        # The prediction for new position `i` is the choice after `buf[:p + i]`.
        scores = jax.lax.dynamic_slice_in_dim(logits, p - 1, n)
        pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        guess = c.buf[p:]
        k = c.accepted
        in_window = (positions >= k) & (positions < k + window)
        # Position k is exact; k + j is exact when the guesses at k..k+j-1 were right.
        confirmed = jnp.where(in_window, guess == pred, False)
        # Leading run of confirmations from k: count positions j >= k with all
        # confirmed in [k, j).
        wrong_before = jnp.cumsum(jnp.where(in_window & ~confirmed, 1, 0)) - jnp.where(
            in_window & ~confirmed, 1, 0
        )
        accept = in_window & (wrong_before == 0)
        finite = jnp.all(jnp.where(accept[:, None], jnp.isfinite(scores), True))
        new = jnp.where(in_window, pred, guess)
        if eos_id is not None:
            # Accepted positions after the first accepted EOS are EOS too, and done.
            is_eos = accept & (new == eos_id)
            first_eos = jnp.min(jnp.where(is_eos, positions, n))
            accept = accept & (positions <= first_eos)
            after = positions > first_eos
            new = jnp.where(after & (first_eos < n), eos_id, new)
            hit = first_eos < n
        else:
            hit = jnp.array(False)
        count = jnp.sum(accept)
        accepted = k + count
        done = (accepted >= n) | hit | ~finite
        step = c.calls
        fixed_at = jnp.where(accept, step, c.fixed_at)
        keep = c.done
        return _Carry(
            buf=jnp.where(keep, c.buf, jnp.concatenate([c.buf[:p], new])),
            accepted=jnp.where(keep, c.accepted, accepted),
            calls=c.calls + jnp.where(keep, 0, 1),
            fixed_at=jnp.where(keep, c.fixed_at, fixed_at),
            done=c.done | done,
            finite=c.finite & (keep | finite),
        )

    final = jax.lax.while_loop(lambda c: ~c.done, body, init)
    tokens = final.buf[p:]
    decoded = final.accepted
    if eos_id is not None:
        tokens = jnp.where(positions < decoded, tokens, eos_id)
    calls = final.calls
    stats = {
        "model_calls": calls,
        "iterations": calls,
        "tokens_per_call": decoded.astype(jnp.float32) / jnp.maximum(calls, 1).astype(jnp.float32),
        "fixed_at": final.fixed_at,
    }
    result = RESULTS.where(final.finite, RESULTS.successful, RESULTS.nonfinite)
    return tokens, stats, result
