"""Decoding solvers for `fixpoint.decode`: sequential, Jacobi, GS-Jacobi, hybrid, lookahead.

Santilli et al. 2023, "Accelerating Transformer Inference for Translation via
Parallel Decoding": greedy decoding is a triangular system of equations over
positions; Jacobi iteration solves every position of a window at once and
reaches the greedy output exactly, in at most as many model calls. The solvers
differ only in the window each iteration proposes (`window_at`); the loop,
the acceptance rule and therefore the output are the same for all.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from fixpoint import internal


class SequentialDecoding(internal.AbstractDecodingSolver):
    """One token per model call: ordinary autoregressive decoding, the reference.

    Pass it as `solver=` to `fixpoint.decode`. It takes no arguments.
    """

    @property
    def max_window(self) -> int:
        return 1


class JacobiDecoding(internal.AbstractDecodingSolver):
    """Jacobi decoding: `window` positions per model call.

    Every call re-predicts the `window` positions after the accepted prefix from
    the current guesses; the first is always exact, and each further one is
    exact when every guess before it was confirmed. The window slides with the
    accepted prefix. `window ≥ max_new_tokens` is the paper's plain Jacobi over
    the whole output.

    Santilli, Severino, Postolache, Maiorca, Mancusi, Marin & Rodolà,
    *Accelerating Transformer Inference for Translation via Parallel Decoding*,
    ACL 2023.

    **Arguments:**

    Keyword-only:

    - `window`: the number of positions proposed per call, an int `≥ 1`
      (default 16).
    """

    window: int = eqx.field(default=16, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_int(self.window, "window", 1, owner="JacobiDecoding")

    @property
    def max_window(self) -> int:
        return self.window


class GSJacobiDecoding(internal.AbstractDecodingSolver):
    """Gauss–Seidel–Jacobi decoding: the output is cut into consecutive blocks
    of `block_size` positions, solved one after another;
    inside the current block, Jacobi iteration. Unlike `JacobiDecoding`, the
    window never reaches past the end of the current block, so guesses there
    start only once the block before is fixed.

    (Not the scan solvers' `GaussSeidel(block_size=...)`, which sweeps a recurrence.)

    Santilli, Severino, Postolache, Maiorca, Mancusi, Marin & Rodolà,
    *Accelerating Transformer Inference for Translation via Parallel Decoding*,
    ACL 2023.

    **Arguments:**

    Keyword-only:

    - `block_size`: the number of positions per block, an int `≥ 1` (default 4).
    """

    block_size: int = eqx.field(default=4, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_int(self.block_size, "block_size", 1, owner="GSJacobiDecoding")

    @property
    def max_window(self) -> int:
        return self.block_size

    def window_at(self, accepted):
        return (self.block_size - accepted % self.block_size).astype(jnp.int32)


class HybridDecoding(internal.AbstractDecodingSolver):
    """Hybrid GS-Jacobi decoding: GS-Jacobi blocks of
    `block_size` over the first `parallel_tokens` new positions, then one token
    per call. The paper uses it when the output length is unknown: parallel
    guesses past the (unknown) end are wasted work, so it goes autoregressive
    after a guessed length.

    Santilli, Severino, Postolache, Maiorca, Mancusi, Marin & Rodolà,
    *Accelerating Transformer Inference for Translation via Parallel Decoding*,
    ACL 2023.

    **Arguments:**

    Keyword-only:

    - `block_size`: the number of positions per block, an int `≥ 1` (default 4).
    - `parallel_tokens`: the number of leading new positions decoded in blocks,
      an int `≥ 1` (default 32); one token per call after them.
    """

    block_size: int = eqx.field(default=4, converter=internal.as_python_number, kw_only=True)
    parallel_tokens: int = eqx.field(default=32, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_int(self.block_size, "block_size", 1, owner="HybridDecoding")
        internal.check_int(self.parallel_tokens, "parallel_tokens", 1, owner="HybridDecoding")

    @property
    def max_window(self) -> int:
        return self.block_size

    def window_at(self, accepted):
        in_block = self.block_size - accepted % self.block_size
        parallel = jnp.minimum(in_block, self.parallel_tokens - accepted)
        return jnp.where(accepted < self.parallel_tokens, parallel, 1).astype(jnp.int32)


class NGramPool(NamedTuple):
    """The n-gram table of `LookaheadDecoding`: for every key token, up to
    `guesses` distinct continuations of `ngram - 1` tokens; when a key's entries
    are full, a new continuation replaces the one seen least recently.

    The guessing state that `LookaheadDecoding.init_state` builds and `observe`
    updates (one per row of a batch); not built by users.

    **Arguments:**

    - `table`: `int32[V, G, ngram - 1]`, the continuations of each key token
      (`V` the vocabulary size, `G = guesses`).
    - `seen_at`: `int32[V, G]`, when each entry was last seen (`-1`: empty).
    - `clock`: `int32[]`, the number of n-grams observed so far.
    """

    table: jax.Array  # int32[V, G, ngram - 1]
    seen_at: jax.Array  # int32[V, G]: when each entry was last seen (-1: empty)
    clock: jax.Array  # int32[]: n-grams observed so far


class LookaheadDecoding(internal.AbstractDecodingSolver):
    """Jacobi decoding with n-gram guesses (after lookahead decoding).

    Besides the Jacobi window of `window` positions, every call scores `guesses`
    alternative windows in the same model call: each writes one remembered
    continuation of the last accepted token over the first `ngram - 1` positions
    of the window. The branch that accepts most wins, with the same acceptance
    rule as Jacobi decoding, so the output is still exactly the sequential one.

    The continuations come from a fixed-size pool (`NGramPool`, kept in the
    compiled loop, one per row): every n-gram of the prompt, and after each call
    every n-gram of the accepted tokens and the model's predictions in the window
    just scored, i.e. of the Jacobi trajectory. A key token keeps the `guesses`
    distinct continuations it saw most recently (least recently seen out first).
    (Fu et al. also run a two-dimensional lookahead window over several past
    iterations; here the trajectory's n-grams are read from the current window
    only.) An n-gram longer than the window plus one (`ngram > min(window,
    max_new_tokens) + 1`) never fits in a window: then only the prompt's
    n-grams are remembered.

    Cost: a call scores `(1 + guesses)` windows (`rows_per_call` says so), and
    on the cached path it returns `1 + guesses` candidate caches of which one is
    kept. The pool holds `V · guesses · ngram` int32 per row (`V` the
    vocabulary size): 10 KiB for 128 characters at the defaults, 4 MB for a
    50k-token vocabulary.

    After Fu, Bailis, Stoica & Zhang, *Break the Sequential Dependency of LLM
    Inference Using Lookahead Decoding*, ICML 2024. Jacobi decoding: Santilli,
    Severino, Postolache, Maiorca, Mancusi, Marin & Rodolà,
    *Accelerating Transformer Inference for Translation via Parallel Decoding*,
    ACL 2023.

    **Arguments:**

    Keyword-only:

    - `window`: the number of positions proposed per call, an int `≥ 1`
      (default 16).
    - `ngram`: the n-gram length, an int `≥ 2`: the key token plus `ngram - 1`
      guessed tokens (default 5).
    - `guesses`: the number of guess branches per call, which is also the
      number of continuations kept per key token, an int `≥ 1` (default 4).
    """

    window: int = eqx.field(default=16, converter=internal.as_python_number, kw_only=True)
    ngram: int = eqx.field(default=5, converter=internal.as_python_number, kw_only=True)
    guesses: int = eqx.field(default=4, converter=internal.as_python_number, kw_only=True)

    def __check_init__(self):
        internal.check_int(self.window, "window", 1, owner="LookaheadDecoding")
        internal.check_int(self.guesses, "guesses", 1, owner="LookaheadDecoding")
        internal.check_int(self.ngram, "ngram", 2, owner="LookaheadDecoding")

    @property
    def max_window(self) -> int:
        return self.window

    @property
    def num_guesses(self) -> int:
        return self.guesses

    def init_state(self, tokens, prompt_length, vocab_size):
        pool = NGramPool(
            table=jnp.zeros((vocab_size, self.guesses, self.ngram - 1), jnp.int32),
            seen_at=jnp.full((vocab_size, self.guesses), -1, jnp.int32),
            clock=jnp.zeros((), jnp.int32),
        )
        return self.observe(pool, tokens, jnp.int32(0), prompt_length, tokens.shape[0])

    def propose(self, state, last_token):
        return state.table[last_token], state.seen_at[last_token] >= 0

    def observe(self, state, tokens, lo, hi, count):
        n = self.ngram
        starts = max(count - n + 1, 0)
        if not starts:  # n-grams longer than the window: only the prompt's are kept
            return state

        def insert(i, pool):
            start = lo + i
            gram = jax.lax.dynamic_slice_in_dim(tokens, start, n)
            key, cont = gram[0], gram[1:]
            seen_at = pool.seen_at[key]
            match = (seen_at >= 0) & jnp.all(pool.table[key] == cont, axis=-1)
            # Refresh the entry it matches, else replace the empty or least recent one.
            slot = jnp.where(jnp.any(match), jnp.argmax(match), jnp.argmin(seen_at))
            valid = start + n <= hi
            return NGramPool(
                table=pool.table.at[key, slot].set(jnp.where(valid, cont, pool.table[key, slot])),
                seen_at=pool.seen_at.at[key, slot].set(jnp.where(valid, pool.clock, seen_at[slot])),
                clock=pool.clock + valid.astype(jnp.int32),
            )

        return internal.fori_loop(0, starts, insert, state)
