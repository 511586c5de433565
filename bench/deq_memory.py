"""Train-step memory of a DEQ: implicit adjoint against unrolling, by XLA's analysis.

The same `f(z, x) = tanh(W z + U x)` (hidden 512, batch 64, float32) is solved for
exactly `steps` Picard iterations (tolerance 0, `throw=False`) inside one
`loss + gradient` step, differentiated with

- `ImplicitAdjoint()` (the default: GMRES on VJPs at the equilibrium),
- `UnrolledAdjoint(checkpoints=steps)` (every iterate stored: plain backprop),
- `UnrolledAdjoint()` (recursive checkpointing: fewer stored iterates, recomputation).

Memory is `temp_size_in_bytes` from `jax.jit(step).lower(...).compile()
.memory_analysis()`: what XLA allocates for intermediates, independent of timing
noise and of the machine's load.

    python bench/deq_memory.py            # steps 10, 30, 100
"""

import argparse
import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp

import fixpoint
from fixpoint import layers, solvers


class Cell(eqx.Module):
    w: eqx.nn.Linear
    u: eqx.nn.Linear

    def __init__(self, hidden, key):
        k1, k2 = jax.random.split(key)
        self.w = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k1)
        self.u = eqx.nn.Linear(hidden, hidden, key=k2)

    def __call__(self, z, x):
        return jnp.tanh(0.5 * self.w(z) + self.u(x))


def temp_bytes(adjoint, steps, hidden, batch):
    deq = layers.DEQ(
        Cell(hidden, jax.random.key(0)),
        solver=solvers.Picard(1e-30, 1e-30),
        adjoint=adjoint,
        max_steps=steps,
        throw=False,
    )
    xs = jnp.ones((batch, hidden))

    def loss(deq, xs):
        return jnp.mean(jax.vmap(deq)(xs) ** 2)

    step = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    compiled = step.lower(deq, xs).compile()
    return compiled.compiled.memory_analysis().temp_size_in_bytes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    rows = []
    print(
        f"{'steps':>6} {'implicit':>12} {'unrolled (all)':>15} {'unrolled (ckpt)':>16} "
        f"{'all/implicit':>13}"
    )
    for s in a.steps:
        imp = temp_bytes(fixpoint.ImplicitAdjoint(), s, a.hidden, a.batch)
        full = temp_bytes(fixpoint.UnrolledAdjoint(checkpoints=s), s, a.hidden, a.batch)
        ckpt = temp_bytes(fixpoint.UnrolledAdjoint(), s, a.hidden, a.batch)
        rows.append(
            {"steps": s, "implicit": imp, "unrolled_all": full, "unrolled_checkpointed": ckpt}
        )
        print(
            f"{s:6d} {imp / 2**20:10.2f}MB {full / 2**20:13.2f}MB {ckpt / 2**20:14.2f}MB "
            f"{full / imp:12.1f}x"
        )
    out = pathlib.Path(__file__).parent / "results" / "deq_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": str(jax.devices()[0]), "hidden": a.hidden, "batch": a.batch, "rows": rows},
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
