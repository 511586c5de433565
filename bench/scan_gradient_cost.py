"""Forward+gradient against forward time of `fixpoint.scan` (the ratio the scan issue targets).

`eqx.nn.GRUCell(4, D)` in float32, `x_t ~ N(0, 1)`, `h_0 = 0`, default solver
tolerances. `fwd`: all hidden states; `fwd+grad`: `jax.value_and_grad` of `sum(h²)`
with respect to the cell and the inputs (the implicit rule: the adjoint recurrence
is solved by the same scan solver). Each time is the minimum over `--rounds`
rounds in which the two compiled executables are called alternately (compile time
apart, `block_until_ready` on every call). Target: ratio <= 2 for DEER and
QuasiDEER.

Run: `.venv/bin/python bench/scan_gradient_cost.py` (about 1 minute on 2 CPU
cores); writes `bench/results/scan_gradient_cost_cpu.json`.
"""

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import fixpoint
from fixpoint import solvers

CASES = [(8, 1000), (8, 10000), (32, 10000)]
SOLVERS = {"DEER": solvers.DEER(), "QuasiDEER": solvers.QuasiDEER(), "ELK": solvers.ELK()}


def compiled(d, t, solver):
    cell = eqx.nn.GRUCell(4, d, key=jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (t, 4))

    def fwd(cell, xs):
        return fixpoint.scan(lambda h, x: (cell(x, h),) * 2, jnp.zeros(d), xs, solver=solver)[1]

    def loss(cell, xs):
        return jnp.sum(fwd(cell, xs) ** 2)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    return [jax.jit(fn).lower(cell, xs).compile() for fn in (fwd, grad)], (cell, xs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results/scan_gradient_cost_cpu.json")
    )
    args = parser.parse_args()
    rows = []
    for d, t in CASES:
        for name, solver in SOLVERS.items():
            if d == 32 and name == "ELK":
                continue
            (fwd, grad), inputs = compiled(d, t, solver)
            best = [float("inf"), float("inf")]
            for _ in range(args.rounds):
                for i, fn in enumerate((fwd, grad)):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*inputs))
                    best[i] = min(best[i], time.perf_counter() - start)
            row = {"D": d, "T": t, "solver": name, "fwd_s": best[0], "fwd_grad_s": best[1]}
            row["ratio"] = best[1] / best[0]
            rows.append(row)
            print(
                f"D={d:>3} T={t:>6} {name:>10}: fwd {best[0] * 1e3:8.2f} ms, fwd+grad "
                f"{best[1] * 1e3:8.2f} ms, ratio {row['ratio']:.2f}",
                flush=True,
            )
    Path(args.out).write_text(json.dumps({"rows": rows, "devices": str(jax.devices())}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
