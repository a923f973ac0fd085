"""mkdocs hook: the reference of the public `condiff` namespace, generated from `condiff._EXPORTS`.

`condiff/__init__.py` exports its names lazily (`__getattr__`), which static analysis cannot follow, so this
hook reads the table of exports (without importing condiff) and writes one mkdocstrings block per name, headed
by its public name. Moving a name to another module changes only `_EXPORTS`; the reference follows.
"""

import ast
from pathlib import Path

PACKAGE_INIT = Path(__file__).resolve().parents[1] / "src" / "condiff" / "__init__.py"
MARKER = "<!-- public-api -->"
DOCUMENTED_ELSEWHERE = {"condiff.config": "config.md"}   # a subpackage with its own reference page


def exports() -> dict[str, list[str]]:
    """`_EXPORTS` of condiff/__init__.py: module -> the names condiff exports from it."""
    tree = ast.parse(PACKAGE_INIT.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in n.targets))
    return ast.literal_eval(node.value)


def public_api_markdown() -> str:
    blocks = []
    for module, names in exports().items():
        if module in DOCUMENTED_ELSEWHERE:
            listed = ", ".join(f"`condiff.{name}`" for name in names)
            blocks.append(f"{listed}: see [`{module}`]({DOCUMENTED_ELSEWHERE[module]}).")
            continue
        blocks += [f"::: {module}.{name}\n    options:\n      heading: condiff.{name}\n      toc_label: {name}"
                   for name in names]
    return "\n\n".join(blocks)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, public_api_markdown()) if MARKER in markdown else markdown
