"""Batches whose samples converge at different speeds, and the loop's own overhead.

`--part stragglers`: Picard on `z = tanh(s·W z + x)` (d = 256, batch 256, W
symmetric with eigenvalues in [0.5, 1], x ~ 1e-2·N(0, 1), rtol = atol = 1e-6,
float32), under `jax.vmap`, with `compaction=None` (the plain batched loop: every
sample runs until the slowest is done) against `fixpoint.Compaction()` and
`Compaction(factor=2)`, and the opt-in `Compaction(min_bucket=1)`. Cases: all
samples easy (s = 0.5); one slow sample (s = 0.99); a spread (s ~ U[0.5, 0.99]).
The calls are interleaved (every configuration and case once per round) and
each figure is the minimum over the rounds; compile time is measured apart.
Result codes and step counts are checked equal to the plain loop's before
anything is timed (reported, not required, for `min_bucket=1`, whose last
bucket is a matrix-vector product with other last bits). Two reference floors
for the one-slow case, timed in the same rounds: a bare vmapped `while_loop`
running only the slow sample's tail steps of the same map, at batch 2 (the
smallest bucket whose matmul keeps the batched loop's bits) and at batch 1.

`--part epoch`: one training epoch of a DEQ (`tanh(W z + U x)`, 64 units,
Anderson to 1e-4) and of a `layers.MonDEQ` (100 units, Peaceman–Rachford to
1e-4) on scikit-learn's digits, batch 128, with and without compaction, from
the same initial parameters (epochs interleaved; minimum over epochs 2.., the
first includes compilation and is reported apart).

`--part overhead`: the loop's cost per iteration at a fixed iteration count
(2,000 Picard steps of an orthogonal map, which never converges nor diverges),
batch 1, against a bare `lax.while_loop` doing the same map and nothing else.

    python bench/batch.py                       # all parts
    python bench/batch.py --part stragglers --rounds 20

With `--keep-going` (bench/gpu.py), result codes or step counts of the compacted loop
that differ from the plain loop's are recorded in the rows (`codes_equal`,
`steps_equal`) instead of stopping the run (on a GPU, batched matmuls of different
sizes need not round alike). The JSON is rewritten after every part.

Writes `bench/results/batch_<backend>.json` and prints tables.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import device_info, fmt_time, git_state, print_table, versions, write_json
from tqdm import tqdm

import fixpoint
from fixpoint import layers, solvers

CONFIGS = {
    "plain": None,
    "compact": fixpoint.Compaction(),
    "compact-f2": fixpoint.Compaction(factor=2),
    # Opt-in: a last bucket of one sample is a matrix-vector product, whose last
    # bits differ from the batched matmul's, so steps may differ (not asserted).
    "compact-b1": fixpoint.Compaction(min_bucket=1),
}
IDENTICAL = ("plain", "compact", "compact-f2")


# ---- stragglers -------------------------------------------------------------------


def _straggler_problem(d, batch, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w = (q * rng.uniform(0.5, 1.0, d)) @ q.T
    x = 1e-2 * rng.standard_normal((batch, d))
    cases = {
        "all easy": np.full(batch, 0.5),
        "one slow": np.concatenate([np.full(batch - 1, 0.5), [0.99]]),
        "spread": rng.uniform(0.5, 0.99, batch),
    }
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return f32(w), f32(x), {k: f32(v) for k, v in cases.items()}


def _straggler_solver(compaction, d):
    def one(w, s, x):
        sol = fixpoint.fixed_point(
            lambda z, a: jnp.tanh(a[1] * (a[0] @ z) + a[2]),
            jnp.zeros(d, jnp.float32),
            (w, s, x),
            solver=solvers.Picard(1e-6, 1e-6),
            max_steps=2000,
            throw=False,
            compaction=compaction,
        )
        return sol.value, sol.result._value, sol.stats["num_steps"]

    return jax.vmap(one, in_axes=(None, 0, 0))


def stragglers(d, batch, rounds, keep_going=False):
    w, x, cases = _straggler_problem(d, batch)
    compiled, compile_s, outs = {}, {}, {}
    for name, comp in CONFIGS.items():
        for case, s in cases.items():
            t0 = time.perf_counter()
            compiled[name, case] = jax.jit(_straggler_solver(comp, d)).lower(w, s, x).compile()
            compile_s[name, case] = time.perf_counter() - t0
            outs[name, case] = jax.block_until_ready(compiled[name, case](w, s, x))
    checks = {}
    for case in cases:
        ref = outs["plain", case]
        for name in CONFIGS:
            out = outs[name, case]
            checks[name, case] = {
                "codes_equal": bool(np.array_equal(out[1], ref[1])),
                "steps_equal": bool(np.array_equal(out[2], ref[2])),
                "max_abs_value_diff": float(np.max(np.abs(np.asarray(out[0]) - ref[0]))),
            }
            same = checks[name, case]["codes_equal"] and checks[name, case]["steps_equal"]
            if name in IDENTICAL and not same:
                msg = f"{name} / {case}: codes or steps differ from plain"
                if not keep_going:
                    raise AssertionError(msg)
                print(f"NOT IDENTICAL (--keep-going: recorded): {msg}", flush=True)
    # Reference floors for the one-slow case: the slow sample's tail (its steps
    # beyond the easy samples') as a bare vmapped `while_loop` of the same map and
    # nothing else, at batch 2 (the smallest bit-identical bucket) and at batch 1.
    # Not ours: they use the step count of the untimed solve above.
    slow_steps = np.asarray(outs["plain", "one slow"][2])
    tail = int(slow_steps.max() - np.sort(slow_steps)[-2])
    floors = {b: _bare_tail(w, x, d, b, tail) for b in (2, 1)}
    times = {key: [] for key in [*compiled, *floors]}
    for _ in tqdm(range(rounds), desc="stragglers (rounds)"):
        for key, fn in compiled.items():
            s = cases[key[1]]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(w, s, x))
            times[key].append(time.perf_counter() - t0)
        for b, (fn, args) in floors.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[b].append(time.perf_counter() - t0)
    best = {key: min(v) for key, v in times.items()}
    rows, records = [], []
    for case in cases:
        steps = np.asarray(outs["plain", case][2])
        for name in CONFIGS:
            rec = {
                "config": name,
                "case": case,
                "best_s": best[name, case],
                "median_s": float(np.median(times[name, case])),
                "compile_s": compile_s[name, case],
                "vs_plain": best[name, case] / best["plain", case],
                "vs_all_easy": best[name, case] / best[name, "all easy"],
                "steps_max": int(steps.max()),
                "steps_mean": float(steps.mean()),
                **checks[name, case],
            }
            records.append(rec)
            rows.append(
                [
                    case,
                    name,
                    fmt_time(rec["best_s"]),
                    f"{rec['vs_all_easy']:.2f}",
                    f"{rec['vs_plain']:.2f}",
                    f"{rec['compile_s']:.2f}s",
                    f"{rec['steps_mean']:.0f}/{rec['steps_max']}",
                    f"{rec['max_abs_value_diff']:.1e}",
                ]
            )
    print_table(
        ["case", "config", "best", "/all-easy", "/plain", "compile", "steps mean/max", "|dv|"],
        rows,
        title=f"Picard, d={d}, batch={batch}, float32, min of {rounds} interleaved rounds",
    )
    easy = best["compact", "all easy"]
    floor_rows = []
    for b in floors:
        rec = {
            "case": "one slow",
            "config": f"floor: compacted all-easy + bare tail at batch {b}",
            "tail_steps": tail,
            "bare_tail_s": best[b],
            "bare_tail_per_step_s": best[b] / tail,
            "vs_all_easy": (easy + best[b]) / easy,
        }
        records.append(rec)
        floor_rows.append(
            [
                str(b),
                str(tail),
                fmt_time(best[b]),
                fmt_time(best[b] / tail),
                f"{rec['vs_all_easy']:.2f}",
            ]
        )
    print_table(
        ["batch", "tail steps", "bare tail", "per step", "(all-easy + tail) / all-easy"],
        floor_rows,
        title="one slow: floors from a bare vmapped while_loop running only the slow tail",
    )
    return records


def _bare_tail(w, x, d, batch, steps):
    """A bare vmapped `while_loop` of the bench's map, `steps` iterations, `batch` rows."""

    def run(w, s, x):
        def one(s, x):
            def body(c):
                i, z = c
                return i + 1, jnp.tanh(s * (w @ z) + x)

            return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, jnp.zeros(d, w.dtype)))[1]

        return jax.vmap(one)(s, x)

    args = (w, jnp.full(batch, 0.99, w.dtype), x[:batch])
    return jax.jit(run).lower(*args).compile(), args


# ---- one training epoch --------------------------------------------------------------


class _Cell(eqx.Module):
    w: eqx.nn.Linear
    u: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.w = eqx.nn.Linear(64, 64, use_bias=False, key=k1)
        self.u = eqx.nn.Linear(64, 64, key=k2)

    def __call__(self, z, x):
        return jnp.tanh(self.w(z) + self.u(x))


def _epoch_model(kind, compaction, key):
    k1, k2 = jax.random.split(key)
    if kind == "deq":
        core = layers.DEQ(
            _Cell(k1),
            solver=solvers.Anderson(1e-4, 1e-4, history=5),
            max_steps=60,
            throw=False,
            normalise=lambda f: layers.spectral_norm(f, bound=0.95),
            compaction=compaction,
        )
        width = 64
    else:
        core = layers.MonDEQ(
            64,
            100,
            m=0.05,
            solver=solvers.PeacemanRachford(1e-4, 1e-4),
            max_steps=150,
            throw=False,
            compaction=compaction,
            key=k1,
        )
        width = 100
    return core, eqx.nn.Linear(width, 10, key=k2)


def epochs(num_epochs, batch):
    from sklearn.datasets import load_digits

    data = load_digits()
    xs = jnp.asarray(data.data / 16.0, jnp.float32)
    ys = jnp.asarray(data.target, jnp.int32)
    n = (len(xs) // batch) * batch
    perm = np.random.default_rng(0).permutation(len(xs))
    batches = [(xs[perm[i : i + batch]], ys[perm[i : i + batch]]) for i in range(0, n, batch)]
    opt = optax.adam(1e-3)
    records = []
    for kind in ("deq", "mondeq"):
        runs = {}
        for name in ("plain", "compact"):
            model = _epoch_model(kind, CONFIGS[name], jax.random.key(0))

            @eqx.filter_jit
            def step(model, state, x, y):
                def loss(model):
                    core, head = model
                    sol = jax.vmap(core.solve)(x)
                    logits = jax.vmap(head)(sol.value)
                    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                    return ce, sol.stats["num_steps"]

                (value, steps), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
                updates, state = opt.update(grads, state, model)
                return eqx.apply_updates(model, updates), state, value, steps

            runs[name] = {"model": model, "state": opt.init(model), "step": step, "times": []}
        for _ in tqdm(range(num_epochs), desc=f"{kind} epochs"):
            for run in runs.values():
                steps_seen, losses = [], []
                t0 = time.perf_counter()
                for x, y in batches:
                    run["model"], run["state"], value, steps = run["step"](
                        run["model"], run["state"], x, y
                    )
                    steps_seen.append(steps)
                    losses.append(value)
                jax.block_until_ready(run["model"])
                run["times"].append(time.perf_counter() - t0)
                run["loss"] = float(np.mean(losses))
                run["steps"] = np.concatenate([np.asarray(s) for s in steps_seen])
        for name, run in runs.items():
            rec = {
                "model": kind,
                "config": name,
                "first_epoch_s": run["times"][0],
                "best_epoch_s": min(run["times"][1:]),
                "last_loss": run["loss"],
                "last_epoch_steps_mean": float(run["steps"].mean()),
                "last_epoch_steps_max": int(run["steps"].max()),
            }
            records.append(rec)
        plain = next(r for r in records if r["model"] == kind and r["config"] == "plain")
        for r in records:
            if r["model"] == kind:
                r["vs_plain"] = r["best_epoch_s"] / plain["best_epoch_s"]
    rows = [
        [
            r["model"],
            r["config"],
            fmt_time(r["first_epoch_s"]),
            fmt_time(r["best_epoch_s"]),
            f"{r['vs_plain']:.2f}",
            f"{r['last_loss']:.4f}",
            f"{r['last_epoch_steps_mean']:.1f}/{r['last_epoch_steps_max']}",
        ]
        for r in records
    ]
    print_table(
        ["model", "config", "epoch 1 (+compile)", "best epoch", "/plain", "loss", "steps"],
        rows,
        title=f"digits, batch {batch}, {len(batches)} steps per epoch, {num_epochs} epochs",
    )
    return records


# ---- loop overhead -----------------------------------------------------------------


def _orthogonal(d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return jnp.asarray(q, jnp.float32)


def overhead(iterations, rounds):
    records, rows = [], []
    for d in (64, 256):
        q = _orthogonal(d)
        z0 = jnp.ones(d, jnp.float32) / np.sqrt(d)

        def bare(q, z0):
            def body(c):
                i, z = c
                return i + 1, q @ z

            return jax.lax.while_loop(lambda c: c[0] < iterations, body, (0, z0))[1]

        def ours(q, z0):
            sol = fixpoint.fixed_point(
                lambda z, q: q @ z,
                z0,
                q,
                solver=solvers.Picard(1e-30, 1e-30),
                max_steps=iterations,
                throw=False,
            )
            return sol.value, sol.stats["num_steps"]

        fns = {
            name: jax.jit(f).lower(q, z0).compile() for name, f in (("bare", bare), ("ours", ours))
        }
        steps = int(fns["ours"](q, z0)[1])
        if steps != iterations:
            raise AssertionError(f"the loop stopped after {steps} of {iterations} steps")
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, z0))
                times[name].append(time.perf_counter() - t0)
        per = {name: min(v) / iterations for name, v in times.items()}
        rec = {
            "d": d,
            "iterations": iterations,
            "bare_per_iter_s": per["bare"],
            "ours_per_iter_s": per["ours"],
            "ratio": per["ours"] / per["bare"],
        }
        records.append(rec)
        rows.append(
            [
                str(d),
                fmt_time(per["bare"]),
                fmt_time(per["ours"]),
                f"{rec['ratio']:.2f}",
            ]
        )
    print_table(
        ["d", "bare while_loop", "fixed_point", "ratio"],
        rows,
        title=f"per iteration, {iterations} Picard steps, batch 1, min of {rounds}",
        left=(0,),
    )
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part",
        nargs="+",
        default=["stragglers", "epoch", "overhead"],
        choices=["stragglers", "epoch", "overhead"],
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--name", default="batch")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="record (do not raise) compacted codes or steps that differ from the plain loop's",
    )
    args = parser.parse_args()
    payload = {"versions": versions(), "git": git_state(), "device": device_info()}
    payload.update(settings=vars(args), complete=False)
    # Written after every part: a run stopped from outside keeps what it measured.
    if "stragglers" in args.part:
        payload["stragglers"] = stragglers(args.d, args.batch, args.rounds, args.keep_going)
        write_json(args.name, payload)
    if "epoch" in args.part:
        payload["epoch"] = epochs(args.epochs, 128)
        write_json(args.name, payload)
    if "overhead" in args.part:
        payload["overhead"] = overhead(2000, max(args.rounds, 30))
    payload["complete"] = True
    print("wrote", write_json(args.name, payload))


if __name__ == "__main__":
    main()
