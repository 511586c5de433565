"""Every public name's docstring is complete (STYLE.md, item 9): markdown, with
`**Arguments:**` naming each parameter and `**Returns:**` for what comes back.

mkdocstrings renders these docstrings as the reference pages, so a missing
argument here is a missing line there. The names are `test_public_api.API`.
"""

import ast
import contextlib
import importlib
import inspect
import pathlib
import textwrap

import pytest
from test_public_api import API


def _public():
    """`(qualified name, object, public module)` for every name in `API`."""
    for module in sorted(API):
        mod = importlib.import_module(module)
        for name in API[module].split():
            yield f"{module}.{name}", getattr(mod, name), mod


PUBLIC = list(_public())
FUNCTIONS = [(q, o) for q, o, _ in PUBLIC if inspect.isfunction(inspect.unwrap(o))]
CLASSES = [(q, o) for q, o, _ in PUBLIC if inspect.isclass(o)]
MODULES = [(q, o) for q, o, _ in PUBLIC if inspect.ismodule(o)]
CONSTANTS = [(q, m) for q, o, m in PUBLIC if not callable(o) and not inspect.ismodule(o)]


def _is_abstract(cls) -> bool:
    return cls.__name__.startswith("Abstract") or inspect.isabstract(cls)


def _class_docstring(cls) -> str:
    # The class's own docstring from its source: a dataclass, an `eqx.Module`
    # or a NamedTuple without one gets an automatic `Name(field, ...)` docstring,
    # which does not count.
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef)
    return ast.get_docstring(node) or ""


def _is_context_manager(fn) -> bool:
    # `contextlib.contextmanager` wraps a generator function (`functools.wraps`).
    return inspect.isgeneratorfunction(inspect.unwrap(fn))


def _parameters(sig: inspect.Signature) -> list[str]:
    names = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        if p.kind is p.VAR_POSITIONAL:
            names.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            names.append(f"**{p.name}")
        else:
            names.append(p.name)
    return names


def _missing_arguments(doc: str, params: list[str]) -> list[str]:
    problems = []
    if params and "**Arguments:**" not in doc:
        problems.append("no **Arguments:** section")
    problems += [f"argument `{p}` not named" for p in params if f"`{p}`" not in doc]
    return problems


def _function_problems(fn) -> list[str]:
    doc = inspect.getdoc(fn) or ""
    if not doc.strip():
        return ["no docstring"]
    sig = inspect.signature(fn)
    problems = _missing_arguments(doc, _parameters(sig))
    returns_none = sig.return_annotation in (None, "None")
    if not returns_none and not _is_context_manager(fn) and "**Returns:**" not in doc:
        problems.append("no **Returns:** section")
    return problems


@pytest.mark.parametrize("qual, fn", FUNCTIONS, ids=[q for q, _ in FUNCTIONS])
def test_function_docstring(qual, fn):
    problems = _function_problems(fn)
    assert not problems, f"{qual}: " + "; ".join(problems)


@pytest.mark.parametrize("qual, cls", CLASSES, ids=[q for q, _ in CLASSES])
def test_class_docstring(qual, cls):
    doc = _class_docstring(cls)
    assert doc.strip(), f"{qual}: no class docstring"
    if _is_abstract(cls) or issubclass(cls, BaseException):
        return
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # an enumeration: no constructor to document
        return
    problems = _missing_arguments(doc, _parameters(sig))
    assert not problems, f"{qual}: " + "; ".join(problems)


def _introduced_methods():
    """Public methods (and `__call__`) that a public class itself introduces; an
    override is covered by the class that introduced the method. A field whose
    default is a function (a solver's `norm`) is not a method."""
    for qual, cls in CLASSES:
        fields = set(getattr(cls, "__dataclass_fields__", {}))
        for attr, member in vars(cls).items():
            if (attr.startswith("_") and attr != "__call__") or attr in fields:
                continue
            if any(attr in vars(base) for base in cls.__mro__[1:]):
                continue
            fn = member.fget if isinstance(member, property) else member
            if isinstance(fn, (staticmethod, classmethod)):
                fn = fn.__func__
            if inspect.isfunction(fn):
                yield f"{qual}.{attr}", cls, fn


METHODS = list(_introduced_methods())


@pytest.mark.parametrize("qual, cls, fn", METHODS, ids=[q for q, _, _ in METHODS])
def test_method_docstring(qual, cls, fn):
    doc = inspect.getdoc(fn) or ""
    assert doc.strip(), f"{qual}: no docstring"
    # The protocol a solver or model author implements and the loops call:
    # documented as fully as a function.
    if _is_abstract(cls):
        problems = _function_problems(fn)
        assert not problems, f"{qual}: " + "; ".join(problems)


def _assigned(stmt: ast.stmt) -> list[str]:
    """The names a module-level `NAME = ...` or `NAME: T = ...` assigns."""
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return [stmt.target.id]
    return []


def _attribute_docstrings(body: list[ast.stmt], name: str) -> list[str] | None:
    """For each module-level assignment of `name`, the string statement right
    after it (griffe's attribute docstring; `""` when there is none), or `None`
    when the module does not assign `name`."""
    found = []
    for i, stmt in enumerate(body):
        if name not in _assigned(stmt):
            continue
        following = body[i + 1] if i + 1 < len(body) else None
        is_doc = (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        )
        found.append(following.value.value if is_doc else "")  # pyright: ignore
    return found or None


@pytest.mark.parametrize("qual, mod", CONSTANTS, ids=[q for q, _ in CONSTANTS])
def test_constant_docstring(qual, mod):
    # A constant has no `__doc__` of its own: read the source of the package that
    # exports it, where it is assigned (e.g. `datasets/_text.py`).
    name = qual.rsplit(".", 1)[1]
    folder = pathlib.Path(mod.__file__).parent
    found = {}
    for path in sorted(folder.glob("*.py")):
        docs = _attribute_docstrings(ast.parse(path.read_text()).body, name)
        if docs is not None:
            found[path.name] = docs
    assert found, f"{qual}: no module-level assignment found"
    for filename, docs in found.items():
        assert all(d.strip() for d in docs), (
            f"{qual}: no attribute docstring right after its assignment in {filename}"
        )


@pytest.mark.parametrize("qual, mod", MODULES, ids=[q for q, _ in MODULES])
def test_module_docstring(qual, mod):
    assert (mod.__doc__ or "").strip(), f"{qual}: no module docstring"


def test_the_checks_see_a_missing_item():
    # The checks above would pass vacuously if they read the wrong docstring.
    def f(x: int, *args: int, **kwargs: int) -> int:
        """Summary.

        **Arguments:**

        - `x`: a number.
        - `*args`: more.
        """
        return x

    assert _function_problems(f) == [
        "argument `**kwargs` not named",
        "no **Returns:** section",
    ]

    @contextlib.contextmanager
    def g(y: int):
        """Summary.

        **Arguments:**

        - `y`: a number.
        """
        yield

    assert _function_problems(g) == []
    assert FUNCTIONS and CLASSES and METHODS and CONSTANTS and MODULES
