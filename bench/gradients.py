"""Gradients through a fixed point: implicit adjoints of `fixpoint` against optimistix and jaxopt.

Problem: `z*(x, W) = tanh(W z* + x)`, `W` a random symmetric matrix with spectral norm
0.9 (a contraction), `x ~ N(0, 0.1²)`, loss `L = sum(z*²)`, gradients with respect to
both `x` and `W`, at n in {64, 256, 1024}, float32 (or float64 with `--x64`).

Per method:

- compile: `lower(...).compile()` of the jitted gradient function;
- fwd: the jitted loss alone (forward solve), steady state;
- grad: the jitted `jax.grad` of the loss w.r.t. `(x, W)` (forward + backward);
- bwd = grad - fwd (from the best-of-reps times, which are less sensitive to other load
  on the machine), the cost of the backward (linear) solve and the VJPs;
- vmap64: the gradient of `sum_b L(x_b, W)` over a batch of 64 inputs, each sample
  solved on its own under `jax.vmap`;
- err x / err W: `max|g - g_ref| / max|g_ref|` against a float64 NumPy reference with a
  dense solve: `dL/dx = S (I - Wᵀ S)⁻¹ 2z*`, `S = diag(1 - z*²)`, `dL/dW = (dL/dx) z*ᵀ`
  (and `err v64` for the batched gradient).

Timings are medians of up to `--reps` calls after a warm-up call, each ended with
`jax.block_until_ready`; compile time is reported apart.

Methods (forward tolerance `atol = tol`, `rtol = 0` unless said otherwise):

- ours: `fixpoint.fixed_point` with `solvers.Picard` / `solvers.Anderson`, and
  `ImplicitAdjoint()` (default: fixpoint's own restarted GMRES, matrix-free, stopping at
  `|A x - b|_2 <= max(atol, rtol |b|_2)` with `rtol` = the larger forward tolerance),
  `ImplicitAdjoint(linear_solver=lx.LU())` (dense Jacobian; answer checked against the same bound),
  `NeumannAdjoint(terms=20)` (approximate by design: error ~ 0.9^20);
- optimistix: `optx.fixed_point(FixedPointIteration)` with `optx.ImplicitAdjoint()`
  (its default `lx.AutoLinearSolver(well_posed=None)`, which resolves to dense `lx.LU`
  for the untagged Jacobian operator) and with `lx.GMRES(rtol=0, atol=tol)`;
- jaxopt: `FixedPointIteration(implicit_diff=True)` with its default backward solve
  (`implicit_diff_solve=None`, i.e. `solve_normal_cg`: CG on the normal equations,
  tolerance 1e-5 relative), the same passed explicitly, and `solve_gmres`. jaxopt's
  forward test is `|f(z) - z|_2 <= tol` (Euclidean; stricter than max-norm).

Second part: backward memory vs the number of forward steps. The forward solve is forced
to run exactly `max_steps` in {10, 100, 1000} steps (Picard with `atol = 1e-30`,
`throw=False`), and `jax.jit(grad).lower(...).compile().memory_analysis()` is reported for
`ImplicitAdjoint` (GMRES with explicit tolerances, since the forward ones are
unattainable), `UnrolledAdjoint()` (recursive checkpointing) and a plain `lax.scan`
Picard loop differentiated by JAX (stores every iterate) for reference.

Run (from the repository root):

    .venv/bin/python bench/gradients.py --quick          # 1-3.5 minutes on 2 CPU cores
    .venv/bin/python bench/gradients.py --full           # about 7 minutes on 2 CPU cores
    .venv/bin/python bench/gradients.py --quick --x64    # float64

`--quick` uses n in {64, 256} for the comparison (the memory table uses n = 1024 in both
modes); `--full` adds n = 1024. `--methods ours,optx` keeps the rows whose method and
backward solve begin so; a peer that cannot be imported gets rows saying why. Results go
to `bench/results/gradients_<platform>.json` (`gradients_x64_<platform>.json` with
`--x64`), rewritten after every row.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax

# `--x64` must take effect before any array is created.
if __name__ == "__main__":
    import sys

    if "--x64" in sys.argv:
        jax.config.update("jax_enable_x64", True)

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

RHO = 0.9
MAX_STEPS = 500
BATCH = 64


def f(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


# --------------------------------------------------------------------------- methods
# Each builder takes the tolerance and returns `solve(x, W) -> z*`, differentiable.


def ours(solver_name: str, adjoint: Callable[[float], fixpoint.AbstractAdjoint]):
    def build(tol):
        cls = {"picard": solvers.Picard, "anderson": solvers.Anderson}[solver_name]
        solver = cls(rtol=0.0, atol=tol)
        adj = adjoint(tol)

        def solve(x, w):
            sol = fixpoint.fixed_point(
                f,
                jnp.zeros_like(x),
                (w, x),
                solver=solver,
                adjoint=adj,
                max_steps=MAX_STEPS,
                throw=False,
            )
            return sol.value

        return solve

    return build


def optx_fpi(linear_solver: Callable[[float], lx.AbstractLinearSolver] | None):
    def build(tol):
        solver = optx.FixedPointIteration(rtol=0.0, atol=tol)
        adjoint = (
            optx.ImplicitAdjoint()
            if linear_solver is None
            else optx.ImplicitAdjoint(linear_solver=linear_solver(tol))
        )

        def solve(x, w):
            sol = optx.fixed_point(
                f,
                solver,
                jnp.zeros_like(x),
                (w, x),
                max_steps=MAX_STEPS,
                throw=False,
                adjoint=adjoint,
            )
            return sol.value

        return solve

    return build


def _f_jaxopt(z, w, x):  # jaxopt passes `*args` separately
    return f(z, (w, x))


def jaxopt_fpi(solve_kind: str):
    def build(tol):
        kwargs = {}
        if solve_kind == "normal_cg":
            kwargs["implicit_diff_solve"] = jaxopt.linear_solve.solve_normal_cg
        elif solve_kind == "gmres":
            kwargs["implicit_diff_solve"] = jaxopt.linear_solve.solve_gmres
        solver = jaxopt.FixedPointIteration(
            fixed_point_fun=_f_jaxopt, maxiter=MAX_STEPS, tol=tol, implicit_diff=True, **kwargs
        )

        def solve(x, w):
            return solver.run(jnp.zeros_like(x), w, x).params

        return solve

    return build


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[float], Callable]
    backward: str  # what the backward solve is


METHODS = [
    Method(
        "ours Picard", ours("picard", lambda t: fixpoint.ImplicitAdjoint()), "own GMRES (default)"
    ),
    Method(
        "ours Picard",
        ours("picard", lambda t: fixpoint.ImplicitAdjoint(linear_solver=lx.LU())),
        "LU",
    ),
    Method(
        "ours Anderson",
        ours("anderson", lambda t: fixpoint.ImplicitAdjoint()),
        "own GMRES (default)",
    ),
    Method(
        "ours Anderson",
        ours("anderson", lambda t: fixpoint.ImplicitAdjoint(linear_solver=lx.LU())),
        "LU",
    ),
    Method(
        "ours Anderson",
        ours("anderson", lambda t: fixpoint.NeumannAdjoint(terms=20)),
        "Neumann(20) approx.",
    ),
    Method("optx FPI", optx_fpi(None), "Auto(well_posed=None)→LU (default)"),
    Method("optx FPI", optx_fpi(lambda t: lx.GMRES(rtol=0.0, atol=t)), "GMRES(rtol=0, atol=tol)"),
    Method("jaxopt FPI", jaxopt_fpi("default"), "default (=solve_normal_cg)"),
    Method("jaxopt FPI", jaxopt_fpi("normal_cg"), "solve_normal_cg (explicit)"),
    Method("jaxopt FPI", jaxopt_fpi("gmres"), "solve_gmres"),
]


# ------------------------------------------------------------------------- reference


def reference_grads(x: np.ndarray, w: np.ndarray):
    """`(z*, dL/dx, dL/dW)` in float64 with a dense solve (`x` may be a batch)."""
    x = np.atleast_2d(np.asarray(x, np.float64))
    w = np.asarray(w, np.float64)
    n = w.shape[0]
    zs, gxs = [], []
    for xb in x:
        z = np.zeros(n)
        for _ in range(2000):  # Picard to near convergence, then Newton to polish
            z_new = np.tanh(w @ z + xb)
            if np.max(np.abs(z_new - z)) < 1e-13:
                break
            z = z_new
        for _ in range(3):
            s = 1 - np.tanh(w @ z + xb) ** 2
            g = z - np.tanh(w @ z + xb)
            z = z - np.linalg.solve(np.eye(n) - s[:, None] * w, g)
        s = 1 - z**2
        gx = s * np.linalg.solve(np.eye(n) - w.T * s[None, :], 2 * z)
        zs.append(z)
        gxs.append(gx)
    z, gx = np.stack(zs), np.stack(gxs)
    gw = gx.T @ z  # sum over the batch of outer(gx_b, z_b)
    return z, gx, gw


def rel_err(g, ref) -> float:
    g = np.asarray(g, np.float64)
    return float(np.max(np.abs(g - ref)) / np.max(np.abs(ref)))


# ------------------------------------------------------------------------- comparison


def compare(
    n: int, tol: float, dtype, reps: int, guard: float, seed: int, wanted=(), on_row=None
) -> list[dict]:
    """One row per method; `on_row(row)` is called as each one is done."""
    rng = np.random.default_rng(seed)
    w_np = symmetric_contraction(rng, n, RHO)
    x_np = 0.1 * rng.standard_normal(n)
    xb_np = 0.1 * rng.standard_normal((BATCH, n))
    w, x, xb = (jnp.asarray(a, dtype) for a in (w_np, x_np, xb_np))
    _, gx_ref, gw_ref = reference_grads(x_np, w_np)
    _, gxb_ref, gwb_ref = reference_grads(xb_np, w_np)

    rows = []

    def done(row):
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for m in tqdm(METHODS, desc=f"n={n}", unit="method", leave=False):
        row = {"n": n, "method": m.name, "backward": m.backward, "tol": tol}
        missing = {"optx": _OPTX_MISSING, "jaxopt": _JAXOPT_MISSING}.get(m.name.split()[0])
        if wanted and not f"{m.name} {m.backward}".startswith(wanted):
            continue
        if missing:
            row["error"] = missing
            done(row)
            continue
        solve = m.build(tol)

        def loss(x, w, solve=solve):
            return jnp.sum(solve(x, w) ** 2)

        def batch_loss(xb, w, solve=solve):
            return jnp.sum(jax.vmap(solve, in_axes=(0, None))(xb, w) ** 2)

        try:
            fwd = time_jitted(loss, x, w, reps=reps, guard_s=guard)
            grad = time_jitted(jax.grad(loss, argnums=(0, 1)), x, w, reps=reps, guard_s=guard)
            vgrad = time_jitted(
                jax.grad(batch_loss, argnums=(0, 1)), xb, w, reps=reps, guard_s=guard
            )
        except Exception as e:  # a failure is a result; keep going
            row["error"] = short_error(e)
            done(row)
            continue
        gx, gw = grad.out
        gxb, gwb = vgrad.out
        row.update(
            compile_s=grad.compile_s,
            fwd_s=fwd.median,
            grad_s=grad.median,
            # Best-of times for the difference: less sensitive to other load on the machine.
            bwd_s=grad.best - fwd.best,
            vmap64_grad_s=vgrad.median,
            vmap64_compile_s=vgrad.compile_s,
            reps=min(len(fwd.times), len(grad.times), len(vgrad.times)),
            err_x=rel_err(gx, gx_ref[0]),
            err_w=rel_err(gw, gw_ref),
            err_vmap64=max(rel_err(gxb, gxb_ref), rel_err(gwb, gwb_ref)),
            finite=bool(np.all(np.isfinite(np.asarray(gx))) and np.all(np.isfinite(gw))),
        )
        done(row)
    return rows


# ----------------------------------------------------------------------------- memory


def memory_rows(n: int, steps_list, dtype, reps: int, guard: float, seed: int) -> list[dict]:
    """Backward memory of implicit vs unrolled differentiation at a forced step count."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(symmetric_contraction(rng, n, RHO), dtype)
    x = jnp.asarray(0.1 * rng.standard_normal(n), dtype)
    forced = solvers.Picard(rtol=0.0, atol=1e-30)  # never met: runs exactly max_steps

    def ours_loss(adjoint, max_steps):
        def loss(x, w):
            sol = fixpoint.fixed_point(
                f,
                jnp.zeros_like(x),
                (w, x),
                solver=forced,
                adjoint=adjoint,
                max_steps=max_steps,
                throw=False,
            )
            return jnp.sum(sol.value**2), sol.stats["num_steps"]

        return loss

    def scan_loss(max_steps):
        def loss(x, w):
            def body(z, _):
                return f(z, (w, x)), None

            z, _ = jax.lax.scan(body, jnp.zeros_like(x), length=max_steps)
            return jnp.sum(z**2), jnp.array(max_steps)

        return loss

    implicit = fixpoint.ImplicitAdjoint(rtol=1e-4, atol=1e-6 if dtype == jnp.float32 else 1e-10)
    variants = [
        ("ours ImplicitAdjoint(GMRES)", lambda s: ours_loss(implicit, s)),
        ("ours UnrolledAdjoint()", lambda s: ours_loss(fixpoint.UnrolledAdjoint(), s)),
        ("plain lax.scan + jax.grad", scan_loss),
    ]
    rows = []
    for name, make in tqdm(variants, desc="memory", unit="adjoint", leave=False):
        for steps in steps_list:
            grad_fn = jax.grad(make(steps), argnums=(0, 1), has_aux=True)
            t0 = time.perf_counter()
            compiled = jax.jit(grad_fn).lower(x, w).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            timing = time_jitted(grad_fn, x, w, reps=reps, guard_s=guard)
            _, ran = timing.out
            rows.append(
                {
                    "adjoint": name,
                    "n": n,
                    "max_steps": steps,
                    "steps_run": int(ran),
                    "temp_bytes": int(mem.temp_size_in_bytes),
                    "peak_bytes": int(getattr(mem, "peak_memory_in_bytes", -1)),
                    "argument_bytes": int(mem.argument_size_in_bytes),
                    "output_bytes": int(mem.output_size_in_bytes),
                    "compile_s": compile_s,
                    "grad_s": timing.median,
                }
            )
    return rows


def fmt_bytes(b: int) -> str:
    if b < 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f}{unit}" if unit == "B" else f"{b:.1f}{unit}"
        b /= 1024
    return str(b)


# ------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="n in {64, 256} (default)")
    mode.add_argument("--full", action="store_true", help="n in {64, 256, 1024}")
    parser.add_argument("--x64", action="store_true", help="float64 (tol 1e-10)")
    parser.add_argument("--tol", type=float, default=None, help="forward atol (1e-5 / 1e-10)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--guard", type=float, default=10.0, help="seconds of timed calls")
    parser.add_argument("--sizes", default="", help="comma-separated n, overrides the mode")
    parser.add_argument("--mem-n", type=int, default=1024, help="n for the memory table (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods",
        default="",
        help="comma-separated prefixes of 'method backward' to keep (ours, optx, ours Picard LU)",
    )
    cli = parser.parse_args()
    if cli.x64 and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if cli.x64 else jnp.float32
    tol = cli.tol if cli.tol is not None else (1e-10 if cli.x64 else 1e-5)
    mode_name = "full" if cli.full else "quick"
    ns = (64, 256, 1024) if cli.full else (64, 256)
    if cli.sizes:
        ns = tuple(int(v) for v in cli.sizes.split(","))
    info = device_info()

    # What optimistix's default adjoint actually solves with, for this operator.
    op = lx.FunctionLinearOperator(lambda v: v, jax.ShapeDtypeStruct((4,), dtype))
    optx_default = "n/a" if optx is None else type(optx.ImplicitAdjoint().linear_solver).__name__
    resolved = type(lx.AutoLinearSolver(well_posed=None).select_solver(op)).__name__
    print(
        f"gradients benchmark ({mode_name}, {jnp.dtype(dtype).name}, tol={tol:g}) on "
        f"{info['platform']} ({info['device_kind']})\n"
        f"optimistix default adjoint: ImplicitAdjoint(linear_solver={optx_default}"
        f"(well_posed=None)) -> {resolved} on an untagged square operator\n"
        "jaxopt default implicit_diff_solve: None -> jaxopt.linear_solve.solve_normal_cg"
    )
    t_start = time.perf_counter()
    rows: list[dict] = []
    mem_rows: list[dict] = []
    wanted = tuple(m for m in cli.methods.split(",") if m)
    payload = {
        "benchmark": "gradients",
        "mode": mode_name,
        "dtype": jnp.dtype(dtype).name,
        "tol": tol,
        "rho": RHO,
        "device": info,
        "versions": versions(),
        "git": git_state(),
        "settings": vars(cli),
        "optimistix_default_adjoint_solver": f"{optx_default}(well_posed=None) -> {resolved}",
        "jaxopt_default_implicit_solve": "solve_normal_cg",
        "rows": rows,
        "memory": mem_rows,
        "complete": False,
    }
    name = "gradients_x64" if cli.x64 else "gradients"

    # Written after every row: a run stopped from outside keeps what it measured.
    def save(row):
        rows.append(row)
        payload["elapsed_s"] = time.perf_counter() - t_start
        write_json(name, payload)

    for i, n in enumerate(tqdm(ns, desc="sizes", unit="n")):
        compare(n, tol, dtype, cli.reps, cli.guard, cli.seed + i, wanted, on_row=save)
    if cli.mem_n:
        mem_rows += memory_rows(cli.mem_n, (10, 100, 1000), dtype, cli.reps, cli.guard, cli.seed)

    headers = ["n", "method", "backward solve", "compile", "fwd", "grad", "bwd", "vmap64"]
    headers += ["err x", "err W", "err v64"]
    table, errors = [], []
    for r in rows:
        if "error" in r:
            errors.append(f"n={r['n']} {r['method']} [{r['backward']}]: {r['error']}")
            table.append([str(r["n"]), r["method"], r["backward"], "ERROR (below)"])
            table[-1] += ["-"] * (len(headers) - len(table[-1]))
            continue
        table.append(
            [
                str(r["n"]),
                r["method"],
                r["backward"],
                fmt_time(r["compile_s"]),
                fmt_time(r["fwd_s"]),
                fmt_time(r["grad_s"]),
                fmt_time(r["bwd_s"]),
                fmt_time(r["vmap64_grad_s"]),
                fmt_sci(r["err_x"]),
                fmt_sci(r["err_w"]),
                fmt_sci(r["err_vmap64"]),
            ]
        )
    # `print_table` left-aligns the first two columns only; put n after method for that.
    print_table(
        [headers[1], headers[2], headers[0], *headers[3:]],
        [[t[1], t[2], t[0], *t[3:]] for t in table],
        title=f"Gradient of sum(z*^2) w.r.t. (x, W), rho={RHO}, {jnp.dtype(dtype).name}",
    )
    print(
        "\nfwd: loss only; grad: jax.grad (fwd+bwd) (medians); bwd = best(grad) - best(fwd);"
        "\nvmap64: grad of a batch of 64 per-sample solves; err: max|g-g_ref|/max|g_ref| vs a"
        "\nfloat64 dense solve."
    )
    for e in errors:
        print(f"ERROR {e}")
    if mem_rows:
        print_table(
            ["adjoint", "max_steps", "steps run", "temp", "grad time"],
            [
                [
                    r["adjoint"],
                    str(r["max_steps"]),
                    str(r["steps_run"]),
                    fmt_bytes(r["temp_bytes"]),
                    fmt_time(r["grad_s"]),
                ]
                for r in mem_rows
            ],
            title=(
                f"Backward memory vs forward steps (n={cli.mem_n}): temp_size_in_bytes of "
                "jax.jit(grad).lower().compile().memory_analysis()"
            ),
        )
        print(
            f"(arguments {fmt_bytes(mem_rows[0]['argument_bytes'])} and outputs "
            f"{fmt_bytes(mem_rows[0]['output_bytes'])} come on top; XLA:CPU reports "
            "peak_memory_in_bytes as their sum only, so it is kept in the JSON, not shown.)"
        )
    payload.update(complete=True, elapsed_s=time.perf_counter() - t_start)
    path = write_json(name, payload)
    print(f"\nwrote {path} (total {payload['elapsed_s']:.0f}s)")


if __name__ == "__main__":
    main()
