"""Decoding solvers for `fixpoint.decode`: sequential and Jacobi.

Santilli et al. 2023, "Accelerating Transformer Inference for Translation via
Parallel Decoding": greedy decoding is a triangular system of equations over
positions; Jacobi iteration solves every position of a window at once and
reaches the greedy output exactly, in at most as many model calls.
"""

import fixpoint


class SequentialDecoding(fixpoint.AbstractDecodingSolver):
    """One token per model call: ordinary greedy decoding, the reference."""

    @property
    def max_window(self) -> int:
        return 1


class JacobiDecoding(fixpoint.AbstractDecodingSolver):
    """Jacobi decoding (Santilli et al. 2023): `window` positions per model call.

    Every call re-predicts the `window` positions after the accepted prefix from
    the current guesses; the first is always exact, and each further one is
    exact when every guess before it was confirmed. Output is token for token
    that of `SequentialDecoding` with the same model (same call shape).

    **Arguments:** `window` (≥ 1), the number of positions proposed per call.
    """

    window: int = 16

    def __check_init__(self):
        w = self.window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"JacobiDecoding: `window` must be an int >= 1, got {w!r}.")

    @property
    def max_window(self) -> int:
        return self.window
