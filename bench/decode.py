"""Parallel decoding of a character-level transformer trained on Python's own sources.

The model: `layers.CausalTransformer` (2 layers, d = 128, 4 heads, 256 positions,
ASCII vocabulary), trained with AdamW on random 128-character windows of the
standard library's top-level `.py` files (`layers.stdlib_text`; every 10th file is
held out for validation). The weights are cached in `bench/models/` with
`eqx.tree_serialise_leaves` beside a JSON file of the configuration and the
validation loss; `--retrain` trains again.

Decoding: 8 prompts of 32 characters cut from the validation text (fixed seed),
`max_new_tokens = 128`, greedy, no EOS (so no solver is handed an output length).
For every solver:

- tokens per call (all 128 tokens / model calls; mean over the prompts), rows per
  call (positions the model scores per call), model calls;
- `same`: whether every prompt's tokens equal sequential decoding on the same
  path (cached against cached, plain against plain); across paths the first
  divergence and its logit margin (`fixpoint.first_divergence`) are reported;
- time: the compiled decoding of all 8 prompts, one after another (batch 1:
  `lax.map`) or as one batch of 8, median of steady-state calls with
  `block_until_ready`, compile timed apart; speedup = sequential time / time, both
  on the same path in this run.

Run: `python bench/decode.py` (trains on first use: about 2-3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

import fixpoint  # noqa: E402
import layers  # noqa: E402
import solvers  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"
CONFIG = dict(max_len=256, d_model=128, num_heads=4, num_layers=2)
TRAIN = dict(steps=1500, batch=32, seq_len=128, lr=1e-3, seed=0)


def val_loss(model, val_ids, batches=16, batch=32, seq_len=128):
    rng = np.random.default_rng(123)
    loss = eqx.filter_jit(layers.lm_loss)
    vals = [
        float(loss(model, jnp.asarray(layers.random_batches(val_ids, batch, seq_len, rng))))
        for _ in range(batches)
    ]
    return float(np.mean(vals))


def train(train_ids, val_ids, steps, batch, seq_len, lr, seed):
    model = layers.CausalTransformer(layers.ASCII_VOCAB, **CONFIG, key=jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 100, steps, lr / 10)
    optim = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, batch):
        loss, grads = eqx.filter_value_and_grad(layers.lm_loss)(model, batch)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="train", mininterval=2.0)
    for i in bar:
        data = jnp.asarray(layers.random_batches(train_ids, batch, seq_len, rng))
        model, opt_state, loss = step(model, opt_state, data)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return model


def load_or_train(retrain=False):
    """The benchmark's model and its metadata (trained and cached on first use)."""
    MODELS.mkdir(exist_ok=True)
    weights, meta_path = MODELS / "char_transformer.eqx", MODELS / "char_transformer.json"
    train_text, val_text = layers.stdlib_text()
    train_ids, val_ids = layers.encode(train_text), layers.encode(val_text)
    skeleton = layers.CausalTransformer(layers.ASCII_VOCAB, **CONFIG, key=jax.random.key(0))
    if weights.exists() and meta_path.exists() and not retrain:
        meta = json.loads(meta_path.read_text())
        if meta["config"] == CONFIG and meta["train"] == TRAIN:
            return eqx.tree_deserialise_leaves(weights, skeleton), meta, val_ids
    t0 = time.perf_counter()
    model = train(train_ids, val_ids, **TRAIN)
    meta = dict(
        config=CONFIG,
        train=TRAIN,
        train_s=time.perf_counter() - t0,
        train_chars=len(train_text),
        val_chars=len(val_text),
        val_loss=val_loss(model, val_ids),
    )
    eqx.tree_serialise_leaves(weights, model)
    meta_path.write_text(json.dumps(meta, indent=1))
    return model, meta, val_ids


def run(args):
    model, meta, val_ids = load_or_train(args.retrain)
    print(f"model: {CONFIG}; validation loss {meta['val_loss']:.3f} nats/char")
    rng = np.random.default_rng(7)
    starts = rng.integers(0, len(val_ids) - args.prompt_len, args.prompts)
    prompts = jnp.asarray(np.stack([val_ids[s : s + args.prompt_len] for s in starts]))
    n = args.new_tokens
    configs = [("sequential", solvers.SequentialDecoding())]
    for w in args.windows:
        configs.append((f"jacobi-{w}", solvers.JacobiDecoding(w)))
    for w in args.windows:
        configs.append((f"gs-jacobi-{w}", solvers.GSJacobiDecoding(w)))
    rows, reference = [], {}
    for cached in (True, False):
        path = "cached" if cached else "plain"
        for name, solver in configs:
            one = lambda p, s=solver, c=cached: fixpoint.decode(
                model, p, n, solver=s, cached=c, return_solution=True
            )
            for batch in args.batches:
                if not cached and batch != 1:
                    continue
                # Batch 1: the prompts one after another; batch B: groups of B rows.
                stack = prompts if batch == 1 else prompts.reshape(-1, batch, prompts.shape[1])
                fn = lambda st, f=one: jax.lax.map(f, st)
                timing = _common.time_jitted(fn, stack, reps=args.reps)
                tokens, sol = timing.out
                tokens = np.asarray(tokens).reshape(len(prompts), n)
                calls = np.asarray(sol.stats["model_calls"]).reshape(-1)
                key = (path, batch)
                if name == "sequential":
                    reference[key] = (tokens, timing.median)
                ref_tokens, ref_time = reference[key]
                row = dict(
                    path=path,
                    solver=name,
                    batch=batch,
                    tokens_per_call=float(np.mean(n / calls)),
                    model_calls=float(np.mean(calls)),
                    rows_per_call=int(np.asarray(sol.stats["rows_per_call"]).reshape(-1)[0]),
                    same=bool(np.array_equal(tokens, ref_tokens)),
                    compile_s=timing.compile_s,
                    time_s=timing.median,
                    speedup=ref_time / timing.median,
                )
                if path == "plain":
                    cached_tokens = reference[("cached", 1)][0]
                    divs = [
                        fixpoint.first_divergence(model, prompts[i], cached_tokens[i], tokens[i])
                        for i in range(len(prompts))
                    ]
                    hit = [d for d in divs if d.index >= 0]
                    row["cross_path_divergences"] = len(hit)
                    row["worst_relative_margin"] = max(
                        (abs(d.margin) / d.scale for d in hit), default=0.0
                    )
                rows.append(row)
                print(
                    f"{path:6} {name:13} B={batch}  tok/call {row['tokens_per_call']:5.2f}  "
                    f"rows/call {row['rows_per_call']:3d}  same={row['same']}  "
                    f"{_common.fmt_time(row['time_s'])}  speedup {row['speedup']:.2f}x"
                )
    payload = dict(
        model=meta,
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        new_tokens=n,
        rows=rows,
        versions=_common.versions(),
        git=_common.git_state(),
        device=_common.device_info(),
    )
    print("wrote", _common.write_json("decode", payload))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=5)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
