"""Markdown tables of the benchmark results, read from `bench/results/*.json` at build time.

Every number in a table comes from a results file; nothing here is copied by hand. Each
results file has one renderer, which turns it into a few markdown parts (sections): a bold
title line, a table, and a caption saying which command produced the file and on what
hardware, versions and commit, as far as the file records them.

In a markdown page, a line that is exactly

    <!-- bench: NAME -->            (every part of bench/results/NAME.json)
    <!-- bench: NAME SECTION -->    (one part of it)

is replaced by the table(s) (`expand`). An unknown name or section, or a missing file, raises
`ValueError` naming the marker, so that a docs build fails loudly. `names()` lists every
renderable `NAME` and `NAME SECTION`; `python docs/bench_tables.py` prints every table.

Standard library only (no JAX, no mkdocs).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"

MARKER = re.compile(r"<!--\s*bench:\s*(?P<name>\S+)(?:\s+(?P<section>\S+))?\s*-->")

MIB = 2**20
KIB = 2**10

# The command that produced each file. Most files do not record their command line; these
# were taken from the bench scripts' docstrings and the hand-written benchmark table the
# README had before this site (the source is kept in the second field), checked against
# the settings a file records where it records them.
COMMANDS: dict[str, tuple[str, str]] = {
    "batch_cpu": ("python bench/batch.py --rounds 30", "README; all three parts"),
    "batch_overhead_cpu": (
        "python bench/batch.py --part overhead --rounds 60 --name batch_overhead",
        "README",
    ),
    "batch_stragglers_cpu": (
        "python bench/batch.py --part stragglers --rounds 30 --name batch_stragglers",
        "README",
    ),
    "decode_cpu": ("python bench/decode.py", "script docstring"),
    "deq_memory": ("python bench/deq_memory.py", "script docstring"),
    "deq_training_digits-mlp": (
        "python bench/deq_training.py --task digits-mlp --adjoint implicit phantom jfb",
        "README",
    ),
    "deq_training_digits-mondeq": (
        "python bench/deq_training.py --task digits-mondeq",
        "README",
    ),
    "deq_training_mnist1d-convmondeq": (
        "python bench/deq_training.py --task mnist1d-convmondeq --adjoint implicit --epochs 10",
        "script docstring",
    ),
    "deq_training_peers_digits-mlp": (
        ".venv312/bin/python bench/deq_training.py --task digits-mlp --peers"
        " --adjoint implicit phantom jfb --reps 20",
        "README",
    ),
    "diffusion_cpu": ("python bench/diffusion.py", "script docstring"),
    "eager_cpu": ("python bench/eager.py", "script docstring"),
    "fixed_point_cpu": ("python bench/fixed_point.py --full", "script docstring; mode recorded"),
    "fixed_point_one_state_cpu": (
        "python bench/fixed_point.py --one-state only --reps 20",
        "script docstring; settings recorded",
    ),
    "fixed_point_peers_py312_cpu": (
        ".venv312/bin/python bench/fixed_point.py --quick",
        "README; the output renamed to this file",
    ),
    "gradients_cpu": ("python bench/gradients.py --quick", "script docstring; mode recorded"),
    "gradients_n1024_cpu": (
        "python bench/gradients.py --sizes 1024 --mem-n 0 --reps 3",
        "README; settings recorded",
    ),
    "gradients_x64_cpu": (
        "python bench/gradients.py --quick --x64",
        "script docstring; settings recorded",
    ),
    "graphs_chains_cpu": (
        "python bench/graphs.py --tasks chains --chain-steps 80 --scaling --gamma 0.9"
        " --sizing fixed --name graphs_chains",
        "README",
    ),
    "graphs_flow_classify_cpu": (
        "python bench/graphs.py --tasks flow classify --models cgs-soft cgs ignn gcn gin"
        " --seeds 0 1 2 --name graphs_flow_classify",
        "README",
    ),
    "graphs_gvi_cpu": (
        "python bench/graphs.py --tasks gvi --models cgs-soft cgs ignn gcn gin --seeds 0 1 2"
        " --steps 1000 --batch 8 --name graphs_gvi",
        "README",
    ),
    "scan_cpu": ("python bench/scan.py --quick", "script docstring; mode recorded"),
    "scan_gradient_cost_cpu": ("python bench/scan_gradient_cost.py", "script docstring"),
    "scan_peers_cpu": (
        "python bench/scan.py --quick --out bench/results/scan_peers_cpu.json",
        "README",
    ),
    "scan_reference_cpu": ("python bench/scan_reference.py --reps 20", "README"),
    "scan_tolerance": ("python bench/scan_tolerance.py", "script docstring"),
    "lyapunov_cpu": ("python bench/lyapunov.py", "script docstring; settings recorded"),
    "solvers_cpu": ("python bench/solvers.py", "script docstring; settings recorded"),
    "reversible_cpu": ("python bench/reversible.py", "script docstring; settings recorded"),
    "games_cpu": ("python bench/games.py", "script docstring; settings recorded"),
    "equilibrium_layers_cpu": (
        "python bench/equilibrium_layers.py",
        "script docstring; settings recorded",
    ),
    "state_tracking_cpu": (
        "python bench/state_tracking.py",
        "script docstring; settings recorded",
    ),
}

# --------------------------------------------------------------------------- formatting


def sig(x: Any, n: int = 3) -> str:
    """`x` to `n` significant figures (ints exactly; None and NaN as a dash)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str):
        return x
    x = float(x)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    e = math.floor(math.log10(abs(x)))
    r = round(x, n - 1 - e)
    if r != 0:
        e = math.floor(math.log10(abs(r)))
    if e < -3 or e >= 6:
        return f"{x:.{n - 1}e}"
    return f"{round(x, n - 1 - e):.{max(n - 1 - e, 0)}f}"


def par(x: Any) -> str:
    """A parameter (tolerance, scale, ρ) in its shortest form: 1e-05, 6, 0.99."""
    return "—" if x is None else f"{float(x):g}"


def ms(x: Any) -> str:
    """Seconds as milliseconds, 3 significant figures."""
    return sig(None if x is None else float(x) * 1e3)


def us(x: Any) -> str:
    """Seconds as microseconds, 3 significant figures."""
    return sig(None if x is None else float(x) * 1e6)


def mib(x: Any) -> str:
    """Bytes as MiB, 3 significant figures."""
    return sig(None if x is None else float(x) / MIB)


def pct(x: Any) -> str:
    """A fraction as a percentage, 3 significant figures."""
    return sig(None if x is None else float(x) * 100)


def ratio(x: Any) -> str:
    """A ratio, 3 significant figures, with a trailing ×."""
    s = sig(x)
    return s if s == "—" else s + "×"


def pm(mean: Any, std: Any, scale: float = 1.0) -> str:
    """`mean ± std`, the mean to 3 significant figures and the std to as many decimals."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    m = sig(float(mean) * scale)
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return m
    decimals = len(m.split(".")[1]) if "." in m and "e" not in m else 0
    if "e" in m:
        return f"{m} ± {sig(float(std) * scale, 2)}"
    return f"{m} ± {float(std) * scale:.{decimals}f}"


def _cell(c: Any) -> str:
    s = sig(c) if not isinstance(c, str) else c
    return s.replace("|", "\\|").replace("\n", " ")


def _numeric(s: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?[×%]?", s))


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    """A markdown table; columns of numbers only are right-aligned."""
    body = [[_cell(c) for c in r] for r in rows]
    align = []
    for j in range(len(header)):
        col = [r[j] for r in body if r[j] not in ("—", "")]
        align.append("---:" if col and all(_numeric(c) for c in col) else "---")
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def caption(name: str, data: dict[str, Any]) -> str:
    """The line under a table: command, hardware, versions and commit, as recorded."""
    command, source = COMMANDS[name]
    note = re.sub(r"^(README|script docstring)(; )?", "", source)
    parts = [f"Command: `{command}`" + (f" ({note})" if note else "") + "."]
    dev = data.get("device")
    if isinstance(dev, dict):
        hw = f"{dev.get('platform', '?')} (device kind {dev.get('device_kind', '?')})"
        if "device_count" in dev:
            hw += f", {dev['device_count']} device(s)"
        if "host_cpus" in dev:
            hw += f", host {dev.get('host', '?')} with {dev['host_cpus']} CPUs"
        parts.append(f"Hardware: {hw}.")
    elif dev is not None:
        parts.append(f"Hardware: recorded only as device `{dev}` (no CPU count).")
    elif "devices" in data:
        parts.append(f"Hardware: recorded only as devices `{data['devices']}` (no CPU count).")
    else:
        parts.append("Hardware: not recorded.")
    vers = data.get("versions")
    if isinstance(vers, dict):
        parts.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".")
    else:
        parts.append("Versions: not recorded.")
    git = data.get("git")
    if isinstance(git, dict) and git.get("commit"):
        dirty = " (library tree dirty)" if _truthy(git.get("library_dirty")) else ""
        parts.append(f"Commit: `{git['commit']}`{dirty}.")
    else:
        parts.append("Commit: not recorded.")
    return "*" + " ".join(parts) + "*"


def _why(r: dict[str, Any]) -> str | None:
    """Why a row has no measurement (skipped / unavailable / error), or None."""
    for key in ("unavailable", "skipped", "error"):
        if r.get(key):
            return f"{key}: {r[key]}"
    status = r.get("status")
    if status in ("skipped", "unavailable", "error"):
        return f"{status}: {r.get('reason', '')}".rstrip(": ")
    return None


def _part(title: str, *blocks: str) -> str:
    return "\n\n".join([f"**{title}**", *blocks])


Parts = list[tuple[str, str]]

# ---------------------------------------------------------------------------- batch

BATCH_CONFIGS = {
    "plain": "plain loop (`compaction=None`)",
    "compact": "`Compaction()`",
    "compact-f2": "`Compaction(factor=2)`",
    "compact-b1": "`Compaction(min_bucket=1)`",
}


def _batch(d: dict[str, Any]) -> Parts:
    parts: Parts = []
    if d.get("stragglers"):
        rows = [r for r in d["stragglers"] if "tail_steps" not in r]
        floors = [r for r in d["stragglers"] if "tail_steps" in r]
        t = table(
            [
                "case",
                "configuration",
                "time (ms)",
                "× all-easy",
                "× plain",
                "steps max",
                "steps mean",
                "codes equal",
                "steps equal",
                "max value diff",
            ],
            [
                [
                    r["case"],
                    BATCH_CONFIGS.get(r["config"], r["config"]),
                    ms(r["best_s"]),
                    ratio(r["vs_all_easy"]),
                    ratio(r["vs_plain"]),
                    r["steps_max"],
                    sig(r["steps_mean"]),
                    r["codes_equal"],
                    r["steps_equal"],
                    sig(r["max_abs_value_diff"]),
                ]
                for r in rows
            ],
        )
        blocks = [t]
        if floors:
            blocks.append(
                table(
                    [
                        "floor (one-slow case)",
                        "tail steps",
                        "bare tail (ms)",
                        "µs/step",
                        "× all-easy",
                    ],
                    [
                        [
                            r["config"].removeprefix("floor: "),
                            r["tail_steps"],
                            ms(r["bare_tail_s"]),
                            us(r["bare_tail_per_step_s"]),
                            ratio(r["vs_all_easy"]),
                        ]
                        for r in floors
                    ],
                )
            )
        parts.append(
            (
                "stragglers",
                _part(
                    "Batches with stragglers: Picard under vmap, plain loop against compaction"
                    " (minimum over interleaved rounds)",
                    *blocks,
                ),
            )
        )
    if d.get("epoch"):
        t = table(
            [
                "model",
                "configuration",
                "best epoch (s)",
                "× plain",
                "first epoch, with compile (s)",
                "last loss",
                "steps mean",
                "steps max",
            ],
            [
                [
                    r["model"].replace("mondeq", "MonDEQ").replace("deq", "DEQ"),
                    BATCH_CONFIGS.get(r["config"], r["config"]),
                    sig(r["best_epoch_s"]),
                    ratio(r["vs_plain"]),
                    sig(r["first_epoch_s"]),
                    sig(r["last_loss"], 4),
                    sig(r["last_epoch_steps_mean"]),
                    r["last_epoch_steps_max"],
                ]
                for r in d["epoch"]
            ],
        )
        parts.append(("epoch", _part("Training epoch on digits, with and without compaction", t)))
    if d.get("overhead"):
        t = table(
            ["d", "iterations", "bare `while_loop` (µs/iter)", "ours (µs/iter)", "ours / bare"],
            [
                [
                    r["d"],
                    r["iterations"],
                    us(r["bare_per_iter_s"]),
                    us(r["ours_per_iter_s"]),
                    ratio(r["ratio"]),
                ]
                for r in d["overhead"]
            ],
        )
        parts.append(
            (
                "overhead",
                _part("Loop overhead at a fixed iteration count, batch 1, against a bare loop", t),
            )
        )
    return parts


# --------------------------------------------------------------------------- decode

DECODE_MODELS = {"ar": "AR model", "cllm": "after consistency training (CLLM)"}
DECODE_KINDS = {"jacobi": "Jacobi", "gs-jacobi": "GS-Jacobi", "lookahead": "lookahead"}


def _decode_split(solver: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(.+)-(\d+)", solver)
    return (m.group(1), int(m.group(2))) if m else (solver, None)


def _decode(d: dict[str, Any]) -> Parts:
    rows = d["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    windows = sorted({w for r in rows for _, w in [_decode_split(r["solver"])] if w})
    kinds = list(dict.fromkeys(k for r in rows for k, w in [_decode_split(r["solver"])] if w))

    def find(model: str, solver: str, path: str, batch: int) -> dict[str, Any] | None:
        for r in rows:
            if (r["model"], r["solver"], r["path"], r["batch"]) == (model, solver, path, batch):
                return r
        return None

    tok = []
    for m in models:
        for k in kinds:
            cells = []
            for w in windows:
                r = find(m, f"{k}-{w}", "cached", 1)
                cells.append(sig(r["tokens_per_call"]) if r else "—")
            tok.append([DECODE_MODELS.get(m, m), DECODE_KINDS.get(k, k), *cells])
    parts: Parts = [
        (
            "tokens",
            _part(
                f"Parallel decoding: tokens per model call ({d['prompts']} prompts ×"
                f" {d['new_tokens']} new tokens, greedy, cached path)",
                table(["model", "solver", *[f"window {w}" for w in windows]], tok),
            ),
        )
    ]
    configs = [("cached", 1), ("cached", 8), ("plain", 1)]
    configs = [c for c in configs if any((r["path"], r["batch"]) == c for r in rows)]
    blocks = []
    for m in models:
        body = []
        for k in kinds:
            for w in windows:
                s = f"{k}-{w}"
                cells = []
                for p, b in configs:
                    r = find(m, s, p, b)
                    cells.append(ratio(r["speedup"]) if r else "—")
                same = [r["same"] for r in rows if r["model"] == m and r["solver"] == s]
                body.append([f"{DECODE_KINDS.get(k, k)}-{w}", *cells, all(same) if same else None])
        blocks.append(
            f"*{DECODE_MODELS.get(m, m)}:*\n\n"
            + table(
                ["solver", *[f"{p}, batch {b}" for p, b in configs], "same as sequential"], body
            )
        )
    parts.append(
        (
            "speed",
            _part("Parallel decoding: CPU speed-up over sequential decoding (same path)", *blocks),
        )
    )
    body = []
    for m in models:
        vl = next(r["val_loss"] for r in rows if r["model"] == m)
        seq = [find(m, "sequential", p, b) for p, b in configs]
        ok = [r["same"] for r in rows if r["model"] == m]
        body.append(
            [
                DECODE_MODELS.get(m, m),
                sig(vl, 4),
                *[ms(r["time_s"]) if r else "—" for r in seq],
                f"{sum(ok)} of {len(ok)}",
            ]
        )
    parts.append(
        (
            "models",
            _part(
                "Parallel decoding: the models, sequential time and exactness",
                table(
                    [
                        "model",
                        "validation loss (nats/char)",
                        *[f"sequential, {p}, batch {b} (ms)" for p, b in configs],
                        "rows equal to sequential",
                    ],
                    body,
                ),
            ),
        )
    )
    return parts


# ------------------------------------------------------------------------------ DEQ


def _deq_memory(d: dict[str, Any]) -> Parts:
    t = table(
        [
            "forward steps",
            "implicit (MiB)",
            "unrolled, every iterate (MiB)",
            "unrolled, checkpointed (MiB)",
            "every iterate / implicit",
        ],
        [
            [
                r["steps"],
                mib(r["implicit"]),
                mib(r["unrolled_all"]),
                mib(r["unrolled_checkpointed"]),
                ratio(r["unrolled_all"] / r["implicit"]),
            ]
            for r in d["rows"]
        ],
    )
    title = f"DEQ train-step memory (XLA temp allocation), hidden {d['hidden']}, batch {d['batch']}"
    return [("memory", _part(title, t))]


def _deq_training(d: dict[str, Any]) -> Parts:
    runs = d["runs"]
    t = table(
        [
            "task",
            "gradient",
            "epochs",
            "test accuracy (%)",
            "forward steps (test mean)",
            "test converged (%)",
            "final loss",
            "training (s)",
            "s/epoch",
            "backward",
        ],
        [
            [
                r["task"],
                r["adjoint"],
                r["epochs"],
                pct(r["test_acc"]),
                sig(r["test_fwd_steps"]),
                pct(r["test_converged"]),
                sig(r["history"][-1]["loss"]) if r.get("history") else "—",
                sig(r["wall_s"]),
                sig(r["s_per_epoch"]),
                r.get("backward", "—"),
            ]
            for r in runs
        ],
    )
    return [("training", _part(f"DEQ training: {runs[0]['task']}, final values", t))]


def _deq_peers(d: dict[str, Any]) -> Parts:
    rows = d["rows"]
    ours = {r["adjoint"]: r for r in rows if r["library"] == "ours" and "step_s" in r}
    body = []
    for r in rows:
        why = _why(r)
        if why:
            body.append([r["adjoint"], r["library"], why, *["—"] * 8])
            continue
        o = ours.get(r["adjoint"])
        body.append(
            [
                r["adjoint"],
                r["library"],
                ms(r["step_s"]),
                ms(r["step_best_s"]),
                ratio(r["step_s"] / o["step_s"]) if o else "—",
                mib(r["memory"]["temp_size"]),
                sig(r["compile_s"]),
                f"{sig(r['fwd_steps_mean'])} / {r['fwd_steps_max']}",
                pct(r["converged"]),
                sig(r["loss"], 4),
                sig(r.get("grad_rel_diff_vs_ours")),
            ]
        )
    t = table(
        [
            "gradient",
            "library",
            "step, median (ms)",
            "step, best (ms)",
            "median / ours",
            "XLA temp (MiB)",
            "compile (s)",
            "forward steps mean / max",
            "converged (%)",
            "loss",
            "gradient rel. diff. vs ours",
        ],
        body,
    )
    title = f"DEQ training step against banax (digits MLP cell, batch {d['batch']})"
    return [("step", _part(title, t))]


# ------------------------------------------------------------------------ diffusion


def _diffusion(d: dict[str, Any]) -> Parts:
    recs = d["records"]
    cfgs = list(dict.fromkeys((r["d"], r["steps"]) for r in recs))
    solvers = list(dict.fromkeys(r["solver"] for r in recs))
    by = {(r["solver"], r["d"], r["steps"]): r for r in recs}
    heads = [f"D={dd}, T={t}" for dd, t in cfgs]

    def grid(fn: Callable[[dict[str, Any]], str], names: list[str]) -> list[list[str]]:
        out = []
        for s in names:
            out.append([s, *[fn(by[(s, *c)]) if (s, *c) in by else "—" for c in cfgs]])
        return out

    def its(r: dict[str, Any]) -> str:
        cell = f"{r['iterations']} ({r['evaluations']})"
        return cell if r.get("result") == "successful" else f"{cell} {r.get('result')}"

    par = [s for s in solvers if s != "lax.scan"]
    t1 = table(["solver: iterations (evaluations)", *heads], grid(its, par))
    t2 = table(
        ["solver: time, × lax.scan", *heads],
        [["lax.scan (ms)", *[ms(by[("lax.scan", *c)]["best_s"]) for c in cfgs]]]
        + grid(lambda r: ratio(r["vs_lax_scan"]), par),
    )
    t3 = table(
        ["max error vs float64 `lax.scan`", *heads],
        grid(lambda r: sig(r["max_error_vs_float64"]), solvers),
    )
    title = "Parallel sampling of a diffusion model (Euler probability-flow ODE), float32"
    return [
        ("iterations", _part(title + ": iterations and step evaluations", t1)),
        ("time", _part(title + ": CPU time against `lax.scan`", t2)),
        ("error", _part(title + ": error (float32 `lax.scan`'s own is the floor)", t3)),
    ]


# ---------------------------------------------------------------------------- eager


def _eager(d: dict[str, Any]) -> Parts:
    body = []
    for name, c in d["cases"].items():
        a, u = c["cached"], c["uncached"]
        body.append(
            [
                name,
                sig(a["first_s"]),
                ms(a["median_s"]),
                ms(a["min_s"]),
                sig(u["first_s"]),
                ms(u["median_s"]),
                ratio(u["median_s"] / a["median_s"]),
            ]
        )
    t = table(
        [
            "case",
            "first call (s)",
            "cached median (ms)",
            "cached min (ms)",
            "uncached first (s)",
            "uncached median (ms)",
            "uncached / cached (median)",
        ],
        body,
    )
    return [("calls", _part(f"Repeated eager calls ({d['reps']} repetitions)", t))]


# ---------------------------------------------------------------------- fixed point


def _counterpart(method: str) -> str:
    """Our solver a method is compared with."""
    for key, ours in (
        ("Anderson", "ours-Anderson"),
        ("-AA", "ours-Anderson"),
        ("Broyden", "ours-Broyden"),
        ("Newton", "ours-Newton"),
    ):
        if key in method:
            return ours
    return "ours-Picard"


def _fixed_point(d: dict[str, Any]) -> Parts:
    rows = d["rows"]
    groups = list(dict.fromkeys((r["problem"], r["d"]) for r in rows))
    parts: Parts = []
    for problem, dim in groups:
        grp = [r for r in rows if (r["problem"], r["d"]) == (problem, dim)]
        cfgs = list(dict.fromkeys((r["batch"], r["rho"]) for r in grp))
        methods = list(dict.fromkeys(r["method"] for r in grp))
        by = {(r["method"], r["batch"], r["rho"]): r for r in grp}
        notes: list[str] = []
        body = []
        for m in methods:
            first = next(r for r in grp if r["method"] == m)
            label = m + (f" ({first['detail']})" if first.get("detail") else "")
            cells = []
            for b, rho in cfgs:
                r = by.get((m, b, rho))
                if r is None:
                    cells.append("—")
                    continue
                why = _why(r)
                if why:
                    cells.append(why.split(":")[0])
                    notes.append(f"- {m}, B={b}, ρ={par(rho)}: {why}")
                    continue
                o = by.get((_counterpart(m), b, rho))
                cell = f"{ms(r['run_s'])} · {r['steps_max']}"
                if m != _counterpart(m) and o and "run_s" in o:
                    cell += f" · {ratio(r['run_s'] / o['run_s'])}"
                if r.get("ok_frac", 1) < 1:
                    cell += f" (converged: {round(r['ok_frac'] * b)} of {b})"
                cells.append(cell)
            body.append([label, first.get("norm", ""), *cells])
        t = table(
            ["method", "stopping test", *[f"B={b}, ρ={par(rho)}" for b, rho in cfgs]],
            body,
        )
        blocks = [
            t,
            "Cells: time (ms, median) · steps (max over the batch) · time / ours, where ours is"
            " our solver of the same kind (Picard for fixed-point iterations and the bare loop,"
            " Anderson, Newton, Broyden).",
        ]
        if notes:
            blocks.append("\n".join(notes))
        title = f"Forward solves: `{problem}` problem, d = {dim}, tol {par(grp[0]['tol'])}"
        parts.append((f"{problem}-{dim}", _part(title, *blocks)))
    if d.get("per_iteration"):
        body = []
        for p in d["per_iteration"]:
            it = p["per_iter_s"]
            bare = it.get("bare-loop")
            body.append(
                [
                    p["config"],
                    us(it.get("ours-Picard")),
                    us(bare),
                    ratio(p["ratio"]),
                    *[
                        ratio(it[k] / bare) if k in it and bare else "—"
                        for k in ("optx-FPI", "jaxopt-FPI")
                    ],
                    p["steps"].get("ours-Picard", "—"),
                ]
            )
        t = table(
            [
                "configuration",
                "ours-Picard (µs/iter)",
                "bare loop (µs/iter)",
                "ours / bare",
                "optx-FPI / bare",
                "jaxopt-FPI / bare",
                "ours steps",
            ],
            body,
        )
        parts.append(
            (
                "per-iteration",
                _part("Picard time per iteration against a bare `lax.while_loop`", t),
            )
        )
    if d.get("one_state"):
        t = table(
            [
                "method",
                "stopping test",
                "steps",
                "time (ms)",
                "per step (µs)",
                "residual (float64)",
                "× ours-Anderson",
                "compile (s)",
            ],
            [
                [
                    r["method"],
                    r["norm"],
                    r["steps"],
                    ms(r["run_s"]),
                    us(r["per_step_s"]),
                    sig(r["residual"]),
                    ratio(r["time_vs_ours_anderson"]),
                    sig(r["compile_s"]),
                ]
                if not _why(r)
                else [r["method"], _why(r), *["—"] * 6]
                for r in d["one_state"]
            ],
        )
        parts.append(("one-state", _part("One large state (no vmap): time per solve", t)))
    return parts


# ------------------------------------------------------------------------ gradients


def _gradients(d: dict[str, Any]) -> Parts:
    rows = d["rows"]
    base = {
        r["n"]: r
        for r in rows
        if r["method"] == "ours Picard" and r["backward"].startswith("own GMRES") and "grad_s" in r
    }
    body = []
    for r in rows:
        why = _why(r)
        if why:
            body.append([r["n"], r["method"], r.get("backward", ""), why, *["—"] * 8])
            continue
        b = base.get(r["n"])
        body.append(
            [
                r["n"],
                r["method"],
                r["backward"],
                ms(r["grad_s"]),
                ratio(r["grad_s"] / b["grad_s"]) if b else "—",
                ms(r["fwd_s"]),
                ms(r["bwd_s"]),
                ms(r["vmap64_grad_s"]),
                ratio(r["vmap64_grad_s"] / b["vmap64_grad_s"]) if b else "—",
                sig(r["err_x"]),
                sig(r["err_w"]),
                sig(r["compile_s"]),
            ]
        )
    t = table(
        [
            "n",
            "method",
            "backward solve",
            "grad (ms)",
            "grad / ours default",
            "fwd (ms)",
            "bwd (ms)",
            "vmap 64 grad (ms)",
            "vmap / ours default",
            "err x",
            "err W",
            "compile (s)",
        ],
        body,
    )
    title = (
        f"Implicit gradients, {d['dtype']}, forward tol {par(d['tol'])}, ρ = {par(d['rho'])}"
        " (ours default: Picard + own GMRES)"
    )
    parts: Parts = [("gradients", _part(title, t))]
    if d.get("memory"):
        t = table(
            ["adjoint", "n", "forward steps", "XLA temp (KiB)", "grad (ms)"],
            [
                [
                    r["adjoint"],
                    r["n"],
                    r["steps_run"],
                    sig(r["temp_bytes"] / KIB),
                    ms(r["grad_s"]),
                ]
                for r in d["memory"]
            ],
        )
        parts.append(("memory", _part("Backward-pass memory against forward steps", t)))
    return parts


# --------------------------------------------------------------------------- graphs

GRAPH_MODELS = {
    "cgs": "CGS",
    "cgs-max": "CGS max-plus",
    "cgs-soft": "CGS smooth max-plus",
    "ignn": "IGNN",
    "gcn": "GCN",
    "gin": "GIN",
}


def _params(task: dict[str, Any]) -> Any:
    return task.get("params") or (task["runs"][0].get("params") if task.get("runs") else None)


def _graphs(d: dict[str, Any]) -> Parts:
    tasks = d["tasks"]
    seeds = len(d["args"]["seeds"])
    parts: Parts = []
    chains = {k: v for k, v in tasks.items() if k.startswith("chains-")}
    if chains:
        lengths = sorted({int(k.split("/")[0].split("-")[1]) for k in chains})
        models = list(dict.fromkeys(k.split("/")[1] for k in chains))
        body = []
        for m in models:
            cells = []
            for n in lengths:
                s = chains.get(f"chains-{n}/{m}", {}).get("summary", {})
                cells.append(pm(*s.get("test_accuracy", [None, None]), scale=100))
            steps = [
                chains[f"chains-{n}/{m}"]["summary"]["solver_steps"][0]
                for n in lengths
                if f"chains-{n}/{m}" in chains
            ]
            finite = [x for x in steps if not math.isnan(x)]
            body.append(
                [
                    GRAPH_MODELS.get(m, m),
                    _params(chains[f"chains-{lengths[0]}/{m}"]),
                    *cells,
                    f"{sig(min(finite))}–{sig(max(finite))}" if finite else "—",
                ]
            )
        t = table(
            ["model", "params", *[f"L = {n} (%)" for n in lengths], "solver steps (seed means)"],
            body,
        )
        title = f"Long-range chains: test accuracy, mean ± std over {seeds} seeds"
        parts.append(("chains", _part(title, t)))
    if d.get("scaling"):
        sizes = list(dict.fromkeys(r["n"] for r in d["scaling"]))
        by = {(r["n"], r["model"]): r for r in d["scaling"]}
        body = []
        for n in sizes:
            sp, de = by.get((n, "sparse")), by.get((n, "dense"))

            def t_(r: dict[str, Any] | None) -> str:
                if r is None:
                    return "—"
                return ms(r["time_s"]) if r.get("time_s") is not None else r.get("status", "—")

            body.append(
                [
                    n,
                    sp["edges"] if sp else "—",
                    mib(sp["mem_bytes"]) if sp else "—",
                    t_(sp),
                    mib(de["mem_bytes"]) if de else "—",
                    t_(de),
                    ratio(de["mem_bytes"] / sp["mem_bytes"]) if sp and de else "—",
                ]
            )
        t = table(
            [
                "N",
                "edges",
                "CGS memory (MiB)",
                "CGS fwd+bwd (ms)",
                "dense memory (MiB)",
                "dense fwd+bwd (ms)",
                "dense / CGS memory",
            ],
            body,
        )
        parts.append(("scaling", _part("`layers.CGS` against a dense `[heads, N, N]` version", t)))

    def per_model(prefix: str, cols: list[tuple[str, str, float]]) -> str:
        body = []
        for k, v in tasks.items():
            if not k.startswith(prefix + "/"):
                continue
            s = v["summary"]
            body.append(
                [
                    GRAPH_MODELS.get(k.split("/")[1], k.split("/")[1]),
                    _params(v),
                    *[pm(*s[key], scale=sc) for _, key, sc in cols],
                    pm(*s["solver_steps"]),
                    pm(*s["train_s"]),
                ]
            )
        return table(
            ["model", "params", *[h for h, _, _ in cols], "solver steps", "training (s)"], body
        )

    if any(k.startswith("gvi/") for k in tasks):
        t = per_model(
            "gvi",
            [
                ("policy acc. test (%)", "test_policy_accuracy", 100),
                ("policy acc. OOD (%)", "ood_policy_accuracy", 100),
                ("MAPE test (%)", "test_mape", 100),
                ("MAPE OOD (%)", "ood_mape", 100),
                ("MAE test", "test_mae", 1),
            ],
        )
        title = f"Graph value iteration, mean ± std over {seeds} seeds"
        parts.append(("gvi", _part(title, t)))
    if any(k.startswith("flow/") for k in tasks):
        t = per_model("flow", [("test MSE", "test_mse", 1)])
        title = f"Steady-state flow on pore networks, mean ± std over {seeds} seeds"
        parts.append(("flow", _part(title, t)))
    if any(k.startswith("classify/") for k in tasks):
        t = per_model("classify", [("test accuracy (%)", "test_accuracy", 100)])
        title = f"Graph classification, mean ± std over {seeds} seeds"
        parts.append(("classify", _part(title, t)))
    return parts


# ----------------------------------------------------------------------------- scan

SCAN_CELLS = {"gru": "GRU", "diag-gru": "diagonal GRU"}


def _scan(d: dict[str, Any]) -> Parts:
    rows = d["rows"]
    parts: Parts = []
    if d.get("targets"):
        t = table(
            ["target", "mode", "configuration", "need", "status", "speed-up", "error", "why"],
            [
                [
                    r["target"],
                    r["mode"],
                    r["config"],
                    r["need"],
                    r["status"],
                    ratio(r.get("speedup")),
                    sig(r.get("err")),
                    r.get("why", ""),
                ]
                for r in d["targets"]
            ],
        )
        title = f"Scan targets (GPU targets; this run: {d['device']['platform']})"
        parts.append(("targets", _part(title, t)))

    def key(r: dict[str, Any]) -> list[Any]:
        return [SCAN_CELLS.get(r["cell"], r["cell"]), r["solver"], r["d"], r["t"], r["b"]]

    ran = [r for r in rows if not _why(r) and "time_s" in r]
    scales = sorted({r["scale"] for r in ran})
    low = scales[0] if scales else None
    body = []
    for r in ran:
        if r["scale"] != low:
            continue
        body.append(
            [
                *key(r),
                r["mode"],
                ms(r["time_s"]),
                ms(r["ref_time_s"]),
                ratio(r["speedup"]),
                r.get("iters_max", "—") if r["mode"] == "fwd" else "—",
                r.get("result", "—") if r["mode"] == "fwd" else "—",
                sig(r["err"]),
            ]
        )
    t = table(
        [
            "cell",
            "solver",
            "D",
            "T",
            "batch",
            "mode",
            "fixpoint (ms)",
            "lax.scan (ms)",
            "speed-up",
            "iterations",
            "result",
            "error",
        ],
        body,
    )
    parts.append(
        (
            "contractive",
            _part(
                f"`fixpoint.scan` against `lax.scan`, recurrent scale {par(low)}"
                " (forward error: max abs; gradient error: relative)",
                t,
            ),
        )
    )
    hi = [r for r in ran if r["scale"] != low]
    if hi:
        t = table(
            ["cell", "solver", "D", "T", "batch", "scale", "iterations", "result", "error"],
            [
                [*key(r), par(r["scale"]), r.get("iters_max", "—"), r.get("result"), sig(r["err"])]
                for r in hi
            ],
        )
        parts.append(("chaotic", _part("Larger recurrent scales: iterations and result codes", t)))
    skipped = [r for r in rows if _why(r)]
    if skipped:
        t = table(
            ["cell", "solver", "D", "T", "batch", "scale", "mode", "why"],
            [[*key(r), par(r["scale"]), r["mode"], _why(r)] for r in skipped],
        )
        parts.append(("skipped", _part("Configurations not run, and why", t)))
    if d.get("peers"):
        body = []
        for r in d["peers"]:
            why = _why(r)
            if why or "time_s" not in r:
                body.append([r.get("library", ""), why or r.get("status", ""), *["—"] * 11])
                continue
            body.append(
                [
                    r["library"],
                    f"{SCAN_CELLS.get(r['cell'], r['cell'])} ({r['ours_solver']})",
                    r["d"],
                    r["t"],
                    r["b"],
                    r["variant"],
                    r["max_its"],
                    ms(r["time_s"]) + (" (warm-up call only)" if r.get("warmup_only") else ""),
                    ms(r.get("ours_time_s")),
                    ratio(r.get("time_vs_ours")),
                    sig(r["err"]),
                    sig(r.get("ours_err")),
                    r["ok"],
                ]
            )
        t = table(
            [
                "peer",
                "cell (our solver)",
                "D",
                "T",
                "batch",
                "variant",
                "iterations",
                "peer (ms)",
                "ours (ms)",
                "peer / ours",
                "peer error",
                "our error",
                "peer ok",
            ],
            body,
        )
        blocks = [t]
        if d.get("peer_note"):
            blocks.append(d["peer_note"])
        parts.append(("peers", _part("Peer: brainevent `parallel_rnn` on the same cells", *blocks)))
    return parts


def _scan_gradient_cost(d: dict[str, Any]) -> Parts:
    t = table(
        ["solver", "D", "T", "fwd (ms)", "fwd+grad (ms)", "fwd+grad / fwd"],
        [
            [r["solver"], r["D"], r["T"], ms(r["fwd_s"]), ms(r["fwd_grad_s"]), ratio(r["ratio"])]
            for r in d["rows"]
        ],
    )
    return [("cost", _part("`fixpoint.scan` forward+gradient against forward time (GRU)", t))]


def _scan_reference(d: dict[str, Any]) -> Parts:
    rows = d["rows"]
    t1 = table(
        [
            "D",
            "solver",
            "our iterations",
            "ours (ms)",
            "reference at our count (ms)",
            "ratio",
            "ref. iterations, same accuracy",
            "ratio, same accuracy",
            "ratio per Jacobian evaluation",
        ],
        [
            [
                r["d"],
                r["solver"],
                r["iterations"],
                ms(r["fixpoint_s"]),
                ms(r["reference_s"]),
                ratio(r["ratio"]),
                r["reference_same_accuracy_iterations"],
                ratio(r["ratio_same_accuracy"]),
                ratio(r.get("ratio_per_jacobian_evaluation")),
            ]
            for r in rows
        ],
    )
    t2 = table(
        [
            "D",
            "solver",
            "our error",
            "reference error (our count)",
            "float32 `lax.scan` error",
            "our memory (MiB)",
            "reference memory (MiB)",
        ],
        [
            [
                r["d"],
                r["solver"],
                sig(r["fixpoint_err"]),
                sig(r["reference_err"]),
                sig(r["lax_scan_float32_err"]),
                mib(r["fixpoint_mem"]),
                mib(r["reference_mem"]),
            ]
            for r in rows
        ],
    )
    tt = sorted({r["t"] for r in rows})
    title = f"DEER / QuasiDEER against minimal references, GRU, T = {', '.join(map(str, tt))}"
    return [
        ("time", _part(title + ": time (ratios: ours / reference)", t1)),
        ("accuracy", _part(title + ": error against float64 `lax.scan`, and memory", t2)),
    ]


def _scan_tolerance(d: dict[str, Any]) -> Parts:
    rows = d["rows"]
    tols = sorted({float(r["tol"]) for r in rows})
    groups = list(dict.fromkeys((r["D"], r["T"], r["scale"], r["solver"]) for r in rows))
    by = {(r["D"], r["T"], r["scale"], r["solver"], float(r["tol"])): r for r in rows}
    body = []
    for g in groups:
        cells = []
        floor = None
        for tol in tols:
            r = by.get((*g, tol))
            if r is None:
                cells.append("—")
                continue
            floor = r["lax_f32_vs_f64"]
            c = f"{r['iters']} · {sig(r['err_vs_f64'])}"
            cells.append(c if r["result"] == "successful" else f"{c} ({r['result']})")
        body.append([g[0], g[1], par(g[2]), g[3], *cells, sig(floor)])
    t = table(
        ["D", "T", "scale", "solver", *[f"tol {par(x)}" for x in tols], "float32 lax.scan error"],
        body,
    )
    return [
        (
            "tolerance",
            _part(
                "Scan tolerance in float32: iterations · max error against float64 `lax.scan`",
                t,
            ),
        )
    ]


# ------------------------------------------------------------------------- registry


def _lyapunov(d: dict[str, Any]) -> Parts:
    summary = d["summary"]
    solvers = list(dict.fromkeys(r["solver"] for r in summary))
    keys = list(dict.fromkeys((r["T"], r["scale"]) for r in summary))
    by = {(r["T"], r["scale"], r["solver"]): r for r in summary}
    body = []
    for t, scale in keys:
        first = by[(t, scale, solvers[0])]
        cells = []
        for name in solvers:
            r = by.get((t, scale, name))
            if r is None:
                cells.append("—")
                continue
            c = f"{sig(r['iters'])} · {ratio(r['time_over_lax_scan'])}"
            if r["successful"] < r["seqs"]:
                c += f" ({r['successful']}/{r['seqs']} converged)"
            cells.append(c)
        lle = pm(first["lle"], first["lle_error"])
        body.append(
            [
                t,
                par(scale),
                lle,
                sig(first["amplification"], 2),
                sig(first["lax_f32_vs_f64"], 2),
                *cells,
                ratio(first["lle_over_lax_scan"]),
            ]
        )
    seqs = max(r["seqs"] for r in summary)
    t = table(
        [
            "T",
            "scale",
            "LLE (nats/step)",
            "amplification",
            "float32 lax.scan error",
            *solvers,
            "estimate's time / lax.scan",
        ],
        body,
    )
    title = (
        f"Dense GRU (D = {d['settings']['d']}), recurrent weights × scale: the largest "
        "Lyapunov exponent and the amplification of `fp.lyapunov_estimate`, the largest "
        "error of float32 `lax.scan` against float64, then per solver iterations to "
        f"tolerance · time / `lax.scan` (medians over {seqs} input sequences; ± is the "
        "estimate's largest standard error)"
    )
    return [("table", _part(title, t))]


def _solvers(d: dict[str, Any]) -> Parts:
    steps = d["settings"]["steps"]
    residuals = table(
        ["map", "solver", "result", "steps", "last residual"],
        [
            [r["problem"], r["solver"], r["result"], r["steps"], sig(r["residual"], 2)]
            for r in d["residuals"]
        ],
    )
    budgets = d["settings"]["budgets"]
    detection = table(
        [
            "map",
            "fixed point?",
            "solver",
            "smallest budget reported `infeasible`",
            "error of ‖v‖ there",
        ],
        [
            [
                r["problem"],
                sig(r["has_fixed_point"]),
                r["solver"],
                sig(r["first_infeasible_budget"]) if r["first_infeasible_budget"] else "never",
                sig(r["displacement_norm_error"], 2),
            ]
            for r in d["infeasible"]
        ],
    )
    hard = table(
        ["problem", "start", "solver", "result", "steps", "root reached", "the path's root?"],
        [
            [
                r["problem"],
                "(" + ", ".join(par(x) for x in r["start"]) + ")",
                r["solver"],
                r["result"],
                r["steps"],
                "(" + ", ".join(sig(x, 4) for x in r["value"]) + ")",
                sig(r["reached_path_root"]) if r["path_root"] is not None else "no path",
            ]
            for r in d.get("homotopy", [])
        ],
    )
    sums = table(
        [
            "problem",
            "n",
            "solver",
            "result",
            "steps",
            "component evaluations",
            "÷ full batch",
            "time (ms)",
        ],
        [
            [
                r["problem"],
                r["n"],
                r["solver"],
                r["result"],
                r["steps"],
                r["component_evaluations"],
                ratio(r["evaluations_over_full_batch"]),
                ms(r["time_s"]),
            ]
            for r in d["finite_sum"]
        ],
    )
    return [
        (
            "residuals",
            _part(
                f"Nonexpansive maps with a fixed point: {steps} steps at tolerance 1e-12 "
                "(float64, max-norm)",
                residuals,
            ),
        ),
        (
            "infeasible",
            _part(
                "Detecting a map without a fixed point: the smallest step budget among "
                f"{', '.join(map(str, budgets))} whose result is `infeasible`, and the "
                "relative error of `‖stats['displacement']‖` against `‖v‖` there",
                detection,
            ),
        ),
        (
            "homotopy",
            _part(
                "Root problems from hard starts (`root_find`, tolerance 1e-10, 500 steps): "
                "the root reached, and whether it is the one the homotopy path from the "
                "start leads to (“no path”: the path meets a fold)",
                hard,
            ),
        ),
        (
            "finite-sum",
            _part(
                f"Finite sums at tolerance {par(d['settings']['tol'])} (max-norm, certified "
                "on the exact residual): component evaluations, and their ratio to the "
                "same solver without sampling (÷ full batch: VR-Halpern against Halpern); "
                "time is the median compiled solve",
                sums,
            ),
        ),
    ]


def _reversible(d: dict[str, Any]) -> Parts:
    acc = d["accuracy"]
    accuracy = table(
        [
            "ρ(W)",
            "β",
            "dtype",
            "tolerance",
            "steps N",
            "error vs unrolled",
            "error vs implicit (float64)",
            "drift / travelled",
            "refused (rtol = 1e-2)",
        ],
        [
            [
                par(r["rho"]),
                par(r["beta"]),
                r["dtype"],
                sig(r["tol"], 1),
                r["steps"],
                sig(r["error_vs_unrolled"], 2),
                sig(r["error_vs_implicit"], 2),
                sig(r["drift"], 2),
                "refused" if r["refused"] else "",
            ]
            for r in acc
        ],
    )
    cost = table(
        ["batch solved", "steps N", "adjoint", "temp memory (MiB)", "time (ms)", "compile"],
        [
            [
                r["form"],
                r["steps"],
                f"`{r['adjoint']}`",
                mib(r["temp_bytes"]),
                ms(r["time_s"]),
                f"{r['compile_s']:.1f} s",
            ]
            for r in d["cost"]
        ],
    )
    s = d["settings"]
    return [
        (
            "accuracy",
            _part(
                "`ReversibleAdjoint(None)` (unchecked) on `tanh(W z + U x)`, hidden 32: "
                "relative error of the gradient against `UnrolledAdjoint` of the same "
                "solver and dtype, and against `ImplicitAdjoint` in float64 (the fixed "
                "point's derivative: the forward tolerance dominates); the recovered "
                "start's drift relative to the distance travelled; whether the default "
                "check refuses the reversal",
                accuracy,
            ),
        ),
        (
            "cost",
            _part(
                f"One loss + gradient step (hidden {s['hidden']}, batch {s['batch']}, "
                "float32) through exactly N steps of `Reversible`: XLA's temp memory of "
                "the compiled step and its median time",
                cost,
            ),
        ),
    ]


def _games(d: dict[str, Any]) -> Parts:
    orders = table(
        [
            "K × N",
            "ρ(S)",
            "order",
            "form",
            "result",
            "sweeps",
            "water-fillings",
            "max difference",
            "time (ms)",
        ],
        [
            [
                f"{r['users']} × {r['channels']}",
                sig(r["spectral_radius"], 2),
                r["order"],
                r["form"],
                r["result"],
                r["sweeps"],
                r["water_fillings"],
                sig(r["difference"], 1),
                ms(r["time_s"]),
            ]
            for r in d["orders"]
        ],
    )
    cert = table(
        [
            "cross gain",
            "ρ(S) < 1",
            "certified",
            "damped (η = step size) converged",
            "undamped simultaneous converged",
            "undamped sequential converged",
        ],
        [
            [
                par(r["cross"]),
                f"{r['contracting']}/{r['games']}",
                f"{r['certified']}/{r['games']}",
                f"{r['damped_converged']}/{r['certified']}",
                f"{r['simultaneous_converged']}/{r['games']}",
                f"{r['sequential_converged']}/{r['games']}",
            ]
            for r in d["certificate"]
        ],
    )
    return [
        (
            "orders",
            _part(
                "Random water-filling games (cross gain 0.05, tolerance 1e-10): sweeps, "
                "water-fillings (per-user best responses computed), largest difference "
                "from the simultaneous equilibrium, median compiled solve",
                orders,
            ),
        ),
        (
            "certificate",
            _part(
                f"{d['settings']['games']} random games (K = 4, N = 8) per cross gain: "
                "Scutari et al.'s condition ρ(S) < 1, the small-gain certificate on the "
                "global constants, and convergence within 500 sweeps (5000 damped)",
                cert,
            ),
        ),
    ]


def _pm(mean: Any, std: Any, n: int = 3) -> str:
    return f"{sig(mean, n)} ± {sig(std, 1)}"


def _equilibrium_layers(d: dict[str, Any]) -> Parts:
    out: Parts = []
    if "scaling" in d:
        rows = [
            [
                par(r["scale"]),
                r["layer"],
                f"{r['converged']:.2f}",
                f"{r['mean_steps']:.1f}",
                sig(r["spread"], 2) if r["spread"] is not None else "none converged",
                sig(r["error_bound"], 2) if r["error_bound"] is not None else "",
            ]
            for r in d["scaling"]
        ]
        out.append(
            (
                "scaling",
                _part(
                    "One random layer (64 → 64), its recurrent weight times the scale; 64 "
                    "digit images × 4 random starts, tolerance 1e-5 (on Thompson's distance for "
                    "the subhomogeneous layer), 200 steps. Spread: "
                    "the largest difference between answers from different starts "
                    "(max-norm for the DEQ, Thompson's metric for the subhomogeneous "
                    "one); bound: the largest `error_bound`",
                    table(
                        ["scale", "layer", "converged", "mean steps", "spread", "bound"],
                        rows,
                    ),
                ),
            )
        )
    if "digits" in d:
        dig = d["digits"]
        rows = [
            [
                r["layer"],
                _pm(r["test_acc"], r["test_acc_std"]),
                _pm(r["test_steps"], r["test_steps_std"]),
                f"{r['converged']:.3f}",
                f"{r['train_s']:.0f}",
            ]
            for r in dig["summary"]
        ]
        out.append(
            (
                "digits",
                _part(
                    f"Digits (1,437 train / 360 test), {dig['summary'][0]['seeds']} seeds × "
                    f"{dig['epochs']} epochs, 64 hidden units, layer norm + linear head: "
                    "mean ± std over seeds",
                    table(
                        [
                            "layer",
                            "test accuracy",
                            "solver steps (test)",
                            "converged",
                            "training (s)",
                        ],
                        rows,
                    ),
                ),
            )
        )
    if "completion" in d:
        comp = d["completion"]
        rows = []
        for r in comp["summary"]:
            if r["model"] == "monotone":
                note = f"{r['mean_steps']:.0f} PR steps, {r['converged']:.3f} converged"
            elif r["model"] == "plain":
                note = f"{r['unsettled']:.3f} unsettled after 300 iterations"
            else:
                note = ""
            rows.append(
                [
                    {"monotone": "MonotoneDBM", "plain": "plain BM", "prior": "pixel prior"}[
                        r["model"]
                    ],
                    r["half"],
                    _pm(r["mae"], r["mae_std"]),
                    _pm(r["acc"], r["acc_std"]),
                    sig(r["spread"], 2) if "spread" in r else "",
                    note,
                ]
            )
        out.append(
            (
                "completion",
                _part(
                    f"Digit completion, {comp['epochs']} epochs, mean ± std over seeds: "
                    "mean absolute error of the expected intensity and accuracy of the "
                    "most likely of 4 levels on the hidden half; spread: the largest "
                    "difference between marginals from 5 random starts",
                    table(
                        [
                            "model",
                            "hidden half",
                            "intensity MAE",
                            "level accuracy",
                            "spread over starts",
                            "inference",
                        ],
                        rows,
                    ),
                ),
            )
        )
        sweeps = [
            (r["seed"], r["half"], a)
            for r in comp["runs"]
            if r["model"] == "monotone"
            for a in r.get("alpha_sweep", [])
        ]
        if sweeps:
            rows = [
                [
                    str(seed),
                    half,
                    par(a["alpha"]),
                    f"{a['mean_steps']:.1f}",
                    f"{a['converged']:.3f}",
                    ms(a["time_s"]),
                ]
                for seed, half, a in sweeps
                if seed == 0
            ]
            out.append(
                (
                    "alpha",
                    _part(
                        "Peaceman–Rachford's step α on the trained MonotoneDBM (seed 0, "
                        "360 test images, tolerance 1e-4): mean steps and the time of "
                        "the batch's solve",
                        table(
                            ["seed", "hidden half", "α", "mean steps", "converged", "time (ms)"],
                            rows,
                        ),
                    ),
                )
            )
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _state_tracking(d: dict[str, Any]) -> Parts:
    results = d["results"]
    length = d["settings"]["length"]
    lengths = [length, 2 * length, 4 * length]
    out: Parts = []
    for group in dict.fromkeys(r["group"] for r in results):
        base = next(
            (r["timing"] for r in results if r["group"] == group and r["model"] == "diagonal"),
            None,
        )
        rows = []
        for kind in dict.fromkeys(r["model"] for r in results if r["group"] == group):
            runs = [r for r in results if r["group"] == group and r["model"] == kind]
            acc = [[r["test"][str(n)]["accuracy"] for r in runs] for n in lengths]
            timed = next(r["timing"] for r in runs if "timing" in r)
            test_its = [r["test"][str(length)]["iterations_mean"] for r in runs]
            converged = min(r["test"][str(n)]["converged"] for r in runs for n in lengths)
            rows.append(
                [
                    kind,
                    runs[0]["params"],
                    *(_pm(_mean(a), _std(a)) for a in acc),
                    "–" if kind == "diagonal" else f"{_mean(test_its):.1f}",
                    "–" if kind == "diagonal" else f"{converged:.3f}",
                    f"{_mean([r['masked_fraction'] for r in runs]):.3f}",
                    ms(timed["forward_backward_ms"] / 1e3),
                    ratio(timed["forward_backward_ms"] / base["forward_backward_ms"])
                    if base
                    else "",
                ]
            )
        out.append(
            (
                group,
                _part(
                    f"The {group} word problem: {len(runs)} seed(s), {runs[0]['steps']} training "
                    f"steps of {d['settings']['batch']} words of length {length}; per-token "
                    "accuracy on 1,024 test words per length (mean ± std over seeds). "
                    f"Iterations: mean depth iterations per sequence at length {length}; "
                    "converged: the smallest fraction of test solves that converged at any "
                    "length; masked: the fraction of training sequences masked out of the "
                    "loss because their solve failed; time: forward + backward of one "
                    "training batch, and its ratio to the diagonal layer",
                    table(
                        ["model", "params"]
                        + [f"acc @ {n}" for n in lengths]
                        + ["iterations", "converged", "masked", "fwd+bwd", "vs diagonal"],
                        rows,
                    ),
                ),
            )
        )
    return out


RENDERERS: dict[str, Callable[[dict[str, Any]], Parts]] = {
    "batch_cpu": _batch,
    "batch_overhead_cpu": _batch,
    "batch_stragglers_cpu": _batch,
    "decode_cpu": _decode,
    "deq_memory": _deq_memory,
    "deq_training_digits-mlp": _deq_training,
    "deq_training_digits-mondeq": _deq_training,
    "deq_training_mnist1d-convmondeq": _deq_training,
    "deq_training_peers_digits-mlp": _deq_peers,
    "diffusion_cpu": _diffusion,
    "eager_cpu": _eager,
    "fixed_point_cpu": _fixed_point,
    "fixed_point_one_state_cpu": _fixed_point,
    "fixed_point_peers_py312_cpu": _fixed_point,
    "gradients_cpu": _gradients,
    "gradients_n1024_cpu": _gradients,
    "gradients_x64_cpu": _gradients,
    "graphs_chains_cpu": _graphs,
    "graphs_flow_classify_cpu": _graphs,
    "graphs_gvi_cpu": _graphs,
    "scan_cpu": _scan,
    "scan_gradient_cost_cpu": _scan_gradient_cost,
    "scan_peers_cpu": _scan,
    "scan_reference_cpu": _scan_reference,
    "scan_tolerance": _scan_tolerance,
    "lyapunov_cpu": _lyapunov,
    "solvers_cpu": _solvers,
    "reversible_cpu": _reversible,
    "games_cpu": _games,
    "equilibrium_layers_cpu": _equilibrium_layers,
    "state_tracking_cpu": _state_tracking,
}


def load(name: str) -> dict[str, Any]:
    """The parsed results file `bench/results/{name}.json` (ValueError if missing)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no results file {path}")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def parts(name: str) -> Parts:
    """The (section, markdown) parts of one results file, without the caption."""
    if name not in RENDERERS or name not in COMMANDS:
        raise ValueError(f"no renderer for results file {name!r}")
    return RENDERERS[name](load(name))


def render(name: str, section: str | None = None) -> str:
    """Markdown for `bench/results/{name}.json` (or one section of it), with its caption.

    `name` may also be given as `"NAME SECTION"`. Raises `ValueError` for an unknown name or
    section or a missing file.
    """
    if section is None and " " in name.strip():
        name, section = name.split(None, 1)
    ps = parts(name)
    if section is not None:
        ps = [p for p in ps if p[0] == section]
        if not ps:
            raise ValueError(f"no section {section!r} in {name!r}")
    return "\n\n".join([*(body for _, body in ps), caption(name, load(name))])


def names() -> list[str]:
    """Every renderable marker argument: each `NAME`, then each `NAME SECTION`."""
    out = []
    for name in sorted(RENDERERS):
        if not (RESULTS / f"{name}.json").is_file():
            continue
        out.append(name)
        out += [f"{name} {s}" for s, _ in parts(name)]
    return out


def expand(markdown: str) -> str:
    """Replace every line that is exactly a `<!-- bench: NAME [SECTION] -->` marker.

    Raises `ValueError` naming the marker when it cannot be rendered (unknown name or
    section, missing file) or is malformed.
    """
    out = []
    for line in markdown.split("\n"):
        text = line.strip()
        if not text.startswith("<!--") or not re.match(r"<!--\s*bench:", text):
            out.append(line)
            continue
        m = MARKER.fullmatch(text)
        if not m:
            raise ValueError(f"malformed benchmark marker {text!r}")
        try:
            out.append(render(m["name"], m["section"]))
        except ValueError as e:
            raise ValueError(f"benchmark marker {text!r}: {e}") from e
    return "\n".join(out)


if __name__ == "__main__":
    for name in sorted(RENDERERS):
        print(f"## {name}\n")
        print(render(name))
        print()
