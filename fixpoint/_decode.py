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

import abc
import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_bool, check_int
from ._manual import while_loop
from ._solution import RESULTS, Solution


class AbstractDecodingSolver(eqx.Module):
    """A parallel decoding method: which positions one model call proposes.

    Each iteration the loop (`fixpoint.decode`) scores the window of positions
    `k … k + w - 1` after the `k` accepted new tokens, accepts the longest prefix
    of it whose context was exact (always at least position `k`), and takes the
    model's choices as the guesses for the rest. A solver says how wide the
    window is:

    - `max_window` (static): the widest window; it sizes the model call on the
      cached path (`min(max_window, max_new_tokens)` tokens per call).
    - `window_at(accepted)`: the window for this iteration given the number of
      accepted new tokens (a traced int32 scalar, per row in a batch); an int32
      in `1 … max_window`. The default is `max_window` every time.

    **Guess branches (optional).** A solver may also propose `num_guesses`
    alternative guesses for the positions right after the accepted prefix. They
    are scored in the same model call as extra rows (the call's batch grows from
    1 to `1 + num_guesses` windows); every branch is judged by the same
    acceptance rule and the branch that accepts most wins, so the output is the
    same whatever is guessed. A solver that guesses keeps a state (a pytree of
    arrays, per row of a batch) and implements:

    - `num_guesses` (static int, default 0).
    - `init_state(tokens, prompt_length, vocab_size)`: the state before the first
      call; `tokens: int32[L]` holds the prompt at `[:prompt_length]` (traced).
    - `propose(state, last_token) -> (int32[G, m], bool[G])`: `G = num_guesses`
      guesses of the `m` tokens that follow the last accepted token (`m` static;
      only the first `window_at(...)` positions of a guess are used) and whether
      each is real (an unreal guess is scored but changes nothing).
    - `observe(state, tokens, lo, hi, count) -> state`: after each call, with the
      updated `tokens: int32[L]` (accepted prefix, then the model's predictions):
      positions `lo … hi-1` are the last accepted token before the call and the
      window just scored. `count` (static) bounds `hi - lo`.
    """

    @property
    @abc.abstractmethod
    def max_window(self) -> int:
        """The widest window this solver proposes (static)."""

    def window_at(self, accepted):
        """The window width at this iteration, given `accepted` new tokens."""
        del accepted
        return jnp.array(self.max_window, jnp.int32)

    @property
    def num_guesses(self) -> int:
        """The number of guess branches scored beside the main window (static)."""
        return 0

    def init_state(self, tokens, prompt_length, vocab_size):
        """The guessing state before the first call (`None` for no guesses)."""
        del tokens, prompt_length, vocab_size
        return None

    def propose(self, state, last_token):
        """`(guesses: int32[G, m], real: bool[G])` after `last_token`."""
        raise NotImplementedError(f"{type(self).__name__} has num_guesses > 0 but no `propose`.")

    def observe(self, state, tokens, lo, hi, count):
        """The state after a call (see the class docstring)."""
        del tokens, lo, hi, count
        return state


class AbstractCachedModel(eqx.Module):
    """The cached decoding protocol: a model with a fixed-capacity key/value cache.

    A model that implements it is still a plain model (`__call__(tokens)`,
    the simple protocol); `fixpoint.decode` then calls `extend` on one window of
    tokens per iteration instead of the whole sequence. Rolling back rejected
    guesses is a pointer move: the loop simply writes the next window over the
    stale entries, and a causal model never reads entries past the row it scores.

    **Methods a model implements:**

    - `__call__(tokens: int32[L]) -> float[L, V]`: row `t` depends only on
      `tokens[:t+1]` and scores the token at `t + 1`.
    - `init_cache(capacity: int) -> cache`: an empty cache (a pytree of arrays)
      with room for positions `0 … capacity-1`.
    - `extend(tokens: int32[W], start: int32[], cache) -> (float[W, V], cache)`:
      `tokens[i]` sits at position `start + i`. Row `i` of the logits must equal
      row `start + i` of `__call__` on any sequence that agrees with the cache at
      positions `< start` and with `tokens` at `start … start+i`. The returned
      cache holds the entries of these `W` positions (those past `start + W - 1`
      may hold anything). `start` is traced; `W` is static.
    """

    @abc.abstractmethod
    def __call__(self, tokens):
        """Logits `float[L, V]` for `int32[L]` tokens (causal)."""

    @abc.abstractmethod
    def init_cache(self, capacity: int):
        """An empty cache for positions `0 … capacity-1`."""

    @abc.abstractmethod
    def extend(self, tokens, start, cache):
        """Logits of `tokens` placed at `start …`, and the cache with their entries."""


def decode(
    model,
    prompt,
    max_new_tokens: int,
    *,
    solver: AbstractDecodingSolver,
    eos_id: int | None = None,
    key=None,
    temperature=1.0,
    prompt_lengths=None,
    fill_id: int = 0,
    cached: bool | None = None,
    return_solution: bool = False,
    record_trajectory: bool = False,
):
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
      `JacobiDecoding(window)`, `GSJacobiDecoding(block_size)`, `HybridDecoding(...)`
      or `LookaheadDecoding(window, ngram, guesses)` (Jacobi plus n-gram
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
            f"`fixpoint.solvers.JacobiDecoding(window)`, ...), got {solver!r}."
        )
    check_int(max_new_tokens, "max_new_tokens", 1)
    max_new_tokens = int(max_new_tokens)
    check_bool(return_solution, "return_solution")
    check_bool(record_trajectory, "record_trajectory")
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
    if not isinstance(prompt, jax.core.Tracer):
        bad = np.flatnonzero((np.asarray(prompt) < 0) | (np.asarray(prompt) >= vocab))
        if bad.size:
            where = np.unravel_index(bad[0], prompt.shape)
            raise ValueError(
                f"`prompt{list(map(int, where))} = {int(prompt[where])}` is not a token id of "
                f"the model's vocabulary 0 … {vocab - 1}."
            )
    lengths = _lengths(prompt_lengths, prompt)
    if key is not None:
        key = _check_key(key, prompt)
        temperature = _check_temperature(temperature)
    run = functools.partial(
        _decode,
        model,
        n=max_new_tokens,
        solver=solver,
        window=window,
        vocab=vocab,
        eos_id=eos_id,
        fill_id=fill_id,
        temperature=temperature,
        cached=cached,
        record=record_trajectory,
    )
    if batched:
        tokens, stats, result = jax.vmap(run)(prompt, lengths, key)
    else:
        tokens, stats, result = run(prompt, lengths, key)
    if not return_solution:
        return tokens
    return tokens, Solution(value=tokens, result=result, aux=None, stats=stats)


def _check_model(model, length, window, cached):
    """The vocabulary size, after checking the model's shapes at trace time."""
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
    if not isinstance(lengths, jax.core.Tracer):
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
    if isinstance(temperature, jax.core.Tracer):
        return temperature
    t = np.asarray(temperature)
    real = np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)
    if t.shape != () or not real or not t > 0:
        raise ValueError(f"`temperature` must be a number > 0 when sampling, got {temperature!r}.")
    return float(t)


class _Carry(eqx.Module):
    buf: jax.Array  # int32[L]: prompt, accepted tokens, then guesses
    accepted: jax.Array  # number of accepted new tokens
    calls: jax.Array
    fixed_at: jax.Array  # int32[N]
    done: jax.Array
    finite: jax.Array
    guessed: jax.Array  # tokens accepted beyond what the main window alone gave
    trajectory: jax.Array | None  # int32[N, N]: the guesses each call saw
    windows: jax.Array | None  # bool[N, N]: the positions each call judged
    state: object  # the solver's guessing state
    cache: object


def _scores(logits, positions, key, temperature):
    """The scores whose argmax is the token at each absolute `position`, from its
    scoring row of `logits` (`[R, V]`): the logits when greedy, else
    `logits / temperature` plus the Gumbel noise of that position, in at least
    float32 (`logits / temperature` must not overflow a half-precision type).
    `decode` and `first_divergence` both score with it."""
    if key is None:
        return logits
    vocab = logits.shape[-1]
    dtype = logits.dtype if jnp.finfo(logits.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    noise = jax.vmap(lambda t: jax.random.gumbel(jax.random.fold_in(key, t), (vocab,), dtype))(
        positions
    )
    return logits.astype(dtype) / jnp.asarray(temperature).astype(dtype) + noise


def _finite_rows(logits):
    """Which rows of `logits` (`[R, V]`) a token can be chosen from: no NaN, no
    `+inf` and at least one finite entry (`-inf` entries are never chosen)."""
    allowed = jnp.isfinite(logits) | (logits == -jnp.inf)
    return jnp.all(allowed, axis=-1) & jnp.any(jnp.isfinite(logits), axis=-1)


def _decode(
    model, prompt, p, key, *, n, solver, window, vocab, eos_id, fill_id, temperature, cached, record
):
    """One row. `prompt` is `int32[P]` of which the first `p` (traced) are the prompt."""
    p_max = prompt.shape[0]
    length = p_max + n
    i32 = jnp.int32
    positions = jnp.arange(n, dtype=i32)
    buf = jnp.concatenate([prompt, jnp.full(n, fill_id, jnp.int32)])
    # The new tokens of this row live at buf[p : p + n].
    buf = jnp.where(jnp.arange(length, dtype=i32) < p, buf, fill_id)
    guesses = solver.num_guesses

    def width(k):
        return jnp.clip(solver.window_at(k), 1, window)

    def judge(guess, logits, start, k, w):
        """One branch: which of its window's positions are accepted, and its update."""
        # Row i of `logits` sits at absolute position start + i and scores start + i + 1,
        # which is new position start + i + 1 - p.
        rows = logits.shape[0]
        scored = start + 1 + jnp.arange(rows, dtype=i32)
        chosen = jnp.argmax(_scores(logits, scored, key, temperature), axis=-1).astype(i32)
        index = scored - p
        index = jnp.where((index >= 0) & (index < n), index, i32(n))
        pred = guess.at[index].set(chosen, mode="drop")
        finite_at = jnp.ones(n, bool).at[index].set(_finite_rows(logits), mode="drop")
        in_window = (positions >= k) & (positions < k + w)
        # Position k is exact; k + j is exact when the guesses at k … k+j-1 were right.
        wrong = in_window & (guess != pred)
        wrong_before = jnp.cumsum(wrong, dtype=i32) - wrong.astype(i32)
        accept = in_window & (wrong_before == 0)
        new = jnp.where(in_window, pred, guess)
        first_eos = i32(n)
        if eos_id is not None:
            # Accepted positions after the first accepted EOS are EOS too, and done.
            first_eos = jnp.min(jnp.where(accept & (new == eos_id), positions, i32(n)))
            accept = accept & (positions <= first_eos)
            new = jnp.where(positions > first_eos, i32(eos_id), new)
        # A token chosen from a non-finite row is not decoded: the row stops before it
        # (its context is exact, so every solver meets that row at that position).
        first_bad = jnp.min(jnp.where(accept & ~finite_at, positions, i32(n)))
        accept = accept & (positions < first_bad)
        return accept, new, first_eos < first_bad, first_bad == n

    def branches(c):
        """`int32[1 + G, n]`: the main guesses, then each proposed guess written over
        the positions after the accepted prefix."""
        guess = jax.lax.dynamic_slice_in_dim(c.buf, p, n)
        if not guesses:
            return guess[None]
        k = c.accepted
        proposed, real = solver.propose(c.state, c.buf[p - 1 + k])
        m = proposed.shape[1]
        rel = positions - k
        where = (rel >= 0) & (rel < jnp.minimum(m, width(k)))
        alt = jnp.where(
            where[None] & real[:, None], proposed[:, jnp.clip(rel, 0, m - 1)], guess[None]
        )
        return jnp.concatenate([guess[None], alt.astype(i32)])

    def spliced(c, guess):
        """The buffer with each branch's guesses at the new positions: `int32[R, L]`."""
        return jax.vmap(lambda g: jax.lax.dynamic_update_slice_in_dim(c.buf, g, p, 0))(guess)

    def step(c, guess, logits, start, cache):
        """Judge every branch (`guess: int32[R, n]`, `logits: [R, rows, V]`), keep the best."""
        k = c.accepted
        w = width(k)
        accept, new, hit, finite = jax.vmap(lambda g, lg: judge(g, lg, start, k, w))(guess, logits)
        count = jnp.sum(accept, axis=1, dtype=i32)
        best = jnp.argmax(count)  # the first of the longest: the main window on a tie
        accept, new, hit, finite = accept[best], new[best], hit[best], finite[best]
        trajectory, windows = c.trajectory, c.windows
        if record:
            row = jnp.where(c.done, n, c.calls)  # out of range after the last call: dropped
            trajectory = trajectory.at[row].set(guess[best], mode="drop")
            in_window = (positions >= k) & (positions < k + w)
            windows = windows.at[row].set(in_window, mode="drop")
        if cache is not None:
            cache = jax.tree.map(lambda x: x[best], cache)
        accepted = k + count[best]
        buf = jax.lax.dynamic_update_slice_in_dim(c.buf, new, p, 0)
        state = c.state
        if guesses:
            hi = jnp.minimum(p + k + w, p + n)
            state = solver.observe(state, buf, p - 1 + k, hi, window + 1)
        keep = c.done
        return _Carry(
            buf=jnp.where(keep, c.buf, buf),
            accepted=jnp.where(keep, k, accepted),
            calls=c.calls + (~keep).astype(i32),
            fixed_at=jnp.where(keep | ~accept, c.fixed_at, c.calls),
            done=keep | (accepted >= n) | hit | ~finite,
            finite=c.finite & (keep | finite),
            guessed=c.guessed + jnp.where(keep, 0, count[best] - count[0]),
            state=jax.tree.map(lambda old, s: jnp.where(keep, old, s), c.state, state),
            trajectory=trajectory,
            windows=windows,
            cache=cache,
        )

    init = _Carry(
        buf=buf,
        accepted=jnp.array(0, i32),
        calls=jnp.array(0, i32),
        fixed_at=jnp.full(n, -1, jnp.int32),
        done=jnp.array(False),
        finite=jnp.array(True),
        guessed=jnp.array(0, i32),
        trajectory=jnp.zeros((n, n), i32) if record else None,
        windows=jnp.zeros((n, n), bool) if record else None,
        state=solver.init_state(buf, p, vocab) if guesses else None,
        cache=None,
    )
    one = lambda x: jax.tree.map(lambda a: a[None], x)  # noqa: E731
    if cached:
        # The first call also fills the cache with the prompt: every row scores the
        # window after its own prompt, from the same static block (no guesses yet).
        first = p_max + window - 1
        logits, cache = model.extend(buf[:first], jnp.array(0, jnp.int32), model.init_cache(length))
        init = step(init, branches(init)[:1], logits[None], jnp.array(0, i32), one(cache))

        def body(c):
            # The window's block starts at the last accepted token; the entries before it
            # are exact, and those after it are stale but never read (causality).
            start = jnp.minimum(p - 1 + c.accepted, i32(length - window))
            guess = branches(c)
            blocks = jax.vmap(lambda b: jax.lax.dynamic_slice_in_dim(b, start, window))(
                spliced(c, guess)
            )
            if guesses:
                logits, cache = jax.vmap(model.extend, in_axes=(0, None, None))(
                    blocks, start, c.cache
                )
            else:
                logits, cache = model.extend(blocks[0], start, c.cache)
                logits, cache = logits[None], one(cache)
            return step(c, guess, logits, start, cache)

        rows = jnp.array((1 + guesses) * window, jnp.int32)
    else:

        def body(c):
            guess = branches(c)
            if guesses:
                logits = jax.vmap(model)(spliced(c, guess))
            else:
                logits = model(c.buf)[None]
            return step(c, guess, logits, jnp.array(0, i32), None)

        rows = jnp.array((1 + guesses) * length, jnp.int32)
    final = while_loop(lambda c: ~c.done, body, init)
    tokens = jax.lax.dynamic_slice_in_dim(final.buf, p, n)
    decoded = final.accepted
    # Past the accepted tokens (after EOS, or from a non-finite row on): EOS, else fill.
    tokens = jnp.where(positions < decoded, tokens, i32(fill_id if eos_id is None else eos_id))
    calls = final.calls
    stats = {
        "model_calls": calls,
        "iterations": calls,
        "tokens_per_call": decoded.astype(jnp.float32) / jnp.maximum(calls, 1).astype(jnp.float32),
        "rows_per_call": rows,
        "guessed_tokens": final.guessed,
        "fixed_at": final.fixed_at,
    }
    if record:
        # Rows past the last call: the output (the fixed point).
        past = jnp.arange(n, dtype=i32)[:, None] >= calls
        stats["trajectory"] = jnp.where(past, tokens[None], final.trajectory)
        stats["trajectory_windows"] = final.windows
    result = RESULTS.where(final.finite, RESULTS.successful, RESULTS.nonfinite)
    return tokens, stats, result


class Divergence(NamedTuple):
    """Where two decodings first differ (see `fixpoint.first_divergence`)."""

    index: int  # first differing new position, -1 if none
    token: int  # the token of `tokens` there
    reference_token: int  # the token of `reference` there
    margin: float  # score(reference_token) - score(token) at that position
    scale: float  # max |score| at that position: the margin's yardstick


def first_divergence(model, prompt, tokens, reference, *, key=None, temperature=1.0):
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

    **Arguments:** `model`, `prompt` (`int[P]`) as in `fixpoint.decode`;
    `tokens`, `reference`: `int[N]`; `key`/`temperature` as in `decode` (for
    row `b` of a batched call with a single key, pass
    `jax.random.fold_in(key, b)`: the key that row used).

    **Returns:** a `fixpoint.Divergence` (`index == -1` when they agree).
    """
    prompt = np.asarray(prompt)
    tokens, reference = np.asarray(tokens), np.asarray(reference)
    if tokens.shape != reference.shape or tokens.ndim != 1 or prompt.ndim != 1:
        raise ValueError(
            "`first_divergence` compares two int[N] decodings of one int[P] prompt; got "
            f"prompt {prompt.shape}, tokens {tokens.shape}, reference {reference.shape}."
        )
    differ = np.flatnonzero(tokens != reference)
    if differ.size == 0:
        return Divergence(-1, -1, -1, float("nan"), float("nan"))
    i = int(differ[0])
    p = prompt.shape[0]
    seq = jnp.asarray(np.concatenate([prompt, reference]).astype(np.int32))
    logits = model(seq)[p + i - 1 : p + i]
    row = _scores(logits, jnp.array([p + i], jnp.int32), key, temperature)[0]
    row = np.asarray(row, np.float64)
    a, b = int(tokens[i]), int(reference[i])
    return Divergence(i, a, b, float(row[b] - row[a]), float(np.max(np.abs(row))))
