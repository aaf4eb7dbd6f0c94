"""``?filter=`` expressions (docs/consul-api.md §12): a go-bexpr subset, parsed and evaluated here.

Grammar (precedence from low to high)::

    expr     := and ("or" and)*
    and      := not ("and" not)*
    not      := "not" not | "(" expr ")" | match
    match    := selector ("==" | "!=") value
              | selector "is" ["not"] "empty"
              | selector ["not"] ("contains" | "matches") value
              | value ["not"] "in" selector
    selector := Ident ("." Ident | "." Digits | "[" String "]")*     Ident = [A-Za-z][A-Za-z0-9_/]*
    value    := String ("..." or `...`) | Number | a bare selector-shaped word

Selectors are validated against the shape of the objects the endpoint returns (``FilterSchema``):
an unknown field, an operator that does not apply to the field's type, a value that does not
convert to it, or anything the grammar does not cover is a 400, never silently ignored. As in
bexpr, a selector that crosses a list (``Checks.Status``) matches when any element matches; a
missing map key reads as ``""``; a bare word value is taken literally (``Status == passing``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from meshd.patterns import PatternError, compile_pattern
from meshd.registry.embedded.store.records import ApiError

# A field type: "str", "int", "bool", "any", ("list", T), ("map", T), or a struct schema (dict).
FieldType = Union[str, tuple[str, "FieldType"], "FilterSchema"]
FilterSchema = Mapping[str, FieldType]

KEYWORDS = {"and", "or", "not", "in", "is", "empty", "contains", "matches"}
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<op>==|!=|\(|\))
  | (?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)
  | (?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?=\s|\)|$))
  | (?P<word>[A-Za-z][A-Za-z0-9_/]*
        (?:\.(?:[A-Za-z][A-Za-z0-9_/]*|[0-9]+)|\[\s*"(?:[^"\\]|\\.)*"\s*\])*)
""", re.VERBOSE)
_PART = re.compile(r'\.?([A-Za-z][A-Za-z0-9_/]*|[0-9]+)|\[\s*("(?:[^"\\]|\\.)*")\s*\]')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "/": "/"}


def _bad(reason: str) -> ApiError:
    return ApiError(400, f"Failed to create boolean expression evaluator: {reason}")


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1] if i + 1 < len(body) else ""
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", body[i + 2:i + 6]):
            out.append(chr(int(body[i + 2:i + 6], 16)))
            i += 6
        else:
            raise _bad(f"invalid escape in string literal {text}")
    return "".join(out)


@dataclass(frozen=True)
class Token:
    kind: str  # op, string, number, word
    text: str


def tokenize(expression: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(expression):
        m = _TOKEN.match(expression, pos)
        if m is None:
            raise _bad(f"invalid syntax at position {pos}: {expression[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            tokens.append(Token(kind, m.group()))
        pos = m.end()
    return tokens


def _selector_path(word: str) -> tuple[str, ...]:
    return tuple(_unquote(m.group(2)) if m.group(2) else m.group(1)
                 for m in _PART.finditer(word))


# --- AST -----------------------------------------------------------------------------------------

Predicate = Callable[[Any], bool]


@dataclass(frozen=True)
class Match:
    path: tuple[str, ...]
    op: str  # ==, !=, in, not in, empty, not empty, matches, not matches
    value: str | None


class _Parser:
    def __init__(self, tokens: list[Token], schema: FilterSchema) -> None:
        self.tokens = tokens
        self.pos = 0
        self.schema = schema

    def peek(self, offset: int = 0) -> Token | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def keyword(self, *words: str, offset: int = 0) -> bool:
        tok = self.peek(offset)
        return tok is not None and tok.kind == "word" and tok.text in words

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise _bad("unexpected end of expression")
        self.pos += 1
        return tok

    def expect_word(self, word: str) -> None:
        tok = self.take()
        if tok.kind != "word" or tok.text != word:
            raise _bad(f"expected {word!r}, found {tok.text!r}")

    def parse(self) -> Predicate:
        if not self.tokens:
            raise _bad("empty expression")
        predicate = self.or_expr()
        if self.peek() is not None:
            raise _bad(f"unexpected {self.peek().text!r}")  # type: ignore[union-attr]
        return predicate

    def or_expr(self) -> Predicate:
        parts = [self.and_expr()]
        while self.keyword("or"):
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else (lambda obj: any(p(obj) for p in parts))

    def and_expr(self) -> Predicate:
        parts = [self.not_expr()]
        while self.keyword("and"):
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else (lambda obj: all(p(obj) for p in parts))

    def not_expr(self) -> Predicate:
        if self.keyword("not"):
            self.take()
            inner = self.not_expr()
            return lambda obj: not inner(obj)
        tok = self.peek()
        if tok is not None and tok.kind == "op" and tok.text == "(":
            self.take()
            inner = self.or_expr()
            close = self.take()
            if close.text != ")":
                raise _bad("Unmatched parentheses")
            return inner
        return self.match()

    def _operand(self) -> Token:
        tok = self.take()
        if tok.kind == "op" or (tok.kind == "word" and tok.text in KEYWORDS):
            raise _bad(f"expected a selector or a value, found {tok.text!r}")
        return tok

    def match(self) -> Predicate:
        first = self._operand()
        negate = self.keyword("not")
        if self.keyword("in", offset=1 if negate else 0):
            self.pos += 2 if negate else 1
            selector = self.take()
            if selector.kind != "word" or selector.text in KEYWORDS:
                raise _bad("Invalid selector")
            value = _unquote(first.text) if first.kind == "string" else first.text
            return self.compile(Match(_selector_path(selector.text),
                                      "not in" if negate else "in", value))
        if first.kind != "word":
            raise _bad(f"expected a selector before the operator, found {first.text!r}")
        path = _selector_path(first.text)
        tok = self.take()
        if tok.kind == "op" and tok.text in ("==", "!="):
            return self.compile(Match(path, tok.text, self._value()))
        if tok.kind == "word" and tok.text == "is":
            negate = self.keyword("not")
            if negate:
                self.take()
            self.expect_word("empty")
            return self.compile(Match(path, "not empty" if negate else "empty", None))
        negate = tok.kind == "word" and tok.text == "not"
        if negate:
            tok = self.take()
        if tok.kind == "word" and tok.text == "contains":
            return self.compile(Match(path, "not in" if negate else "in", self._value()))
        if tok.kind == "word" and tok.text == "matches":
            return self.compile(Match(path, "not matches" if negate else "matches",
                                      self._value()))
        raise _bad(f"unknown operator {tok.text!r}")

    def _value(self) -> str:
        tok = self._operand()
        return _unquote(tok.text) if tok.kind == "string" else tok.text

    def compile(self, match: Match) -> Predicate:
        leaf = _resolve(self.schema, match.path)
        test = _leaf_test(leaf, match)
        path = match.path

        def predicate(obj: Any) -> bool:
            return _walk(obj, self.schema, path, test)

        return predicate


def _resolve(schema: FieldType, path: tuple[str, ...]) -> FieldType:
    """The type at the end of ``path`` (list elements crossed by name); 400 when invalid."""
    current: FieldType = schema
    for i, part in enumerate(path):
        while isinstance(current, tuple) and current[0] == "list" and not part.isdigit():
            current = current[1]
        if isinstance(current, tuple):
            current = current[1]  # a map key or a list index
        elif isinstance(current, Mapping) and part in current:
            current = current[part]
        elif current == "any":
            return "any"
        else:
            raise _bad(f'Selector "{".".join(path[:i + 1])}" is not valid')
    return current


def _zero(ftype: FieldType) -> Any:
    if ftype == "str":
        return ""
    if ftype == "int":
        return 0
    if ftype == "bool":
        return False
    if isinstance(ftype, tuple):
        return [] if ftype[0] == "list" else {}
    return {}


def _walk(value: Any, ftype: FieldType, path: tuple[str, ...], test: Predicate) -> bool:
    if not path:
        return bool(test(_zero(ftype) if value is None else value))
    part, rest = path[0], path[1:]
    if isinstance(ftype, tuple) and ftype[0] == "list":
        items = value if isinstance(value, list) else []
        if part.isdigit():
            item = items[int(part)] if int(part) < len(items) else None
            return _walk(item, ftype[1], rest, test)
        return any(_walk(item, ftype[1], path, test) for item in items)
    if isinstance(ftype, tuple):  # a map: a missing key reads as the zero value
        child = value.get(part) if isinstance(value, Mapping) else None
        return _walk(child, ftype[1], rest, test)
    if isinstance(ftype, Mapping):
        child = value.get(part) if isinstance(value, Mapping) else None
        return _walk(child, ftype[part], rest, test)
    child = value.get(part) if isinstance(value, Mapping) else None  # "any"
    return _walk(child, "any", rest, test)


def _coerce(raw: str, ftype: FieldType) -> Any:
    if ftype == "int":
        try:
            return int(raw)
        except ValueError:
            raise _bad(f"value {raw!r} is not an integer") from None
    if ftype == "bool":
        if raw in ("1", "t", "T", "true", "TRUE", "True"):
            return True
        if raw in ("0", "f", "F", "false", "FALSE", "False"):
            return False
        raise _bad(f"value {raw!r} is not a boolean")
    return raw


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    if isinstance(expected, str):
        return isinstance(actual, str | int | float) and str(actual) == expected
    return bool(actual == expected)


def _leaf_test(ftype: FieldType, match: Match) -> Predicate:
    op, raw = match.op, match.value
    selector = ".".join(match.path)
    primitive = ftype in ("str", "int", "bool", "any")
    if op in ("==", "!="):
        if not primitive:
            raise _bad(f'Selector "{selector}" cannot be compared with {op}')
        expected = _coerce(raw or "", ftype)
        if op == "==":
            return lambda v: _equal(v, expected)
        return lambda v: not _equal(v, expected)
    if op in ("empty", "not empty"):
        if ftype not in ("str", "any") and not isinstance(ftype, tuple | Mapping):
            raise _bad(f'Selector "{selector}" cannot be tested with "is empty"')
        want = op == "empty"
        return lambda v: (len(v) == 0 if isinstance(v, str | list | dict) else not v) == want
    if op in ("matches", "not matches"):
        if ftype not in ("str", "any"):
            raise _bad(f'Selector "{selector}" is not a string: it cannot be matched')
        try:
            pattern = compile_pattern(raw or "")
        except PatternError as exc:
            raise _bad(f"Failed to compile regular expression {raw!r}: {exc}") from None
        want = op == "matches"
        return lambda v: (isinstance(v, str) and pattern.search(v) is not None) == want
    want = op == "in"  # in / not in / contains / not contains
    if isinstance(ftype, tuple) and ftype[0] == "list":
        element = _coerce(raw or "", ftype[1]) if ftype[1] in ("int", "bool") else raw
        return lambda v: any(_equal(item, element) for item in v) == want
    if isinstance(ftype, tuple | Mapping):
        return lambda v: (isinstance(v, dict) and raw in v) == want
    if ftype in ("str", "any"):
        return lambda v: (isinstance(v, str) and (raw or "") in v) == want
    raise _bad(f'Cannot perform in/contains operations on selector "{selector}"')


def compile_filter(expression: str, schema: FilterSchema) -> Predicate:
    """A predicate over one returned object, or ``ApiError(400)`` for what is not understood."""
    return _Parser(tokenize(expression), schema).parse()
