"""The documentation: the site builds with --strict, offline, and the README stays a short, correct
front page whose links resolve and whose Python example is the docs' one."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 150


def python_block(path: Path, heading: str) -> str:
    section = path.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def relative_links(markdown: str) -> list[str]:
    """Targets of the Markdown links and images that point into the repository (no scheme, no bare anchor)."""
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", markdown)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the details belong in docs/"
    text = README.read_text()
    assert "```\nmake demo\nmake test\n```" in text


def test_every_relative_link_of_the_readme_points_at_a_file():
    links = relative_links(README.read_text())
    assert links, "the README links into docs/"
    missing = [link for link in links if not (README.parent / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_the_docs_python_example_is_the_readmes():
    # tests/test_readme.py runs the README's copy; the home page of the site must show the same code
    assert python_block(ROOT / "docs" / "index.md", "## From Python") == python_block(README, "### From Python")


def test_the_site_builds_with_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[dev]' (make does)")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[dev]' (make does)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    site = tmp_path / "site"
    reference = (site / "reference" / "index.html").read_text()
    assert "condiff.train" in reference and "condiff.Run" in reference   # the public namespace, from _EXPORTS
    assert "step_time.py" in (site / "benchmarks" / "index.html").read_text()   # benchmarks/README.md included


def test_every_command_is_named_with_its_python_and_those_names_exist():
    """docs/reference's table of every command from Python: each CLI command has a row, and every dotted name in
    it resolves (a function that moved or was renamed fails here, not in a user's script)."""
    import importlib
    import re

    from condiff.cli import build_parser

    text = (ROOT / "docs" / "reference" / "index.md").read_text()
    table = text.split("## Every command from Python")[1].split("\n## ")[0]
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert all(f"`condiff {name}" in table for name in commands), sorted(commands)
    for dotted in set(re.findall(r"condiff(?:\.\w+)+", table)):
        parts, value = dotted.split("."), None
        for cut in range(len(parts), 0, -1):   # the longest importable module, then attributes
            try:
                value = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attribute in parts[cut:]:
                value = getattr(value, attribute)
            break
        assert value is not None, dotted
