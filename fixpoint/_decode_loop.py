"""The decoding loop: one compiled `while_loop` over model calls, each proposing a
window of positions and accepting its exact prefix (see `fixpoint.decode`)."""

import equinox as eqx
import jax
import jax.numpy as jnp

from ._manual import while_loop
from ._solution import RESULTS


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


def scores(logits, positions, key, temperature):
    """The scores whose argmax is the token at each absolute `position`, from its
    scoring row of `logits` (`[R, V]`): the logits when greedy, else
    `logits / temperature` plus the Gumbel noise of that position, in at least
    float32 (`logits / temperature` must not overflow a half-precision type).
    `decode` and `first_disagreement` both score with it."""
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


def decode_loop(
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
        chosen = jnp.argmax(scores(logits, scored, key, temperature), axis=-1).astype(i32)
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
    if final.trajectory is not None and final.windows is not None:  # `record=True`
        # Rows past the last call: the output (the fixed point).
        past = jnp.arange(n, dtype=i32)[:, None] >= calls
        stats["trajectory"] = jnp.where(past, tokens[None], final.trajectory)
        stats["trajectory_windows"] = final.windows
    result = RESULTS.where(final.finite, RESULTS.successful, RESULTS.nonfinite)
    return tokens, stats, result
