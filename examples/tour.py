"""A tour of fixpoint: every solver on a few problems, a table, a plot, a gradient.

Run (from the repository root, after `pip install -e ".[demo]"`):

    python examples/tour.py

Prints a table (solver × problem: result, steps, final residual, run time and
compile time), saves `tour_convergence.png` (residual against step on the slow
problem), and checks an implicit gradient against finite differences.
"""

import time

import jax
import jax.numpy as jnp
import lineax as lx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fixpoint  # noqa: E402
import solvers  # noqa: E402

jax.config.update("jax_enable_x64", True)
TOL = 1e-8
SOLVERS = {
    "Picard": solvers.Picard(TOL, TOL),
    "Picard(damping=0.5)": solvers.Picard(TOL, TOL, damping=0.5),
    "Anderson": solvers.Anderson(TOL, TOL),
    "Newton (LU)": solvers.Newton(TOL, TOL),
    "Newton-Krylov": solvers.Newton(TOL, TOL, linear_solver=lx.GMRES(1e-10, 1e-10)),
    "Broyden": solvers.Broyden(TOL, TOL),
}


def _problems():
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    # 1. DEQ-like layer z = tanh(W z + U x) for a batch of 32 inputs (vmap).
    d = 64
    w = jax.random.normal(k1, (d, d)) / jnp.sqrt(d)
    w = 0.9 * w / jnp.linalg.norm(w, 2)
    u = jax.random.normal(k2, (d, d)) / jnp.sqrt(d)
    xs = jax.random.normal(k3, (32, d))

    def deq(solver, record=False):
        def one(x):
            return fixpoint.fixed_point(
                lambda z, x: jnp.tanh(w @ z + u @ x),
                jnp.zeros(d),
                x,
                solver=solver,
                throw=False,
                max_steps=500,
                record_residuals=record,
            )

        return jax.vmap(one)(xs)

    # 2. A nearly linear map with eigenvalues up to 0.99: Picard crawls.
    n = 100
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (n, n)))
    a = q @ jnp.diag(jnp.linspace(0.0, 0.99, n)) @ q.T

    def slow(solver, record=False):
        return fixpoint.fixed_point(
            lambda z, b: a @ z + b,
            jnp.zeros(n),
            jnp.ones(n),
            solver=solver,
            throw=False,
            max_steps=3000,
            record_residuals=record,
        )

    # 3. Per-element roots of y^3 + y - c (root_find).
    cs = jnp.linspace(-5.0, 5.0, 11)

    def cubic(solver, record=False):
        return fixpoint.root_find(
            lambda y, c: y**3 + y - c,
            jnp.zeros(11),
            cs,
            solver=solver,
            throw=False,
            max_steps=500,
            record_residuals=record,
        )

    # 4. A pytree-valued coupled problem.
    def tree(solver, record=False):
        def fn(y, _):
            return {"u": jnp.cos(y["v"]) * jnp.ones(3), "v": 0.5 * jnp.mean(y["u"]) + 0.2}

        return fixpoint.fixed_point(
            fn,
            {"u": jnp.zeros(3), "v": jnp.array(0.0)},
            solver=solver,
            throw=False,
            max_steps=500,
            record_residuals=record,
        )

    # 5. x -> 1.5 x + 1: Picard diverges (and is stopped early); Newton finds -2.
    def expanding(solver, record=False):
        return fixpoint.fixed_point(
            lambda y, _: 1.5 * y + 1,
            jnp.zeros(4),
            solver=solver,
            throw=False,
            max_steps=500,
            record_residuals=record,
        )

    return {
        "DEQ tanh d=64 x32": deq,
        "linear, eig<=0.99": slow,
        "cubic roots": cubic,
        "pytree": tree,
        "1.5x+1": expanding,
    }


def _result_name(sol):
    codes = jnp.atleast_1d(sol.result._value)
    names = {int(v._value): k for k, v in fixpoint.RESULTS._name_to_item.items()}
    bad = [names[int(c)] for c in codes if int(c) != 0]
    return "ok" if not bad else f"{bad[0]} ({len(bad)}/{codes.size})"


def main():
    problems = _problems()
    rows = []
    for pname, make in tqdm(problems.items(), desc="problems"):
        for sname, solver in SOLVERS.items():
            fn = jax.jit(lambda s=solver, m=make: m(s))
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            first = time.perf_counter() - t0
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                sol = jax.block_until_ready(fn())
                times.append(time.perf_counter() - t0)
            run = sorted(times)[2]
            steps = jnp.atleast_1d(sol.stats["num_steps"])
            rows.append(
                (
                    pname,
                    sname,
                    _result_name(sol),
                    float(jnp.mean(steps)),
                    float(jnp.max(sol.stats["residual"])),
                    run,
                    first - run,
                )
            )

    header = (
        f"{'problem':<20} {'solver':<20} {'result':<24} {'steps':>7} {'residual':>10} "
        f"{'run':>10} {'compile':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for p, s, r, st, res, run, comp in rows:
        print(f"{p:<20} {s:<20} {r:<24} {st:7.1f} {res:10.2e} {run * 1e3:8.2f}ms {comp:8.2f}s")

    # Convergence plot on the slow problem.
    fig, ax = plt.subplots(figsize=(6, 4))
    slow = problems["linear, eig<=0.99"]
    for sname, solver in SOLVERS.items():
        hist = slow(solver, record=True).stats["residual_history"]
        ax.semilogy(hist, label=sname)
    ax.set_xlabel("step")
    ax.set_ylabel("residual (max-norm)")
    ax.set_title("z = A z + b, eigenvalues of A up to 0.99")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("tour_convergence.png", dpi=120)
    print("\nsaved tour_convergence.png")

    # An implicit gradient, checked against central finite differences.
    w = 0.8 * jnp.eye(3) + 0.1

    def loss(x):
        z = fixpoint.fixed_point(
            lambda z, x: jnp.tanh(w @ z / 2 + x),
            jnp.zeros(3),
            x,
            solver=solvers.Anderson(1e-12, 1e-12),
        ).value
        return jnp.sum(z**2)

    x = jnp.array([0.1, -0.4, 0.7])
    g = jax.grad(loss)(x)
    eps = 1e-6
    fd = jnp.array(
        [(loss(x.at[i].add(eps)) - loss(x.at[i].add(-eps))) / (2 * eps) for i in range(3)]
    )
    print(
        f"implicit gradient {g}\nfinite difference {fd}\n"
        f"max difference    {float(jnp.max(jnp.abs(g - fd))):.1e}"
    )


if __name__ == "__main__":
    main()
