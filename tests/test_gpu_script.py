"""`bench/gpu.py`, the one-command GPU run, end to end on the CPU at tiny sizes.

CI has no GPU: `--tiny` runs every part (each in its own process, as on the device)
at tiny sizes, so that the run on a lent GPU needs no debugging there.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def _parts() -> list[str]:
    spec = importlib.util.spec_from_file_location("gpu_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    spec.loader.exec_module(module)  # standard library imports only
    return [p.name for p in module.PARTS]


def _env() -> dict[str, str]:
    drop = ("OUT", "XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "FIXPOINT_BENCH_RESULTS")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_tiny_run(tmp_path):
    """Every part runs and writes its JSON; every check passes; at most 8 files come back."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert summary["complete"] and summary["mode"].startswith("tiny")
    assert list(summary["parts"]) == _parts()
    for name, rec in summary["parts"].items():
        assert rec["status"] == "ran", (name, rec.get("reason"), rec.get("log_tail"))
        assert isinstance(rec["result"], dict), name
        assert rec["seconds"] <= rec["budget_s"] + rec["banked_s"] + 5, (name, rec)

    checks = {c["name"]: c["passed"] for c in summary["checks"]}
    assert not [name for name, ok in checks.items() if ok is False], summary["checks"]
    must_pass = (
        "matmul precision in force",
        "every dot_general of lowered",
        "every scan solver against lax.scan",
        "DEER on a dense GRU",
        "scan targets: forward against lax.scan",
        "scan targets: gradients finite",
        "scan: matmul precision highest",
        "decode: output equal to sequential",
    )
    for prefix in must_pass:
        hits = [ok for name, ok in checks.items() if name.startswith(prefix)]
        assert hits == [True], (prefix, summary["checks"])

    solvers = {r["solver"] for r in summary["parts"]["checks"]["result"]["scan_solvers"]}
    assert {"DEER", "QuasiDEER", "ELK", "Jacobi", "PicardSum", "Sequential"} <= solvers
    targets = summary["targets"]
    assert {t["mode"] for t in targets} == {"fwd", "grad"}
    assert all(t["status"] != "not run" for t in targets), targets
    scan = summary["parts"]["scan"]["result"]
    assert scan["complete"] and scan["matmul_precision"] == "highest"
    decode = summary["parts"]["decode"]["result"]
    assert decode["weights"] == "untrained" and {r["model"] for r in decode["rows"]} == {
        "untrained"
    }
    assert {r["solver"].split("-")[0] for r in decode["rows"]} == {
        "sequential",
        "jacobi",
        "lookahead",
    }
    dp = summary["parts"]["data_parallel"]["result"]["rows"]
    assert [r["devices"] for r in dp] == [1, 2]
    assert summary["parts"]["profile"]["result"]["archive"]["bytes"] > 0

    with tarfile.open(tmp_path / "gpu_logs.tar") as tar:
        names = set(tar.getnames())
    for name in _parts():
        assert f"parts/{name}.log" in names, (name, names)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["gpu.json", "gpu_logs.tar", "gpu_profile.tgz"]


def test_probe():
    """`--probe`: versions, what imports, the devices, in a few seconds."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--probe"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=ROOT.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("jax", "jaxlib", "equinox", "lineax", "optax", "chex", "jaxtyping"):
        assert f"  {name} " in out, (name, out)
    assert "devices:" in out and "missing core: none" in out, out
    assert "fixpoint from:" in out and "not importable" not in out, out
