"""Parallel sampling of a diffusion model: scan solvers on a probability-flow ODE.

The sampler: Euler steps of `dx/dsigma = -sigma * score(x, sigma)` from
`sigma = 20` down to `0.01` on a geometric grid of `T` steps, for data drawn
from a mixture of 8 Gaussians in `D` dimensions (means `3·N(0, I)`, variance
0.05), whose noised score is exact, so there is no network to train and the
sequential `lax.scan` of the same steps in float64 is the exact answer. Each
step is close to the identity (`x + dt·g(x)`), which is what `PicardSum`
(ParaDiGMS's Picard iteration) is for.

Per solver, float32 at the default tolerance (1e-4 per step): iterations
(`num_steps`: the parallel depth; the iteration that certifies and stops is
not counted, as in every solve), the result code,
the evaluations of the step in all iterations, JVPs counted as evaluations
(`Jacobi` and `PicardSum` evaluate each step once per iteration, or only the
`w` steps of their sliding window with `window=w`; `QuasiDEER`, `ELK` and
`DEER` take `D` JVPs per step per iteration for exact diagonals or dense
Jacobians; neither the certifying iteration nor a window whose steps all
met the tolerance, which needs no update, is counted), the
largest error against float64 `lax.scan` (float32 `lax.scan`'s own error is
the floor), and CPU time against float32 `lax.scan` (compile apart, min over
calls). On the CPU the certificate of `Jacobi`, `PicardSum`, `QuasiDEER` and
`ELK` is one sequential sweep, so no parallel solver can beat `lax.scan` here:
the iteration counts are the result that carries over to an accelerator (GPU
times: unmeasured).

Run: `.venv/bin/python bench/diffusion.py` (about a minute on 2 CPU cores);
writes `bench/results/diffusion_<backend>.json` (after every solver; `--solvers` keeps
a subset).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import device_info, fmt_time, git_state, print_table, time_jitted, versions, write_json
from tqdm import tqdm

import fixpoint
from fixpoint import solvers

jax.config.update("jax_enable_x64", True)
# name: (solver for T steps, JVPs per step and iteration scale with D, window / T)
SOLVERS = {
    "Jacobi": (solvers.Jacobi, False, None),
    "PicardSum": (solvers.PicardSum, False, None),
    "PicardSum w=T/5": (solvers.PicardSum, False, 5),
    "PicardSum w=T/20": (solvers.PicardSum, False, 20),
    "QuasiDEER": (solvers.QuasiDEER, True, None),
    "ELK": (solvers.ELK, True, None),
    "DEER": (solvers.DEER, True, None),
}
RESULT_NAMES = ("successful", "max_steps_reached", "diverged", "nonfinite", "linear_solve_failed")


def sampler(d, steps, dtype, seed=0):
    """`(step, x0, xs)`: the Euler step of the probability-flow ODE, the noise, the grid."""
    rng = np.random.default_rng(seed)
    means = jnp.asarray(3.0 * rng.standard_normal((8, d)), dtype)
    var = jnp.asarray(0.05, dtype)

    def step(x, sigmas):
        a, b = sigmas
        v = var + a * a
        weights = jax.nn.softmax(-jnp.sum((x - means) ** 2, axis=1) / (2 * v))
        x = x + (b - a) * (-a * (weights @ means - x) / v)
        return x, x

    grid = jnp.asarray(np.geomspace(20.0, 0.01, steps + 1), dtype)
    x0 = jnp.asarray(20.0 * rng.standard_normal(d), dtype)
    return step, x0, (grid[:-1], grid[1:])


def run(d, steps, reps, wanted=(), on_record=None):
    """The records of one setting; `on_record(record)` is called as each one is done."""
    step, x0, xs = sampler(d, steps, jnp.float32)
    step64, x0_64, xs64 = sampler(d, steps, jnp.float64)
    exact = jax.jit(lambda x0, xs: jax.lax.scan(step64, x0, xs)[1])(x0_64, xs64)
    seq = time_jitted(lambda x0, xs: jax.lax.scan(step, x0, xs)[1], x0, xs, reps=reps)
    floor = float(jnp.max(jnp.abs(seq.out - exact)))
    records = []

    def done(record):
        records.append(record)
        if on_record is not None:
            on_record(record)

    done(
        {
            "d": d,
            "steps": steps,
            "solver": "lax.scan",
            "best_s": seq.best,
            "compile_s": seq.compile_s,
            "max_error_vs_float64": floor,
        }
    )
    for name, (cls, per_dim, split) in SOLVERS.items():
        if wanted and name not in wanted:
            continue
        solver = cls() if split is None else cls(window=steps // split)

        def solve(x0, xs, solver=solver):
            _, ys, sol = fixpoint.scan(
                step, x0, xs, solver=solver, throw=False, return_solution=True
            )
            return ys, sol.result._value, sol.stats["num_steps"]

        t = time_jitted(solve, x0, xs, reps=reps)
        ys, code, iters = t.out
        done(
            {
                "d": d,
                "steps": steps,
                "solver": name,
                "iterations": int(iters),
                "result": RESULT_NAMES[int(code)],
                "evaluations_per_step": int(iters) * (d if per_dim else 1),
                # Of the cell (or JVPs), all iterations: a window evaluates w steps.
                "evaluations": int(iters)
                * (steps if split is None else steps // split)
                * (d if per_dim else 1),
                "max_error_vs_float64": float(jnp.max(jnp.abs(ys - exact))),
                "best_s": t.best,
                "compile_s": t.compile_s,
                "vs_lax_scan": t.best / seq.best,
            }
        )
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--solvers", nargs="+", default=[], help=f"a subset of {list(SOLVERS)}")
    args = parser.parse_args()
    records = []
    payload = {"versions": versions(), "git": git_state(), "device": device_info()}
    payload.update(settings=vars(args), records=records, complete=False)
    settings = [(d, s) for d in args.dims for s in args.steps]

    def save(record):  # after every record: a run stopped from outside keeps them
        records.append(record)
        write_json("diffusion", payload)

    for d, steps in tqdm(settings, desc="settings"):
        run(d, steps, args.reps, tuple(args.solvers), on_record=save)
    rows = []
    for r in records:
        ours = r["solver"] != "lax.scan"
        rows.append(
            [
                f"D={r['d']}, T={r['steps']}",
                r["solver"],
                str(r["iterations"]) if ours else "-",
                r["result"] if ours else "-",
                str(r["evaluations"]) if ours else str(r["steps"]),
                f"{r['max_error_vs_float64']:.1e}",
                fmt_time(r["best_s"]),
                f"{r['vs_lax_scan']:.2f}" if ours else "1.00",
            ]
        )
    print_table(
        ["setting", "solver", "iterations", "result", "evaluations", "error", "CPU", "/lax.scan"],
        rows,
        title="probability-flow ODE sampler, float32, default tolerance (1e-4)",
    )
    payload["complete"] = True
    print("wrote", write_json("diffusion", payload))


if __name__ == "__main__":
    main()
