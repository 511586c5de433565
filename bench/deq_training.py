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
    a = p.parse_args()
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
