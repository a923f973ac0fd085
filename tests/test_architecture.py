"""The architecture docs/architecture.md draws holds in the code (issue 11): imports go one way through the layers
and inside every subpackage, every subpackage says what it is for, and no module outgrows a reader's head."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "condiff"

# Lowest first: a module may import from its own layer and the layers before it, never from a later one.
# sampling sits below training: a fine-tuning constraint samples the pretrained model's own paths.
# audit attributes a run the lifecycle layer trained; run.py's Run attributes too, so it sits above audit.
LAYERS = [
    ["condiff.errors", "condiff.config", "condiff.runrecords", "condiff.rundir", "condiff.journal", "condiff.runtime", "condiff.fit"],
    ["condiff.data"],
    ["condiff.models", "condiff.gmm"],
    ["condiff.sampling"],
    ["condiff.training"],
    ["condiff.evaluation", "condiff.report", "condiff.attribution"],
    ["condiff.lifecycle"],
    ["condiff.audit"],
    ["condiff.run"],
    ["condiff.validation"],
    ["condiff.papers"],
    ["condiff.labs"],
    ["condiff.cli", "condiff.__main__", "condiff"],
]
# Inside each subpackage, lowest first: a module may import its package's earlier modules, never a later one.
MODULE_ORDER = {
    "condiff.config": ["schema", "validation", "files"],
    "condiff.data": ["datasets", "images", "latent"],
    "condiff.gmm": ["mixture", "guidance"],
    "condiff.sampling": ["generate", "noise_classifier", "guidance"],
    "condiff.training": ["checkpoint", "metrics_log", "terms", "dual", "control", "estimators", "loop"],
    "condiff.evaluation": ["classifier", "metrics", "inception", "evaluation_data"],
    "condiff.attribution": ["per_example", "features", "store", "projector", "trak", "baselines", "validation"],
    "condiff.lifecycle": ["build", "training", "sampling", "evaluation"],
    "condiff.audit": ["results", "journey", "inputs", "report", "attribute"],
    "condiff.validation": ["counterfactual", "methods", "lds", "removal", "report", "reproduce"],
    "condiff.papers": ["demo", "reproduce"],
    "condiff.cli": ["commands", "parser", "__main__"],
    "condiff.labs": [],
    "condiff.labs.guidance": ["settings", "measures", "reference", "sweep", "geometry", "phase_shift", "learned",
                              "lab"],
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix."""
    matches = [(len(prefix), index) for index, names in enumerate(LAYERS) for prefix in names
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer"
    return max(matches)[1]


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def condiff_imports(path: Path) -> set[str]:
    """Every condiff module `path` imports, at the top or inside a function (`from condiff.lifecycle import
    training` imports condiff.lifecycle and condiff.lifecycle.training)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("condiff"):
            found.add(node.module)
            named = (f"{node.module}.{alias.name}" for alias in node.names)
            found.update(name for name in named if is_module(name))
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


def position(module: str) -> tuple[str, int] | None:
    """(package, rank in its MODULE_ORDER) of a module of a subpackage; None for a package or a top-level module."""
    package, _, name = module.rpartition(".")
    order = MODULE_ORDER.get(package)
    return None if order is None or name not in order else (package, order.index(name))


def later_siblings(module: str, imports: set[str]) -> list[str]:
    """The modules of `module`'s own package that it imports but that come after it in MODULE_ORDER."""
    here = position(module)
    if here is None:
        return []
    return sorted(imported for imported in imports
                  if (there := position(imported)) is not None and there[0] == here[0] and there[1] > here[1])


def test_every_subpackage_declares_the_order_of_its_modules():
    for init in PACKAGE.rglob("__init__.py"):
        package = module_name(init)
        if package == "condiff":
            continue   # its top-level modules are ordered by LAYERS
        modules = sorted(p.stem for p in init.parent.glob("*.py") if p.name != "__init__.py")
        assert sorted(MODULE_ORDER.get(package, ["(undeclared)"])) == modules, package


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_inside_a_subpackage_go_one_way(path):
    module = module_name(path)
    assert not later_siblings(module, condiff_imports(path)), \
        f"{module} imports modules of its package that come after it in MODULE_ORDER"


def test_the_package_check_would_catch_an_import_back(tmp_path):
    """The check itself can fail: the run builder importing the evaluation that builds on it is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("from condiff.lifecycle.evaluation import evaluate_run\nfrom condiff.lifecycle import sampling\n")
    assert later_siblings("condiff.lifecycle.build", condiff_imports(bad)) == ["condiff.lifecycle.evaluation",
                                                                          "condiff.lifecycle.sampling"]
