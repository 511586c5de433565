"""`fixpoint.decode`: Jacobi decoding equals sequential greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixpoint
import solvers

V, D = 11, 8


def _model(key, scale=3.0):
    """A small causal model: logits_t = (E[x_t] + mean(E[x_{<=t}])) W."""
    k1, k2 = jax.random.split(key)
    emb = jax.random.normal(k1, (V, D))
    w = scale * jax.random.normal(k2, (D, V))

    def model(tokens):
        e = emb[tokens]
        mean = jnp.cumsum(e, axis=0) / jnp.arange(1.0, tokens.shape[0] + 1)[:, None]
        return (e + mean) @ w

    return model


@pytest.fixture(scope="module")
def model():
    return _model(jax.random.key(0))


_COMPILED = {}


def _run(model, prompt, n, solver, eos_id=None):
    # Compiled once per (model, n, solver, eos): the tests share them.
    key = (id(model), n, solver, eos_id)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(
            lambda p: fixpoint.decode(
                model, p, n, solver=solver, eos_id=eos_id, return_solution=True
            )
        )
    return _COMPILED[key](prompt)


@pytest.mark.parametrize("window", [1, 2, 5, 16, 40])
def test_jacobi_equals_sequential(model, window):
    # One shape per window (one compile each) and several prompts; one other
    # shape (a one-token prompt, a window longer than the output) for window 40.
    shapes = [(3, 24)] * 4 + ([(1, 7)] if window == 40 else [])
    seq = solvers.SequentialDecoding()
    for seed, (p, n) in enumerate(shapes):
        prompt = jax.random.randint(jax.random.key(seed), (p,), 0, V)
        want, ref = _run(model, prompt, n, seq)
        got, sol = _run(model, prompt, n, solvers.JacobiDecoding(window))
        np.testing.assert_array_equal(got, want)
        assert int(ref.stats["model_calls"]) == n
        assert 1 <= int(sol.stats["model_calls"]) <= n
        assert bool(sol.result == fixpoint.RESULTS.successful)
        fixed = np.asarray(sol.stats["fixed_at"])
        assert np.all(np.diff(fixed) >= 0) and fixed.max() == int(sol.stats["model_calls"]) - 1


def test_greedy_reference_by_hand(model):
    prompt = jnp.array([3, 1, 4], jnp.int32)
    tokens = list(np.asarray(prompt))
    for _ in range(9):
        logits = model(jnp.array(tokens + [0] * (12 - len(tokens)), jnp.int32))
        tokens.append(int(jnp.argmax(logits[len(tokens) - 1])))
    got = fixpoint.decode(model, prompt, 9, solver=solvers.JacobiDecoding(4))
    np.testing.assert_array_equal(got, tokens[3:])


def test_eos_inside_a_window(model):
    prompt = jnp.array([2, 5], jnp.int32)
    plain = np.asarray(_run(model, prompt, 30, solvers.SequentialDecoding())[0])
    eos = int(plain[4])  # a token that appears early: decoding must stop there
    first = int(np.flatnonzero(plain == eos)[0])
    for solver in (solvers.SequentialDecoding(), solvers.JacobiDecoding(8)):
        got, sol = _run(model, prompt, 30, solver, eos_id=eos)
        want = np.where(np.arange(30) <= first, plain, eos)
        np.testing.assert_array_equal(got, want)
        assert int(sol.stats["model_calls"]) <= first + 1


def test_vmap_rows_stop_on_their_own(model):
    prompts = jax.random.randint(jax.random.key(7), (5, 4), 0, V)
    solver = solvers.JacobiDecoding(6)
    batched = jax.vmap(lambda p: fixpoint.decode(model, p, 15, solver=solver, return_solution=True))
    tokens, sol = batched(prompts)
    for i in range(5):
        one, s1 = _run(model, prompts[i], 15, solver)
        np.testing.assert_array_equal(tokens[i], one)
        assert int(sol.stats["model_calls"][i]) == int(s1.stats["model_calls"])


def test_nonfinite_logits_are_reported():
    bad = lambda t: jnp.full((t.shape[0], V), jnp.nan)  # noqa: E731
    _, sol = fixpoint.decode(
        bad, jnp.zeros(2, jnp.int32), 4, solver=solvers.JacobiDecoding(4), return_solution=True
    )
    assert bool(sol.result == fixpoint.RESULTS.nonfinite)


def test_bad_inputs(model):
    j = solvers.JacobiDecoding(4)
    with pytest.raises(TypeError, match="`prompt` must hold integer"):
        fixpoint.decode(model, jnp.zeros(3), 4, solver=j)
    with pytest.raises(ValueError, match="`max_new_tokens` must be >= 1"):
        fixpoint.decode(model, jnp.zeros(3, jnp.int32), 0, solver=j)
    with pytest.raises(ValueError, match="`window` must be an int >= 1"):
        solvers.JacobiDecoding(0)
    with pytest.raises(ValueError, match="must map int32\\[7\\]"):
        fixpoint.decode(lambda t: jnp.zeros((t.shape[0],)), jnp.zeros(3, jnp.int32), 4, solver=j)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fixpoint.decode(model, jnp.zeros(3, jnp.int32), 4, solver=j, eos_id=V)
    with pytest.raises(TypeError, match="decoding solver"):
        fixpoint.decode(model, jnp.zeros(3, jnp.int32), 4, solver=solvers.Jacobi())
