"""Every GPU measurement of the benchmarks in one short run (at most 6 minutes), as JSON.

One command runs the parts below, most important first, each in its own Python
process (so that a part's JAX flags, say `jax_enable_x64` in `bench/diffusion.py`,
its memory and a crash stay its own) under a time budget of its own and within
`--budget` seconds in all. A part that would start with less than 10 s left, or that
does not apply (one device), is skipped and says why; a part still running at the
end of its budget is stopped and keeps what it wrote so far (every script rewrites its
JSON as it goes, `"complete": false` until the end). Every process runs with
`JAX_DEFAULT_MATMUL_PRECISION=highest` (JAX's default, TF32-like on an H100, made DEER
never converge there), float32.

Parts, in order, with their budgets on a GPU (each `--tiny` part: 60 s at most):

- `checks` (35 s): versions and devices; the matmul precision: the config in force,
  every `dot_general` of a lowered DEER / QuasiDEER / ELK solve at `HIGHEST`, a float32
  matmul's error against float64 under `default` and `highest`; every scan solver
  (DEER, QuasiDEER, ELK, Jacobi, GaussSeidel, PicardSum, Sequential on a dense GRU,
  D = 16; exact diagonal QuasiDEER on a diagonal GRU, D = 64; T = 1e4) against
  `lax.scan` at float32: error <= 1e-4 and converged; DEER under `default` precision as
  a control (recorded, not required).
- `scan` (125 s): `bench/scan.py --targets`: the diagonal GRU (exact diagonal
  QuasiDEER) at T = 1e5, D = 64, batch 1 and 16; DEER on the dense GRU at T = 1e6,
  D = 16; QuasiDEER on the dense GRU at T = 1e5, D = 64; forward and forward+gradient
  against `lax.scan`, and the target table.
- `decode` (45 s): `bench/decode.py`: sequential against Jacobi and lookahead (windows
  16 and 32) on the cached path, batch 1 and 8: the consistency-trained model, then the
  AR model, where their weights are cached in `bench/models/` (carried to the device),
  else the untrained model, labelled `untrained` (training takes minutes, not seconds).
- `batch` (35 s): `bench/batch.py`: stragglers (Picard, d = 1024, batch 1024, with and
  without compaction), a DEQ / MonDEQ training epoch on digits, the loop's overhead.
- `fixed_point` (25 s): `bench/fixed_point.py --full` at d = 1024, batch 1024 (rho 0.9,
  then 0.99) against the peers present, then the one-state problem (64 x 256).
- `gradients` (25 s): `bench/gradients.py`: implicit gradients at n = 4096 (one sample,
  and vmap over 64).
- `diffusion` (20 s): `bench/diffusion.py`, the sampling bench (probability-flow ODE,
  D = 64, T = 1e4): every scan solver's iterations and time against `lax.scan`.
- `data_parallel` (15 s): training-step throughput of a DEQ through
  `fixpoint.data_parallel` against the device count (1, 2, 4, ...); skipped, saying so,
  with one device (`--tiny`: two forced CPU devices).
- `profile` (20 s): a `jax.profiler` trace of one forward call of each scan target
  (DEER T = 1e6, QuasiDEER T = 1e5, diagonal batch 16), tarred.

A part's budget grows by what the parts before it left unused.

Written under `--out` (default `$OUT` where set, else `bench/results/gpu/`;
`bench/results/gpu_tiny/` with `--tiny`): `gpu.json` (rewritten after every part:
versions, devices, each part's status, time, command and JSON, the checks and the scan
target table), `gpu_logs.tar` (each part's log and JSON) and `gpu_profile.tgz`; no more
than 8 files, two folders down at most (what the device tool sends back). The exit
status is 1 when a check failed or a part failed, else 0.

On the device machine (no package registry; its `python3` has JAX and most
dependencies; 15 minutes of device time in all, start-up included; a call that comes
more than 30 s after the last starts a fresh, bare machine, so every call installs):

1. Probe, with a short timeout (`timeout_s` 120):
   `python3 -m pip install -q --no-deps --no-build-isolation -e . ; python3 bench/gpu.py --probe`
   It prints the Python, the versions of jax, jaxlib, equinox, lineax, optax, chex,
   jaxtyping (core: against the minimum versions of pyproject.toml), of the peers
   (optimistix, jaxopt, banax, brainevent) and of setuptools, which of them import, the
   devices, the matmul precision, and where `fixpoint` is imported from. The
   one-namespace layout (`fixpoint.solvers` is the folder `solvers/`) needs the install;
   `--no-build-isolation` builds with the machine's setuptools, which must be >= 77
   (pyproject's license fields; 65.5 fails to build the metadata).
2. Here, only if the probe shows a core dependency missing or too old, or setuptools
   too old: download its pure-Python wheel into `.whl/` (in .gitignore: never
   committed), e.g. `python3 -m pip download --no-deps --only-binary=:all:
   --python-version 3.12 -d .whl "setuptools>=77" equinox==0.13.8`, and name `.whl` in
   the run's `carry`; the run installs them into /tmp/site, on `PYTHONPATH` (the build
   then finds that setuptools: checked here with 65.5 installed and 84.2 carried). A
   missing *peer* (jaxopt, banax, brainevent) is never installed: its rows say
   "unavailable".
3. The run, right after the probe (while the machine is warm), `timeout_s` 400 (the
   330 s budget, the install and start-up); `carry` `.whl` if step 2 made it, and
   `bench/models` where the decoding models were trained here (`python bench/decode.py`,
   about 12 minutes on 2 CPU cores; ignored by git):
   `export PYTHONUNBUFFERED=1; if [ -d .whl ]; then python3 -m pip install -q --no-index
   --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
   fi; python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 bench/gpu.py`
   Then copy the files that come back from `$OUT` into `bench/results/gpu/`. That
   leaves room for one rerun of what failed or was cut short:
   `... && python3 bench/gpu.py --parts scan decode --budget 200` (`timeout_s` 260).

`--tiny` runs the same parts end to end on the CPU at tiny sizes in under 2 minutes
(`tests/test_gpu_script.py` runs it); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ERR_TARGET = 1e-4
MIN_PART_S = 10.0
CORE = ("jax", "jaxlib", "equinox", "lineax", "optax", "chex", "jaxtyping")
PEERS = ("optimistix", "jaxopt", "banax", "brainevent")
OTHER = ("numpy", "scikit-learn", "tqdm", "setuptools", "pip", "fixpoint-jax")
MODULE = {"scikit-learn": "sklearn", "fixpoint-jax": "fixpoint"}
TINY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ------------------------------------------------------------------------------ probe


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _minimums() -> dict[str, str]:
    """`{name: minimum version}` of the core dependencies in pyproject.toml."""
    try:
        import tomllib

        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    except Exception:  # no pyproject beside us, or Python < 3.11
        return {}
    out = {}
    for dep in deps:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", dep)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _at_least(have: str, need: str) -> bool:
    def key(v):
        return tuple(int(x) for x in re.findall(r"\d+", v)[:3])

    return key(have) >= key(need)


def probe() -> dict:
    """Versions, which packages import, the devices; a few seconds."""
    t0 = time.perf_counter()
    out: dict = {"python": platform.python_version(), "executable": sys.executable}
    out["machine"] = platform.machine()
    minimums = _minimums()
    packages = {}
    for dist in (*CORE, *PEERS, *OTHER):
        have = _version(dist)
        row: dict = {"version": have}
        if dist in CORE:
            row["kind"] = "core"
            need = minimums.get(dist)
            if need:
                row["needs"] = f">={need}"
                row["ok"] = have is not None and _at_least(have, need)
        elif dist in PEERS:
            row["kind"] = "peer"
        elif dist == "setuptools":  # builds the editable install without isolation
            row["needs"] = ">=77"
            row["ok"] = have is not None and _at_least(have, "77")
        module = MODULE.get(dist, dist)
        if dist not in ("setuptools", "pip"):
            try:
                __import__(module)
                row["imports"] = True
            except Exception as e:
                row["imports"] = False
                row["error"] = f"{type(e).__name__}: {e}"[:200]
        packages[dist] = row
    out["packages"] = packages
    try:
        import fixpoint
        from fixpoint import solvers

        out["fixpoint_from"] = str(Path(fixpoint.__file__).parent)
        out["fixpoint_solvers_from"] = str(Path(solvers.__file__).parent)
    except Exception as e:
        out["fixpoint_from"] = f"not importable ({type(e).__name__}: {e})"
    try:
        import jax

        out["backend"] = jax.default_backend()
        out["devices"] = [str(d) for d in jax.devices()]
        out["device_kind"] = jax.devices()[0].device_kind
        out["matmul_precision"] = jax.config.jax_default_matmul_precision
        try:
            out["bytes_limit"] = jax.devices()[0].memory_stats()["bytes_limit"]
        except Exception:  # not every backend reports memory
            pass
    except Exception as e:
        out["devices"] = f"jax unusable ({type(e).__name__}: {e})"
    out["missing_core"] = [d for d in CORE if not packages[d].get("imports")]
    out["too_old_core"] = [d for d in CORE if packages[d].get("ok") is False]
    out["missing_peers"] = [d for d in PEERS if not packages[d].get("imports")]
    out["probe_s"] = time.perf_counter() - t0
    return out


def print_probe(p: dict) -> None:
    print(f"python {p['python']} ({p['executable']}, {p['machine']})")
    for dist, row in p["packages"].items():
        need = (
            f" (needs {row['needs']}: {'ok' if row['ok'] else 'TOO OLD'})" if "needs" in row else ""
        )
        imp = {True: "imports", False: f"does NOT import: {row.get('error')}", None: ""}[
            row.get("imports")
        ]
        print(f"  {dist:14s} {row['version'] or 'not installed':12s}{need} {imp}")
    print(f"fixpoint from: {p.get('fixpoint_from')}")
    print(f"devices: {p.get('devices')} ({p.get('device_kind', '?')}), backend {p.get('backend')}")
    prec = p.get("matmul_precision")
    hint = " (JAX's default; every part of the run sets 'highest')" if prec is None else ""
    print(f"matmul precision in force: {prec!r}{hint}")
    print(f"missing core: {p['missing_core'] or 'none'}; too old: {p['too_old_core'] or 'none'}")
    print(f"missing peers (dropped, never installed): {p['missing_peers'] or 'none'}")
    print(f"({p['probe_s']:.1f}s)")


# ------------------------------------------------------------------------------ parts


@dataclass
class Ctx:
    tiny: bool
    work: Path  # the parts' JSON and logs
    out: Path
    device_count: int | None = None

    def self_argv(self, part: str) -> list[str]:
        argv = [sys.executable, str(Path(__file__).resolve()), "--part", part]
        argv += ["--json", str(self.work / f"{part}.json"), "--out", str(self.out)]
        return argv + (["--tiny"] if self.tiny else [])


def _script(name: str) -> list[str]:
    return [sys.executable, str(HERE / name)]


def scan_argv(c: Ctx):
    argv = [*_script("scan.py"), "--out", str(c.work / "scan.json")]
    if c.tiny:
        return argv + ["--tiny", "--guard", "0.05", "--reps", "1"]
    # lax.scan of the dense GRU at T = 1e6 takes seconds a call: one call of each
    # reference once the warm-up alone is over the guard.
    return argv + ["--targets", "--guard", "3", "--reps", "5", "--max-ref-s", "60"]


def decode_weights() -> tuple[str, str]:
    """`(--weights, why)`: the cached models where their weights travelled, else untrained."""
    models = HERE / "models"
    names = ("char_transformer", "char_transformer_cllm")
    files = [models / f"{n}{ext}" for n in names for ext in (".eqx", ".json")]
    if all(f.exists() for f in files):
        return "cached", "the cached AR and consistency-trained weights (bench/models/)"
    return "untrained", (
        "no cached weights in bench/models/ (training takes minutes, not seconds): the "
        "untrained model, labelled 'untrained'"
    )


def decode_argv(c: Ctx):
    argv = [*_script("decode.py"), "--paths", "cached", "--solvers", "jacobi", "lookahead"]
    if c.tiny:
        argv += ["--weights", "untrained", "--windows", "4", "--batches", "2"]
        return argv + ["--prompts", "2", "--new-tokens", "16", "--prompt-len", "8", "--reps", "1"]
    weights, _ = decode_weights()
    argv += ["--weights", weights, "--windows", "16", "32", "--batches", "1", "8", "--reps", "3"]
    return argv + ["--models", "cllm", "ar"]


def batch_argv(c: Ctx):
    argv = [*_script("batch.py"), "--keep-going"]
    if c.tiny:
        argv += ["--part", "stragglers", "overhead"]
        return argv + ["--d", "16", "--batch", "8", "--rounds", "1"]
    argv += ["--part", "stragglers", "epoch", "overhead", "--d", "1024", "--batch", "1024"]
    return argv + ["--rounds", "5", "--epochs", "3"]


def fixed_point_argv(c: Ctx):
    argv = _script("fixed_point.py")
    if c.tiny:
        argv += ["--configs", "deq d=64 B=1 rho=0.99", "--reps", "1", "--guard", "0.1"]
        return argv + ["--methods", "ours-Anderson,optx-FPI,bare-loop"]
    return argv + ["--full", "--configs", "deq d=1024 B=1024", "--guard", "3", "--reps", "3"]


def gradients_argv(c: Ctx):
    argv = _script("gradients.py")
    if c.tiny:
        argv += ["--sizes", "16", "--mem-n", "0", "--reps", "1", "--guard", "0.1"]
        return argv + ["--methods", "ours Picard own"]
    return argv + ["--sizes", "4096", "--mem-n", "0", "--guard", "3"]


def diffusion_argv(c: Ctx):
    argv = _script("diffusion.py")
    if c.tiny:
        argv += ["--dims", "4", "--steps", "50", "--reps", "1"]
        return argv + ["--solvers", "PicardSum", "DEER"]
    return argv + ["--dims", "64", "--steps", "10000"]


def data_parallel_argv(c: Ctx):
    if not c.tiny and c.device_count is not None and c.device_count < 2:
        return f"{c.device_count} device: data-parallel throughput needs at least 2"
    return c.self_argv("data_parallel")


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float
    argv: Callable[[Ctx], list[str] | str]  # the command, or why the part is skipped
    result: str  # the JSON it writes in the work folder (a glob)


PARTS = [
    Part("checks", 35, lambda c: c.self_argv("checks"), "checks.json"),
    Part("scan", 125, scan_argv, "scan.json"),
    Part("decode", 45, decode_argv, "decode_*.json"),
    Part("batch", 35, batch_argv, "batch_*.json"),
    Part("fixed_point", 25, fixed_point_argv, "fixed_point_*.json"),
    Part("gradients", 25, gradients_argv, "gradients_*.json"),
    Part("diffusion", 20, diffusion_argv, "diffusion_*.json"),
    Part("data_parallel", 15, data_parallel_argv, "data_parallel.json"),
    Part("profile", 20, lambda c: c.self_argv("profile"), "profile.json"),
]
TINY_PART_S = 60.0


def part_env(c: Ctx, part: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FIXPOINT_BENCH_RESULTS=str(c.work),
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
    )
    if c.tiny:
        env["JAX_PLATFORMS"] = "cpu"
        flags = TINY_XLA_FLAGS
        if part == "data_parallel":
            flags += " --xla_force_host_platform_device_count=2"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    return env


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _error_line(log: str) -> str:
    for line in reversed(log.splitlines()):
        if re.search(r"(Error|Exception|error:)", line):
            return line.strip()[:300]
    return (log.splitlines() or ["no output"])[-1][:300]


def run_part(part: Part, c: Ctx, remaining: float, banked: float) -> dict:
    """Run one part within its budget plus what earlier parts left unused (`banked`),
    and within the `remaining` seconds of the whole run."""
    budget = TINY_PART_S if c.tiny else part.budget_s
    rec: dict = {"budget_s": budget, "banked_s": banked}
    argv = part.argv(c)
    if isinstance(argv, str):
        return {**rec, "status": "skipped", "reason": argv}
    rec["command"] = [Path(a).name if a == sys.executable else a for a in argv]
    timeout = min(budget + banked, remaining)
    if timeout < MIN_PART_S:
        why = f"time budget spent: {max(remaining, 0):.0f}s of --budget left (< {MIN_PART_S:g}s)"
        return {**rec, "status": "skipped", "reason": why}
    log = c.work / f"{part.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=part_env(c, part.name),
            cwd=ROOT,
            start_new_session=True,  # its own process group: stopped whole at the budget
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    rec["seconds"] = time.perf_counter() - t0
    found = sorted(c.work.glob(part.result))
    try:
        rec["result"] = json.loads(found[0].read_text()) if found else None
    except (OSError, ValueError) as e:  # not expected: the parts write whole files
        rec["result"] = None
        rec["result_error"] = f"{type(e).__name__}: {e}"
    if rc is None:
        rec.update(status="timeout", reason=f"stopped at its budget of {timeout:.0f}s")
    elif rc == 0 and found:
        rec["status"] = "ran"
        if isinstance(rec["result"], dict) and rec["result"].get("status") == "skipped":
            rec.update(status="skipped", reason=rec["result"].get("reason"))
    else:
        why = f"exit status {rc}: {_error_line(_tail(log, 40))}" if rc else "no JSON written"
        rec.update(status="failed", reason=why, log_tail=_tail(log))
    return rec


# ----------------------------------------------------------------------------- checks


def derived_checks(parts: dict) -> list[dict]:
    """The checks read off the parts' JSON: the checks part's own, the scan targets'
    errors and precision, decoding against sequential."""
    checks: list[dict] = []
    res = parts.get("checks", {}).get("result") or {}
    for ch in res.get("checks", []):
        checks.append(ch)
    if not res.get("checks"):
        why = parts.get("checks", {}).get("reason", "the checks part did not run")
        checks.append({"name": "checks part", "passed": None, "detail": why})

    scan = parts.get("scan", {}).get("result")
    if scan:
        fwd = [r for r in scan["rows"] if r["mode"] == "fwd" and r.get("status") == "ran"]
        grad = [r for r in scan["rows"] if r["mode"] == "grad" and r.get("status") == "ran"]
        bad = [
            f"{r['cell']} {r['solver']} D={r['d']} T={r['t']} B={r['b']}: err {r['err']:.1e}, "
            f"{r['result']}"
            for r in fwd
            if not (r["successful"] and r["err"] <= ERR_TARGET)
        ]
        checks.append(
            {
                "name": "scan targets: forward against lax.scan, error <= 1e-4, converged",
                "passed": (not bad) if fwd else None,
                "detail": bad or f"{len(fwd)} forward rows",
            }
        )
        bad = [f"{r['cell']} {r['solver']} B={r['b']}" for r in grad if not r.get("finite")]
        checks.append(
            {
                "name": "scan targets: gradients finite",
                "passed": (not bad) if grad else None,
                "detail": bad or f"{len(grad)} gradient rows",
            }
        )
        checks.append(
            {
                "name": "scan: matmul precision highest",
                "passed": scan.get("matmul_precision") == "highest",
                "detail": scan.get("matmul_precision"),
            }
        )
    decode = parts.get("decode", {}).get("result")
    if decode:
        rows = decode["rows"]
        bad = [
            f"{r['model']} {r['path']} {r['solver']} B={r['batch']}" for r in rows if not r["same"]
        ]
        checks.append(
            {
                "name": "decode: output equal to sequential decoding",
                "passed": (not bad) if rows else None,
                "detail": bad or f"{len(rows)} rows, every one equal",
            }
        )
    return checks


# ----------------------------------------------------------------------- in-process parts


def _write(path: Path, payload: dict) -> None:
    import numpy as np

    def default(x):
        if isinstance(x, (np.floating, np.integer, np.bool_)):
            return x.item()
        raise TypeError(type(x).__name__)

    tmp = path.with_name(path.name + ".tmp")  # whole or not at all
    tmp.write_text(json.dumps(payload, indent=1, default=default))
    os.replace(tmp, path)


def _gru(kind: str, d: int, t: int, b: int = 1, seed: int = 0):
    """`(cell, xs)`: scan.py's cells and inputs (input size 4, float32)."""
    sys.path.insert(0, str(HERE))
    import scan as scan_bench

    cell = scan_bench.make_cell(kind, d, seed)
    return cell, scan_bench.make_inputs(t, b, seed)


def part_checks(tiny: bool, path: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(HERE))
    from _common import device_info, short_error, versions

    import fixpoint
    from fixpoint import solvers

    payload: dict = {"device": device_info(), "versions": versions(), "tiny": tiny}
    payload["matmul_precision"] = jax.config.jax_default_matmul_precision
    checks: list[dict] = payload.setdefault("checks", [])
    payload["complete"] = False

    def check(name, passed, detail):
        checks.append({"name": name, "passed": passed, "detail": detail})
        print(f"{'ok  ' if passed else 'FAIL' if passed is False else '----'} {name}: {detail}")
        _write(path, payload)

    check(
        "matmul precision in force (jax_default_matmul_precision)",
        payload["matmul_precision"] == "highest",
        payload["matmul_precision"],
    )

    # A float32 matmul against float64: what `default` costs on this device.
    n = 256 if tiny else 2048
    rng = np.random.default_rng(0)
    a64, b64 = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    exact = a64 @ b64
    a, b = jnp.asarray(a64, jnp.float32), jnp.asarray(b64, jnp.float32)
    errs = {}
    for prec in ("default", "highest"):
        with jax.default_matmul_precision(prec):
            got = np.asarray(jax.jit(jnp.matmul)(a, b), np.float64)
        errs[prec] = float(np.max(np.abs(got - exact)) / np.max(np.abs(exact)))
    payload["matmul_rel_error"] = errs
    check(
        f"float32 matmul {n}x{n} under 'highest': relative error <= 1e-5",
        errs["highest"] <= 1e-5,
        f"highest {errs['highest']:.1e}, default {errs['default']:.1e} (relative, vs float64)",
    )

    d_dense, d_diag, t = (4, 8, 200) if tiny else (16, 64, 10_000)
    dense, xs = _gru("gru", d_dense, t)
    diag, xs_diag = _gru("diag-gru", d_diag, t)

    def solve_fn(cell, d, solver):
        def step(h, x):
            h = cell(x, h)
            return h, h

        def run(xs):
            h0 = jnp.zeros(d, jnp.float32)
            _, hs, sol = fixpoint.scan(
                step,
                h0,
                xs,
                solver=solver,
                max_steps=xs.shape[0],
                throw=False,
                return_solution=True,
            )
            return hs, sol.result._value, sol.stats["num_steps"]

        return run

    def reference(cell, d, xs):
        h0 = jnp.zeros(d, jnp.float32)
        return jax.jit(lambda xs: jax.lax.scan(lambda h, x: (cell(x, h),) * 2, h0, xs)[1])(xs)

    # Every dot of the lowered solvers at HIGHEST (lowering only: no compile).
    hlo = {}
    for name, solver in (
        ("DEER", solvers.DEER()),
        ("QuasiDEER", solvers.QuasiDEER()),
        ("ELK", solvers.ELK()),
    ):
        text = jax.jit(solve_fn(dense, d_dense, solver)).lower(xs).as_text()
        dots = re.findall(r"stablehlo\.dot_general[^\n]*", text)
        hlo[name] = {"dots": len(dots), "highest": sum("HIGHEST" in d for d in dots)}
    payload["lowered_dots"] = hlo
    check(
        "every dot_general of lowered DEER / QuasiDEER / ELK solves at HIGHEST precision",
        all(v["dots"] > 0 and v["dots"] == v["highest"] for v in hlo.values()),
        ", ".join(f"{k} {v['highest']}/{v['dots']}" for k, v in hlo.items()),
    )

    ref_dense = reference(dense, d_dense, xs)
    ref_diag = reference(diag, d_diag, xs_diag)
    cases = [
        ("DEER", dense, solvers.DEER()),
        ("QuasiDEER", dense, solvers.QuasiDEER()),
        ("ELK", dense, solvers.ELK()),
        ("Jacobi", dense, solvers.Jacobi()),
        ("GaussSeidel(block_size=16)", dense, solvers.GaussSeidel(block_size=16)),
        ("PicardSum", dense, solvers.PicardSum()),
        ("Sequential", dense, solvers.Sequential()),
        ("QuasiDEER(assume_diagonal=True)", diag, solvers.QuasiDEER(assume_diagonal=True)),
    ]
    rows = payload.setdefault("scan_solvers", [])
    names = ("successful", "max_steps_reached", "diverged", "nonfinite", "linear_solve_failed")
    for name, cell, solver in cases:
        is_diag = cell is diag
        d, x, ref = (d_diag, xs_diag, ref_diag) if is_diag else (d_dense, xs, ref_dense)
        row: dict = {"solver": name, "cell": "diag-gru" if is_diag else "gru", "d": d, "t": t}
        try:
            t0 = time.perf_counter()
            hs, code, steps = jax.block_until_ready(jax.jit(solve_fn(cell, d, solver))(x))
            row["seconds"] = time.perf_counter() - t0  # compile included
            row["err"] = float(jnp.max(jnp.abs(hs - ref)))
            row["result"] = names[int(code)] if 0 <= int(code) < len(names) else str(code)
            row["iterations"] = int(steps)
            row["ok"] = row["result"] == "successful" and row["err"] <= ERR_TARGET
        except Exception as e:  # a failure is a result
            row.update(error=short_error(e), ok=False)
        rows.append(row)
        print(f"  {name:32s} {row}", flush=True)
        _write(path, payload)
    bad = [
        f"{r['solver']}: " + (r["error"] if "error" in r else f"{r['result']}, err {r['err']:.1e}")
        for r in rows
        if not r["ok"]
    ]
    check(
        f"every scan solver against lax.scan at float32, T={t}: error <= 1e-4, converged",
        not bad,
        bad or ", ".join(f"{r['solver']} {r['err']:.1e} ({r['iterations']} it)" for r in rows),
    )
    deer = next(r for r in rows if r["solver"] == "DEER")
    check(
        f"DEER on a dense GRU (D={d_dense}, T={t}) converges under 'highest'",
        deer["ok"],
        f"{deer.get('result')}, err {deer.get('err', float('nan')):.1e}",
    )

    # The control: the same DEER solve under JAX's default precision (recorded only).
    control: dict = {"precision": "default"}
    try:
        with jax.default_matmul_precision("default"):
            hs, code, steps = jax.block_until_ready(
                jax.jit(solve_fn(dense, d_dense, solvers.DEER()))(xs)
            )
        control.update(
            err=float(jnp.max(jnp.abs(hs - ref_dense))),
            result=names[int(code)],
            iterations=int(steps),
        )
    except Exception as e:
        control["error"] = short_error(e)
    payload["deer_default_precision"] = control
    check("DEER under 'default' precision (control, recorded only)", None, control)
    payload["complete"] = True
    _write(path, payload)


def part_data_parallel(tiny: bool, path: Path) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(HERE))
    from _common import device_info, time_jitted

    import fixpoint
    from fixpoint import layers, solvers

    n = jax.device_count()
    payload: dict = {"device": device_info(), "device_count": n}
    if n < 2:
        payload.update(status="skipped", reason=f"{n} device: needs at least 2")
        _write(path, payload)
        return
    d, per_device = (8, 8) if tiny else (512, 1024)

    class Tanh(eqx.Module):
        lin: eqx.nn.Linear

        def __call__(self, z, x):
            return jnp.tanh(self.lin(z) + x)

    key = jax.random.key(0)
    lin = eqx.nn.Linear(d, d, key=key)
    lin = eqx.tree_at(lambda m: m.weight, lin, 0.9 * lin.weight / jnp.linalg.norm(lin.weight, 2))
    model = layers.DEQ(Tanh(lin), solver=solvers.Anderson(1e-4, 1e-4), max_steps=100)

    def loss(model, xs, ys):
        return jnp.mean((jax.vmap(model)(xs) - ys) ** 2)

    counts = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n]
    rows = payload.setdefault("rows", [])
    base = None
    for k in counts:
        mesh = jax.make_mesh(
            (k,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:k]
        )
        step = eqx.filter_value_and_grad(fixpoint.data_parallel(loss, mesh))
        batch = per_device * k
        xs = jax.random.normal(jax.random.key(1), (batch, d), jnp.float32)
        ys = jnp.zeros((batch, d), jnp.float32)
        params, static = eqx.partition(model, eqx.is_array)

        def run(params, xs, ys, static=static, step=step):
            return step(eqx.combine(params, static), xs, ys)

        timing = time_jitted(run, params, xs, ys, reps=3 if tiny else 10)
        rate = batch / timing.median
        base = base or rate
        rows.append(
            {
                "devices": k,
                "batch": batch,
                "step_s": timing.median,
                "compile_s": timing.compile_s,
                "samples_per_s": rate,
                "speedup_vs_1": rate / base,
                "efficiency": rate / base / k,
            }
        )
        print(f"  devices {k}: {rows[-1]}", flush=True)
        _write(path, payload)
    payload["note"] = (
        f"weak scaling: {per_device} samples per device, DEQ tanh(W z + x), d={d}, "
        "Anderson 1e-4, value and gradient of the mean squared error"
    )
    _write(path, payload)


def part_profile(tiny: bool, path: Path, out: Path) -> None:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(HERE))
    from _common import device_info, short_error

    import fixpoint
    from fixpoint import solvers

    trace_dir = path.parent / "profile"
    payload: dict = {"device": device_info(), "traces": []}
    if tiny:
        cases = [("dense GRU, DEER", "gru", solvers.DEER(), 4, 300, 1)]
    else:
        cases = [
            ("dense GRU, DEER", "gru", solvers.DEER(), 16, 10**6, 1),
            ("dense GRU, QuasiDEER", "gru", solvers.QuasiDEER(), 64, 10**5, 1),
            (
                "diag GRU, QuasiDEER(diag)",
                "diag-gru",
                solvers.QuasiDEER(assume_diagonal=True),
                64,
                10**5,
                16,
            ),
        ]
    for label, kind, solver, d, t, b in cases:
        cell, xs = _gru(kind, d, t, b)

        def one(x, cell=cell, solver=solver, d=d):
            h0 = jnp.zeros(d, jnp.float32)
            f = lambda h, xt: (cell(xt, h), None)  # noqa: E731
            _, _, sol = fixpoint.scan(
                f, h0, x, solver=solver, max_steps=200, throw=False, return_solution=True
            )
            return sol.value

        fn = jax.jit(one if b == 1 else jax.vmap(one))
        rec: dict = {"target": label, "d": d, "t": t, "b": b}
        try:
            jax.block_until_ready(fn(xs))  # compile and warm up outside the trace
            sub = trace_dir / re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
            t0 = time.perf_counter()
            with jax.profiler.trace(str(sub)):
                jax.block_until_ready(fn(xs))
            rec["traced_call_s"] = time.perf_counter() - t0
            rec["files"] = sorted(
                str(p.relative_to(trace_dir)) for p in sub.rglob("*") if p.is_file()
            )
        except Exception as e:  # a profiler that does not work here is a result
            rec["error"] = short_error(e)
        payload["traces"].append(rec)
        print(f"  {rec}", flush=True)
        if trace_dir.exists():  # tarred after every trace: a stopped run keeps them
            tgz = out / "gpu_profile.tgz"
            with tarfile.open(tgz, "w:gz") as tar:
                tar.add(trace_dir, arcname="profile")
            payload["archive"] = {"file": tgz.name, "bytes": tgz.stat().st_size}
        _write(path, payload)
    _remove_tree(trace_dir)
    _write(path, payload)


def _remove_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------- main


def default_out(tiny: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return HERE / "results" / ("gpu_tiny" if tiny else "gpu")


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def _archive(tar_path: Path, files: list[Path]) -> None:
    """Append `files` to the (uncompressed, appendable) tar and remove them."""
    with tarfile.open(tar_path, "a") as tar:
        for f in files:
            if f.exists():
                tar.add(f, arcname=f"parts/{f.name}")
                f.unlink()


def main_run(args) -> int:
    out = Path(args.out) if args.out else default_out(args.tiny)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "parts"
    work.mkdir(exist_ok=True)
    for stale in ("gpu.json", "gpu_logs.tar", "gpu_profile.tgz"):
        (out / stale).unlink(missing_ok=True)
    for stale in work.iterdir():
        if stale.is_file():
            stale.unlink()
    wanted = args.parts or [p.name for p in PARTS]
    unknown = sorted(set(wanted) - {p.name for p in PARTS})
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; known: {[p.name for p in PARTS]}")
    c = Ctx(tiny=args.tiny, work=work, out=out)
    t_start = time.perf_counter()
    summary: dict = {
        "benchmark": "gpu",
        "mode": "tiny (CPU, tiny sizes: figures mean nothing)" if args.tiny else "gpu",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": args.budget,
        "argv": sys.argv[1:],
        "commit": _git_commit(),
        "environment": probe_light(),
        "parts": {},
        "complete": False,
    }
    print(f"bench/gpu.py{' --tiny' if args.tiny else ''}: writing {out}", flush=True)

    def save() -> None:
        summary["elapsed_s"] = time.perf_counter() - t_start
        summary["checks"] = derived_checks(summary["parts"])
        scan = summary["parts"].get("scan", {}).get("result")
        summary["targets"] = scan.get("targets") if scan else None
        (out / "gpu.json").write_text(json.dumps(summary, indent=1))

    banked = 0.0  # seconds earlier parts left of their budgets
    for part in PARTS:
        if part.name not in wanted:
            summary["parts"][part.name] = {"status": "skipped", "reason": "not in --parts"}
            continue
        remaining = args.budget - (time.perf_counter() - t_start)
        print(f"[{time.perf_counter() - t_start:5.0f}s] {part.name} ...", flush=True)
        rec = run_part(part, c, remaining, banked)
        if "seconds" in rec:
            banked = max(0.0, banked + rec["budget_s"] - rec["seconds"])
        if part.name == "checks" and rec.get("result"):
            count = rec["result"].get("device", {}).get("device_count")
            c.device_count = int(count) if count else None
            summary["device"] = rec["result"].get("device")
        if part.name == "decode" and not args.tiny:
            rec["weights"] = decode_weights()[1]
        summary["parts"][part.name] = rec
        took = rec.get("seconds")
        print(
            f"[{time.perf_counter() - t_start:5.0f}s] {part.name}: {rec['status']}"
            + (f" in {took:.0f}s" if took is not None else "")
            + (f" ({rec['reason']})" if rec.get("reason") else ""),
            flush=True,
        )
        if rec["status"] == "failed":
            print(rec.get("log_tail", ""), flush=True)
        save()
        _archive(
            out / "gpu_logs.tar",
            [work / f"{part.name}.log", *work.glob(part.result), *work.glob("*.tmp")],
        )
    summary["complete"] = True
    save()
    if not any(work.iterdir()):
        work.rmdir()
    failed_checks = [ch["name"] for ch in summary["checks"] if ch["passed"] is False]
    failed_parts = [n for n, r in summary["parts"].items() if r["status"] == "failed"]
    print(f"\nchecks: {len(summary['checks'])}, failed: {failed_checks or 'none'}")
    for ch in summary["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "----"}[ch["passed"]]
        print(f"  {mark} {ch['name']}")
    for t in summary.get("targets") or []:
        print(f"  target {t['target']} [{t['mode']}]: {t['status']} {t.get('speedup', '')}")
    print(f"parts failed: {failed_parts or 'none'}; total {summary['elapsed_s']:.0f}s")
    print(f"wrote {out / 'gpu.json'}")
    return 1 if failed_checks or failed_parts else 0


def probe_light() -> dict:
    """Versions without importing JAX (the parent leaves the device to its parts)."""
    out = {"python": platform.python_version(), "machine": platform.machine()}
    out["packages"] = {d: _version(d) for d in (*CORE, *PEERS, *OTHER)}
    out["missing_peers"] = [d for d in PEERS if out["packages"][d] is None]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", action="store_true", help="print versions and devices, exit")
    parser.add_argument("--tiny", action="store_true", help="every part at tiny sizes on the CPU")
    parser.add_argument("--out", default=None, help="folder (default $OUT, else bench/results/gpu)")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds in all (330; --tiny 240)"
    )
    parser.add_argument("--parts", nargs="+", default=None, help="a subset of the parts, in order")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # one part, in-process
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        p = probe()
        print_probe(p)
        if args.out or os.environ.get("OUT"):
            folder = Path(args.out or os.environ["OUT"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "probe.json").write_text(json.dumps(p, indent=1))
        return 0
    if args.part:
        path = Path(args.json)
        if args.part == "checks":
            part_checks(args.tiny, path)
        elif args.part == "data_parallel":
            part_data_parallel(args.tiny, path)
        elif args.part == "profile":
            part_profile(args.tiny, path, Path(args.out))
        else:
            raise SystemExit(f"unknown --part {args.part}")
        return 0
    if args.budget is None:
        args.budget = 240.0 if args.tiny else 330.0
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
