"""`fixpoint.scan`'s DEER and QuasiDEER against minimal reference implementations.

Each reference is the textbook iteration in a few lines, written here: Newton on
the whole trajectory, `Δ_t = A_t Δ_{t-1} + r_t` by one associative scan, with
either the dense Jacobians (`jacfwd`, DEER) or their exact diagonals (`jacfwd`
then `diag`, quasi-DEER, an elementwise scan), run for a fixed number of
iterations. Nothing else: no convergence test, no safeguard, no certification.
They are timed at the iteration count fixpoint needed on the same problem, so
the ratio is per iteration of the same work (fixpoint's loop also certifies the
answer, which costs QuasiDEER one more iteration with `ScanProblem.refinement`:
on the CPU one `lax.scan` of the cell, returned as the answer; on an
accelerator a parallel Newton step), again at the fewest iterations (up to 3x
ours) at which the reference is as accurate as ours ("same accuracy": an error
at most 10 % above ours, since at float32's round-off level errors differ in
their last bits), and for DEER at
as many Jacobian evaluations as ours ("per Jacobian evaluation": our loop
linearises `num_steps + 1` times, the last one being the certifying iteration,
whose Newton step is the answer returned).

Cell: `equinox.nn.GRUCell`, input 4, `h_0 = 0`, `x_t ~ N(0, 1)`, recurrent scale
1, float32, T = 1e4, D in {8, 32}. Time: minimum over `--reps` calls after a
warm-up, compile apart; memory: `compiled.memory_analysis()` (temp + args +
outputs); error: `max |h - h_lax.scan|` against float64 `lax.scan` of the same
cell (float32 `lax.scan`'s own error is recorded beside it).

    python bench/scan_reference.py --reps 10

Writes `bench/results/scan_reference_<backend>.json`.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import device_info, fmt_time, git_state, memory_of, print_table, versions, write_json

import fixpoint
from fixpoint import solvers


def _combine(dense):
    def combine(a, b):
        (a1, b1), (a2, b2) = a, b
        if dense:
            return a2 @ a1, jnp.einsum("...ij,...j->...i", a2, b1) + b2
        return a2 * a1, a2 * b1 + b2

    return combine


def reference(cell, h0, xs, iterations, dense):
    """Newton over time for `iterations` steps, dense or diagonal Jacobians."""
    t, d = xs.shape[0], h0.shape[0]

    def step(h, _):
        prev = jnp.concatenate([h0[None], h[:-1]])
        fh = jax.vmap(cell)(xs, prev)
        jac = jax.vmap(jax.jacfwd(lambda hp, x: cell(x, hp)))(prev, xs)
        a = jac if dense else jnp.diagonal(jac, axis1=1, axis2=2)
        # Δ_t = A_t Δ_{t-1} + r_t with Δ_{-1} = 0, r = F(H) - H.
        _, delta = jax.lax.associative_scan(_combine(dense), (a, fh - h))
        return h + delta, None

    h = jnp.zeros((t, d), xs.dtype)
    return jax.lax.scan(step, h, None, length=iterations)[0]


def timed(fn, args, reps):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return out, min(times), compile_s, memory_of(compiled).get("total")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--t", type=int, default=10_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    records, rows = [], []
    for d in args.dims:
        cell = eqx.nn.GRUCell(4, d, key=jax.random.key(0))
        xs = jax.random.normal(jax.random.key(1), (args.t, 4), jnp.float32)
        h0 = jnp.zeros(d, jnp.float32)
        ref = jax.jit(lambda xs, cell, h0: jax.lax.scan(lambda h, x: (cell(x, h),) * 2, h0, xs)[1])
        # Errors are measured against float64 `lax.scan` of the same cell; float32
        # `lax.scan`'s own error is printed beside them.
        with jax.enable_x64(True):
            wide = lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a  # noqa: E731
            truth = np.asarray(ref(wide(xs), jax.tree.map(wide, cell), wide(h0)))
        error = lambda h, truth=truth: float(np.max(np.abs(np.asarray(h, np.float64) - truth)))  # noqa: E731
        err_lax = error(ref(xs, cell, h0))
        for name, solver, dense in (
            ("DEER", solvers.DEER(), True),
            ("QuasiDEER", solvers.QuasiDEER(), False),
        ):

            def ours(xs, cell=cell, solver=solver, h0=h0):
                f = lambda h, x: (cell(x, h), None)  # noqa: E731
                _, _, sol = fixpoint.scan(
                    f, h0, xs, solver=solver, throw=False, return_solution=True
                )
                return sol.value, sol.stats["num_steps"]

            (hs, its), t_ours, c_ours, m_ours = timed(ours, (xs,), args.reps)
            its = int(its)
            mine = lambda xs, cell=cell, dense=dense, its=its, h0=h0: reference(  # noqa: E731
                cell, h0, xs, its, dense
            )
            h_ref, t_ref, c_ref, m_ref = timed(mine, (xs,), args.reps)
            err_ours = error(hs)
            # The same accuracy: the fewest reference iterations (up to 3x ours)
            # whose error is at most 10 % above ours, found untimed, then timed.
            same_its, same_s = None, None
            for k in range(its, 3 * its + 1):
                run_k = jax.jit(
                    lambda xs, k=k, c=cell, h0=h0, dense=dense: reference(c, h0, xs, k, dense)
                )
                if error(run_k(xs)) <= 1.1 * err_ours:
                    same_its = k
                    break
            if same_its is not None:
                same = lambda xs, k=same_its, c=cell, h0=h0, dense=dense: reference(  # noqa: E731
                    c, h0, xs, k, dense
                )
                same_s = timed(same, (xs,), args.reps)[1]
            per_jac = None
            if dense:
                evals = lambda xs, k=its + 1, c=cell, h0=h0: reference(c, h0, xs, k, True)  # noqa: E731
                per_jac = t_ours / timed(evals, (xs,), args.reps)[1]
            rec = {
                "d": d,
                "t": args.t,
                "solver": name,
                "iterations": its,
                "fixpoint_s": t_ours,
                "reference_s": t_ref,
                "ratio": t_ours / t_ref,
                "fixpoint_compile_s": c_ours,
                "reference_compile_s": c_ref,
                "fixpoint_mem": m_ours,
                "reference_mem": m_ref,
                "fixpoint_err": err_ours,
                "reference_err": error(h_ref),
                "lax_scan_float32_err": err_lax,
                "reference_same_accuracy_iterations": same_its,
                "reference_same_accuracy_s": same_s,
                "ratio_same_accuracy": None if same_s is None else t_ours / same_s,
                "ratio_per_jacobian_evaluation": per_jac,
            }
            records.append(rec)
            rows.append(
                [
                    name,
                    str(d),
                    str(its),
                    fmt_time(t_ours),
                    fmt_time(t_ref),
                    f"{rec['ratio']:.2f}",
                    f"{(m_ours or 0) / 2**20:.1f}/{(m_ref or 0) / 2**20:.1f} MiB",
                    f"{err_ours:.1e}/{rec['reference_err']:.1e}/{err_lax:.1e}",
                    "not in 3x" if same_s is None else f"{same_its}: {t_ours / same_s:.2f}",
                    "" if per_jac is None else f"{per_jac:.2f}",
                ]
            )
    print_table(
        [
            "solver",
            "D",
            "iters",
            "fixpoint",
            "reference",
            "ratio",
            "mem",
            "err vs f64 (ours/ref/f32 lax.scan)",
            "same accuracy: ref iters: ratio",
            "per Jacobian evaluation",
        ],
        rows,
        title=f"GRU, T={args.t}, float32, min of {args.reps}",
    )
    payload = {"versions": versions(), "git": git_state(), "device": device_info()}
    payload["rows"] = records
    print("wrote", write_json("scan_reference", payload))


if __name__ == "__main__":
    main()
