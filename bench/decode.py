"""Parallel decoding of a character-level transformer trained on Python's own sources.

The model: `layers.CausalTransformer` (2 layers, d = 128, 4 heads, 256 positions,
ASCII vocabulary), trained with AdamW on random 128-character windows of the
standard library's top-level `.py` files (`datasets.stdlib_text`; every 10th file is
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
  divergence and its logit margin (`fixpoint.first_disagreement`) are reported;
- time: the compiled decoding of all 8 prompts, one after another (batch 1:
  `lax.map`) or as one batch of 8, median of steady-state calls with
  `block_until_ready`, compile timed apart; speedup = sequential time / time, both
  on the same path in this run.

Solvers: sequential; Jacobi, GS-Jacobi and lookahead (`solvers.LookaheadDecoding`:
Jacobi plus `--guesses` n-gram guesses of `--ngram - 1` tokens, capped at the window,
scored in the same call) at every window in `--windows`.

Models: the AR model above, and the same model fine-tuned by consistency training
(CLLM, Kou et al. 2024; `layers.jacobi_trajectories`, `layers.consistency_loss`,
`layers.ar_loss`): Jacobi trajectories (window `CLLM["window"]`, sliding) of the AR
model after `CLLM["examples"]` prompts of 32 training characters, then
`CLLM["steps"]` AdamW steps on the consistency loss (masked to each call's window,
one random call per example) plus `CLLM["ar_weight"]` times the AR loss on fresh
random 160-character windows of the training text (every position scored). Cached
in `bench/models/` as well. Every row carries its model's validation loss.

Run: `python bench/decode.py` (trains on first use: about 6 + 6 minutes on 2 CPU cores).
`--weights cached` uses the cached weights and stops (exit status 3) where they are
missing or stale instead of training; `--weights untrained` decodes the randomly initialised
model (rows labelled `untrained`; no training, nothing read from `bench/models/`).
`--paths` and `--solvers` (kinds: sequential, jacobi, gs-jacobi, lookahead) pick a subset;
the JSON is rewritten after every row (`"complete": false` until the end).
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
from fixpoint import datasets, layers, solvers  # noqa: E402

MODELS = Path(__file__).resolve().parent / "models"
CONFIG = dict(max_len=256, d_model=128, num_heads=4, num_layers=2)
TRAIN = dict(steps=1500, batch=32, seq_len=128, lr=1e-3, seed=0)
CLLM = dict(
    examples=2048,
    prompt_len=32,
    new_tokens=128,
    window=16,
    steps=600,
    batch=32,
    lr=3e-4,
    ar_weight=2.0,
    seed=1,
)


def val_loss(model, val_ids, batches=16, batch=32, seq_len=128):
    rng = np.random.default_rng(123)
    loss = eqx.filter_jit(layers.lm_loss)
    vals = [
        float(loss(model, jnp.asarray(datasets.random_batches(val_ids, batch, seq_len, rng))))
        for _ in range(batches)
    ]
    return float(np.mean(vals))


def train(train_ids, val_ids, steps, batch, seq_len, lr, seed):
    model = layers.CausalTransformer(datasets.ASCII_VOCAB, **CONFIG, key=jax.random.key(seed))
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
        data = jnp.asarray(datasets.random_batches(train_ids, batch, seq_len, rng))
        model, opt_state, loss = step(model, opt_state, data)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return model


def _no_training(what):
    print(f"--weights cached: no usable cached weights for {what}; not training", file=sys.stderr)
    raise SystemExit(3)


def load_or_train(retrain=False, allow_training=True):
    """The benchmark's model and its metadata (trained and cached on first use)."""
    MODELS.mkdir(exist_ok=True)
    weights, meta_path = MODELS / "char_transformer.eqx", MODELS / "char_transformer.json"
    train_text, val_text = datasets.stdlib_text()
    train_ids, val_ids = datasets.encode(train_text), datasets.encode(val_text)
    skeleton = layers.CausalTransformer(datasets.ASCII_VOCAB, **CONFIG, key=jax.random.key(0))
    if weights.exists() and meta_path.exists() and not retrain:
        meta = json.loads(meta_path.read_text())
        if meta["config"] == CONFIG and meta["train"] == TRAIN:
            return eqx.tree_deserialise_leaves(weights, skeleton), meta, val_ids
    if not allow_training:
        _no_training("the AR model")
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


def consistency_tune(
    model, train_ids, examples, prompt_len, new_tokens, window, steps, batch, lr, ar_weight, seed
):
    """CLLM fine-tuning of `model` (see the module docstring); returns the model and stats."""
    rng = np.random.default_rng(seed)
    span = prompt_len + new_tokens
    prompts = jnp.asarray(datasets.random_batches(train_ids, examples, prompt_len - 1, rng))
    collect = jax.jit(
        lambda p: layers.jacobi_trajectories(
            model, p, new_tokens, solver=solvers.JacobiDecoding(window=window)
        )
    )
    t0 = time.perf_counter()
    chunks = [collect(prompts[i : i + 128]) for i in range(0, examples, 128)]
    fixed, states, windows, calls = (jnp.concatenate(x) for x in zip(*chunks, strict=True))
    collect_s = time.perf_counter() - t0
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 50, steps, lr / 10)
    optim = optax.adamw(schedule, weight_decay=0.01)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    def loss_fn(m, p, st, fp, win, text):
        gc = layers.consistency_loss(m, p, st, fp, win)
        ar = layers.ar_loss(m, text[:, :1], text[:, 1:])  # every position of a real window
        return gc + ar_weight * ar, (gc, ar)

    @eqx.filter_jit
    def step(m, opt_state, p, st, fp, win, text):
        (_, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(m, p, st, fp, win, text)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), opt_state, aux

    calls_np = np.asarray(calls)
    bar = tqdm(range(steps), desc="consistency", mininterval=2.0)
    for i in bar:
        idx = rng.integers(0, examples, batch)
        j = rng.integers(0, calls_np[idx])  # one real state of each example's trajectory
        # Fresh text for the AR loss every step: a fixed set of windows is memorised.
        text = jnp.asarray(datasets.random_batches(train_ids, batch, span - 1, rng))
        model, opt_state, (gc, ar) = step(
            model, opt_state, prompts[idx], states[idx, j], fixed[idx], windows[idx, j], text
        )
        if i % 50 == 0:
            bar.set_postfix(gc=f"{float(gc):.3f}", ar=f"{float(ar):.3f}")
    stats = dict(
        collect_s=collect_s,
        tune_s=time.perf_counter() - t0 - collect_s,
        teacher_calls_mean=float(calls_np.mean()),
        final_consistency=float(gc),
        final_ar=float(ar),
    )
    return model, stats


def load_or_tune(model, meta, val_ids, retrain=False, allow_training=True):
    """The consistency-tuned model and its metadata (tuned and cached on first use)."""
    weights, meta_path = MODELS / "char_transformer_cllm.eqx", MODELS / "char_transformer_cllm.json"
    if weights.exists() and meta_path.exists() and not retrain:
        tuned_meta = json.loads(meta_path.read_text())
        if tuned_meta["base"] == dict(config=CONFIG, train=TRAIN) and tuned_meta["cllm"] == CLLM:
            return eqx.tree_deserialise_leaves(weights, model), tuned_meta
    if not allow_training:
        _no_training("the consistency-trained model")
    train_ids = datasets.encode(datasets.stdlib_text()[0])
    tuned, stats = consistency_tune(model, train_ids, **CLLM)
    tuned_meta = dict(
        base=dict(config=CONFIG, train=TRAIN),
        cllm=CLLM,
        **stats,
        val_loss=val_loss(tuned, val_ids),
        base_val_loss=meta["val_loss"],
    )
    eqx.tree_serialise_leaves(weights, tuned)
    meta_path.write_text(json.dumps(tuned_meta, indent=1))
    return tuned, tuned_meta


def _models(args):
    """`(models, meta, tuned_meta, val_ids)`: `[(name, model, validation loss)]`."""
    if args.weights == "untrained":
        val_ids = datasets.encode(datasets.stdlib_text()[1])
        model = layers.CausalTransformer(datasets.ASCII_VOCAB, **CONFIG, key=jax.random.key(0))
        meta = dict(config=CONFIG, weights="untrained (random initialisation, seed 0)")
        meta["val_loss"] = val_loss(model, val_ids, batches=1)
        print(f"model: {CONFIG}, UNTRAINED; validation loss {meta['val_loss']:.3f} nats/char")
        return [("untrained", model, meta["val_loss"])], meta, None, val_ids
    allow = args.weights == "auto"
    model, meta, val_ids = load_or_train(args.retrain, allow_training=allow)
    print(f"model: {CONFIG}; validation loss {meta['val_loss']:.3f} nats/char")
    tuned, tuned_meta = load_or_tune(model, meta, val_ids, args.retrain, allow_training=allow)
    print(
        f"consistency-tuned: validation loss {tuned_meta['val_loss']:.3f} nats/char "
        f"({tuned_meta['val_loss'] / meta['val_loss'] - 1:+.1%} against the AR model)"
    )
    named = {"ar": (model, meta["val_loss"]), "cllm": (tuned, tuned_meta["val_loss"])}
    models = [(name, *named[name]) for name in args.models if name in named]
    return models, meta, tuned_meta, val_ids


def run(args):
    models, meta, tuned_meta, val_ids = _models(args)
    rng = np.random.default_rng(7)
    starts = rng.integers(0, len(val_ids) - args.prompt_len, args.prompts)
    prompts = jnp.asarray(np.stack([val_ids[s : s + args.prompt_len] for s in starts]))
    n = args.new_tokens
    configs = [("sequential", solvers.SequentialDecoding())]  # always: the reference
    if "jacobi" in args.solvers:
        for w in args.windows:
            configs.append((f"jacobi-{w}", solvers.JacobiDecoding(window=w)))
    if "gs-jacobi" in args.solvers:
        for w in args.windows:
            configs.append((f"gs-jacobi-{w}", solvers.GSJacobiDecoding(block_size=w)))
    if "lookahead" in args.solvers:
        for w in args.windows:
            ngram = min(args.ngram, w + 1)
            la = solvers.LookaheadDecoding(window=w, ngram=ngram, guesses=args.guesses)
            configs.append((f"lookahead-{w}", la))
    rows = []
    payload = dict(
        model=meta,
        tuned=tuned_meta,
        weights=args.weights,
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        new_tokens=n,
        rows=rows,
        versions=_common.versions(),
        git=_common.git_state(),
        device=_common.device_info(),
        complete=False,
    )

    def save():  # after every row: a run stopped from outside keeps what it measured
        return _common.write_json(args.name, payload)

    for model_name, model, loss in models:
        _rows(model, model_name, loss, configs, prompts, n, args, rows, save)
    payload["complete"] = True
    print("wrote", save())


def _rows(model, model_name, loss, configs, prompts, n, args, rows, save):
    reference = {}
    for path in ("cached", "plain"):
        if path not in args.paths:
            continue
        cached = path == "cached"
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
                    model=model_name,
                    val_loss=loss,
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
                if path == "plain" and ("cached", 1) in reference:
                    cached_tokens = reference[("cached", 1)][0]
                    divs = [
                        fixpoint.first_disagreement(model, prompts[i], cached_tokens[i], tokens[i])
                        for i in range(len(prompts))
                    ]
                    hit = [d for d in divs if d.index >= 0]
                    row["cross_path_divergences"] = len(hit)
                    row["worst_relative_margin"] = max(
                        (abs(d.margin) / d.scale for d in hit), default=0.0
                    )
                rows.append(row)
                save()
                print(
                    f"{model_name:4} (val {loss:.3f}) {path:6} {name:13} B={batch}  "
                    f"tok/call {row['tokens_per_call']:5.2f}  "
                    f"rows/call {row['rows_per_call']:4d}  same={row['same']}  "
                    f"{_common.fmt_time(row['time_s'])}  speedup {row['speedup']:.2f}x",
                    flush=True,
                )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--guesses", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=["ar", "cllm"], help="in this order")
    parser.add_argument(
        "--weights",
        choices=("auto", "cached", "untrained"),
        default="auto",
        help="auto: cached, else train; cached: never train; untrained: random initialisation",
    )
    parser.add_argument("--paths", nargs="+", default=["cached", "plain"])
    parser.add_argument(
        "--solvers",
        nargs="+",
        default=["sequential", "jacobi", "gs-jacobi", "lookahead"],
        help="kinds to run (sequential always runs: it is the reference)",
    )
    parser.add_argument("--name", default="decode", help="results/<name>_<platform>.json")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
