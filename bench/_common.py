"""Shared helpers for the benchmark scripts: timing, problems, tables, JSON output."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
import numpy as np

# `FIXPOINT_BENCH_RESULTS` redirects every script's JSON (bench/gpu.py sets it per run).
RESULTS_DIR = Path(
    os.environ.get("FIXPOINT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)


class Timing:
    """Compile time, steady-state run times and the output of one jitted function."""

    def __init__(self, compile_s: float, first_s: float, times: list[float], out):
        self.compile_s = compile_s
        self.first_s = first_s
        self.times = times
        self.out = out

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)


def time_jitted(
    fn, *args, reps: int = 5, guard_s: float = 30.0, min_total_s: float = 0.2, max_reps: int = 100
) -> Timing:
    """Time `jax.jit(fn)(*args)`.

    Compilation (tracing + lowering + XLA compile, `lower(...).compile()`) is timed on
    its own. The first call of the compiled executable is a warm-up and is excluded.
    Then calls are timed, each ended with `jax.block_until_ready`: `reps` of them, more
    (up to `max_reps`) for fast calls until about `min_total_s` seconds are covered, and
    fewer (at least one) once the timed calls have used up `guard_s` seconds.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first_s = time.perf_counter() - t0
    times: list[float] = []
    while True:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        typical = max(statistics.median(times), 1e-9)
        target = max(reps, min(max_reps, int(min_total_s / typical)))
        if len(times) >= target or sum(times) >= guard_s:
            break
    return Timing(compile_s, first_s, times, out)


def memory_of(compiled) -> dict:
    """`compiled.memory_analysis()` as a dict of byte counts, with `total` = temp +
    argument + output - alias bytes."""
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # not every backend implements it
        return {"error": short_error(e)}
    if m is None:
        return {}
    out = {}
    for name in (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
        "peak_memory_in_bytes",
    ):
        value = getattr(m, name, None)
        if value is not None:
            out[name.removesuffix("_in_bytes")] = int(value)
    parts = ("temp_size", "argument_size", "output_size")
    if all(p in out for p in parts):
        out["total"] = sum(out[p] for p in parts) - out.get("alias_size", 0)
    return out


def short_error(e: Exception, limit: int = 300) -> str:
    """A one-line description of an exception (for errors raised inside callbacks, the
    original exception's line, not the runtime's wrapper)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error:" in ln or "Exception:" in ln:
            return ln[:limit]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


def symmetric_contraction(rng: np.random.Generator, d: int, rho: float) -> np.ndarray:
    """A random symmetric (GOE) matrix scaled so that its spectral norm is `rho`.

    For a symmetric matrix the spectral norm equals the spectral radius, so `z -> W z + c`
    is a contraction with rate exactly `rho`, and `z -> tanh(W z + c)` one with rate at
    most `rho` (`|tanh'| <= 1`).
    """
    a = rng.standard_normal((d, d))
    s = (a + a.T) / 2
    return rho * s / np.linalg.norm(s, 2)


def spread_spectrum(rng: np.random.Generator, d: int, top: float) -> np.ndarray:
    """A symmetric matrix `Q diag(λ) Qᵀ` with `λ` evenly spread over `[0, top]`."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.linspace(0.0, top, d)
    return (q * lam) @ q.T


def import_peer(name: str):
    """`(module, None)`, or `(None, why not)` where the peer cannot be imported (the GPU
    machine lacks jaxopt, say): its rows then say why, and the script runs on."""
    import importlib

    try:
        return importlib.import_module(name), None
    except Exception as e:  # a missing peer is a row in the table, not a crash
        return None, f"unavailable ({type(e).__name__}: {e})"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    peers = ("optimistix", "jaxopt", "banax", "brainevent")
    for pkg in ("jax", "jaxlib", "equinox", "lineax", *peers, "fixpoint-jax"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "n/a"
    return out


def git_state() -> dict[str, str]:
    """The library's commit and whether the working tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "fixpoint", "solvers"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return {"commit": "unknown", "library_dirty": "unknown"}
    return {"commit": head, "library_dirty": str(bool(dirty))}


def device_info() -> dict[str, str]:
    dev = jax.devices()[0]
    return {
        "platform": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": str(jax.device_count()),
        "host": platform.machine(),
        "host_cpus": str(os.cpu_count()),
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}_{jax.default_backend()}.json"
    write_text_atomic(path, json.dumps(payload, indent=1, default=_jsonable))
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a run stopped mid-write leaves the last copy)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def fmt_time(s: float | None) -> str:
    """Seconds as a short human string (µs / ms / s)."""
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-4:
        return f"{s * 1e6:.2f}µs" if s < 1e-5 else f"{s * 1e6:.1f}µs"
    if s < 1e-3:
        return f"{s * 1e6:.0f}µs"
    if s < 1:
        return f"{s * 1e3:.2f}ms" if s < 0.1 else f"{s * 1e3:.0f}ms"
    return f"{s:.2f}s"


def fmt_sci(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.1e}"


def print_table(
    headers: list[str], rows: list[list[str]], title: str | None = None, left=(0, 1)
) -> None:
    """A plain fixed-width table: the columns in `left` left-aligned, the rest right."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells):
        parts = []
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
            parts.append(c.ljust(w) if i in left else c.rjust(w))
        return "  ".join(parts).rstrip()

    if title:
        print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
