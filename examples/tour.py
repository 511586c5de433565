"""A tour of fixpoint: every solver on a few problems, a table, a plot, a gradient.

Run (from the repository root, after `pip install -e ".[demo]"`):

    python examples/tour.py

Prints a table (solver × problem: result, steps, final residual, run time and
compile time), saves `tour_convergence.png` (residual against step on the slow
problem), checks an implicit gradient against finite differences, and samples
a diffusion model in parallel over its 1000 steps (`fixpoint.scan` with
`solvers.PicardSum`, whole and with a sliding window, against `Jacobi`), saving
`tour_sampler.png` (residual against iteration, and the samples).
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
from fixpoint import solvers  # noqa: E402

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

    convergence_plot(problems["linear, eig<=0.99"])

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

    sampler()


def convergence_plot(slow):
    """Residual against step for every solver on the slow problem: tour_convergence.png."""
    # The x-axis is linear up to 10 steps and logarithmic beyond, so that the two Newton
    # solvers (1-2 steps) are not squeezed against the axis; they get markers of their
    # own, being only a few points each.
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    styles = {
        "Newton (LU)": dict(marker="s", ms=9, mfc="none", mew=2, lw=2),
        "Newton-Krylov": dict(marker="^", ms=6, ls="--", lw=1.5),
    }
    for sname, solver in SOLVERS.items():
        sol = slow(solver, record=True)
        hist = sol.stats["residual_history"]
        label = f"{sname}: {int(sol.stats['num_steps'])} steps"
        ax.semilogy(hist, label=label, **styles.get(sname, {}))
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, None)
    ax.set_xlabel("step (linear scale up to 10, logarithmic beyond)")
    ax.set_ylabel("residual (max-norm)")
    ax.set_title("z = A z + b, eigenvalues of A up to 0.99, tolerance 1e-8")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig("tour_convergence.png", dpi=100)
    print("\nsaved tour_convergence.png")


def sampler(steps=1000, samples=256):
    """A diffusion sampler solved in parallel over time: Euler steps of the
    probability-flow ODE of a ring of 8 Gaussians (exact score), sigma 20 -> 0.01."""
    angles = jnp.arange(8) * (2 * jnp.pi / 8)
    means = 4.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
    var = 0.05

    def step(x, sigmas):
        a, b = sigmas
        v = var + a * a
        weights = jax.nn.softmax(-jnp.sum((x - means) ** 2, axis=1) / (2 * v))
        x = x + (b - a) * (-a * (weights @ means - x) / v)
        return x, x

    grid = jnp.geomspace(20.0, 0.01, steps + 1)
    xs = (grid[:-1], grid[1:])
    noise = 20.0 * jax.random.normal(jax.random.key(0), (samples, 2))
    configs = {
        "PicardSum": solvers.PicardSum(1e-8, 1e-8),
        "PicardSum(window=100)": solvers.PicardSum(1e-8, 1e-8, window=100),
        "Jacobi": solvers.Jacobi(1e-8, 1e-8),
    }
    exact = jax.lax.scan(step, noise[0], xs)[1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    print(f"\ndiffusion sampler, {steps} steps (one trajectory; errors against lax.scan)")
    for name, solver in configs.items():
        _, ys, sol = jax.jit(
            lambda x0, s=solver: fixpoint.scan(
                step, x0, xs, solver=s, record_residuals=True, return_solution=True
            )
        )(noise[0])
        iters = int(sol.stats["num_steps"])
        per = steps if solver.window is None else solver.window
        err = float(jnp.max(jnp.abs(ys - exact)))
        print(f"  {name:<22} {iters:5d} iterations, {iters * per:7d} evaluations, error {err:.1e}")
        ax1.semilogy(sol.stats["residual_history"][: iters + 1], label=name)
    ax1.set_xlabel("solver iteration (log scale)")
    ax1.set_ylabel("largest per-step residual")
    ax1.set_xscale("log")
    ax1.set_title(f"solving {steps} sampler steps at once\n(windowed: residual inside the window)")
    ax1.legend(fontsize=8)
    final = jax.jit(
        jax.vmap(lambda x0: fixpoint.scan(step, x0, xs, solver=configs["PicardSum"])[0])
    )(noise)
    ax2.scatter(final[:, 0], final[:, 1], s=4, label=f"{samples} samples (PicardSum)")
    ax2.scatter(means[:, 0], means[:, 1], marker="x", c="k", label="mixture means")
    ax2.set_aspect("equal")
    ax2.set_xlabel("$x_1$")
    ax2.set_ylabel("$x_2$")
    ax2.set_title("samples from noise (σ = 20) to σ = 0.01:\na ring of 8 Gaussians")
    ax2.legend(fontsize=8)
    fig.savefig("tour_sampler.png", dpi=100)
    print("saved tour_sampler.png")


if __name__ == "__main__":
    main()
