"""Equilibrium layers whose fixed point is unique by construction.

Three parts (float32, CPU, scikit-learn's digits, which ship with scikit-learn):

- `scaling`: one random layer, its recurrent weight multiplied by `scale`. A plain DEQ
  `z = tanh(s W z + U x + b)` (no normalisation), solved by `Anderson` and by `Picard`
  (tolerance 1e-5, 200 steps), against `layers.SubhomogeneousDEQ` with the same `W`
  (`|s W|` enters; μ = 0.5, `Picard` with the tolerance on Thompson's distance
  `d_T(F(z), z)`): for 64 digit images and 4 random starts each, the fraction of
  solves that converge, the mean steps, and the largest difference between the answers
  from different starts (max-norm for the DEQ, Thompson's metric for the
  subhomogeneous one) and the largest a-posteriori bound `error_bound`.
- `digits`: classification (1,437 train / 360 test, 3 seeds, the same epochs and
  optimiser): `layers.DEQ` with the tanh cell spectrally normalised to 0.9 and
  `Anderson` (as `bench/deq_training.py`), against `layers.SubhomogeneousDEQ`
  (64 hidden units each, a layer norm and a linear head): test accuracy, forward solver steps,
  training time.
- `completion`: joint image completion. Pixels are categorical (4 grey levels), 64
  binary hidden units; `layers.MonotoneDBM` (m = 0.1, Peaceman–Rachford, α = 1,
  tolerance 1e-4, 300 steps) is trained to predict hidden pixels from the visible half
  (random top / bottom / left / right halves, cross-entropy of the mean-field
  marginals), against a plain Boltzmann machine of the same units (free symmetric
  couplings, zero blocks on the diagonal) whose mean field is 30 damped iterations (λ
  = 0.5) unrolled and trained the same way, and against the per-pixel training
  marginals (no inference). On the test set with the bottom half and the right half
  hidden: mean absolute error of the expected intensity (levels / 3), accuracy of the
  most likely level, and uniqueness: the largest difference between the marginals from
  5 random starts (the plain machine run 300 damped iterations from each start), and
  the plain machine's fraction of test images whose iteration has not settled
  (residual > 1e-3 after 300 iterations). Also Peaceman–Rachford's step `α` (0.1 … 2)
  on the trained machine: steps and time of the test set's solves.

`python bench/equilibrium_layers.py`; `--quick` for a smoke run. Writes
`bench/results/equilibrium_layers_cpu.json` and `.png`.
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import RESULTS_DIR, device_info, git_state, print_table, versions, write_json
from tqdm import tqdm

import fixpoint as fp
from fixpoint import layers, solvers

LEVELS = 4
HIDDEN = 64


def load_digits(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    return train_test_split(
        d.data.astype(np.float32), d.target, test_size=0.2, random_state=seed, stratify=d.target
    )


# ---- scaling: a plain DEQ against the subhomogeneous one --------------------------


class TanhCell(eqx.Module):
    w: jax.Array
    u: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.w @ z + self.u @ x + self.b)


def scaling(scales, starts=4, images=64, seed=0):
    xtr = load_digits(seed)[0][:images] / 16.0
    x = jnp.asarray(xtr)
    sub = layers.SubhomogeneousDEQ(
        64, 64, solver=solvers.Picard(0.0, 1e-5), max_steps=200, throw=False, key=jax.random.key(0)
    )
    cell = TanhCell(sub.f.weight, sub.f.input_weight, sub.f.bias)
    key = jax.random.key(1)
    z0s = jax.random.normal(key, (starts, images, 64))
    rows = []

    @eqx.filter_jit
    def solve_all(deq, z0):
        return jax.vmap(lambda xi, zi: deq.solve(xi, zi))(x, z0)

    for scale in tqdm(scales, desc="scaling"):
        plain_cell = eqx.tree_at(lambda c: c.w, cell, scale * cell.w)
        s_sub = eqx.tree_at(lambda d: d.f.weight, sub, scale * sub.f.weight)
        for name, deq, z0_of in (
            (
                "DEQ + Anderson",
                layers.DEQ(
                    plain_cell, solver=solvers.Anderson(1e-5, 1e-5), max_steps=200, throw=False
                ),
                lambda z: z,
            ),
            (
                "DEQ + Picard",
                layers.DEQ(
                    plain_cell, solver=solvers.Picard(1e-5, 1e-5), max_steps=200, throw=False
                ),
                lambda z: z,
            ),
            ("SubhomogeneousDEQ + Picard", s_sub, lambda z: jnp.exp(2 * z)),
        ):
            sols = [solve_all(deq, z0_of(z0s[k])) for k in range(starts)]
            ok = np.stack([np.asarray(s.result == fp.RESULTS.successful) for s in sols])
            steps = np.stack([np.asarray(s.stats["num_steps"]) for s in sols])
            vals = np.stack([np.asarray(s.value) for s in sols])  # (starts, images, 64)
            both = ok.all(axis=0)
            if name.startswith("Sub"):
                spread = np.abs(np.log(vals) - np.log(vals[:1])).max(axis=(0, 2))
                bound = float(
                    max(
                        float(jax.vmap(s_sub.error_bound)(x, jnp.asarray(vals[k])).max())
                        for k in range(starts)
                    )
                )
            else:
                spread = np.abs(vals - vals[:1]).max(axis=(0, 2))
                bound = None
            rows.append(
                dict(
                    scale=float(scale),
                    layer=name,
                    converged=float(ok.mean()),
                    mean_steps=float(steps.mean()),
                    spread=float(spread[both].max()) if both.any() else None,
                    distinct_images=int((spread[both] > 1e-3).sum()),
                    error_bound=bound,
                )
            )
    return rows


# ---- digits classification ------------------------------------------------------


class Classifier(eqx.Module):
    """The equilibrium, a layer norm, a linear head. (The subhomogeneous layer's
    features share a large common offset: the norm removes it, as the batch norm of
    Sittoni & Tudisco's head does.)"""

    deq: layers.DEQ
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __call__(self, x):
        sol = self.deq.solve(x)
        return self.head(self.norm(sol.value)), sol


def make_classifier(kind, seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    if kind == "DEQ":
        kw, ku = jax.random.split(k1)
        w = jax.random.uniform(kw, (64, 64), minval=-1 / 8, maxval=1 / 8)
        u = jax.random.uniform(ku, (64, 64), minval=-1 / 8, maxval=1 / 8)
        deq = layers.DEQ(
            TanhCell(w, u, jnp.zeros(64)),
            solver=solvers.Anderson(1e-4, 1e-4, history=5),
            max_steps=100,
            throw=False,
            z_shape=(64,),
            normalise=_normalise,
        )
    else:
        deq = layers.SubhomogeneousDEQ(64, 64, max_steps=100, throw=False, key=k1)
    return Classifier(deq, eqx.nn.LayerNorm(64), eqx.nn.Linear(64, 10, key=k2))


def _normalise(f):
    return layers.spectral_norm(f, bound=0.9)


def train_classifier(kind, seed, epochs, batch=64, lr=3e-3):
    xtr, xte, ytr, yte = load_digits(seed)
    xtr, xte = xtr / 16.0, xte / 16.0
    model = make_classifier(kind, seed)
    steps_per_epoch = len(xtr) // batch
    opt = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, x, y):
        logits, sol = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), sol

    @eqx.filter_jit
    def step(model, state, x, y):
        (loss, sol), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, x, y)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    @eqx.filter_jit
    def evaluate(model, x, y):
        logits, sol = jax.vmap(model)(x)
        ok = sol.result == fp.RESULTS.successful
        return jnp.mean(jnp.argmax(logits, -1) == y), jnp.mean(sol.stats["num_steps"]), jnp.mean(ok)

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in tqdm(range(epochs), desc=f"digits {kind} seed {seed}", leave=False):
        perm = rng.permutation(len(xtr))
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            model, state, loss = step(model, state, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
    jax.block_until_ready(loss)
    wall = time.perf_counter() - t0
    acc, steps, ok = evaluate(model, jnp.asarray(xte), jnp.asarray(yte))
    return dict(
        layer=kind,
        seed=seed,
        test_acc=float(acc),
        test_steps=float(steps),
        converged=float(ok),
        train_s=wall,
    )


# ---- image completion -------------------------------------------------------------


def levels_of(x):
    return np.minimum(x // 4, LEVELS - 1).astype(np.int32)  # 0..16 -> 0..3


HALVES = {
    "top": np.repeat(np.arange(8) < 4, 8),
    "bottom": np.repeat(np.arange(8) >= 4, 8),
    "left": np.tile(np.arange(8) < 4, 8),
    "right": np.tile(np.arange(8) >= 4, 8),
}


class PlainBM(eqx.Module):
    """A Boltzmann machine with free symmetric couplings; mean field by damped
    iteration from the uniform start (no guarantee of a unique fixed point)."""

    S: jax.Array
    bias: jax.Array
    sigma_layout: tuple = eqx.field(static=True)

    def __init__(self, binary, groups, categories, key):
        n = binary + groups * categories
        self.S = jax.random.uniform(key, (n, n), minval=-0.5 / np.sqrt(n), maxval=0.5 / np.sqrt(n))
        self.bias = jnp.zeros(n)
        self.sigma_layout = (binary, groups, categories)

    def W(self):
        binary, groups, categories = self.sigma_layout
        v = np.concatenate([np.arange(binary), binary + np.repeat(np.arange(groups), categories)])
        different = jnp.asarray(v[:, None] != v[None, :], self.S.dtype)
        return (self.S + self.S.T) * different

    def iterate(self, observed, values, q, steps, damping=0.5):
        sigma = solvers.MeanField(*self.sigma_layout, observed=observed, values=values)
        W = self.W()

        def body(q, _):
            return (1 - damping) * q + damping * sigma(W @ q + self.bias), None

        q, _ = jax.lax.scan(body, sigma(q), None, length=steps)
        return q, jnp.max(jnp.abs(sigma(W @ q + self.bias) - q))


def evidence(levels, hidden_mask):
    """`observed` (hidden units, pixels) and `values` (hidden zeros, one-hot pixels)."""
    observed = np.concatenate([np.zeros(HIDDEN, bool), ~hidden_mask])
    # The hidden pixels' values are zeroed: the model never sees them.
    onehot = np.eye(LEVELS, dtype=np.float32)[levels] * ~hidden_mask[:, None]
    values = np.concatenate([np.zeros(HIDDEN, np.float32), onehot.reshape(-1)])
    return observed, values


def batch_evidence(levels, masks):
    obs, vals = zip(*(evidence(lv, m) for lv, m in zip(levels, masks, strict=True)), strict=True)
    return jnp.asarray(np.stack(obs)), jnp.asarray(np.stack(vals))


def pixel_marginals(q):
    return q[:, HIDDEN:].reshape(q.shape[0], 64, LEVELS)


def completion_loss(q, levels, masks):
    p = pixel_marginals(q)
    onehot = jax.nn.one_hot(levels, LEVELS)
    nll = -jnp.sum(onehot * jnp.log(jnp.clip(p, 1e-6, 1.0)), -1)
    return jnp.sum(nll * masks) / jnp.sum(masks)


def completion_metrics(p, levels, masks):
    expected = np.asarray(p) @ np.arange(LEVELS) / (LEVELS - 1)
    mae = np.abs(expected - levels / (LEVELS - 1))[masks].mean()
    acc = (np.asarray(p).argmax(-1) == levels)[masks].mean()
    return float(mae), float(acc)


def infer(kind, model, obs, vals, q0=None, steps=30):
    if kind == "monotone":
        sol = jax.vmap(lambda o, v, q: model.solve(o, v, q))(obs, vals, q0)
        return sol.value, sol
    q0 = jnp.zeros_like(vals) if q0 is None else q0
    return jax.vmap(lambda o, v, q: model.iterate(o, v, q, steps))(obs, vals, q0)


def train_completion(kind, seed, epochs, batch=64, lr=1e-2):
    xtr, xte, _, _ = load_digits(seed)
    ltr, lte = levels_of(xtr), levels_of(xte)
    key = jax.random.key(seed)
    if kind == "monotone":
        model = layers.MonotoneDBM(
            HIDDEN,
            64,
            LEVELS,
            m=0.1,
            solver=solvers.PeacemanRachford(1e-4, 1e-4),
            max_steps=300,
            throw=False,
            key=key,
        )
    else:
        model = PlainBM(HIDDEN, 64, LEVELS, key)
    names = list(HALVES)
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(xtr) // batch
    opt = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, obs, vals, levels, masks):
        q0 = None
        if kind == "monotone":
            q0 = jax.vmap(lambda o, v: model.nonlinearity(o, v)(jnp.zeros(model.size)))(obs, vals)
        q, _ = infer(kind, model, obs, vals, q0)
        return completion_loss(q, levels, masks)

    @eqx.filter_jit
    def step(model, state, obs, vals, levels, masks):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, obs, vals, levels, masks)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    t0 = time.perf_counter()
    for _ in tqdm(range(epochs), desc=f"completion {kind} seed {seed}", leave=False):
        perm = rng.permutation(len(xtr))
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            masks = np.stack([HALVES[names[j]] for j in rng.integers(0, 4, len(idx))])
            obs, vals = batch_evidence(ltr[idx], masks)
            model, state, loss = step(
                model, state, obs, vals, jnp.asarray(ltr[idx]), jnp.asarray(masks, jnp.float32)
            )
    jax.block_until_ready(loss)
    wall = time.perf_counter() - t0
    return model, wall, (ltr, lte)


def evaluate_completion(kind, model, ltr, lte, starts=5):
    out = {}
    prior = np.stack([np.bincount(ltr[:, i], minlength=LEVELS) for i in range(64)]) / len(ltr)
    # Uniqueness is checked at a tighter tolerance than training used.
    tight = (
        model.with_settings(solver=solvers.PeacemanRachford(1e-6, 1e-6), max_steps=1000)
        if kind == "monotone"
        else model
    )
    for half in ("bottom", "right"):
        masks = np.broadcast_to(HALVES[half], lte.shape)
        obs, vals = batch_evidence(lte, masks)
        q0 = None
        if kind == "monotone":
            q0 = jax.vmap(lambda o, v: model.nonlinearity(o, v)(jnp.zeros(model.size)))(obs, vals)
        q, info = _infer_jit(kind, model, obs, vals, q0, 30)
        mae, acc = completion_metrics(pixel_marginals(q), lte, masks)
        prior_mae, prior_acc = completion_metrics(
            np.broadcast_to(prior, (len(lte), 64, LEVELS)), lte, masks
        )
        # Uniqueness: random starts.
        finals, unsettled = [], None
        for k in range(starts):
            kb, kg = jax.random.split(jax.random.key(100 + k))
            qb = jax.random.uniform(kb, (len(lte), HIDDEN))
            qg = jax.nn.softmax(3 * jax.random.normal(kg, (len(lte), 64, LEVELS)), -1)
            start = jnp.concatenate([qb, qg.reshape(len(lte), -1)], -1)
            qk, infok = _infer_jit(kind, tight, obs, vals, start, 300)
            finals.append(np.asarray(qk))
            if kind != "monotone":
                res = np.asarray(infok)
                unsettled = max(unsettled or 0.0, float((res > 1e-3).mean()))
        finals = np.stack(finals)
        spread = float(np.abs(finals - finals[:1]).max())
        row = dict(
            half=half,
            mae=mae,
            acc=acc,
            prior_mae=prior_mae,
            prior_acc=prior_acc,
            spread=spread,
            unsettled=unsettled,
        )
        if kind == "monotone":
            row["mean_steps"] = float(np.mean(info.stats["num_steps"]))
            row["converged"] = float(np.mean(info.result == fp.RESULTS.successful))
            row["alpha_sweep"] = alpha_sweep(model, obs, vals, q0)
        out[half] = row
    return out


def alpha_sweep(model, obs, vals, q0, alphas=(0.1, 0.3, 1.0, 2.0)):
    """Peaceman–Rachford's step `α` on the trained machine: steps and time of the
    test set's solves (α ≠ 1 takes the softmax's proximal operator)."""
    rows = []
    for alpha in alphas:
        m = model.with_settings(
            solver=solvers.PeacemanRachford(1e-4, 1e-4, alpha=alpha), max_steps=1000
        )
        jax.block_until_ready(_infer_jit("monotone", m, obs, vals, q0, 0))
        t0 = time.perf_counter()
        _, sol = jax.block_until_ready(_infer_jit("monotone", m, obs, vals, q0, 0))
        rows.append(
            dict(
                alpha=alpha,
                mean_steps=float(np.mean(sol.stats["num_steps"])),
                converged=float(np.mean(sol.result == fp.RESULTS.successful)),
                time_s=time.perf_counter() - t0,
            )
        )
    return rows


@eqx.filter_jit
def _infer_jit(kind, model, obs, vals, q0, steps):
    return infer(kind, model, obs, vals, q0, steps)


# ---- main -------------------------------------------------------------------------


def _plot(scaling_rows, examples, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 8))
    grid = fig.add_gridspec(2, 6, height_ratios=[1, 1.2])
    ax1, ax2 = fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:])
    for name in dict.fromkeys(r["layer"] for r in scaling_rows):
        rows = [r for r in scaling_rows if r["layer"] == name]
        scales = [r["scale"] for r in rows]
        ax1.plot(scales, [r["converged"] for r in rows], "o-", label=name)
        ax2.plot(scales, [r["mean_steps"] for r in rows], "o-", label=name)
    for ax, label in ((ax1, "fraction of solves converged"), (ax2, "mean solver steps")):
        ax.set_xscale("log")
        ax.set_xlabel("scale of the recurrent weight")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("The same random weights, scaled up")
    ax2.set_title("Steps (200 = the budget)")
    titles = ["digit", "visible (top half)", "MonotoneDBM", "plain BM", "per-pixel prior"]
    ax = fig.add_subplot(grid[1, 1:5])
    gap = np.full((8, 1), np.nan)
    rows = [np.concatenate([x for im in imgs for x in (im, gap)], axis=1) for imgs in examples]
    mosaic = np.concatenate([x for r in rows for x in (r, np.full((1, r.shape[1]), np.nan))])
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1)
    ax.set_yticks([4 + 9 * i for i in range(len(titles))], titles)
    ax.set_xticks([])
    ax.set_title("Completing the bottom half (expected intensity; seed 0)")
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--completion-epochs", type=int, default=15)
    parser.add_argument("--part", nargs="*", default=["scaling", "digits", "completion"])
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.completion_epochs = 1, 1, 1
    t0 = time.perf_counter()
    payload = dict(
        benchmark="equilibrium_layers",
        mode="quick" if args.quick else "default",
        dtype="float32",
        device=device_info(),
        versions=versions(),
        git=git_state(),
        settings=vars(args),
    )

    scaling_rows = []
    if "scaling" in args.part:
        scales = [1, 4, 16, 64] if args.quick else [0.5, 1, 2, 4, 8, 16, 64, 256]
        scaling_rows = scaling(scales)
        payload["scaling"] = scaling_rows
        print_table(
            ["scale", "layer", "converged", "mean steps", "spread", "distinct", "bound"],
            [
                [
                    f"{r['scale']:g}",
                    r["layer"],
                    f"{r['converged']:.2f}",
                    f"{r['mean_steps']:.1f}",
                    f"{r['spread']:.1e}" if r["spread"] is not None else "-",
                    str(r["distinct_images"]),
                    f"{r['error_bound']:.1e}" if r["error_bound"] is not None else "-",
                ]
                for r in scaling_rows
            ],
            title="Scaled random weights: 64 images x 4 starts",
        )

    if "digits" in args.part:
        runs = [
            train_classifier(kind, seed, args.epochs)
            for kind in ("DEQ", "SubhomogeneousDEQ")
            for seed in range(args.seeds)
        ]
        summary = []
        for kind in ("DEQ", "SubhomogeneousDEQ"):
            mine = [r for r in runs if r["layer"] == kind]
            acc, acc_sd = _mean_std([r["test_acc"] for r in mine])
            steps, steps_sd = _mean_std([r["test_steps"] for r in mine])
            train_s, _ = _mean_std([r["train_s"] for r in mine])
            summary.append(
                dict(
                    layer=kind,
                    seeds=len(mine),
                    test_acc=acc,
                    test_acc_std=acc_sd,
                    test_steps=steps,
                    test_steps_std=steps_sd,
                    converged=float(np.mean([r["converged"] for r in mine])),
                    train_s=train_s,
                )
            )
        payload["digits"] = dict(runs=runs, summary=summary, epochs=args.epochs)
        print_table(
            ["layer", "accuracy", "steps", "converged", "train (s)"],
            [
                [
                    r["layer"],
                    f"{r['test_acc']:.3f} ± {r['test_acc_std']:.3f}",
                    f"{r['test_steps']:.1f} ± {r['test_steps_std']:.1f}",
                    f"{r['converged']:.3f}",
                    f"{r['train_s']:.0f}",
                ]
                for r in summary
            ],
            title=f"digits, {args.seeds} seeds, {args.epochs} epochs",
        )

    examples = None
    if "completion" in args.part:
        runs, models = [], {}
        for kind in ("monotone", "plain"):
            for seed in range(args.seeds):
                model, wall, (ltr, lte) = train_completion(kind, seed, args.completion_epochs)
                metrics = evaluate_completion(kind, model, ltr, lte)
                for row in metrics.values():
                    runs.append(dict(model=kind, seed=seed, train_s=wall, **row))
                if seed == 0:
                    models[kind] = (model, ltr, lte)
        summary = []
        for kind in ("monotone", "plain", "prior"):
            for half in ("bottom", "right"):
                src = "monotone" if kind == "prior" else kind
                mine = [r for r in runs if r["model"] == src and r["half"] == half]
                key = "prior_" if kind == "prior" else ""
                mae, mae_sd = _mean_std([r[key + "mae"] for r in mine])
                acc, acc_sd = _mean_std([r[key + "acc"] for r in mine])
                row = dict(model=kind, half=half, mae=mae, mae_std=mae_sd, acc=acc, acc_std=acc_sd)
                if kind != "prior":
                    row["spread"] = max(r["spread"] for r in mine)
                    row["train_s"] = float(np.mean([r["train_s"] for r in mine]))
                if kind == "monotone":
                    row["mean_steps"] = float(np.mean([r["mean_steps"] for r in mine]))
                    row["converged"] = float(np.mean([r["converged"] for r in mine]))
                if kind == "plain":
                    row["unsettled"] = max(r["unsettled"] for r in mine)
                summary.append(row)
        payload["completion"] = dict(runs=runs, summary=summary, epochs=args.completion_epochs)
        print_table(
            ["model", "hidden", "MAE", "level accuracy", "spread", "steps / unsettled"],
            [
                [
                    r["model"],
                    r["half"],
                    f"{r['mae']:.3f} ± {r['mae_std']:.3f}",
                    f"{r['acc']:.3f} ± {r['acc_std']:.3f}",
                    f"{r['spread']:.1e}" if "spread" in r else "-",
                    f"{r['mean_steps']:.1f}"
                    if "mean_steps" in r
                    else (f"{r['unsettled']:.3f}" if "unsettled" in r else "-"),
                ]
                for r in summary
            ],
            title=f"digit completion, {args.seeds} seeds, {args.completion_epochs} epochs",
        )
        # Five test images with the bottom half hidden, for the plot.
        mono, ltr, lte = models["monotone"]
        plain = models["plain"][0]
        pick = np.arange(5)
        masks = np.broadcast_to(HALVES["bottom"], (5, 64))
        obs, vals = batch_evidence(lte[pick], masks)
        q0 = jax.vmap(lambda o, v: mono.nonlinearity(o, v)(jnp.zeros(mono.size)))(obs, vals)
        scale = np.arange(LEVELS) / (LEVELS - 1)
        q_mono = np.asarray(pixel_marginals(_infer_jit("monotone", mono, obs, vals, q0, 30)[0]))
        q_plain = np.asarray(pixel_marginals(_infer_jit("plain", plain, obs, vals, None, 30)[0]))
        prior = np.stack([np.bincount(ltr[:, i], minlength=LEVELS) for i in range(64)]) / len(ltr)
        truth = lte[pick] / (LEVELS - 1)
        visible = np.where(masks, np.nan, truth)
        prior_img = np.where(masks, prior @ scale, truth)
        examples = [
            [im.reshape(8, 8) for im in block]
            for block in (
                truth,
                np.nan_to_num(visible, nan=0.0),
                np.where(masks, q_mono @ scale, truth),
                np.where(masks, q_plain @ scale, truth),
                prior_img,
            )
        ]

    payload["wall_s"] = time.perf_counter() - t0
    path = write_json("equilibrium_layers", payload)
    if scaling_rows and examples is not None:
        _plot(scaling_rows, examples, RESULTS_DIR / "equilibrium_layers_cpu.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
