"""`CausalTransformer`: a small GPT-style model with a key/value cache, and char-level data."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike, DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

import fixpoint

_HI = jax.lax.Precision.HIGHEST


def _check_size(value, name: str):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"CausalTransformer: `{name}` must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"CausalTransformer: `{name}` must be >= 1, got {value}.")


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * weight + bias


def _dense(x, weight, bias):
    return jnp.einsum("...i,io->...o", x, weight, precision=_HI) + bias


class _Block(eqx.Module):
    """One pre-norm block: causal self-attention then a GELU MLP, each residual."""

    ln1: tuple[Array, Array]
    qkv: tuple[Array, Array]
    out: tuple[Array, Array]
    ln2: tuple[Array, Array]
    fc: tuple[Array, Array]
    proj: tuple[Array, Array]

    def __init__(
        self, d: int, hidden: int, num_layers: int, key: PRNGKeyArray, dtype: DTypeLike | None
    ):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        std, res_std = 0.02, 0.02 / math.sqrt(2 * num_layers)
        dense = lambda k, i, o, s: (s * jax.random.normal(k, (i, o), dtype), jnp.zeros(o, dtype))
        norm = lambda: (jnp.ones(d, dtype), jnp.zeros(d, dtype))
        self.ln1, self.ln2 = norm(), norm()
        self.qkv, self.out = dense(k1, d, 3 * d, std), dense(k2, d, d, res_std)
        self.fc, self.proj = dense(k3, d, hidden, std), dense(k4, hidden, d, res_std)

    def __call__(self, x, keys, values, start, num_heads: int):
        """`x: [W, d]` at positions `start …`; `keys`, `values`: this layer's cache
        `[C, H, Dh]`. Returns the block's output and the updated cache."""
        w, d = x.shape
        q, k, v = jnp.split(_dense(_layer_norm(x, *self.ln1), *self.qkv), 3, axis=-1)
        q, k, v = (a.reshape(w, num_heads, d // num_heads) for a in (q, k, v))
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k, start, axis=0)
        values = jax.lax.dynamic_update_slice_in_dim(values, v, start, axis=0)
        scores = jnp.einsum("whd,chd->hwc", q, keys, precision=_HI) / math.sqrt(d // num_heads)
        query_pos = start + jnp.arange(w, dtype=jnp.int32)
        mask = jnp.arange(keys.shape[0], dtype=jnp.int32)[None, :] <= query_pos[:, None]
        probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        attn = jnp.einsum("hwc,chd->whd", probs, values, precision=_HI).reshape(w, d)
        x = x + _dense(attn, *self.out)
        h = jax.nn.gelu(_dense(_layer_norm(x, *self.ln2), *self.fc))
        return x + _dense(h, *self.proj), keys, values


class CausalTransformer(fixpoint.AbstractCachedModel):
    """A GPT-style causal transformer over token ids, with a key/value cache.

    Pre-norm blocks (LayerNorm → causal multi-head self-attention → residual;
    LayerNorm → GELU MLP → residual), learned token and absolute position
    embeddings, a final LayerNorm and an untied output head. Implements
    `fixpoint.AbstractCachedModel`: `model(tokens)` is the full causal pass, and
    `model.extend(tokens, start, cache)` scores a block of tokens at positions
    `start …` against the cache. The cache is a pair `(keys, values)`, each of
    shape `(num_layers, capacity, num_heads, d_model // num_heads)`.

    **Arguments:**

    - `vocab_size`: the number of token ids (and of logits per position).
    - `max_len`: the number of positions (the longest sequence it accepts).
    - `d_model`: the width of the residual stream.
    - `num_heads`: attention heads; must divide `d_model`.
    - `num_layers`: the number of blocks.
    - `mlp_ratio`: the MLP's hidden width is `mlp_ratio * d_model`.
    - `key`: a `jax.random` key for the initial weights (normal, std 0.02; the
      output projections of the residual branches scaled by `1/sqrt(2 num_layers)`).
    - `dtype`: the parameters' dtype (default `float32`); computations run in it.

    Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser & Polosukhin,
    *Attention Is All You Need*, NeurIPS 2017.
    """

    tok_emb: Float[Array, "vocab d"]
    pos_emb: Float[Array, "max_len d"]
    blocks: list[_Block]
    ln_f: tuple[Array, Array]
    head: tuple[Array, Array]
    vocab_size: int = eqx.field(static=True)
    max_len: int = eqx.field(static=True)
    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    num_layers: int = eqx.field(static=True)
    mlp_ratio: int = eqx.field(static=True)

    def __init__(
        self,
        vocab_size: int,
        *,
        max_len: int,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        mlp_ratio: int = 4,
        key: PRNGKeyArray,
        dtype: DTypeLike | None = None,
    ):
        sizes = dict(vocab_size=vocab_size, max_len=max_len, d_model=d_model)
        sizes.update(num_heads=num_heads, num_layers=num_layers, mlp_ratio=mlp_ratio)
        for name, value in sizes.items():
            _check_size(value, name)
        if d_model % num_heads != 0:
            raise ValueError(
                f"CausalTransformer: `d_model={d_model}` must be divisible by "
                f"`num_heads={num_heads}`."
            )
        dtype = jnp.float32 if dtype is None else dtype
        k_tok, k_pos, k_head, *k_blocks = jax.random.split(key, 3 + num_layers)
        self.tok_emb = 0.02 * jax.random.normal(k_tok, (vocab_size, d_model), dtype)
        self.pos_emb = 0.02 * jax.random.normal(k_pos, (max_len, d_model), dtype)
        hidden = mlp_ratio * d_model
        self.blocks = [_Block(d_model, hidden, num_layers, k, dtype) for k in k_blocks]
        self.ln_f = (jnp.ones(d_model, dtype), jnp.zeros(d_model, dtype))
        w_head = 0.02 * jax.random.normal(k_head, (d_model, vocab_size), dtype)
        self.head = (w_head, jnp.zeros(vocab_size, dtype))
        self.vocab_size, self.max_len, self.d_model = vocab_size, max_len, d_model
        self.num_heads, self.num_layers, self.mlp_ratio = num_heads, num_layers, mlp_ratio

    def _tokens(self, tokens) -> Int[Array, " L"]:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"CausalTransformer: `tokens` must be int[L] (use `jax.vmap` for a batch), "
                f"got {tokens.dtype}{list(tokens.shape)}."
            )
        if tokens.shape[0] > self.max_len:
            raise ValueError(
                f"CausalTransformer: `tokens` has length {tokens.shape[0]}, more than "
                f"`max_len={self.max_len}`."
            )
        return tokens.astype(jnp.int32)

    def __call__(self, tokens: Int[Array, " L"]) -> Float[Array, "L V"]:
        """The logits `float[L, vocab_size]` of the full causal pass, `L <= max_len`."""
        tokens = self._tokens(tokens)
        return self.extend(tokens, 0, self.init_cache(max(tokens.shape[0], 1)))[0]

    def init_cache(
        self, capacity: int
    ) -> tuple[Float[Array, "layers C H Dh"], Float[Array, "layers C H Dh"]]:
        """Zero `(keys, values)`, each `[num_layers, capacity, num_heads, head_dim]`."""
        _check_size(capacity, "capacity")
        if capacity > self.max_len:
            raise ValueError(
                f"CausalTransformer: `capacity={capacity}` exceeds `max_len={self.max_len}`."
            )
        shape = (self.num_layers, capacity, self.num_heads, self.d_model // self.num_heads)
        return jnp.zeros(shape, self.tok_emb.dtype), jnp.zeros(shape, self.tok_emb.dtype)

    def extend(
        self,
        tokens: Int[Array, " W"],
        start: Int[ArrayLike, ""],
        cache: tuple[Float[Array, "layers C H Dh"], Float[Array, "layers C H Dh"]],
    ) -> tuple[
        Float[Array, "W V"], tuple[Float[Array, "layers C H Dh"], Float[Array, "layers C H Dh"]]
    ]:
        """Logits `float[W, V]` of `tokens` at positions `start … start+W-1`, and the
        cache with their keys and values written in. Needs `start + W <= capacity`
        (`start` is traced; out-of-range starts are clamped by XLA, not checked)."""
        tokens = self._tokens(tokens)
        keys, values = cache
        if tokens.shape[0] > keys.shape[1]:
            raise ValueError(
                f"CausalTransformer: `tokens` has length {tokens.shape[0]}, more than the "
                f"cache's capacity {keys.shape[1]}."
            )
        start = jnp.asarray(start).astype(jnp.int32)
        pos = jax.lax.dynamic_slice_in_dim(self.pos_emb, start, tokens.shape[0], axis=0)
        x = self.tok_emb[tokens] + pos
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, keys[i], values[i], start, self.num_heads)
            new_keys.append(k)
            new_values.append(v)
        logits = _dense(_layer_norm(x, *self.ln_f), *self.head)
        return logits, (jnp.stack(new_keys), jnp.stack(new_values))


def lm_loss(
    model: Callable[[Int[Array, " L"]], Float[Array, "L V"]], batch: Int[Array, "B L+1"]
) -> Float[Array, ""]:
    """Mean next-token cross entropy of `model` on `batch` (inputs `batch[:, :-1]`,
    targets `batch[:, 1:]`).

    **Arguments:**

    - `model`: `model(tokens) -> logits`, mapping `int[L]` to `float[L, V]`
      (mapped over the batch with `jax.vmap`).
    - `batch`: `int[B, L + 1]` token ids.

    **Returns:**

    The cross entropy averaged over every position of every row, a scalar.
    """
    logits = jax.vmap(model)(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
