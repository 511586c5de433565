"""Anderson now against Anderson at an earlier commit, in one process, interleaved.

The earlier `solvers/_anderson.py` is read from git (`--old`, default 3d12634: the
solver before the per-step work of issue #35) and loaded beside the current one; both
solve `z = tanh(W z + c)` (`W` symmetric with spectral norm `rho`, `c = U x`, float32,
`rtol = 0`, `atol = 1e-5`, history 5) through `fixpoint.fixed_point`, without `vmap`
and under `vmap` over a batch, each call ended by `jax.block_until_ready`, compile
apart, the two versions alternating. Prints medians, their ratio and the step counts.

    python bench/anderson_versions.py            # about a minute on 2 CPU cores
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import symmetric_contraction

import fixpoint
from fixpoint import solvers

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (d, batch or None for no vmap, rho)
    (64, None, 0.9),
    (256, None, 0.99),
    (256, 1, 0.99),
    (64, 64, 0.9),
    (256, 64, 0.9),
    (256, 64, 0.99),
]


def _old_anderson(commit: str):
    source = subprocess.run(
        ["git", "show", f"{commit}:solvers/_anderson.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_anderson.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_anderson", path)
    module = importlib.util.module_from_spec(spec)  # pyright: ignore[reportArgumentType]
    spec.loader.exec_module(module)  # pyright: ignore[reportOptionalMemberAccess]
    return module.Anderson


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="3d12634", help="the earlier commit")
    p.add_argument("--reps", type=int, default=31)
    cli = p.parse_args()
    versions = {"old": _old_anderson(cli.old), "new": solvers.Anderson}
    f = lambda z, a: jnp.tanh(a[0] @ z + a[1])  # noqa: E731
    for d, batch, rho in CASES:
        rng = np.random.default_rng(0)
        w = jnp.asarray(symmetric_contraction(rng, d, rho), jnp.float32)
        u = 0.1 * rng.standard_normal((d, d)) / np.sqrt(d)
        c = jnp.asarray(rng.standard_normal((batch or 1, d)) @ u.T, jnp.float32)
        runs = {}
        for name, cls in versions.items():
            s = cls(0.0, 1e-5, history=5)

            def one(ci, s=s, d=d, w=w):
                return fixpoint.fixed_point(
                    f, jnp.zeros(d), (w, ci), solver=s, max_steps=1000, throw=False
                )

            runs[name] = jax.jit(jax.vmap(one) if batch else lambda c, one=one: one(c[0]))
            jax.block_until_ready(runs[name](c))  # compile apart
        times = {name: [] for name in runs}
        for _ in range(cli.reps):
            for name, run in runs.items():
                t = time.perf_counter()
                jax.block_until_ready(run(c))
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        steps = {name: int(np.max(run(c).stats["num_steps"])) for name, run in runs.items()}
        where = f"d={d} " + (f"vmap batch={batch}" if batch else "no vmap") + f" rho={rho}"
        print(
            f"{where:32s} old {med['old'] * 1e3:7.3f} ms ({steps['old']} steps)  "
            f"new {med['new'] * 1e3:7.3f} ms ({steps['new']} steps)  "
            f"new/old {med['new'] / med['old']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
