"""Group word problems: state tracking with exact labels, generated here.

A sequence of group elements `g_1 … g_T` is labelled at every position with the
running product `g_t ⋯ g_2 g_1` (the newest element applied last). For an abelian
group (parity, `Z_n`) the label is a function of the counts of each element; for a
non-abelian one (`S3`, `A4`, `A5`, `S5`) it depends on the order, and a diagonal
linear recurrence cannot track it (Merrill, Petty & Sabharwal, *The Illusion of
State in State-Space Models*, ICML 2024; Grazzi et al., *Unlocking State-Tracking in
Linear RNNs Through Negative Eigenvalues*, ICLR 2025).
"""

import itertools
from functools import cache

import numpy as np
from jaxtyping import Int

GROUPS = ("parity", "Z3", "Z5", "S3", "A4", "A5", "S5")
"""The groups `word_problem` knows: `parity` (`Z2`), the cyclic `Z3` and `Z5`, the
symmetric `S3` and `S5` and the alternating `A4` and `A5`, all as permutation
groups (orders 2, 3, 5, 6, 12, 60, 120)."""


def _sign(p: tuple[int, ...]) -> int:
    inversions = sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p)))
    return -1 if inversions % 2 else 1


@cache
def _elements(group: str) -> tuple[tuple[int, ...], ...]:
    if group == "parity":
        return ((0, 1), (1, 0))
    if group in ("Z3", "Z5"):
        n = int(group[1])
        return tuple(tuple((i + k) % n for i in range(n)) for k in range(n))
    n = int(group[1])
    perms = tuple(itertools.permutations(range(n)))  # the identity first
    return perms if group[0] == "S" else tuple(p for p in perms if _sign(p) == 1)


def _check_group(group: str, owner: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"{owner}: `group` must be one of {', '.join(GROUPS)}, got {group!r}.")


def multiplication_table(group: str) -> Int[np.ndarray, "n n"]:
    """The group's multiplication table: `table[a, b]` is the index of `a · b`.

    Elements are permutations, indexed as in `itertools.permutations` (index 0
    is the identity); `a · b` applies `b` first, then `a`.

    **Arguments:**

    - `group`: one of `GROUPS`.

    **Returns:**

    `int32[n, n]` with `n` the order of the group.
    """
    _check_group(group, "multiplication_table")
    elements = _elements(group)
    index = {p: i for i, p in enumerate(elements)}
    table = np.empty((len(elements), len(elements)), np.int32)
    for (i, a), (j, b) in itertools.product(enumerate(elements), repeat=2):
        table[i, j] = index[tuple(a[b[k]] for k in range(len(b)))]
    return table


def word_problem(
    group: str, num: int, length: int, *, seed: int | np.random.Generator = 0
) -> tuple[Int[np.ndarray, "num length"], Int[np.ndarray, "num length"]]:
    """Random words in a group and their running products.

    `tokens[i, t]` is uniform over the group's elements; `labels[i, t]` is the
    index of the product `tokens[i, t] · … · tokens[i, 0]` (the newest element
    applied last), so predicting `labels[i, t]` needs the whole prefix in order.

    **Arguments:**

    - `group`: one of `GROUPS`.
    - `num`: the number of words.
    - `length`: the length of each word.

    Keyword-only:

    - `seed`: an integer seed or a `numpy.random.Generator` (default `0`).

    **Returns:**

    `(tokens, labels)`, both NumPy `int32[num, length]` with values in
    `[0, order)`.
    """
    _check_group(group, "word_problem")
    table = multiplication_table(group)
    for name, value in (("num", num), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"word_problem: `{name}` must be an int >= 1, got {value!r}.")
    if isinstance(seed, np.random.Generator):
        rng = seed
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        rng = np.random.default_rng(int(seed))
    else:
        raise TypeError(
            f"word_problem: `seed` must be an int >= 0 or a numpy.random.Generator, got {seed!r}."
        )
    tokens = rng.integers(0, table.shape[0], size=(num, length)).astype(np.int32)
    labels = np.empty_like(tokens)
    state = np.zeros(num, np.int32)  # the identity
    for t in range(length):
        state = table[tokens[:, t], state]
        labels[:, t] = state
    return tokens, labels
