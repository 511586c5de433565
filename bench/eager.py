"""Repeated eager calls: compiled once per function, as `jax.jit` (issue: < 20 ms).

Each case is a function defined once and called again and again from Python, with
new array inputs each time (never under a `jax.jit` of the caller's):

- `picard`: `fixpoint.fixed_point` of a plain `lambda` (`tanh(W y + a)`, d = 16,
  `W` a 0.5-contraction), Picard to 1e-6;
- `scan`: `fixpoint.scan` of a plain `lambda` cell (`tanh(0.5 h + x)`, T = 256,
  D = 8), `Jacobi()`;
- `decode-fn` / `decode-module`: `fixpoint.decode` of 32 tokens after a 4-token
  prompt from a tiny `layers.CausalTransformer` (vocabulary 16, d_model 32, two
  layers), `JacobiDecoding(window=8)`: called through a plain `lambda` (its plain
  path) and as the module itself (its key/value cache path);
- `perron`: `layers.perron_root` of a 32-node ring (no user function, so
  `uncached()` changes nothing for it).

For each: the first call (trace + compile + run), then the median and minimum of
`--reps` repeated calls, each ended by `jax.block_until_ready`, with the same in
`fixpoint.uncached()` (every call traced and compiled again: the opt-out, and the
old behaviour of plain functions) for comparison.

    python bench/eager.py            # ~1-2 minutes on a 2-core CPU

Writes `bench/results/eager_<backend>.json` and prints a table.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_info, fmt_time, git_state, print_table, versions, write_json

import fixpoint
from fixpoint import layers, solvers


def _cases():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    w = jnp.asarray(0.5 * q, jnp.float32)
    picard = solvers.Picard(1e-6, 1e-6)
    f = lambda y, a: jnp.tanh(w @ y + a)  # noqa: E731

    def run_picard(i):
        return fixpoint.fixed_point(f, jnp.zeros(16), jnp.full(16, 0.01 * i), solver=picard).value

    cell = lambda h, x: (jnp.tanh(0.5 * h + x), h)  # noqa: E731
    xs = jnp.asarray(rng.normal(size=(256, 8)), jnp.float32)

    def run_scan(i):
        return fixpoint.scan(cell, jnp.zeros(8), xs + 0.01 * i, solver=solvers.Jacobi())[0]

    model = layers.CausalTransformer(
        16, max_len=40, d_model=32, num_heads=2, num_layers=2, key=jax.random.key(0)
    )
    plain = lambda t: model(t)  # noqa: E731
    jacobi = solvers.JacobiDecoding(window=8)

    def run_decode(m):
        return lambda i: fixpoint.decode(m, jnp.array([1, 2, 3, i % 16]), 32, solver=jacobi)

    ring = layers.Graph(
        nodes=jnp.zeros((32, 1)),
        edges=jnp.zeros((32, 0)),
        senders=jnp.arange(32),
        receivers=(jnp.arange(32) + 1) % 32,
    )

    def run_perron(i):
        return layers.perron_root(ring, jnp.full(32, 0.5 + 0.001 * i), jnp.zeros(32))

    return {
        "picard": run_picard,
        "scan": run_scan,
        "decode-fn": run_decode(plain),
        "decode-module": run_decode(model),
        "perron": run_perron,
    }


def _time(run, reps: int, uncached: bool) -> dict:
    def call(i):
        t0 = time.perf_counter()
        if uncached:
            with fixpoint.uncached():
                jax.block_until_ready(run(i))
        else:
            jax.block_until_ready(run(i))
        return time.perf_counter() - t0

    first = call(0)
    times = [call(i + 1) for i in range(reps)]
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--uncached-reps", type=int, default=3)
    cli = p.parse_args()
    rows, results = [], {}
    for name, run in _cases().items():
        cached = _time(run, cli.reps, uncached=False)
        fresh = _time(run, cli.uncached_reps, uncached=True)
        results[name] = {"cached": cached, "uncached": fresh}
        rows.append(
            [
                name,
                fmt_time(cached["first_s"]),
                fmt_time(cached["median_s"]),
                fmt_time(cached["min_s"]),
                fmt_time(fresh["median_s"]),
                f"{fresh['median_s'] / cached['median_s']:.0f}x",
            ]
        )
        print(name, results[name], flush=True)
    print_table(
        ["case", "first call", "repeat (median)", "repeat (min)", "uncached()", "ratio"], rows
    )
    path = write_json(
        "eager",
        {
            "cases": results,
            "reps": cli.reps,
            "device": device_info(),
            "versions": versions(),
            "git": git_state(),
        },
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
