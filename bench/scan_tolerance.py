"""What a scan tolerance buys in float32: iterations and error against float64.

For `eqx.nn.GRUCell(4, D)` in float32 with `weight_hh` scaled by 1 (contractive),
3 (long memory) and 6 (near the edge of chaos: `bench/lyapunov.py`), `x_t ~ N(0, 1)`,
`h_0 = 0`: each scan solver at
`rtol = atol = tol` for several `tol`, reporting iterations (`num_steps`), the
result code, and the largest error of all hidden states against `lax.scan` of the
same cell in float64 (the exact answer) and in float32 (what a sequential float32
user gets). `lax.scan`'s own float32 error against float64 is printed as the floor:
a tolerance far below it buys iterations, not accuracy. Untimed: iterations and
errors do not depend on the machine.

Run: `.venv/bin/python bench/scan_tolerance.py` (about 2 minutes on 2 CPU cores);
writes `bench/results/scan_tolerance.json`.
"""

import argparse
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import fixpoint
from fixpoint import solvers

jax.config.update("jax_enable_x64", True)
TOLS = (1e-6, 1e-5, 1e-4, 1e-3)
RESULT_NAMES = ("successful", "max_steps_reached", "diverged", "nonfinite", "linear_solve_failed")
SOLVERS = {"DEER": solvers.DEER, "QuasiDEER": solvers.QuasiDEER, "ELK": solvers.ELK}


def cell_at(scale, d, dtype, key):
    cell = eqx.nn.GRUCell(4, d, key=key, dtype=jnp.float32)
    cell = eqx.tree_at(lambda c: c.weight_hh, cell, cell.weight_hh * scale)
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, cell)


def step(cell):
    return lambda h, x: (cell(x, h), cell(x, h))


def sequential(cell, xs, dtype):
    h0 = jnp.zeros(cell.hidden_size, dtype)
    return jax.jit(lambda xs: jax.lax.scan(step(cell), h0, xs)[1])(xs.astype(dtype))


def parallel(cell, xs, solver, max_steps):
    @jax.jit
    def solve(xs):
        h0 = jnp.zeros(cell.hidden_size, jnp.float32)
        out = fixpoint.scan(
            step(cell),
            h0,
            xs,
            solver=solver,
            throw=False,
            max_steps=max_steps,
            return_solution=True,
        )
        return out[1], out[2]

    return solve(xs)


def run(cases, max_steps):
    rows = []
    for d, t, scale in tqdm(cases, desc="cases"):
        xs = jax.random.normal(jax.random.key(1), (t, 4), jnp.float32)
        c32, c64 = (cell_at(scale, d, dt, jax.random.key(0)) for dt in (jnp.float32, jnp.float64))
        ref32, ref64 = sequential(c32, xs, jnp.float32), sequential(c64, xs, jnp.float64)
        floor = float(jnp.max(jnp.abs(ref32 - ref64)))
        for name, make in SOLVERS.items():
            for tol in TOLS:
                hs, sol = parallel(c32, xs, make(rtol=tol, atol=tol), min(t, max_steps))
                rows.append(
                    {
                        "D": d,
                        "T": t,
                        "scale": scale,
                        "solver": name,
                        "tol": tol,
                        "iters": int(sol.stats["num_steps"]),
                        "result": RESULT_NAMES[int(sol.result._value)],
                        "err_vs_f64": float(jnp.max(jnp.abs(hs - ref64))),
                        "err_vs_f32": float(jnp.max(jnp.abs(hs - ref32))),
                        "lax_f32_vs_f64": floor,
                    }
                )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/scan_tolerance.json"))
    args = parser.parse_args()
    cases = [(8, 1000, 1), (8, 1000, 3), (8, 1000, 6), (32, 1000, 1), (8, 10000, 1)]
    rows = run(cases, args.max_steps)
    print(
        f"{'D':>3} {'T':>6} {'scale':>5} {'solver':>10} {'tol':>7} {'iters':>6} "
        f"{'result':>18} {'err/f64':>9} {'err/f32':>9} {'lax32/64':>9}"
    )
    for r in rows:
        print(
            f"{r['D']:>3} {r['T']:>6} {r['scale']:>5} {r['solver']:>10} {r['tol']:>7.0e} "
            f"{r['iters']:>6} {r['result']:>18} {r['err_vs_f64']:>9.2e} "
            f"{r['err_vs_f32']:>9.2e} {r['lax_f32_vs_f64']:>9.2e}"
        )
    Path(args.out).write_text(json.dumps({"rows": rows, "devices": str(jax.devices())}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
