"""`fixpoint.decode`: greedy autoregressive decoding as a fixed point over positions.

The new tokens `t_1 … t_N` of greedy decoding are the fixed point of
`T ↦ (argmax model(prompt ⧺ T)[P + n - 1])_n`: each position's token is the
model's choice given the tokens before it. With a `key`, the choice is
`argmax(logits / temperature + g)` with Gumbel noise `g` keyed by the absolute
position, so the map stays deterministic and its fixed point is the sequential
sample drawn with that key (Song et al. 2021).

A decoding solver proposes a window of positions at once; one model call
re-predicts all of them. As in the scan loop, the leading positions whose
context is exact are accepted ("frozen"), so each call fixes at least one more
token and `N` calls always suffice. Decoding has its own small loop rather
than `iterate_scan`: convergence is exact equality of integers (no tolerance,
no residual norm, no certification step), the window slides with the accepted
prefix and, on the cached path, each call sees only the window's tokens.
"""

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple, TypeAlias, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray, Real, UInt32

from ._cache import may_cache, once_per_shapes
from ._checks import check_bool, check_int
from ._decode_loop import decode_loop, scores
from ._decode_solver import AbstractCachedModel, AbstractDecodingSolver
from ._errors import checked
from ._solution import Solution

_HINT = (
    "A row of logits held a NaN or +inf, or no finite entry (see `decode`'s "
    "'Non-finite logits'). Pass `throw=False` (with `return_solution=True`) to get "
    "the tokens before it and the result code instead of an error."
)


# `model(tokens) -> logits`, causal (see `decode`).
Model: TypeAlias = Callable[[Int[Array, " L"]], Float[Array, "L V"]]
# One PRNG key per row of a batched prompt (or one for all), new-style or raw.
KeyLike: TypeAlias = Key[Array, "*B"] | UInt32[ArrayLike, "*B 2"]


@overload
def decode(
    model: Model,
    prompt: Int[ArrayLike, "*B P"],
    max_new_tokens: int,
    *,
    solver: AbstractDecodingSolver,
    eos_id: int | None = None,
    key: KeyLike | None = None,
    temperature: Real[ArrayLike, ""] = 1.0,
    prompt_lengths: Int[ArrayLike, " B"] | None = None,
    fill_id: int = 0,
    cached: bool | None = None,
    return_solution: Literal[False] = False,
    record_trajectory: bool = False,
    throw: bool = True,
) -> Int[Array, "*B N"]: ...


@overload
def decode(
    model: Model,
    prompt: Int[ArrayLike, "*B P"],
    max_new_tokens: int,
    *,
    solver: AbstractDecodingSolver,
    eos_id: int | None = None,
    key: KeyLike | None = None,
    temperature: Real[ArrayLike, ""] = 1.0,
    prompt_lengths: Int[ArrayLike, " B"] | None = None,
    fill_id: int = 0,
    cached: bool | None = None,
    return_solution: Literal[True],
    record_trajectory: bool = False,
    throw: bool = True,
) -> tuple[Int[Array, "*B N"], Solution]: ...


@overload
def decode(
    model: Model,
    prompt: Int[ArrayLike, "*B P"],
    max_new_tokens: int,
    *,
    solver: AbstractDecodingSolver,
    eos_id: int | None = None,
    key: KeyLike | None = None,
    temperature: Real[ArrayLike, ""] = 1.0,
    prompt_lengths: Int[ArrayLike, " B"] | None = None,
    fill_id: int = 0,
    cached: bool | None = None,
    return_solution: bool = False,
    record_trajectory: bool = False,
    throw: bool = True,
) -> Int[Array, "*B N"] | tuple[Int[Array, "*B N"], Solution]: ...


def decode(
    model: Model,
    prompt: Int[ArrayLike, "*B P"],
    max_new_tokens: int,
    *,
    solver: AbstractDecodingSolver,
    eos_id: int | None = None,
    key: KeyLike | None = None,
    temperature: Real[ArrayLike, ""] = 1.0,
    prompt_lengths: Int[ArrayLike, " B"] | None = None,
    fill_id: int = 0,
    cached: bool | None = None,
    return_solution: bool = False,
    record_trajectory: bool = False,
    throw: bool = True,
) -> Int[Array, "*B N"] | tuple[Int[Array, "*B N"], Solution]:
    """Decode `max_new_tokens` tokens after `prompt` in parallel; the output is
    the sequential (autoregressive) one.

    **Arguments:**

    - `model`: `model(tokens) -> logits`, mapping `int32[L]` to `float[L, V]`
      causally (row `t` depends only on `tokens[:t+1]` and scores the token at
      `t + 1`), with `L = P + max_new_tokens` (static; positions not yet decoded
      hold guesses). A model that also implements `fixpoint.AbstractCachedModel`
      is called one window at a time through its key/value cache.
    - `prompt`: `int[P]`, `P ≥ 1`; or `int[B, P]` for a batch decoded in one
      compiled loop, each row accepting its own tokens (`jax.vmap` over `int[P]`
      prompts does the same).
    - `max_new_tokens`: `N ≥ 1`. When the model has an int attribute `max_len`
      (as `fixpoint.layers.CausalTransformer` has), `P + N` must not exceed it.
    - `solver`: one of `fixpoint.solvers`' decoding solvers: `SequentialDecoding()`,
      `JacobiDecoding(window=...)`, `GSJacobiDecoding(block_size=...)`,
      `HybridDecoding(block_size=...)` or `LookaheadDecoding(window=..., ngram=...,
      guesses=...)` (Jacobi plus n-gram
      guesses scored in the same call).
    - `eos_id`: once an accepted token is `eos_id`, that row stops and every
      later position is `eos_id`.
    - `key`: `None` for greedy decoding; a PRNG key to sample. The token at
      absolute position `t` is `argmax(logits / temperature + g_t)` with Gumbel
      noise `g_t` drawn from `jax.random.fold_in(key, t)` (in float32 for a
      half-precision model): the same key gives the same sample whatever the
      solver or window. With a batched `prompt`, `key` is one key per row (`[B]`)
      or a single key, folded with the row index.
    - `temperature`: `> 0`; used only with a `key`.
    - `prompt_lengths`: `int[B]` with a batched `prompt`: row `b`'s prompt is
      `prompt[b, :prompt_lengths[b]]` (the rest is padding) and its new tokens
      follow it. Values are clipped to `1 … P`.
    - `fill_id`: the initial guess at every undecoded position, and the token
      returned from a non-finite row on when there is no `eos_id`.
    - `cached`: use the model's cache (`True`), its plain call (`False`), or the
      cache when the model has one (`None`, the default).
    - `return_solution`: also return a `fixpoint.Solution`.
    - `record_trajectory`: also record the Jacobi trajectory in
      `solution.stats["trajectory"]` (needs `return_solution=True`): `int32[N, N]`,
      row `i` the new tokens as call `i + 1` saw them (its guesses; for a solver
      that guesses, those of the winning branch); rows past the last call hold
      the output. Row 0 is all `fill_id`; the output is the trajectory's fixed
      point. `stats["trajectory_windows"]` (`bool[N, N]`) marks the positions
      each call judged (its window; all `False` past the last call). For
      consistency training (`fixpoint.layers.jacobi_trajectories`).
    - `throw`: raise `fixpoint.SolveError` when a row is non-finite (below; any
      row of a batch; under `jit` inside JAX's runtime error), as every entry
      point does on a failed solve (default `True`). With `False`, read
      `solution.result` (`return_solution=True`).

    Greedy decoding as a fixed point solved by Jacobi-type iterations: Santilli
    et al., *Accelerating Transformer Inference for Translation via Parallel
    Decoding*, ACL 2023; sampling with pre-drawn noise as the same deterministic
    problem: Song, Meng, Liao & Ermon, *Accelerating Feedforward Computation via
    Parallel Nonlinear Equation Solving*, ICML 2021.

    **Non-finite logits.** `-inf` entries are allowed and never chosen (greedy
    or sampled): they ban tokens, as in constrained decoding. A row with a NaN,
    a `+inf` or no finite entry at all is non-finite: no token is chosen from it.
    When decoding reaches one (at the position it scores, with every token
    before it decoded), that row of the batch stops there: the position it
    scores and every later one hold `eos_id` (`fill_id` without one) and have
    `fixed_at` -1, and the result is `nonfinite`. Every solver gives the same
    tokens, since the row it stops at is the sequential decoding's.

    **Returns:** `int32[N]` (`int32[B, N]` for a batch), the new tokens; with
    `return_solution=True`, `(tokens, solution)` where `solution.value` is the
    tokens, `solution.result` is `successful` (or `nonfinite`, above), and
    `solution.stats` (per row) has `model_calls`, `iterations` (the same: one
    call per iteration), `tokens_per_call` (tokens decoded, up to and including
    EOS, per call),
    `rows_per_call` (positions the model scores per call: `L` on the plain path,
    `min(max_window, N)` on the cached path, whose first call also scores the
    prompt: `P + window - 1` rows; times `1 + num_guesses` for a solver that
    guesses), `guessed_tokens` (tokens accepted from guess branches beyond what
    the main window would have accepted) and `fixed_at` (`int32[N]`: the
    iteration at which each position was accepted, -1 after EOS and from a
    non-finite row on).
    """
    if not callable(model):
        raise TypeError(f"`model` must be callable as model(tokens) -> logits, got {model!r}.")
    if not isinstance(solver, AbstractDecodingSolver):
        raise TypeError(
            "`solver` must be a decoding solver (`fixpoint.solvers.SequentialDecoding()`, "
            f"`fixpoint.solvers.JacobiDecoding(window=16)`, ...), got {solver!r}."
        )
    check_int(max_new_tokens, "max_new_tokens", 1)
    max_new_tokens = int(max_new_tokens)
    check_bool(return_solution, "return_solution")
    check_bool(record_trajectory, "record_trajectory")
    check_bool(throw, "throw")
    if record_trajectory and not return_solution:
        raise ValueError("`record_trajectory=True` needs `return_solution=True` (it is a stat).")
    if cached is None:
        cached = isinstance(model, AbstractCachedModel)
    check_bool(cached, "cached")
    if cached and not isinstance(model, AbstractCachedModel):
        raise TypeError(
            "`cached=True` needs a model implementing `fixpoint.AbstractCachedModel` "
            f"(`init_cache` and `extend`); got {type(model).__name__}."
        )
    prompt = jnp.asarray(prompt)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"`prompt` must hold integer token ids, got dtype {prompt.dtype}.")
    if prompt.ndim not in (1, 2) or prompt.shape[-1] < 1 or prompt.shape[0] < 1:
        raise ValueError(
            f"`prompt` must have shape (P,) or (B, P) with P >= 1, got {prompt.shape}."
        )
    batched = prompt.ndim == 2
    prompt = prompt.astype(jnp.int32)
    p_max = prompt.shape[-1]
    length = p_max + max_new_tokens
    max_len = getattr(model, "max_len", None)
    if isinstance(max_len, (int, np.integer)) and length > max_len:
        raise ValueError(
            f"`prompt` length {p_max} + `max_new_tokens` {max_new_tokens} = {length} exceeds "
            f"the model's `max_len` {max_len}."
        )
    window = min(solver.max_window, max_new_tokens)
    vocab = _check_model(model, length, window, cached)
    for name, value in (("eos_id", eos_id), ("fill_id", fill_id)):
        if value is not None or name == "fill_id":
            check_int(value, name, 0)
            if value >= vocab:
                raise ValueError(f"`{name}={value}` is outside the vocabulary of size {vocab}.")
    eos_id = None if eos_id is None else int(eos_id)
    fill_id = int(fill_id)
    if not isinstance(prompt, Tracer):
        bad = np.flatnonzero((np.asarray(prompt) < 0) | (np.asarray(prompt) >= vocab))
        if bad.size:
            where = np.unravel_index(bad[0], prompt.shape)
            raise ValueError(
                f"`prompt{list(map(int, where))} = {int(prompt[where])}` is not a token id of "
                f"the model's vocabulary 0 … {vocab - 1}."
            )
    lengths = _lengths(prompt_lengths, prompt)
    # Greedy: no temperature (another value must not recompile). Sampled: an array,
    # an input of the compiled loop rather than part of its cache key.
    temp = None
    if key is not None:
        key = _check_key(key, prompt)
        temp = jnp.asarray(_check_temperature(temperature))
    # Compiled once per model, as `jax.jit` would (see `_cache.py`).
    core = _compiled if may_cache(model, solver) else _decode_core
    tokens, stats, result = core(
        model,
        prompt,
        lengths,
        key,
        temp,
        batched=batched,
        n=max_new_tokens,
        solver=solver,
        window=window,
        vocab=vocab,
        eos_id=eos_id,
        fill_id=fill_id,
        cached=cached,
        record=record_trajectory,
    )
    if throw:
        tokens, stats, result = checked(
            (tokens, stats, result),
            result._value,
            stats["model_calls"],
            jnp.full(result._value.shape, jnp.nan, jnp.float32),
            "`decode`",
            _HINT,
        )
    if not return_solution:
        return tokens
    return tokens, Solution(value=tokens, result=result, aux=None, stats=stats)


def _decode_core(model, prompt, lengths, key, temperature, *, batched, **options):
    run = functools.partial(decode_loop, model, temperature=temperature, **options)
    if batched:
        return jax.vmap(run)(prompt, lengths, key)
    return run(prompt, lengths, key)


_compiled = eqx.filter_jit(_decode_core)


@once_per_shapes
def _check_model(model, length, window, cached):
    """The vocabulary size, after checking the model's shapes (once per model and
    shapes, so that a repeated call does not trace the model again)."""
    tokens = jax.ShapeDtypeStruct((length,), jnp.int32)
    out = jax.eval_shape(model, tokens)
    if not _is_logits(out, length):
        raise ValueError(
            f"`model` must map int32[{length}] (the prompt plus `max_new_tokens`) to float "
            f"logits of shape ({length}, V); it returned {out}."
        )
    if cached:
        cache = jax.eval_shape(lambda: model.init_cache(length))
        block = jax.ShapeDtypeStruct((window,), jnp.int32)
        start = jax.ShapeDtypeStruct((), jnp.int32)
        res = jax.eval_shape(model.extend, block, start, cache)
        if not (
            isinstance(res, tuple)
            and len(res) == 2
            and _is_logits(res[0], window)
            and res[0].shape[1] == out.shape[1]
        ):
            raise ValueError(
                f"`model.extend(tokens: int32[{window}], start, cache)` must return "
                f"`(logits[{window}, {out.shape[1]}], cache)`; it returned {res}."
            )
        if jax.tree.structure(res[1]) != jax.tree.structure(cache) or any(
            (a.shape, a.dtype) != (b.shape, b.dtype)
            for a, b in zip(jax.tree.leaves(res[1]), jax.tree.leaves(cache), strict=True)
        ):
            raise ValueError(
                "`model.extend` must return a cache with the structure, shapes and dtypes "
                f"of `model.init_cache({length})`: got {res[1]}, expected {cache}."
            )
    return out.shape[1]


def _is_logits(out, rows):
    return (
        isinstance(out, jax.ShapeDtypeStruct)
        and len(out.shape) == 2
        and out.shape[0] == rows
        and jnp.issubdtype(out.dtype, jnp.floating)
    )


def _lengths(prompt_lengths, prompt):
    p_max = prompt.shape[-1]
    if prompt_lengths is None:
        shape = prompt.shape[:1] if prompt.ndim == 2 else ()
        return jnp.full(shape, p_max, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError("`prompt_lengths` needs a batched `prompt` of shape (B, P).")
    lengths = jnp.asarray(prompt_lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer) or lengths.shape != prompt.shape[:1]:
        raise ValueError(
            f"`prompt_lengths` must be integers of shape ({prompt.shape[0]},) (one per row of "
            f"`prompt`), got {lengths.dtype}{list(lengths.shape)}."
        )
    if not isinstance(lengths, Tracer):
        bad = np.flatnonzero((np.asarray(lengths) < 1) | (np.asarray(lengths) > p_max))
        if bad.size:
            raise ValueError(
                f"`prompt_lengths[{bad[0]}] = {int(lengths[bad[0]])}` is outside 1 … {p_max} "
                "(the prompt's width)."
            )
    return jnp.clip(lengths.astype(jnp.int32), 1, p_max)


def _check_key(key, prompt):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
            key = jax.random.wrap_key_data(key)
        else:
            raise TypeError(f"`key` must be a PRNG key (`jax.random.key(0)`), got {key.dtype}.")
    if prompt.ndim == 1:
        if key.shape != ():
            raise ValueError(f"`key` must be a single key for a 1-D `prompt`, got {key.shape}.")
        return key
    rows = prompt.shape[0]
    if key.shape == ():
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(rows))
    if key.shape != (rows,):
        raise ValueError(
            f"`key` must be one key or one per row of `prompt` ({rows},), got {key.shape}."
        )
    return key


def _check_temperature(temperature):
    if isinstance(temperature, Tracer):
        return temperature
    t = np.asarray(temperature)
    real = np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)
    if t.shape != () or not real or not t > 0:
        raise ValueError(f"`temperature` must be a number > 0 when sampling, got {temperature!r}.")
    return float(t)


class Disagreement(NamedTuple):
    """Where two decodings first differ (see `fixpoint.first_disagreement`).

    A `NamedTuple` of Python numbers.

    **Arguments:**

    - `index`: the first new position where the two decodings differ, `-1` if
      they agree everywhere (then the other fields are `-1` or NaN).
    - `token`: the token of `tokens` there.
    - `reference_token`: the token of `reference` there.
    - `margin`: `score(reference_token) - score(token)` at that position.
    - `scale`: `max |score|` at that position: the margin's yardstick.
    """

    index: int  # first differing new position, -1 if none
    token: int  # the token of `tokens` there
    reference_token: int  # the token of `reference` there
    margin: float  # score(reference_token) - score(token) at that position
    scale: float  # max |score| at that position: the margin's yardstick


def first_disagreement(
    model: Model,
    prompt: Int[ArrayLike, " P"],
    tokens: Int[ArrayLike, " N"],
    reference: Int[ArrayLike, " N"],
    *,
    key: PRNGKeyArray | None = None,
    temperature: Real[ArrayLike, ""] = 1.0,
) -> Disagreement:
    """Where `tokens` first differs from `reference` (two decodings of `prompt`),
    and by how much the model preferred one there.

    Both decodings share the context `prompt ⧺ reference[:i]` up to the first
    differing position `i`; the model's plain call (`model(tokens)`) on
    `prompt ⧺ reference` scores that position once more. The `margin` is the
    score of the reference's token minus the other's (scores are
    `logits / temperature + noise` when sampled with `key`, as in `decode`). A
    margin at the level of rounding (`margin ≲ 1e-6 · scale` in float32) means
    the two decodings differ only by a near-tie that the two call shapes broke
    differently; a large margin means one of them is wrong.

    Runs eagerly (NumPy on the host), with one call of `model`.

    **Arguments:**

    - `model`: `model(tokens) -> logits`, as in `fixpoint.decode`.
    - `prompt`: the prompt, `int[P]` (one row, not a batch).
    - `tokens`: one decoding's new tokens, `int[N]`.
    - `reference`: the other decoding's new tokens, `int[N]` (the one whose
      context is used).
    - `key`: `None` for greedy decoding, or the PRNG key of the sampled
      decodings, as in `decode` (for row `b` of a batched call with a single
      key, pass `jax.random.fold_in(key, b)`: the key that row used).
    - `temperature`: as in `decode` (default 1.0); used only with a `key`.

    **Returns:**

    A `fixpoint.Disagreement` (`index == -1` when they agree).

    **Raises:**

    `ValueError` unless `tokens` and `reference` are `int[N]` of one shape and
    `prompt` is one-dimensional.
    """
    prompt = np.asarray(prompt)
    tokens, reference = np.asarray(tokens), np.asarray(reference)
    if tokens.shape != reference.shape or tokens.ndim != 1 or prompt.ndim != 1:
        raise ValueError(
            "`first_disagreement` compares two int[N] decodings of one int[P] prompt; got "
            f"prompt {prompt.shape}, tokens {tokens.shape}, reference {reference.shape}."
        )
    differ = np.flatnonzero(tokens != reference)
    if differ.size == 0:
        return Disagreement(-1, -1, -1, float("nan"), float("nan"))
    i = int(differ[0])
    p = prompt.shape[0]
    seq = jnp.asarray(np.concatenate([prompt, reference]).astype(np.int32))
    logits = model(seq)[p + i - 1 : p + i]
    row = scores(logits, jnp.array([p + i], jnp.int32), key, temperature)[0]
    row = np.asarray(row, np.float64)
    a, b = int(tokens[i]), int(reference[i])
    return Disagreement(i, a, b, float(row[b] - row[a]), float(np.max(np.abs(row))))
