"""The architecture docs/architecture.md draws holds in the code (issue 11): imports go one way through the layers,
every subpackage says what it is for, and no module outgrows a reader's head."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "condiff"

# Lowest first: a module may import from its own layer and the layers before it, never from a later one.
# sampling sits below training: a fine-tuning constraint samples the pretrained model's own paths.
LAYERS = [
    ["condiff.config", "condiff.rundir", "condiff.journal", "condiff.runtime", "condiff.fit"],
    ["condiff.data"],
    ["condiff.models", "condiff.gmm"],
    ["condiff.sampling"],
    ["condiff.training"],
    ["condiff.evaluation", "condiff.report", "condiff.attribution"],
    ["condiff.experiments"],
    ["condiff.labs"],
    ["condiff.cli", "condiff.__main__", "condiff"],
]
MAX_LINES = 460


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix."""
    matches = [(len(prefix), index) for index, names in enumerate(LAYERS) for prefix in names
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer"
    return max(matches)[1]


def condiff_imports(path: Path) -> set[str]:
    """Every condiff module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("condiff"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("condiff"))
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_go_one_way_through_the_layers(path):
    module = module_name(path)
    if module == "condiff":
        return   # the public namespace re-exports from every layer, lazily
    upward = [imported for imported in condiff_imports(path) if layer_of(imported) > layer_of(module)]
    assert not upward, f"{module} (layer {layer_of(module)}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_modules_stay_readable_in_one_sitting(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_every_subpackage_says_what_it_is_for():
    for init in PACKAGE.rglob("__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and len(docstring.split()) >= 12, init


def test_the_layer_check_would_catch_an_upward_import(tmp_path):
    """The check itself can fail: a data module importing the trainer is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("from condiff.training.loop import train\n")
    upward = [m for m in condiff_imports(bad) if layer_of(m) > layer_of("condiff.data.datasets")]
    assert upward == ["condiff.training.loop"]
