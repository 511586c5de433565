"""Parallel-in-time GRUs: `fixpoint.scan` against `jax.lax.scan` of the same cell.

Cells (input size 4, inputs `x_t ~ N(0, 1)`, `h_0 = 0`, float32):

- `gru`: `equinox.nn.GRUCell` (dense recurrent weights);
- `diag-gru`: `layers.DiagonalGRUCell` (diagonal recurrent weights, so the state
  Jacobian is exactly diagonal).

The recurrent weights `weight_hh` are multiplied by `scale` in {1, 3, 6} (1: contractive,
3: long memory, 6: near the edge of chaos for the dense GRU: largest Lyapunov exponent
about -0.09 per step at D = 8, T = 1000, against -0.43 at scale 1; `bench/lyapunov.py`).
One executable is compiled per (cell, solver, D, T, batch) and run at every scale (the
scale only changes values).

Solvers (`solvers.*`, default tolerances per step, max-norm: `1e-4` in float32, `1e-6` in float64):
`DEER()` (dense Jacobians, memory `O(T·D²)`), `QuasiDEER()` (exact diagonals of the
Jacobians, `D` JVPs per iteration), `ELK()` (adaptive Levenberg-Marquardt / Kalman
smoother, damping 1), `Jacobi()` and `GaussSeidel(block_size=16)` (a small subset) on the dense
GRU; `QuasiDEER(assume_diagonal=True)` (= exact Newton, one JVP per iteration) on the
diagonal GRU. Every solve is `fixpoint.scan(..., throw=False, max_steps=min(T,
--max-steps))`; failures are reported with their result code, never raised. Batches are
`jax.vmap` over independent sequences (batch 1 is unbatched).

Measured per (configuration, scale):

- fwd: all hidden states `(B, T, D)`; grad: `jax.value_and_grad` of `sum(h²)` over all
  hidden states w.r.t. the cell's parameters and the inputs (fixpoint: the implicit rule,
  whose adjoint recurrence the same solver solves; lax.scan: ordinary backpropagation);
- time: median of steady-state calls of the compiled executable, each ended with
  `jax.block_until_ready`, after one warm-up call (at least `--reps` calls, more for fast
  ones up to 0.2 s, fewer once `--guard` seconds are used; when the warm-up call alone
  takes longer than `--guard` it is the only time and the row is marked `warmup_only`);
- speedup: lax.scan's median time / fixpoint's median time, both measured in this run on
  the same cell, inputs and scale;
- compile: `jax.jit(fn).lower(...).compile()`, timed apart (once per executable);
- iters: fixpoint's iterations (`stats["num_steps"]`, max over the batch), result code
  (`RESULTS`), largest per-step residual and the fewest converged leading steps;
- err: forward, `max |h - h_lax.scan|` over all states; grad, `max|g - g_ref| / max|g_ref|`
  over all gradient leaves against the gradient through lax.scan;
- mem: `compiled.memory_analysis()`: temp + argument + output - alias bytes (all fields
  are kept in the JSON; on CPU `peak_memory_in_bytes` is only arguments + outputs).

Peer (after the grid; `bench` extra): brainevent's `pararnn.parallel_rnn` (after ParaRNN:
Newton over time, a fixed number of iterations, Jacobians by `jax.jacobian` of the cell,
their structure detected: dense for the GRU, diagonal for the diagonal GRU) on the same
cells, inputs and scale 1 as our DEER (GRU, D = 8, T = 1e3) and diagonal QuasiDEER rows
(D = 64, T = 1e3 and 1e4): as shipped with its default 3 iterations, and with its Jacobian's
sign patched (see `PEER_NOTE`: brainevent 0.1.x solves each Newton step with the negated
Jacobian) at as many iterations as ours took; time, error against lax.scan, time / ours.
If brainevent cannot be imported, the table says why.

Configurations whose estimated memory exceeds `--mem-gb`, whose lax.scan reference is
estimated to take longer than `--max-ref-s`, or whose fixpoint call is estimated to take
longer than `--max-run-s` are skipped and recorded with the reason. Estimates come from a
cost model (flops, and elements of associative scans, calibrated at start-up) corrected by
the nearest configuration already measured in the run; the compiled memory analysis is
checked against `--mem-gb` as well before anything runs. Chaotic configurations usually
run into `max_steps`; their backward solves are estimated at their worst case (T
iterations), so on CPU their gradients are mostly skipped.

Targets (GPU, NVIDIA H100, forward, float32, error <= 1e-4, scale 1, vs lax.scan of the
same cell): diagonal GRU with `QuasiDEER(assume_diagonal=True)` >= 1000x at T = 1e5,
D = 64, batch 1 and >= 100x at batch 16; DEER on the dense GRU >= 100x at T = 1e6,
D = 16; QuasiDEER on the dense GRU >= 50x at T = 1e5, D = 64; forward+gradient >= half
the forward speedup of the same configuration. The target table says met / not met /
not run. On CPU the parallel solvers do many times the sequential work on 2 cores, so
speedups are far below 1 there: CPU figures are for reference only.

Run (from the repository root):

    .venv/bin/python bench/scan.py --quick   # CPU subset: 2.6-4 min on 2 CPU cores
    .venv/bin/python bench/scan.py --full    # whole grid, for a GPU (not timed: no GPU here)

`--quick` (the default; measured 4 min 3 s wall, 240 s in the script, on 2 shared CPU
cores, two thirds of it compilation): T in {1e3, 1e4}, D in {1, 8, 64}, batch 1 and 16,
scales 1 and 6, DEER / QuasiDEER / diagonal QuasiDEER (ELK at batch 1 only: its
executables take ~10 s each to compile on CPU), gradients at scale 1 for D = 8 (dense)
and D = 64 (diagonal), Jacobi / GaussSeidel at D = 8, plus the target configurations
(on CPU with the default limits the diagonal GRU at T = 1e5, batch 1 runs; the others
are listed as skipped, with the estimate that excluded them). `--full`: D in
{1, 2, 8, 64, 256} (plus the D = 16 DEER target line), T in {1e3, 1e4, 1e5, 1e6}, batch 1
and 16, scales 1, 3, 6, forward and gradient everywhere: some 400 executables to compile
(seconds each) on top of the runs. `--targets`: the four target configurations alone,
forward and gradient at scale 1, no peers (what `bench/gpu.py` runs on a GPU); `--tiny`:
the diagonal GRU (D = 8, batch 2) and DEER's dense GRU (D = 4) at T = 300, the same code
paths in seconds (`bench/gpu.py --tiny`). The JSON is rewritten after every
(cell, D, T, batch) group with `"complete": false`, so a run stopped from outside keeps
what it measured. Results go to `bench/results/scan_<platform>.json` (`--out`).
Matmul precision is `highest` (`--precision`), as in the reference runs; it is recorded.
Defaults on CPU / GPU: `--mem-gb` 8 / 85% of the device's memory, `--max-run-s` 5 / 60,
`--max-ref-s` 8 / 120, `--guard` 2 / 10 seconds; `--max-steps` 200, `--reps` 5.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    RESULTS_DIR,
    device_info,
    fmt_sci,
    fmt_time,
    git_state,
    memory_of,
    print_table,
    short_error,
    versions,
    write_text_atomic,
)

import fixpoint
from fixpoint import layers, solvers

INPUT = 4
RESULT_NAMES = ("successful", "max_steps_reached", "diverged", "nonfinite", "linear_solve_failed")
SHORT_RESULT = {"successful": "ok", "max_steps_reached": "max_steps"}
ERR_TARGET = 1e-4

SOLVERS: dict[str, Callable[[], fixpoint.internal.AbstractScanSolver]] = {
    "DEER": lambda: solvers.DEER(),
    "QuasiDEER": lambda: solvers.QuasiDEER(),
    "ELK": lambda: solvers.ELK(lambda_0=1.0),
    "Jacobi": lambda: solvers.Jacobi(),
    "GaussSeidel16": lambda: solvers.GaussSeidel(block_size=16),
    "QuasiDEER-diag": lambda: solvers.QuasiDEER(assume_diagonal=True),
}


@dataclass(frozen=True)
class Target:
    name: str
    cell: str
    solver: str
    d: int
    t: int
    b: int
    speedup: float
    scale: float = 1.0


TARGETS = [
    Target("diag GRU, QuasiDEER(diag), batch 1", "diag-gru", "QuasiDEER-diag", 64, 10**5, 1, 1000),
    Target("diag GRU, QuasiDEER(diag), batch 16", "diag-gru", "QuasiDEER-diag", 64, 10**5, 16, 100),
    Target("dense GRU, DEER", "gru", "DEER", 16, 10**6, 1, 100),
    Target("dense GRU, QuasiDEER", "gru", "QuasiDEER", 64, 10**5, 1, 50),
]
# `--tiny` (bench/gpu.py's CPU smoke run): the same cells and solvers at small sizes.
TINY_TARGETS = [
    Target("diag GRU, QuasiDEER(diag), batch 2 (tiny)", "diag-gru", "QuasiDEER-diag", 8, 300, 2, 0),
    Target("dense GRU, DEER (tiny)", "gru", "DEER", 4, 300, 1, 0),
]


def targets_for(mode: str) -> list[Target]:
    return TINY_TARGETS if mode == "tiny" else TARGETS


@dataclass
class Case:
    """One executable per mode: a solver on a cell of hidden size `d`, `t` steps, batch `b`."""

    cell: str
    solver: str
    d: int
    t: int
    b: int
    scales: set = field(default_factory=set)  # forward at these scales
    grad_scales: set = field(default_factory=set)  # forward+gradient at these scales
    tags: set = field(default_factory=set)


def build_plan(mode: str) -> list[Case]:
    cases: dict[tuple, Case] = {}

    def add(cell, solver, d, t, b, scales, grad_scales=(), tag="grid"):
        key = (cell, solver, d, t, b)
        c = cases.setdefault(key, Case(cell, solver, d, t, b))
        c.scales |= set(scales)
        c.grad_scales |= set(grad_scales)
        c.tags.add(tag)

    dense = ("DEER", "QuasiDEER", "ELK")
    if mode == "quick":
        scales = (1.0, 6.0)
        for d in (1, 8, 64):
            for b in (1, 16):
                for s in dense:
                    if not (s == "ELK" and b > 1):  # ELK compiles slowly on CPU
                        add("gru", s, d, 10**3, b, scales)
                add("diag-gru", "QuasiDEER-diag", d, 10**3, b, scales)
        for b in (1, 16):
            for s in ("DEER", "QuasiDEER"):
                add("gru", s, 8, 10**4, b, scales)
            add("diag-gru", "QuasiDEER-diag", 64, 10**4, b, scales)
        for s in ("Jacobi", "GaussSeidel16"):
            add("gru", s, 8, 10**3, 1, scales)
        for s in dense:
            add("gru", s, 8, 10**3, 1, (), (1.0,))
        add("diag-gru", "QuasiDEER-diag", 64, 10**3, 1, (), (1.0,))
    elif mode == "full":
        scales = (1.0, 3.0, 6.0)
        for t in (10**3, 10**4, 10**5, 10**6):
            for d in (1, 2, 8, 64, 256):
                for b in (1, 16):
                    for s in dense:
                        add("gru", s, d, t, b, scales, scales)
                    add("diag-gru", "QuasiDEER-diag", d, t, b, scales, scales)
            add("gru", "DEER", 16, t, 1, (1.0,), (1.0,), tag="target line")
        for t in (10**3, 10**4):
            for d in (8, 64):
                for s in ("Jacobi", "GaussSeidel16"):
                    add("gru", s, d, t, 1, scales, scales)
    # "targets" and "tiny": the target configurations alone, forward and gradient.
    for tg in targets_for(mode):
        add(tg.cell, tg.solver, tg.d, tg.t, tg.b, (tg.scale,), (tg.scale,), tag="target")
    return list(cases.values())


# ------------------------------------------------------------------------------ model


def make_cell(kind: str, d: int, seed: int):
    key = jax.random.key(seed)
    if kind == "gru":
        return eqx.nn.GRUCell(INPUT, d, key=key)
    return layers.DiagonalGRUCell(INPUT, d, key=key)


def scaled(cell, scale: float):
    return eqx.tree_at(lambda c: c.weight_hh, cell, cell.weight_hh * scale)


def make_inputs(t: int, b: int, seed: int):
    shape = (t, INPUT) if b == 1 else (b, t, INPUT)
    return jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32)


def batched(fn: Callable, b: int) -> Callable:
    """`fn(params, x)` on one sequence; vmapped over sequences when `b > 1`."""
    return fn if b == 1 else jax.vmap(fn, in_axes=(None, 0))


def reference_fns(static, d: int, b: int):
    """lax.scan of the same cell: `(states(params, xs), value_and_grad(params, xs))`."""
    h0 = jnp.zeros(d, jnp.float32)

    def states(params, x):
        cell = eqx.combine(params, static)
        return jax.lax.scan(lambda h, xt: (cell(xt, h),) * 2, h0, x)[1]

    states_b = batched(states, b)

    def loss(params, xs):
        return jnp.sum(states_b(params, xs) ** 2)

    return states_b, jax.value_and_grad(loss, argnums=(0, 1))


def fixpoint_fns(static, d: int, b: int, solver, max_steps: int):
    """`fixpoint.scan` of the cell: `(states_and_stats(params, xs), value_and_grad)`."""
    h0 = jnp.zeros(d, jnp.float32)

    def states(params, x):
        cell = eqx.combine(params, static)
        _, _, sol = fixpoint.scan(
            lambda h, xt: (cell(xt, h), None),
            h0,
            x,
            solver=solver,
            max_steps=max_steps,
            throw=False,
            return_solution=True,
        )
        stats = (
            sol.stats["num_steps"],
            sol.result._value,
            sol.stats["residual"],
            sol.stats["converged_steps"],
        )
        return sol.value, stats

    states_b = batched(states, b)

    def loss(params, xs):
        return jnp.sum(states_b(params, xs)[0] ** 2)

    return states_b, jax.value_and_grad(loss, argnums=(0, 1))


@jax.jit
def max_abs_diff(a, b):
    return jnp.max(jnp.abs(a - b))


@jax.jit
def grad_rel_err(g, ref):
    """`max|g - ref| / max|ref|` over the leaves of `(loss, grads)`."""
    errs = [
        jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30)
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True)
    ]
    return jnp.max(jnp.stack(errs))


# ---------------------------------------------------------------------------- measuring


def compile_fn(fn: Callable, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0, memory_of(compiled)


def run_timed(compiled, args, reps: int, guard_s: float, min_total_s=0.2, max_reps=50):
    """As `_common.time_jitted`, on an executable compiled once and reused across scales."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first_s = time.perf_counter() - t0
    if first_s >= guard_s:
        return [first_s], first_s, out, True
    times: list[float] = []
    while True:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        typical = max(statistics.median(times), 1e-9)
        target = max(reps, min(max_reps, int(min_total_s / typical)))
        if len(times) >= target or sum(times) >= guard_s:
            break
    return times, first_s, out, False


# ---------------------------------------------------------------------------- estimates


def cell_flops(kind: str, d: int) -> float:
    if kind == "gru":
        return 6 * d * (d + INPUT) + 30 * d
    return 6 * d * INPUT + 40 * d


def tangent_flops(kind: str, d: int) -> float:
    """One state tangent through the cell (one column of its Jacobian)."""
    return 6 * d * d + 30 * d if kind == "gru" else 40 * d


def iter_cost(kind: str, solver: str, d: int) -> tuple[float, float]:
    """(flops, scanned elements) per time step and sample of one iteration."""
    f = cell_flops(kind, d)
    if solver == "DEER":
        return f + d * tangent_flops(kind, d) + 4 * d**3, 3 * d * d + 6 * d
    if solver == "QuasiDEER":  # the exact diagonal: `d` JVPs over one-hot tangents
        return f + d * tangent_flops(kind, d), 3 * d * d + 6 * d
    if solver == "ELK":
        return f + d * tangent_flops(kind, d), 3 * d * d + 25 * d
    if solver == "QuasiDEER-diag":
        return 2 * f, 6 * d
    return f, 4 * d  # Jacobi, GaussSeidel


def mem_estimate(kind: str, solver: str, d: int, t: int, b: int, grad: bool) -> float:
    """Rough bytes of one call (float32); the compiled analysis is checked afterwards."""
    per_step = {
        "DEER": 4 * d * d + 12 * d,
        "QuasiDEER": 4 * d * min(d, 32) + 12 * d,
        "ELK": 4 * d * min(d, 32) + 30 * d,
        "QuasiDEER-diag": 16 * d,
    }.get(solver, 8 * d)
    return 4.0 * t * b * (per_step + INPUT) * (2.5 if grad else 1.0)


class Estimator:
    """Times of calls not yet made: a cost model corrected by the nearest measurement."""

    def __init__(self, flops_per_s: float, scan_s_per_elem: float, step_overhead_s: float):
        self.flops_per_s = flops_per_s
        self.scan_s_per_elem = scan_s_per_elem
        self.step_overhead_s = step_overhead_s
        self.iters: list[tuple] = []  # (cell, solver, d, t, b, scale, iters, ok)
        self.per_iter: list[tuple] = []  # (cell, solver, model, seconds per iteration)
        self.grad_ratio: list[tuple] = []  # (cell, solver, model, grad / fwd time)
        self.ref: list[tuple] = []  # (cell, mode, model, seconds)

    def iter_model(self, kind, solver, d, t, b) -> float:
        flops, elems = iter_cost(kind, solver, d)
        return t * b * (flops / self.flops_per_s + elems * self.scan_s_per_elem)

    def ref_model(self, kind, d, t, b, grad) -> float:
        per_step = self.step_overhead_s + b * cell_flops(kind, d) / (0.1 * self.flops_per_s)
        return t * per_step * (3.0 if grad else 1.0)

    @staticmethod
    def _nearest(records, model):
        if not records:
            return None
        return min(records, key=lambda r: abs(math.log(r[0] / model)))

    def iterations(self, c: Case, scale: float, cap: int) -> int:
        """From the same solver at the same scale, nearest `d`, then largest `t·b` (<= ours)."""
        same = [r for r in self.iters if r[:2] == (c.cell, c.solver) and r[5] == scale]
        if not same:
            return cap if scale >= 5 else min(cap, 30)
        dist = min(abs(math.log(r[2] / c.d)) for r in same)
        same = [r for r in same if abs(math.log(r[2] / c.d)) == dist]
        below = [r for r in same if r[3] * r[4] <= c.t * c.b] or same
        r = max(below, key=lambda r: r[3] * r[4])
        return min(cap, math.ceil(1.5 * r[6]) + 2) if r[7] else cap

    def fwd_s(self, c: Case, scale: float, cap: int) -> float:
        model = self.iter_model(c.cell, c.solver, c.d, c.t, c.b)
        recs = [(m, s) for (k, sv, m, s) in self.per_iter if (k, sv) == (c.cell, c.solver)]
        near = self._nearest(recs, model)
        per_iter = model if near is None else model * near[1] / near[0]
        return per_iter * (self.iterations(c, scale, cap) + 1)

    def grad_s(self, c: Case, scale: float, cap: int, fwd_measured: float | None = None):
        fwd = self.fwd_s(c, scale, cap)
        if self.iterations(c, scale, cap) >= cap:  # forward expected to fail: worst case
            per_iter = fwd / (cap + 1)
            return fwd + 2 * per_iter * c.t
        model = self.iter_model(c.cell, c.solver, c.d, c.t, c.b)
        recs = [(m, r) for (k, sv, m, r) in self.grad_ratio if (k, sv) == (c.cell, c.solver)]
        near = self._nearest(recs, model)
        fwd = fwd if fwd_measured is None else fwd_measured
        return fwd * (3.0 if near is None else near[1])

    def ref_s(self, kind, d, t, b, grad) -> float:
        model = self.ref_model(kind, d, t, b, grad)
        recs = [(m, s) for (k, g, m, s) in self.ref if (k, g) == (kind, grad)]
        near = self._nearest(recs, model)
        return model if near is None else model * near[1] / near[0]

    def record_fwd(self, c: Case, scale: float, seconds: float, iters: int, ok: bool):
        self.iters.append((c.cell, c.solver, c.d, c.t, c.b, scale, iters, ok))
        model = self.iter_model(c.cell, c.solver, c.d, c.t, c.b)
        self.per_iter.append((c.cell, c.solver, model, seconds / (iters + 1)))

    def record_grad(self, c: Case, ratio: float):
        model = self.iter_model(c.cell, c.solver, c.d, c.t, c.b)
        self.grad_ratio.append((c.cell, c.solver, model, ratio))

    def record_ref(self, kind, d, t, b, grad, seconds):
        self.ref.append((kind, grad, self.ref_model(kind, d, t, b, grad), seconds))


def calibrate() -> Estimator:
    """Matmul flop rate, cost per element of a diagonal associative scan, lax.scan step."""

    def best(fn, *args, n=3):
        c = jax.jit(fn).lower(*args).compile()
        jax.block_until_ready(c(*args))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times.append(time.perf_counter() - t0)
        return min(times)

    n = 1024 if jax.default_backend() == "cpu" else 4096
    a = jnp.ones((n, n), jnp.float32)
    flops = 2 * n**3 / best(lambda x: x @ x, a)

    def combine(x, y):
        return x[0] * y[0], y[0] * x[1] + y[1]

    t, d = 10**5, 8
    coef = jnp.full((t, d), 0.5, jnp.float32)
    scan_s = best(lambda a: jax.lax.associative_scan(combine, (a, a))[1], coef) / (t * d)
    steps = 10**4
    step_s = best(
        lambda x: jax.lax.scan(lambda h, xt: (jnp.tanh(h + xt), None), x[0], x)[0],
        jnp.ones((steps, 4), jnp.float32),
    )
    return Estimator(flops, scan_s, step_s / steps)


# ---------------------------------------------------------------------------- running


def result_summary(codes: np.ndarray) -> tuple[str, dict]:
    codes = np.atleast_1d(codes)
    counts = {}
    for code in np.unique(codes):
        name = RESULT_NAMES[int(code)] if 0 <= code < len(RESULT_NAMES) else f"code{code}"
        counts[name] = int(np.sum(codes == code))
    names = [SHORT_RESULT.get(k, k) for k in counts]
    if len(counts) == 1 and codes.size == 1:
        return names[0], counts
    text = ", ".join(f"{n} {v}/{codes.size}" for n, v in zip(names, counts.values(), strict=True))
    return text, counts


def mem_total(m: dict) -> int | None:
    return m.get("total")


class Runner:
    def __init__(self, cli, est: Estimator, budget_bytes: float):
        self.cli = cli
        self.est = est
        self.budget = budget_bytes
        self.rows: list[dict] = []

    def base_row(self, c: Case, scale: float, mode: str) -> dict:
        return {
            "cell": c.cell,
            "solver": c.solver,
            "d": c.d,
            "t": c.t,
            "b": c.b,
            "scale": scale,
            "mode": mode,
            "tags": sorted(c.tags),
            "max_steps": min(c.t, self.cli.max_steps),
        }

    def skip(self, c: Case, scale: float, mode: str, reason: str, **extra):
        self.rows.append({**self.base_row(c, scale, mode), "status": "skipped", "reason": reason})
        self.rows[-1].update(extra)

    def run_group(self, kind: str, d: int, t: int, b: int, cases: list[Case]):
        cli, est = self.cli, self.est
        # What to run, before anything is compiled.
        # A gradient whose forward runs first is decided again once that forward is timed.
        todo: dict[tuple, float] = {}  # (case index, scale, mode) -> estimated seconds
        for i, c in enumerate(cases):
            cap = min(c.t, cli.max_steps)
            for mode, scales in (("fwd", c.scales), ("grad", c.grad_scales)):
                mem = mem_estimate(c.cell, c.solver, d, t, b, mode == "grad")
                for s in sorted(scales):
                    secs = est.fwd_s(c, s, cap) if mode == "fwd" else est.grad_s(c, s, cap)
                    extra = {"est_s": secs, "est_bytes": mem}
                    if mem > self.budget:
                        self.skip(
                            c,
                            s,
                            mode,
                            f"estimated memory {mem / 2**30:.1f} GiB > "
                            f"--mem-gb {self.budget / 2**30:g}",
                            **extra,
                        )
                    elif secs > cli.max_run_s and not (mode == "grad" and s in c.scales):
                        self.skip(
                            c,
                            s,
                            mode,
                            self.too_slow(secs),
                            **extra,
                        )
                    else:
                        todo[(i, s, mode)] = secs
        if not todo:
            return
        ref_fwd_est = est.ref_s(kind, d, t, b, False)
        need_grad = any(m == "grad" for (_, _, m) in todo)
        ref_grad_est = est.ref_s(kind, d, t, b, True) if need_grad else 0.0
        # Only the modes whose reference is too slow are skipped (a forward whose
        # reference fits runs even when the gradient's does not).
        for (i, s, mode), secs in list(todo.items()):
            ref = ref_grad_est if mode == "grad" else ref_fwd_est
            if ref > cli.max_ref_s:
                del todo[(i, s, mode)]
                self.skip(
                    cases[i],
                    s,
                    mode,
                    f"lax.scan reference estimated {ref:.0f}s > --max-ref-s {cli.max_ref_s:g}",
                    est_s=secs,
                )
        if not todo:
            return

        cell0 = make_cell(kind, d, cli.seed)
        static = eqx.partition(cell0, eqx.is_inexact_array)[1]
        xs = make_inputs(t, b, cli.seed)
        ref_states, ref_grad = reference_fns(static, d, b)
        compiled: dict = {}

        def get(key, build):
            if key not in compiled:
                try:
                    fn, args = build()
                    compiled[key] = compile_fn(fn, *args)
                except Exception as e:
                    compiled[key] = e
            return compiled[key]

        for s in sorted({s for (_, s, _) in todo}):
            # Re-estimate with what this group has measured so far (e.g. at scale 1).
            items = []
            for (i, sc, mode), secs in todo.items():
                if sc != s:
                    continue
                if mode == "fwd":
                    secs = est.fwd_s(cases[i], s, min(t, cli.max_steps))
                    if secs > cli.max_run_s:
                        self.skip(cases[i], s, mode, self.too_slow(secs), est_s=secs)
                        continue
                items.append((i, mode, secs))
            if not items:
                continue
            params = eqx.partition(scaled(cell0, s), eqx.is_inexact_array)[0]
            refs = {}
            for mode in sorted({m for (_, m, _) in items}):  # "fwd", then "grad"
                fn = ref_states if mode == "fwd" else ref_grad
                got = get(("ref", mode), lambda fn=fn, params=params: (fn, (params, xs)))
                if isinstance(got, Exception):
                    refs[mode] = got
                    continue
                exe, comp_s, mem = got
                times, first_s, out, _ = run_timed(exe, (params, xs), cli.reps, cli.guard)
                med = statistics.median(times)
                est.record_ref(kind, d, t, b, mode == "grad", med)
                refs[mode] = {
                    "time_s": med,
                    "compile_s": comp_s,
                    "memory": mem,
                    "out": out,
                    "first_s": first_s,
                    "reps": len(times),
                }
            for i, mode, secs in items:
                c = cases[i]
                if mode == "grad":
                    fwd = self.find(c, s, "fwd")
                    measured = fwd["time_s"] if fwd and fwd.get("status") == "ran" else None
                    secs = est.grad_s(c, s, min(t, cli.max_steps), measured)
                    if secs > cli.max_run_s:
                        self.skip(c, s, mode, self.too_slow(secs), est_s=secs)
                        continue
                row = {**self.base_row(c, s, mode), "est_s": secs}
                try:
                    self.run_one(c, s, mode, static, params, xs, refs, get, row)
                except Exception as e:  # a failure is a result; keep going
                    row.update(status="error", reason=short_error(e))
                self.rows.append(row)
                print(progress_line(row), flush=True)
            del refs

    def too_slow(self, secs: float) -> str:
        return f"estimated {secs:.0f}s per call > --max-run-s {self.cli.max_run_s:g}"

    def find(self, c: Case, scale: float, mode: str) -> dict | None:
        key = (c.cell, c.solver, c.d, c.t, c.b, scale, mode)
        for r in reversed(self.rows):
            if (r["cell"], r["solver"], r["d"], r["t"], r["b"], r["scale"], r["mode"]) == key:
                return r
        return None

    def run_one(self, c: Case, s: float, mode: str, static, params, xs, refs, get, row):
        cli = self.cli
        ref = refs[mode]
        if isinstance(ref, Exception):
            raise ref
        cap = min(c.t, cli.max_steps)
        states, vgrad = fixpoint_fns(static, c.d, c.b, SOLVERS[c.solver](), cap)
        fn = states if mode == "fwd" else vgrad
        got = get((c.solver, mode), lambda: (fn, (params, xs)))
        if isinstance(got, Exception):
            raise got
        exe, comp_s, mem = got
        row.update(
            compile_s=comp_s, memory=mem, ref_memory=ref["memory"], ref_compile_s=ref["compile_s"]
        )
        total = mem_total(mem)
        if total is not None and total > self.budget:
            row.update(
                status="skipped",
                reason=f"compiled memory {total / 2**30:.1f} GiB > "
                f"--mem-gb {self.budget / 2**30:g}",
            )
            return
        times, first_s, out, warm_only = run_timed(exe, (params, xs), cli.reps, cli.guard)
        med = statistics.median(times)
        row.update(
            status="ran",
            time_s=med,
            best_s=min(times),
            first_s=first_s,
            reps=len(times),
            warmup_only=warm_only,
            ref_time_s=ref["time_s"],
            ref_reps=ref["reps"],
            speedup=ref["time_s"] / med,
        )
        if mode == "fwd":
            hs, (steps, codes, resid, conv) = out
            steps, codes = np.asarray(steps), np.asarray(codes)
            text, counts = result_summary(codes)
            err = float(max_abs_diff(hs, ref["out"]))
            row.update(
                iters_max=int(steps.max()),
                iters_mean=float(steps.mean()),
                result=text,
                result_counts=counts,
                successful=bool(np.all(codes == 0)),
                residual=float(np.max(np.asarray(resid))),
                converged_steps_min=int(np.min(np.asarray(conv))),
                err=err,
            )
            self.est.record_fwd(c, s, med, int(steps.max()), row["successful"])
        else:
            err = float(grad_rel_err(out, ref["out"]))
            finite = bool(all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(out)))
            row.update(err=err, finite=finite)
            fwd = self.find(c, s, "fwd")
            fwd = [fwd] if fwd and fwd.get("status") == "ran" else []
            if fwd:
                row.update(
                    fwd_result=fwd[-1]["result"],
                    fwd_iters_max=fwd[-1]["iters_max"],
                    fwd_speedup=fwd[-1]["speedup"],
                )
                if fwd[-1]["successful"]:
                    self.est.record_grad(c, med / fwd[-1]["time_s"])


# ---------------------------------------------------------------------------- reporting


def fmt_t(t: int) -> str:
    k = round(math.log10(t))
    return f"1e{k}" if 10**k == t else str(t)


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f}{unit}" if unit == "B" else f"{b:.1f}{unit}"
        b /= 1024
    return str(b)


def fmt_speedup(x) -> str:
    if x is None:
        return "-"
    if x < 0.01:
        return f"{x:.2g}x"
    return f"{x:.3f}x" if x < 1 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def progress_line(r: dict) -> str:
    head = (
        f"  {r['cell']:8s} {r['solver']:14s} D={r['d']:<3d} T={fmt_t(r['t']):3s} "
        f"B={r['b']:<2d} scale={r['scale']:g} {r['mode']:4s}"
    )
    if r.get("status") != "ran":
        return f"{head} {r.get('status')}: {r.get('reason')}"
    extra = f"iters {r['iters_max']} {r['result']}" if r["mode"] == "fwd" else ""
    return (
        f"{head} {fmt_time(r['time_s'])} vs lax.scan {fmt_time(r['ref_time_s'])} "
        f"= {fmt_speedup(r['speedup'])}  err {fmt_sci(r['err'])} {extra}"
    )


def print_results(rows: list[dict]) -> None:
    ran = [r for r in rows if r.get("status") == "ran"]
    key = lambda r: (r["cell"], r["solver"], r["d"], r["t"], r["b"], r["scale"])  # noqa: E731
    fwd = sorted((r for r in ran if r["mode"] == "fwd"), key=key)
    table = [
        [
            r["cell"],
            r["solver"],
            str(r["d"]),
            fmt_t(r["t"]),
            str(r["b"]),
            f"{r['scale']:g}",
            r["result"],
            str(r["iters_max"]),
            fmt_time(r["time_s"]) + ("*" if r["warmup_only"] else ""),
            fmt_time(r["ref_time_s"]),
            fmt_speedup(r["speedup"]),
            fmt_sci(r["err"]),
            fmt_bytes(mem_total(r["memory"])),
            fmt_bytes(mem_total(r["ref_memory"])),
            fmt_time(r["compile_s"]),
        ]
        for r in fwd
    ]
    headers = ["cell", "solver", "D", "T", "B", "scale", "result", "iters", "time", "lax.scan"]
    headers += ["speedup", "max err", "mem", "lax mem", "compile"]
    print_table(headers, table, title="Forward: all hidden states (B, T, D)")
    grad = sorted((r for r in ran if r["mode"] == "grad"), key=key)
    if grad:
        table = [
            [
                r["cell"],
                r["solver"],
                str(r["d"]),
                fmt_t(r["t"]),
                str(r["b"]),
                f"{r['scale']:g}",
                r.get("fwd_result", "-"),
                fmt_time(r["time_s"]) + ("*" if r["warmup_only"] else ""),
                fmt_time(r["ref_time_s"]),
                fmt_speedup(r["speedup"]),
                fmt_speedup(r.get("fwd_speedup")),
                fmt_sci(r["err"]),
                fmt_bytes(mem_total(r["memory"])),
                fmt_bytes(mem_total(r["ref_memory"])),
                fmt_time(r["compile_s"]),
            ]
            for r in grad
        ]
        headers = ["cell", "solver", "D", "T", "B", "scale", "fwd result", "time", "lax.scan"]
        headers += ["speedup", "fwd speedup", "rel err", "mem", "lax mem", "compile"]
        print_table(headers, table, title="Forward + gradient of sum(h²) w.r.t. params and inputs")
    print(
        "\ntime: median steady-state call (* = the warm-up call only, longer than --guard);"
        "\nspeedup = lax.scan time / fixpoint time (same cell, inputs, scale, run); max err ="
        "\nmax|h - h_lax.scan|; rel err = max|g - g_ref|/max|g_ref| (loss and all gradients);"
        "\nmem = temp + argument + output - alias bytes of compiled.memory_analysis();"
        "\ncompile = lower().compile() of the executable (shared by its scales)."
    )
    other = [r for r in rows if r.get("status") != "ran"]
    if other:
        print("\nSkipped / failed:")
        for r in sorted(other, key=lambda r: (*key(r), r["mode"])):
            print(progress_line(r))


def target_rows(rows: list[dict], platform: str, mode: str = "quick") -> list[dict]:
    out = []
    for tg in targets_for(mode):
        match = {
            m: [
                r
                for r in rows
                if (r["cell"], r["solver"], r["d"], r["t"], r["b"], r["scale"], r["mode"])
                == (tg.cell, tg.solver, tg.d, tg.t, tg.b, tg.scale, m)
            ]
            for m in ("fwd", "grad")
        }
        fwd = match["fwd"][-1] if match["fwd"] else None
        for mode in ("fwd", "grad"):
            r = match[mode][-1] if match[mode] else None
            entry = {
                "target": tg.name,
                "mode": mode,
                "config": f"D={tg.d} T={fmt_t(tg.t)} B={tg.b} scale={tg.scale:g}",
                "platform": platform,
            }
            if mode == "fwd":
                entry["need"] = f">= {tg.speedup:g}x, err <= {ERR_TARGET:g}"
            else:
                entry["need"] = ">= 0.5 x fwd speedup"
            if r is None or r.get("status") != "ran":
                why = "not in this plan" if r is None else r.get("reason", r.get("status"))
                entry.update(status="not run", why=why)
            elif mode == "fwd":
                ok = r["successful"] and r["err"] <= ERR_TARGET and r["speedup"] >= tg.speedup
                entry.update(
                    status="met" if ok else "not met",
                    speedup=r["speedup"],
                    err=r["err"],
                    result=r["result"],
                )
            else:
                fwd_ok = fwd is not None and fwd.get("status") == "ran"
                if not fwd_ok:
                    entry.update(status="not run", why="no forward measurement")
                else:
                    need = 0.5 * fwd["speedup"]
                    ok = r["finite"] and fwd["successful"] and r["speedup"] >= need
                    entry.update(
                        status="met" if ok else "not met",
                        speedup=r["speedup"],
                        err=r["err"],
                        need=f">= {need:.3g}x (0.5 x fwd)",
                    )
            out.append(entry)
    return out


def print_targets(targets: list[dict], platform: str) -> None:
    table = [
        [
            t["target"],
            t["mode"],
            t["config"],
            t["need"],
            fmt_speedup(t.get("speedup")),
            fmt_sci(t.get("err")),
            t["status"]
            + (" (on CPU)" if platform == "cpu" and t["status"] != "not run" else "")
            + (f" ({t['why']})" if "why" in t else ""),
        ]
        for t in targets
    ]
    title = "Targets (GPU targets, NVIDIA H100)"
    if platform == "cpu":
        title += (
            ": THIS RUN IS ON CPU; the targets are GPU targets and these CPU figures"
            " are for reference only"
        )
    print_table(
        ["target", "mode", "config", "need", "speedup", "err", "status"], table, title=title
    )


# ------------------------------------------------------------------------------ peers


def _import_brainevent():
    """`brainevent.pararnn`, or `None` and why not."""
    try:
        from brainevent import pararnn
    except Exception as e:  # reported in the table and the JSON, never dropped
        return None, f"unavailable ({type(e).__name__}: {e})"
    return pararnn, None


def brainevent_fn(pararnn, static, d: int, max_its: int, fix_sign: bool):
    """`states(params, xs)` by brainevent's `parallel_rnn` (Newton, `max_its` iterations,
    no convergence test; Jacobian structure detected: dense for the GRU, diagonal for the
    diagonal GRU). `fix_sign`: negate the Jacobian it hands its linear solve (see
    `PEER_NOTE`), through its own `AutoRNNCell` and the helper `parallel_rnn` calls."""

    def states(params, x):
        leaves, treedef = jax.tree.flatten(params)

        def cell_fn(h, xt, *leaves):
            return eqx.combine(jax.tree.unflatten(treedef, list(leaves)), static)(xt, h)

        xb = x if x.ndim == 3 else x[None]  # parallel_rnn wants (B, T, input)
        config = pararnn.NewtonConfig(max_its=max_its)
        if not fix_sign:
            out = pararnn.parallel_rnn(cell_fn, xb, *leaves, state_dim=d, newton_config=config)
        else:
            from brainevent.pararnn._auto_cell import _apply_parallel_auto

            class SignFixed(pararnn.AutoRNNCell):
                def compute_jacobians(self, h, x, *params):
                    return -super().compute_jacobians(h, x, *params)

            cell = SignFixed(cell_fn)
            cell._resolve_structure(d, xb.shape[-1], tuple(leaves))
            cell.num_array_params = len(leaves)
            out = _apply_parallel_auto(cell, xb, d, config, tuple(leaves))
        return out if x.ndim == 3 else out[0]

    return states


PEER_NOTE = (
    "brainevent 0.1.x parallel_rnn hands its linear solve (which solves h[t] = jac[t] h[t-1]"
    " + rhs[t]) the *negated* Jacobian -df/dh, so each Newton step solves the wrong system:"
    " even on the linear cell h = 0.5 h + x its error grows with the iterations (1.4 after 1,"
    " 193 after 10; exact after 1 with the sign fixed). Rows 'as shipped' show that; rows"
    " '+J' negate the Jacobian back (our patch, not brainevent's code) to time its machinery"
    " at its intended accuracy. brainevent >= 0.2 has no pararnn."
)


def peer_cases(mode: str) -> list[tuple[str, str, int, int, int]]:
    """(cell, our solver, D, T, B) at scale 1, each one also in the main plan."""
    if mode in ("targets", "tiny"):
        return []
    out = [("gru", "DEER", 8, 10**3, b) for b in (1, 16)]
    out += [("diag-gru", "QuasiDEER-diag", 64, 10**3, 1)]
    out += [("diag-gru", "QuasiDEER-diag", 64, 10**4, b) for b in (1, 16)]
    if mode == "full":
        out += [("diag-gru", "QuasiDEER-diag", 64, 10**5, b) for b in (1, 16)]
    return out


def run_peers(cli, runner: Runner, mode: str) -> list[dict]:
    """brainevent's `parallel_rnn` on the same cells, inputs and scale as our rows: as
    shipped with its default 3 Newton iterations, and sign-patched with as many iterations
    as ours took; time, error against lax.scan."""
    if not peer_cases(mode):
        reason = f"no peer rows in the {mode} plan"
        return [{"library": "brainevent", "status": "skipped", "reason": reason}]
    pararnn, missing = _import_brainevent()
    if pararnn is None:
        print(f"brainevent: {missing}")
        return [{"library": "brainevent", "status": "unavailable", "reason": missing}]
    rows = []
    for kind, ours_solver, d, t, b in peer_cases(mode):
        case = Case(kind, ours_solver, d, t, b)
        ours = runner.find(case, 1.0, "fwd")
        cell = make_cell(kind, d, cli.seed)
        params, static = eqx.partition(cell, eqx.is_inexact_array)
        xs = make_inputs(t, b, cli.seed)
        ref_states, _ = reference_fns(static, d, b)
        ref_exe, _, _ = compile_fn(ref_states, params, xs)
        ref_times, _, ref_out, _ = run_timed(ref_exe, (params, xs), cli.reps, cli.guard)
        ref_s = statistics.median(ref_times)
        ran = ours is not None and ours.get("status") == "ran"
        # As shipped at its default 3 iterations; sign-patched with as many as ours took.
        variants = [(3, False), (max(ours["iters_max"], 1) if ran else 3, True)]
        for max_its, fix in variants:
            row = {"library": "brainevent", "cell": kind, "d": d, "t": t, "b": b, "scale": 1.0}
            row.update(max_its=max_its, variant="+J (sign patched)" if fix else "as shipped")
            row.update(ours_solver=ours_solver, ref_time_s=ref_s)
            if ran:
                row.update(ours_time_s=ours["time_s"], ours_iters=ours["iters_max"])
                row.update(ours_err=ours["err"])
            try:
                fn = brainevent_fn(pararnn, static, d, max_its, fix)
                exe, comp_s, mem = compile_fn(fn, params, xs)
                times, _, out, warm = run_timed(exe, (params, xs), cli.reps, cli.guard)
            except Exception as e:  # a peer failing is a result, not a crash
                row.update(status="error", reason=short_error(e))
                rows.append(row)
                print(f"  brainevent {kind} D={d} T={fmt_t(t)} B={b}: {row['reason']}")
                continue
            med = statistics.median(times)
            err = float(max_abs_diff(out, ref_out))
            row.update(status="ran", time_s=med, compile_s=comp_s, memory=mem, warmup_only=warm)
            row.update(err=err, ok=bool(err <= ERR_TARGET), speedup=ref_s / med)
            if ran:
                row["time_vs_ours"] = med / ours["time_s"]
            rows.append(row)
    return rows


def print_peers(rows: list[dict]) -> None:
    table = []
    for r in rows:
        if r.get("status") != "ran":
            table.append([r.get("library", "?"), r.get("reason", "?"), *["-"] * 10])
            continue
        table.append(
            [
                f"{r['cell']} D={r['d']} T={fmt_t(r['t'])} B={r['b']}",
                f"{r['variant']}, {r['max_its']} its",
                fmt_time(r["time_s"]),
                fmt_speedup(r["speedup"]),
                fmt_sci(r["err"]),
                "yes" if r["ok"] else "NO",
                f"{r['ours_solver']} {r.get('ours_iters', '-')} its",
                fmt_time(r.get("ours_time_s")),
                fmt_sci(r.get("ours_err")),
                "-" if "time_vs_ours" not in r else f"{r['time_vs_ours']:.2f}",
                fmt_time(r["ref_time_s"]),
                fmt_time(r["compile_s"]),
            ]
        )
    headers = ["config (scale 1)", "brainevent parallel_rnn", "time", "vs lax", "max err"]
    headers += [f"<={ERR_TARGET:g}", "ours", "ours time", "ours err", "time/ours", "lax.scan"]
    headers += ["compile"]
    print_table(headers, table, title="Peers, forward: brainevent.pararnn.parallel_rnn")
    print("\n" + textwrap.fill(PEER_NOTE, 90))


# ------------------------------------------------------------------------------- main


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, set):
        return sorted(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def default_budget_gb() -> float:
    if jax.default_backend() == "cpu":
        return 8.0
    try:
        limit = jax.devices()[0].memory_stats()["bytes_limit"]
        return 0.85 * limit / 2**30
    except Exception:
        return 16.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU subset (default)")
    mode.add_argument("--full", action="store_true", help="the whole grid (for a GPU)")
    mode.add_argument("--targets", action="store_true", help="the target configurations only")
    mode.add_argument("--tiny", action="store_true", help="the targets' cells at tiny sizes")
    parser.add_argument("--out", default=None, help="JSON path (default results/scan_<plat>)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--guard", type=float, default=None, help="seconds of timed calls")
    parser.add_argument("--mem-gb", type=float, default=None, help="memory budget per call")
    parser.add_argument("--max-run-s", type=float, default=None, help="skip slower fixpoint calls")
    parser.add_argument("--max-ref-s", type=float, default=None, help="skip slower lax.scan")
    parser.add_argument("--max-steps", type=int, default=200, help="iteration cap (<= T)")
    parser.add_argument("--precision", default="highest", choices=("highest", "high", "default"))
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", cli.precision)
    platform = jax.default_backend()
    on_cpu = platform == "cpu"
    cli.guard = cli.guard if cli.guard is not None else (2.0 if on_cpu else 10.0)
    cli.mem_gb = cli.mem_gb if cli.mem_gb is not None else default_budget_gb()
    cli.max_run_s = cli.max_run_s if cli.max_run_s is not None else (5.0 if on_cpu else 60.0)
    cli.max_ref_s = cli.max_ref_s if cli.max_ref_s is not None else (8.0 if on_cpu else 120.0)
    mode_name = (
        "full" if cli.full else "targets" if cli.targets else "tiny" if cli.tiny else "quick"
    )
    out_path = Path(cli.out) if cli.out else RESULTS_DIR / f"scan_{platform}.json"
    info = device_info()
    print(
        f"scan benchmark ({mode_name}) on {info['platform']} ({info['device_kind']}), float32, "
        f"matmul precision {cli.precision}, max_steps min(T, {cli.max_steps}), "
        f"memory budget {cli.mem_gb:g} GiB"
    )
    t_start = time.perf_counter()
    est = calibrate()
    print(
        f"calibration: matmul {est.flops_per_s / 1e9:.0f} GFLOP/s, diagonal associative scan "
        f"{est.scan_s_per_elem * 1e9:.2f} ns/element, lax.scan step {est.step_overhead_s * 1e6:.2f}"
        " µs"
    )
    plan = build_plan(mode_name)
    groups: dict[tuple, list[Case]] = {}
    for c in plan:
        groups.setdefault((c.cell, c.d, c.t, c.b), []).append(c)
    runner = Runner(cli, est, cli.mem_gb * 2**30)
    payload = {
        "benchmark": "scan",
        "mode": mode_name,
        "dtype": "float32",
        "matmul_precision": cli.precision,
        "input_size": INPUT,
        "loss": "sum of squares of all hidden states",
        # The solvers' own defaults for a float32 carry (they pass no tolerances).
        "solver_tolerance": dict(
            zip(
                ("rtol", "atol"),
                fixpoint.internal.scan_tolerances(solvers.DEER(), jnp.float32),
                strict=True,
            ),
            norm="max (per step)",
        ),
        "device": info,
        "versions": versions(),
        "git": git_state(),
        "settings": vars(cli),
        "calibration": {
            "matmul_flops_per_s": est.flops_per_s,
            "assoc_scan_s_per_element": est.scan_s_per_elem,
            "lax_scan_s_per_step": est.step_overhead_s,
        },
        "note": (
            "speedup = lax.scan median time / fixpoint median time, same run; targets are "
            "GPU (H100) targets" + ("; this is a CPU run, for reference only" if on_cpu else "")
        ),
    }

    def save(peers: list[dict] | None) -> float:
        """Write the JSON; after every group too (`complete: false`), so that a run
        stopped from outside keeps what it measured."""
        elapsed = time.perf_counter() - t_start
        payload.update(targets=target_rows(runner.rows, platform, mode_name), rows=runner.rows)
        payload.update(peers=peers or [], peer_note=PEER_NOTE, elapsed_s=elapsed)
        payload["complete"] = peers is not None
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_path, json.dumps(payload, indent=1, default=_jsonable))
        return elapsed

    order = sorted(groups, key=lambda k: (k[2] * k[3], k[2], k[1], k[0]))
    if mode_name == "targets":  # T = 1e6, whose lax.scan reference takes longest, last
        order = sorted(groups, key=lambda k: (k[2], k[2] * k[3], k[1], k[0]))
    for n, (kind, d, t, b) in enumerate(order, 1):
        print(
            f"[{n}/{len(order)}] {kind} D={d} T={fmt_t(t)} B={b} "
            f"({time.perf_counter() - t_start:.0f}s)",
            flush=True,
        )
        runner.run_group(kind, d, t, b, groups[(kind, d, t, b)])
        save(None)
    rows = runner.rows
    print("peers (brainevent)", flush=True)
    peers = run_peers(cli, runner, mode_name)
    print_results(rows)
    print_targets(payload["targets"], platform)
    print_peers(peers)
    elapsed = save(peers)
    print(f"\nwrote {out_path} (total {elapsed:.0f}s)")


if __name__ == "__main__":
    main()
