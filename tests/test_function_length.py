"""Functions a reader holds in one sitting (issue 23): no function of condiff is longer than a screen, counted
from its signature's end to its last line, without its docstring (the contract a reader wants to read whole)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "condiff"
MAX_FUNCTION_LINES = 60


def body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the body, without a leading docstring."""
    body = function.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1


def long_functions(source: str) -> list[tuple[str, int]]:
    return [(node.name, body_lines(node)) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(node) > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_a_screen(path):
    assert long_functions(path.read_text()) == []


def test_the_length_check_counts_code_not_the_docstring():
    docstring = '    """' + "\n".join(["line"] * 80) + '"""\n'
    short = "def f():\n" + docstring + "    return 1\n"
    long = "def g():\n" + docstring + "".join(f"    x{i} = {i}\n" for i in range(61))
    assert long_functions(short) == [] and long_functions(long) == [("g", 61)]
