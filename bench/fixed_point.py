"""Forward fixed-point solves: `fixpoint`/`solvers` against optimistix, jaxopt and a bare loop.

What is measured, per (method, configuration):

- compile time: `jax.jit(run).lower(...).compile()`, timed on its own;
- run time: median (and best) of up to `--reps` steady-state calls, each ended with
  `jax.block_until_ready`; the first call after compiling is a warm-up and is excluded;
- steps: mean / max over the batch (each sample is solved on its own under `jax.vmap`;
  the bare loop runs the whole batch until the worst sample has converged);
- residual: `max |f(z) - z|` over the batch, recomputed independently from the returned
  `z` in the same way for every method;
- ok: the fraction of samples that the method itself reports as converged.

Problems (float32):

- `deq`: `f(z, c) = tanh(W z + c)` with `c = U x` (the input injection, computed once per
  solve as in a DEQ), `W` a random symmetric matrix with spectral norm = spectral radius
  `rho` (so `f` is a contraction with rate <= rho), `U ~ N(0, 0.1²/d)`, `x ~ N(0, 1)`;
  `z0 = 0`, target `max|f(z) - z| <= tol` (default 1e-5);
- `crawl`: the nearly linear `f(z, b) = W z + b`, `W` symmetric with eigenvalues evenly
  spread over [0, 0.99], `b = (I - W) z_true` with `z_true ~ U(-1, 1)`, d = 256,
  target residual 1e-6: Picard needs ~1400 steps here, Anderson far fewer.

Methods and the stopping rule each uses (tolerances are made as comparable as the APIs
allow: `atol = tol`, `rtol = 0` wherever there is a choice):

- `ours-*`: `fixpoint.fixed_point` with `solvers.Picard / Anderson(history=5) / Newton /
  Broyden`; stop when `max|f(y) - y| < atol` at the returned `y` and the step the solver
  proposes from there is below `atol` too (the same test for Picard). Newton uses `lx.LU()`
  for d <= 256 and matrix-free `lx.GMRES(rtol=1e-3, atol=tol/10)` above;
- `optx-FPI`: `optx.fixed_point(..., optx.FixedPointIteration(rtol=0, atol=tol))`; stop
  when `max|y - f(y)| < atol` and return `f(y)`;
- `optx-Newton`: `optx.root_find(f(y) - y, optx.Newton(rtol=0, atol=tol))` with its
  default `lx.AutoLinearSolver(well_posed=None)` (which resolves to dense LU here); stop
  when both the Newton step and `f(y) - y` are below `atol` in max-norm. At d = 1024 also
  `optx-Newton-GMRES` with the same GMRES as ours;
- `jaxopt-FPI` / `jaxopt-AA`: `jaxopt.FixedPointIteration` / `AndersonAcceleration
  (history_size=5, ridge=1e-5)` with `tol=tol`, `implicit_diff=False`; their test is on
  the Euclidean norm (`|f(y) - y|_2 <= tol`), which is stricter than the max-norm test of
  the others by up to a factor sqrt(d). We pass `unroll=False`: with `implicit_diff=False`
  jaxopt's default `unroll="auto"` turns the loop into a `scan` over all `maxiter`
  steps (under `vmap` every step is then executed); `jaxopt-AA[auto]` shows that default
  on the smallest configurations;
- `banax-Picard` / `banax-Anderson` / `banax-Broyden`: banax's solvers (`depth=5`,
  `history_size=20`, as ours) with `atol=tol`, `rtol=0`, through `banax.adjoint.JFB`;
  their test is `|f(y) - y|_2 <= atol` (Euclidean, like jaxopt's). banax needs Python
  >= 3.12: run the script from a 3.12 virtual environment to include it (docs, Tests
  and benchmarks);
  elsewhere its rows say why it is unavailable;
- `bare-loop`: a `jax.lax.while_loop` Picard on the whole batch, stopping when
  `max|f(z) - z| <= tol` over the batch: the floor for one-evaluation-per-step methods.

After the table, the time per iteration of `ours-Picard` is compared with the bare loop.

One state (issue 35; `--one-state only` runs just this, `--one-state skip` leaves it out):
`z = tanh(z Wᵀ + x Uᵀ)` with `W = Q diag(linspace(0.5, 0.99, 256)) Qᵀ` (Q orthogonal, from
the QR factorisation of a Gaussian matrix), `U ~ N(0, 1)/16`, `x ~ N(0, 1)·1e-3` of shape
(64, 256), solved as ONE state of 64 × 256 (no `vmap`), float32, from `z0 = 0`,
`rtol = atol = 1e-6`. Methods: `ours-Anderson` (history 5, max-norm), `ours-Picard`,
`optx-FPI` (`FixedPointIteration(rtol=atol=1e-6)`, max-norm), `jaxopt-FPI` / `jaxopt-AA`
(history 5; `tol=1e-6` on the Euclidean norm: stricter) and the bare `lax.while_loop`
(`max|f(z) - z| <= 1e-6`). Reported: compile time (apart), time per solve (median of the
timed calls, each ended with `block_until_ready`), steps, time per step, the residual
recomputed in float64, and each method's time as a multiple of `ours-Anderson`'s.

Run (from the repository root):

    .venv/bin/python bench/fixed_point.py --quick   # d in {64, 256}, batch in {1, 64}
    .venv/bin/python bench/fixed_point.py --full    # d in {64, 256, 1024}, batch {1, 64, 1024}

`--quick` (the default) takes 1.5-3 minutes on a 2-core CPU; `--full` about 21 minutes
there (more than half of it in the two d = 1024, batch = 1024 configs, where single calls
take 5-50 s) and much less on a GPU.

Configurations that would take minutes on their own are skipped and listed as such
(dense-Jacobian Newton at large d × batch on CPU). A per-(method, config) time guard
(`--guard`, seconds) lowers the number of repetitions for slow runs; a single call is
never interrupted. Results go to `bench/results/fixed_point_<platform>.json`. The same
script runs on GPU when JAX sees one (nothing here requires it).
"""

from __future__ import annotations

import argparse
import itertools
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from _common import (
    device_info,
    fmt_sci,
    fmt_time,
    git_state,
    import_peer,
    print_table,
    short_error,
    spread_spectrum,
    symmetric_contraction,
    time_jitted,
    versions,
    write_json,
)
from tqdm import tqdm

import fixpoint
from fixpoint import solvers

# Peers: where one cannot be imported (the GPU machine has no jaxopt), its rows say why.
jaxopt, _JAXOPT_MISSING = import_peer("jaxopt")
optx, _OPTX_MISSING = import_peer("optimistix")


@dataclass(frozen=True)
class Config:
    problem: str  # "deq" (tanh) or "crawl" (linear)
    d: int
    batch: int
    rho: float
    tol: float
    max_steps: int

    @property
    def label(self) -> str:
        return f"{self.problem} d={self.d} B={self.batch} rho={self.rho}"


def activation(cfg: Config) -> Callable:
    return jnp.tanh if cfg.problem == "deq" else (lambda v: v)


def make_data(cfg: Config, seed: int):
    """`(W, C)`: the matrix and the per-sample offsets `c` (rows of `C`)."""
    rng = np.random.default_rng(seed)
    if cfg.problem == "deq":
        w = symmetric_contraction(rng, cfg.d, cfg.rho)
        u = 0.1 * rng.standard_normal((cfg.d, cfg.d)) / np.sqrt(cfg.d)
        x = rng.standard_normal((cfg.batch, cfg.d))
        c = x @ u.T
    else:
        w = spread_spectrum(rng, cfg.d, cfg.rho)
        z_true = rng.uniform(-1, 1, (cfg.batch, cfg.d))
        c = z_true - z_true @ w.T
    return jnp.asarray(w, jnp.float32), jnp.asarray(c, jnp.float32)


def per_sample_fn(cfg: Config) -> Callable:
    act = activation(cfg)

    def fn(z, args):
        w, c = args
        return act(w @ z + c)

    return fn


# --------------------------------------------------------------------------- methods
# A builder takes the config and returns `run(W, C) -> (Z, steps[B], code[B])`, where
# `code` is the method's own result code per sample (0 = converged).


def _code_names(results_cls) -> dict[int, str]:
    """`{code: name}` of an Equinox `Enumeration` (fixpoint.RESULTS, optx.RESULTS)."""
    return {int(item._value): name for name, item in results_cls._name_to_item.items()}


_PLAIN_CODES = {0: "successful", 1: "not_converged"}


def _vmapped(one):
    return jax.vmap(one, in_axes=(None, 0))


def _gmres(cfg: Config):
    # Inexact Newton: a loose relative tolerance. lineax's GMRES also requires the change
    # of its iterate between restarts to be below `atol + rtol |y|`; in float32 an atol of
    # tol/100 = 1e-7 is at rounding level and ends ~1% of solves in spurious "stagnation"
    # after 20 extra restart cycles, so use tol/10.
    return lx.GMRES(rtol=1e-3, atol=cfg.tol / 10)


def _newton_linear_solver(cfg: Config):
    return lx.LU() if cfg.d <= 256 else _gmres(cfg)


def ours(make_solver: Callable[[Config], fixpoint.internal.AbstractSolver]):
    def build(cfg: Config):
        fn, solver = per_sample_fn(cfg), make_solver(cfg)

        def one(w, c):
            sol = fixpoint.fixed_point(
                fn, jnp.zeros_like(c), (w, c), solver=solver, max_steps=cfg.max_steps, throw=False
            )
            return sol.value, sol.stats["num_steps"], sol.result._value

        return _vmapped(one)

    return build


def optx_fpi(cfg: Config):
    fn = per_sample_fn(cfg)
    solver = optx.FixedPointIteration(rtol=0.0, atol=cfg.tol)

    def one(w, c):
        sol = optx.fixed_point(
            fn, solver, jnp.zeros_like(c), (w, c), max_steps=cfg.max_steps, throw=False
        )
        return sol.value, sol.stats["num_steps"], sol.result._value

    return _vmapped(one)


def optx_newton(linear_solver: Callable[[Config], lx.AbstractLinearSolver] | None):
    def build(cfg: Config):
        fn = per_sample_fn(cfg)
        kwargs = {} if linear_solver is None else {"linear_solver": linear_solver(cfg)}
        solver = optx.Newton(rtol=0.0, atol=cfg.tol, **kwargs)

        def root(y, args):
            return fn(y, args) - y

        def one(w, c):
            sol = optx.root_find(
                root, solver, jnp.zeros_like(c), (w, c), max_steps=cfg.max_steps, throw=False
            )
            return sol.value, sol.stats["num_steps"], sol.result._value

        return _vmapped(one)

    return build


def jaxopt_solver(kind: str, unroll: bool | str = False):
    def build(cfg: Config):
        fn = per_sample_fn(cfg)
        common = dict(
            fixed_point_fun=fn,
            maxiter=cfg.max_steps,
            tol=cfg.tol,
            implicit_diff=False,
            unroll=unroll,
        )
        if kind == "fpi":
            solver = jaxopt.FixedPointIteration(**common)
        else:
            solver = jaxopt.AndersonAcceleration(history_size=5, ridge=1e-5, **common)

        def one(w, c):
            params, state = solver.run(jnp.zeros_like(c), (w, c))
            return params, state.iter_num, jnp.where(state.error <= cfg.tol, 0, 1)

        return _vmapped(one)

    return build


def _import_banax():
    """`(banax.adjoint, banax.solver)`, or `None` and why not (banax needs Python >= 3.12)."""
    try:
        from banax import adjoint, solver
    except Exception as e:  # a missing peer is a row in the table, not a crash
        import platform

        ver = platform.python_version()
        return None, f"unavailable ({type(e).__name__}: {e}; needs Python >= 3.12, here {ver})"
    return (adjoint, solver), None


_BANAX, _BANAX_MISSING = _import_banax()


def banax_solver(kind: str):
    """banax's `Picard` / `Anderson(depth=5)` / `Broyden(history_size=20)`, `atol=tol`,
    `rtol=0`; its test is on the Euclidean norm (`|f(y) - y|_2 <= atol`), as jaxopt's.
    Called through `banax.adjoint.JFB` (its forward is the plain `lax` loop)."""

    def build(cfg: Config):
        bx_adjoint, bx_solver = _BANAX
        common = dict(atol=cfg.tol, rtol=0.0, max_steps=cfg.max_steps)
        solver = {
            "picard": lambda: bx_solver.Picard(**common),
            "anderson": lambda: bx_solver.Anderson(depth=5, damp=1.0, **common),
            "broyden": lambda: bx_solver.Broyden(history_size=20, **common),
        }[kind]()
        adjoint, fn = bx_adjoint.JFB(solver=solver), per_sample_fn(cfg)

        def one(w, c):
            sol = adjoint((fn, ((w, c),)), jnp.zeros_like(c))  # banax calls fn(z, (w, c))
            return sol.value, sol.stats.steps, sol.result

        return _vmapped(one)

    return build


def _banax_methods() -> list:
    details = {"Picard": "", "Anderson": "m=5", "Broyden": "mem=20"}
    codes = {0: "successful", 1: "max_steps_reached", 2: "diverged"}
    return [
        Method(
            f"banax-{name}",
            banax_solver(name.lower()),
            "l2|r|",
            codes=codes,
            detail=lambda cfg, d=detail: d,
            skip=lambda cfg: _BANAX_MISSING,
        )
        for name, detail in details.items()
    ]


def bare_loop(cfg: Config):
    act = activation(cfg)

    def run(w, c_batch):
        def f(z):
            return act(z @ w.T + c_batch)

        def cond(s):
            z, fz, k = s
            return (jnp.max(jnp.abs(fz - z)) > cfg.tol) & (k < cfg.max_steps)

        def body(s):
            _, fz, k = s
            return fz, f(fz), k + 1

        z0 = jnp.zeros_like(c_batch)
        z, fz, k = jax.lax.while_loop(cond, body, (z0, f(z0), jnp.array(0)))
        code = jnp.where(jnp.max(jnp.abs(fz - z), axis=1) <= cfg.tol, 0, 1)
        return z, jnp.full(c_batch.shape[0], k), code

    return run


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[Config], Callable]
    norm: str  # the quantity the method's own stopping test uses
    codes: dict[int, str] = field(default_factory=lambda: _PLAIN_CODES)
    detail: Callable[[Config], str] = lambda cfg: ""
    applies: Callable[[Config], bool] = lambda cfg: True
    skip: Callable[[Config], str | None] = lambda cfg: None


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _dense_newton_skip(cfg: Config) -> str | None:
    # A dense Jacobian per sample: batch * d JVPs and batch LU factorisations of d x d
    # per Newton step (at d = 1024, batch = 64: ~0.2 TFLOP and 256 MiB per step).
    if _on_cpu() and cfg.d >= 1024 and cfg.batch > 1:
        return "dense d×d Jacobian + LU per sample: minutes on CPU"
    return None


def _newton_detail(cfg: Config) -> str:
    return "LU" if cfg.d <= 256 else "GMRES(1e-3)"


OURS = _code_names(fixpoint.RESULTS)
OPTX = _code_names(optx.RESULTS) if optx is not None else {}

METHODS = [
    Method(
        "ours-Picard",
        ours(lambda c: solvers.Picard(rtol=0.0, atol=c.tol)),
        "max|r|",
        codes=OURS,
    ),
    Method(
        "ours-Anderson",
        ours(lambda c: solvers.Anderson(rtol=0.0, atol=c.tol, history=5)),
        "max|r|",
        codes=OURS,
        detail=lambda cfg: "m=5",
    ),
    Method(
        "ours-Newton",
        ours(
            lambda c: solvers.Newton(rtol=0.0, atol=c.tol, linear_solver=_newton_linear_solver(c))
        ),
        "max|r|",
        codes=OURS,
        detail=_newton_detail,
    ),
    Method(
        "ours-Broyden",
        ours(lambda c: solvers.Broyden(rtol=0.0, atol=c.tol)),
        "max|r|",
        codes=OURS,
        detail=lambda cfg: "mem=20",
    ),
    Method("optx-FPI", optx_fpi, "max|r|", codes=OPTX, skip=lambda cfg: _OPTX_MISSING),
    Method(
        "optx-Newton",
        optx_newton(None),
        "max|dy|&max|r|",
        codes=OPTX,
        detail=lambda cfg: "Auto→LU",
        skip=lambda cfg: _OPTX_MISSING or _dense_newton_skip(cfg),
    ),
    Method(
        "optx-Newton-GMRES",
        optx_newton(_gmres),
        "max|dy|&max|r|",
        codes=OPTX,
        detail=lambda cfg: "GMRES(1e-3)",
        applies=lambda cfg: cfg.d > 256,
        skip=lambda cfg: _OPTX_MISSING,
    ),
    Method(
        "jaxopt-FPI",
        jaxopt_solver("fpi"),
        "l2|dy|",
        detail=lambda cfg: "unroll=False",
        skip=lambda cfg: _JAXOPT_MISSING,
    ),
    Method(
        "jaxopt-AA",
        jaxopt_solver("aa"),
        "l2|r|",
        detail=lambda cfg: "m=5 unroll=False",
        skip=lambda cfg: _JAXOPT_MISSING,
    ),
    Method(
        "jaxopt-AA[auto]",
        jaxopt_solver("aa", unroll="auto"),
        "l2|r|",
        detail=lambda cfg: "m=5 unroll=auto(scan)",
        applies=lambda cfg: cfg.problem == "deq" and cfg.d == 64 and cfg.rho == 0.9,
        skip=lambda cfg: _JAXOPT_MISSING,
    ),
    *_banax_methods(),
    Method("bare-loop", bare_loop, "max|r| (batch)", detail=lambda cfg: "lax.while_loop"),
]


def configs(mode: str, tol: float) -> list[Config]:
    if mode == "full":
        ds, batches = (64, 256, 1024), (1, 64, 1024)
    else:
        ds, batches = (64, 256), (1, 64)
    out = [
        Config("deq", d, b, rho, tol, 1000)
        for d, b, rho in itertools.product(ds, batches, (0.9, 0.99))
    ]
    out += [Config("crawl", 256, b, 0.99, 1e-6, 5000) for b in (1, 64)]
    return out


def residuals(cfg: Config, w, c, z) -> np.ndarray:
    """`max |f(z) - z|` per sample, computed the same way for every method.

    In float64 with NumPy, so that the check itself adds no float32 rounding.
    """
    w, c, z = (np.asarray(a, np.float64) for a in (w, c, z))
    v = z @ w.T + c
    fz = np.tanh(v) if cfg.problem == "deq" else v
    return np.max(np.abs(fz - z), axis=1)


def run_one(method: Method, cfg: Config, w, c, reps: int, guard: float) -> dict:
    row = {"method": method.name, "detail": method.detail(cfg), "norm": method.norm}
    row.update(asdict(cfg))
    reason = method.skip(cfg)
    if reason is not None:
        row["skipped"] = reason
        return row
    run = method.build(cfg)
    try:
        timing = time_jitted(run, w, c, reps=reps, guard_s=guard)
    except Exception as e:  # a peer failing to trace/compile is a result, not a crash
        row["error"] = short_error(e)
        return row
    z, steps, code = timing.out
    steps, code = np.asarray(steps), np.asarray(code)
    counts = {
        method.codes.get(int(k), str(k)): int(v)
        for k, v in zip(*np.unique(code, return_counts=True), strict=True)
    }
    res = residuals(cfg, w, c, z)
    row.update(
        compile_s=timing.compile_s,
        first_call_s=timing.first_s,
        run_s=timing.median,
        run_best_s=timing.best,
        reps=len(timing.times),
        steps_mean=float(steps.mean()),
        steps_max=int(steps.max()),
        residual_max=float(res.max()),
        ok_frac=float(np.mean(code == 0)),
        result_counts=counts,
        reached_tol_frac=float(np.mean(res <= cfg.tol)),
    )
    return row


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        cfg = f"{r['problem']} d={r['d']} B={r['batch']} ρ={r['rho']}"
        name = r["method"] + (f" [{r['detail']}]" if r["detail"] else "")
        if "skipped" in r or "error" in r:
            msg = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR {r['error']}"
            out.append([cfg, name, "-", "-", "-", "-", "-", msg])
            continue
        fails = ", ".join(f"{v}×{k}" for k, v in r["result_counts"].items() if k != "successful")
        flag = "" if r["reached_tol_frac"] == 1.0 else f"≤tol {r['reached_tol_frac']:.0%}"
        flag = "; ".join(x for x in (fails, flag) if x)
        out.append(
            [
                cfg,
                name,
                fmt_time(r["compile_s"]),
                fmt_time(r["run_s"]) + (f" ×{r['reps']}" if r["reps"] < 5 else ""),
                f"{r['steps_mean']:.1f}/{r['steps_max']}",
                fmt_sci(r["residual_max"]),
                f"{r['ok_frac']:.0%}",
                flag.strip(),
            ]
        )
    return out


def per_iteration(rows: list[dict]) -> list[dict]:
    """Time per loop iteration of the plain fixed-point iterations, per config.

    `run time / (steps + 1)`: every one of these makes one evaluation per iteration
    (plus one at the start). Under `vmap` a loop runs until the slowest sample stops, so
    the iteration count is `steps_max`. `ratio` = ours-Picard / bare-loop.
    """
    out = []
    by_cfg: dict[str, dict[str, dict]] = {}
    for r in rows:
        key = f"{r['problem']} d={r['d']} B={r['batch']} rho={r['rho']}"
        by_cfg.setdefault(key, {})[r["method"]] = r
    for key, ms in by_cfg.items():
        per = {}
        for name in ("ours-Picard", "optx-FPI", "jaxopt-FPI", "bare-loop"):
            r = ms.get(name)
            if r and "run_s" in r:
                per[name] = (r["steps_max"], r["run_s"] / (r["steps_max"] + 1))
        if "ours-Picard" not in per or "bare-loop" not in per:
            continue
        out.append(
            {
                "config": key,
                "steps": {k: v[0] for k, v in per.items()},
                "per_iter_s": {k: v[1] for k, v in per.items()},
                "ratio": per["ours-Picard"][1] / per["bare-loop"][1],
            }
        )
    return out


# --------------------------------------------------------------------------- one state
# Issue 35: one (64, 256) state, no `vmap`; the headline of Anderson against the peers.

ONE_STATE_TOL = 1e-6


def one_state_data(seed: int):
    """`(W, U, X)` of the one-state problem (see the module docstring)."""
    rng = np.random.default_rng(seed)
    d, batch = 256, 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w = (q * np.linspace(0.5, 0.99, d)) @ q.T
    u = rng.standard_normal((d, d)) / 16
    x = rng.standard_normal((batch, d)) * 1e-3
    return tuple(jnp.asarray(a, jnp.float32) for a in (w, u, x))


def _one_state_fn(z, args):
    w, u, x = args
    return jnp.tanh(z @ w.T + x @ u.T)


def _one_state_methods(max_steps: int) -> dict[str, tuple[str, Callable]]:
    """`{name: (stopping test, run(args) -> (z, steps))}`."""
    tol, fn = ONE_STATE_TOL, _one_state_fn

    def ours(solver):
        def run(args):
            z0 = jnp.zeros_like(args[2])
            sol = fixpoint.fixed_point(
                fn, z0, args, solver=solver, max_steps=max_steps, throw=False
            )
            return sol.value, sol.stats["num_steps"]

        return run

    def optx_run(args):
        solver = optx.FixedPointIteration(rtol=tol, atol=tol)
        z0 = jnp.zeros_like(args[2])
        sol = optx.fixed_point(fn, solver, z0, args, max_steps=max_steps, throw=False)
        return sol.value, sol.stats["num_steps"]

    def jaxopt_run(kind):
        def run(args):
            common = dict(fixed_point_fun=fn, maxiter=max_steps, tol=tol, implicit_diff=False)
            if kind == "fpi":
                solver = jaxopt.FixedPointIteration(unroll=False, **common)
            else:
                solver = jaxopt.AndersonAcceleration(
                    history_size=5, ridge=1e-5, unroll=False, **common
                )
            params, state = solver.run(jnp.zeros_like(args[2]), args)
            return params, state.iter_num

        return run

    def bare(args):
        def cond(s):
            z, fz, k = s
            return (jnp.max(jnp.abs(fz - z)) > tol) & (k < max_steps)

        def body(s):
            _, fz, k = s
            return fz, fn(fz, args), k + 1

        z0 = jnp.zeros_like(args[2])
        z, _, k = jax.lax.while_loop(cond, body, (z0, fn(z0, args), jnp.array(0)))
        return z, k

    anderson = solvers.Anderson(rtol=tol, atol=tol, history=5, norm=fixpoint.max_norm)
    picard = solvers.Picard(rtol=tol, atol=tol, norm=fixpoint.max_norm)
    return {
        "ours-Anderson": ("max|r|, rtol=atol", ours(anderson)),
        "ours-Picard": ("max|r|, rtol=atol", ours(picard)),
        "optx-FPI": ("max|r|, rtol=atol", optx_run),
        "jaxopt-FPI": ("l2|dy| <= tol", jaxopt_run("fpi")),
        "jaxopt-AA": ("l2|r| <= tol", jaxopt_run("aa")),
        "bare-loop": ("max|r| <= tol", bare),
    }


def one_state(reps: int, guard: float, seed: int, wanted: set[str]) -> list[dict]:
    """Time every method on the one-state problem; ratios against `ours-Anderson`."""
    args = one_state_data(seed)
    rows = []
    for name, (norm, run) in _one_state_methods(max_steps=5000).items():
        if wanted and name not in wanted:
            continue
        row: dict = {"method": name, "norm": norm}
        missing = {"optx": _OPTX_MISSING, "jaxopt": _JAXOPT_MISSING}.get(name.split("-")[0])
        if missing:
            row["error"] = missing
            rows.append(row)
            continue
        try:
            timing = time_jitted(run, args, reps=reps, guard_s=guard)
        except Exception as e:  # a peer failing is a result, not a crash
            row["error"] = short_error(e)
            rows.append(row)
            continue
        z, steps = timing.out
        w, u, x = (np.asarray(a, np.float64) for a in args)
        zz = np.asarray(z, np.float64)
        steps = int(steps)
        row.update(
            compile_s=timing.compile_s,
            run_s=timing.median,
            run_best_s=timing.best,
            reps=len(timing.times),
            steps=steps,
            per_step_s=timing.median / max(steps, 1),
            residual=float(np.max(np.abs(np.tanh(zz @ w.T + x @ u.T) - zz))),
        )
        rows.append(row)
    base = next((r for r in rows if r["method"] == "ours-Anderson" and "run_s" in r), None)
    for r in rows:
        if base is not None and "run_s" in r:
            r["time_vs_ours_anderson"] = r["run_s"] / base["run_s"]
    return rows


def print_one_state(rows: list[dict]) -> None:
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["method"], r["norm"], "-", "-", "-", "-", "-", f"ERROR {r['error']}"])
            continue
        ratio = r.get("time_vs_ours_anderson")
        table.append(
            [
                r["method"],
                r["norm"],
                fmt_time(r["compile_s"]),
                fmt_time(r["run_s"]),
                str(r["steps"]),
                fmt_time(r["per_step_s"]),
                fmt_sci(r["residual"]),
                "-" if ratio is None else f"{ratio:.2f}x",
            ]
        )
    print_table(
        ["method", "stopping test", "compile", "run (median)", "steps", "per step"]
        + ["max|f(z)-z|", "time / ours-Anderson"],
        table,
        title="One state: tanh(z Wᵀ + x Uᵀ), z of 64×256, float32, tol 1e-6 (no vmap)",
        left=(0, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small grid (default)")
    mode.add_argument("--full", action="store_true", help="full grid")
    parser.add_argument("--tol", type=float, default=1e-5, help="target max|f(z)-z| (deq)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument(
        "--guard", type=float, default=20.0, help="seconds of timed calls per (method, config)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="", help="comma-separated subset of method names")
    parser.add_argument(
        "--configs", default="", help="keep configs whose label contains one of these (comma-sep.)"
    )
    parser.add_argument(
        "--one-state",
        choices=("run", "only", "skip"),
        default="run",
        help="the one-state problem of issue 35: with the grid (run), alone (only), or not",
    )
    cli = parser.parse_args()
    mode_name = "full" if cli.full else "quick"
    # The one-state problem alone does not overwrite the grid's results.
    out_name = "fixed_point_one_state" if cli.one_state == "only" else "fixed_point"
    wanted = {m for m in cli.methods.split(",") if m}

    info = device_info()
    print(f"fixed_point benchmark ({mode_name}) on {info['platform']} ({info['device_kind']})")
    cfgs = [] if cli.one_state == "only" else configs(mode_name, cli.tol)
    if cli.configs:
        keys = cli.configs.split(",")
        cfgs = [c for c in cfgs if any(k in c.label for k in keys)]
    rows: list[dict] = []
    payload = {"benchmark": "fixed_point", "mode": mode_name, "device": info}
    payload.update(versions=versions(), git=git_state(), settings=vars(cli), rows=rows)
    t_start = time.perf_counter()
    for cfg in tqdm(cfgs, desc="configs", unit="cfg"):
        # The data depend on the config alone, not on which other configs run.
        w, c = make_data(cfg, cli.seed + zlib.crc32(cfg.label.encode()) % 10_000)
        for m in METHODS:
            if not m.applies(cfg) or (wanted and m.name not in wanted):
                continue
            rows.append(run_one(m, cfg, w, c, cli.reps, cli.guard))
        payload["elapsed_s"] = time.perf_counter() - t_start
        write_json(out_name, payload)  # after every config: partial results survive

    if cli.one_state != "skip":
        payload["one_state"] = one_state(cli.reps, cli.guard, cli.seed, wanted)
        write_json(out_name, payload)
    if not cfgs:
        print_one_state(payload["one_state"])
        payload["elapsed_s"] = time.perf_counter() - t_start
        print(f"\nwrote {write_json(out_name, payload)} (total {payload['elapsed_s']:.0f}s)")
        return

    headers = ["config", "method", "compile", "run (median)", "steps mean/max"]
    headers += ["max|f(z)-z|", "ok", "note"]
    print_table(headers, table_rows(rows), title="Forward solves (float32)", left=(0, 1, 7))
    print(
        "\nStopping tests: ours, optx-FPI, bare-loop: max-norm of f(z)-z < tol (atol=tol, rtol=0;"
        "\nours also needs its proposed step < tol);"
        "\noptx-Newton: max-norm of the Newton step AND of f(z)-z < tol;"
        "\njaxopt: Euclidean norm of the step (FPI) / of f(z)-z (AA) <= tol (stricter);"
        "\nbanax: Euclidean norm of f(z)-z <= tol."
        "\n'ok' = fraction of samples the method reports converged; 'note': the other result"
        "\ncodes (count×name) and, if not all, the fraction of samples whose residual recomputed"
        "\nin float64 is <= tol ('≤tol'). ×n = fewer timed repetitions (time guard)."
    )
    ratios = per_iteration(rows)
    payload["per_iteration"] = ratios
    if ratios:
        names = ("ours-Picard", "optx-FPI", "jaxopt-FPI", "bare-loop")
        print_table(
            ["config", "", *(f"{n} steps/iter" for n in names), "ours/bare"],
            [
                [
                    r["config"],
                    "",
                    *(
                        f"{r['steps'][n]}/{fmt_time(r['per_iter_s'][n])}"
                        if n in r["steps"]
                        else "-"
                        for n in names
                    ),
                    f"{r['ratio']:.2f}",
                ]
                for r in ratios
            ],
            title="Time per iteration, one evaluation per step: run time / (max steps + 1)",
        )
    if "one_state" in payload:
        print_one_state(payload["one_state"])
    payload["elapsed_s"] = time.perf_counter() - t_start
    path = write_json(out_name, payload)
    print(f"\nwrote {path} (total {payload['elapsed_s']:.0f}s)")


if __name__ == "__main__":
    main()
