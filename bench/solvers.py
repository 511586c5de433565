"""Nonexpansive maps, maps without a fixed point, hard starts and finite sums: Halpern
against Picard and Anderson, detection of infeasibility, homotopy against Newton, and
the variance-reduced Halpern solver's component evaluations.

Four parts (float64, `max_norm` tolerances, `throw=False`):

- `residuals`: the residual norm at every step (`record_residuals=True`, 2000 steps, a
  tolerance of 1e-12 so that every method runs until it gets there or the budget ends)
  of `Picard`, `Halpern`, `Halpern(restart_ratio=0.5)` and `Anderson` on two
  nonexpansive maps with fixed points where Picard is slow or useless: a rotation of the
  plane by 0.5 rad about (1, 1) (Picard circles at a constant residual), and alternating
  projections onto the unit disc and the half-plane `y_1 >= 1`, which touch at one
  point (Picard's residual falls sublinearly).
- `infeasible`: maps without a fixed point, `y ↦ y + s` (s = (1, −2, 0.5)) and
  Douglas–Rachford for the disjoint unit disc and half-plane `y_1 >= 2` (the infimal
  displacement `v` has norm 1, the distance between the sets), and, as controls,
  the two maps above (which have one). For `Picard`, `Picard(damping=0.5)` and
  `Halpern`: the result at each step budget in `--budgets` (each a compile of its
  own), the smallest budget reported `infeasible`, and the relative error of
  `stats["displacement"]` against `v` there.
- `homotopy`: root problems from hard starts (`arctan(Ay − b)` from far away, `sin`
  from (1.4, −1.45), `y³ − 2y + 2` from 0, Freudenstein–Roth from three starts) with
  `Newton`, `Homotopy` and `Anderson` (500 steps, tolerance 1e-10): the result, the
  steps, the root reached and whether it is the root the homotopy path from the start
  leads to.
- `finite_sum`: least squares `min ‖Ay − b‖²/2n` (d = 20, condition number of `A`
  30, `b` noisy) written as the mean of `n` one-row maps `T_i(y) = y − η a_i (a_iᵀy −
  b_i)`, `η = 1/λ_max(AᵀA/n)`, and a regularised bilinear game (4 + 4 players'
  coordinates, μ = 0.5) written as the mean of `n` component operators (`root_find`),
  for `n` in `--n`. Per solver (`Halpern` and `VarianceReducedHalpern`, both plain and
  with `restart_ratio=0.5`, and `Picard`): steps, component evaluations to the
  tolerance (`stats["component_evaluations"]`, else `n` per evaluation), the result
  and the median time of the compiled solve (`jax.block_until_ready`, compile apart).
  Every successful solve is certified on the exact residual, so equal tolerance is
  equal accuracy.

The plot (`bench/results/solvers_<backend>.png`) shows the residuals of part one and
the evaluations of part three against `n`.

`python bench/solvers.py` (default: budgets 40 ... 2000, n in {100, 1000, 10000});
`--quick`: fewer budgets, n in {100, 1000}; `--plot-only`: redraw the plot from the
results file.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    RESULTS_DIR,
    device_info,
    git_state,
    print_table,
    time_jitted,
    versions,
    write_json,
)

jax.config.update("jax_enable_x64", True)

import fixpoint as fp  # noqa: E402
from fixpoint import solvers  # noqa: E402


# Maps in the plane (and R^3) with known answers.
def _disc(y):
    return y / jnp.maximum(1.0, jnp.linalg.norm(y))


def _half_plane(edge):
    def project(y):
        return y.at[0].set(jnp.maximum(y[0], edge))

    return project


def rotation(y, args):
    c = jnp.array([1.0, 1.0])
    cos, sin = math.cos(0.5), math.sin(0.5)
    rot = jnp.array([[cos, -sin], [sin, cos]])
    return c + rot @ (y - c)


def tangent_projections(y, args):
    return _disc(_half_plane(1.0)(y))


SHIFT = np.array([1.0, -2.0, 0.5])


def translation(y, args):
    return y + jnp.asarray(SHIFT)


def douglas_rachford_disjoint(y, args):
    # T = (I + R_A R_B) / 2 for A the unit disc, B the half-plane y_1 >= 2.
    pb = _half_plane(2.0)(y)
    return y + _disc(2 * pb - y) - pb


FEASIBLE = {"rotation": (rotation, 2), "tangent projections": (tangent_projections, 2)}
INFEASIBLE = {
    "translation": (translation, 3, float(np.linalg.norm(SHIFT))),
    "Douglas-Rachford, disjoint sets": (douglas_rachford_disjoint, 2, 1.0),
}
START = {2: np.array([3.0, -2.0]), 3: np.zeros(3)}

RESIDUAL_SOLVERS = {
    "Picard": solvers.Picard(0, 1e-12),
    "Halpern": solvers.Halpern(0, 1e-12),
    "Halpern, restarts": solvers.Halpern(0, 1e-12, restart_ratio=0.5),
    "Anderson": solvers.Anderson(0, 1e-12),
}
DETECTORS = {
    "Picard": solvers.Picard(0, 1e-10),
    "Picard, damping 0.5": solvers.Picard(0, 1e-10, damping=0.5),
    "Halpern": solvers.Halpern(0, 1e-10),
}


def residuals(steps: int) -> list[dict]:
    rows = []
    for problem, (fn, d) in FEASIBLE.items():
        for name, solver in RESIDUAL_SOLVERS.items():
            sol = fp.fixed_point(
                fn,
                jnp.asarray(START[d]),
                solver=solver,
                max_steps=steps,
                throw=False,
                record_residuals=True,
            )
            history = np.asarray(sol.stats["residual_history"])
            rows.append(
                dict(
                    problem=problem,
                    solver=name,
                    result=str(sol.result).split(".")[-1],
                    steps=int(sol.stats["num_steps"]),
                    residual=float(sol.stats["residual"]),
                    history=[float(x) for x in history[np.isfinite(history)]],
                )
            )
    return rows


def infeasible(budgets: list[int]) -> list[dict]:
    rows = []
    cases = {k: (fn, d, norm) for k, (fn, d, norm) in INFEASIBLE.items()}
    cases.update({k: (fn, d, 0.0) for k, (fn, d) in FEASIBLE.items()})
    for problem, (fn, d, v_norm) in cases.items():
        for name, solver in DETECTORS.items():
            results, first, error = {}, None, None
            for budget in budgets:
                sol = fp.fixed_point(
                    fn, jnp.asarray(START[d]), solver=solver, max_steps=budget, throw=False
                )
                results[budget] = str(sol.result).split(".")[-1]
                if first is None and sol.result == fp.RESULTS.infeasible:
                    first = budget
                    v = np.asarray(sol.stats["displacement"])
                    error = abs(float(np.linalg.norm(v)) - v_norm) / v_norm
            rows.append(
                dict(
                    problem=problem,
                    has_fixed_point=v_norm == 0.0,
                    displacement_norm=v_norm,
                    solver=name,
                    results=results,
                    first_infeasible_budget=first,
                    displacement_norm_error=error,
                )
            )
    return rows


def _arctan_system(y, args):
    a = jnp.array([[2.0, 1.0], [0.5, 1.5]])
    return jnp.arctan(a @ y - jnp.array([1.0, -1.0]))


def _freudenstein_roth(y, args):
    x1, x2 = y[0], y[1]
    return jnp.stack([-13 + x1 + ((5 - x2) * x2 - 2) * x2, -29 + x1 + ((x2 + 1) * x2 - 14) * x2])


# (name, fn, start, the root the homotopy path from that start leads to, or None)
HARD_STARTS = [
    ("arctan(Ay − b)", _arctan_system, [10.0, -8.0], [1.0, -1.0]),
    ("arctan(Ay − b)", _arctan_system, [-30.0, 40.0], [1.0, -1.0]),
    ("sin", lambda y, a: jnp.sin(y), [1.4, -1.45], [0.0, 0.0]),
    ("y³ − 2y + 2", lambda y, a: y**3 - 2 * y + 2, [0.0], None),
    ("Freudenstein–Roth", _freudenstein_roth, [6.0, 3.0], [5.0, 4.0]),
    ("Freudenstein–Roth", _freudenstein_roth, [0.5, -2.0], None),
    ("Freudenstein–Roth", _freudenstein_roth, [-10.0, 10.0], [5.0, 4.0]),
]


def homotopy(steps: int) -> list[dict]:
    methods = {
        "Newton": solvers.Newton(1e-10, 1e-10),
        "Homotopy": solvers.Homotopy(1e-10, 1e-10),
        "Anderson": solvers.Anderson(1e-10, 1e-10),
    }
    rows = []
    for problem, fn, start, path_root in HARD_STARTS:
        for name, solver in methods.items():
            sol = fp.root_find(fn, jnp.asarray(start), solver=solver, max_steps=steps, throw=False)
            value = np.asarray(sol.value)
            rows.append(
                dict(
                    problem=problem,
                    start=start,
                    solver=name,
                    result=str(sol.result).split(".")[-1],
                    steps=int(sol.stats["num_steps"]),
                    value=value.tolist(),
                    path_root=path_root,
                    reached_path_root=None
                    if path_root is None
                    else bool(np.max(np.abs(value - np.asarray(path_root))) < 1e-6),
                    path_points=int(sol.stats.get("path_points", -1)),
                    rejected=int(sol.stats.get("rejected", -1)),
                    path_lambda=float(sol.stats.get("lambda", float("nan"))),
                )
            )
    return rows


def least_squares(n: int, d: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(n, d)))[0]
    w = np.linalg.qr(rng.normal(size=(d, d)))[0]
    a = u @ np.diag(np.logspace(0, -math.log10(30), d) * math.sqrt(n)) @ w.T
    b = a @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
    step = 1 / np.linalg.eigvalsh(a.T @ a / n).max()

    def row(y, args, i):
        a, b = args
        return y - step * a[i] * (a[i] @ y - b[i])

    answer = np.linalg.lstsq(a, b, rcond=None)[0]
    args = (jnp.asarray(a), jnp.asarray(b))
    return "fixed_point", fp.FiniteSum(row, n), jnp.zeros(d), args, answer


def game(n: int, p: int = 4, mu: float = 0.5, seed: int = 1):
    rng = np.random.default_rng(seed)
    bs = rng.normal(size=(n, p, p)) + 1.0
    c, e = rng.normal(size=(n, p)), rng.normal(size=(n, p))
    mean = bs.mean(0)
    eta = mu / (mu**2 + np.linalg.norm(mean, 2) ** 2)

    def operator(y, args, i):
        bs, c, e = args
        x, z = y[:p], y[p:]
        return eta * jnp.concatenate([bs[i] @ z + mu * x - c[i], -bs[i].T @ x + mu * z - e[i]])

    matrix = np.block([[mu * np.eye(p), mean], [-mean.T, mu * np.eye(p)]])
    answer = np.linalg.solve(matrix, np.concatenate([c.mean(0), e.mean(0)]))
    args = tuple(map(jnp.asarray, (bs, c, e)))
    return "root", fp.FiniteSum(operator, n), jnp.zeros(2 * p), args, answer


def finite_sum(ns: list[int], tol: float, guard_s: float) -> list[dict]:
    methods = {
        "Halpern": solvers.Halpern(0, tol),
        "VR-Halpern": solvers.VarianceReducedHalpern(0, tol),
        "Halpern, restarts": solvers.Halpern(0, tol, restart_ratio=0.5),
        "VR-Halpern, restarts": solvers.VarianceReducedHalpern(0, tol, restart_ratio=0.5),
        "Picard": solvers.Picard(0, tol),
    }
    rows = []
    for problem, make in (("least squares", least_squares), ("game", game)):
        for n in ns:
            kind, fn, y0, args, answer = make(n)
            entry = fp.fixed_point if kind == "fixed_point" else fp.root_find
            for name, solver in methods.items():

                def run(args, entry=entry, fn=fn, y0=y0, solver=solver):
                    return entry(fn, y0, args, solver=solver, max_steps=200_000, throw=False)

                t = time_jitted(run, args, reps=3, guard_s=guard_s, max_reps=5)
                sol = t.out
                steps = int(sol.stats["num_steps"])
                evaluations = int(sol.stats.get("component_evaluations", n * (steps + 1)))
                rows.append(
                    dict(
                        problem=problem,
                        n=n,
                        solver=name,
                        result=str(sol.result).split(".")[-1],
                        steps=steps,
                        component_evaluations=evaluations,
                        passes=evaluations / n,
                        error=float(np.max(np.abs(np.asarray(sol.value) - answer))),
                        time_s=t.median,
                        compile_s=t.compile_s,
                    )
                )
                print(f"  {problem} n={n} {name}: {steps} steps, {evaluations} evaluations")
    for r in rows:
        base = next(
            q
            for q in rows
            if q["problem"] == r["problem"]
            and q["n"] == r["n"]
            and q["solver"] == r["solver"].replace("VR-", "")
        )
        full = base["component_evaluations"]
        r["evaluations_over_full_batch"] = r["component_evaluations"] / full
    return rows


def plot(res_rows: list[dict], fs_rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in res_rows))
    fig, axes = plt.subplots(1, len(problems) + 1, figsize=(15, 4.5))
    fig.set_layout_engine("constrained")
    for ax, problem in zip(axes, problems, strict=False):
        for r in (r for r in res_rows if r["problem"] == problem):
            h = np.asarray(r["history"])
            ax.loglog(np.arange(1, len(h) + 1), np.maximum(h, 1e-16), label=r["solver"])
        k = np.arange(1, 2001)
        first = next(r for r in res_rows if r["problem"] == problem)["history"][0]
        ax.loglog(k, first * 2 / (k + 1), "k:", lw=0.8, label="∝ 1/(k+1)")
        ax.set_title(problem)
        ax.set_xlabel("step")
        ax.set_ylabel("residual (max-norm)")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for problem, marker in (("least squares", "o"), ("game", "s")):
        for name, colour in (
            ("Halpern, restarts", "C0"),
            ("VR-Halpern, restarts", "C1"),
            ("Halpern", "C2"),
            ("VR-Halpern", "C3"),
            ("Picard", "C4"),
        ):
            rs = [r for r in fs_rows if r["problem"] == problem and r["solver"] == name]
            ax.loglog(
                [r["n"] for r in rs],
                [r["component_evaluations"] for r in rs],
                marker=marker,
                color=colour,
                ls="-" if problem == "least squares" else "--",
                label=f"{name} ({problem})",
            )
    ax.set_xlabel("components n")
    ax.set_ylabel("component evaluations to tolerance")
    ax.set_title("finite sums: evaluations against n")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)
    print("wrote", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[40, 64, 100, 128, 200, 256, 400, 512, 1000, 2000]
    )
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--guard", type=float, default=10.0, help="seconds of timed calls per row")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", default=None)
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the plot from the results file"
    )
    args = parser.parse_args()
    path = args.plot or RESULTS_DIR / f"solvers_{jax.default_backend()}.png"
    if args.plot_only:
        data = json.loads((RESULTS_DIR / f"solvers_{jax.default_backend()}.json").read_text())
        plot(data["residuals"], data["finite_sum"], path)
        return
    if args.quick:
        args.budgets, args.n = [40, 64, 128, 256, 512], [100, 1000]
    t0 = time.perf_counter()
    res_rows = residuals(args.steps)
    print_table(
        ["problem", "solver", "result", "steps", "residual"],
        [
            [r["problem"], r["solver"], r["result"], str(r["steps"]), f"{r['residual']:.1e}"]
            for r in res_rows
        ],
        title=f"Residuals ({args.steps} steps, tolerance 1e-12)",
    )
    inf_rows = infeasible(args.budgets)
    print_table(
        ["problem", "solver", "first infeasible budget", "|v| error", "results"],
        [
            [
                r["problem"],
                r["solver"],
                str(r["first_infeasible_budget"]),
                "—"
                if r["displacement_norm_error"] is None
                else f"{r['displacement_norm_error']:.1e}",
                " ".join(f"{k}:{v[:3]}" for k, v in r["results"].items()),
            ]
            for r in inf_rows
        ],
        title="Infeasibility detection",
    )
    hom_rows = homotopy(500)
    print_table(
        ["problem", "start", "solver", "result", "steps", "value", "path's root?"],
        [
            [
                r["problem"],
                str(r["start"]),
                r["solver"],
                r["result"],
                str(r["steps"]),
                str(np.round(r["value"], 4).tolist()),
                str(r["reached_path_root"]),
            ]
            for r in hom_rows
        ],
        title="Hard starts (root_find, tolerance 1e-10, 500 steps)",
        left=(0, 1, 2, 3),
    )
    fs_rows = finite_sum(args.n, args.tol, args.guard)
    print_table(
        ["problem", "n", "solver", "result", "steps", "evaluations", "÷ full batch", "time"],
        [
            [
                r["problem"],
                str(r["n"]),
                r["solver"],
                r["result"],
                str(r["steps"]),
                str(r["component_evaluations"]),
                f"{r['evaluations_over_full_batch']:.3f}",
                f"{r['time_s'] * 1e3:.1f} ms",
            ]
            for r in fs_rows
        ],
        title=f"Finite sums (tolerance {args.tol:g}, max-norm)",
        left=(0, 2, 3),
    )
    payload = dict(
        benchmark="solvers",
        mode="quick" if args.quick else "default",
        dtype="float64",
        device=device_info(),
        versions=versions(),
        git=git_state(),
        settings=vars(args),
        residuals=res_rows,
        infeasible=inf_rows,
        homotopy=hom_rows,
        finite_sum=fs_rows,
        elapsed_s=time.perf_counter() - t0,
    )
    print("wrote", write_json("solvers", payload))
    plot(res_rows, fs_rows, path)


if __name__ == "__main__":
    main()
