"""Sequence layers that are fixed points in depth and parallel scans in time.

Both layers here turn a diagonal linear recurrence, which an associative scan
evaluates in parallel over time but which cannot track non-commutative state, into
a more expressive recurrence by iterating it to a fixed point in depth:

- `FixedPointRNN` (Movahedi, Sarnthein, Cirone & Orvieto, *Fixed-Point RNNs: From
  Diagonal to Dense in a Few Iterations*, NeurIPS 2025): the fixed point of the
  diagonal iteration `h_t ← Λ_t h_{t-1} + Q_t h_t^{old} + B x_t` is the *dense*
  linear RNN `h_t = (I − Q_t)⁻¹ (Λ_t h_{t-1} + B x_t)`.
- `ImplicitSSM` (Schöne, Rahmani, Kremer, Falck, Ballani & Gladrow, *Implicit
  Language Models are RNNs: Balancing Parallelization and Expressivity*, ICML
  2025): a selective (Mamba-style) diagonal SSM whose step, gates and projections
  read the layer's own output, so at the fixed point the transition depends
  nonlinearly on the state.

Each iteration is one associative scan over time (`fixpoint.internal.
linear_recurrence`); the depth iteration is `fixpoint.fixed_point`'s loop, with its
result codes, its adjoints and compaction under `jax.vmap`.
"""

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray

import fixpoint
from fixpoint import internal, solvers

from ._deq import FixedMapDEQ

_HI = jax.lax.Precision.HIGHEST


def _uniform(key, shape, fan_in, dtype, scale=1.0):
    lim = scale / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -lim, lim)


def _check_sequence(xs, width: int, name: str, owner: str, dtype=None) -> None:
    shape = tuple(getattr(xs, "shape", ()))
    if len(shape) != 2 or shape[1] != width or shape[0] < 1:
        hint = (
            " A batch of sequences: map the layer over it with `jax.vmap`."
            if len(shape) == 3 and shape[2] == width
            else ""
        )
        raise ValueError(
            f"{owner}: `{name}` must have shape (T, {width}) with T >= 1, got {shape}.{hint}"
        )
    got = getattr(xs, "dtype", None)
    if got is None or not jnp.issubdtype(got, jnp.floating):
        raise TypeError(f"{owner}: `{name}` must be a floating-point array, got dtype {got}.")
    if dtype is not None and got != dtype:
        raise TypeError(
            f"{owner}: `{name}` has dtype {got}, the layer's parameters {dtype}; cast one "
            f"of them (e.g. `{name}.astype(jnp.{jnp.dtype(dtype).name})`)."
        )


def _check_start(z0, shape, dtype, owner: str) -> None:
    if tuple(jnp.shape(z0)) != tuple(shape):
        raise ValueError(f"{owner}: `z0` must have shape {tuple(shape)}, got {jnp.shape(z0)}.")
    if getattr(z0, "dtype", None) != dtype:
        raise TypeError(
            f"{owner}: `z0` must be an array of dtype {dtype} (the layer's), got "
            f"{getattr(z0, 'dtype', type(z0).__name__)}."
        )


# ---------------------------------------------------------------- FixedPointRNN


class FixedPointRNNCoefficients(eqx.Module):
    """The input-dependent coefficients of a `FixedPointRNN` for one sequence.

    **Arguments:**

    - `decay`: `Λ_t`, `(T, hidden)`, entries in `(−1, 1)`.
    - `mixer`: `Q_t`, `(T, hidden, hidden)`, each with `‖Q_t‖₂ < mixer_bound`.
    - `drive`: `B x_t + b`, `(T, hidden)`.
    """

    decay: Float[Array, "T hidden"]
    mixer: Float[Array, "T hidden hidden"]
    drive: Float[Array, "T hidden"]


class _DiagonalSweep(eqx.Module):
    """One depth iteration: `h ↦ scan(Λ, Q h + drive)`, a diagonal linear recurrence
    over time (a module, so the compiled loop is reused across calls)."""

    def __call__(self, h, c: FixedPointRNNCoefficients):
        mixed = jnp.einsum("tij,tj->ti", c.mixer, h, precision=_HI)
        return internal.linear_recurrence(internal.Time(), c.decay, mixed + c.drive)


_sweep = _DiagonalSweep()


class FixedPointRNNMap(eqx.Module):
    """The weights of a `FixedPointRNN` and the depth iteration they define.

    `coefficients(xs)` maps a sequence to `Λ_t = tanh(W_Λ x_t + b_Λ)` (entries in
    `(−1, 1)`: negative ones let the layer flip signs, which odd permutations
    need), `Q_t = c · M_t / sqrt(1 + ‖M_t‖_F²)` with `M_t` the `(hidden, hidden)`
    reshape of `W_Q x_t + b_Q` and `c = mixer_bound` (so `‖Q_t‖₂ ≤ ‖Q_t‖_F < c`
    for any weights), and `B x_t + b`. Called as `f(h, xs)` it is one depth
    iteration, `h_t ← Λ_t h_{t-1} + Q_t h_t + B x_t + b` for all `t` by one
    associative scan (`h_{-1} = 0`).

    **Arguments:**

    - `decay_weight`, `decay_bias`: `W_Λ`, `(hidden, input)`, and `b_Λ`, `(hidden,)`.
    - `mixer_weight`, `mixer_bias`: `W_Q`, `(hidden², input)`, and `b_Q`, `(hidden²,)`.
    - `input_weight`, `input_bias`: `B`, `(hidden, input)`, and `b`, `(hidden,)`.
    - `mixer_bound`: `c`, a number in `(0, 1)` (static).

    `FixedPointRNN` builds one; construct it directly only to set the weights.
    """

    decay_weight: Float[Array, "hidden input"]
    decay_bias: Float[Array, " hidden"]
    mixer_weight: Float[Array, "hidden2 input"]
    mixer_bias: Float[Array, " hidden2"]
    input_weight: Float[Array, "hidden input"]
    input_bias: Float[Array, " hidden"]
    mixer_bound: float = eqx.field(static=True, converter=internal.as_python_number)

    def coefficients(self, xs: Float[Array, "T input"]) -> FixedPointRNNCoefficients:
        """`Λ_t`, `Q_t` and `B x_t + b` for a sequence `xs`, `(T, input_size)`."""
        hidden = self.decay_bias.shape[0]
        decay = jnp.tanh(jnp.matmul(xs, self.decay_weight.T, precision=_HI) + self.decay_bias)
        m = jnp.matmul(xs, self.mixer_weight.T, precision=_HI) + self.mixer_bias
        m = m.reshape(xs.shape[0], hidden, hidden)
        # c M / sqrt(1 + ‖M‖_F²), computed with M scaled to max |M| = 1 so that a huge
        # M gives c M / ‖M‖_F rather than an overflow to 0.
        tiny = jnp.finfo(m.dtype).tiny
        scale = jnp.maximum(jnp.max(jnp.abs(m), axis=(1, 2), keepdims=True), tiny)
        unit = m / scale
        norm = jnp.sqrt((1 / scale) ** 2 + jnp.sum(unit * unit, axis=(1, 2), keepdims=True))
        drive = jnp.matmul(xs, self.input_weight.T, precision=_HI) + self.input_bias
        return FixedPointRNNCoefficients(decay, self.mixer_bound * unit / norm, drive)

    def __call__(self, h: Float[Array, "T hidden"], xs: Float[Array, "T input"]) -> Array:
        """One depth iteration from the states `h` for the inputs `xs`."""
        return _sweep(h, self.coefficients(xs))


class FixedPointRNN(FixedMapDEQ):
    """A dense linear RNN computed as the fixed point of a diagonal one.

    Movahedi, Sarnthein, Cirone & Orvieto, *Fixed-Point RNNs: From Diagonal to
    Dense in a Few Iterations*, NeurIPS 2025.

    `rnn(xs)` maps `float[T, input_size]` to the states `float[T, hidden_size]` of
    the dense, input-dependent linear recurrence

    `h_t = (I − Q_t)⁻¹ (Λ_t h_{t-1} + B x_t + b)`, `h_{-1} = 0`,

    with `Λ_t` diagonal (entries in `(−1, 1)`) and `Q_t` a dense mixer with
    `‖Q_t‖₂ < mixer_bound < 1` for any weights (`FixedPointRNNMap` gives the
    parameterisation). The transition `(I − Q_t)⁻¹ Λ_t` is a dense matrix that
    changes with the input, so products of transitions need not commute: the layer
    can track the state of a non-abelian group word problem, which a diagonal
    (Mamba-style) recurrence cannot.

    It is never formed. Each depth iteration solves the *diagonal* recurrence
    `h_t^{k+1} = Λ_t h_{t-1}^{k+1} + Q_t h_t^k + B x_t + b` for all `t` by one
    associative scan (O(T · hidden²) work, O(log T) depth), and the fixed point
    of that iteration is the dense recurrence above. The iteration's error map is
    block lower-triangular with the blocks `Q_t` on its diagonal, so its spectral
    radius is `max_t ρ(Q_t) < mixer_bound`, for any weights: the iteration
    converges *asymptotically* from any start, in exact arithmetic. That is not a
    bound on the number of iterations. The map is far from normal where `|Λ_t|`
    is near 1, and the error can then grow by many orders of magnitude before it
    decays, more so for longer sequences; the loop stops such a solve as
    `diverged` or `max_steps_reached`, never with a wrong answer. `Anderson` or
    `Newton` (`solver=`) solve such instances in far fewer iterations. The dense
    recurrence itself is not bounded either: `‖(I − Q_t)⁻¹ Λ_t‖` can reach
    `1 / (1 − mixer_bound)`, so the states can grow along the sequence.
    `stats["num_steps"]` and `result` say how each solve went.

    Everything else is `fixpoint.layers.DEQ`'s: `rnn.solve(xs)` returns the
    `fixpoint.Solution` (`value`: the states, `stats["num_steps"]`, `result`),
    gradients are implicit by default (`adjoint=fixpoint.PhantomAdjoint()` for the
    cheap approximate ones), a failed solve raises (`throw=True`) or reports its
    result code, settings change with `with_settings`, and `jax.vmap` maps over a
    batch of sequences (finished sequences stop costing under compaction).

    **Arguments:**

    - `input_size`, `hidden_size`: the widths of `x_t` and `h_t`.

    Keyword-only:

    - `mixer_bound`: the bound `c` on `‖Q_t‖₂`, a number in `(0, 1)` (default
      `0.9`): the asymptotic convergence rate of the iteration. Larger is more
      expressive (`(I − Q_t)⁻¹` can be further from the identity) and slower.
    - `solver`: default `fixpoint.solvers.Picard(1e-4, 1e-4)`: the paper's
      iteration, which the convergence statement covers. Any solver of
      `fixpoint.solvers` runs (e.g. `Anderson` to accelerate).
    - `adjoint`, `max_steps` (default `100`), `throw`, `compaction`: as for
      `fixpoint.layers.DEQ`.
    - `dtype`: the parameters' dtype (default: JAX's default float).
    - `key`: a `jax.random` key. `W_Λ`, `B` and the biases are uniform in
      `±1/sqrt(input_size)`; `W_Q` in `±0.1/sqrt(input_size)`, so the layer starts
      close to diagonal (and converges in a few iterations) and learns to mix.
    """

    default_solver: ClassVar[internal.AbstractSolver] = solvers.Picard(1e-4, 1e-4)
    no_dropout_reason: ClassVar[str] = (
        "a mask on the iterated map would change the recurrence it solves"
    )

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        mixer_bound: float = 0.9,
        solver: internal.AbstractSolver | None = None,
        adjoint: fixpoint.AbstractAdjoint | None = None,
        max_steps: int = 100,
        throw: bool = True,
        compaction: fixpoint.Compaction | None = fixpoint.Compaction(),
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        owner = "FixedPointRNN"
        n_in = internal.check_int(input_size, "input_size", 1, owner=owner)
        n = internal.check_int(hidden_size, "hidden_size", 1, owner=owner)
        bound = internal.check_number(mixer_bound, "mixer_bound", "(0, 1)", owner=owner)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        k = jax.random.split(key, 6)
        f = FixedPointRNNMap(
            decay_weight=_uniform(k[0], (n, n_in), n_in, dtype),
            decay_bias=_uniform(k[1], (n,), n_in, dtype),
            mixer_weight=_uniform(k[2], (n * n, n_in), n_in, dtype, scale=0.1),
            mixer_bias=jnp.zeros((n * n,), dtype),
            input_weight=_uniform(k[3], (n, n_in), n_in, dtype),
            input_bias=_uniform(k[4], (n,), n_in, dtype),
            mixer_bound=float(bound),
        )
        super().__init__(
            f,
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
            z_shape=None,
            compaction=compaction,
        )

    @property
    def _dtype(self):
        return self.f.input_weight.dtype  # type: ignore[attr-defined]

    @property
    def input_size(self) -> int:
        """The width of `x_t`."""
        return self.f.input_weight.shape[1]  # type: ignore[attr-defined]

    @property
    def hidden_size(self) -> int:
        """The width of `h_t`."""
        return self.f.input_weight.shape[0]  # type: ignore[attr-defined]

    def solve(
        self,
        xs: Float[Array, "T input"],
        z0: Float[Array, "T hidden"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        record_residuals: bool = False,
        max_steps: int | Int[Array, ""] | None = None,
    ) -> fixpoint.Solution:
        """Solve for all states of one sequence; returns the `fixpoint.Solution`.

        **Arguments:**

        - `xs`: one sequence, `(T, input_size)` (floating point).
        - `z0`: a starting guess for the states, `(T, hidden_size)` (a warm
          start); default zeros, whose first iteration is the diagonal RNN.
        - `key`, `inference`: accepted for `fixpoint.layers.DEQ`'s signature;
          unused (no dropout).
        - `record_residuals`, `max_steps`: as for `fixpoint.layers.DEQ.solve`.

        **Returns:**

        A `fixpoint.Solution` whose `value` is the states `(T, hidden_size)`.
        """
        del key, inference
        owner = "FixedPointRNN"
        _check_sequence(xs, self.input_size, "xs", owner, self._dtype)
        shape = (xs.shape[0], self.hidden_size)
        if z0 is None:
            z0 = jnp.zeros(shape, xs.dtype)
        else:
            _check_start(z0, shape, xs.dtype, owner)
        coefficients = self.prepared().coefficients(xs)  # type: ignore[attr-defined]
        return self._fixed_point(_sweep, z0, coefficients, max_steps, record_residuals)

    def coefficients(self, xs: Float[Array, "T input"]) -> FixedPointRNNCoefficients:
        """`Λ_t`, `Q_t` and `B x_t + b` for one sequence (see `FixedPointRNNMap`).

        **Arguments:**

        - `xs`: one sequence, `(T, input_size)`.

        **Returns:**

        A `FixedPointRNNCoefficients`.
        """
        _check_sequence(xs, self.input_size, "xs", "FixedPointRNN", self._dtype)
        return self.prepared().coefficients(xs)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- ImplicitSSM


class SelectiveSSM(eqx.Module):
    """A selective diagonal state-space block (Mamba-style, without the convolution).

    Called as `block(z, xs)` on `(T, d_model)` arrays: with `v_t = a ⊙ z_t + x_t`
    (`a` = `feedback`, learned, initially `0.1`: the block starts close to the
    diagonal SSM of `xs` and learns how much of its own output to read),

    - step `Δ_t = softplus(W_Δ v_t + b_Δ)`, `(d_model,)`; input `u_t = W_u v_t`;
      gate `g_t = W_g v_t`; `B_t = W_B v_t`, `C_t = W_C v_t`, `(state_size,)`;
    - state, per channel `i` and state index `n`: `s_t[i, n] = exp(Δ_t[i] A[i, n])
      s_{t-1}[i, n] + Δ_t[i] B_t[n] u_t[i]`, `A = −exp(a_log) < 0`, so the
      transition is diagonal with entries in `(0, 1)` (with `signed=True`,
      `2 exp(Δ_t A) − 1`, in `(−1, 1)`): one associative scan;
    - output `LayerNorm(W_o (y_t ⊙ silu(g_t)))` with `y_t = C_t · s_t[:, :] + D ⊙ u_t`.

    With `z = 0` it is an ordinary (diagonal, input-selective) SSM layer of `xs`;
    `ImplicitSSM` iterates it to `z* = block(z*, xs)`. The output norm keeps the
    block's values in a bounded set, so a fixed point exists for any weights
    (Brouwer's theorem); it need not be unique.

    Gu & Dao, *Mamba: Linear-Time Sequence Modeling with Selective State Spaces*,
    COLM 2024.

    **Arguments:**

    - `d_model`: the width of the sequence.
    - `state_size`: the state per channel (`N`).

    Keyword-only:

    - `signed`: decays in `(−1, 1)` (default `True`) or `(0, 1)`. A static field
      (part of the architecture): a checkpoint does not hold it.
    - `dtype`: the parameters' dtype.
    - `key`: a `jax.random` key.

    Its weights: `in_proj` (`(3 d_model + 2 state_size, d_model)`: `Δ`, `u`, `g`,
    `B`, `C` stacked), `dt_bias`, `a_log` (`(d_model, state_size)`), `skip` (`D`),
    `feedback` (`a`), `out_proj`, `norm`. `ImplicitSSM` builds one.
    """

    in_proj: Float[Array, "rows d_model"]
    dt_bias: Float[Array, " d_model"]
    a_log: Float[Array, "d_model state"]
    skip: Float[Array, " d_model"]
    feedback: Float[Array, " d_model"]
    out_proj: Float[Array, "d_model d_model"]
    norm: eqx.nn.LayerNorm
    signed: bool = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        state_size: int,
        *,
        signed: bool = True,
        dtype: DTypeLike,
        key: PRNGKeyArray,
    ):
        self.signed = signed
        k1, k2, k3 = jax.random.split(key, 3)
        rows = 3 * d_model + 2 * state_size
        self.in_proj = _uniform(k1, (rows, d_model), d_model, dtype)
        # Steps between 1e-3 and 1e-1 at initialisation, as in Mamba.
        dt = jnp.exp(jax.random.uniform(k2, (d_model,), dtype, math.log(1e-3), math.log(1e-1)))
        self.dt_bias = dt + jnp.log(-jnp.expm1(-dt))  # softplus⁻¹
        self.a_log = jnp.log(
            jnp.broadcast_to(jnp.arange(1, state_size + 1, dtype=dtype), (d_model, state_size))
        )
        self.skip = jnp.ones((d_model,), dtype)
        # The layer starts close to the diagonal SSM (a weak, contracting feedback of
        # its own output) and learns how much of the state to read.
        self.feedback = jnp.full((d_model,), 0.1, dtype)
        self.out_proj = _uniform(k3, (d_model, d_model), d_model, dtype)
        self.norm = eqx.nn.LayerNorm(d_model, dtype=dtype)

    @property
    def d_model(self) -> int:
        """The width of the sequence."""
        return self.skip.shape[0]

    @property
    def state_size(self) -> int:
        """The state size per channel."""
        return self.a_log.shape[1]

    def __call__(self, z: Float[Array, "T d_model"], xs: Float[Array, "T d_model"]) -> Array:
        """The block's output for the current iterate `z` and the inputs `xs`."""
        d, n = self.d_model, self.state_size
        v = self.feedback * z + xs
        p = jnp.matmul(v, self.in_proj.T, precision=_HI)
        dt, u, g, b, c = jnp.split(p, [d, 2 * d, 3 * d, 3 * d + n], axis=-1)
        dt = jax.nn.softplus(dt + self.dt_bias)  # (T, d)
        a = -jnp.exp(self.a_log)  # (d, n)
        decay = jnp.exp(dt[:, :, None] * a)  # (T, d, n), in (0, 1)
        if self.signed:
            decay = 2 * decay - 1  # in (-1, 1)
        drive = (dt * u)[:, :, None] * b[:, None, :]  # (T, d, n)
        steps = xs.shape[0]
        s = internal.linear_recurrence(
            internal.Time(), decay.reshape(steps, d * n), drive.reshape(steps, d * n)
        ).reshape(steps, d, n)
        y = jnp.einsum("tdn,tn->td", s, c, precision=_HI) + self.skip * u
        out = jnp.matmul(y * jax.nn.silu(g), self.out_proj.T, precision=_HI)
        return jax.vmap(self.norm)(out)


class ImplicitSSM(FixedMapDEQ):
    """A selective SSM iterated to a fixed point in depth: a nonlinear RNN whose every
    iteration is a parallel scan over time.

    Schöne, Rahmani, Kremer, Falck, Ballani & Gladrow, *Implicit Language Models
    are RNNs: Balancing Parallelization and Expressivity*, ICML 2025.

    `ssm(xs)` maps `float[T, d_model]` to `z*`, `float[T, d_model]`, the fixed
    point `z* = block(z*, xs)` of a `SelectiveSSM` block (stored as `ssm.f`) whose
    step, gates and projections read `a ⊙ z + xs` (`a` learned, see
    `SelectiveSSM`). At the fixed point the transition of step `t` depends on
    `z*_t`, which depends on the state: the recurrence in time is nonlinear, as
    an RNN's is, while each depth iteration stays a diagonal scan.
    `ssm.diagonal(xs)` is the same layer without the fixed point (one pass from
    `z = 0`): the diagonal selective SSM, the baseline.

    **What is guaranteed.** The block ends in a layer norm, so a fixed point
    exists for any weights (Brouwer); uniqueness and convergence are not
    guaranteed. Every solve reports how it ended: `ssm.solve(xs).result` and
    `stats["num_steps"]`, and with `throw=True` (default) a solve that does not
    reach the tolerance in `max_steps` raises. As in the paper, training may
    accept approximate fixed points (a loose tolerance, a small `max_steps`):
    with `throw=False`, a sequence whose solve did not succeed has NaN gradients
    (never plausible numbers), so mask it out of the loss by its `result`, which
    makes its contribution exactly zero (see the guide on results), and count
    how many were masked.

    Everything else is `fixpoint.layers.DEQ`'s (`solve`, `with_settings`,
    `jax.vmap` with compaction).

    **Arguments:**

    - `d_model`: the width of the sequence.
    - `state_size`: the diagonal state per channel (Mamba's `N`).

    Keyword-only:

    - `solver`: default `fixpoint.solvers.Anderson(1e-3, 1e-3)`.
    - `adjoint`, `max_steps` (default `50`), `throw`, `compaction`: as for
      `fixpoint.layers.DEQ`.
    - `signed`: decays in `(−1, 1)` (default `True`: `2 exp(Δ A) − 1`, after
      Grazzi et al., *Unlocking State-Tracking in Linear RNNs Through Negative
      Eigenvalues*, ICLR 2025, which a diagonal layer needs for parity) or in
      `(0, 1)` as in Mamba (`False`).
    - `dtype`: the parameters' dtype (default: JAX's default float).
    - `key`: a `jax.random` key.
    """

    default_solver: ClassVar[internal.AbstractSolver] = solvers.Anderson(1e-3, 1e-3)
    no_dropout_reason: ClassVar[str] = (
        "a mask on the iterated map would change the recurrence it solves"
    )

    def __init__(
        self,
        d_model: int,
        state_size: int,
        *,
        solver: internal.AbstractSolver | None = None,
        adjoint: fixpoint.AbstractAdjoint | None = None,
        max_steps: int = 50,
        throw: bool = True,
        compaction: fixpoint.Compaction | None = fixpoint.Compaction(),
        signed: bool = True,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        owner = "ImplicitSSM"
        d = internal.check_int(d_model, "d_model", 1, owner=owner)
        n = internal.check_int(state_size, "state_size", 1, owner=owner)
        signed = internal.check_bool(signed, "signed", owner=owner)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        super().__init__(
            SelectiveSSM(d, n, signed=signed, dtype=dtype, key=key),
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
            z_shape=None,
            compaction=compaction,
        )

    @property
    def _dtype(self):
        return self.f.skip.dtype  # type: ignore[attr-defined]

    @property
    def d_model(self) -> int:
        """The width of the sequence."""
        return self.f.d_model  # type: ignore[attr-defined]

    def solve(
        self,
        xs: Float[Array, "T d_model"],
        z0: Float[Array, "T d_model"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        record_residuals: bool = False,
        max_steps: int | Int[Array, ""] | None = None,
    ) -> fixpoint.Solution:
        """Solve for the fixed point of one sequence; returns the `fixpoint.Solution`.

        **Arguments:**

        - `xs`: one sequence, `(T, d_model)` (floating point).
        - `z0`: a starting iterate `(T, d_model)` (a warm start); default zeros.
        - `key`, `inference`: accepted for `fixpoint.layers.DEQ`'s signature;
          unused (no dropout).
        - `record_residuals`, `max_steps`: as for `fixpoint.layers.DEQ.solve`.

        **Returns:**

        A `fixpoint.Solution` whose `value` is `z*`, `(T, d_model)`.
        """
        _check_sequence(xs, self.d_model, "xs", "ImplicitSSM", self._dtype)
        if z0 is not None:
            _check_start(z0, xs.shape, xs.dtype, "ImplicitSSM")
        return super().solve(xs, z0, record_residuals=record_residuals, max_steps=max_steps)

    def diagonal(self, xs: Float[Array, "T d_model"]) -> Float[Array, "T d_model"]:
        """The same layer without the fixed point: one pass of the block from `z = 0`.

        A diagonal selective SSM of `xs` (the baseline the implicit layer is
        compared with, with the same weights and parameter count).

        **Arguments:**

        - `xs`: one sequence, `(T, d_model)`.

        **Returns:**

        `block(0, xs)`, `(T, d_model)`.
        """
        _check_sequence(xs, self.d_model, "xs", "ImplicitSSM", self._dtype)
        return self.f(jnp.zeros_like(xs), xs)
