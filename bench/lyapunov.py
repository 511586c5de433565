"""Predictability before parallelism: parallel-scan iterations against the largest
Lyapunov exponent (LLE) of the recurrence.

The dense GRU of `bench/scan.py` (`equinox.nn.GRUCell`, input size 4, `x_t ~ N(0, 1)`,
`h_0 = 0`, float32) with its recurrent weights `weight_hh` multiplied by `scale`
(`bench/scan.py` runs 1, 3 and 6; here 0.5 to 12). Per (D, T, scale) and
input sequence (`--seqs` independent draws of `x`):

- LLE: `fixpoint.lyapunov_estimate` of the recurrence on that sequence (nats per step,
  burn-in T/10, 10 windows), with its standard error and its amplification (the largest
  growth of a perturbation over any stretch of steps, as a log); its time against
  `lax.scan`.
- floor: `max |h_lax.scan,float32 - h_lax.scan,float64|`, the same cell and inputs in
  float64: where it exceeds the tolerance, the float32 trajectory is not determined to the
  tolerance by anyone, and `err` below measures rounding, not the solver.
- iterations: `fixpoint.scan(..., solver=S, max_steps=T, throw=False)` for S in DEER,
  QuasiDEER, ELK and Jacobi (default tolerances: `1e-4` per step in float32, max-norm),
  the result code and `max |h - h_lax.scan|`.
- time: median steady-state call of the compiled solve against `lax.scan` of the same cell
  on the same sequence (`jax.block_until_ready`, compile timed apart, one executable per
  (solver, D, T) reused across scales and sequences, since only values change).

The plot (`--plot`, default `bench/results/lyapunov_<backend>.png`) shows iterations
against the LLE, one panel per solver, marker per T.

`python bench/lyapunov.py` (default: D = 8, T in {100, 1000}, scales 0.5 ... 12, 3
sequences); `--quick`: T = 100 only, 1 sequence.
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from _common import (
    RESULTS_DIR,
    device_info,
    git_state,
    print_table,
    time_jitted,
    versions,
    write_json,
)

import fixpoint
from fixpoint import solvers

jax.config.update("jax_enable_x64", True)  # for the float64 reference only

INPUT = 4
SCALES = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0)
# Result codes by index (`sol.result._value`), from the enumeration itself.
RESULT_NAMES = {
    int(item._value): name
    for name, item in fixpoint.RESULTS._name_to_item.items()  # noqa: SLF001
}
SOLVERS = {
    "DEER": solvers.DEER(),
    "QuasiDEER": solvers.QuasiDEER(),
    "ELK": solvers.ELK(),
    "Jacobi": solvers.Jacobi(),
}


def cell_at(d: int, scale: float, seed: int = 0, dtype=jnp.float32):
    cell = eqx.nn.GRUCell(INPUT, d, key=jax.random.key(seed), dtype=dtype)
    return eqx.tree_at(lambda c: c.weight_hh, cell, cell.weight_hh * scale)


def inputs(t: int, seq: int):
    return jax.random.normal(jax.random.key(1000 + seq), (t, INPUT), jnp.float32)


def functions(static, d: int, t: int, dtype=jnp.float32):
    h0 = jnp.zeros(d, dtype)

    def step(cell):
        return lambda h, x: (cell(x, h),) * 2

    def reference(params, xs):
        return jax.lax.scan(step(eqx.combine(params, static)), h0, xs)[1]

    def lle(params, xs):
        est = fixpoint.lyapunov_estimate(step(eqx.combine(params, static)), h0, xs)
        return est.exponent, est.error, est.amplification

    def solve(solver):
        def run(params, xs):
            _, _, sol = fixpoint.scan(
                step(eqx.combine(params, static)),
                h0,
                xs,
                solver=solver,
                max_steps=t,
                throw=False,
                return_solution=True,
            )
            return sol.value, sol.stats["num_steps"], sol.result._value

        return run

    return reference, lle, solve


def measure(d: int, t: int, scales, seqs: int, guard_s: float) -> list[dict]:
    params, static = eqx.partition(cell_at(d, 1.0), eqx.is_array)
    reference, lle, solve = functions(static, d, t)
    static64 = eqx.partition(cell_at(d, 1.0, dtype=jnp.float64), eqx.is_array)[1]
    reference64 = jax.jit(functions(static64, d, t, jnp.float64)[0])
    compiled = {}
    rows = []
    for scale in scales:
        params = eqx.filter(cell_at(d, scale), eqx.is_array)
        for seq in range(seqs):
            xs = inputs(t, seq)
            ref = time_jitted(reference, params, xs, guard_s=guard_s)
            est = time_jitted(lle, params, xs, guard_s=guard_s)
            exponent, error, amplification = (float(v) for v in est.out)
            params64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
            ref64 = reference64(params64, xs.astype(jnp.float64))
            floor = float(jnp.max(jnp.abs(ref.out.astype(jnp.float64) - ref64)))
            base = dict(D=d, T=t, scale=scale, seq=seq, lle=exponent, lle_error=error)
            base |= dict(amplification=amplification, lax_f32_vs_f64=floor)
            base |= dict(lax_scan_s=ref.median, lle_s=est.median, lle_compile_s=est.compile_s)
            for name, solver in SOLVERS.items():
                t0 = time.perf_counter()
                timing = time_jitted(solve(solver), params, xs, guard_s=guard_s)
                if name not in compiled:
                    compiled[name] = timing.compile_s
                hs, iters, code = timing.out
                result = RESULT_NAMES[int(code)]
                row = base | dict(
                    solver=name,
                    iters=int(iters),
                    result=result,
                    successful=result == "successful",
                    err=float(jnp.max(jnp.abs(hs - ref.out))),
                    time_s=timing.median,
                    reps=len(timing.times),
                    speedup=ref.median / timing.median,
                    compile_s=timing.compile_s,
                    wall_s=time.perf_counter() - t0,
                )
                rows.append(row)
                print(
                    f"D={d} T={t} scale={scale} seq={seq} LLE={exponent:+.3f}±{error:.3f} "
                    f"amp={amplification:.1f} floor={floor:.1e} "
                    f"{name:<9} iters={int(iters):>5} {result:<18} err={row['err']:.1e} "
                    f"time/lax.scan={timing.median / ref.median:.1f}",
                    flush=True,
                )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (D, T, scale, solver): median LLE and iterations over the sequences."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["D"], r["T"], r["scale"], r["solver"]), []).append(r)
    out = []
    for (d, t, scale, solver), rs in groups.items():
        out.append(
            dict(
                D=d,
                T=t,
                scale=scale,
                solver=solver,
                lle=statistics.median(r["lle"] for r in rs),
                lle_error=max(r["lle_error"] for r in rs),
                amplification=statistics.median(r["amplification"] for r in rs),
                lax_f32_vs_f64=max(r["lax_f32_vs_f64"] for r in rs),
                err=max(r["err"] for r in rs),
                iters=statistics.median(r["iters"] for r in rs),
                iters_max=max(r["iters"] for r in rs),
                successful=sum(r["successful"] for r in rs),
                seqs=len(rs),
                time_over_lax_scan=statistics.median(r["time_s"] / r["lax_scan_s"] for r in rs),
                lle_over_lax_scan=statistics.median(r["lle_s"] / r["lax_scan_s"] for r in rs),
            )
        )
    return out


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SOLVERS)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharey=True, sharex=True)
    fig.set_layout_engine("constrained")
    axes = axes.ravel()
    ts = sorted({r["T"] for r in rows})
    for ax, name in zip(axes, names, strict=True):
        for t, marker in zip(ts, "os^D", strict=False):
            rs = [r for r in rows if r["solver"] == name and r["T"] == t]
            ok = [r for r in rs if r["successful"]]
            bad = [r for r in rs if not r["successful"]]
            ax.scatter(
                [r["lle"] for r in ok], [r["iters"] for r in ok], marker=marker, label=f"T = {t}"
            )
            if bad:
                ax.scatter(
                    [r["lle"] for r in bad],
                    [r["iters"] for r in bad],
                    marker=marker,
                    facecolors="none",
                    edgecolors="C3",
                    label=f"T = {t}, not converged",
                )
            ax.axhline(t, color="grey", lw=0.8, ls=":")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yscale("log")
        if ax in axes[2:]:
            ax.set_xlabel("largest Lyapunov exponent (nats per step)")
        if ax in axes[::2]:
            ax.set_ylabel("iterations to tolerance (dotted: T)")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Dense GRU (D = 8), recurrent weights scaled 0.5 ... 12: iterations against LLE")
    fig.savefig(path, dpi=120)
    print("wrote", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--t", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument("--seqs", type=int, default=3)
    parser.add_argument("--guard", type=float, default=5.0, help="seconds of timed calls per row")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if args.quick:
        args.t, args.seqs = [100], 1
    t0 = time.perf_counter()
    rows = []
    for t in args.t:
        rows += measure(args.d, t, args.scales, args.seqs, args.guard)
    summary = summarise(rows)
    print_table(
        ["T", "scale", "LLE", "amp", "floor", "solver", "iters", "ok", "err", "time/lax.scan"],
        [
            [
                str(s["T"]),
                f"{s['scale']:g}",
                f"{s['lle']:+.3f}",
                f"{s['amplification']:.1f}",
                f"{s['lax_f32_vs_f64']:.0e}",
                s["solver"],
                f"{s['iters']:g}",
                f"{s['successful']}/{s['seqs']}",
                f"{s['err']:.0e}",
                f"{s['time_over_lax_scan']:.1f}",
            ]
            for s in summary
        ],
        title="Median over sequences",
        left=(5,),
    )
    payload = dict(
        benchmark="lyapunov",
        mode="quick" if args.quick else "default",
        cell=f"equinox.nn.GRUCell({INPUT}, {args.d}), weight_hh * scale",
        dtype="float32",
        solver_tolerance="fixpoint's default for float32: 1e-4 per step (max-norm)",
        device=device_info(),
        versions=versions(),
        git=git_state(),
        settings=vars(args),
        rows=rows,
        summary=summary,
        elapsed_s=time.perf_counter() - t0,
    )
    print("wrote", write_json("lyapunov", payload))
    plot(rows, args.plot or RESULTS_DIR / f"lyapunov_{jax.default_backend()}.png")


if __name__ == "__main__":
    main()
