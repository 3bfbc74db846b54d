"""Shrink a Python file for the user data without changing what it does or where its lines are.

AWS caps user data at 16 KB (gzip included), and the health daemon alone is most of that. When
the compressed user data does not fit, the renderer embeds the VM scripts with comments and
docstrings removed. Lines are blanked, never joined, so a traceback on the VM names the same line
numbers as the file in the repository. :func:`compact_python` proves its result: the compacted
source must parse to the same syntax tree as the original minus its docstrings, with every
statement on its original line.
"""

from __future__ import annotations

import ast
import io
import tokenize


class CompactError(ValueError):
    """The file cannot be compacted safely (it reads ``__doc__``, or the proof failed)."""


def _string_statements(tree: ast.AST) -> list[tuple[ast.Expr, bool]]:
    """Every statement that is a bare string (docstrings), and whether it is alone in its block."""
    found = []
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for stmt in block:
                if (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                        and isinstance(stmt.value.value, str)):
                    found.append((stmt, len(block) == 1))
    return found


def _without_docstrings(tree: ast.Module) -> ast.Module:
    """The tree the compacted source must parse to: sole docstrings become ``...``, others go."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            kept = []
            for stmt in block:
                if (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                        and isinstance(stmt.value.value, str)):
                    if len(block) == 1:
                        kept.append(ast.Expr(ast.Constant(...)))
                    continue
                kept.append(stmt)
            setattr(node, field, kept)
    return tree


def _statement_lines(tree: ast.AST) -> list[int]:
    return sorted(n.lineno for n in ast.walk(tree) if isinstance(n, ast.stmt)
                  and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)))


def compact_python(source: str, name: str = "<file>") -> str:
    """``source`` without comments (the shebang kept) and docstrings, on the same line numbers."""
    tree = ast.parse(source, name)
    if any(isinstance(n, ast.Name) and n.id == "__doc__" or isinstance(n, ast.Attribute) and n.attr == "__doc__"
           for n in ast.walk(tree)):
        raise CompactError(f"{name} reads __doc__; docstrings cannot be removed from it")
    lines = source.splitlines()
    edits: list[tuple[int, int, int, int, str]] = []
    for stmt, alone in _string_statements(tree):
        assert stmt.end_lineno is not None and stmt.end_col_offset is not None
        edits.append((stmt.lineno, stmt.col_offset, stmt.end_lineno, stmt.end_col_offset, "..." if alone else ""))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not (tok.start[0] == 1 and tok.string.startswith("#!")):
            row, col = tok.start
            edits.append((row, col, row, len(lines[row - 1]), ""))
    # Apply from the end of the file so earlier positions stay valid.
    for first, col, last, end_col, replacement in sorted(edits, reverse=True):
        if first == last:
            line = lines[first - 1]
            lines[first - 1] = (line[:col] + replacement + line[end_col:]).rstrip()
        else:
            lines[first - 1] = (lines[first - 1][:col] + replacement).rstrip()
            for i in range(first, last - 1):
                lines[i] = ""
            lines[last - 1] = lines[last - 1][end_col:].rstrip()
    result = "\n".join(line.rstrip() for line in lines) + "\n"
    _prove(source, result, name)
    return result


def _prove(original: str, compacted: str, name: str) -> None:
    try:
        new_tree = ast.parse(compacted, name)
    except SyntaxError as exc:
        raise CompactError(f"compacting {name} broke its syntax at line {exc.lineno}") from None
    old_tree = ast.parse(original, name)
    if ast.dump(_without_docstrings(ast.parse(original, name))) != ast.dump(_without_docstrings(new_tree)):
        raise CompactError(f"compacting {name} changed its syntax tree")
    if _statement_lines(old_tree) != _statement_lines(new_tree):
        raise CompactError(f"compacting {name} moved statements to other lines")
    if original.count("\n") != compacted.count("\n"):
        raise CompactError(f"compacting {name} changed its line count")
