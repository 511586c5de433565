"""The documentation sources stay true to the library.

Every public name has an API entry (`::: fixpoint.name` in `docs/api/*.md`) and no
entry names something that is not public; every page and notebook is in the site's
navigation; every benchmark marker on a page renders; and the Python examples of the
README and the guides run as written (in a fresh interpreter, with JAX's defaults, as
a reader would run them). The build itself is `mkdocs build --strict` in `.ci/run`.
"""

import importlib
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest
from test_public_api import API

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ENTRY = re.compile(r"^::: (fixpoint(?:\.\w+)*)\s*$", re.M)


def _entries() -> list[str]:
    found = []
    for page in sorted((DOCS / "api").glob("*.md")):
        found += ENTRY.findall(page.read_text())
    return found


def _public_names() -> set[str]:
    names = set()
    for module, listed in API.items():
        mod = importlib.import_module(module)
        for name in listed.split():
            if type(getattr(mod, name)) is not type(mod):  # submodules have their own pages
                names.add(f"{module}.{name}")
    return names


def test_every_public_name_has_an_api_entry():
    entries = _entries()
    public = _public_names()
    missing = sorted(public - set(entries))
    assert not missing, f"public names without an entry in docs/api/*.md: {missing}"
    unknown = sorted(set(entries) - public)
    assert not unknown, f"docs/api entries that are not public names: {unknown}"
    twice = sorted({e for e in entries if entries.count(e) > 1})
    assert not twice, f"documented twice: {twice}"


def _nav_paths() -> set[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") :]
    return set(re.findall(r"([\w/]+\.(?:md|ipynb))\s*$", nav, re.M))


def test_every_page_and_notebook_is_in_the_navigation():
    nav = _nav_paths()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "notebooks" not in p.parts}
    notebooks = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert pages | notebooks == nav, (
        f"not in mkdocs.yml's nav: {sorted((pages | notebooks) - nav)}; "
        f"in the nav but missing: {sorted(nav - (pages | notebooks))}"
    )


def test_every_benchmark_marker_renders():
    spec = importlib.util.spec_from_file_location("bench_tables", DOCS / "bench_tables.py")
    assert spec is not None and spec.loader is not None
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    count = 0
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        count += text.count("<!-- bench:")
        expanded = tables.expand(text)
        assert "<!-- bench:" not in expanded, page
    assert count > 10


EXAMPLES = [
    "README.md",
    "docs/getting_started.md",
    "docs/guides/equilibrium_layers.md",
    "docs/guides/which_adjoint.md",
    "docs/guides/games.md",
    "docs/guides/sequence_layers.md",
    "docs/guides/writing_a_solver.md",
]


@pytest.mark.parametrize("path", EXAMPLES)
def test_examples_run(path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), re.S)
    assert blocks, path
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=600,
    )
    assert result.returncode == 0, f"{path}:\n{result.stderr[-3000:]}"
