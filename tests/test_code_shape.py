"""Code shape rules of femur_core that a linter does not check: no function body over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import femur_core

MAX_LINES = 80


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring (signature and body)."""
    body = fn.body
    first = body[0]
    if len(body) > 1 and isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        return fn.end_lineno - fn.lineno + 1 - (first.end_lineno - first.lineno + 1)
    return fn.end_lineno - fn.lineno + 1


def test_no_femur_core_function_is_longer_than_80_lines():
    root = Path(femur_core.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_LINES:
                long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({_body_lines(node)} lines)")
    assert not long, "split these functions: " + "; ".join(long)


def test_the_rule_sees_a_long_function(tmp_path):
    """The counter is real: a 90-line function is caught, its docstring does not count."""
    src = "def f():\n    '''doc\n    more'''\n" + "    x = 1\n" * 90
    [fn] = ast.parse(src).body
    assert _body_lines(fn) == 91
