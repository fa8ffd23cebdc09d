"""Text for a terminal's tables: names shown printable, in columns that stay aligned
whatever script they are written in (the CLI's listings, `up`'s banner)."""

from __future__ import annotations

import unicodedata

__all__ = ["cell", "display_width", "printable"]


def printable(text: str) -> str:
    """`text` for a terminal: control characters (an escape sequence in a key's name
    would drive the reader's terminal, a newline forge a line) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def display_width(text: str) -> int:
    """Terminal columns `text` takes."""
    return sum(_columns(c) for c in text)


_ZERO_WIDTH = frozenset(("Mn", "Me", "Cf"))  # marks (U+0902, U+FE0F) and format chars


def _columns(c: str) -> int:
    """Terminal columns one character takes: two for East Asian wide and fullwidth
    ones, none for a nonspacing or enclosing mark or a format character."""
    if unicodedata.category(c) in _ZERO_WIDTH:
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def cell(text: str, width: int) -> str:
    """`text` shown printable, cut to `width` terminal columns and padded to them, so
    that a table's columns stay aligned whatever script a name is written in. A cut
    name ends in "…", so that it is not read as a whole, shorter name."""
    shown = printable(text)
    if display_width(shown) <= width:
        return shown + " " * (width - display_width(shown))
    out: list[str] = []
    used = 0
    for c in shown:
        w = _columns(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…" + " " * (width - 1 - used)
