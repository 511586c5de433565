"""Offline text for the language-model demos: the Python standard library's own
sources, as ASCII codes, and random training windows."""

import glob
import os

import jax
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Int, PRNGKeyArray

ASCII_VOCAB = 128
"""The vocabulary size of `encode` and `decode_text`: the ASCII codes `0 … 127`."""


def stdlib_text(max_chars: int | None = None) -> tuple[str, str]:
    """Training text that ships with Python: its standard library's own sources.

    Reads the top-level `*.py` files of the directory of `os.__file__` (sorted by
    name), maps every non-ASCII character to `?`, and splits by file: every 10th
    file goes to validation. Nothing is downloaded.

    **Arguments:**

    - `max_chars`: truncate each text to this many characters (default: no limit).

    **Returns:**

    `(train_text, val_text)`, two ASCII strings.

    **Raises:**

    `FileNotFoundError` when no standard-library sources are on disk.
    """
    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    if not paths:
        raise FileNotFoundError("stdlib_text: no standard-library `.py` sources found on disk.")
    parts = ([], [])
    sizes = [0, 0]
    for i, path in enumerate(paths):
        split = int(i % 10 == 9)
        if max_chars is not None and sizes[split] >= max_chars:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().encode("ascii", errors="replace").decode("ascii")
        parts[split].append(text)
        sizes[split] += len(text)
    train, val = ("".join(p) for p in parts)
    return (train, val) if max_chars is None else (train[:max_chars], val[:max_chars])


def encode(text: str) -> Int[np.ndarray, " N"]:
    """ASCII codes `int32[len(text)]` (non-ASCII characters become `?`), vocab `ASCII_VOCAB`.

    **Arguments:**

    - `text`: a string.

    **Returns:**

    A NumPy `int32[len(text)]` array (one code per character).
    """
    return np.frombuffer(text.encode("ascii", errors="replace"), np.uint8).astype(np.int32)


def decode_text(ids: Int[ArrayLike, " N"]) -> str:
    """The text of ASCII codes `ids` (ids outside `0 … 127` become `?`).

    **Arguments:**

    - `ids`: `int[N]` token ids (a NumPy or JAX array, or a list).

    **Returns:**

    The string of `N` characters.
    """
    return "".join(chr(i) if 0 <= i < ASCII_VOCAB else "?" for i in np.asarray(ids).tolist())


def random_batches(
    ids: Int[ArrayLike, " N"],
    batch_size: int,
    seq_len: int,
    key: PRNGKeyArray | np.random.Generator,
) -> Int[np.ndarray, "batch_size seq_len+1"]:
    """A batch of `batch_size` random windows of `seq_len + 1` consecutive ids.

    Window starts are drawn uniformly with replacement (windows may overlap).

    **Arguments:**

    - `ids`: `int[N]`, `N > seq_len`, e.g. `encode(stdlib_text()[0])`.
    - `batch_size`: the number of windows.
    - `seq_len`: each window holds `seq_len + 1` ids (inputs and shifted targets).
    - `key`: a `jax.random` key or a `numpy.random.Generator`.

    **Returns:**

    A NumPy `int32[batch_size, seq_len + 1]` array.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] <= seq_len:
        raise ValueError(f"random_batches: `ids` must be int[N] with N > seq_len={seq_len}.")
    high = ids.shape[0] - seq_len
    if isinstance(key, np.random.Generator):
        starts = key.integers(0, high, size=batch_size)
    else:
        starts = np.asarray(jax.random.randint(key, (batch_size,), 0, high))
    return ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
