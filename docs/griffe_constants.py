"""A griffe extension: module constants keep their own docstrings under inspection.

mkdocstrings loads the package by importing it (`force_inspection`, which equinox's
dataclass signatures need); an imported constant such as `ASCII_VOCAB = 128` then has
only its value's type docstring (`int`'s). This reads the attribute docstring written
in the source instead: the string statement right after the assignment, in the
module that defines the name (searched among the package's own files).
"""

import ast
import functools
import inspect
import pathlib

import griffe


@functools.cache
def _attribute_docstrings(folder: pathlib.Path) -> dict[str, str]:
    """Module-level `name = value` followed by a string, in every file of `folder`."""
    found = {}
    for path in sorted(folder.glob("*.py")):
        body = ast.parse(path.read_text()).body
        for statement, following in zip(body, body[1:], strict=False):
            if isinstance(statement, ast.Assign):
                targets = statement.targets
            elif isinstance(statement, ast.AnnAssign):
                targets = [statement.target]
            else:
                continue
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                for target in targets:
                    if isinstance(target, ast.Name):
                        found[target.id] = inspect.cleandoc(following.value.value)
    return found


class ConstantDocstrings(griffe.Extension):
    def on_attribute_instance(self, *, node, attr, agent, **kwargs):
        value = getattr(node, "obj", None)
        if value is None or attr.docstring is None:
            return
        if attr.docstring.value != inspect.getdoc(type(value)):
            return
        module = attr.module
        if module.filepath is None or isinstance(module.filepath, list):
            return
        text = _attribute_docstrings(pathlib.Path(module.filepath).parent).get(attr.name)
        if text is not None:
            attr.docstring = griffe.Docstring(text, parent=attr)
