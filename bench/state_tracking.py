"""State tracking: group word problems that a diagonal recurrence cannot solve.

Data (generated here, `fixpoint.datasets.word_problem`): random words in a group,
labelled at every position with the running product. `S3` (order 6, the smallest
non-abelian group) is the hard task; `parity` (`Z2`, abelian) the easy control.
`S5`, the papers' task, did not train within minutes on a CPU for any model here
(see the docs), so it is not part of the default run (`--groups S5` runs it).

Models (float32, one block: embedding, layer norm, the sequence layer, a residual,
layer norm, an MLP, a residual, a linear head per position), trained with AdamW
(warm-up and cosine decay, peak 3e-3) on fresh batches of 64 words of length `L = 16`
for the same number of steps, 3 seeds:

- `diagonal`: `layers.ImplicitSSM(...).diagonal`, the selective diagonal SSM (signed
  decays in (-1, 1)), one pass;
- `implicit`: the same `layers.ImplicitSSM` (same weights, same parameter count)
  iterated to its fixed point (Anderson, tolerance 1e-3, at most 50 iterations);
- `fixed_point_rnn`: `layers.FixedPointRNN` (Picard, tolerance 1e-4, at most 100
  iterations), its width chosen for about the same parameter count;
- `gru`: a dense nonlinear RNN, `equinox.nn.GRUCell` evaluated in parallel over time
  by `layers.ParallelRNN` (`DEER`), width chosen the same way.

A sequence whose solve fails in training is masked out of the loss by its result code
(its gradient is NaN otherwise) and counted. Reported: per-token accuracy on 1,024 test
words at `L`, `2L` and `4L` (mean ± std over seeds), the fraction masked in training,
the iterations per layer in training and at test (mean, and the largest), and the
forward and forward+backward time of one training batch against the diagonal baseline
(`time_jitted`: compile apart, the median of repeated calls).

`python bench/state_tracking.py`; `--quick` for a smoke run. Writes
`bench/results/state_tracking_cpu.json` and `.png`.
"""

from __future__ import annotations

import argparse
import functools
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import (
    RESULTS_DIR,
    device_info,
    git_state,
    print_table,
    time_jitted,
    versions,
    write_json,
)
from tqdm import tqdm

import fixpoint as fp
from fixpoint import layers, solvers

MODELS = ("diagonal", "implicit", "fixed_point_rnn", "gru")
# Widths for about equal parameter counts (printed and stored with the results).
WIDTH = {"diagonal": 32, "implicit": 32, "fixed_point_rnn": 20, "gru": 32}
STATE_SIZE = 16
BATCH = 64
LENGTH = 16


class Block(eqx.Module):
    """Layer norm, the sequence layer, a residual; layer norm, an MLP, a residual."""

    layer: eqx.Module
    norm1: eqx.nn.LayerNorm
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    kind: str = eqx.field(static=True)

    def __call__(self, h):
        """`(T, width) -> ((T, width), iterations, converged)` for one sequence."""
        x = jax.vmap(self.norm1)(h)
        steps, ok = jnp.zeros((), jnp.int32), jnp.ones((), bool)
        if self.kind == "diagonal":
            y = self.layer.diagonal(x)
        else:
            sol = self.layer.solve(x)
            y = sol.value
            ok = sol.result == fp.RESULTS.successful
            steps = sol.stats["num_steps"]
        h = h + y
        return h + jax.vmap(self.mlp)(jax.vmap(self.norm2)(h)), steps, ok


class Model(eqx.Module):
    embed: eqx.nn.Embedding
    block: Block
    head: eqx.nn.Linear

    def __init__(self, kind: str, vocab: int, key):
        width = WIDTH[kind]
        k1, k2, k3, k4 = jax.random.split(key, 4)
        if kind in ("diagonal", "implicit"):
            layer = layers.ImplicitSSM(width, STATE_SIZE, throw=False, key=k1)
        elif kind == "fixed_point_rnn":
            layer = layers.FixedPointRNN(width, width, throw=False, key=k1)
        else:
            cell = eqx.nn.GRUCell(width, width, key=k1)
            layer = layers.ParallelRNN(cell, solver=solvers.DEER(), throw=False)
        self.embed = eqx.nn.Embedding(vocab, width, key=k2)
        self.block = Block(
            layer,
            eqx.nn.LayerNorm(width),
            eqx.nn.LayerNorm(width),
            eqx.nn.MLP(width, width, 2 * width, 1, key=k3),
            kind,
        )
        self.head = eqx.nn.Linear(width, vocab, key=k4)

    def __call__(self, tokens):
        h, steps, ok = self.block(jax.vmap(self.embed)(tokens))
        return jax.vmap(self.head)(h), steps, ok


def count_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))


def batch_loss(model, tokens, labels):
    """Mean cross-entropy over the sequences whose solve succeeded (the failed ones
    are masked by their result code and contribute exactly zero)."""
    logits, steps, ok = jax.vmap(model)(tokens)
    per_seq = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(-1)
    loss = jnp.sum(jnp.where(ok, per_seq, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
    accuracy = jnp.mean(logits.argmax(-1) == labels)
    return loss, (accuracy, steps, ok)


@functools.cache
def optimiser(steps):
    """One optimiser per schedule, so the compiled step is shared across seeds."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(100, steps // 10), steps)
    return optax.adamw(schedule, weight_decay=0.01)


@eqx.filter_jit
def train_step(model, state, tokens, labels, opt):
    (loss, aux), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(model, tokens, labels)
    updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), state, loss, aux


@eqx.filter_jit
def predict(model, tokens):
    return jax.vmap(model)(tokens)


def train(kind, group, steps, seed, progress):
    vocab = fp.datasets.multiplication_table(group).shape[0]
    model = Model(kind, vocab, jax.random.key(seed))
    opt = optimiser(steps)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    rng = np.random.default_rng(seed)
    masked, iterations = 0, []
    t0 = time.perf_counter()
    for i in range(steps):
        tokens, labels = fp.datasets.word_problem(group, BATCH, LENGTH, seed=rng)
        model, state, loss, (acc, its, ok) = train_step(model, state, tokens, labels, opt)
        masked += int(BATCH - np.sum(ok))
        iterations.append(np.asarray(its))
        if i % 50 == 0 or i == steps - 1:
            progress.set_postfix(kind=kind, loss=f"{float(loss):.3f}", acc=f"{float(acc):.3f}")
    train_s = time.perf_counter() - t0
    its = np.stack(iterations)
    return model, dict(
        train_s=train_s,
        masked_fraction=masked / (steps * BATCH),
        train_iterations_mean=float(its.mean()),
        train_iterations_max=int(its.max()),
        final_iterations_mean=float(its[-max(1, steps // 10) :].mean()),
    )


def evaluate(model, group, lengths, num=1024):
    out = {}
    for length in lengths:
        tokens, labels = fp.datasets.word_problem(group, num, length, seed=10_000 + length)
        logits, steps, ok = predict(model, tokens)
        out[length] = dict(
            accuracy=float(jnp.mean(logits.argmax(-1) == labels)),
            converged=float(jnp.mean(ok)),
            iterations_mean=float(jnp.mean(steps)),
            iterations_max=int(jnp.max(steps)),
        )
    return out


def timing(model, group):
    tokens, labels = fp.datasets.word_problem(group, BATCH, LENGTH, seed=1)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def forward(p):
        return batch_loss(eqx.combine(p, static), tokens, labels)[0]

    fwd = time_jitted(forward, params)
    both = time_jitted(jax.value_and_grad(forward), params)
    return dict(
        forward_ms=1e3 * fwd.median,
        forward_backward_ms=1e3 * both.median,
        compile_s=fwd.compile_s + both.compile_s,
    )


def _plot(results, lengths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["group"] for r in results})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        for kind in MODELS:
            rows = [r for r in results if r["group"] == group and r["model"] == kind]
            if not rows:
                continue
            acc = np.array([[r["test"][str(n)]["accuracy"] for n in lengths] for r in rows])
            ax.errorbar(lengths, acc.mean(0), yerr=acc.std(0), marker="o", capsize=3, label=kind)
        ax.axvline(LENGTH, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("test length (trained at 16)")
        ax.set_ylabel("per-token accuracy")
        ax.set_title(f"{group} word problem")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--groups", nargs="*", default=["S3", "parity"])
    parser.add_argument("--steps", type=int, default=1000, help="training steps (S3, S5)")
    parser.add_argument("--parity-steps", type=int, default=300)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.parity_steps = 1, 20, 20
    lengths = [LENGTH, 2 * LENGTH, 4 * LENGTH]
    t0 = time.perf_counter()
    payload = dict(
        benchmark="state_tracking",
        mode="quick" if args.quick else "default",
        dtype="float32",
        device=device_info(),
        versions=versions(),
        git=git_state(),
        settings=dict(vars(args), batch=BATCH, length=LENGTH, widths=WIDTH),
    )
    results = []
    runs = [
        (group, kind, seed)
        for group in args.groups
        for seed in range(args.seeds)
        for kind in args.models
    ]
    with tqdm(runs, desc="training") as progress:
        for group, kind, seed in progress:
            steps = args.parity_steps if group == "parity" else args.steps
            model, stats = train(kind, group, steps, seed, progress)
            row = dict(group=group, model=kind, seed=seed, steps=steps, **stats)
            row["params"] = count_params(model)
            row["test"] = {str(n): v for n, v in evaluate(model, group, lengths).items()}
            if seed == 0:
                row["timing"] = timing(model, group)
            results.append(row)
    payload["results"] = results
    table = []
    for group in args.groups:
        base = next(
            (r["timing"] for r in results if r["group"] == group and r["model"] == "diagonal"),
            None,
        )
        for kind in args.models:
            rows = [r for r in results if r["group"] == group and r["model"] == kind]
            acc = np.array([[r["test"][str(n)]["accuracy"] for n in lengths] for r in rows])
            tim = rows[0]["timing"]
            ratio = (
                f"{tim['forward_backward_ms'] / base['forward_backward_ms']:.1f}x" if base else "-"
            )
            table.append(
                [group, kind, str(rows[0]["params"])]
                + [f"{m:.3f} ± {s:.3f}" for m, s in zip(acc.mean(0), acc.std(0), strict=True)]
                + [
                    f"{np.mean([r['final_iterations_mean'] for r in rows]):.1f}",
                    f"{np.mean([r['masked_fraction'] for r in rows]):.3f}",
                    f"{tim['forward_backward_ms']:.1f} ms ({ratio})",
                ]
            )
    print_table(
        ["group", "model", "params"]
        + [f"acc @ {n}" for n in lengths]
        + ["iterations", "masked", "fwd+bwd"],
        table,
    )
    payload["wall_s"] = time.perf_counter() - t0
    path = write_json("state_tracking", payload)
    _plot(results, lengths, RESULTS_DIR / "state_tracking_cpu.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
