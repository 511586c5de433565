"""Train deep equilibrium models on data that ships offline; compare gradients.

Tasks (each trains in minutes on a 2-core CPU, with a progress bar):

- `digits-mlp`: scikit-learn's `load_digits` (1,437 train / 360 test), a DEQ with
  `f(z, x) = tanh(W z + U x + b)` (W spectrally normalised to 0.9), a linear head.
- `mnist1d-conv`: MNIST-1D generated locally by the `mnist1d` package (4,000 train /
  1,000 test), a convolutional DEQ `f(z, x) = tanh(conv(z) + inject(x))` over
  32 channels × 40 positions (conv spectrally normalised), a linear head.
- `digits-mondeq`: the fully connected `layers.MonDEQ` (100 hidden units, m = 0.1,
  Peaceman–Rachford) on digits.
- `mnist1d-convmondeq`: `layers.ConvMonDEQ` (1 → 32 channels, length 40, kernel 5,
  m = 0.1, Peaceman–Rachford to 1e-3, at most 60 steps) and a linear head on
  MNIST-1D. (`mnist1d-conv`, the plain conv DEQ above, reached only 48 % after 11
  epochs in our runs: its contraction bound makes it too weak; kept for study.)

For each task and each gradient (`implicit`: `fixpoint.ImplicitAdjoint()`;
`phantom`: `PhantomAdjoint(steps=5, damping=0.5)`; `jfb`: one-step,
`PhantomAdjoint(steps=1, damping=1)`), it records test accuracy, wall time
(training, compile included, and per epoch), forward solver steps (mean over the
test set at the end) and backward cost (steps of the backward series for
phantom/JFB; GMRES for implicit, which runs to the forward tolerance).

    python bench/deq_training.py --task digits-mlp --adjoint implicit phantom jfb
    python bench/deq_training.py --task mnist1d-convmondeq --adjoint implicit --epochs 10

Writes `bench/results/deq_training_<task>.json` and prints a table.

`--peers` (digits-mlp only) trains nothing: it times one training step (the batch's
forward solves under `vmap`, the gradient, an AdamW update) of our `layers.DEQ` against
banax (`banax.adjoint.Implicit` / `NeumannPhantom` / `JFB` around `banax.solver.Anderson`,
depth 5, rtol = atol = 1e-4, 40 steps) on the same cell, weights and batch, and reads
XLA's memory analysis of each step (`BanaxClassifier`, `banax_adjoint`). banax needs
Python >= 3.12: run it from a 3.12 environment (docs, Tests and benchmarks); elsewhere its rows
say why it is unavailable. Writes `bench/results/deq_training_peers_<task>.json`.

    python bench/deq_training.py --task digits-mlp --peers --adjoint implicit phantom jfb
"""

import argparse
import json
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import fixpoint
from fixpoint import layers, solvers

RESULTS_DIR = pathlib.Path(__file__).parent / "results"


# ---- data --------------------------------------------------------------------


def load_digits(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(
        x, d.target, test_size=0.2, random_state=seed, stratify=d.target
    )
    return (xtr, ytr), (xte, yte)


def load_mnist1d(seed=0):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    x, xte = d["x"].astype(np.float32), d["x_test"].astype(np.float32)
    mu, sd = x.mean(), x.std()
    return ((x - mu) / sd)[:, None, :], d["y"], ((xte - mu) / sd)[:, None, :], d["y_test"]


# ---- models --------------------------------------------------------------------


class MLPCell(eqx.Module):
    """`f(z, x) = tanh(W z + U x + b)`."""

    w: eqx.nn.Linear
    u: eqx.nn.Linear

    def __init__(self, in_size, hidden, key):
        k1, k2 = jax.random.split(key)
        self.w = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k1)
        self.u = eqx.nn.Linear(in_size, hidden, key=k2)

    def __call__(self, z, x):
        return jnp.tanh(self.w(z) + self.u(x))


class ConvCell(eqx.Module):
    """`f(z, x) = tanh(conv(z) + inject(x))` on (channels, length).

    `inject` is a small conv stack on the raw signal; the weight-tied `conv` is
    spectrally normalised by the DEQ, which keeps `f` close to a contraction
    (a normalisation layer inside `f` would undo that).
    """

    conv: eqx.nn.Conv1d
    inject: eqx.nn.Sequential

    def __init__(self, channels, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv = eqx.nn.Conv1d(channels, channels, 5, padding=2, use_bias=False, key=k1)
        self.inject = eqx.nn.Sequential(
            [
                eqx.nn.Conv1d(1, channels, 5, padding=2, key=k2),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Conv1d(channels, channels, 3, padding=1, key=k3),
            ]
        )

    def __call__(self, z, x):
        return jnp.tanh(self.conv(z) + self.inject(x))


class Classifier(eqx.Module):
    deq: layers.DEQ | layers.MonDEQ
    head: eqx.nn.Linear

    def __call__(self, x):
        sol = self.deq.solve(x)
        return self.head(sol.value.reshape(-1)), sol


ADJOINTS = {
    "implicit": fixpoint.ImplicitAdjoint(),
    "phantom": fixpoint.PhantomAdjoint(steps=5, damping=0.5),
    "jfb": fixpoint.PhantomAdjoint(steps=1, damping=1.0),
}
BACKWARD = {
    "implicit": "GMRES, relative residual 1e-4",
    "phantom": "5 series steps",
    "jfb": "1 step",
}


def make_model(task, adjoint, key):
    k1, k2 = jax.random.split(key)
    solver = solvers.Anderson(1e-4, 1e-4, history=5)
    if task == "digits-mondeq":
        mon = layers.MonDEQ(
            64,
            100,
            m=0.1,
            solver=solvers.PeacemanRachford(1e-4, 1e-4),
            max_steps=100,
            adjoint=ADJOINTS[adjoint],
            throw=False,
            key=k1,
        )
        return Classifier(mon, eqx.nn.Linear(100, 10, key=k2))
    if task == "mnist1d-convmondeq":
        mon = layers.ConvMonDEQ(
            1,
            32,
            40,
            5,
            m=0.1,
            solver=solvers.PeacemanRachford(1e-3, 1e-3),
            max_steps=60,
            adjoint=ADJOINTS[adjoint],
            throw=False,
            key=k1,
        )
        return Classifier(mon, eqx.nn.Linear(32 * 40, 10, key=k2))
    if task == "digits-mlp":
        f = MLPCell(64, 64, k1)
        z_shape, feat = (64,), 64
    elif task == "mnist1d-conv":
        f = ConvCell(32, k1)
        z_shape, feat = (32, 40), 32 * 40
    else:
        raise ValueError(f"unknown task {task!r}")
    # Bound 0.9 on f's Lipschitz constant: for a K-tap convolution the reshaped
    # weight's norm must be at most 0.9 / sqrt(K) (see `layers.spectral_norm`).
    bound = 0.9 if task == "digits-mlp" else 0.9 / np.sqrt(5)
    deq = layers.DEQ(
        f,
        solver=solver,
        adjoint=ADJOINTS[adjoint],
        max_steps=40,
        throw=False,
        z_shape=z_shape,
        normalise=lambda f: layers.spectral_norm(f, bound=bound),
    )
    return Classifier(deq, eqx.nn.Linear(feat, 10, key=k2))


# ---- training ------------------------------------------------------------------


def train(task, adjoint, epochs, batch, lr, seed=0, progress=True):
    if task.startswith("mnist1d"):
        xtr, ytr, xte, yte = load_mnist1d(seed)
    else:
        (xtr, ytr), (xte, yte) = load_digits(seed)
    model = make_model(task, adjoint, jax.random.key(seed))
    steps_per_epoch = len(xtr) // batch
    schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
    opt = optax.adamw(schedule, weight_decay=1e-4)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, x, y):
        logits, sol = jax.vmap(model)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, sol

    @eqx.filter_jit
    def step(model, state, x, y):
        (loss, sol), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, x, y)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        ok = jnp.mean(sol.result == fixpoint.RESULTS.successful)
        return eqx.apply_updates(model, updates), state, loss, jnp.mean(sol.stats["num_steps"]), ok

    @eqx.filter_jit
    def evaluate(model, x, y):
        logits, sol = jax.vmap(model)(x)
        ok = sol.result == fixpoint.RESULTS.successful
        return jnp.mean(jnp.argmax(logits, -1) == y), jnp.mean(sol.stats["num_steps"]), jnp.mean(ok)

    rng = np.random.default_rng(seed)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{task}/{adjoint}", disable=not progress)
    for epoch in bar:
        perm = rng.permutation(len(xtr))
        losses, fsteps, oks = [], [], []
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            model, state, loss, ns, ok = step(
                model, state, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx])
            )
            losses.append(loss)
            fsteps.append(ns)
            oks.append(ok)
        acc, _, _ = evaluate(model, jnp.asarray(xte), jnp.asarray(yte))
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "test_acc": float(acc),
                "train_fwd_steps": float(np.mean(fsteps)),
                "train_converged": float(np.mean(oks)),
            }
        )
        bar.set_postfix(
            loss=f"{history[-1]['loss']:.3f}",
            acc=f"{float(acc):.3f}",
            steps=f"{np.mean(fsteps):.1f}",
        )
    wall = time.perf_counter() - t0
    acc, fwd_steps, converged = evaluate(model, jnp.asarray(xte), jnp.asarray(yte))
    return {
        "task": task,
        "adjoint": adjoint,
        "epochs": epochs,
        "batch": batch,
        "lr": lr,
        "test_acc": float(acc),
        "test_fwd_steps": float(fwd_steps),
        "test_converged": float(converged),
        "wall_s": wall,
        "s_per_epoch": wall / epochs,
        "backward": BACKWARD[adjoint],
        "history": history,
        "model": model,
    }


# ---- peers: one training step against banax ------------------------------------


def _import_banax():
    """`(banax.adjoint, banax.solver)`, or `None` and why not (banax needs Python >= 3.12)."""
    try:
        from banax import adjoint, solver
    except Exception as e:  # reported in the table and the JSON, never dropped
        import platform

        ver = platform.python_version()
        return None, f"unavailable ({type(e).__name__}: {e}; needs Python >= 3.12, here {ver})"
    return (adjoint, solver), None


class BanaxClassifier(eqx.Module):
    """Our `Classifier`'s cell and head, the equilibrium found and differentiated by banax.

    The cell is spectrally normalised once per forward pass (as `layers.DEQ(normalise=...)`
    does), then banax's adjoint solves `z = f(z, x)` from `z = 0` for one sample.
    """

    f: MLPCell
    head: eqx.nn.Linear
    adjoint: eqx.Module = eqx.field(static=True)
    z_size: int = eqx.field(static=True)

    def __call__(self, x):
        f = layers.spectral_norm(self.f, bound=0.9)
        sol = self.adjoint((lambda z, f, x: f(z, x), (f, x)), jnp.zeros(self.z_size, x.dtype))
        return self.head(sol.value), sol


def banax_adjoint(kind, bx_adjoint, bx_solver):
    """banax's counterpart of `ADJOINTS[kind]`: the same forward solver (Anderson, history
    5, rtol = atol = 1e-4, 40 steps; banax tests the Euclidean norm of `f(z) - z` against
    atol *or* relative to `|f(z)|` against rtol, ours the max-norm against `atol + rtol |z|`);
    implicit: banax's `Implicit` solves the backward linear system by the same Anderson
    iteration (ours: GMRES to 1e-4); phantom: `NeumannPhantom` with `Relaxed(damp=0.5,
    max_steps=5)`, which is our `PhantomAdjoint(steps=5, damping=0.5)`; jfb: `JFB`."""
    solver = bx_solver.Anderson(depth=5, damp=1.0, atol=1e-4, rtol=1e-4, max_steps=40)
    if kind == "implicit":
        return bx_adjoint.Implicit(solver=solver, b_solver=solver)
    if kind == "phantom":
        return bx_adjoint.NeumannPhantom(
            solver=solver, b_solver=bx_solver.Relaxed(damp=0.5, max_steps=5)
        )
    return bx_adjoint.JFB(solver=solver)


def _step_fn(model, opt, x, y, stats):
    """`step(params, opt_state) -> (params, opt_state, loss, grads, z, steps, ok)` for one
    fixed batch; `stats(sol) -> (steps, converged)` reads the library's own solution."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params):
        logits, sol = jax.vmap(eqx.combine(params, static))(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, sol

    def step(params, opt_state):
        (loss, sol), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        steps, ok = stats(sol)
        new = optax.apply_updates(params, updates)
        return new, opt_state, loss, grads, sol.value, steps, ok

    return step, params, opt.init(params)


def compare_step(task, adjoints, batch, seed, reps):
    """Time and memory of one training step (forward solve, gradient, AdamW update) on a
    batch of `batch` digits: ours (`layers.DEQ`) against banax, same cell and weights.
    Both steps are compiled first, then timed in alternation (`reps` rounds), so that a
    change in the machine's load hits both alike."""
    from _common import memory_of

    if task != "digits-mlp":
        raise SystemExit("--peers: only --task digits-mlp (banax has no MonDEQ / conv layers)")
    (xtr, ytr), _ = load_digits(seed)
    x, y = jnp.asarray(xtr[:batch]), jnp.asarray(ytr[:batch])
    opt = optax.adamw(3e-3, weight_decay=1e-4)
    bx, missing = _import_banax()
    rows = []
    for kind in adjoints:
        ours = make_model(task, kind, jax.random.key(seed))
        variants = {
            "ours": (
                ours,
                ours.deq.f,
                lambda sol: (sol.stats["num_steps"], sol.result == fixpoint.RESULTS.successful),
            )
        }
        if bx is not None:
            peer = BanaxClassifier(ours.deq.f, ours.head, banax_adjoint(kind, *bx), 64)
            variants["banax"] = (peer, peer.f, lambda sol: (sol.stats.steps, sol.result == 0))
        else:
            rows.append({"library": "banax", "adjoint": kind, "unavailable": missing})
        ready, out = {}, {}
        for lib, (model, _, stats) in variants.items():
            step, params, opt_state = _step_fn(model, opt, x, y, stats)
            try:
                t0 = time.perf_counter()
                compiled = jax.jit(step).lower(params, opt_state).compile()
                compile_s = time.perf_counter() - t0
                out[lib] = jax.block_until_ready(compiled(params, opt_state))  # warm-up
            except Exception as e:  # a peer failing to trace is a result, not a crash
                rows.append({"library": lib, "adjoint": kind, "error": f"{type(e).__name__}: {e}"})
                continue
            ready[lib] = (compiled, (params, opt_state), compile_s)
        times = {lib: [] for lib in ready}
        for _ in range(reps):  # the same weights every call: the same work every call
            for lib, (compiled, args, _) in ready.items():
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                times[lib].append(time.perf_counter() - t0)
        for lib, (compiled, _, compile_s) in ready.items():
            _, _, loss, g, z, steps, ok = out[lib]
            f = layers.spectral_norm(variants[lib][1], bound=0.9)
            res = jnp.max(jnp.abs(jax.vmap(f)(z, x) - z))  # the same check for both
            rows.append(
                {
                    "library": lib,
                    "adjoint": kind,
                    "compile_s": compile_s,
                    "step_s": float(np.median(times[lib])),
                    "step_best_s": min(times[lib]),
                    "reps": reps,
                    "memory": memory_of(compiled),
                    "loss": float(loss),
                    "fwd_steps_mean": float(jnp.mean(steps)),
                    "fwd_steps_max": int(jnp.max(steps)),
                    "converged": float(jnp.mean(ok)),
                    "residual_max": float(res),
                }
            )
        if len(ready) == 2:  # the gradients of the cell's weights: where the adjoints differ
            a = jax.tree.leaves(out["ours"][3].deq.f)
            b = jax.tree.leaves(out["banax"][3].f)
            num = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(a, b, strict=True))
            rows[-1]["grad_rel_diff_vs_ours"] = num / max(float(jnp.max(jnp.abs(u))) for u in a)
    return rows


def print_peer_rows(rows):
    ours = {r["adjoint"]: r for r in rows if r["library"] == "ours" and "step_s" in r}
    print(
        f"\n{'gradient':<9} {'library':<7} {'step':>9} {'vs ours':>8} {'temp mem':>9} "
        f"{'vs ours':>8} {'fwd steps':>10} {'max|f(z)-z|':>11} {'grad diff':>9}  compile"
    )
    for r in rows:
        head = f"{r['adjoint']:<9} {r['library']:<7}"
        if "step_s" not in r:
            print(f"{head} {r.get('unavailable') or 'ERROR ' + r['error']}")
            continue
        base = ours.get(r["adjoint"], r)
        mem, base_mem = r["memory"].get("temp_size", 0), base["memory"].get("temp_size", 0)
        diff = r.get("grad_rel_diff_vs_ours")
        print(
            f"{head} {r['step_s'] * 1e3:7.2f}ms {r['step_s'] / base['step_s']:7.2f}x "
            f"{mem / 2**20:7.2f}MB {mem / max(base_mem, 1):7.2f}x "
            f"{r['fwd_steps_mean']:5.1f}/{r['fwd_steps_max']:<4d} {r['residual_max']:11.1e} "
            f"{'-' if diff is None else f'{diff:9.1e}':>9}  {r['compile_s']:.1f}s"
        )
    print(
        "\nstep: median steady-state time of one jitted training step (vmapped forward solve,"
        "\ngradient, AdamW update) on the same batch, same weights, ours and banax timed in"
        "\nalternation; CPU figures vary with load, compare within a run. temp mem: XLA's"
        "\ntemp_size_in_bytes for that step. fwd steps: mean/max over the batch; max|f(z)-z|"
        "\nrecomputed the same way for both. grad diff:"
        "\nmax|g_banax - g_ours| / max|g_ours| over the cell's weights (W, U, b)."
    )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--task",
        default="digits-mlp",
        choices=["digits-mlp", "digits-mondeq", "mnist1d-conv", "mnist1d-convmondeq"],
    )
    p.add_argument("--adjoint", nargs="+", default=["implicit"], choices=list(ADJOINTS))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--peers", action="store_true", help="time one training step against banax instead"
    )
    p.add_argument("--reps", type=int, default=10, help="timed steps with --peers (median)")
    a = p.parse_args()
    if a.peers:
        rows = compare_step(a.task, a.adjoint, a.batch, a.seed, a.reps)
        print_peer_rows(rows)
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"deq_training_peers_{a.task}.json"
        from _common import device_info, git_state, versions

        info = {"device": device_info(), "versions": versions(), "git": git_state()}
        out.write_text(json.dumps({**info, "batch": a.batch, "rows": rows}, indent=1))
        print(f"wrote {out}")
        return
    epochs = a.epochs or (30 if a.task.startswith("mnist1d") else 40)
    lr = a.lr or 3e-3
    rows = []
    for adj in a.adjoint:
        r = train(a.task, adj, epochs, a.batch, lr, a.seed)
        r.pop("model")
        rows.append(r)
    print(
        f"\n{'task':<14} {'gradient':<9} {'test acc':>8} {'fwd steps':>9} {'converged':>9} "
        f"{'wall':>8} {'s/epoch':>8}  backward"
    )
    for r in rows:
        print(
            f"{r['task']:<14} {r['adjoint']:<9} {r['test_acc']:8.4f} {r['test_fwd_steps']:9.1f} "
            f"{r['test_converged']:9.3f} {r['wall_s']:7.1f}s {r['s_per_epoch']:8.2f}  "
            f"{r['backward']}"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"deq_training_{a.task}.json"
    out.write_text(json.dumps({"device": str(jax.devices()[0]), "runs": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
