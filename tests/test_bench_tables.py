"""`docs/bench_tables.py`: every benchmark results file renders, markers expand, errors are loud.

Fast and JAX-free: it only reads `bench/results/*.json`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "docs" / "bench_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bt = _load_module()
FILES = sorted(p.stem for p in RESULTS.glob("*.json"))


def test_every_results_file_has_a_renderer():
    assert FILES, "no results files found"
    missing = [f for f in FILES if f not in bt.RENDERERS or f not in bt.COMMANDS]
    assert not missing, f"results files without a renderer in docs/bench_tables.py: {missing}"
    stale = [n for n in bt.RENDERERS if n not in FILES]
    assert not stale, f"renderers without a results file: {stale}"


@pytest.mark.parametrize("name", FILES)
def test_renderer_runs(name):
    text = bt.render(name)
    assert text.strip()
    assert "|---" in text or "|--" in text
    assert text.count("|") > 4
    assert text.startswith("**")
    assert "Command: `" in text and "Hardware:" in text and "Commit:" in text
    for section in [n.split(" ", 1)[1] for n in bt.names() if n.startswith(name + " ")]:
        part = bt.render(name, section)
        assert "|" in part and part in bt.expand(f"<!-- bench: {name} {section} -->")


def test_names_lists_files_and_sections():
    names = bt.names()
    for f in FILES:
        assert f in names
    assert "batch_cpu overhead" in names
    assert all(len(n.split()) in (1, 2) for n in names)


def test_markers_expand():
    page = (
        "# Title\n\n<!-- bench: batch_overhead_cpu -->\n\ntext\n<!-- bench: batch_cpu epoch -->\n"
    )
    out = bt.expand(page)
    assert "<!-- bench:" not in out
    assert out.startswith("# Title\n\n**")
    assert bt.render("batch_overhead_cpu") in out
    assert bt.render("batch_cpu", "epoch") in out
    assert "Loop overhead" not in bt.render("batch_cpu", "epoch")
    assert bt.expand("no markers here\n| a |") == "no markers here\n| a |"


@pytest.mark.parametrize(
    "marker",
    [
        "<!-- bench: no_such_results -->",
        "<!-- bench: batch_cpu no_such_section -->",
        "<!-- bench: -->",
        "<!-- bench: a b c -->",
    ],
)
def test_unknown_marker_raises(marker):
    with pytest.raises(ValueError, match="bench"):
        bt.expand(f"intro\n{marker}\nend")


def test_missing_file_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(bt, "RESULTS", tmp_path)
    with pytest.raises(ValueError, match="batch_cpu"):
        bt.expand("<!-- bench: batch_cpu -->")


def test_numbers_come_from_the_files():
    data = json.loads((RESULTS / "batch_overhead_cpu.json").read_text())
    text = bt.render("batch_overhead_cpu")
    for row in data["overhead"]:
        cells = [row["d"], row["iterations"], bt.us(row["bare_per_iter_s"])]
        cells += [bt.us(row["ours_per_iter_s"]), bt.ratio(row["ratio"])]
        assert "| " + " | ".join(map(str, cells)) + " |" in text
    data = json.loads((RESULTS / "deq_training_digits-mlp.json").read_text())
    text = bt.render("deq_training_digits-mlp")
    for run in data["runs"]:
        assert f"| {bt.pct(run['test_acc'])} |" in text
    assert data.get("device", "") in text  # a file without hardware details says what it has


def test_number_formatting():
    assert bt.sig(1.5065715585418533) == "1.51"
    assert bt.sig(0.09880898799974602) == "0.0988"
    assert bt.sig(1259.486) == "1260"
    assert bt.sig(9.996) == "10.0"
    assert bt.sig(1.1920928955078125e-07) == "1.19e-07"
    assert bt.sig(14) == "14"
    assert bt.sig(True) == "yes" and bt.sig(float("nan")) == "—"
    assert bt.ms(0.0035448649996396853) == "3.54"
    assert bt.mib(146281184) == "140"
    assert bt.pm(0.0091389568, 4.8723e-05) == "0.00914 ± 0.00005"
