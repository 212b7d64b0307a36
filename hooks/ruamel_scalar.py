"""A string scalar written exactly as ruamel.yaml's round-trip dumper writes it (stdlib only).

DVC dumps `.dvc` files with ``ruamel.yaml.YAML()`` (YAML 1.2, width 80, unicode allowed), and the
post-copy hook must write the same bytes without importing either. This is a port of the parts of
ruamel.yaml (0.18.17 and 0.19.1 agree) that decide a string's style and fold it: the resolvers
(`resolver.py`), then `analyze_scalar`, `choose_scalar_style` and the plain, single- and
double-quoted writers (`emitter.py`), kept close to the original so the two can be compared.
Only the case DVC needs is covered: a string value of a block mapping, outside any flow context.
"""

from __future__ import annotations

import re

WIDTH = 80  # ruamel.yaml's best_width; DVC keeps the default
BREAKS = "\n\x85\u2028\u2029"
WHITESPACE = "\0 \t\r" + BREAKS
# YAML 1.2 implicit resolvers, keyed by the first characters they apply to: a string that one
# of them matches would read back as something else, so it cannot be written plain.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?[0-9_]+|[-+]?0x[0-9a-fA-F_]+)$")
_TIMESTAMP = re.compile(
    r"""^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
    |[0-9][0-9][0-9][0-9] -[0-9][0-9]? -[0-9][0-9]?
    (?:[Tt]|[ \t]+)[0-9][0-9]?
    :[0-9][0-9] :[0-9][0-9] (?:\.[0-9]*)?
    (?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$""",
    re.X,
)
_RESOLVERS: list[tuple[str, re.Pattern[str]]] = [
    ("tTfF", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")),
    ("-+0123456789.", _FLOAT),
    ("-+0123456789", _INT),
    ("<", re.compile(r"^(?:<<)$")),
    ("~nN", re.compile(r"^(?:~|null|Null|NULL)$")),
    ("0123456789", _TIMESTAMP),
    ("=", re.compile(r"^(?:=)$")),
    ("!&*", re.compile(r"^(?:!|&|\*)$")),
]
_ESCAPES = {
    "\0": "0",
    "\x07": "a",
    "\x08": "b",
    "\x09": "t",
    "\x0a": "n",
    "\x0b": "v",
    "\x0c": "f",
    "\x0d": "r",
    "\x1b": "e",
    '"': '"',
    "\\": "\\",
    "\x85": "N",
    "\xa0": "_",
    "\u2028": "L",
    "\u2029": "P",
}


def reads_back_as_string(value: str) -> bool:
    """Tell whether ``value``, written plain, loads as this string (no 1.2 resolver claims it)."""
    if not value:
        return False  # null
    return not any(value[0] in chars and pattern.match(value) for chars, pattern in _RESOLVERS)


def _printable_unicode(ch: str) -> bool:
    return (
        ch == "\x85"
        or "\xa0" <= ch <= "\ud7ff"
        or "\ue000" <= ch <= "\ufffd"
        or "\U00010000" <= ch <= "\U0010ffff"
    ) and ch != "\ufeff"


def style(value: str) -> str:
    """Return the style ruamel.yaml picks for a block mapping's string value: '', "'" or '"'."""
    if not value:
        return "'"  # plain, it would read back as null
    block_indicators = value.startswith(("---", "..."))
    line_breaks = special = False
    leading_space = trailing_space = leading_break = trailing_break = False
    break_space = space_break = previous_space = previous_break = False
    preceded_by_ws = True
    followed_by_ws = len(value) == 1 or value[1] in WHITESPACE
    for index, ch in enumerate(value):
        if index == 0:
            if ch in "#,[]{}&*!|>'\"%@`" or (ch in "?:-" and followed_by_ws):
                block_indicators = True
        elif (ch == ":" and followed_by_ws) or (ch == "#" and preceded_by_ws):
            block_indicators = True
        if ch in BREAKS:
            line_breaks = True
        if not (ch == "\n" or "\x20" <= ch <= "\x7e" or _printable_unicode(ch)):
            special = True
        last = index == len(value) - 1
        if ch == " ":
            leading_space |= index == 0
            trailing_space |= last
            break_space |= previous_break
            previous_space, previous_break = True, False
        elif ch in BREAKS:
            leading_break |= index == 0
            trailing_break |= last
            space_break |= previous_space
            previous_space, previous_break = False, True
        else:
            previous_space = previous_break = False
        preceded_by_ws = ch in WHITESPACE
        followed_by_ws = index + 2 >= len(value) or value[index + 2] in WHITESPACE
    plain = not (
        leading_space
        or leading_break
        or trailing_space
        or trailing_break
        or break_space
        or special
        or space_break
        or line_breaks
        or block_indicators
    )
    if plain and reads_back_as_string(value):
        return ""
    if "'" in value or "\n" in value:
        return '"'
    return '"' if break_space or special or space_break else "'"


class _Writer:
    """The emitter's column bookkeeping, for one scalar after ``key:`` at ``column``."""

    def __init__(self, column: int, indent: int) -> None:
        self.out: list[str] = []
        self.column = column
        self.indent = indent
        self.whitespace = False
        self.indention = False

    def write(self, data: str) -> None:
        self.column += len(data)
        self.out.append(data)

    def indicator(self, indicator: str, need_whitespace: bool) -> None:
        self.write(indicator if self.whitespace or not need_whitespace else " " + indicator)
        self.whitespace = False
        self.indention = False

    def line_break(self, data: str = "\n") -> None:
        self.out.append(data)
        self.whitespace = self.indention = True
        self.column = 0

    def write_indent(self) -> None:
        if (
            not self.indention
            or self.column > self.indent
            or (self.column == self.indent and not self.whitespace)
        ):
            self.line_break()
        if self.column < self.indent:
            self.whitespace = True
            self.out.append(" " * (self.indent - self.column))
            self.column = self.indent

    def breaks(self, text: str) -> None:
        if text[0] == "\n":
            self.line_break()
        for br in text:
            self.line_break(br)
        self.write_indent()

    def plain(self, text: str) -> None:
        if not text:
            return
        if not self.whitespace:
            self.write(" ")
        self.whitespace = self.indention = False
        spaces = breaks = False
        start = end = 0
        while end <= len(text):
            ch = text[end] if end < len(text) else None
            if spaces:
                if ch != " ":
                    if start + 1 == end and self.column >= WIDTH:
                        self.write_indent()
                        self.whitespace = self.indention = False
                    else:
                        self.write(text[start:end])
                    start = end
            elif breaks:
                if ch is None or ch not in BREAKS:
                    self.breaks(text[start:end])
                    self.whitespace = self.indention = False
                    start = end
            elif ch is None or ch in " " + BREAKS:
                data = text[start:end]
                if len(data) + self.column > WIDTH and self.column > self.indent:
                    self.write_indent()  # a word longer than the line gets a line of its own
                self.write(data)
                start = end
            if ch is not None:
                spaces, breaks = ch == " ", ch in BREAKS
            end += 1

    def single_quoted(self, text: str) -> None:
        self.indicator("'", True)
        spaces = breaks = False
        start = end = 0
        while end <= len(text):
            ch = text[end] if end < len(text) else None
            if spaces:
                if ch is None or ch != " ":
                    if start + 1 == end and self.column > WIDTH and 0 < start < end < len(text):
                        self.write_indent()
                    else:
                        self.write(text[start:end])
                    start = end
            elif breaks:
                if ch is None or ch not in BREAKS:
                    self.breaks(text[start:end])
                    start = end
            elif (ch is None or ch in " " + BREAKS or ch == "'") and start < end:
                self.write(text[start:end])
                start = end
            if ch == "'":
                self.write("''")
                start = end + 1
            if ch is not None:
                spaces, breaks = ch == " ", ch in BREAKS
            end += 1
        self.indicator("'", False)

    def double_quoted(self, text: str) -> None:
        self.indicator('"', True)
        start = end = 0
        while end <= len(text):
            ch = text[end] if end < len(text) else None
            if ch is None or ch in '"\\\x85\u2028\u2029\ufeff' or not _written_unescaped(ch):
                if start < end:
                    self.write(text[start:end])
                    start = end
                if ch is not None:
                    self.write("\\" + _escape(ch))
                    start = end + 1
            if (
                0 < end < len(text) - 1
                and (ch == " " or start >= end)
                and self.column + (end - start) > WIDTH
            ):
                backslash = _needs_backslash(text, start, end)
                self.write(text[start:end] + ("\\" if backslash else ""))
                start = max(start, end)
                self.write_indent()
                self.whitespace = self.indention = False
                if text[start] == " ":
                    if not backslash:
                        start += 1  # the line break reads back as this space
                    self.write("\\" if backslash else "")
            end += 1
        self.indicator('"', False)


def _written_unescaped(ch: str) -> bool:
    return "\x20" <= ch <= "\x7e" or (
        "\xa0" <= ch <= "\ud7ff" or "\ue000" <= ch <= "\ufffd" or ch >= "\U00010000"
    )


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if ch <= "\xff":
        return f"x{ord(ch):02X}"
    if ch <= "\uffff":
        return f"u{ord(ch):04X}"
    return f"U{ord(ch):08X}"


def _needs_backslash(text: str, start: int, end: int) -> bool:
    """Whether a fold of a double-quoted string at ``end`` must end its line with ``\\``."""
    space = text.find(" ", end)
    if space < 0:
        return True
    if (newline := text.find("\n", end, space)) >= 0:
        space = newline
    if space + 1 >= len(text) or (text[space] == "\n" and text[space + 1] != " "):
        return True
    return not (
        '"' not in text[end:space]
        and "'" not in text[end:space]
        and text[space + 1] not in " \n"
        and text[end - 1 : end + 1] != "  "
        and start != end
    )


def scalar(value: str, column: int, indent: int) -> str:
    """Return what follows ``key:`` (ending at ``column``) for a string value, leading space too.

    ``indent`` is the column continuation lines start at: the key's indentation plus two.
    """
    writer = _Writer(column, indent)
    chosen = style(value)
    if chosen == '"':
        writer.double_quoted(value)
    elif chosen == "'":
        writer.single_quoted(value)
    else:
        writer.plain(value)
    return "".join(writer.out)
