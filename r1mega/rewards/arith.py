"""A safe evaluator of arithmetic expressions from model output (countdown), over ``ast`` and ``Fraction``.

Only numbers, ``+ - * /``, parentheses and unary signs are accepted; powers, names, calls, attributes,
subscripts and everything else are refused before anything is computed. The text is limited in length,
the tree in size and depth, each literal in digits and every intermediate value in bits, so no input can
make it run long or use much memory. It never calls ``eval``, ``compile`` or sympy.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

_ALLOWED_CHARS = re.compile(r"[0-9+\-*/(). \t]*")
_DIGITS = re.compile(r"[0-9]+")
_LATEX = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("·", "*"), ("÷", "/"), ("−", "-"))
_LATEX += (("\\left", ""), ("\\right", ""), ("{", "("), ("}", ")"))


class UnsafeExpressionError(ValueError):
    """The expression is not plain arithmetic within the limits; the message says what was refused."""


@dataclass(frozen=True)
class ArithLimits:
    """Bounds on what ``safe_eval`` accepts."""

    max_chars: int = 256
    """Longest expression text."""
    max_nodes: int = 128
    """Most syntax-tree nodes."""
    max_depth: int = 32
    """Deepest nesting of operations."""
    max_literal_digits: int = 18
    """Most digits in one number literal."""
    max_bits: int = 1024
    """Largest numerator or denominator of any intermediate value, in bits."""


DEFAULT_LIMITS = ArithLimits()


def normalize_expression(text: str) -> str:
    """Plain-ASCII arithmetic from common LaTeX/Unicode spellings (``\\times``, ``×``, ``÷``, braces)."""
    for old, new in _LATEX:
        text = text.replace(old, new)
    return text.strip().strip("$").strip()


def parse_arithmetic(text: str, limits: ArithLimits = DEFAULT_LIMITS) -> ast.expr:
    """The syntax tree of ``text`` after checking characters, size and node types (nothing is evaluated)."""
    if len(text) > limits.max_chars:
        raise UnsafeExpressionError(f"The expression has {len(text)} characters; at most {limits.max_chars}.")
    if not _ALLOWED_CHARS.fullmatch(text):
        bad = sorted({c for c in text if not _ALLOWED_CHARS.fullmatch(c)})[:5]
        raise UnsafeExpressionError(f"The expression contains {bad!r}; only digits, + - * / ( ) . are allowed.")
    longest = max((len(m) for m in _DIGITS.findall(text)), default=0)
    if longest > limits.max_literal_digits:
        raise UnsafeExpressionError(f"A number in the expression has more than {limits.max_literal_digits} digits.")
    if text.count("(") > limits.max_depth:
        raise UnsafeExpressionError(f"The expression has more than {limits.max_depth} parentheses.")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise UnsafeExpressionError(f"The expression does not parse: {type(e).__name__}.") from None
    nodes = 0
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes or depth > limits.max_depth:
            raise UnsafeExpressionError(
                f"The expression is too large (more than {limits.max_nodes} nodes or {limits.max_depth} levels)."
            )
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
            stack += [(node.left, depth + 1), (node.right, depth + 1)]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            stack.append((node.operand, depth + 1))
        elif not (isinstance(node, ast.Constant) and type(node.value) in (int, float)):
            raise UnsafeExpressionError(f"The expression contains a {type(node).__name__}; only + - * / are allowed.")
    return tree.body


def _literal(node: ast.Constant) -> Fraction:
    """The exact value of a number literal (``0.1`` is 1/10)."""
    value = node.value
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


def literals(tree: ast.expr) -> list[Fraction]:
    """The number literals of a checked tree in source order (in ``-5`` the minus is an operation)."""
    found = [node for node in ast.walk(tree) if isinstance(node, ast.Constant)]
    found.sort(key=lambda node: (node.lineno, node.col_offset))
    return [_literal(node) for node in found]


def evaluate(tree: ast.expr, limits: ArithLimits = DEFAULT_LIMITS) -> Fraction:
    """The exact value of a tree checked by ``parse_arithmetic``; division by zero raises ZeroDivisionError."""
    if isinstance(tree, ast.Constant):
        return _literal(tree)
    if isinstance(tree, ast.UnaryOp):
        value = evaluate(tree.operand, limits)
        return -value if isinstance(tree.op, ast.USub) else value
    if not isinstance(tree, ast.BinOp):
        raise UnsafeExpressionError(f"Cannot evaluate a {type(tree).__name__}: check it with parse_arithmetic first.")
    left, right = evaluate(tree.left, limits), evaluate(tree.right, limits)
    if isinstance(tree.op, ast.Add):
        value = left + right
    elif isinstance(tree.op, ast.Sub):
        value = left - right
    elif isinstance(tree.op, ast.Mult):
        value = left * right
    else:
        value = left / right
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > limits.max_bits:
        raise UnsafeExpressionError(f"An intermediate value is larger than {limits.max_bits} bits.")
    return value


def safe_eval(text: str, limits: ArithLimits = DEFAULT_LIMITS) -> Fraction:
    """The exact value of an arithmetic expression; raises UnsafeExpressionError or ZeroDivisionError."""
    return evaluate(parse_arithmetic(normalize_expression(text), limits), limits)
