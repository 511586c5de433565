import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fixpoint
from fixpoint import datasets, layers

VOCAB, MAX_LEN = 11, 24


def _tiny(dtype=jnp.float64, vocab=VOCAB, seed=0):
    return layers.CausalTransformer(
        vocab,
        max_len=MAX_LEN,
        d_model=32,
        num_heads=2,
        num_layers=2,
        key=jax.random.key(seed),
        dtype=dtype,
    )


@pytest.fixture(scope="module")
def model():
    return _tiny()


_call = eqx.filter_jit(lambda m, t: m(t))
_extend = eqx.filter_jit(lambda m, t, s, c: m.extend(t, s, c))


def _tokens(seed, n=MAX_LEN):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, n), jnp.int32)


def test_protocol_and_static_fields(model):
    assert isinstance(model, fixpoint.AbstractCachedModel)
    assert model.tok_emb.dtype == jnp.float64
    leaves = jax.tree.leaves(model)
    assert all(eqx.is_array(x) for x in leaves)  # sizes are static, not leaves
    keys, values = model.init_cache(MAX_LEN)
    assert keys.shape == values.shape == (2, MAX_LEN, 2, 16)
    assert keys.dtype == jnp.float64 and not keys.any()


def test_causal(model):
    tokens = _tokens(0)
    logits = _call(model, tokens)
    assert logits.shape == (MAX_LEN, VOCAB) and jnp.all(jnp.isfinite(logits))
    for t in (1, 7, 23):
        changed = tokens.at[t:].set((tokens[t:] + 3) % VOCAB)
        other = _call(model, changed)
        np.testing.assert_allclose(other[:t], logits[:t], rtol=0, atol=1e-12)
        assert not np.allclose(other[t], logits[t])


def test_extend_matches_call(model):
    tokens = _tokens(1)
    full = _call(model, tokens)
    cache = model.init_cache(MAX_LEN)
    garbage = (tokens + 5) % VOCAB
    # (start, width, source): the rollback writes the true tokens at 6 over stale 8 … 10.
    plan = [(0, 5, tokens), (5, 3, tokens), (8, 3, garbage), (6, 5, tokens), (11, 3, tokens)]
    plan += [(14, 5, tokens), (19, 5, tokens)]
    for start, width, source in plan:
        logits, cache = _extend(model, source[start : start + width], jnp.int32(start), cache)
        if source is tokens:
            np.testing.assert_allclose(logits, full[start : start + width], rtol=0, atol=1e-10)


def test_extend_vmap(model):
    batch = jnp.stack([_tokens(1), _tokens(2)])
    caches = jax.vmap(lambda _: model.init_cache(MAX_LEN))(jnp.arange(2))
    ext = eqx.filter_jit(jax.vmap(lambda t, s, c: model.extend(t, s, c), in_axes=(0, None, 0)))
    _, caches = ext(batch[:, :5], jnp.int32(0), caches)
    logits, _ = ext(batch[:, 5:10], jnp.int32(5), caches)
    full = jnp.stack([_call(model, t) for t in batch])
    np.testing.assert_allclose(logits, full[:, 5:10], rtol=0, atol=1e-10)


def test_float32():
    model = _tiny(jnp.float32)
    tokens = _tokens(3)
    full = _call(model, tokens)
    assert full.dtype == jnp.float32
    _, cache = _extend(model, tokens[:5], jnp.int32(0), model.init_cache(MAX_LEN))
    logits, cache = _extend(model, tokens[5:10], jnp.int32(5), cache)
    assert cache[0].dtype == jnp.float32
    np.testing.assert_allclose(logits, full[5:10], rtol=1e-4, atol=1e-5)


def test_errors(model):
    with pytest.raises(ValueError, match="`tokens`"):
        model(jnp.zeros(MAX_LEN + 1, jnp.int32))
    with pytest.raises(ValueError, match="`capacity"):
        model.init_cache(MAX_LEN + 1)
    with pytest.raises(ValueError, match="`d_model=30`.*`num_heads=4`"):
        layers.CausalTransformer(5, max_len=8, d_model=30, num_heads=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`num_layers`"):
        layers.CausalTransformer(5, max_len=8, num_layers=0, key=jax.random.key(0))


def test_stdlib_text_and_codec():
    train, val = datasets.stdlib_text(20_000)
    assert len(train) == len(val) == 20_000
    assert train.isascii() and val.isascii()
    assert val[:2000] not in train
    ids = datasets.encode(train)
    assert ids.dtype == np.int32 and ids.max() < datasets.ASCII_VOCAB
    assert datasets.decode_text(ids[:500]) == train[:500]
    assert datasets.encode("é").tolist() == [ord("?")]


def test_training_reduces_loss():
    ids = datasets.encode(datasets.stdlib_text(20_000)[0])
    model = _tiny(jnp.float32, vocab=datasets.ASCII_VOCAB)
    optim = optax.adamw(3e-3)
    state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state, batch):
        loss, grads = eqx.filter_value_and_grad(layers.lm_loss)(model, batch)
        # optax's bias correction mixes a Python float with an int32 step count.
        with jax.numpy_dtype_promotion("standard"):
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, state = optim.update(grads, state, params)
        return eqx.apply_updates(model, updates), state, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(30):
        batch = datasets.random_batches(ids, 16, MAX_LEN, rng)
        assert batch.shape == (16, MAX_LEN + 1) and batch.dtype == np.int32
        model, state, loss = step(model, state, jnp.asarray(batch))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.9 * losses[0], losses
    # A jax key works too.
    assert datasets.random_batches(ids, 2, 8, jax.random.key(0)).shape == (2, 9)


def test_serialise_roundtrip(model, tmp_path):
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, model)
    restored = eqx.tree_deserialise_leaves(path, _tiny(seed=1))
    tokens = _tokens(4)
    np.testing.assert_array_equal(_call(restored, tokens), _call(model, tokens))
