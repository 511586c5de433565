"""Monotone operator equilibrium networks (monDEQ): dense and convolutional layers.

Winston & Kolter 2020, "Monotone operator equilibrium networks" (NeurIPS). The
layer output is the equilibrium `z* = relu(W z* + U x + b)` with

    W = (1 - m) I - AᵀA + B - Bᵀ,

so that `sym(I - W) = m I + AᵀA ⪰ m I` for *any* `A`, `B`: the equilibrium exists,
is unique, and operator splitting (`fixpoint.solvers.PeacemanRachford`,
`fixpoint.solvers.ForwardBackward`) finds it from any start.
"""

import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import fixpoint
from fixpoint import internal
from fixpoint.solvers import (
    AbstractMonotoneLinear,
    ForwardBackward,
    MonotoneMatrix,
    PeacemanRachford,
)

from ._settings import AbstractConfigurable

_IMPLICIT = fixpoint.ImplicitAdjoint()


def _default_solver():
    return PeacemanRachford(rtol=1e-5, atol=1e-5, alpha=1.0)


class _AbstractMonotone(AbstractConfigurable):
    """The settings MonDEQ and ConvMonDEQ share, checked in one place."""

    settings: ClassVar[tuple[str, ...]] = ("solver", "max_steps", "adjoint", "throw", "compaction")

    def _configure(self, *, solver, max_steps, adjoint, throw, compaction):
        name = type(self).__name__
        solver = _default_solver() if solver is None else solver
        if not isinstance(solver, (PeacemanRachford, ForwardBackward)):
            raise TypeError(
                f"{name}: `solver` must be `fixpoint.solvers.PeacemanRachford` or "
                f"`fixpoint.solvers.ForwardBackward`, got {solver!r}."
            )
        if not isinstance(adjoint, fixpoint.AbstractAdjoint) or isinstance(
            adjoint, fixpoint.UnrolledAdjoint
        ):
            raise TypeError(
                f"{name}: `adjoint` must be `fixpoint.ImplicitAdjoint`, `PhantomAdjoint` or "
                f"`NeumannAdjoint` (the splitting loop is never differentiated), got {adjoint!r}."
            )
        internal.check_compaction(compaction, f"{name}: `compaction`")
        self._store("solver", solver)
        self._store("max_steps", internal.check_int(max_steps, "max_steps", 1, owner=name))
        self._store("adjoint", adjoint)
        self._store("throw", internal.check_bool(throw, "throw", owner=name))
        self._store("compaction", compaction)


def _uniform(key, shape, fan_in, dtype):
    lim = 1 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -lim, lim)


def _check_input(name, x, shape, dtype):
    if tuple(jnp.shape(x)) != tuple(shape):
        raise ValueError(
            f"{name}: `x` must have shape {tuple(shape)} (one sample; `jax.vmap` over a "
            f"batch), got {tuple(jnp.shape(x))}."
        )
    if jnp.result_type(x) != dtype:
        raise TypeError(f"{name}: `x` must have the parameters' dtype {dtype}, got {x.dtype}.")


# ---- fully connected -----------------------------------------------------------


class MonDEQ(_AbstractMonotone):
    """A fully connected monotone equilibrium layer: `x ↦ z* = relu(W z* + U x + b)`.

    Winston & Kolter, *Monotone operator equilibrium networks*, NeurIPS 2020.

    `W = (1 - m) I - AᵀA + B - Bᵀ` (see `W()`), so `sym(I - W) ⪰ m I` by
    construction (`monotonicity()` checks it). The forward pass runs `solver` on
    stop-gradient inputs; gradients with respect to the parameters and `x` come
    from `adjoint` (the implicit function theorem by default) at the equilibrium.
    One sample per call: `jax.vmap` over a batch (each sample gets its own
    `num_steps` and result).

    **Arguments:**

    - `in_size`, `hidden_size`: the sizes of `x` and `z`.
    - `m`: the monotonicity parameter, `> 0` (default `0.1`). Larger `m` is
      faster to solve but less expressive.
    - `solver`: `fixpoint.solvers.PeacemanRachford` (default, `rtol = atol = 1e-5`,
      `alpha = 1`) or `fixpoint.solvers.ForwardBackward`. The dense resolvent
      `(I + α(I - W))⁻¹` is formed once per call.
    - `max_steps`: the largest number of splitting steps (default `100`).
    - `adjoint`: `fixpoint.ImplicitAdjoint()` (default), `PhantomAdjoint` or
      `NeumannAdjoint`.
    - `throw`: raise `fixpoint.SolveError` if a solve fails (default `True`); with
      `False`, `__call__` returns the last iterate and `solve(x).result` says why.
    - `compaction`: under `jax.vmap`, samples that have converged stop costing
      (`fixpoint.Compaction`; `None`: off). See `fixpoint.fixed_point`.
    - `dtype`: the parameters' dtype (default: JAX's default float).
    - `key`: a `jax.random` key. Parameters are initialised like `torch.nn.Linear`
      (uniform in `±1/sqrt(fan_in)`), as in the paper's code.

    To split a batch over several devices, wrap the loss in
    `fixpoint.data_parallel`: each device then solves (and compacts) its own share.
    """

    A: Float[Array, "hidden hidden"]
    B: Float[Array, "hidden hidden"]
    U: Float[Array, "hidden in"]
    bias: Float[Array, " hidden"]
    m: float = eqx.field(static=True, converter=internal.as_python_number)
    solver: PeacemanRachford | ForwardBackward = eqx.field(static=True)
    max_steps: int = eqx.field(static=True, converter=internal.as_python_number)
    adjoint: fixpoint.AbstractAdjoint = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    compaction: fixpoint.Compaction | None = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        hidden_size: int,
        *,
        m: float = 0.1,
        solver: PeacemanRachford | ForwardBackward | None = None,
        max_steps: int = 100,
        adjoint: fixpoint.AbstractAdjoint = _IMPLICIT,
        throw: bool = True,
        compaction: fixpoint.Compaction | None = fixpoint.Compaction(),
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        m = internal.check_number(m, "m", "> 0", owner="MonDEQ")
        for name, size in (("in_size", in_size), ("hidden_size", hidden_size)):
            internal.check_int(size, name, 1, owner="MonDEQ")
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        ka, kb, ku, kbias = jax.random.split(key, 4)
        self.A = _uniform(ka, (hidden_size, hidden_size), hidden_size, dtype)
        self.B = _uniform(kb, (hidden_size, hidden_size), hidden_size, dtype)
        self.U = _uniform(ku, (hidden_size, in_size), in_size, dtype)
        self.bias = _uniform(kbias, (hidden_size,), in_size, dtype)
        self.m = float(m)
        self._configure(
            solver=solver, max_steps=max_steps, adjoint=adjoint, throw=throw, compaction=compaction
        )

    def W(self) -> Float[Array, "hidden hidden"]:
        """The matrix `W = (1 - m) I - AᵀA + B - Bᵀ`."""
        eye = jnp.eye(self.A.shape[0], dtype=self.A.dtype)
        return (1 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def operator(self) -> MonotoneMatrix:
        """`W` as the `fixpoint.solvers.MonotoneMatrix` the splitting solvers take."""
        return MonotoneMatrix(self.W(), self.m)

    def monotonicity(self) -> Float[Array, ""]:
        """The smallest eigenvalue of `sym(I - W)`; at least `m` up to round-off."""
        return self.operator().monotonicity()

    def is_monotone(self, atol: float | None = None) -> Bool[Array, ""]:
        """Whether `monotonicity() ≥ m - atol`; the default `atol` is round-off,
        `100 · eps · (1 + ‖I - W‖₂)`."""
        return _is_monotone(self.operator(), atol)

    def solve(self, x: Float[Array, " in"], z0: Array | None = None) -> fixpoint.Solution:
        """The equilibrium for one input `x`, with its result code and statistics.

        **Arguments:** `x` of shape `(in_size,)`; `z0` an optional warm start
        `(hidden_size,)` (default zeros).

        **Returns:** a `fixpoint.Solution`: `value` the equilibrium `z*`,
        `result`, `stats["num_steps"]` and `stats["residual"]` (max-norm of
        `relu(W z + U x + b) - z` at `value`).
        """
        _check_input("MonDEQ", x, (self.U.shape[1],), self.U.dtype)
        b = self.U @ x + self.bias
        return self.solver.solve(
            self.operator(),
            b,
            z0,
            max_steps=self.max_steps,
            throw=self.throw,
            adjoint=self.adjoint,
            compaction=self.compaction,
        )

    def __call__(self, x: Float[Array, " in"], z0: Array | None = None) -> Float[Array, " hidden"]:
        """The equilibrium `z*` for one input `x` (see `solve`)."""
        return self.solve(x, z0).value


def _is_monotone(operator, atol):
    lam = operator.monotonicity()
    if atol is None:
        atol = 100 * jnp.finfo(lam.dtype).eps * (1 + operator.lipschitz())
    return lam >= operator.m - atol


# ---- convolutional -------------------------------------------------------------


def _circular_conv(kernel, z, pads=None):
    """Circular ("wrap"-padded) cross-correlation, output size = input size.

    `kernel`: `(c_out, c_in, *k)`; `z`: `(c_in, *spatial)` -> `(c_out, *spatial)`.
    Padding `(k-1)//2` before and `k//2` after along each spatial axis (unless `pads`).
    """
    if pads is None:
        pads = [((k - 1) // 2, k // 2) for k in kernel.shape[2:]]
    zp = jnp.pad(z, [(0, 0), *pads], mode="wrap")
    ndim = kernel.ndim - 2
    return jax.lax.conv_general_dilated(zp[None], kernel, (1,) * ndim, "VALID")[0]


def _circular_conv_t(kernel, y):
    """The adjoint (transpose) of `_circular_conv(kernel, ·)`, applied to `y`.

    A circular cross-correlation with the kernel flipped in space and its channel
    axes swapped, and the padding mirrored.
    """
    spatial_axes = tuple(range(2, kernel.ndim))
    flipped = jnp.flip(jnp.swapaxes(kernel, 0, 1), axis=spatial_axes)
    return _circular_conv(flipped, y, [(k // 2, (k - 1) // 2) for k in kernel.shape[2:]])


class CircularConvMonotone(AbstractMonotoneLinear):
    """`W z = (1 - m) z - Aᵀ(A z) + B z - Bᵀ z` with `A`, `B` circular convolutions.

    Acts on `z` of shape `(channels, *spatial)`. `mv` works in the spatial domain
    (convolutions and their exact transposes: flipped, channel-swapped kernels).
    Because every operator here is a *circular* convolution, `W` is block
    circulant and the DFT over the spatial axes block-diagonalises it into one
    `channels × channels` matrix `Ŵ_k` per frequency. `resolvent`, `lipschitz`
    and `monotonicity` use that exactly (as the paper's convolutional monDEQ does):
    the transfer matrices come from the impulse responses of `mv` (one `mv` per
    channel, so they match `mv` whatever the convolution conventions), and

    - `(I + α(I - W))⁻¹ v = irfftn( (I + α(I - Ŵ_k))⁻¹ v̂_k )`: `channels × channels`
      inverses per frequency, formed once per solve; each application is an FFT
      pair and a batched matvec;
    - `‖I - W‖₂ = max_k ‖I - Ŵ_k‖₂` and `λ_min(sym(I - W)) = min_k λ_min(herm(I - Ŵ_k))`.

    By construction `sym(I - W) = m I + AᵀA ⪰ m I`. Built by `ConvMonDEQ.operator()`.
    Winston & Kolter, *Monotone operator equilibrium networks*, NeurIPS 2020.

    **Arguments:**

    - `A`: the kernel of the convolution `A`, shape `(c, c, *k)`.
    - `B`: the kernel of the convolution `B`, shape `(c, c, *k)`.
    - `m`: the monotonicity parameter, a number `> 0`.
    - `spatial`: the spatial shape of `z` (a tuple of ints).
    """

    A: Float[Array, "c c *k"]
    B: Float[Array, "c c *k"]
    m: float = eqx.field(static=True, converter=internal.as_python_number)
    spatial: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, A: Array, B: Array, m: float, spatial: tuple[int, ...]):
        owner = "CircularConvMonotone"
        m = internal.check_number(m, "m", "> 0", owner=owner)
        spatial = tuple(spatial)
        want = f"(c, c, *k) with {len(spatial)} kernel dims (one per entry of `spatial`)"
        for name, kernel in (("A", A), ("B", B)):
            shape = tuple(kernel.shape)
            if len(shape) != 2 + len(spatial) or shape[0] != shape[1]:
                raise ValueError(f"{owner}: `{name}` must have shape {want}, got {shape}.")
        if tuple(A.shape) != tuple(B.shape):
            raise ValueError(
                f"{owner}: `A` and `B` must have the same shape, got {tuple(A.shape)} and "
                f"{tuple(B.shape)}."
            )
        self.A, self.B, self.m, self.spatial = A, B, float(m), spatial

    def mv(self, z: Array) -> Array:
        az = _circular_conv(self.A, z)
        return (
            (1 - self.m) * z
            - _circular_conv_t(self.A, az)
            + _circular_conv(self.B, z)
            - _circular_conv_t(self.B, z)
        )

    def _i_minus_w_hat(self):
        """`I - Ŵ_k` for every frequency of `rfftn`: shape `(*freq, c, c)`."""
        c = self.A.shape[0]
        dtype = self.A.dtype
        impulses = jnp.zeros((c, c, *self.spatial), dtype)
        impulses = impulses.at[(jnp.arange(c), jnp.arange(c)) + (0,) * len(self.spatial)].set(1)
        h = jax.vmap(self.mv)(impulses)  # h[j] = W (e_j ⊗ δ₀): (c_in=j, c_out, *spatial)
        axes = tuple(range(2, 2 + len(self.spatial)))
        w_hat = jnp.fft.rfftn(h, axes=axes)  # (c_in, c_out, *freq)
        w_hat = jnp.moveaxis(w_hat, (0, 1), (-1, -2))  # (*freq, c_out, c_in)
        return jnp.eye(c, dtype=w_hat.dtype) - w_hat

    def _fft(self, v):
        axes = tuple(range(1, 1 + len(self.spatial)))
        return jnp.moveaxis(jnp.fft.rfftn(v, axes=axes), 0, -1)  # (*freq, c)

    def _ifft(self, v_hat, dtype):
        axes = tuple(range(1, 1 + len(self.spatial)))
        return jnp.fft.irfftn(jnp.moveaxis(v_hat, -1, 0), s=self.spatial, axes=axes).astype(dtype)

    def lipschitz(self) -> Float[Array, ""]:
        return jnp.max(jnp.linalg.svd(self._i_minus_w_hat(), compute_uv=False))

    def resolvent(self, alpha: Float[Array, ""]) -> Callable[[Array], Array]:
        m_hat = self._i_minus_w_hat()
        eye = jnp.eye(m_hat.shape[-1], dtype=m_hat.dtype)
        inv = jnp.linalg.inv(eye + alpha.astype(m_hat.dtype) * m_hat)  # (*freq, c, c)

        def apply(v):
            v_hat = self._fft(v)
            return self._ifft(jnp.einsum("...ij,...j->...i", inv, v_hat), v.dtype)

        return apply

    def monotonicity(self) -> Float[Array, ""]:
        m_hat = self._i_minus_w_hat()
        herm = 0.5 * (m_hat + jnp.conj(jnp.swapaxes(m_hat, -1, -2)))
        return jnp.min(jnp.linalg.eigvalsh(herm)[..., 0])


class ConvMonDEQ(_AbstractMonotone):
    """A convolutional monotone equilibrium layer on 1-D or 2-D signals.

    Winston & Kolter, *Monotone operator equilibrium networks*, NeurIPS 2020.

    `z* = relu(W z* + U x + b)` where `x` has shape `(channels_in, *shape)`, `z`
    has shape `(channels_hidden, *shape)`, `U` is a circular convolution from the
    input channels, `b` a per-channel bias, and

        W z = (1 - m) z - Aᵀ(A z) + B z - Bᵀ z

    with `A`, `B` circular `channels_hidden → channels_hidden` convolutions and
    `Aᵀ`, `Bᵀ` their adjoints, so `sym(I - W) ⪰ m I`. The splitting solvers use
    `CircularConvMonotone`: matrix-free products in the spatial domain, and an
    exact FFT resolvent for `PeacemanRachford` (see there). Circular padding is
    what makes that resolvent exact.

    **Arguments:**

    - `channels_in`, `channels_hidden`: channel counts of `x` and `z`.
    - `shape`: the spatial shape, an int (1-D, e.g. `40` for MNIST-1D) or a tuple
      of one or two ints.
    - `kernel_size`: an int or a tuple (one per spatial axis); any size works
      (padding `(k-1)//2` before and `k//2` after, wrapping around).
    - `m`, `solver`, `max_steps`, `adjoint`, `throw`, `compaction`, `dtype`, `key`: as for
      `MonDEQ`.
    """

    A: Array
    B: Array
    U: Array
    bias: Array
    m: float = eqx.field(static=True, converter=internal.as_python_number)
    shape: tuple[int, ...] = eqx.field(static=True)
    solver: PeacemanRachford | ForwardBackward = eqx.field(static=True)
    max_steps: int = eqx.field(static=True, converter=internal.as_python_number)
    adjoint: fixpoint.AbstractAdjoint = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    compaction: fixpoint.Compaction | None = eqx.field(static=True)

    def __init__(
        self,
        channels_in: int,
        channels_hidden: int,
        shape: int | tuple[int, ...],
        kernel_size: int | tuple[int, ...] = 3,
        *,
        m: float = 0.1,
        solver: PeacemanRachford | ForwardBackward | None = None,
        max_steps: int = 100,
        adjoint: fixpoint.AbstractAdjoint = _IMPLICIT,
        throw: bool = True,
        compaction: fixpoint.Compaction | None = fixpoint.Compaction(),
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray,
    ):
        m = internal.check_number(m, "m", "> 0", owner="ConvMonDEQ")
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if not 1 <= len(shape) <= 2 or not all(_pos_int(s) for s in shape):
            raise ValueError(
                f"ConvMonDEQ: `shape` must be an int or a tuple of 1 or 2 ints >= 1, got {shape!r}."
            )
        ks = (
            (kernel_size,) * len(shape)
            if isinstance(kernel_size, (int, np.integer))
            else tuple(kernel_size)
        )
        if len(ks) != len(shape) or not all(_pos_int(k) for k in ks):
            raise ValueError(
                f"ConvMonDEQ: `kernel_size` must be an int >= 1 or a tuple of {len(shape)} such "
                f"ints, got {kernel_size!r}."
            )
        for name, c in (("channels_in", channels_in), ("channels_hidden", channels_hidden)):
            if not _pos_int(c):
                raise ValueError(f"ConvMonDEQ: `{name}` must be an int >= 1, got {c!r}.")
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        c, area = channels_hidden, math.prod(ks)
        ka, kb, ku, kbias = jax.random.split(key, 4)
        self.A = _uniform(ka, (c, c, *ks), c * area, dtype)
        self.B = _uniform(kb, (c, c, *ks), c * area, dtype)
        self.U = _uniform(ku, (c, channels_in, *ks), channels_in * area, dtype)
        self.bias = _uniform(kbias, (c,), channels_in * area, dtype)
        self.m = float(m)
        self.shape = shape
        self._configure(
            solver=solver, max_steps=max_steps, adjoint=adjoint, throw=throw, compaction=compaction
        )

    def operator(self) -> CircularConvMonotone:
        """`W` as the matrix-free `CircularConvMonotone` the splitting solvers take."""
        return CircularConvMonotone(self.A, self.B, self.m, self.shape)

    def monotonicity(self) -> Float[Array, ""]:
        """The smallest eigenvalue of `sym(I - W)` (exact, per frequency); `≥ m`."""
        return self.operator().monotonicity()

    def is_monotone(self, atol: float | None = None) -> Bool[Array, ""]:
        """Whether `monotonicity() ≥ m - atol` (default `atol`: round-off, as `MonDEQ`)."""
        return _is_monotone(self.operator(), atol)

    def solve(self, x: Array, z0: Array | None = None) -> fixpoint.Solution:
        """The equilibrium for one input `x` of shape `(channels_in, *shape)`.

        `z0`: optional warm start of shape `(channels_hidden, *shape)`. Returns a
        `fixpoint.Solution` as `MonDEQ.solve` does.
        """
        _check_input("ConvMonDEQ", x, (self.U.shape[1], *self.shape), self.U.dtype)
        b = _circular_conv(self.U, x) + self.bias.reshape(-1, *(1,) * len(self.shape))
        return self.solver.solve(
            self.operator(),
            b,
            z0,
            max_steps=self.max_steps,
            throw=self.throw,
            adjoint=self.adjoint,
            compaction=self.compaction,
        )

    def __call__(self, x: Array, z0: Array | None = None) -> Array:
        """The equilibrium `z*` for one input `x` (see `solve`)."""
        return self.solve(x, z0).value


def _pos_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and bool(v >= 1)
