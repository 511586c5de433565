"""Data-parallel training (`fixpoint.data_parallel`) on forced CPU devices.

Each check runs in a subprocess: the device count is fixed when JAX starts.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, devices, timeout=600):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


def test_data_parallel():
    """DEQ, MonDEQ and ParallelRNN: a batch split over 4 devices equals one device's."""
    proc = _run([Path(__file__).with_name("data_parallel_check.py")], devices=4)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "all data-parallel checks passed" in out


def test_two_processes():
    """The multi-host recipe of the docs on one machine: 2 processes x 2 CPU devices."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("multihost_check.py")
    procs = [_run([script, port, i], devices=2) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, out
        assert f"{i} all multi-host checks passed" in out, out
