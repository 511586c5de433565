"""mkdocs hooks.

- The package as users import it: the repository keeps `fixpoint/`, `solvers/`,
  `layers/` and `datasets/` side by side and the build maps them into one namespace
  (`[tool.setuptools.package-dir]`). mkdocstrings finds a package's submodules on disk,
  so before the build this lays the package out as installed, in `build/docs-package`
  (symbolic links into the repository, read from that table), and `mkdocs.yml` points
  mkdocstrings there.
- Benchmark tables read from `bench/results/*.json` at build time: a line
  `<!-- bench: NAME -->` in a page becomes the table that `docs/bench_tables.py` renders
  from `bench/results/NAME.json`, so no figure on the site is copied by hand.
- The benchmarks' plots, `bench/results/*.png`, are served as `bench-results/NAME.png`
  (a guide links them as `../bench-results/NAME.png`), not copied into `docs/`.
"""

import importlib.util
import os
import pathlib
import shutil
import tomllib

import mkdocs.plugins
from mkdocs.structure.files import File

_HERE = pathlib.Path(__file__).resolve().parent
ROOT = _HERE.parent
PACKAGE = ROOT / "build" / "docs-package"


# Before every plugin's own `on_config`: hippogriffe loads the package from its
# configuration, and on a fresh clone `build/docs-package` does not exist yet.
@mkdocs.plugins.event_priority(100)
def on_config(config):
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = table["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(PACKAGE, ignore_errors=True)
    # Parents before children: `fixpoint` is a folder of links, its subpackages links.
    for name, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
        target = PACKAGE.joinpath(*name.split("."))
        source = ROOT / folder
        if name.count(".") == 0:
            target.mkdir(parents=True)
            for entry in source.iterdir():
                if entry.name != "__pycache__":
                    os.symlink(entry, target / entry.name)
        else:
            os.symlink(source, target, target_is_directory=True)
    return config


def on_files(files, config):
    for path in sorted((ROOT / "bench" / "results").glob("*.png")):
        files.append(File.generated(config, f"bench-results/{path.name}", abs_src_path=str(path)))
    return files


def _bench_tables():
    spec = importlib.util.spec_from_file_location("bench_tables", _HERE / "bench_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown, page, config, files):
    if "<!-- bench:" not in markdown:
        return markdown
    try:
        return _bench_tables().expand(markdown)
    except ValueError as error:
        raise ValueError(f"{page.file.src_path}: {error}") from error
