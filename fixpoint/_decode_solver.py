"""The decoding solver base and the cached-model protocol that `fixpoint.decode`
works with."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Int, PyTree


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
        """The widest window this solver proposes (static). Abstract: every
        solver provides it.

        **Returns:**

        A Python int `>= 1`.
        """

    def window_at(self, accepted: Int[Array, ""]) -> Int[Array, ""]:
        """The window width at this iteration, given `accepted` new tokens.

        The default is `max_window` every time.

        **Arguments:**

        - `accepted`: the number of new tokens accepted so far, a traced int32
          scalar (per row in a batch).

        **Returns:**

        The window width, an int32 scalar in `1 … max_window`.
        """
        del accepted
        return jnp.array(self.max_window, jnp.int32)

    @property
    def num_guesses(self) -> int:
        """The number of guess branches scored beside the main window (static).

        **Returns:**

        A Python int `>= 0` (default 0: no guesses).
        """
        return 0

    def init_state(
        self, tokens: Int[Array, " L"], prompt_length: Int[Array, ""], vocab_size: int
    ) -> PyTree[Array] | None:
        """The guessing state before the first call (`None` for no guesses).

        **Arguments:**

        - `tokens`: `int32[L]`, the prompt at `[:prompt_length]`, then guesses.
        - `prompt_length`: the prompt's length, a traced int32 scalar.
        - `vocab_size`: the model's vocabulary size `V` (static).

        **Returns:**

        A pytree of arrays (per row in a batch), or `None` (the default).
        """
        del tokens, prompt_length, vocab_size
        return None

    def propose(
        self, state: PyTree[Array], last_token: Int[Array, ""]
    ) -> tuple[Int[Array, "G m"], Bool[Array, " G"]]:
        """`(guesses: int32[G, m], real: bool[G])` after `last_token`.

        Needed only when `num_guesses > 0`; the default raises
        `NotImplementedError`.

        **Arguments:**

        - `state`: the guessing state (from `init_state` or `observe`).
        - `last_token`: the last accepted token, an int32 scalar.

        **Returns:**

        `(guesses, real)`: `G = num_guesses` guesses of the `m` tokens that
        follow `last_token` (`m` static; only the first `window_at(...)` are
        used), and whether each guess is real (an unreal one changes nothing).
        """
        raise NotImplementedError(f"{type(self).__name__} has num_guesses > 0 but no `propose`.")

    def observe(
        self,
        state: PyTree[Array],
        tokens: Int[Array, " L"],
        lo: Int[Array, ""],
        hi: Int[Array, ""],
        count: int,
    ) -> PyTree[Array]:
        """The state after a call (see the class docstring).

        The default returns `state` unchanged.

        **Arguments:**

        - `state`: the guessing state before the call.
        - `tokens`: `int32[L]` after the call: the accepted prefix, then the
          model's predictions.
        - `lo`: the position of the last token accepted before the call, an
          int32 scalar.
        - `hi`: one past the last position of the window just scored, an int32
          scalar.
        - `count`: a static bound on `hi - lo`.

        **Returns:**

        The new state, with the structure of `state`.
        """
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
    def __call__(self, tokens: Int[Array, " L"]) -> Float[Array, "L V"]:
        """Logits `float[L, V]` for `int32[L]` tokens (causal).

        **Arguments:**

        - `tokens`: `int32[L]`.

        **Returns:**

        `float[L, V]`: row `t` depends only on `tokens[:t+1]` and scores the
        token at `t + 1`.
        """

    @abc.abstractmethod
    def init_cache(self, capacity: int) -> PyTree[Array]:
        """An empty cache for positions `0 … capacity-1`.

        **Arguments:**

        - `capacity`: the number of positions the cache holds (static).

        **Returns:**

        The cache, a pytree of arrays.
        """

    @abc.abstractmethod
    def extend(
        self, tokens: Int[Array, " W"], start: Int[ArrayLike, ""], cache: PyTree[Array]
    ) -> tuple[Float[Array, "W V"], PyTree[Array]]:
        """Logits of `tokens` placed at `start …`, and the cache with their entries.

        **Arguments:**

        - `tokens`: `int32[W]` (`W` static); `tokens[i]` sits at position
          `start + i`.
        - `start`: the position of `tokens[0]`, an int32 scalar (traced).
        - `cache`: the cache, exact at positions `< start`.

        **Returns:**

        `(logits, cache)`: `float[W, V]`, row `i` equal to row `start + i` of
        `__call__` on a sequence that agrees with the cache before `start` and
        with `tokens` after; and the cache holding these `W` positions' entries.
        """
