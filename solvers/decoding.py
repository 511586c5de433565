"""Decoding solvers for `fixpoint.decode`: sequential, Jacobi, GS-Jacobi, hybrid.

Santilli et al. 2023, "Accelerating Transformer Inference for Translation via
Parallel Decoding": greedy decoding is a triangular system of equations over
positions; Jacobi iteration solves every position of a window at once and
reaches the greedy output exactly, in at most as many model calls. The solvers
differ only in the window each iteration proposes (`window_at`); the loop,
the acceptance rule and therefore the output are the same for all.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np

import fixpoint


def _as_int(value):
    return int(value) if isinstance(value, np.integer) else value


def _positive(cls, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls}: `{name}` must be an int >= 1, got {value!r}.")


class SequentialDecoding(fixpoint.AbstractDecodingSolver):
    """One token per model call: ordinary autoregressive decoding, the reference."""

    @property
    def max_window(self) -> int:
        return 1


class JacobiDecoding(fixpoint.AbstractDecodingSolver):
    """Jacobi decoding (Santilli et al. 2023): `window` positions per model call.

    Every call re-predicts the `window` positions after the accepted prefix from
    the current guesses; the first is always exact, and each further one is
    exact when every guess before it was confirmed. The window slides with the
    accepted prefix. `window ≥ max_new_tokens` is the paper's plain Jacobi over
    the whole output.

    **Arguments:** `window` (≥ 1), the number of positions proposed per call.
    """

    window: int = eqx.field(default=16, converter=_as_int)

    def __check_init__(self):
        _positive("JacobiDecoding", "window", self.window)

    @property
    def max_window(self) -> int:
        return self.window


class GSJacobiDecoding(fixpoint.AbstractDecodingSolver):
    """Gauss–Seidel–Jacobi decoding (Santilli et al. 2023): the output is cut into
    consecutive blocks of `block_size` positions, solved one after another;
    inside the current block, Jacobi iteration. Unlike `JacobiDecoding`, the
    window never reaches past the end of the current block, so guesses there
    start only once the block before is fixed.

    (Not the scan solvers' `GaussSeidel(block=...)`, which sweeps a recurrence.)

    **Arguments:** `block_size` (≥ 1).
    """

    block_size: int = eqx.field(default=4, converter=_as_int)

    def __check_init__(self):
        _positive("GSJacobiDecoding", "block_size", self.block_size)

    @property
    def max_window(self) -> int:
        return self.block_size

    def window_at(self, accepted):
        return (self.block_size - accepted % self.block_size).astype(jnp.int32)


class HybridDecoding(fixpoint.AbstractDecodingSolver):
    """Hybrid GS-Jacobi decoding (Santilli et al. 2023): GS-Jacobi blocks of
    `block_size` over the first `parallel_tokens` new positions, then one token
    per call. The paper uses it when the output length is unknown: parallel
    guesses past the (unknown) end are wasted work, so it goes autoregressive
    after a guessed length.

    **Arguments:** `block_size` (≥ 1); `parallel_tokens` (≥ 1), the number of
    leading positions decoded in blocks.
    """

    block_size: int = eqx.field(default=4, converter=_as_int)
    parallel_tokens: int = eqx.field(default=32, converter=_as_int)

    def __check_init__(self):
        _positive("HybridDecoding", "block_size", self.block_size)
        _positive("HybridDecoding", "parallel_tokens", self.parallel_tokens)

    @property
    def max_window(self) -> int:
        return self.block_size

    def window_at(self, accepted):
        in_block = self.block_size - accepted % self.block_size
        parallel = jnp.minimum(in_block, self.parallel_tokens - accepted)
        return jnp.where(accepted < self.parallel_tokens, parallel, 1).astype(jnp.int32)
