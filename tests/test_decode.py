"""`fixpoint.decode`: Jacobi decoding equals sequential greedy decoding."""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixpoint
from fixpoint import solvers

V, D = 11, 8


class Toy(fixpoint.AbstractCachedModel):
    """A small causal model with both protocols: logits_t = (E[x_t] + mean(E[x_{<=t}])) W.
    Its cache holds the embeddings of the positions seen."""

    emb: jax.Array
    w: jax.Array

    def __call__(self, tokens):
        e = self.emb[tokens]
        count = jnp.arange(1, tokens.shape[0] + 1).astype(e.dtype)
        return (e + jnp.cumsum(e, axis=0) / count[:, None]) @ self.w

    def init_cache(self, capacity):
        return jnp.zeros((capacity, D), self.emb.dtype)

    def extend(self, tokens, start, cache):
        e = self.emb[tokens]
        cache = jax.lax.dynamic_update_slice_in_dim(cache, e, start, 0)
        pos = start + jnp.arange(tokens.shape[0], dtype=start.dtype)
        mask = (jnp.arange(cache.shape[0], dtype=start.dtype)[None, :] <= pos[:, None]).astype(
            e.dtype
        )
        return (e + (mask @ cache) / (pos + 1).astype(e.dtype)[:, None]) @ self.w, cache


def _model(key, scale=3.0):
    k1, k2 = jax.random.split(key)
    return Toy(jax.random.normal(k1, (V, D)), scale * jax.random.normal(k2, (D, V)))


@pytest.fixture(scope="module")
def model():
    return _model(jax.random.key(0))


_COMPILED = {}


def _run(model, prompt, n, solver, eos_id=None, cached=True, **kw):
    # Compiled once per (model, n, solver, eos, protocol, options): the tests share them.
    key = (id(model), n, solver, eos_id, cached, tuple(sorted(kw)))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(
            lambda p, **kw: fixpoint.decode(
                model, p, n, solver=solver, eos_id=eos_id, cached=cached, return_solution=True, **kw
            )
        )
    return _COMPILED[key](prompt, **kw)


SEQ = solvers.SequentialDecoding()
SOLVERS = [
    solvers.JacobiDecoding(window=1),
    solvers.JacobiDecoding(window=2),
    solvers.JacobiDecoding(window=5),
    solvers.JacobiDecoding(window=16),
    solvers.JacobiDecoding(window=40),
    solvers.GSJacobiDecoding(block_size=3),
    solvers.HybridDecoding(block_size=4, parallel_tokens=10),
    solvers.LookaheadDecoding(window=6, ngram=3, guesses=2),
]
LOOKAHEAD = SOLVERS[-1]


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_parallel_equals_sequential(model, solver, cached):
    # One shape per solver (one compile each) and several prompts; one other shape
    # (a one-token prompt, a window longer than the output) for the widest window.
    shapes = [(3, 24)] * 4 + ([(1, 7)] if solver.max_window == 40 else [])
    for seed, (p, n) in enumerate(shapes):
        prompt = jax.random.randint(jax.random.key(seed), (p,), 0, V)
        want, ref = _run(model, prompt, n, SEQ, cached=False)
        got, sol = _run(model, prompt, n, solver, cached=cached)
        np.testing.assert_array_equal(got, want)
        assert int(ref.stats["model_calls"]) == n
        assert 1 <= int(sol.stats["model_calls"]) <= n
        assert bool(sol.result == fixpoint.RESULTS.successful)
        fixed = np.asarray(sol.stats["fixed_at"])
        assert np.all(np.diff(fixed) >= 0) and fixed.max() == int(sol.stats["model_calls"]) - 1
        rows = min(solver.max_window, n) if cached else p + n
        assert int(sol.stats["rows_per_call"]) == rows * (1 + solver.num_guesses)
        assert 0 <= int(sol.stats["guessed_tokens"]) <= n


def test_jacobi_saves_calls(model):
    # Not a speed claim (the model is a toy), but the method must do something:
    # across prompts, a wide window needs fewer calls than sequential decoding.
    calls = [
        int(
            _run(model, jax.random.randint(jax.random.key(s), (3,), 0, V), 24, SOLVERS[3])[1].stats[
                "model_calls"
            ]
        )
        for s in range(4)
    ]
    assert sum(calls) < 4 * 24


def _periodic(tokens):
    """A plain causal model whose next token repeats the token four back (period 4)."""
    back = jnp.concatenate([jnp.zeros(3, tokens.dtype), tokens[:-3]])
    return jax.nn.one_hot(back, V, dtype=jnp.float64)


def test_lookahead_guesses_from_the_prompt():
    # Jacobi accepts 4 tokens per call on this model (each call fixes the 4 whose
    # source is accepted). Once the pool holds the n-grams of the repeating text
    # (from the prompt and the first calls' window), the guess for the 7 positions
    # after the last accepted token is right, and a call accepts the whole window.
    prompt = jnp.array([1, 2, 3, 4, 1, 2, 3, 4], jnp.int32)
    n = 33
    want = np.tile([1, 2, 3, 4], 9)[:n]
    per_call = {}
    for solver in (
        solvers.JacobiDecoding(window=8),
        solvers.LookaheadDecoding(window=8, ngram=8, guesses=1),
    ):
        got, sol = fixpoint.decode(_periodic, prompt, n, solver=solver, return_solution=True)
        np.testing.assert_array_equal(got, want)
        per_call[solver.num_guesses] = np.bincount(np.asarray(sol.stats["fixed_at"]))
        assert (int(sol.stats["guessed_tokens"]) > 0) == bool(solver.num_guesses)
    assert per_call[0].max() == 4 and per_call[1][2:-1].tolist() == [8, 8, 8], per_call


def test_ngram_pool_by_hand():
    la = solvers.LookaheadDecoding(window=4, ngram=3, guesses=2)
    tokens = jnp.array([5, 1, 2, 5, 1, 2, 5, 3, 4, 5, 6, 7], jnp.int32)
    # From the first 9 tokens: key 5 -> (1, 2) once (deduplicated), then (3, 4).
    pool = la.init_state(tokens, jnp.int32(9), V)
    guesses, real = la.propose(pool, jnp.int32(5))
    assert real.tolist() == [True, True]
    assert sorted(map(tuple, np.asarray(guesses).tolist())) == [(1, 2), (3, 4)]
    assert not bool(la.propose(pool, jnp.int32(4))[1].any())  # "4" ends the prompt part
    # One more continuation of 5 replaces the one seen least recently, (1, 2).
    pool = la.observe(pool, tokens, jnp.int32(9), jnp.int32(12), 3)
    guesses, real = la.propose(pool, jnp.int32(5))
    assert sorted(map(tuple, np.asarray(guesses).tolist())) == [(3, 4), (6, 7)]
    # A continuation seen again is refreshed: after 2, 3, 2, 4 the key 1 keeps {2, 4}.
    la2 = solvers.LookaheadDecoding(window=4, ngram=2, guesses=2)
    pool = la2.init_state(jnp.array([1, 2, 1, 3, 1, 2, 1, 4], jnp.int32), jnp.int32(8), V)
    assert sorted(np.asarray(la2.propose(pool, jnp.int32(1))[0])[:, 0].tolist()) == [2, 4]
    with pytest.raises(ValueError, match="`ngram` must be an int >= 2"):
        solvers.LookaheadDecoding(window=4, ngram=1)


def test_greedy_reference_by_hand(model):
    prompt = jnp.array([3, 1, 4], jnp.int32)
    tokens = list(np.asarray(prompt))
    for _ in range(9):
        logits = model(jnp.array(tokens + [0] * (12 - len(tokens)), jnp.int32))
        tokens.append(int(jnp.argmax(logits[len(tokens) - 1])))
    for cached in (False, True):
        got = fixpoint.decode(
            model, prompt, 9, solver=solvers.JacobiDecoding(window=4), cached=cached
        )
        np.testing.assert_array_equal(got, tokens[3:])


def test_eos_inside_a_window(model):
    prompt = jnp.array([2, 5], jnp.int32)
    plain = np.asarray(_run(model, prompt, 30, SEQ, cached=False)[0])
    eos = int(plain[4])  # a token that appears early: decoding must stop there
    first = int(np.flatnonzero(plain == eos)[0])
    cases = [(SEQ, False), (solvers.JacobiDecoding(window=8), False), (SOLVERS[2], True)]
    for solver, cached in cases + [(LOOKAHEAD, True)]:
        got, sol = _run(model, prompt, 30, solver, eos_id=eos, cached=cached)
        want = np.where(np.arange(30) <= first, plain, eos)
        np.testing.assert_array_equal(got, want)
        assert int(sol.stats["model_calls"]) <= first + 1
        fixed = np.asarray(sol.stats["fixed_at"])
        assert np.all(fixed[first + 1 :] == -1) and np.all(fixed[: first + 1] >= 0)


def test_batched_rows_of_different_lengths(model):
    # One compiled loop for the batch; each row equals its own unbatched decoding.
    prompts = jax.random.randint(jax.random.key(9), (5, 6), 0, V)
    lengths = jnp.array([1, 6, 3, 2, 6], jnp.int32)
    for solver, cached in ((SOLVERS[2], False), (SOLVERS[2], True), (LOOKAHEAD, True)):
        tokens, sol = _run(model, prompts, 12, solver, cached=cached, prompt_lengths=lengths)
        assert tokens.shape == (5, 12)
        for b in range(5):
            one = fixpoint.decode(
                model, prompts[b, : int(lengths[b])], 12, solver=SEQ, cached=False
            )
            np.testing.assert_array_equal(tokens[b], one)
            assert 1 <= int(sol.stats["model_calls"][b]) <= 12


def test_vmap_rows_stop_on_their_own(model):
    prompts = jax.random.randint(jax.random.key(7), (5, 4), 0, V)
    solver = solvers.JacobiDecoding(window=6)
    batched = jax.vmap(lambda p: fixpoint.decode(model, p, 15, solver=solver, return_solution=True))
    tokens, sol = batched(prompts)
    for i in range(5):
        one, s1 = _run(model, prompts[i], 15, solver)
        np.testing.assert_array_equal(tokens[i], one)
        assert int(sol.stats["model_calls"][i]) == int(s1.stats["model_calls"])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_sampling_is_the_sequential_sample(model, temperature):
    # With a key, Jacobi decoding draws exactly the sample sequential decoding draws.
    prompt = jnp.array([4, 2, 7], jnp.int32)
    for seed in range(4):
        key = jax.random.key(seed)
        kw = dict(key=key, temperature=jnp.asarray(temperature))
        want, _ = _run(model, prompt, 20, SEQ, cached=False, **kw)
        for solver, cached in ((SOLVERS[2], False), (SOLVERS[3], True), (LOOKAHEAD, True)):
            got, _ = _run(model, prompt, 20, solver, cached=cached, **kw)
            np.testing.assert_array_equal(got, want)


def test_first_sampled_token_follows_softmax(model):
    prompt = jnp.array([1, 3], jnp.int32)
    temperature = 2.0
    keys = jax.random.split(jax.random.key(11), 4000)
    first = jax.jit(
        jax.vmap(
            lambda k: fixpoint.decode(
                model, prompt, 1, solver=SEQ, key=k, temperature=temperature, cached=False
            )[0]
        )
    )(keys)
    counts = np.bincount(np.asarray(first), minlength=V) / keys.shape[0]
    probs = np.asarray(jax.nn.softmax(model(jnp.array([1, 3, 0], jnp.int32))[1] / temperature))
    # Binomial standard error at n = 4000 is at most 0.008; allow 4.5 of them.
    np.testing.assert_allclose(counts, probs, atol=0.036)


def test_one_key_per_row(model):
    prompts = jax.random.randint(jax.random.key(2), (3, 4), 0, V)
    keys = jax.random.split(jax.random.key(5), 3)
    tokens = fixpoint.decode(model, prompts, 10, solver=SOLVERS[2], key=keys)
    for b in range(3):
        one = fixpoint.decode(model, prompts[b], 10, solver=SEQ, key=keys[b], cached=False)
        np.testing.assert_array_equal(tokens[b], one)


def test_first_divergence(model):
    prompt = jnp.array([2, 2, 9], jnp.int32)
    ref = np.asarray(fixpoint.decode(model, prompt, 12, solver=SEQ))
    assert fixpoint.first_disagreement(model, prompt, ref, ref).index == -1
    other = ref.copy()
    other[6:] = (ref[6:] + 1) % V
    d = fixpoint.first_disagreement(model, prompt, other, ref)
    row = np.asarray(model(jnp.asarray(np.concatenate([prompt, ref]), jnp.int32))[3 + 5])
    assert (d.index, d.token, d.reference_token) == (6, other[6], ref[6])
    np.testing.assert_allclose(d.margin, row[ref[6]] - row[other[6]])
    assert d.margin > 0  # the reference is the greedy choice: it wins by a real margin
    np.testing.assert_allclose(d.scale, np.abs(row).max())


def test_nonfinite_logits_are_reported():
    # One `throw` rule, as every entry point: raise by default (eagerly, and inside
    # `jit` as JAX's runtime error), or report the result code with `throw=False`.
    bad = lambda t: jnp.full((t.shape[0], V), jnp.nan)  # noqa: E731
    run = ft.partial(fixpoint.decode, bad, jnp.zeros(2, jnp.int32), 4)
    solver = solvers.JacobiDecoding(window=4)
    _, sol = run(solver=solver, return_solution=True, throw=False)
    assert bool(sol.result == fixpoint.RESULTS.nonfinite)
    with pytest.raises(fixpoint.SolveError, match="`decode` failed with result `nonfinite`"):
        run(solver=solver)
    with pytest.raises(Exception, match="`decode` failed with result `nonfinite`"):
        jax.block_until_ready(jax.jit(lambda: run(solver=solver))())


class _Biased(Toy):
    """`Toy` plus `bias[t]` (`float[L, V]`) on the row of absolute position `t`: a NaN
    or an inf poisons that row, a column of -inf bans a token."""

    bias: jax.Array

    def __call__(self, tokens):
        return super().__call__(tokens) + self.bias[: tokens.shape[0]]

    def extend(self, tokens, start, cache):
        logits, cache = super().extend(tokens, start, cache)
        return logits + jax.lax.dynamic_slice_in_dim(self.bias, start, tokens.shape[0]), cache


# The sequential reference on the plain path, then every decoding solver cached.
EVERY = [
    SEQ,
    solvers.JacobiDecoding(window=4),
    solvers.GSJacobiDecoding(block_size=3),
    solvers.HybridDecoding(block_size=2, parallel_tokens=4),
    solvers.LookaheadDecoding(window=4, ngram=3, guesses=2),
]
BIASED_CASES = [(SEQ, False)] + [(s, True) for s in EVERY]
P, N = 3, 8
PROMPT = jnp.array([4, 2, 7], jnp.int32)


@eqx.filter_jit
def _decode_biased(model, solver, cached, key, eos_id):
    # The bias is traced: one compile per (solver, protocol, keyed, eos) for every bias
    # (pass every argument, positionally, so that calls share them).
    return fixpoint.decode(
        model,
        PROMPT,
        N,
        solver=solver,
        cached=cached,
        key=key,
        temperature=3.0,
        eos_id=eos_id,
        return_solution=True,
        throw=False,
    )


def _biased(model, bias=None):
    bias = jnp.zeros((P + N, V), jnp.float64) if bias is None else bias
    return _Biased(model.emb, model.w, bias)


@pytest.mark.parametrize("keyed", [False, True], ids=["greedy", "keyed"])
def test_nonfinite_row_stops_every_solver_alike(model, keyed):
    # The row that scores new position 3 holds a NaN, a +inf, or no finite entry. Every
    # solver decodes the 3 tokens before it, and pads from position 3 on (`fill_id`,
    # `eos_id` when given) with `fixed_at` -1 and the same result and token count.
    key = jax.random.key(4) if keyed else None
    clean = _biased(model)
    want = np.asarray(_decode_biased(clean, SEQ, False, key, None)[0])
    row, column = P + 2, 5  # row P + 2 scores absolute position P + 3
    # An EOS that is neither decoded before position 3, nor `fill_id`, nor the column
    # argmax picks from a poisoned row.
    eos = min(set(range(1, V)) - set(want[:3].tolist()) - {column})
    poisons = [clean.bias.at[row, column].set(x) for x in (jnp.nan, jnp.inf)]
    biases = poisons + [clean.bias.at[row].set(-jnp.inf)]
    before = np.arange(N) < 3
    for bias in biases:
        poisoned = _biased(model, bias)
        with_eos = [] if keyed else [((SEQ, False), eos), ((EVERY[1], True), eos)]
        for (solver, cached), eos_id in [(c, None) for c in BIASED_CASES] + with_eos:
            tokens, sol = _decode_biased(poisoned, solver, cached, key, eos_id)
            pad = 0 if eos_id is None else eos_id
            np.testing.assert_array_equal(tokens, np.where(before, want, pad))
            assert bool(sol.result == fixpoint.RESULTS.nonfinite)
            np.testing.assert_array_equal(np.asarray(sol.stats["fixed_at"]) >= 0, before)
            decoded = float(sol.stats["tokens_per_call"]) * int(sol.stats["model_calls"])
            assert round(decoded) == 3, (solver, cached, decoded)


@pytest.mark.parametrize("keyed", [False, True], ids=["greedy", "keyed"])
def test_minus_inf_bans_a_token(model, keyed):
    # Constrained decoding: a -inf logit is never chosen, greedy or sampled, and
    # decoding goes on; every solver gives the sequential output.
    clean = _biased(model)
    keys = list(jax.random.split(jax.random.key(3), 3)) if keyed else [None]
    banned = int(_decode_biased(clean, SEQ, False, keys[0], None)[0][0])  # chosen when allowed
    masked = _biased(model, clean.bias.at[:, banned].set(-jnp.inf))
    for key in keys:
        want, ref = _decode_biased(masked, SEQ, False, key, None)
        assert bool(ref.result == fixpoint.RESULTS.successful)
        assert banned not in np.asarray(want).tolist()
        for solver, cached in BIASED_CASES:
            got, sol = _decode_biased(masked, solver, cached, key, None)
            np.testing.assert_array_equal(got, want)
            assert bool(sol.result == fixpoint.RESULTS.successful)
    if not keyed:  # the runner-up of the unmasked row
        row = np.asarray(model(jnp.concatenate([PROMPT, jnp.zeros(N, jnp.int32)]))[P - 1])
        assert int(want[0]) == int(np.argmax(np.where(np.arange(V) == banned, -np.inf, row)))
        # Consistency training of the masked model: banned tokens add nothing (not NaN).
        from fixpoint import layers

        assert float(layers.consistency_loss(masked, PROMPT, want, want)) == 0.0
        away, grads = eqx.filter_value_and_grad(layers.consistency_loss)(
            masked, PROMPT, jnp.zeros(N, jnp.int32), want
        )
        assert 0 < float(away) < np.inf and np.all(np.isfinite(grads.emb))


def test_first_divergence_scores_with_decodes_noise(model):
    # With a half-precision model, `first_disagreement` adds the noise `decode` sampled
    # with: the sampled token outscores every other token at its position.
    half = _as(model, jnp.bfloat16)
    keys = jax.random.split(jax.random.key(6), 4)
    sample = jax.jit(
        jax.vmap(
            lambda k: fixpoint.decode(
                half, PROMPT, 6, solver=SEQ, key=k, temperature=3.0, cached=False
            )
        )
    )
    for key, ref in zip(keys, np.asarray(sample(keys)), strict=True):
        for i in (0, 4):
            for token in sorted(set(range(V)) - {int(ref[i])}):
                other = ref.copy()
                other[i] = token
                d = fixpoint.first_disagreement(half, PROMPT, other, ref, key=key, temperature=3.0)
                assert d.index == i and d.margin > 0, (i, token, d)


class _BadCache(Toy):
    def extend(self, tokens, start, cache):
        logits, cache = super().extend(tokens, start, cache)
        return logits, cache[:-1]


def test_bad_inputs(model):
    j = solvers.JacobiDecoding(window=4)
    z = jnp.zeros(3, jnp.int32)
    with pytest.raises(TypeError, match="`prompt` must hold integer"):
        fixpoint.decode(model, jnp.zeros(3), 4, solver=j)
    with pytest.raises(ValueError, match="`max_new_tokens` must be (an int )?>= 1"):
        fixpoint.decode(model, z, 0, solver=j)
    with pytest.raises(ValueError, match="`window` must be an int >= 1"):
        solvers.JacobiDecoding(window=0)
    with pytest.raises(ValueError, match="`block_size` must be an int >= 1"):
        solvers.GSJacobiDecoding(block_size=0)
    with pytest.raises(ValueError, match="must map int32\\[7\\]"):
        fixpoint.decode(lambda t: jnp.zeros((t.shape[0],)), z, 4, solver=j)
    with pytest.raises(ValueError, match="must map int32\\[7\\]"):
        fixpoint.decode(lambda t: jnp.zeros((t.shape[0], V), jnp.int32), z, 4, solver=j)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fixpoint.decode(model, z, 4, solver=j, eos_id=V)
    with pytest.raises(TypeError, match="decoding solver"):
        fixpoint.decode(model, z, 4, solver=solvers.Jacobi())
    with pytest.raises(ValueError, match="`temperature` must be a number > 0"):
        fixpoint.decode(model, z, 4, solver=j, key=jax.random.key(0), temperature=0.0)
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        fixpoint.decode(model, z, 4, solver=j, key=jnp.zeros(3))
    with pytest.raises(ValueError, match="`prompt_lengths\\[1\\] = 4` is outside"):
        fixpoint.decode(model, jnp.zeros((2, 3), jnp.int32), 4, solver=j, prompt_lengths=[1, 4])
    with pytest.raises(ValueError, match="`prompt_lengths` needs a batched"):
        fixpoint.decode(model, z, 4, solver=j, prompt_lengths=[3])
    with pytest.raises(TypeError, match="`cached=True` needs a model"):
        fixpoint.decode(lambda t: model(t), z, 4, solver=j, cached=True)
    with pytest.raises(ValueError, match="`model.extend` must return a cache"):
        fixpoint.decode(_BadCache(model.emb, model.w), z, 4, solver=j)


@pytest.fixture(scope="module")
def transformer():
    from fixpoint import layers

    m = layers.CausalTransformer(
        V, max_len=40, d_model=32, num_heads=2, num_layers=2, key=jax.random.key(3)
    )
    # Sharpen the random model's logits so greedy choices are not near-uniform.
    return eqx.tree_at(lambda t: t.head, m, (40 * m.head[0], m.head[1]))


def _as(model, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


def test_transformer_cached_equals_plain_float64(transformer):
    # Same tokens from one-window cached calls and whole-sequence plain calls.
    model = _as(transformer, jnp.float64)
    prompts = jax.random.randint(jax.random.key(4), (6, 5), 0, V)
    lengths = jnp.array([5, 1, 3, 5, 2, 4], jnp.int32)
    kw = dict(prompt_lengths=lengths, return_solution=True)
    want, _ = fixpoint.decode(model, prompts, 24, solver=SEQ, cached=False, **kw)
    for solver in (SEQ, solvers.JacobiDecoding(window=6), solvers.GSJacobiDecoding(block_size=4)):
        got, sol = fixpoint.decode(model, prompts, 24, solver=solver, cached=True, **kw)
        np.testing.assert_array_equal(got, want)
        assert np.all(np.asarray(sol.stats["model_calls"]) <= 24)


def test_too_long_for_the_model(transformer):
    from fixpoint import layers

    # Checked by `decode` against the model's `max_len`, in the caller's terms.
    msg = r"`prompt` length 3 \+ `max_new_tokens` 38 = 41 exceeds the model's `max_len` 40"
    with pytest.raises(ValueError, match=msg):
        fixpoint.decode(transformer, jnp.zeros(3, jnp.int32), 38, solver=SEQ)
    with pytest.raises(ValueError, match=msg):
        layers.jacobi_trajectories(transformer, jnp.zeros((2, 3), jnp.int32), 38)


def test_float32_divergences_are_ties(transformer):
    # Between call shapes float32 sums differ in the last bits: one-token cached
    # calls (sequential), window calls (Jacobi) and whole-sequence plain calls.
    # Any divergence must be a near-tie, which the float64 model (exact to ~1e-15)
    # confirms. Token 1's logit is made token 10's times (1 + 1e-7), a tie at
    # float32 rounding level, so divergences do occur (on this CPU, in about a
    # third of the rows between one-token and window calls).
    w = transformer.head[0]
    tied = eqx.tree_at(
        lambda t: t.head, transformer, (w.at[:, 1].set(w[:, 10] * (1 + 1e-7)), transformer.head[1])
    )
    model32, model64 = _as(tied, jnp.float32), _as(tied, jnp.float64)
    prompts = jax.random.randint(jax.random.key(8), (64, 5), 0, V)
    runs = [
        fixpoint.decode(model32, prompts, 30, solver=SEQ, cached=False),
        fixpoint.decode(model32, prompts, 30, solver=SEQ, cached=True),
        fixpoint.decode(model32, prompts, 30, solver=solvers.JacobiDecoding(window=8), cached=True),
    ]
    runs = [np.asarray(r) for r in runs]
    for a, b in ((0, 1), (1, 2), (0, 2)):
        # Only rows that differ have a divergence to judge (equal rows: index -1).
        for i in np.flatnonzero(np.any(runs[a] != runs[b], axis=1)):
            d = fixpoint.first_disagreement(model64, prompts[i], runs[b][i], runs[a][i])
            assert d.index >= 0, (a, b, i)
            assert abs(d.margin) <= 1e-5 * d.scale, (a, b, i, d)


def test_reviewed_edge_cases(model):
    j = solvers.JacobiDecoding(window=4)
    # A NaN row after the accepted EOS is never used: not a failure.
    eos = 5
    f = lambda t: jnp.where(  # noqa: E731
        (t == eos)[:, None], jnp.nan, jax.nn.one_hot((t + 1) % V, V, dtype=jnp.float64)
    )
    for solver in (SEQ, j):
        tokens, sol = fixpoint.decode(
            f,
            jnp.array([4], jnp.int32),
            4,
            solver=solver,
            eos_id=eos,
            fill_id=eos,
            return_solution=True,
        )
        assert bool(sol.result == fixpoint.RESULTS.successful)
        np.testing.assert_array_equal(tokens, [5, 5, 5, 5])
    # NumPy integers as arguments.
    got = fixpoint.decode(
        model, jnp.array([1, 2], jnp.int32), np.int64(6), solver=j, eos_id=np.int64(3)
    )
    assert got.dtype == jnp.int32
    # Past a non-finite stop, every solver returns `fill_id`.
    g = lambda t: jnp.where(  # noqa: E731
        (jnp.arange(t.shape[0]) >= 3)[:, None],
        jnp.nan,
        jax.nn.one_hot((t + 1) % V, V, dtype=jnp.float64),
    )
    outs = [
        fixpoint.decode(
            g, jnp.array([2], jnp.int32), 5, solver=s, return_solution=True, throw=False
        )
        for s in (SEQ, solvers.JacobiDecoding(window=5))
    ]
    for _, sol in outs:
        assert bool(sol.result == fixpoint.RESULTS.nonfinite)
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    # Tiny temperatures with half-precision logits still sample the argmax.
    half = lambda t: model(t).astype(jnp.float16)  # noqa: E731
    greedy = fixpoint.decode(half, jnp.array([3, 1], jnp.int32), 8, solver=SEQ)
    hot = fixpoint.decode(
        half, jnp.array([3, 1], jnp.int32), 8, solver=j, key=jax.random.key(0), temperature=1e-4
    )
    np.testing.assert_array_equal(hot, greedy)
    with pytest.raises(ValueError, match=r"`prompt\[1\] = 11` is not a token id"):
        fixpoint.decode(model, jnp.array([1, V], jnp.int32), 4, solver=j)
    with pytest.raises(TypeError, match="`fill_id` must be an int"):
        fixpoint.decode(model, jnp.array([1], jnp.int32), 4, solver=j, fill_id=None)
    with pytest.raises(ValueError, match="`temperature` must be a number > 0"):
        fixpoint.decode(
            model, jnp.array([1], jnp.int32), 4, solver=j, key=jax.random.key(0), temperature=1j
        )
    assert solvers.JacobiDecoding(window=np.int64(3)).window == 3


def test_trajectory_and_consistency_losses(model):
    from fixpoint import layers

    prompts = jax.random.randint(jax.random.key(12), (3, 4), 0, V).astype(jnp.int32)
    n = 10
    fixed, states, windows, calls = layers.jacobi_trajectories(model, prompts, n)
    want = fixpoint.decode(model, prompts, n, solver=SEQ, cached=False)
    np.testing.assert_array_equal(fixed, want)
    assert states.shape == (3, n, n) and windows.shape == (3, n, n)
    for b in range(3):
        c = int(calls[b])
        assert np.all(np.asarray(states[b, 0]) == 0)  # fill_id
        np.testing.assert_array_equal(states[b, c:], np.broadcast_to(want[b], (n - c, n)))
        assert not np.asarray(windows[b, c:]).any()
        # Each state is the Jacobi update of the one before, on the positions judged.
        for i in range(c - 1):
            seq = jnp.concatenate([prompts[b], states[b, i]])
            pred = np.asarray(jnp.argmax(model(seq)[3 : 3 + n], axis=-1))
            win = np.asarray(windows[b, i])
            np.testing.assert_array_equal(np.asarray(states[b, i + 1])[win], pred[win])
    # A sliding window records the window each call judged.
    _, _, win16, _ = layers.jacobi_trajectories(
        model, prompts, n, solver=solvers.JacobiDecoding(window=3), cached=True
    )
    assert np.asarray(win16).sum(-1).max() == 3
    # The consistency loss is zero at the fixed point and not elsewhere.
    at_fixed = layers.consistency_loss(model, prompts, fixed, fixed)
    assert abs(float(at_fixed)) < 1e-12
    away, grads = eqx.filter_value_and_grad(layers.consistency_loss)(
        model, prompts, states[:, 0], fixed, windows[:, 0]
    )
    assert float(away) > 1e-3 and float(jnp.abs(grads.emb).max()) > 0
    # The AR loss is the cross entropy of the target after the prompt.
    logp = jax.nn.log_softmax(model(jnp.concatenate([prompts[0], fixed[0]])), axis=-1)
    ce = -np.mean([float(logp[3 + i, fixed[0, i]]) for i in range(n)])
    np.testing.assert_allclose(float(layers.ar_loss(model, prompts[0], fixed[0])), ce, rtol=1e-10)
    with pytest.raises(ValueError, match="needs `return_solution=True`"):
        fixpoint.decode(model, prompts, n, solver=SEQ, record_trajectory=True)
