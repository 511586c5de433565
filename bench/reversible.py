"""Reversible gradients (`solvers.Reversible` + `ReversibleAdjoint`) against the
unrolled and implicit gradients: how exact, how much memory, how fast.

Two parts, on the DEQ map `f(z) = tanh(W z + U x)` (`W` a random matrix of spectral
norm `rho`, `x` one input):

- `accuracy` (hidden 32, one input): for `rho` in {0.5, 0.9}, `beta` in {0.5, 0.8}
  and float32 / float64, solves at tolerances 1e-1 ... 1e-6 (so that the number of
  steps `N` grows); per solve the gradient of `sum(sin(z*))` with respect to `(W, U,
  x)` by `ReversibleAdjoint(None)` (the reversal unchecked), by `UnrolledAdjoint()`
  of the same solver in the same dtype (the gradient of the iteration: what the
  reversal should reproduce) and by `ImplicitAdjoint()` in float64 (the derivative
  of the fixed point), as relative errors `‖g − g_ref‖₂ / ‖g_ref‖₂` over all
  leaves; whether the default check (`ReversibleAdjoint()`, `rtol=1e-2`) refuses
  the reversal; and the drift of the recovered start relative to the distance
  travelled (the number that check compares with `rtol`: with `y0 = 0` the check's
  scale `max(‖y − y0‖, ‖y0‖, ‖y‖)` is the distance travelled), from the solver's own
  `update` / `revert` run `N` steps forward and back.
- `cost` (hidden 512, batch 64, float32, `bench/deq_memory.py`'s cell `tanh(0.5 W z +
  U x + c)`), in two forms: `joint`, one fixed point for the whole batch (`z` of shape
  (batch, hidden), as RevDEQ solves it), and `vmap`, the layer mapped over the batch.
  One `loss + gradient` step through exactly `N` steps (tolerance 0, `throw=False`)
  for `N` in {10, 30, 100}, with `ReversibleAdjoint`, `UnrolledAdjoint(checkpoints=N)`
  (every iterate stored), `UnrolledAdjoint()` (recursive checkpointing) and
  `ImplicitAdjoint()`: XLA's `temp_size_in_bytes` of the compiled step and its median
  time (`jax.block_until_ready`, compile apart).

`python bench/reversible.py`; `--quick`: fewer tolerances and `N` in {10, 30};
`--plot-only`: redraw `bench/results/reversible_<backend>.png` from the results.
"""

from __future__ import annotations

import argparse
import json
import time

import equinox as eqx
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


def _problem(n: int, rho: float, batch: int | None, seed: int = 0):
    kw, ku, kx = jax.random.split(jax.random.PRNGKey(seed), 3)
    w = jax.random.normal(kw, (n, n), jnp.float64)
    w = rho * w / jnp.linalg.norm(w, 2)
    u = jax.random.normal(ku, (n, n), jnp.float64) / np.sqrt(n)
    x = jax.random.normal(kx, (n,) if batch is None else (batch, n), jnp.float64)
    return w, u, x


def _f(z, args):
    w, u, x = args
    return jnp.tanh(w @ z + u @ x)


def _grad(adjoint, solver, max_steps=2000, throw=True):
    def loss(args):
        z0 = jnp.zeros(args[0].shape[0], args[0].dtype)
        sol = fp.fixed_point(
            _f, z0, args, solver=solver, adjoint=adjoint, max_steps=max_steps, throw=throw
        )
        return jnp.sum(jnp.sin(sol.value)), sol.stats["num_steps"]

    return jax.jit(jax.grad(loss, has_aux=True))


def _rel(a, b) -> float:
    num = sum(float(jnp.sum((x.astype(jnp.float64) - y) ** 2)) for x, y in zip(a, b, strict=True))
    den = sum(float(jnp.sum(y**2)) for y in b)
    return float(np.sqrt(num / den))


def _drift(solver, args, steps: int) -> float:
    """The recovered start's distance from the true one, over the distance travelled."""
    y0 = jnp.zeros(args[0].shape[0], args[0].dtype)
    prev, y = y0, y0
    for _ in range(steps):
        prev, y = y, solver.update(prev, y, _f(y, args))
    travelled = float(jnp.max(jnp.abs(y - y0)))
    for _ in range(steps):
        prev, y = solver.revert(prev, y, _f(prev, args)), prev
    drift = max(float(jnp.max(jnp.abs(y - y0))), float(jnp.max(jnp.abs(prev - y0))))
    return drift / travelled if travelled > 0 else 0.0


def accuracy(tols: list[float]) -> list[dict]:
    rows = []
    for rho in (0.5, 0.9):
        args64 = _problem(32, rho, None)
        for beta in (0.5, 0.8):
            for tol in tols:
                solver = solvers.Reversible(tol, tol, beta=beta)
                implicit, _ = _grad(fp.ImplicitAdjoint(rtol=1e-12), solver)(args64)
                for dtype in (jnp.float32, jnp.float64):
                    if dtype == jnp.float32 and tol < 1e-5:
                        continue  # below float32's reach
                    args = jax.tree.map(lambda a, d=dtype: a.astype(d), args64)
                    rev, steps = _grad(fp.ReversibleAdjoint(None), solver)(args)
                    unrolled, _ = _grad(fp.UnrolledAdjoint(), solver)(args)
                    checked, _ = _grad(fp.ReversibleAdjoint(), solver, throw=False)(args)
                    refused = bool(np.isnan(np.asarray(checked[2])).any())
                    rows.append(
                        dict(
                            rho=rho,
                            beta=beta,
                            dtype=jnp.dtype(dtype).name,
                            tol=tol,
                            steps=int(steps),
                            error_vs_unrolled=_rel(rev, unrolled),
                            error_vs_implicit=_rel(rev, implicit),
                            unrolled_vs_implicit=_rel(unrolled, implicit),
                            drift=_drift(solver, args, int(steps)),
                            refused=refused,
                        )
                    )
    return rows


class _Cell(eqx.Module):
    """`bench/deq_memory.py`'s cell: `tanh(0.5 W z + U x + c)`."""

    w: eqx.nn.Linear
    u: eqx.nn.Linear

    def __init__(self, hidden, key):
        k1, k2 = jax.random.split(key)
        self.w = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k1, dtype=jnp.float32)
        self.u = eqx.nn.Linear(hidden, hidden, key=k2, dtype=jnp.float32)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.w(z) + self.u(x))


def cost(steps_list: list[int], hidden: int, batch: int, guard_s: float) -> list[dict]:
    cell = _Cell(hidden, jax.random.key(0))
    xs = jnp.ones((batch, hidden), jnp.float32)
    adjoints = {
        "ReversibleAdjoint": lambda s: fp.ReversibleAdjoint(None),
        "UnrolledAdjoint(checkpoints=N)": lambda s: fp.UnrolledAdjoint(checkpoints=s),
        "UnrolledAdjoint()": lambda s: fp.UnrolledAdjoint(),
        "ImplicitAdjoint": lambda s: fp.ImplicitAdjoint(),
    }
    rows = []
    # "joint": one fixed point for the whole batch (`z` of shape (batch, hidden), as
    # RevDEQ solves it); "vmap": one per input, the layer mapped over the batch.
    for form in ("joint", "vmap"):
        for steps in steps_list:
            for name, make in adjoints.items():
                deq = fp.layers.DEQ(
                    eqx.filter_vmap(cell) if form == "joint" else cell,
                    z_shape=(batch, hidden) if form == "joint" else (hidden,),
                    solver=solvers.Reversible(0.0, 1e-30),
                    adjoint=make(steps),
                    max_steps=steps,
                    throw=False,
                )

                def loss(deq, xs, form=form):
                    zs = deq(xs) if form == "joint" else jax.vmap(deq)(xs)
                    return jnp.mean(zs**2)

                step = eqx.filter_value_and_grad(loss)
                params, static = eqx.partition(deq, eqx.is_array)

                def run(params, xs, static=static, step=step):
                    return step(eqx.combine(params, static), xs)

                t0 = time.perf_counter()
                compiled = jax.jit(run).lower(params, xs).compile()
                compile_s = time.perf_counter() - t0
                temp = compiled.memory_analysis().temp_size_in_bytes
                timing = time_jitted(run, params, xs, guard_s=guard_s)
                rows.append(
                    dict(
                        form=form,
                        steps=steps,
                        adjoint=name,
                        temp_bytes=int(temp),
                        time_s=timing.median,
                        compile_s=compile_s,
                    )
                )
    return rows


def plot(acc_rows: list[dict], cost_rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"float32": "--", "float64": "-"}
    for rho in sorted({r["rho"] for r in acc_rows}):
        for beta in sorted({r["beta"] for r in acc_rows}):
            for dtype in ("float32", "float64"):
                rs = [
                    r
                    for r in acc_rows
                    if r["rho"] == rho and r["beta"] == beta and r["dtype"] == dtype
                ]
                if not rs:
                    continue
                ax1.semilogy(
                    [r["steps"] for r in rs],
                    [max(r["error_vs_unrolled"], 1e-17) for r in rs],
                    styles[dtype],
                    marker="o",
                    markersize=3,
                    label=f"ρ={rho}, β={beta}, {dtype}",
                )
    ax1.set_xlabel("forward steps N")
    ax1.set_ylabel("‖g_rev − g_unrolled‖ / ‖g_unrolled‖")
    ax1.set_title("Reversed gradient against the unrolled one")
    ax1.legend(fontsize=7)
    for name in dict.fromkeys(r["adjoint"] for r in cost_rows):
        rs = [r for r in cost_rows if r["adjoint"] == name and r["form"] == "joint"]
        ax2.plot(
            [r["steps"] for r in rs], [r["temp_bytes"] / 2**20 for r in rs], marker="o", label=name
        )
    ax2.set_xlabel("forward steps N")
    ax2.set_ylabel("XLA temp memory (MiB)")
    ax2.set_title("Train-step memory (hidden 512, batch 64 solved jointly, float32)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tols", type=float, nargs="+", default=list(np.logspace(-1, -6, 11)))
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--guard", type=float, default=10.0, help="seconds of timed calls per row")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    name = f"reversible_{jax.default_backend()}"
    path = args.plot or RESULTS_DIR / f"{name}.png"
    if args.plot_only:
        data = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        plot(data["accuracy"], data["cost"], path)
        return
    if args.quick:
        args.tols, args.steps = [1e-1, 1e-2, 1e-3, 1e-4], [10, 30]
    t0 = time.perf_counter()
    acc_rows = accuracy(args.tols)
    print_table(
        ["rho", "beta", "dtype", "tol", "N", "vs unrolled", "vs implicit", "drift", "refused"],
        [
            [
                str(r["rho"]),
                str(r["beta"]),
                r["dtype"],
                f"{r['tol']:.0e}",
                str(r["steps"]),
                f"{r['error_vs_unrolled']:.1e}",
                f"{r['error_vs_implicit']:.1e}",
                f"{r['drift']:.1e}",
                str(r["refused"]),
            ]
            for r in acc_rows
        ],
        title="Reversed gradient: relative errors, drift of the recovered start",
    )
    cost_rows = cost(args.steps, args.hidden, args.batch, args.guard)
    print_table(
        ["form", "N", "adjoint", "temp memory", "time", "compile"],
        [
            [
                r["form"],
                str(r["steps"]),
                r["adjoint"],
                f"{r['temp_bytes'] / 2**20:.2f} MiB",
                f"{r['time_s'] * 1e3:.1f} ms",
                f"{r['compile_s']:.2f} s",
            ]
            for r in cost_rows
        ],
        title=f"Train step (hidden {args.hidden}, batch {args.batch}, float32)",
        left=(0, 2),
    )
    payload = dict(
        benchmark="reversible",
        mode="quick" if args.quick else "default",
        device=device_info(),
        versions=versions(),
        git=git_state(),
        settings=vars(args),
        accuracy=acc_rows,
        cost=cost_rows,
        wall_s=time.perf_counter() - t0,
    )
    write_json("reversible", payload)
    plot(acc_rows, cost_rows, path)


if __name__ == "__main__":
    main()
