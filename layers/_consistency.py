"""Consistency training of causal models for parallel decoding (Kou et al. 2024, CLLMs).

Jacobi decoding reaches the sequential output in fewer model calls when the
model predicts a position right although the tokens before it are still wrong.
CLLMs teach a model to do so: collect Jacobi trajectories of the model's own
decoding, then fine-tune it to map every point of a trajectory to the
trajectory's fixed point (the *global consistency* loss), with the ordinary
next-token loss on real text (the *AR* loss) so that what it predicts stays
good. The three functions here are the pieces; `bench/decode.py` puts them
together on a character model of Python's standard library.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import fixpoint
from fixpoint import internal, solvers


def jacobi_trajectories(
    model: Callable[[Int[Array, " L"]], Float[Array, "L V"]],
    prompts: Int[Array, "B P"],
    max_new_tokens: int,
    *,
    solver: internal.AbstractDecodingSolver | None = None,
    key: PRNGKeyArray | None = None,
    temperature: float = 1.0,
    cached: bool | None = None,
) -> tuple[Int[Array, "B N"], Int[Array, "B N N"], Bool[Array, "B N N"], Int[Array, " B"]]:
    """Jacobi trajectories of `model` after each prompt, for `consistency_loss`.

    Runs `fixpoint.decode` with `solver` (default
    `fixpoint.solvers.JacobiDecoding(window=max_new_tokens)`: one window over all the new tokens,
    CLLM's setting; a sliding `JacobiDecoding(window=16)` records the states that
    decoding with that window meets), greedy or, with `key`, sampled as `decode`
    samples.

    Kou, Hu, He, Deng & Zhang, *CLLMs: Consistency Large Language Models*, ICML
    2024.

    **Arguments:**

    - `model`: `model(tokens) -> logits`, as in `fixpoint.decode`.
    - `prompts`: `int[B, P]`, one prompt per row.
    - `max_new_tokens`: `N`, the number of new tokens per row.
    - `solver`: a decoding solver (default
      `JacobiDecoding(window=max_new_tokens)`).
    - `key`: `None` for greedy decoding, or a PRNG key to sample as `decode`.
    - `temperature`: as in `decode` (default 1.0; used only with `key`).
    - `cached`: as in `decode` (default `None`: the cache when the model has one).

    **Returns:**

    `(fixed_points: int32[B, N], states: int32[B, N, N],
    windows: bool[B, N, N], calls: int32[B])`: row `b`'s output; the new tokens
    as each of its calls saw them (`states[b, :calls[b]]` are real, later rows
    repeat the fixed point); the positions each call judged (its window, the
    positions to score in `consistency_loss`; empty past the last call); and its
    number of model calls.
    """
    solver = solvers.JacobiDecoding(window=max_new_tokens) if solver is None else solver
    tokens, sol = fixpoint.decode(
        model,
        prompts,
        max_new_tokens,
        solver=solver,
        key=key,
        temperature=temperature,
        cached=cached,
        return_solution=True,
        record_trajectory=True,
    )
    stats = sol.stats
    return tokens, stats["trajectory"], stats["trajectory_windows"], stats["model_calls"]


def _logits_after(model, prompt, new):
    """`model(prompt ⧺ new)`'s rows that score the `N` new positions: `[N, V]`."""
    p = prompt.shape[-1]
    seq = jnp.concatenate([prompt.astype(jnp.int32), new.astype(jnp.int32)], axis=-1)
    return model(seq)[p - 1 : p - 1 + new.shape[-1]]


def _per_example(fn, *arrays):
    if arrays[0].ndim == 1:
        return fn(*arrays)
    return jnp.mean(jax.vmap(fn)(*arrays))


def consistency_loss(
    model: Callable[[Int[Array, " L"]], Float[Array, "L V"]],
    prompt: Int[Array, "*B P"],
    state: Int[Array, "*B N"],
    fixed_point: Int[Array, "*B N"],
    mask: Bool[Array, "*B N"] | None = None,
) -> Float[Array, ""]:
    """CLLM's global consistency loss: the model at a point `state` of a Jacobi
    trajectory should predict what it predicts at the trajectory's `fixed_point`.

    `KL(q(· | prompt, fixed_point[:i]) || q(· | prompt, state[:i]))` at each new
    position `i`, averaged over the positions where `mask` is true (default:
    all `N`; pass the call's window from `jacobi_trajectories`). The fixed
    point's distributions are held constant (`stop_gradient`: the teacher is the
    model itself at the fixed point). It is zero at `state = fixed_point`. A token
    the model bans at the fixed point (a `-inf` logit) adds nothing.
    Batched inputs (`[B, P]`, `[B, N]`) give the mean over the batch.

    Kou, Hu, He, Deng & Zhang, *CLLMs: Consistency Large Language Models*, ICML
    2024.

    **Arguments:**

    - `model`: `model(tokens) -> logits`, as in `fixpoint.decode`.
    - `prompt`: `int[P]` (or `int[B, P]`).
    - `state`: `int[N]` (or `int[B, N]`), a point of the trajectory.
    - `fixed_point`: `int[N]` (or `int[B, N]`), the trajectory's fixed point.
    - `mask`: `bool[N]` (or `bool[B, N]`), the positions scored; `None`: all.

    **Returns:**

    The loss, a scalar.
    """
    if mask is None:
        mask = jnp.ones(state.shape, bool)

    def one(prompt, state, fixed_point, mask):
        teacher = jax.nn.log_softmax(
            jax.lax.stop_gradient(_logits_after(model, prompt, fixed_point)), axis=-1
        )
        student = jax.nn.log_softmax(_logits_after(model, prompt, state), axis=-1)
        # A token the teacher bans (a -inf logit) adds 0 (0 · log 0), not NaN.
        terms = jnp.where(teacher > -jnp.inf, jnp.exp(teacher) * (teacher - student), 0.0)
        kl = jnp.sum(terms, axis=-1)
        return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(jnp.sum(mask, dtype=kl.dtype), 1)

    return _per_example(one, prompt, state, fixed_point, mask)


def ar_loss(
    model: Callable[[Int[Array, " L"]], Float[Array, "L V"]],
    prompt: Int[Array, "*B P"],
    target: Int[Array, "*B N"],
) -> Float[Array, ""]:
    """CLLM's AR loss: the mean next-token cross entropy of `target` after
    `prompt` (teacher forcing; the prompt's own tokens are not scored). Batched
    inputs give the mean over the batch.

    Kou, Hu, He, Deng & Zhang, *CLLMs: Consistency Large Language Models*, ICML
    2024.

    **Arguments:**

    - `model`: `model(tokens) -> logits`, as in `fixpoint.decode`.
    - `prompt`: `int[P]` (or `int[B, P]`).
    - `target`: `int[N]` (or `int[B, N]`), the tokens that follow the prompt.

    **Returns:**

    The mean cross entropy, a scalar.
    """

    def one(prompt, target):
        logp = jax.nn.log_softmax(_logits_after(model, prompt, target), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, target[:, None].astype(jnp.int32), -1))

    return _per_example(one, prompt, target)
