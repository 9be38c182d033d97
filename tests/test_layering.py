"""The README's layering: formats/ and archs/ sit below bases/ and the operations, so none of their
modules imports upward (a format that opens a base reads a model inside a parser)."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "loratools"
ABOVE = {"bases", "merging", "blending", "resizing", "extraction", "conversion", "inspection", "validation",
         "share", "cli", "collection"}


def _imported(path: pathlib.Path):
    """The loratools submodules a file imports (first component after `loratools.`)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = path.relative_to(PKG).parts[:-1]
            up = parts[:len(parts) - node.level + 1]
            mod = list(up) + (node.module.split(".") if node.module else [])
            names = [mod[0]] if mod else [a.name for a in node.names]
            yield from names
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loratools."):
            yield node.module.split(".")[1]


@pytest.mark.parametrize("folder", ["formats", "archs"])
def test_lower_floors_import_nothing_above(folder):
    bad = {(f.name, m) for f in (PKG / folder).glob("*.py") for m in _imported(f) if m in ABOVE}
    assert not bad
