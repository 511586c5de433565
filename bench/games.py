"""Iterative water-filling: best responses in every order, and the small-gain
certificate against Scutari et al.'s sufficient condition.

Two parts (float64, `max_norm` tolerance 1e-10, `fp.datasets.interference_game`):

- `orders`: random games with `K` users and `N` channels (`--sizes`, cross gain
  0.05), solved from every user spreading its power evenly by
  `solvers.BestResponse` with `order="simultaneous"`, `"sequential"` and
  `"random"`, the sequential orders both with the per-user `fp.Blockwise` form
  (`game.responses()`) and with a plain `fn` (the same map, called whole): sweeps,
  water-fillings (one per user per evaluation of the map; a plain `fn` makes a
  sequential sweep cost `K` whole evaluations), the largest difference from the
  simultaneous equilibrium, and the median time of the compiled solve
  (`jax.block_until_ready`, compile apart).
- `certificate`: 20 random games (`K` = 4, `N` = 8) for each cross gain in
  `--cross`: the spectral radius of Scutari et al.'s `S_qr = max_k G_rq(k)/G_qq(k)`
  (below one: a unique equilibrium and convergence of every order), whether
  `fp.small_gain_certificate(game.constants())` certifies, and, where it does,
  whether `BestResponse(order="simultaneous", damping=step_size)` converges; and
  how often undamped simultaneous and sequential best responses converge (500
  sweeps) where neither condition holds.

`python bench/games.py`; `--quick`: smaller sizes.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import device_info, git_state, print_table, time_jitted, versions, write_json

jax.config.update("jax_enable_x64", True)

import fixpoint as fp  # noqa: E402
from fixpoint import datasets, solvers  # noqa: E402

TOL = 1e-10


def _solve(game, order, whole=False, damping=1.0, max_steps=500):
    fn = game.responses()
    if whole:
        fn = lambda p, a, fn=fn: fn(p, a)  # noqa: E731  (the same map, no longer per user)
    return fp.fixed_point(
        fn,
        game.start(),
        solver=solvers.BestResponse(TOL, TOL, order=order, damping=damping),
        max_steps=max_steps,
        throw=False,
    )


CONFIGS = (
    ("simultaneous", False),
    ("sequential", False),
    ("sequential", True),
    ("random", False),
    ("random", True),
)


def orders(sizes: list[tuple[int, int]], guard_s: float) -> list[dict]:
    rows = []
    for k, n in sizes:
        game = datasets.interference_game(jax.random.PRNGKey(k * 1000 + n), k, n, cross=0.05)
        rho = float(jnp.max(jnp.abs(jnp.linalg.eigvals(game.interference_ratios()))))
        reference = None
        for order, whole in CONFIGS:
            sol = _solve(game, order, whole)
            value = np.concatenate([np.asarray(v) for v in sol.value])
            if reference is None:
                reference = value
            sweeps = int(sol.stats["num_steps"])
            # Evaluations of the map: one per sweep plus the last test; a plain fn
            # evaluated K times per sequential sweep.
            per_sweep = k * k if (whole and order != "simultaneous") else k
            timing = time_jitted(
                lambda g, o=order, w=whole: _solve(g, o, w).value, game, guard_s=guard_s
            )
            rows.append(
                dict(
                    users=k,
                    channels=n,
                    spectral_radius=rho,
                    order=order,
                    form="plain fn" if whole else "Blockwise",
                    result=str(sol.result).split(".")[-1],
                    sweeps=sweeps,
                    water_fillings=(sweeps + 1) * per_sweep,
                    difference=float(np.max(np.abs(value - reference))),
                    time_s=timing.median,
                    compile_s=timing.compile_s,
                )
            )
    return rows


def certificate(crosses: list[float], games: int) -> list[dict]:
    rows = []
    for cross in crosses:
        counts = dict(games=games, contracting=0, certified=0, damped_converged=0)
        plain = dict(simultaneous=0, sequential=0)
        margins = []
        for seed in range(games):
            game = datasets.interference_game(jax.random.PRNGKey(seed), 4, 8, cross=cross)
            rho = float(jnp.max(jnp.abs(jnp.linalg.eigvals(game.interference_ratios()))))
            cert = fp.small_gain_certificate(game.constants())
            counts["contracting"] += int(rho < 1)
            counts["certified"] += int(bool(cert.certified))
            margins.append(float(cert.margin))
            if bool(cert.certified):
                sol = _solve(game, "simultaneous", damping=float(cert.step_size), max_steps=5000)
                counts["damped_converged"] += bool(sol.result == fp.RESULTS.successful)
            for order in plain:
                plain[order] += bool(_solve(game, order).result == fp.RESULTS.successful)
        rows.append(
            dict(
                cross=cross,
                **counts,
                agree=counts["contracting"] == counts["certified"],
                median_margin=float(np.median(margins)),
                simultaneous_converged=plain["simultaneous"],
                sequential_converged=plain["sequential"],
            )
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=str, nargs="+", default=["4x16", "8x32", "16x64"])
    parser.add_argument("--cross", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--games", type=int, default=20)
    parser.add_argument("--guard", type=float, default=5.0, help="seconds of timed calls per row")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.games = ["4x16", "8x32"], 5
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes]
    t0 = time.perf_counter()
    order_rows = orders(sizes, args.guard)
    print_table(
        ["K×N", "ρ(S)", "order", "form", "result", "sweeps", "water-fillings", "diff", "time"],
        [
            [
                f"{r['users']}×{r['channels']}",
                f"{r['spectral_radius']:.2f}",
                r["order"],
                r["form"],
                r["result"],
                str(r["sweeps"]),
                str(r["water_fillings"]),
                f"{r['difference']:.0e}",
                f"{r['time_s'] * 1e3:.2f} ms",
            ]
            for r in order_rows
        ],
        title="Orders (tolerance 1e-10)",
        left=(0, 2, 3, 4),
    )
    cert_rows = certificate(args.cross, args.games)
    print_table(
        ["cross", "ρ(S) < 1", "certified", "agree", "damped conv.", "Jacobi conv.", "GS conv."],
        [
            [
                str(r["cross"]),
                f"{r['contracting']}/{r['games']}",
                f"{r['certified']}/{r['games']}",
                str(r["agree"]),
                f"{r['damped_converged']}/{r['certified']}",
                f"{r['simultaneous_converged']}/{r['games']}",
                f"{r['sequential_converged']}/{r['games']}",
            ]
            for r in cert_rows
        ],
        title="Certificate against Scutari et al.'s condition (K = 4, N = 8)",
    )
    payload = dict(
        benchmark="games",
        mode="quick" if args.quick else "default",
        dtype="float64",
        device=device_info(),
        versions=versions(),
        git=git_state(),
        settings=vars(args),
        orders=order_rows,
        certificate=cert_rows,
        wall_s=time.perf_counter() - t0,
    )
    write_json("games", payload)


if __name__ == "__main__":
    main()
